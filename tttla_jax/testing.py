"""The equivalence harness: prove that several forms of one computation agree.

The library's central promise is that every parallel form, kernel and linear-attention
reading of a rule computes *the same function* as its ``lax.scan`` recurrence — outputs,
final state and gradients with respect to every input (including initial fast weights and
learning rates); see docs/ttt_as_linear_attention.md and docs/implementations.md. This
module is how the test-suite, the notebooks and users check that::

    import tttla_jax as tt
    report = tt.testing.check_equivalence(
        {"recurrent": f_rec, "chunked": f_par},    # each: (**inputs) -> (outputs, state)
        inputs,                                    # dict of arrays (the differentiable ones)
        baseline="recurrent",
    )
    print(report)          # a readable table: max |err|, max |ref| and bound per form and quantity
    report.assert_ok()     # raises AssertionError listing every failing entry

    report = tt.testing.check_rule(rule, args)     # a rule: recurrent vs parallel forms vs reading

The comparison is in the style of ``chex.assert_trees_all_close`` — a tree-structure and
shape check (``chex.assert_trees_all_equal_structs`` / ``chex.assert_trees_all_equal_shapes``),
then closeness leaf by leaf — with a tolerance *relative to the baseline's magnitude*:
for every leaf of a compared quantity (outputs, state, the gradient w.r.t. one input),

    max |x - ref|  <=  rtol * max |ref|  +  atol

(max over the leaf's elements). ``rtol`` defaults by dtype (:data:`DEFAULT_TOLERANCES`:
float64 1e-10, float32 1e-4, bfloat16 3e-2, float16 1e-2); ``atol`` is a small absolute
floor (:data:`DEFAULT_ATOLS`, ``rtol / 100``: float64 1e-12, float32 1e-6, bfloat16 3e-4,
float16 1e-4) that only matters for a leaf that is zero up to rounding in both forms (e.g.
the gradient w.r.t. an input the outputs do not depend on). The dtype is the coarsest of
the floating inputs' dtypes and the baseline leaf's own. A structure or shape mismatch is
reported as such, naming the quantity, the form and both shapes.

Gradients are taken of a generic scalar ``Σ_i w_i·o_i + Σ_j w'_j·S_j`` with fixed
sinusoidal cotangents, different for every element and leaf (no element gets weight 0), so a
form that gets one element's gradient wrong cannot hide behind a sum. The cotangents are a
function of each leaf's *name and shape* (not of its position among the form's leaves),
so every form is differentiated against the same scalar; a form whose state does not match
the baseline's structure is reported once (``state``) and its gradients are still compared
through the outputs alone — a wrong state never makes every gradient look wrong too.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import zlib
from typing import Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

#: Relative tolerance by dtype: a leaf passes when max|x - ref| <= rtol * max|ref| + atol.
DEFAULT_TOLERANCES = {
    jnp.dtype(jnp.float64): 1e-10,
    jnp.dtype(jnp.float32): 1e-4,
    jnp.dtype(jnp.bfloat16): 3e-2,
    jnp.dtype(jnp.float16): 1e-2,
}

#: Absolute floor by dtype (``rtol / 100``): lets a quantity that is zero up to rounding in
#: both forms pass; far below any error the relative bound is meant to catch at O(1) scale.
DEFAULT_ATOLS = {
    jnp.dtype(jnp.float64): 1e-12,
    jnp.dtype(jnp.float32): 1e-6,
    jnp.dtype(jnp.bfloat16): 3e-4,
    jnp.dtype(jnp.float16): 1e-4,
}

_FALLBACK_DTYPE = jnp.dtype(jnp.float32)  # tolerance of a floating dtype not listed above


@dataclasses.dataclass
class Entry:
    """One compared quantity of one form.

    Attributes:
      form: the compared form's name.
      quantity: ``"output"``, ``"state"`` or ``"grad[<input>]"``.
      max_abs_err: ``max |x - ref|`` of the decisive leaf (``inf`` on a mismatch).
      scale: ``max |ref|`` of that leaf (the baseline's magnitude).
      tol: the relative tolerance ``rtol`` applied to it.
      atol: the absolute floor applied to it.
      leaf: which leaf of a multi-leaf quantity is shown (``""`` for a single array): the
        one closest to, or furthest past, its bound — every leaf must meet its own bound.
      mismatch: ``None``, or why the quantity could not be compared (structure / shape,
        naming both); an entry with a mismatch fails.
      note: extra information (e.g. gradients compared through the outputs only).
    """

    form: str
    quantity: str  # "output", "state", or "grad[name]"
    max_abs_err: float
    scale: float
    tol: float
    atol: float = 0.0
    leaf: str = ""
    mismatch: Optional[str] = None
    note: str = ""

    @property
    def bound(self) -> float:
        """``tol * scale + atol``: the largest ``max_abs_err`` that passes."""
        return self.tol * self.scale + self.atol

    @property
    def ok(self) -> bool:
        return (self.mismatch is None and bool(np.isfinite(self.max_abs_err))
                and self.max_abs_err <= self.bound)

    @property
    def family(self) -> str:
        """The form's name without a bracketed implementation: ``"parallel[chunked]"`` ->
        ``"parallel"``."""
        return self.form.split("[", 1)[0]

    def describe(self) -> str:
        """One line: what was compared, the magnitudes and the verdict."""
        if self.mismatch is not None:
            return f"{self.form} {self.quantity}: {self.mismatch}"
        where = f"{self.form} {self.quantity}" + (f" (leaf {self.leaf})" if self.leaf else "")
        rel = self.max_abs_err / self.scale if self.scale > 0 else float("inf")
        cmp = "<=" if self.ok else ">"
        s = (f"{where}: max|err| = {self.max_abs_err:.3e} {cmp} bound {self.bound:.3e} "
             f"= {self.tol:.0e} * max|ref| {self.scale:.3e} + {self.atol:.0e} "
             f"(relative error {rel:.2e})")
        return s + (f"; {self.note}" if self.note else "")


@dataclasses.dataclass
class Report:
    """The entries of one :func:`check_equivalence` call (``print`` it for a table)."""

    baseline: str
    entries: list

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.entries)

    def failures(self) -> List[Entry]:
        return [e for e in self.entries if not e.ok]

    def forms(self) -> Tuple[str, ...]:
        """The compared forms, in order (the baseline excluded)."""
        return tuple(dict.fromkeys(e.form for e in self.entries))

    def max_error(self, form: Optional[str] = None) -> float:
        """Largest ``max_abs_err`` over the entries of ``form`` (a form's name, or a family
        such as ``"parallel"`` matching every ``"parallel[<impl>]"``; all forms if ``None``)."""
        errs = [e.max_abs_err for e in self.entries if form is None or form in (e.form, e.family)]
        return max(errs) if errs else 0.0

    def __str__(self) -> str:
        w = max([len(e.form) for e in self.entries] + [4])
        wq = max([len(e.quantity) for e in self.entries] + [8])
        lines = [f"equivalence vs {self.baseline!r}  (pass: max|err| <= rtol*max|ref| + atol, per leaf)",
                 f"  {'form':<{w}} {'quantity':<{wq}} {'max|err|':>10} {'max|ref|':>10} "
                 f"{'rtol':>6} {'atol':>6} {'err/bound':>9}  ok"]
        for e in self.entries:
            if e.mismatch is not None:
                lines.append(f"  {e.form:<{w}} {e.quantity:<{wq}} {'-':>10} {e.scale:10.3e} "
                             f"{e.tol:6.0e} {e.atol:6.0e} {'-':>9}  NO   {e.mismatch}")
                continue
            ratio = e.max_abs_err / e.bound if e.bound > 0 else (0.0 if e.max_abs_err == 0 else float("inf"))
            extra = "  ".join(x for x in ((f"leaf {e.leaf}" if e.leaf else ""), e.note) if x)
            lines.append(f"  {e.form:<{w}} {e.quantity:<{wq}} {e.max_abs_err:10.3e} {e.scale:10.3e} "
                         f"{e.tol:6.0e} {e.atol:6.0e} {ratio:9.2e}  {'yes' if e.ok else 'NO '}"
                         + (f"  {extra}" if extra else ""))
        return "\n".join(lines)

    def assert_ok(self):
        """Raise ``AssertionError`` listing every failing entry with its magnitudes."""
        bad = self.failures()
        if bad:
            head = (f"forms disagree with {self.baseline!r}: {len(bad)} of {len(self.entries)} "
                    f"checks fail\n")
            raise AssertionError(head + "\n".join("  - " + e.describe() for e in bad)
                                 + "\n\n" + str(self))


# ---------------------------------------------------------------------------------------
# comparison of two pytrees (the chex-style core)


class _Shape:
    """Readable leaf placeholder in mismatch messages: ``f64[2,3]``."""

    def __init__(self, leaf):
        leaf = np.asarray(leaf) if not hasattr(leaf, "shape") else leaf
        self.text = f"{jnp.dtype(leaf.dtype).name}[{','.join(map(str, leaf.shape))}]"

    def __repr__(self):
        return self.text


def _describe(tree) -> str:
    if tree is None:
        return "None"
    return repr(jax.tree_util.tree_map(_Shape, tree))


def _is_float(dt) -> bool:
    return jnp.issubdtype(dt, jnp.floating)


def _coarsest(dtypes) -> Optional[np.dtype]:
    """The floating dtype with the largest default tolerance (``None`` if there is none)."""
    fl = [jnp.dtype(d) for d in dtypes if _is_float(d)]
    if not fl:
        return None
    return max(fl, key=lambda d: DEFAULT_TOLERANCES.get(d, DEFAULT_TOLERANCES[_FALLBACK_DTYPE]))


def _tolerances(dtype, rtol, atol) -> Tuple[float, float]:
    d = jnp.dtype(dtype) if dtype is not None else jnp.dtype(jnp.float64)
    key = d if d in DEFAULT_TOLERANCES else _FALLBACK_DTYPE
    return (DEFAULT_TOLERANCES[key] if rtol is None else float(rtol),
            DEFAULT_ATOLS[key] if atol is None else float(atol))


def _compare(form: str, quantity: str, x, ref, *, rtol: Optional[float] = None,
             atol: Optional[float] = None, dtypes: Sequence = ()) -> Entry:
    """Compare pytree ``x`` with the baseline ``ref``: structure, shapes, then per-leaf
    ``max|x - ref| <= rtol * max|ref| + atol``. ``dtypes``: the inputs' dtypes (the
    tolerance is that of the coarsest of them and of each baseline leaf)."""
    ref_leaves = jax.tree_util.tree_leaves_with_path(ref)
    scale_all = max((float(np.max(np.abs(np.asarray(l, np.float64)))) if np.size(l) else 0.0
                     for _, l in ref_leaves), default=0.0)
    base_dt = _coarsest(list(dtypes) + [l.dtype for _, l in ref_leaves if hasattr(l, "dtype")])
    r0, a0 = _tolerances(base_dt, rtol, atol)
    try:
        chex.assert_trees_all_equal_structs(x, ref)
    except AssertionError:
        return Entry(form, quantity, float("inf"), scale_all, r0, a0,
                     mismatch=f"structure mismatch: got {_describe(x)}, baseline {_describe(ref)}")
    try:
        chex.assert_trees_all_equal_shapes(x, ref)
    except AssertionError:
        for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(x), ref_leaves):
            if np.shape(a) != np.shape(b):
                at = f" at leaf {jax.tree_util.keystr(path)}" if path else ""
                return Entry(form, quantity, float("inf"), scale_all, r0, a0, leaf=jax.tree_util.keystr(path),
                             mismatch=f"shape mismatch{at}: got {tuple(np.shape(a))}, "
                                      f"baseline {tuple(np.shape(b))}")
    worst, worst_ratio = None, -1.0
    multi = len(ref_leaves) > 1
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(x), ref_leaves):
        a64 = np.asarray(a, np.float64)
        b64 = np.asarray(b, np.float64)
        err = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        if a64.size and not np.all(np.isfinite(a64) == np.isfinite(b64)):
            err = float("inf")
        elif not np.isfinite(err):  # both non-finite in the same places: compare the rest
            fin = np.isfinite(b64)
            same = np.array_equal(a64[~fin], b64[~fin], equal_nan=True)
            err = float(np.max(np.abs(a64[fin] - b64[fin]), initial=0.0)) if same else float("inf")
        scale = float(np.max(np.abs(b64[np.isfinite(b64)]), initial=0.0)) if b64.size else 0.0
        r, at = _tolerances(_coarsest(list(dtypes) + [getattr(b, "dtype", np.float64)]), rtol, atol)
        bound = r * scale + at
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
        if ratio > worst_ratio or worst is None:
            worst_ratio = ratio
            worst = Entry(form, quantity, err, scale, r, at,
                          leaf=jax.tree_util.keystr(path) if multi else "")
    if worst is None:  # no leaves on either side (e.g. both states None)
        worst = Entry(form, quantity, 0.0, 0.0, r0, a0)
    return worst


def assert_trees_close(actual, expected, *, rtol: Optional[float] = None, atol: Optional[float] = None,
                       name: str = "value"):
    """Assert two pytrees agree: same structure and shapes, and for every leaf
    ``max|actual - expected| <= rtol * max|expected| + atol`` (defaults by dtype:
    :data:`DEFAULT_TOLERANCES`, :data:`DEFAULT_ATOLS`). The error names ``name``, the
    leaf, both shapes or both magnitudes."""
    e = _compare("actual", name, actual, expected, rtol=rtol, atol=atol)
    if not e.ok:
        raise AssertionError(e.describe())


# ---------------------------------------------------------------------------------------
# gradients: one generic scalar, the same for every form


def _weights(quantity: str, path, shape, dtype):
    """Fixed cotangent of one leaf, a function of its quantity, name and shape only."""
    h = zlib.crc32(f"{quantity}{jax.tree_util.keystr(path)}".encode())
    freq = 0.3 + (h % 997) / 997.0
    phase = 0.2 + ((h // 997) % 991) / 991.0 * 2.5  # never a multiple of π: no zero weight at 0
    n = math.prod(shape)
    return jnp.sin(jnp.arange(n, dtype=dtype) * freq + phase).reshape(shape)


def _scalar(tree, quantity: str):
    acc = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    total = jnp.zeros((), acc)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = jnp.asarray(leaf)
        if not _is_float(leaf.dtype):
            continue
        total = total + jnp.sum(leaf.astype(acc) * _weights(quantity, path, leaf.shape, acc))
    return total


def _split(out, outputs_only: bool):
    """(outputs, state) of a form's return value; a 2-tuple is ``(outputs, state)``."""
    if outputs_only:
        return out, None
    if isinstance(out, tuple) and len(out) == 2:
        return out
    return out, None


