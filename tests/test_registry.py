"""One registry of every rule and preset drives the equivalence checks (issue 4):
recurrent == parallel (where the rule has one) == reduction (where a reducer exists),
outputs, final state and gradients w.r.t. every input, float64 at 1e-10.

Adding a rule to ``tt.rules.REGISTRY`` adds it here.
"""
import jax.numpy as jnp
import pytest

import tttla_jax as tt

NAMES = sorted(tt.rules.REGISTRY)


def test_registry_has_every_family():
    for name in ("linear_attention", "delta_net", "titans_linear", "ttt_linear", "lact"):
        assert name in NAMES, f"{name} missing from the registry: {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_registered_rule_forms_agree_float64(name):
    rule, build = tt.rules.REGISTRY[name]()
    args = build(rule, seed=0, dtype=jnp.float64)
    report = tt.testing.check_rule(rule, args)
    print(name, report)
    report.assert_ok()
    if rule.breaks_associativity() is None:
        assert any(e.form == "parallel" for e in report.entries), "an associative rule must be checked in parallel"
    else:
        with pytest.raises(tt.rules.NotAssociativeError):
            rule.parallel(*args)
