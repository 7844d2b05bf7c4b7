"""TTT-Linear / TTT-MLP (docs/rules/ttt.md): scan rule (dual and primal) against the float64 loop.

Tolerances (documented): float64 1e-10 absolute (O(1)-scaled inputs, lr of the
reference's size ~1/D) for outputs, final fast weights and outer gradients w.r.t. every
input (q, k, v, lr, token_eta, LN scale/bias and the initial fast weights); float32
inputs 5e-6 relative to the float64 loop's max magnitude (measured ≤ 2.6e-7 at T = 7,
both families and forms; the margin covers error growth with T and the inner
LayerNorm's division by a per-token std).
"""
import functools
from dataclasses import replace as dataclasses_replace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttla_jax.reference.ttt import gelu, gelu_inner, ttt_linear_loop, ttt_mlp_loop
from tttla_jax.rules.base import REGISTRY, NotAssociativeError
from tttla_jax.rules.ttt import (TTTLinearRule, TTTLinearState, TTTMLPRule, TTTMLPState,
                                 _example_inputs, default_token_eta, gelu_tanh_grad, layer_norm,
                                 ln_l2_grad, ttt_linear, ttt_linear_inner_grad, ttt_lr, ttt_mlp,
                                 ttt_mlp_inner_grad)

leaves = jax.tree_util.tree_leaves
F64 = jnp.float64


def weighted_sum(o, state):
    """Scalar of outputs and final state with fixed generic cotangents."""
    tot = 0.0
    for i, x in enumerate(leaves((o, state))):
        w = jnp.sin(1.0 + i + jnp.arange(x.size, dtype=F64).reshape(x.shape))
        tot = tot + jnp.sum(x.astype(F64) * w)
    return tot


def close(a, b, atol, rtol=0.0, what=""):
    """chex equivalence of every leaf, in float64 (``atol``/``rtol`` as np.testing, shapes must match)."""
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb), what
    for i, (x, y) in enumerate(zip(la, lb)):
        chex.assert_trees_all_close(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=rtol,
                                    custom_message=f"{what} leaf {i}")


def learned(st):
    """Per-head learned weights [H, ...] from a broadcast state (batch element 0)."""
    return tuple(x[0] for x in st)


def rule_fn(rule):
    """(q, k, v, lr, te, g, bt, weights[H, ...]) -> (o, final state); weights are learned."""
    def fn(q, k, v, lr, te, g, bt, ws):
        st = rule.init_state(*ws, q.shape[0])
        return rule.recurrent(q, k, v, lr, te, g, bt, st, output_final_state=True)
    return fn


def ref_fn(rule):
    C = rule.mini_batch_size
    if isinstance(rule, TTTMLPRule):
        def fn(q, k, v, lr, te, g, bt, ws):
            W1, b1, W2, b2 = ws
            return ttt_mlp_loop(q, k, v, lr, W1=W1, b1=b1, W2=W2, b2=b2, ln_scale=g, ln_bias=bt,
                                token_eta=te, mini_batch_size=C)
    else:
        def fn(q, k, v, lr, te, g, bt, ws):
            W, b = ws
            return ttt_linear_loop(q, k, v, lr, W=W, b=b, ln_scale=g, ln_bias=bt, token_eta=te,
                                   mini_batch_size=C, layer_norm=rule.layer_norm, bias=rule.bias,
                                   residual=rule.residual)
    return fn


ARGNAMES = ("q", "k", "v", "lr", "token_eta", "ln_scale", "ln_bias", "weights")


def outputs_state_grads(fn, args, jit=True):
    """(o, state, grads of weighted_sum w.r.t. every argument) in one (jitted) pass."""
    def loss(*a):
        o, s = fn(*a)
        return weighted_sum(o, tuple(s)), (o, tuple(s))
    vg = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)
    (_, (o, s)), g = (jax.jit(vg) if jit else vg)(*args)
    return o, s, g


