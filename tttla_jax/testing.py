"""The equivalence harness: prove that several forms of one computation agree.

The library's central promise is that every parallel form, kernel and reduction of a
rule computes *the same function* as its ``lax.scan`` recurrence — outputs, final state
and gradients with respect to every input (including initial fast weights and learning
rates). This module is how the test-suite, the notebooks and users check that::

    import tttla_jax as tt
    report = tt.testing.check_equivalence(
        {"recurrent": f_rec, "parallel": f_par},   # each: (**inputs) -> (outputs, state)
        inputs,                                    # dict of arrays (the differentiable ones)
        baseline="recurrent",
    )
    print(report)          # a readable table of max errors per form and quantity
    report.assert_ok()     # raises AssertionError listing every failing entry

Tolerances default by dtype (:data:`DEFAULT_TOLERANCES`): float64 1e-10, float32 1e-4,
bfloat16 3e-2, all *relative to the baseline's max magnitude* of the compared quantity
(an absolute floor of the same size for all-zero quantities).

Gradients are taken of a generic scalar ``Σ_i w_i·o_i + Σ_j w'_j·S_j`` (fixed sinusoidal
cotangents, different for every element and leaf), so a form that gets one element's
gradient wrong cannot hide behind a sum.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TOLERANCES = {
    jnp.dtype(jnp.float64): 1e-10,
    jnp.dtype(jnp.float32): 1e-4,
    jnp.dtype(jnp.bfloat16): 3e-2,
    jnp.dtype(jnp.float16): 1e-2,
}


@dataclasses.dataclass
class Entry:
    form: str
    quantity: str  # "output", "state", or "grad[name]"
    max_abs_err: float
    scale: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_err)) and self.max_abs_err <= self.tol * max(self.scale, 1.0)


@dataclasses.dataclass
class Report:
    baseline: str
    entries: list

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.entries)

    def failures(self):
        return [e for e in self.entries if not e.ok]

    def max_error(self, form: Optional[str] = None) -> float:
        errs = [e.max_abs_err for e in self.entries if form is None or e.form == form]
        return max(errs) if errs else 0.0

    def __str__(self) -> str:
        lines = [f"equivalence vs {self.baseline!r}:",
                 f"  {'form':<14} {'quantity':<22} {'max |err|':>11} {'scale':>10} {'tol':>8}  ok"]
        for e in self.entries:
            lines.append(f"  {e.form:<14} {e.quantity:<22} {e.max_abs_err:11.3e} {e.scale:10.3e} "
                         f"{e.tol:8.1e}  {'yes' if e.ok else 'NO'}")
        return "\n".join(lines)

    def assert_ok(self):
        if not self.ok:
            raise AssertionError("forms disagree:\n" + str(self))


def _leaves(x):
    return [l for l in jax.tree_util.tree_leaves(x) if l is not None]


def _is_floating_tree(x) -> bool:
    """An input is differentiated when it is a pytree whose leaves are all floating arrays."""
    leaves = _leaves(x)
    return bool(leaves) and all(hasattr(l, "dtype") and jnp.issubdtype(l.dtype, jnp.floating)
                                for l in leaves)


def _scalar_of(out):
    """Generic scalar of a pytree of outputs (fixed sin/cos cotangents, computed in float64
    when x64 is enabled, else float32)."""
    total = 0.0
    for i, leaf in enumerate(_leaves(out)):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        acc = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        w = jnp.sin(jnp.arange(leaf.size, dtype=acc) * (0.37 + i)).reshape(leaf.shape)
        total = total + jnp.sum(leaf.astype(acc) * w)
    return total


def _compare(form, quantity, x, ref, tol, entries):
    xs, rs = _leaves(x), _leaves(ref)
    if len(xs) != len(rs):
        entries.append(Entry(form, quantity + " (structure)", float("inf"), 0.0, tol))
        return
    err, scale = 0.0, 0.0
    for a, b in zip(xs, rs):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            err = float("inf")
            continue
        err = max(err, float(np.max(np.abs(a - b))) if a.size else 0.0)
        scale = max(scale, float(np.max(np.abs(b))) if b.size else 0.0)
    entries.append(Entry(form, quantity, err, scale, tol))


def check_equivalence(
    forms: Mapping[str, Callable],
    inputs: Mapping[str, jax.Array],
    *,
    baseline: Optional[str] = None,
    grad_wrt: Optional[Sequence[str]] = None,
    tol: Optional[float] = None,
    check_grads: bool = True,
    check_state: bool = True,
    jit: bool = True,
) -> Report:
    """Compare every form in ``forms`` against ``baseline`` on ``inputs``.

    Args:
      forms: name → callable ``(**inputs) -> (outputs, state)`` (``state`` may be any
        pytree, or ``None``).
      inputs: keyword inputs shared by all forms (arrays or pytrees of arrays, e.g. a
        state NamedTuple); inputs whose leaves are all floating are differentiated.
      baseline: the form the others are compared with (default: the first).
      grad_wrt: names of inputs to differentiate (default: every floating input).
      tol: relative tolerance; default from :data:`DEFAULT_TOLERANCES` by the inputs' dtype.
      check_grads: also compare gradients.
      check_state: also compare the returned states (turn off for forms, such as a
        reduction's attention form, that return outputs only).
      jit: run each form under ``jax.jit``.

    Returns:
      a :class:`Report` (``print`` it; ``report.assert_ok()`` raises on disagreement).
    """
    if not forms:
        raise ValueError("forms: expected at least one form, got none")
    names = list(forms)
    baseline = names[0] if baseline is None else baseline
    if baseline not in forms:
        raise ValueError(f"baseline: got {baseline!r}, expected one of {tuple(names)}")
    float_names = [n for n, x in inputs.items() if _is_floating_tree(x)]
    grad_wrt = list(float_names if grad_wrt is None else grad_wrt)
    for n in grad_wrt:
        if n not in float_names:
            raise ValueError(f"grad_wrt: {n!r} is not a floating input; floating inputs are {tuple(float_names)}")
    if tol is None:
        dts = [jnp.dtype(l.dtype) for n in float_names for l in _leaves(inputs[n])]
        tol = max((DEFAULT_TOLERANCES.get(d, 1e-4) for d in dts), default=1e-10)

    with_grads = bool(check_grads and grad_wrt)

    def evaluate(fn):
        """(outputs, gradients or None) of one form: a single compile computes both."""
        if not with_grads:
            call = lambda kw: fn(**kw)  # noqa: E731
            return (jax.jit(call) if jit else call)(dict(inputs)), None

        def scalar(diff):
            kw = dict(inputs)
            kw.update(diff)
            out = fn(**kw)
            diff_out = out[0] if not check_state and isinstance(out, tuple) and len(out) == 2 else out
            return _scalar_of(diff_out), out

        vg = jax.value_and_grad(scalar, has_aux=True)
        (_, out), g = (jax.jit(vg) if jit else vg)({n: inputs[n] for n in grad_wrt})
        return out, g

    ref_out, ref_grads = evaluate(forms[baseline])
    entries = []
    for name in names:
        if name == baseline:
            continue
        out, g = evaluate(forms[name])
        o, s = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        ro, rs = ref_out if isinstance(ref_out, tuple) and len(ref_out) == 2 else (ref_out, None)
        _compare(name, "output", o, ro, tol, entries)
        if check_state and (rs is not None or s is not None):
            _compare(name, "state", s, rs, tol, entries)
        if ref_grads is not None:
            for n in grad_wrt:
                _compare(name, f"grad[{n}]", g[n], ref_grads[n], tol, entries)
    return Report(baseline, entries)


def random_inputs(shapes: Mapping[str, tuple], *, seed: int = 0, dtype=jnp.float32,
                  kinds: Optional[Mapping[str, str]] = None) -> Dict[str, jax.Array]:
    """Seeded random inputs. ``kinds[name]``: "normal" (default), "unit" (L2-normalised over
    the last axis), "logdecay" (uniform in [-0.3, 0]), "rate" (uniform in (0, 1))."""
    rng = np.random.default_rng(seed)
    kinds = dict(kinds or {})
    out = {}
    for name, shape in shapes.items():
        kind = kinds.get(name, "normal")
        if kind == "normal":
            x = rng.normal(size=shape)
        elif kind == "unit":
            x = rng.normal(size=shape)
            x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        elif kind == "logdecay":
            x = -rng.uniform(0.0, 0.3, size=shape)
        elif kind == "rate":
            x = rng.uniform(0.05, 0.95, size=shape)
        else:
            raise ValueError(f"kinds[{name!r}]: got {kind!r}, expected 'normal', 'unit', 'logdecay' or 'rate'")
        out[name] = jnp.asarray(x, dtype)
    return out


def check_rule(rule, args: Sequence, *, reduction: bool = True, **kwargs) -> Report:
    """Check a rule: ``recurrent`` vs ``parallel`` (when ``rule.breaks_associativity()`` is
    ``None``; plus every layout in ``rule.parallel_impls()`` when the rule lists several) vs its linear-attention reading (``tt.reduce``, outputs only, when a reducer is
    registered). ``args`` are the positional inputs of ``rule.recurrent`` (as produced by
    the registry's builders, :data:`tttla_jax.rules.REGISTRY`); other keyword arguments go
    to :func:`check_equivalence`.
    """
    from tttla_jax.reduce import has_reducer, reduce as reduce_rule  # deferred: imports the rules

    names = [f"arg{i}" for i in range(len(args))]
    inputs = dict(zip(names, args))

    def positional(fn):
        return lambda **kw: fn(*[kw[n] for n in names])

    forms = {"recurrent": positional(rule.recurrent)}
    if rule.breaks_associativity() is None:
        forms["parallel"] = positional(rule.parallel)
        # rules with several parallel layouts list them; each is checked on its own
        for impl in getattr(rule, "parallel_impls", lambda: ())():
            forms[f"parallel[{impl}]"] = positional(functools.partial(rule.parallel, impl=impl))
    report = check_equivalence(forms, inputs, **kwargs) if len(forms) > 1 else Report("recurrent", [])
    if reduction and has_reducer(rule):
        red = check_equivalence(
            {"recurrent": positional(rule.recurrent),
             "reduction": positional(lambda *a: reduce_rule(rule, *a).outputs())},
            inputs, check_state=False, **kwargs)
        report.entries.extend(red.entries)
    return report
