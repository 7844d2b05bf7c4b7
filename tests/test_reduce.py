"""The reduction (docs/ttt_as_linear_attention.md): readings equal the rules; Theorems 5.1 and 5.3 as tests.

The rule-vs-reading comparisons run the rule's ``lax.scan`` form and the reading's attention
form in one jitted function compiled with XLA's cheap CPU pipeline (op-by-op eager dispatch
of the readings was most of this file's time; the numerics checked do not depend on
backend optimisation). The reading's static fields (``associative``, ``breaks``, array
ranks and shapes) are recorded while tracing.
"""
import ast
import dataclasses
import importlib
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.reduce import Reading, momentum_coefficients, reduce


FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_fast(fn):
    return jax.jit(fn, compiler_options=FAST)


def reduction_form(rule):
    return lambda **kw: (reduce(rule, **kw).outputs(), None)


def rule_and_reading(rule, args):
    """``(recurrent outputs, reading outputs, reading metadata)`` from one compiled call.

    The metadata namespace has the reading's ``associative`` and ``breaks`` and the shapes of
    ``q``, ``k``, ``v`` and ``mask`` (static values recorded at trace time) and the mask's
    minimum (NaN for an empty mask)."""
    meta = {}

    def f(*a):
        r = reduce(rule, *a)
        meta.update(associative=r.associative, breaks=r.breaks,
                    **{f"{n}_shape": tuple(getattr(r, n).shape) for n in ("q", "k", "v", "mask")})
        mask_min = jnp.min(r.mask) if r.mask.size else jnp.nan  # no key positions: no writes
        return rule.recurrent(*a)[0], r.outputs(), mask_min

    o_rec, o_red, mask_min = jit_fast(f)(*args)
    return o_rec, o_red, types.SimpleNamespace(mask_min=float(mask_min), **meta)


@pytest.mark.parametrize("loss", ["dot", "mse"])
@pytest.mark.parametrize("gated", [False, True])
def test_linear_rule_reading_equals_recurrence(loss, gated):
    rule = tt.rules.LinearFastWeightRule(loss=loss, gated=gated)
    shapes = dict(q=(2, 13, 2, 4), k=(2, 13, 2, 4), v=(2, 13, 2, 3), initial_state=(2, 2, 4, 3))
    kinds = dict(k="unit")
    if loss == "mse":
        shapes["lr"], kinds["lr"] = (2, 13, 2), "rate"
    if gated:
        shapes["log_decay"], kinds["log_decay"] = (2, 13, 2), "logdecay"
    x = tt.testing.random_inputs(shapes, seed=7, dtype=jnp.float64, kinds=kinds)
    report = tt.testing.check_equivalence(
        {"recurrent": rule.recurrent, "reduction": reduction_form(rule)}, x, check_state=False)
    report.assert_ok()
    assert report.max_error() < 1e-10
    assert reduce(rule, **x).associative


def test_momentum_coefficients_by_definition():
    rng = np.random.default_rng(0)
    al = rng.uniform(size=6)
    c = np.asarray(momentum_coefficients(jnp.asarray(al)))
    for t in range(6):
        for i in range(6):
            want = sum(np.prod(al[i + 1:j + 1]) for j in range(i, t + 1)) if i <= t else 0.0
            assert abs(c[t, i] - want) < 1e-14, (t, i)


def _mlp_features(x, theta):
    return jnp.tanh(x @ theta)