def check_against_reference(family, C, T, seed, B=2, H=2, D=4):
    cls = TTTMLPRule if family == "mlp" else TTTLinearRule
    base = cls(mini_batch_size=C)
    *xs, st = _example_inputs(base, seed=seed, B=B, T=T, H=H, D=D)
    args = tuple(xs) + (learned(st),)
    # the reference runs eagerly: its per-token pieces are jitted, the loop is not
    o_r, s_r, g_r = outputs_state_grads(ref_fn(base), args, jit=False)
    for form in ("dual", "primal"):
        o, s, g = outputs_state_grads(rule_fn(cls(mini_batch_size=C, impl=form)), args)
        assert o.dtype == F64 and o.shape == o_r.shape == (B, T, H, D)
        close(o, o_r, 1e-10, what=f"{form} output")
        close(s, s_r, 1e-10, what=f"{form} final state")
        for name, a, b in zip(ARGNAMES, g, g_r):
            assert max(float(jnp.abs(x).max()) for x in leaves(b)) > 0, name  # generic gradients
            close(a, b, 1e-10, what=f"{form} grad[{name}]")


# (family, mini_batch_size, T): T not a multiple of C (full + trailing partial mini-batch),
# T = 1, T < C; C = 1 (fully sequential) and the rest in the slow sweep.
CASES = [
    ("linear", 3, 7),
    ("linear", 4, 1),
    ("mlp", 4, 3),
]
SLOW_CASES = [("linear", 1, 3), ("mlp", 2, 4), ("linear", 4, 16), ("linear", 5, 13), ("mlp", 3, 5), ("mlp", 4, 11), ("mlp", 1, 4),
              ("mlp", 2, 1)]


@pytest.mark.parametrize("family,C,T", CASES)
def test_dual_and_primal_match_reference_float64(family, C, T):
    check_against_reference(family, C, T, seed=10 * C + T)


@pytest.mark.slow
@pytest.mark.parametrize("family,C,T", SLOW_CASES)
def test_dual_and_primal_match_reference_float64_sweep(family, C, T):
    check_against_reference(family, C, T, seed=10 * C + T, B=2, H=3, D=5)


def test_functional_ops_initial_state_per_batch_grads():
    """``initial_state`` (per batch element) overrides W, b; gradients w.r.t. it match."""
    rule = TTTLinearRule(mini_batch_size=4)
    q, k, v, lr, te, g, bt, st = _example_inputs(rule, seed=3, B=2, T=4)
    st = TTTLinearState(st.W * jnp.asarray([1.0, 0.5])[:, None, None, None], st.b + 0.1)  # differ per b

    def api(W0, b0):
        o, s = ttt_linear(q, k, v, lr, ln_scale=g, ln_bias=bt, token_eta=te, mini_batch_size=4,
                          initial_state=TTTLinearState(W0, b0), output_final_state=True)
        return weighted_sum(o, tuple(s))

    def ref(W0, b0):
        o, s = ttt_linear_loop(q, k, v, lr, W=W0, b=b0, ln_scale=g, ln_bias=bt, token_eta=te,
                               mini_batch_size=4)
        return weighted_sum(o, s)

    va, ga = jax.jit(jax.value_and_grad(api, argnums=(0, 1)))(*st)
    vr, gr = jax.value_and_grad(ref, argnums=(0, 1))(*st)
    np.testing.assert_allclose(va, vr, atol=1e-10)
    close(ga, gr, 1e-10, what="grad S0")

    rule = TTTMLPRule(mini_batch_size=4)
    q, k, v, lr, te, g, bt, st = _example_inputs(rule, seed=4, B=1, T=3)
    o1, s1 = ttt_mlp(q, k, v, lr, ln_scale=g, ln_bias=bt, token_eta=te, mini_batch_size=4,
                     initial_state=st, output_final_state=True)
    o2, s2 = ttt_mlp(q, k, v, lr, W1=st.W1[0], b1=st.b1[0], W2=st.W2[0], b2=st.b2[0], ln_scale=g,
                     ln_bias=bt, token_eta=te, mini_batch_size=4)
    assert s2 is None and isinstance(s1, TTTMLPState)
    np.testing.assert_allclose(o1, o2, atol=1e-12)


