"""One registry of every rule and preset drives the equivalence checks:
recurrent == parallel (where the rule has one) == reduction (every rule has a
linear-attention reading), outputs, final state and gradients w.r.t. every input,
float64 at 1e-10.

Adding a rule to ``tt.rules.REGISTRY`` adds it here. A new rule must come with a reader
(``tttla_jax.reduce.register_reducer``) — or be listed in ``NO_READING`` with the reason
its ``NoReadingError`` gives, which the test checks — so no registry entry can pass with
an empty reduction check.
"""
import jax.numpy as jnp
import pytest

import tttla_jax as tt
from tttla_jax.reduce import NoReadingError, has_reducer, reduce

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

# name -> regex the rule's NoReadingError message must match (none today: every registered
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
        assert not has_reducer(rule)
        with pytest.raises(NoReadingError, match=NO_READING[name]):
            reduce(rule, *build(rule, seed=0, dtype=jnp.float64))
    else:
        assert has_reducer(rule), f"{name}: no linear-attention reading registered for {rule}"


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
            f"{name}: the reduction was not checked (outputs and gradients): {sorted(quantities)}"
    if rule.breaks_associativity() is None:
        assert any(e.form == "parallel" for e in report.entries), "an associative rule must be checked in parallel"
    else:
        with pytest.raises(tt.rules.NotAssociativeError):
            rule.parallel(*args)