@pytest.mark.parametrize("loss", ["mse", "dot"])
def test_theorem_5_1_mlp_all_layers_updated(loss):
    """One inner step on f(x) = tanh(x Θ) W, updating Θ *and* W:
    f_{t+1}(q) = φ_{t+1}(q) (W_t + φ_t(k)ᵀ g_t(k)),  g = −η ∂L/∂f(k)."""
    rng = np.random.default_rng(1)
    Kd, F, V, eta = 5, 7, 3, 0.3
    theta = jnp.asarray(rng.normal(size=(Kd, F)) / np.sqrt(Kd))
    W = jnp.asarray(rng.normal(size=(F, V)) / np.sqrt(F))
    q, k = (jnp.asarray(rng.normal(size=Kd)) for _ in range(2))
    v = jnp.asarray(rng.normal(size=V))

    def L_of_f(f):
        return 0.5 * jnp.sum((f - v) ** 2) if loss == "mse" else -jnp.vdot(f, v)

    def L(params):
        th, w = params
        return L_of_f(_mlp_features(k, th) @ w)

    g_th, g_w = jax.grad(L)((theta, W))
    theta1, W1 = theta - eta * g_th, W - eta * g_w
    o_ttt = _mlp_features(q, theta1) @ W1

    f_k = _mlp_features(k, theta) @ W
    v_hat = -eta * jax.grad(L_of_f)(f_k)  # effective value g_t(k)
    q_hat = _mlp_features(q, theta1)  # post-update features
    k_hat = _mlp_features(k, theta)  # pre-update features
    o_la = q_hat @ (W + jnp.outer(k_hat, v_hat))
    chex.assert_trees_all_close(o_la, o_ttt, atol=1e-13, rtol=0.0)
    # and the pre-update query features would be wrong: Θ changed, so the reading is
    # history-dependent (no associative scan).
    assert float(jnp.abs(_mlp_features(q, theta) @ (W + jnp.outer(k_hat, v_hat)) - o_ttt).max()) > 1e-4


def test_theorem_5_3_per_token_momentum():
    """ΔW_t = ∇L_t + α_t ΔW_{t−1}, W_{t+1} = W_t − η ΔW_t with static φ and MSE loss:
    o_t = φ(q_t)(W_0 + Σ_{i≤t} φ(k_i)ᵀ m_i),  m_i = g_i(k_i) · c[t, i]."""
    rng = np.random.default_rng(2)
    T, Kd, F, V, eta = 9, 4, 6, 3, 0.2
    theta = jnp.asarray(rng.normal(size=(Kd, F)) / 2)
    W0 = jnp.asarray(rng.normal(size=(F, V)) / 3)
    q, k = (jnp.asarray(rng.normal(size=(T, Kd))) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(T, V)))
    alpha = jnp.asarray(rng.uniform(0.2, 0.9, size=T))
    phi = lambda x: _mlp_features(x, theta)

    W, dW, outs, gs = W0, jnp.zeros_like(W0), [], []
    for t in range(T):
        f_k = phi(k[t]) @ W
        gs.append(-eta * (f_k - v[t]))  # −η ∂L/∂f for L = ½‖f − v‖²
        grad_W = jnp.outer(phi(k[t]), f_k - v[t])
        dW = grad_W + alpha[t] * dW
        W = W - eta * dW
        outs.append(phi(q[t]) @ W)
    o_ttt = jnp.stack(outs)

    c = momentum_coefficients(alpha)  # [T, T]
    reading = Reading(q=phi(q)[None, :, None], k=phi(k)[None, :, None], v=jnp.stack(gs)[None, :, None],
                      mask=c[None, None], state_coef=jnp.ones((1, 1, T)), initial_state=W0[None, None])
    chex.assert_trees_all_close(reading.outputs()[0, :, 0], o_ttt, atol=1e-12, rtol=0.0)
    # a single product (instead of the cumulative coefficient) is wrong — the warning in docs/ttt_as_linear_attention.md
    prod_only = jnp.tril(jnp.exp(jnp.cumsum(jnp.log(alpha))[:, None] - jnp.cumsum(jnp.log(alpha))[None, :]))
    wrong = Reading(reading.q, reading.k, reading.v, prod_only[None, None], reading.state_coef, reading.initial_state)
    assert float(jnp.abs(wrong.outputs()[0, :, 0] - o_ttt).max()) > 1e-3