def _leaves(x):
    return [l for l in jax.tree_util.tree_leaves(x) if l is not None]


def _is_floating_tree(x) -> bool:
    """An input is differentiated when it is a pytree whose leaves are all floating arrays."""
    leaves = _leaves(x)
    return bool(leaves) and all(hasattr(l, "dtype") and _is_float(l.dtype) for l in leaves)


def check_equivalence(
    forms: Mapping[str, Callable],
    inputs: Mapping[str, jax.Array],
    *,
    baseline: Optional[str] = None,
    grad_wrt: Optional[Sequence[str]] = None,
    tol: Optional[float] = None,
    atol: Optional[float] = None,
    check_grads: bool = True,
    check_state: bool = True,
    outputs_only: Collection[str] = (),
    jit: bool = True,
) -> Report:
    """Compare every form in ``forms`` against ``baseline`` on ``inputs``.

    For each form and each quantity — outputs, final state, the gradient w.r.t. every
    differentiated input — the harness checks tree structure and shapes, then that every
    leaf satisfies ``max|x - ref| <= rtol * max|ref| + atol`` (see the module docstring).

    Args:
      forms: name → callable ``(**inputs) -> (outputs, state)`` (``state`` may be any
        pytree, or ``None``).
      inputs: keyword inputs shared by all forms (arrays or pytrees of arrays, e.g. a
        state NamedTuple); inputs whose leaves are all floating are differentiated.
      baseline: the form the others are compared with (default: the first).
      grad_wrt: names of inputs to differentiate (default: every floating input).
      tol: relative tolerance ``rtol``; default from :data:`DEFAULT_TOLERANCES` by dtype.
      atol: absolute floor; default from :data:`DEFAULT_ATOLS` by dtype.
      check_grads: also compare gradients.
      check_state: also compare the returned states (off: outputs only, everywhere).
      outputs_only: names of forms that return the outputs only (e.g. a rule's
        linear-attention reading): compared on outputs and on the gradients of the outputs'
        scalar (the baseline's gradients are taken of the same scalar for them).
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
    outputs_only = frozenset(outputs_only)
    unknown = sorted(outputs_only - set(names))
    if unknown:
        raise ValueError(f"outputs_only: got {unknown}, expected names among the forms {tuple(names)}")
    if baseline in outputs_only:
        raise ValueError(f"outputs_only: the baseline {baseline!r} must return (outputs, state)")
    float_names = [n for n, x in inputs.items() if _is_floating_tree(x)]
    grad_wrt = list(float_names if grad_wrt is None else grad_wrt)
    for n in grad_wrt:
        if n not in float_names:
            raise ValueError(f"grad_wrt: {n!r} is not a floating input; floating inputs are {tuple(float_names)}")
    dtypes = [l.dtype for n in float_names for l in _leaves(inputs[n])]
    if not dtypes:
        dtypes = [jnp.float64]
    cmp = functools.partial(_compare, rtol=tol, atol=atol, dtypes=dtypes)
    with_grads = bool(check_grads and grad_wrt)
    diff_in = {n: inputs[n] for n in grad_wrt}
    rest_in = {n: x for n, x in inputs.items() if n not in diff_in}

    def full_parts(name):
        """Which parts enter the form's gradient scalar: outputs and state, or outputs only."""
        return ("output",) if (name in outputs_only or not check_state) else ("output", "state")

    cache: Dict[Tuple[str, Tuple[Tuple[str, ...], ...]], tuple] = {}

    def evaluate(name, scalars=()):
        """(outputs, {parts: gradients}) of one form: one compile computes them all."""
        key = (name, tuple(scalars))
        if key in cache:
            return cache[key]
        fn, only = forms[name], name in outputs_only

        if not scalars:
            call = lambda rest: fn(**rest)  # noqa: E731
            res = (jax.jit(call) if jit else call)(dict(inputs)), {}
        else:
            def run(diff, rest):
                def f(d):
                    out = fn(**rest, **d)
                    o, s = _split(out, only)
                    return (_scalar(o, "output"), _scalar(s, "state")), out

                _, vjp, out = jax.vjp(f, diff, has_aux=True)
                one = jnp.ones((), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
                grads = {parts: vjp((one, one if "state" in parts else jnp.zeros_like(one)))[0]
                         for parts in scalars}
                return out, grads

            res = (jax.jit(run) if jit else run)(diff_in, rest_in)
        cache[key] = res
        return res

    if with_grads:
        need = tuple(dict.fromkeys(full_parts(n) for n in names if n != baseline)) or (full_parts(baseline),)
        ref_out, ref_grads = evaluate(baseline, need)
    else:
        ref_out, ref_grads = evaluate(baseline)
    ro, rs = _split(ref_out, False)
    entries = []
    for name in names:
        if name == baseline:
            continue
        only = name in outputs_only
        parts = full_parts(name)
        out, grads = evaluate(name, (parts,) if with_grads else ())
        o, s = _split(out, only)
        e_out = cmp(name, "output", o, ro)
        entries.append(e_out)
        state_bad = False
        if check_state and not only and (rs is not None or s is not None):
            e_state = cmp(name, "state", s, rs)
            entries.append(e_state)
            state_bad = e_state.mismatch is not None
        if not with_grads or e_out.mismatch is not None:
            continue  # outputs incomparable: their gradients are too (the mismatch is reported)
        note = ""
        if state_bad and "state" in parts:
            # the state's cotangent cannot match the baseline's: compare through the outputs
            parts, note = ("output",), "gradients of the outputs only (state mismatched)"
            _, grads = evaluate(name, (parts,))
            rg = ref_grads if parts in ref_grads else evaluate(baseline, (parts,))[1]
        else:
            rg = ref_grads
        for n in grad_wrt:
            e = cmp(name, f"grad[{n}]", grads[parts][n], rg[parts][n])
            e.note = note
            entries.append(e)
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


def rule_forms(rule) -> Dict[str, Callable]:
    """The forms of a rule that must agree, as positional callables ``(*inputs) -> result``.

    ``"recurrent"`` (the ``lax.scan`` form), ``"parallel[<impl>]"`` for every
    implementation of ``rule.parallel_impls()`` (a rule that has a parallel form without
    naming its implementations gives one ``"parallel"``), and ``"reduction"`` — the
    linear-attention reading's outputs, ``rule.reading(*inputs).outputs()`` — when
    ``rule.has_reading()``. See :mod:`tttla_jax.rules.base` for the protocol.
    """
    forms = {"recurrent": rule.recurrent}
    parallel = tuple(getattr(rule, "parallel_impls", lambda: ())())
    for impl in parallel:
        forms[f"parallel[{impl}]"] = functools.partial(rule.parallel, impl=impl)
    if not parallel and getattr(rule, "breaks_associativity", lambda: "")() is None:
        forms["parallel"] = rule.parallel
    if getattr(rule, "has_reading", lambda: False)():
        forms["reduction"] = lambda *a: rule.reading(*a).outputs()
    return forms


def _arg_names(fn, n: int) -> List[str]:
    """Names of the first ``n`` positional parameters of ``fn`` (``arg<i>`` where unknown),
    so a rule's gradients read ``grad[q]``, ``grad[lr]``, ``grad[initial_state]``."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    names += [f"arg{i}" for i in range(len(names), n)]
    return names if len(set(names)) == n else [f"arg{i}" for i in range(n)]


def check_rule(rule, args: Sequence, *, reduction: bool = True, **kwargs) -> Report:
    """Check a rule's forms against its ``lax.scan`` recurrence.

    Compares ``rule.recurrent(*args)`` with ``rule.parallel(*args, impl=i)`` for every ``i``
    in ``rule.parallel_impls()`` (outputs, final state, gradients w.r.t. every floating
    input) and, when ``rule.has_reading()``, with its linear-attention reading
    ``rule.reading(*args).outputs()`` (outputs and their gradients; form ``"reduction"``).
    This is the way to write an equivalence test for your own rule (a
    :class:`tttla_jax.rules.Rule` subclass)::

        def test_my_rule():
            rule = MyRule(chunk_size=4)
            args = my_inputs(rule, seed=0, dtype=jnp.float64)   # inputs of rule.recurrent
            tt.testing.check_rule(rule, args).assert_ok()       # float64: rtol 1e-10

    Args:
      rule: a rule (the protocol of :mod:`tttla_jax.rules.base`).
      args: the positional inputs of ``rule.recurrent`` (as produced by the registry's
        builders, :data:`tttla_jax.rules.REGISTRY`).
      reduction: also check the reading (when the rule has one).
      **kwargs: passed to :func:`check_equivalence` (``tol``, ``atol``, ``check_grads``, ``jit``, …).
    """
    names = _arg_names(rule.recurrent, len(args))
    inputs = dict(zip(names, args))

    def positional(fn):
        return lambda **kw: fn(*[kw[n] for n in names])

    forms = rule_forms(rule)
    if not reduction:
        forms.pop("reduction", None)
    if len(forms) == 1:
        return Report("recurrent", [])
    only = ("reduction",) if "reduction" in forms else ()
    return check_equivalence({n: positional(f) for n, f in forms.items()}, inputs,
                             outputs_only=only, **kwargs)