def test_closed_form_inner_grads_equal_autodiff():
    rng = np.random.default_rng(0)
    B, H, C, D, F = 2, 2, 5, 4, 16
    a = lambda *s, sc=1.0: jnp.asarray(sc * rng.normal(size=s), F64)
    k, v = a(B, H, C, D), a(B, H, C, D)
    g, bt = 1.0 + a(H, 1, D, sc=0.2), a(H, 1, D, sc=0.1)
    W, b = a(B, H, D, D, sc=0.5), a(B, H, D, sc=0.1)

    # LayerNorm + L2 backward, by hand vs autodiff
    z, t = a(3, 7), a(3, 7)
    gz = jax.grad(lambda z: 0.5 * jnp.sum((layer_norm(z, 1.3, -0.2) - t) ** 2))(z)
    np.testing.assert_allclose(ln_l2_grad(z, t, 1.3, -0.2), gz, atol=1e-12)

    # TTT-Linear: G_j = ∇_Z ℓ_j and k_jᵀ G_j = ∇_W ℓ_j, token by token
    G, gW = ttt_linear_inner_grad(W, b, k, v, g, bt)

    @jax.jit
    @functools.partial(jax.grad, argnums=(0, 1))
    def lin_grad(W_, b_, kj, vj):
        z = jnp.einsum("bhd,bhde->bhe", kj, W_) + b_
        return 0.5 * jnp.sum((layer_norm(z, g[:, 0], bt[:, 0]) - (vj - kj)) ** 2)

    for j in range(C):
        dW, db = lin_grad(W, b, k[:, :, j], v[:, :, j])
        np.testing.assert_allclose(gW[:, :, j], dW, atol=1e-12)
        np.testing.assert_allclose(G[:, :, j], db, atol=1e-12)

    # TTT-MLP: with the reference's GELU derivative == autodiff through gelu_inner;
    # the rounded constants differ from the exact tanh-GELU derivative by ~1e-10 (the quirk).
    W1, b1 = a(B, H, D, F, sc=0.5), a(B, H, F, sc=0.1)
    W2, b2 = a(B, H, F, D, sc=0.25), a(B, H, D, sc=0.1)
    G1, G2, x2 = ttt_mlp_inner_grad(W1, b1, W2, b2, k, v, g, bt)

    @functools.partial(jax.jit, static_argnums=0)
    @functools.partial(jax.grad, argnums=(1, 2, 3, 4))
    def mlp_grad(act, W1_, b1_, W2_, b2_, kj, vj):
        h = act(jnp.einsum("bhd,bhdf->bhf", kj, W1_) + b1_)
        z2 = jnp.einsum("bhf,bhfd->bhd", h, W2_) + b2_
        return 0.5 * jnp.sum((layer_norm(z2, g[:, 0], bt[:, 0]) - (vj - kj)) ** 2)

    for act, tol in ((gelu_inner, 1e-12), (gelu, 1e-8)):
        for j in range(C):
            d = mlp_grad(act, W1, b1, W2, b2, k[:, :, j], v[:, :, j])
            np.testing.assert_allclose(jnp.einsum("bhd,bhf->bhdf", k[:, :, j], G1[:, :, j]), d[0], atol=tol)
            np.testing.assert_allclose(G1[:, :, j], d[1], atol=tol)
            np.testing.assert_allclose(jnp.einsum("bhf,bhd->bhfd", x2[:, :, j], G2[:, :, j]), d[2], atol=tol)
            np.testing.assert_allclose(G2[:, :, j], d[3], atol=tol)
    xs = jnp.linspace(-4.0, 4.0, 81, dtype=F64)
    exact = jax.vmap(jax.grad(gelu))(xs)
    quirk = float(jnp.abs(gelu_tanh_grad(xs) - exact).max())
    assert 1e-12 < quirk < 1e-8, quirk  # the rounded constants are visible, and small