def test_reduce_unknown_rule():
    with pytest.raises(NotImplementedError, match=r"rule: Rule has no linear-attention reading .*has_reading\(\) is False"):
        reduce(tt.rules.Rule())
    with pytest.raises(TypeError, match="rule: expected a rule"):
        reduce(object())


def test_reduce_dispatches_to_the_rule():
    """``tt.reduce(rule, *inputs)`` is ``rule.reading(*inputs)``; reduce.py imports no rule."""
    red = importlib.import_module("tttla_jax.reduce")  # the module (tt.reduce is the function)

    rule, build = tt.rules.REGISTRY["titans_linear"]()
    args = build(rule, seed=0, dtype=jnp.float64)
    a, b = reduce(rule, *args), rule.reading(*args)
    np.testing.assert_array_equal(a.outputs(), b.outputs())
    imported = [n.module if isinstance(n, ast.ImportFrom) else alias.name
                 for n in ast.walk(ast.parse(open(red.__file__).read()))
                 if isinstance(n, (ast.Import, ast.ImportFrom)) for alias in n.names]
    assert not [m for m in imported if m.startswith("tttla_jax")], imported  # layering: rules -> reduce


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("batch_size", [None, 4, 8])
@pytest.mark.parametrize("T", [11, 12, 1])
def test_titans_reading_equals_recurrence(memory, batch_size, T):
    from tttla_jax.rules.titans import TitansRule, _example_inputs

    rule = TitansRule(chunk_size=4, batch_size=batch_size, memory=memory)
    q, k, v, theta, eta, alpha, state = _example_inputs(rule, seed=3, T=T)
    # a non-zero initial momentum buffer exercises the second initial-state term
    state = state._replace(momentum=jax.tree_util.tree_map(lambda m: m + 0.1, state.momentum))
    o_rec, o_red, reading = rule_and_reading(rule, (q, k, v, theta, eta, alpha, state))
    chex.assert_trees_all_close(o_red, o_rec, atol=1e-10, rtol=0.0)
    assert reading.associative == (batch_size is None and memory == "linear")
    if batch_size is not None:
        assert "W_ref" in reading.breaks
    if memory == "mlp":
        assert "first memory layer W1 is updated" in reading.breaks


def test_titans_reading_gradients_match():
    from tttla_jax.rules.titans import TitansRule, _example_inputs

    rule = TitansRule(chunk_size=4)
    args = _example_inputs(rule, seed=4, T=10)
    w = jnp.sin(jnp.arange(10 * 2 * 4)).reshape(1, 10, 2, 4)

    def loss_rec(*a):
        return jnp.sum(rule.recurrent(*a)[0] * w)

    def loss_red(*a):
        return jnp.sum(reduce(rule, *a).outputs() * w)

    g1, g2 = jit_fast(lambda *a: (jax.grad(loss_rec, argnums=tuple(range(7)))(*a),
                                  jax.grad(loss_red, argnums=tuple(range(7)))(*a)))(*args)
    chex.assert_trees_all_close(g1, g2, atol=1e-10, rtol=0.0)


@pytest.mark.parametrize("flags", [dict(), dict(layer_norm=False, bias=False, residual=False),
                                   dict(bias=False), dict(residual=False)])
@pytest.mark.parametrize("T", [11, 12, 1])
def test_ttt_linear_reading_equals_recurrence(flags, T):
    from tttla_jax.rules.ttt import TTTLinearRule, _example_inputs

    rule = TTTLinearRule(mini_batch_size=4, **flags)
    args = _example_inputs(rule, seed=5, T=T)
    o_rec, o_red, reading = rule_and_reading(rule, args)
    chex.assert_trees_all_close(o_red, o_rec, atol=1e-10, rtol=0.0)
    assert not reading.associative
    assert reading.breaks == rule.breaks_associativity()


