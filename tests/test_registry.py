"""One registry of every rule and preset drives the equivalence checks:
recurrent == every parallel implementation (where the rule has one) == reading (every rule
has a linear-attention reading), outputs, final state and gradients w.r.t. every input,
float64 at 1e-10.

Everything here follows from the rule protocol (:mod:`tttla_jax.rules.base`):
``rule.parallel_impls()``, ``rule.has_reading()`` / ``rule.reading(*inputs)``. Adding a rule
to ``tt.rules.REGISTRY`` adds it here. A new rule must come with a reading
(``has_reading()`` True) — or be listed in ``NO_READING`` with the reason ``tt.reduce``
gives, which the test checks — so no registry entry can pass with an empty reading check.
"""
import jax.numpy as jnp
import pytest

import tttla_jax as tt
from tttla_jax.impl import IMPLS
from tttla_jax.reduce import reduce
from tttla_jax.rules.base import SEQUENTIAL_IMPLS

NAMES = sorted(tt.rules.REGISTRY)


def _dedup_params():
    """Registry entries whose rule equals an earlier entry's (e.g. ``lact`` == ``ladder_v0``,
    the same frozen config under two names) are checked in the slow suite only: the default
    suite checks each distinct configuration once."""
    seen, params = {}, []
    for name in sorted(NAMES, key=lambda n: (n.startswith("lact"), n)):  # presets first
        rule = tt.rules.REGISTRY[name]()[0]
        twin = next((other for other, r in seen.items() if r == rule), None)
        seen[name] = rule
        marks = [pytest.mark.slow] if twin else []
        params.append(pytest.param(name, marks=marks, id=name))
    return sorted(params, key=lambda p: p.id)

# name -> regex the rule's "no reading" error must match (none today: every registered
# rule, the whole LaCT ladder with Muon included, has an exact reading)
NO_READING = {}


def test_registry_has_every_family():
    for name in ("linear_attention", "delta_net", "titans_linear", "ttt_linear", "ttt_mlp", "lact",
                 "vit3_glu", "vit3_conv"):
        assert name in NAMES, f"{name} missing from the registry: {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_registered_rule_has_a_reading(name):
    rule, build = tt.rules.REGISTRY[name]()
    if name in NO_READING:
        assert not rule.has_reading()
        with pytest.raises(NotImplementedError, match=NO_READING[name]):
            reduce(rule, *build(rule, seed=0, dtype=jnp.float64))
    else:
        assert rule.has_reading(), f"{name}: no linear-attention reading for {rule}"


@pytest.mark.parametrize("name", NAMES)
def test_registered_rule_implements_the_protocol(name):
    """``impls`` are vocabulary names, ``auto`` resolves to one of them, every parallel impl
    can run, and a rule that *is* plain linear attention says so consistently."""
    rule, _ = tt.rules.REGISTRY[name]()
    assert rule.impls and set(rule.impls) <= set(IMPLS) - {"auto"}, rule.impls
    reasons = rule.impl_reasons()
    assert tuple(reasons) == tuple(rule.impls)
    assert rule.resolve_impl("auto") in rule.impls
    par = rule.parallel_impls()
    assert set(par) <= set(rule.impls) - set(SEQUENTIAL_IMPLS)
    assert (rule.breaks_associativity() is None) == bool(par)
    for impl, why in reasons.items():
        assert why is None or (isinstance(why, str) and why), (impl, why)
    why_not_la = rule.linear_attention_reason()
    assert why_not_la is None or (isinstance(why_not_la, str) and why_not_la)


@pytest.mark.parametrize("name", _dedup_params())
def test_registered_rule_forms_agree_float64(name):
    rule, build = tt.rules.REGISTRY[name]()
    args = build(rule, seed=0, dtype=jnp.float64)
    report = tt.testing.check_rule(rule, args)
    print(name, report)
    report.assert_ok()
    if name not in NO_READING:
        quantities = {e.quantity for e in report.entries if e.form == "reduction"}
        assert "output" in quantities and any(q.startswith("grad[") for q in quantities), \
            f"{name}: the reading was not checked (outputs and gradients): {sorted(quantities)}"
    if rule.breaks_associativity() is None:
        assert rule.parallel_impls(), f"{name}: an associative rule lists its parallel impls"
        assert any(e.form.startswith("parallel") for e in report.entries), \
            "an associative rule must be checked in parallel"
    else:
        assert rule.parallel_impls() == ()
        with pytest.raises(tt.rules.NotAssociativeError):
            rule.parallel(*args)