def test_zero_lr_means_no_update():
    for cls in (TTTLinearRule, TTTMLPRule):
        for form in ("dual", "primal"):
            rule = cls(mini_batch_size=4, impl=form)
            q, k, v, lr, te, g, bt, st = _example_inputs(rule, seed=5, B=2, T=3)
            f = jax.jit(functools.partial(rule.recurrent, output_final_state=True))
            o, s = f(q, k, v, jnp.zeros_like(lr), te, g, bt, st)
            close(tuple(s), tuple(st), 0.0, what="state unchanged")
            if cls is TTTLinearRule:
                z = jnp.einsum("bthd,bhde->bthe", q, st.W) + st.b[:, None]
            else:
                h = jnp.einsum("bthd,bhdf->bthf", q, st.W1) + st.b1[:, None]
                z = jnp.einsum("bthf,bhfd->bthd", gelu(h), st.W2) + st.b2[:, None]
            np.testing.assert_allclose(o, q + layer_norm(z, g, bt), atol=1e-12)
            # and zero token_eta does the same
            o2, _ = f(q, k, v, lr, jnp.zeros_like(te), g, bt, st)
            np.testing.assert_allclose(o2, o, atol=1e-12)


@pytest.mark.parametrize("flags", [dict(layer_norm=False), dict(bias=False, residual=False)])
def test_ablation_switches_match_reference(flags):
    *xs, st = _example_inputs(TTTLinearRule(mini_batch_size=3), seed=6, B=1, T=7)
    args = tuple(xs) + (learned(st),)
    o_r, s_r = ref_fn(TTTLinearRule(mini_batch_size=3, **flags))(*args)
    for form in ("dual", "primal"):
        o, s = rule_fn(TTTLinearRule(mini_batch_size=3, impl=form, **flags))(*args)
        close((o, tuple(s)), (o_r, tuple(s_r)), 1e-10, what=f"{flags} {form}")


def _mlp_nobias_loop(q, k, v, lr, te, g, bt, W1, W2, C):
    """Bias-free TTT-MLP, ``o = q + LN(gelu(q W1) W2)``, token by token in float64 (the
    reference loop's MLP always has biases): per mini-batch, every token's inner gradient
    at the mini-batch's initial weights (through the reference's GELU derivative); row i
    reads with ``θ − token_eta[i] · Σ_{j≤i} lr[j] g_j`` (docs/rules/ttt.md)."""
    Bn, T = q.shape[:2]

    def f(Ws, x, act):
        return jnp.einsum("bhf,bhfd->bhd", act(jnp.einsum("bhd,bhdf->bhf", x, Ws[0])), Ws[1])

    def ln(z):
        mu = z.mean(-1, keepdims=True)
        return g * (z - mu) / jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6) + bt

    Ws = (jnp.broadcast_to(W1, (Bn,) + W1.shape), jnp.broadcast_to(W2, (Bn,) + W2.shape))
    outs = []
    for s in range(0, T, C):
        idx = list(range(s, min(s + C, T)))
        grads = [jax.grad(lambda P, t=t: 0.5 * jnp.sum((ln(f(P, k[:, t], gelu_inner)) - (v[:, t] - k[:, t])) ** 2))(Ws)
                 for t in idx]
        acc = tuple(jnp.zeros_like(w) for w in Ws)
        for i, t in enumerate(idx):
            acc = tuple(a + lr[:, t][..., None, None] * gi for a, gi in zip(acc, grads[i]))
            row = tuple(w - te[i] * a for w, a in zip(Ws, acc))
            outs.append(q[:, t] + ln(f(row, q[:, t], gelu)))
        Ws = row
    return jnp.stack(outs, axis=1), Ws