LACT_CASES = [
    dict(weight_norm="post", update="all", use_momentum=True),  # V0 without Muon
    dict(weight_norm="pre", update="all"),
    dict(weight_norm="post", update="w1", use_momentum=True, order="update_then_query"),
    dict(weight_norm=None, update="w1", use_momentum=True),  # V2 without Muon
    dict(weight_norm=None, fast_net="linear", use_momentum=True, ascent=False),
    # with Muon: virtual tokens (one-hot keys, values = rows of NS5(M)ᵀ); the registry's
    # LaCT presets (V0–V6, lact, lact_v2, anomalies) check Muon readings with gradients too
    dict(weight_norm="pre", update="all", use_momentum=True, muon=True, q_is_k=True),
    pytest.param(dict(weight_norm=None, update="w1", use_momentum=True, muon=True, order="update_then_query"),
                 marks=pytest.mark.slow),
    pytest.param(dict(weight_norm=None, fast_net="linear", muon=True, constant_lr=0.05), marks=pytest.mark.slow),
    # more inner steps: one more write event per step
    pytest.param(dict(weight_norm="post", update="all", use_momentum=True, muon=True, inner_steps=2),
                 marks=pytest.mark.slow),
    dict(weight_norm=None, update="w1", use_momentum=True, inner_steps=3),
]


def _ids(c):
    return ",".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("cfg", LACT_CASES, ids=_ids)
@pytest.mark.parametrize("T", [11, 3])
def test_lact_reading_equals_recurrence(cfg, T):
    from tttla_jax.rules.lact import LaCTRule
    from tttla_jax.rules.lact.fixtures import example_inputs as _example_inputs

    rule = LaCTRule(chunk_size=4, **cfg)
    args = _example_inputs(rule, seed=6, T=T)
    o_rec, o_red, reading = rule_and_reading(rule, args)
    chex.assert_trees_all_close(o_red, o_rec, atol=1e-10, rtol=0.0)
    assert reading.associative == (rule.breaks_associativity() is None)
    if cfg.get("weight_norm"):
        assert len(reading.mask_shape) == 5  # weight norm = per-value-channel, data-dependent decay


@pytest.mark.slow  # the registry test checks every LaCT preset's reading gradients by default
def test_lact_reading_gradients_match():
    from tttla_jax.rules.lact import LaCTRule
    from tttla_jax.rules.lact.fixtures import example_inputs as _example_inputs

    rule = LaCTRule(chunk_size=4, weight_norm="post", update="all", use_momentum=True)
    q, k, v, lr, st, m = _example_inputs(rule, seed=8, T=10)
    w = jnp.sin(jnp.arange(v.size)).reshape(v.shape)

    def run(fn):
        return lambda q, k, v, lr, st, m: jnp.sum(fn(q, k, v, lr, st, m) * w)

    g_rec = jax.grad(run(lambda *a: rule.recurrent(*a)[0]), argnums=(0, 1, 2, 3, 4, 5))(q, k, v, lr, st, m)
    g_red = jax.grad(run(lambda *a: reduce(rule, *a).outputs()), argnums=(0, 1, 2, 3, 4, 5))(q, k, v, lr, st, m)
    chex.assert_trees_all_close(g_rec, g_red, atol=1e-10, rtol=0.0)


