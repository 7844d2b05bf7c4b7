"""Every registered rule's forms agree under ``chex.variants`` — with and without ``jit``,
and under ``vmap`` over an extra leading batch axis — so "jit and vmap everything" is
tested, not claimed.

For each distinct configuration in ``tt.rules.REGISTRY`` (a registry entry equal to an
earlier one, e.g. ``lact`` == ``ladder_v0``, is the same frozen config and is not repeated),
the forms are those of :func:`tttla_jax.testing.rule_forms`: the ``lax.scan`` recurrence,
``parallel[<impl>]`` for every ``rule.parallel_impls()``, the linear-attention reading
(outputs only) — plus every other sequential implementation of ``rule.impls`` run through
``rule(*inputs, impl=...)`` (TTT's ``dual``/``primal``). Outputs and final states agree
with the recurrence at float64 1e-10 (rtol, :func:`tttla_jax.testing.assert_trees_close`).
Gradients are the registry test's job (tests/test_registry.py); here each variant is one
compile of all forms' forward passes, on the registry's small example inputs.

The vmap variant stacks two differently seeded input sets along a new leading axis (every
input, initial states included) and compares the forms under ``jax.vmap`` with the vmapped
recurrence (itself a pure ``lax.scan``, batched by JAX). The default suite runs it jitted
for two rules; every rule, with and without jit, is ``@pytest.mark.slow``. Likewise without
``jit`` (no vmap): three rules by default, every rule in the slow sweep. Measured on the
2 shared CPU cores of the development machine (load 3-5): this file's default set ~70 s wall
(~50 s of CPU, almost all compilation — one compile per rule and variant), the slow vmap
matrix ~2 min.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import pytest
from absl.testing import parameterized

import tttla_jax as tt
from tttla_jax.rules.base import SEQUENTIAL_IMPLS

F64 = jnp.float64


def _distinct_names():
    seen, names = [], []
    for name in sorted(tt.rules.REGISTRY, key=lambda n: (n.startswith("lact"), n)):  # presets first
        rule = tt.rules.REGISTRY[name]()[0]
        if any(rule == other for other in seen):
            continue
        seen.append(rule)
        names.append(name)
    return sorted(names)


NAMES = _distinct_names()
# the default suite's vmap variant: the two rules with the most hand-written batching-
# sensitive machinery (the ops' WY chunk step; LaCT's chunked and associative layouts)
VMAP_DEFAULT = [n for n in ("gated_delta_net", "ladder_v2") if n in NAMES]
# the default suite's eager (no jit) variant: one cheap rule per family of ops
EAGER_DEFAULT = [n for n in ("linear_attention", "delta_net", "ladder_v6") if n in NAMES]


def _forms(rule):
    """recurrent, parallel[<impl>] per parallel impl, and every other sequential impl (the
    one ``rule.recurrent`` itself runs — a TTT rule's configured ``impl`` — is not repeated)."""
    forms = {n: f for n, f in tt.testing.rule_forms(rule).items() if n != "reduction"}
    for impl in type(rule).impls:
        if impl in SEQUENTIAL_IMPLS and impl != "recurrent" and getattr(rule, "impl", None) != impl:
            forms[impl] = functools.partial(rule, impl=impl)
    return forms


def _all_forms(rule):
    forms = _forms(rule)
    return lambda *args: {name: f(*args) for name, f in forms.items()}


def _assert_forms_agree(name, results):
    ref_o, ref_s = results["recurrent"]
    assert len(results) > 1 or not tt.rules.REGISTRY[name]()[0].parallel_impls()
    for form, res in results.items():
        if form == "recurrent":
            continue
        o, s = res
        tt.testing.assert_trees_close(o, ref_o, name=f"{name} {form} output")
        tt.testing.assert_trees_close(s, ref_s, name=f"{name} {form} state")


def _inputs(name, seed):
    rule, build = tt.rules.REGISTRY[name]()
    return rule, build(rule, seed=seed, dtype=F64)


def _check_forms(self, name):
    rule, args = _inputs(name, seed=0)
    _assert_forms_agree(name, self.variant(_all_forms(rule))(*args))


class FormsAgreeTest(chex.TestCase):
    """Each rule: all its forms in one function, run under ``jax.jit``."""

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(*[(name, name) for name in NAMES])
    def test_forms_agree(self, name):
        _check_forms(self, name)


class FormsAgreeEagerTest(chex.TestCase):
    """Three rules (linear attention, the delta rule, LaCT) without ``jax.jit``: op by op,
    as in a notebook; every rule: the slow class below. (Eager runs dispatch every primitive
    on its own: this was two thirds of the file's time for all rules.)"""

    @chex.variants(without_jit=True)
    @parameterized.named_parameters(*[(name, name) for name in EAGER_DEFAULT])
    def test_forms_agree(self, name):
        _check_forms(self, name)


class FormsAgreeEagerSlowTest(chex.TestCase):
    """Every other rule without ``jax.jit`` (slow)."""

    pytestmark = pytest.mark.slow

    @chex.variants(without_jit=True)
    @parameterized.named_parameters(*[(name, name) for name in NAMES if name not in EAGER_DEFAULT])
    def test_forms_agree(self, name):
        _check_forms(self, name)


def _check_under_vmap(self, name):
    rule, a0 = _inputs(name, seed=0)
    _, a1 = _inputs(name, seed=1)
    stacked = jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), a0, a1)
    _assert_forms_agree(name, self.variant(jax.vmap(_all_forms(rule)))(*stacked))


class FormsAgreeUnderVmapTest(chex.TestCase):
    """Two rules: all their forms under ``jax.jit(jax.vmap(...))`` over a new leading axis
    of every input (the whole registry: the slow class below)."""

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(*[(name, name) for name in VMAP_DEFAULT])
    def test_forms_agree_under_vmap(self, name):
        _check_under_vmap(self, name)


class FormsAgreeUnderVmapSlowTest(chex.TestCase):
    """Every rule under ``vmap``, with and without ``jit`` (slow: ~2 min of compiles)."""

    pytestmark = pytest.mark.slow

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(name, name) for name in NAMES])
    def test_forms_agree_under_vmap(self, name):
        _check_under_vmap(self, name)