@pytest.mark.parametrize("family", ["linear", pytest.param("mlp", marks=pytest.mark.slow)])
def test_bias_free_matches_float64_loop_with_gradients(family):
    """``bias=False`` (fast networks ``x W`` / ``gelu(x W1) W2``, the layers' ``fast_bias=False``):
    both forms equal a float64 per-token loop at 1e-10 in outputs, final fast weights and the
    gradients w.r.t. every input; the (unused) bias leaves of the state come back unchanged."""
    C, T, Bn = 3, 5, 2  # a full mini-batch and a partial one
    cls = TTTMLPRule if family == "mlp" else TTTLinearRule
    *xs, st = _example_inputs(cls(mini_batch_size=C), seed=7, B=Bn, T=T)
    mats = learned(st)[0::2]  # (W,) or (W1, W2)
    args = tuple(xs) + (mats,)

    def rule_fn_nb(rule):
        def fn(q, k, v, lr, te, g, bt, ws):
            full = (ws[0], None) if family == "linear" else (ws[0], None, ws[1], None)
            return rule.recurrent(q, k, v, lr, te, g, bt, rule.init_state(*full, Bn), output_final_state=True)
        return fn

    def ref(q, k, v, lr, te, g, bt, ws):  # the final state with its biases still zero
        zeros = lambda *shape: jnp.zeros((Bn,) + shape, F64)
        H, D = ws[0].shape[:2]
        if family == "mlp":
            o, (W1, W2) = _mlp_nobias_loop(q, k, v, lr, te, g, bt, *ws, C)
            return o, (W1, zeros(H, ws[0].shape[2]), W2, zeros(H, D))
        o, (Wf, _) = ttt_linear_loop(q, k, v, lr, W=ws[0], b=jnp.zeros((H, D), F64), ln_scale=g,
                                     ln_bias=bt, token_eta=te, mini_batch_size=C, bias=False)
        return o, (Wf, zeros(H, D))

    o_r, s_r, g_r = outputs_state_grads(ref, args)  # 5 tokens: the unrolled loop compiles quickly
    for form in ("dual", "primal"):
        o, s, g = outputs_state_grads(rule_fn_nb(cls(mini_batch_size=C, impl=form, bias=False)), args)
        close(o, o_r, 1e-10, what=f"{form} output")
        close(s, s_r, 1e-10, what=f"{form} final state")
        for name, a, b in zip(ARGNAMES, g, g_r):
            assert max(float(jnp.abs(x).max()) for x in leaves(b)) > 0, name
            close(a, b, 1e-10, what=f"{form} grad[{name}]")
    # and the bias matters: the reference rule (bias=True, from a zero bias) differs
    W0 = mats[0]
    zb = (W0, jnp.zeros(W0.shape[:2], F64)) if family == "linear" else (
        W0, jnp.zeros(W0.shape[::2], F64), mats[1], jnp.zeros(W0.shape[:2], F64))
    o_b, _ = rule_fn(cls(mini_batch_size=C))(*xs, zb)
    assert float(jnp.max(jnp.abs(o_b - o_r))) > 1e-6


def test_reduces_to_delta_rule():
    """docs/rules/ttt.md note: without LN, bias and residual, mini-batch 1, TTT-Linear *is* DeltaNet:
    ``S_t = S_{t−1} + β_t k_tᵀ (v_t − k_t S_{t−1})``, ``o_t = q_t S_t``, ``β_t = token_eta[0] lr_t``."""
    rule = TTTLinearRule(mini_batch_size=1, layer_norm=False, bias=False, residual=False)
    q, k, v, lr, te, _, _, st = _example_inputs(rule, seed=7, B=2, T=9)
    o, s = rule.recurrent(q, k, v, lr, te, None, None, st, output_final_state=True)
    d = rule.delta_rule_inputs(q, k, v, lr, te, st)
    S, outs = d["initial_state"], []
    for t in range(q.shape[1]):
        kt, vt, bt_ = d["k"][:, t], d["v"][:, t], d["beta"][:, t]
        u = bt_[..., None] * (vt - jnp.einsum("bhk,bhkv->bhv", kt, S))
        S = S + jnp.einsum("bhk,bhv->bhkv", kt, u)
        outs.append(d["scale"] * jnp.einsum("bhk,bhkv->bhv", d["q"][:, t], S))
    np.testing.assert_allclose(o, jnp.stack(outs, 1), atol=1e-12)
    np.testing.assert_allclose(s.W, S, atol=1e-12)
    with pytest.raises(ValueError, match="layer_norm=bias=residual=False and mini_batch_size=1"):
        TTTLinearRule(mini_batch_size=1).delta_rule_inputs(q, k, v, lr, te, st)