def test_lact_muon_reading_is_virtual_tokens():
    """docs/ladder.md with Muon: ``S_c = W1_0 + Σ_{i<c} NS5(M_i)``. The reading writes each chunk's
    ``NS5(M_i)ᵀ`` as ``dh`` virtual tokens with one-hot keys, read by later chunks only."""
    from tttla_jax.rules.lact import LaCTRule, newton_schulz5
    from tttla_jax.rules.lact.fixtures import example_inputs as _example_inputs

    rule = LaCTRule(chunk_size=4, update="w1", weight_norm=None, use_momentum=True, muon=True)  # V2
    q, k, v, lr, st, m = _example_inputs(rule, seed=9, T=11)
    meta = {}

    def f(*a):
        r = reduce(rule, *a)
        meta.update(associative=r.associative, breaks=r.breaks)
        return r.k, r.v, r.mask, r.outputs(), rule.recurrent(*a)[0]

    reading_k, reading_v, reading_mask, o_red, o_rec = jit_fast(f)(q, k, v, lr, st, m)
    reading = types.SimpleNamespace(k=reading_k, v=reading_v, mask=reading_mask, **meta)
    Dh = st.w[1].shape[-1]
    n_upd = 2  # chunks 0, 1 update; chunk 2 (3 tokens) is apply-only
    assert reading.k.shape == (1, n_upd * Dh, 2, Dh)
    np.testing.assert_array_equal(reading.k[0, :Dh, 0], np.eye(Dh))
    assert reading.associative and reading.breaks is None
    # the values are the rows of NS5(M_i)ᵀ, M_i the momentum scan of the chunk writes
    phi = lambda x: jax.nn.silu(jnp.einsum("bthk,bhdk->bthd", x, st.w[0])) * jnp.einsum("bthk,bhdk->bthd", x, st.w[2])
    M = jnp.zeros_like(st.w[1])
    for i in range(n_upd):
        sl = slice(4 * i, 4 * i + 4)
        G = jnp.einsum("bthv,bthd->bhvd", v[:, sl], lr[:, sl, :, 1:2] * phi(k[:, sl]))
        M = G + jnp.mean(m[:, sl], axis=1)[..., None, None] * M
        np.testing.assert_allclose(jnp.moveaxis(reading.v[:, Dh * i:Dh * (i + 1)], 1, 2),
                                   jnp.swapaxes(newton_schulz5(M), -1, -2), atol=1e-12)
    # block-causal: chunk c's queries see the virtual tokens of chunks < c
    mask = np.broadcast_to(reading.mask, (1, 2, 11, n_upd * Dh))[0, 0]
    want = (np.arange(11)[:, None] // 4) > (np.arange(n_upd * Dh)[None, :] // Dh)
    np.testing.assert_array_equal(mask, want.astype(float))
    chex.assert_trees_all_close(o_red, o_rec, atol=1e-10, rtol=0.0)


@pytest.mark.slow
def test_lact_muon_bfloat16_ns_reading_is_close():
    """``muon_dtype="bfloat16"`` rounds inside NS5, a discontinuous map: the reading is exact
    in real arithmetic but the last-bit differences of a different evaluation order can flip
    a bfloat16 rounding, so it matches the rule only to bfloat16 precision."""
    from tttla_jax.rules.lact import LaCTRule
    from tttla_jax.rules.lact.fixtures import example_inputs as _example_inputs

    rule = LaCTRule(chunk_size=4, use_momentum=True, muon=True, muon_dtype="bfloat16")
    args = _example_inputs(rule, seed=6, T=11)
    o = rule.recurrent(*args)[0]
    err = float(jnp.abs(reduce(rule, *args).outputs() - o).max())
    # docs/rules/lact.md: bfloat16 NS moves outputs by ~10 % relative; the reading is within that
    bf16_effect = float(jnp.abs(dataclasses.replace(rule, muon_dtype=None).recurrent(*args)[0] - o).max())
    assert 0 < bf16_effect < 0.1 * float(jnp.abs(o).max())
    assert err < 0.1 * float(jnp.abs(o).max()), (err, bf16_effect)


# the reference configuration at T = 11 (with gradients) is the registry's "ttt_mlp" entry
TTT_MLP_CASES = [(dict(), 1), (dict(layer_norm=False, bias=False, residual=False), 11),
                 pytest.param(dict(bias=False), 11, marks=pytest.mark.slow),
                 pytest.param(dict(residual=False, impl="primal"), 11, marks=pytest.mark.slow),
                 pytest.param(dict(), 6, marks=pytest.mark.slow)]


@pytest.mark.parametrize("flags,T", TTT_MLP_CASES, ids=lambda c: (_ids(c) or "reference") if isinstance(c, dict) else f"T={c}")
def test_ttt_mlp_reading_equals_recurrence(flags, T):
    """Theorem 5.1/5.2 for an MLP fast weight with all layers updated (TTT-MLP, docs/rules/ttt.md)."""
    from tttla_jax.rules.ttt import TTTMLPRule, _example_inputs

    rule = TTTMLPRule(mini_batch_size=4, **flags)
    args = _example_inputs(rule, seed=5, T=T)
    o_rec, o_red, reading = rule_and_reading(rule, args)
    chex.assert_trees_all_close(o_red, o_rec, atol=1e-10, rtol=0.0)
    assert not reading.associative
    assert "time-varying feature map" in reading.breaks
    F = args[-1].W1.shape[-1]
    assert reading.q_shape[-1] == F + (1 if rule.bias else 0)  # hidden features (+ the bias)


def test_ttt_mlp_query_features_depend_on_history():
    """The reading's query features are the post-update hidden activations: replacing them
    by features from the initial W1 (a static φ) is wrong once a mini-batch has updated."""
    from tttla_jax.rules.ttt import TTTMLPRule, _example_inputs, gelu_tanh

    rule = TTTMLPRule(mini_batch_size=4, layer_norm=False, bias=False, residual=False)
    args = _example_inputs(rule, seed=2, T=9)

    def static_phi_error(*a):
        q, W1 = a[0], a[-1].W1
        static = dataclasses.replace(reduce(rule, *a), q=gelu_tanh(jnp.einsum("bthd,bhdf->bthf", q, W1)))
        return jnp.abs(static.outputs() - rule.recurrent(*a)[0]).max()

    assert float(jit_fast(static_phi_error)(*args)) > 1e-3


# the defaults (with gradients) are the registry's "vit3_glu" / "vit3_conv" entries
VIT3_GLU = [dict(update_W2=False), dict(normalize=False, lr=0.5)]
VIT3_CONV = [dict(grid=(1, 1)), dict(grid=(2, 5), normalize=False, lr=0.3)]


@pytest.mark.parametrize("cfg", VIT3_GLU + VIT3_CONV, ids=str)
def test_vit3_reading_equals_rule(cfg):
    """ViT³ (docs/rules/vit3.md): non-causal linear attention with a mask of ones, S_0 = the fast weight."""
    name = "vit3_conv" if "grid" in cfg else "vit3_glu"
    base, build = tt.rules.REGISTRY[name]()
    rule = dataclasses.replace(base, **cfg)
    args = build(rule, seed=3, dtype=jnp.float64)
    o, o_red, reading = rule_and_reading(rule, args)
    chex.assert_trees_all_close(o_red, o, atol=1e-10, rtol=0.0)
    assert reading.associative and reading.breaks is None
    assert reading.mask_min == 1.0  # non-causal: every query reads every key
    if name == "vit3_conv":
        assert reading.q_shape[-1] == 9 and reading.v_shape[-1] == 1  # 3×3 window features, K = 9, V = 1


@pytest.mark.slow
def test_reading_gradients_match_ttt_mlp_and_lact_muon_pre_norm():
    """Gradients w.r.t. every input through readings the registry presets do not cover."""
    from tttla_jax.rules import lact, ttt

    cases = [(ttt.TTTMLPRule(mini_batch_size=4, bias=False), ttt._example_inputs, 7),
             (lact.LaCTRule(chunk_size=4, weight_norm="pre", use_momentum=True, muon=True, inner_steps=2),
              lact.fixtures.example_inputs, 9)]
    for rule, build, T in cases:
        args = build(rule, seed=4, T=T)
        report = tt.testing.check_rule(rule, args)
        assert any(e.form == "reduction" and e.quantity.startswith("grad[") for e in report.entries)
        report.assert_ok()
