"""Linear attention and DeltaNet as TTT rules (docs/linear_attention.md, docs/ttt_as_linear_attention.md), and the equivalence harness itself.

The rule's recurrent form is a token scan of inner gradient steps; it must equal the
float64 reference loops of docs/linear_attention.md (which are written as state updates, not gradients)
and the parallel forms — outputs, final state and gradients, at 1e-10 in float64.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.rules.linear import inner_grad, inner_loss


def inputs(seed, B=2, T=19, H=2, K=5, V=3, dtype=jnp.float64, loss="dot", gated=False, state=True):
    shapes = dict(q=(B, T, H, K), k=(B, T, H, K), v=(B, T, H, V))
    kinds = dict(k="unit")
    if loss == "mse":
        shapes["lr"] = (B, T, H)
        kinds["lr"] = "rate"
    if gated:
        shapes["log_decay"] = (B, T, H)
        kinds["log_decay"] = "logdecay"
    if state:
        shapes["initial_state"] = (B, H, K, V)
    return tt.testing.random_inputs(shapes, seed=seed, dtype=dtype, kinds=kinds)


def reference(rule):
    def fn(q, k, v, lr=None, log_decay=None, initial_state=None):
        if rule.loss == "dot":
            return tt.reference.linear_attention_loop(q, k, v, scale=rule.scale, log_decay=log_decay,
                                                      initial_state=initial_state)
        return tt.reference.delta_rule_loop(q, k, v, lr, log_decay=log_decay, scale=rule.scale,
                                            initial_state=initial_state)
    return fn


@pytest.mark.parametrize("loss", ["dot", "mse"])
@pytest.mark.parametrize("gated", [False, True])
def test_rule_recurrent_equals_reference_and_parallel(loss, gated):
    rule = tt.rules.LinearFastWeightRule(loss=loss, gated=gated, chunk_size=8)
    x = inputs(0, loss=loss, gated=gated)
    forms = {"recurrent": rule.recurrent, "reference": reference(rule), "parallel": rule.parallel}
    if loss == "dot":
        forms["associative"] = lambda **kw: rule.parallel(**kw, impl="associative")
    report = tt.testing.check_equivalence(forms, x, baseline="recurrent")
    report.assert_ok()
    assert report.max_error() < 1e-10
    assert len(report.entries) == (len(forms) - 1) * (2 + len(x))  # output, state, one grad per input


def test_rule_float32_tolerance():
    rule = tt.rules.DeltaRule(gated=True, chunk_size=16)
    x = inputs(1, T=50, K=16, V=16, dtype=jnp.float32, loss="mse", gated=True)
    report = tt.testing.check_equivalence({"recurrent": rule.recurrent, "parallel": rule.parallel}, x)
    report.assert_ok()  # documented float32 tolerance: 1e-4 relative


@pytest.mark.parametrize("loss", ["dot", "mse"])
def test_inner_grad_closed_form_matches_autodiff(loss):
    rng = np.random.default_rng(3)
    W = jnp.asarray(rng.normal(size=(4, 3)))
    k = jnp.asarray(rng.normal(size=4))
    v = jnp.asarray(rng.normal(size=3))
    np.testing.assert_allclose(inner_grad(W, k, v, loss), jax.grad(inner_loss)(W, k, v, loss), atol=1e-13)


def test_one_token_hand_check():
    # T=1, zero initial state: o = (scale q) kᵀ v (dot) and (scale q) kᵀ β v (mse, W=0)
    x = inputs(2, B=1, T=1, H=1, K=4, V=2, loss="mse", state=False)
    o, W = tt.rules.DeltaRule().recurrent(**x)
    q, k, v, lr = x["q"][0, 0, 0], x["k"][0, 0, 0], x["v"][0, 0, 0], x["lr"][0, 0, 0]
    np.testing.assert_allclose(o[0, 0, 0], (q @ k) / 2 * lr * v, atol=1e-14)
    np.testing.assert_allclose(W[0, 0], lr * jnp.outer(k, v), atol=1e-14)


def test_harness_detects_a_wrong_form():
    """The harness must fail when a form is wrong — in the outputs, or only in a gradient."""
    rule = tt.rules.LinearAttentionRule(chunk_size=4)
    x = inputs(4, loss="dot")

    def off_by_eps(**kw):
        o, S = rule.parallel(**kw)
        return o.at[0, 3, 1, 2].add(1e-7), S

    def wrong_grad_only(**kw):  # same values, wrong gradient w.r.t. v
        o, S = rule.parallel(**kw)
        v = kw["v"]
        zero_valued = (v - jax.lax.stop_gradient(v))[..., :1].sum()  # value 0, gradient 1 per entry
        return o + 1e-3 * zero_valued, S

    bad = tt.testing.check_equivalence({"recurrent": rule.recurrent, "bad": off_by_eps}, x)
    assert not bad.ok and [e.quantity for e in bad.failures()] == ["output"]
    with pytest.raises(AssertionError, match="forms disagree"):
        bad.assert_ok()
    bad_grad = tt.testing.check_equivalence({"recurrent": rule.recurrent, "bad": wrong_grad_only}, x)
    assert [e.quantity for e in bad_grad.failures()] == ["grad[v]"]


def test_bad_rule_inputs():
    x = inputs(5, loss="mse")
    with pytest.raises(ValueError, match=r"lr: expected shape \[B, T, H\] = \(2, 19, 2\), got \(2, 18, 2\)"):
        tt.rules.DeltaRule().recurrent(**{**x, "lr": x["lr"][:, :18]})
    with pytest.raises(ValueError, match="lr: the MSE"):
        tt.rules.DeltaRule().recurrent(**{k: v for k, v in x.items() if k != "lr"})
    with pytest.raises(ValueError, match="log_decay: gated=True needs"):
        tt.rules.DeltaRule(gated=True).recurrent(**x)
    with pytest.raises(ValueError, match="loss: got 'l1'"):
        tt.rules.LinearFastWeightRule(loss="l1")
    with pytest.raises(ValueError, match="chunk_size: expected a positive int, got 0"):
        tt.rules.LinearAttentionRule(chunk_size=0)
    assert tt.rules.DeltaRule().breaks_associativity() is None


def test_numpy_and_jax_scalars_and_traced_scale():
    """``chunk_size`` / ``scale`` accept NumPy and JAX scalars (stored as Python values, so
    the rule still compares equal and hashes), and a scale traced under ``jit`` works."""
    rule = tt.rules.LinearAttentionRule(chunk_size=np.int64(4), scale=jnp.float32(0.5))
    assert rule == tt.rules.LinearAttentionRule(chunk_size=4, scale=0.5) and hash(rule)
    assert type(rule.chunk_size) is int and type(rule.scale) is float
    x = inputs(6, T=9, loss="dot")
    o_ref, _ = rule.recurrent(**x)

    @jax.jit
    def f(scale, x):
        r = tt.rules.LinearAttentionRule(chunk_size=4, scale=scale)
        return r.parallel(**x)[0], r.recurrent(**x)[0], tt.linear_attention(**r.linear_attention_inputs(**x))[0]

    for o in f(jnp.float64(0.5), x):
        chex.assert_trees_all_close(o, o_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        tt.rules.LinearAttentionRule(chunk_size=True)


def test_protocol_impls_and_linear_attention_inputs():
    """Dot loss: ``impls`` chunked > associative > recurrent, and the rule *is* linear
    attention (its kwargs reproduce it); MSE loss: no associative form, with the reason."""
    dot, mse = tt.rules.LinearAttentionRule(gated=True, chunk_size=4), tt.rules.DeltaRule(chunk_size=4)
    assert dot.impls == ("chunked", "associative", "recurrent")
    assert dot.parallel_impls() == ("chunked", "associative") and mse.parallel_impls() == ("chunked",)
    assert dot.resolve_impl() == "chunked" and dot.linear_attention_reason() is None
    assert "delta rule" in mse.linear_attention_reason()
    x = inputs(7, T=9, gated=True)
    o, S = tt.linear_attention(**dot.linear_attention_inputs(**x), impl="recurrent")
    chex.assert_trees_all_close((o, S), dot.recurrent(**x), rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(dot(**x, impl="associative"), dot(**x, impl="recurrent"), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="associative.*delta rule's transition"):
        mse.parallel(**inputs(8, loss="mse"), impl="associative")
    with pytest.raises(ValueError, match="linear_attention_inputs: .*MSE loss"):
        mse.linear_attention_inputs(**inputs(8, loss="mse"))