def test_call_impl_runs_that_form():
    """``rule(..., impl=...)`` runs the named form (``"auto"``: the configured ``impl``); both
    forms agree, and the rule's implementation protocol says what exists."""
    for cls in (TTTLinearRule, TTTMLPRule):
        rule = cls(mini_batch_size=3)
        args = _example_inputs(rule, seed=11, B=1, T=5)
        assert rule.impls == ("dual", "primal") and rule.parallel_impls() == ()
        assert rule.resolve_impl() == "dual" and cls(impl="primal").resolve_impl() == "primal"
        assert rule.resolve_impl("primal") == "primal"
        f = jax.jit(lambda *a, impl: rule(*a, output_final_state=True, impl=impl), static_argnames="impl")
        o_p, s_p = f(*args, impl="primal")
        o_d, s_d = f(*args, impl="dual")
        o_pr, s_pr = jax.jit(functools.partial(dataclasses_replace(rule, impl="primal").recurrent,
                                               output_final_state=True))(*args)
        close((o_p, tuple(s_p)), (o_pr, tuple(s_pr)), 0.0, what="impl='primal' is the primal form")
        close((o_d, tuple(s_d)), (o_p, tuple(s_p)), 1e-10, what="dual vs primal")
        with pytest.raises(ValueError, match=r"impl: .*does not support impl='chunked'"):
            rule(*args, impl="chunked")


def test_parallel_raises_and_names_layernorm():
    for rule in (TTTLinearRule(), TTTMLPRule()):
        msg = rule.breaks_associativity()
        assert "LayerNorm" in msg and "bias" in msg and "residual" in msg
        with pytest.raises(NotAssociativeError, match="LayerNorm"):
            rule.parallel()
    assert "GELU" in TTTMLPRule().breaks_associativity()
    assert "delta rule" in TTTLinearRule(layer_norm=False, bias=False, residual=False).breaks_associativity()
    assert {"ttt_linear", "ttt_mlp"} <= set(REGISTRY)
    rule, build = REGISTRY["ttt_mlp"]()
    o, s = rule.recurrent(*build(rule, 0, F64), output_final_state=True)
    assert isinstance(s, TTTMLPState) and o.dtype == F64


@pytest.mark.parametrize("family", ["linear", "mlp"])
def test_float32_tolerance(family):
    cls = TTTMLPRule if family == "mlp" else TTTLinearRule
    rule = cls(mini_batch_size=3)
    *xs, st = _example_inputs(rule, seed=8, B=2, T=7, H=2, D=4)
    args32 = tuple(x.astype(jnp.float32) for x in xs) + (tuple(x.astype(jnp.float32) for x in learned(st)),)
    o_r, s_r = ref_fn(rule)(*jax.tree_util.tree_map(lambda x: x.astype(F64), args32))
    for form in ("dual", "primal"):
        o, s = jax.jit(rule_fn(cls(mini_batch_size=3, impl=form)))(*args32)
        assert o.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in s)
        np.testing.assert_allclose(o, o_r, atol=5e-6 * float(jnp.abs(o_r).max()))
        for a, b in zip(s, s_r):
            np.testing.assert_allclose(a, b, atol=5e-6 * float(jnp.abs(b).max()))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["linear", "mlp"])
def test_float32_gradients_over_many_mini_batches(family):
    """The backward rebuilds each mini-batch's initial weights from the next one's (docs/rules/ttt.md
    "The backward pass"): in float32 over 24 mini-batches the gradients stay within 1e-4 of
    the float64 ones, relative to each gradient's max magnitude (measured ≤ 1e-5 here, as
    for autodiff through the scan; an error in the rebuild is O(1))."""
    cls = TTTMLPRule if family == "mlp" else TTTLinearRule
    *xs, st = _example_inputs(cls(mini_batch_size=2), seed=11, B=1, T=49, H=2, D=4)
    args = tuple(xs) + (learned(st),)
    args32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), args)
    for form in ("dual", "primal"):
        rule = cls(mini_batch_size=2, impl=form)
        _, _, g = outputs_state_grads(rule_fn(rule), args)
        _, _, g32 = outputs_state_grads(rule_fn(rule), args32)
        for name, a, b in zip(ARGNAMES, g32, g):
            for x, y in zip(leaves(a), leaves(b)):
                assert x.dtype == jnp.float32
                scale = float(jnp.abs(y).max())
                assert scale > 0, name
                np.testing.assert_allclose(x, y, atol=1e-4 * scale, err_msg=f"{form} grad[{name}]")


def test_jit_vmap_grad_checkpoint():
    rule = TTTLinearRule(mini_batch_size=4)
    *xs, st = _example_inputs(rule, seed=9, B=1, T=4, dtype=jnp.float32)
    f = jax.jit(functools.partial(rule.recurrent, output_final_state=True))
    o, s = f(*xs, st)
    stack = lambda x: jnp.stack([x, 0.5 * x])
    ov, sv = jax.vmap(f)(*(stack(x) for x in xs), jax.tree_util.tree_map(stack, st))
    o1, s1 = f(*(0.5 * x for x in xs), jax.tree_util.tree_map(lambda x: 0.5 * x, st))
    close((ov[0], ov[1], sv.W[1]), (o, o1, s1.W), 1e-5, 1e-5, what="vmap")
    loss = lambda W1: f(*xs, st._replace(W=W1))[0].sum()
    g = jax.jit(jax.grad(loss))(st.W)
    g2 = jax.jit(jax.grad(jax.checkpoint(loss)))(st.W)
    assert float(jnp.abs(g).max()) > 0
    np.testing.assert_allclose(g, g2, rtol=1e-5, atol=1e-6)


def test_helpers():
    te = default_token_eta(4, offset=jnp.asarray([0.0, -0.7, 0.1, 0.0]), dtype=F64)
    np.testing.assert_allclose(te, [1.0, 0.0, 1 / 3 + 0.1, 0.25])
    x = jnp.ones((1, 2, 3), F64)
    lr = ttt_lr(x, jnp.zeros((3, 2), F64), jnp.zeros((2,), F64), base_lr=1.0, head_dim=8)
    np.testing.assert_allclose(lr, np.full((1, 2, 2), 0.5 / 8))


# ----------------------------------------------------------------------------- bad inputs


def _bad(**over):
    rule = TTTLinearRule(mini_batch_size=4)
    q, k, v, lr, te, g, bt, st = _example_inputs(rule, seed=0, B=1, T=5, H=2, D=4)
    kw = dict(ln_scale=g, ln_bias=bt, token_eta=te, mini_batch_size=4, W=st.W[0], b=st.b[0])
    pos = dict(q=q, k=k, v=v, lr=lr)
    for name, val in over.items():
        (pos if name in pos else kw)[name] = val
    return lambda: ttt_linear(pos["q"], pos["k"], pos["v"], pos["lr"], **kw)


@pytest.mark.parametrize("over,match", [
    (dict(lr=jnp.zeros((1, 5, 3))), r"lr: expected shape \[B, T, H\].*\(1, 5, 2\), got \(1, 5, 3\)"),
    (dict(lr=jnp.zeros((1, 5, 2, 1))), r"lr: expected shape .*got \(1, 5, 2, 1\)"),
    (dict(mini_batch_size=0), r"mini_batch_size: expected a positive int, got 0"),
    (dict(mini_batch_size=-2), r"mini_batch_size: expected a positive int, got -2"),
    (dict(token_eta=jnp.ones(3)), r"token_eta: expected shape \[mini_batch_size\].*\(4,\), got \(3,\)"),
    (dict(k=jnp.zeros((1, 5, 2, 3))), r"k: expected shape .*\(1, 5, 2, 4\), got \(1, 5, 2, 3\)"),
    (dict(v=jnp.zeros((1, 5, 2, 6))), r"v: expected shape .*\(1, 5, 2, 4\), got \(1, 5, 2, 6\)"),
    (dict(W=jnp.zeros((2, 3, 3))), r"W: expected leading dims \[H, D\] = \(2, 4\) \(from q\), got shape \(2, 3, 3\)"),
    (dict(W=jnp.zeros((2, 4, 3))), r"W: expected shape \[H, D, D\].*\(2, 4, 4\), got \(2, 4, 3\)"),
    (dict(b=jnp.zeros((2, 3))), r"b: expected shape \[H, D\].*\(2, 4\), got \(2, 3\)"),
    (dict(ln_scale=jnp.ones((2, 3))), r"ln_scale: expected shape \[H, D\].*\(2, 4\), got \(2, 3\)"),
    (dict(ln_bias=None), r"ln_bias: required with layer_norm=True"),
    (dict(q=jnp.zeros((1, 5, 4))), r"q: expected a rank-4 array .*got shape \(1, 5, 4\)"),
    (dict(q=jnp.zeros((1, 0, 2, 4)), k=jnp.zeros((1, 0, 2, 4)), v=jnp.zeros((1, 0, 2, 4)),
          lr=jnp.zeros((1, 0, 2))), r"T >= 1"),
    (dict(impl="fast"), r"impl: got 'fast', expected one of \('dual', 'primal'\)"),
])
def test_bad_input_names_argument_and_shapes(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)()


def test_bad_state_and_mlp_shapes():
    rule = TTTMLPRule(mini_batch_size=4)
    q, k, v, lr, te, g, bt, st = _example_inputs(rule, seed=0, B=1, T=5, H=2, D=4)
    with pytest.raises(ValueError, match=r"W2: expected shape \[H, F, D\].*\(2, 16, 4\), got \(2, 16, 3\)"):
        ttt_mlp(q, k, v, lr, W1=st.W1[0], b1=None, W2=jnp.zeros((2, 16, 3)), b2=None, ln_scale=g,
                ln_bias=bt, token_eta=te, mini_batch_size=4)
    with pytest.raises(ValueError, match=r"state.W2: expected shape \[B, H, F, D\].*\(1, 2, 16, 4\), got \(1, 2, 8, 4\)"):
        rule.recurrent(q, k, v, lr, te, g, bt, st._replace(W2=jnp.zeros((1, 2, 8, 4))))
    with pytest.raises(ValueError, match=r"state.W: expected shape \[B, H, D, D\].*\(2, 2, 4, 4\), got \(1, 2, 4, 4\)"):
        TTTLinearRule(mini_batch_size=4).recurrent(
            jnp.concatenate([q, q]), jnp.concatenate([k, k]), jnp.concatenate([v, v]),
            jnp.concatenate([lr, lr]), te, g, bt, TTTLinearState(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 2, 4))))
    with pytest.raises(ValueError, match="state: expected a TTTLinearState"):
        TTTLinearRule(mini_batch_size=4).recurrent(q, k, v, lr, te, g, bt, "nope")


def test_numpy_and_jax_scalars():
    """``mini_batch_size`` / ``eps`` accept NumPy and JAX scalars, stored as Python values."""
    r = TTTLinearRule(mini_batch_size=np.int64(4), eps=jnp.float32(0.5))
    assert r == TTTLinearRule(mini_batch_size=4, eps=0.5) and hash(r)
    assert type(r.mini_batch_size) is int and type(r.eps) is float
    with pytest.raises(ValueError, match="eps: expected a positive float"):
        TTTMLPRule(eps=np.float64(0.0))
