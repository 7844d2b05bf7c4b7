"""ViT³ (docs/rules/vit3.md): GLU and 3×3 depthwise-conv fast weights against the float64 loops,
and the reduction (docs/rules/vit3.md) to (non-causal / sliding-window) linear attention.

Tolerances (documented): float64 1e-10 absolute for outputs, updated weights and outer
gradients; float32 inputs 1e-5 relative to the reference's max magnitude (one step, no
accumulation over time).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.reference.vit3 import vit3_conv_loop, vit3_glu_loop
from tttla_jax.rules.vit3 import SCALE, ViT3ConvRule, ViT3GLURule, vit3_conv, vit3_glu

leaves = jax.tree_util.tree_leaves
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
    def call(*args):
        return jax.jit(fn).lower(*args).compile(compiler_options=FAST)(*args)
    return call


def close(a, b, atol, what=""):
    """chex equivalence of every leaf, in float64 (``atol``/``rtol`` as np.testing, shapes must match)."""
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb), what
    for i, (x, y) in enumerate(zip(la, lb)):
        chex.assert_trees_all_close(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=0.0,
                                    custom_message=f"{what} leaf {i}")


def weighted_sum(*xs):
    tot = 0.0
    for x in leaves(xs):
        tot = tot + jnp.sum(x.astype(jnp.float64) * jnp.cos(1.0 + jnp.arange(x.size).reshape(x.shape)))
    return tot


def outs_and_grads(fn, args):
    def loss(*a):
        out = fn(*a)
        return weighted_sum(*out), out
    g, out = fast_jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, g


def glu_inputs(seed, B=1, N=6, H=2, K=3, V=4, dtype=jnp.float64):
    r = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(r.normal(size=s), dtype)
    return mk(B, N, H, K), mk(B, N, H, K), mk(B, N, H, V), mk(H, K, V), mk(H, K, V)


def conv_inputs(seed, B=1, grid=(3, 4), C=3, dtype=jnp.float64):
    r = np.random.default_rng(seed)
    N = grid[0] * grid[1]
    mk = lambda *s: jnp.asarray(r.normal(size=s), dtype)
    return mk(B, N, C), mk(B, N, C), mk(B, N, C), mk(3, 3, C)


# ----------------------------------------------------------------------------- GLU


@pytest.mark.parametrize("update_W2,normalize", [(True, True), (False, True),
                                                 pytest.param(True, False, marks=pytest.mark.slow)])
def test_glu_forms_match_reference_float64(update_W2, normalize):
    args = glu_inputs(0)
    kw = dict(update_W2=update_W2, normalize=normalize)
    ref = lambda q, k, v, W1, W2: vit3_glu_loop(q, k, v, W1=W1, W2=W2, **kw)
    out_r, g_r = outs_and_grads(ref, args)
    for impl in ("recurrent", "chunked"):
        fn = lambda q, k, v, W1, W2: vit3_glu(q, k, v, W1=W1, W2=W2, impl=impl, output_final_state=True, **kw)
        out, g = outs_and_grads(fn, args)
        close(out, out_r, 1e-10, what=f"{impl}: o, W1', W2'")
        close(g, g_r, 1e-10, what=f"{impl}: grads q k v W1 W2")


def test_glu_closed_form_grad_equals_jax_grad():
    q, k, v, W1, W2 = glu_inputs(1, B=2, N=5)
    rule = ViT3GLURule(normalize=False)
    N = k.shape[1]

    def loss(W1, W2):  # −(s/N) Σ_i ⟨f(k_i), v_i⟩ summed over (b, h): per-(b, h) grads
        f = jnp.einsum("bnhk,bhkv->bnhv", k, W1) * jax.nn.silu(jnp.einsum("bnhk,bhkv->bnhv", k, W2))
        return -SCALE / N * jnp.sum(f * v)

    B = k.shape[0]
    bc = lambda W: jnp.broadcast_to(W, (B,) + W.shape)
    close(rule._grads(k, v, W1, W2), jax.grad(loss, argnums=(0, 1))(bc(W1), bc(W2)), 1e-12)


def test_glu_norm_axis_is_the_input_axis():
    """‖ΔW[:, j]‖ over K equals ‖g_j‖ / (‖g_j‖ + 1) < 1 for every output column j."""
    q, k, v, W1, W2 = glu_inputs(2, N=7)
    k = 30 * k  # large gradients so the normalisation is far from the identity
    _, (W1n, _) = vit3_glu(q, k, v, W1=W1, W2=W2, output_final_state=True)
    _, (W1u, _) = vit3_glu(q, k, v, W1=W1, W2=W2, output_final_state=True, normalize=False)
    g = W1[None] - W1u  # raw gradient (lr = 1)
    gn = jnp.linalg.norm(g, axis=-2)  # [B, H, V]
    np.testing.assert_allclose(jnp.linalg.norm(W1[None] - W1n, axis=-2), gn / (gn + 1), atol=1e-12)
    assert float(gn.min()) > 1.0


@pytest.mark.parametrize("normalize", [False, True])
def test_glu_reduces_to_noncausal_linear_attention(normalize):
    """docs/rules/vit3.md: with only W1 updating, o = φ(q) ⊙ (q (W1 + kᵀ(η ⊙ v ⊙ φ(k)))), φ = silu(· W2):
    tt.linear_attention(masking="none") with initial state W1, times φ(q)."""
    q, k, v, W1, W2 = glu_inputs(3, B=2, N=9)
    N = q.shape[1]
    o, (W1n, _) = vit3_glu(q, k, v, W1=W1, W2=W2, update_W2=False, normalize=normalize,
                           impl="recurrent", output_final_state=True)
    phi = lambda x: jax.nn.silu(jnp.einsum("bnhk,hkv->bnhv", x, W2))
    vhat = SCALE / N * v * phi(k)
    if normalize:  # the per-column factor 1/(‖g‖_K + 1) folds into the values
        gn = jnp.linalg.norm(jnp.einsum("bnhk,bnhv->bhkv", k, vhat), axis=-2)
        vhat = vhat / (gn + 1.0)[:, None]
    S0 = jnp.broadcast_to(W1, (2,) + W1.shape)
    la, S = tt.linear_attention(q, k, vhat, scale=1.0, initial_state=S0, masking="none", output_final_state=True)
    close((o, W1n), (phi(q) * la, S), 1e-10, what="GLU vs linear attention")


# ----------------------------------------------------------------------------- conv


@pytest.mark.parametrize("grid,normalize", [((3, 4), True), pytest.param((2, 3), False, marks=pytest.mark.slow)])
def test_conv_forms_match_reference_float64(grid, normalize):
    args = conv_inputs(4, grid=grid)
    ref = lambda q, k, v, W: vit3_conv_loop(q, k, v, W=W, grid=grid, normalize=normalize)
    out_r, g_r = outs_and_grads(ref, args)
    for impl in ("recurrent", "chunked"):
        fn = lambda q, k, v, W: vit3_conv(q, k, v, W=W, grid=grid, normalize=normalize, impl=impl,
                                          output_final_state=True)
        out, g = outs_and_grads(fn, args)
        close(out, out_r, 1e-10, what=f"{impl}: o, W'")
        close(g, g_r, 1e-10, what=f"{impl}: grads q k v W")


def test_conv_matches_lax_conv_and_closed_form_grad():
    """conv(q, W') equals lax.conv_general_dilated (depthwise, SAME) and the closed-form
    gradient equals jax.grad of the loss."""
    grid, C = (4, 5), 3
    q, k, v, W = conv_inputs(5, B=2, grid=grid, C=C)
    rule = ViT3ConvRule(grid=grid, normalize=False)
    B, N = q.shape[:2]
    img = lambda x: x.reshape(x.shape[0], *grid, C)

    def conv(x, w):  # w [3, 3, C] -> HWIO with feature groups = C
        return jax.lax.conv_general_dilated(img(x), w[:, :, None, :], (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=C)

    g_cf = rule._grad(img(k), img(v), N).reshape(B, 3, 3, C)
    g_ad = jnp.stack([jax.grad(lambda w: -SCALE / N * jnp.sum(conv(k[b:b + 1], w) * img(v[b:b + 1])))(W)
                      for b in range(B)])
    close(g_cf, g_ad, 1e-12, what="closed-form conv grad")
    o, Wn = rule.recurrent(q, k, v, W)
    o_x = jnp.concatenate([conv(q[b:b + 1], Wn[b]) for b in range(B)]).reshape(B, N, C)
    close(o, o_x, 1e-12, what="conv(q, W')")


def test_conv_is_sliding_window_linear_attention():
    """docs/rules/vit3.md: o_p = Σ_δ q_{p+δ} ⊙ (W_δ + Σ_{p'} k_{p'+δ} ⊙ v̂_{p'}), v̂ = c (s/N) v — written
    out here with numpy over the 3×3 window, independent of the rule's parallel form."""
    grid, C = (3, 3), 2
    q, k, v, W = (np.asarray(x) for x in conv_inputs(6, B=1, grid=grid, C=C))
    Hg, Wg = grid
    N = Hg * Wg
    at = lambda x, i, j: x[0, i * Wg + j] if (0 <= i < Hg and 0 <= j < Wg) else np.zeros(C)
    state = {}
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            state[a, b] = sum(at(k, i + a, j + b) * v[0, i * Wg + j] for i in range(Hg) for j in range(Wg))
    gnorm = np.sqrt(sum(s ** 2 for s in state.values())) * SCALE / N  # ‖g‖ over taps, per channel
    eta = SCALE / N / (gnorm + 1.0)
    o = np.zeros((N, C))
    for i in range(Hg):
        for j in range(Wg):
            o[i * Wg + j] = sum(at(q, i + a, j + b) * (W[a + 1, b + 1] + eta * state[a, b])
                                for a in (-1, 0, 1) for b in (-1, 0, 1))
    for impl in ("recurrent", "chunked"):
        f = lambda q, k, v, W: vit3_conv(q, k, v, W=W, grid=grid, impl=impl)
        o_rule, _ = fast_jit(f)(*(jnp.asarray(x) for x in (q, k, v, W)))
        close(o_rule[0], o, 1e-12, what=impl)


# ----------------------------------------------------------------------------- misc


@pytest.mark.parametrize("part", ["glu", "conv"])
def test_float32_tolerance(part):
    if part == "glu":
        args = glu_inputs(7, B=2, N=49, H=2, K=16, V=16, dtype=jnp.float32)
        run = lambda *a, impl="auto": vit3_glu(a[0], a[1], a[2], W1=a[3], W2=a[4], impl=impl)[0]
    else:
        args = conv_inputs(7, B=2, grid=(7, 7), C=16, dtype=jnp.float32)
        run = lambda *a, impl="auto": vit3_conv(a[0], a[1], a[2], W=a[3], grid=(7, 7), impl=impl)[0]
    o_r = fast_jit(run)(*(x.astype(jnp.float64) for x in args))
    for impl in ("recurrent", "chunked"):
        o = fast_jit(lambda *a: run(*a, impl=impl))(*args)
        assert o.dtype == jnp.float32
        np.testing.assert_allclose(o, o_r, atol=1e-5 * float(jnp.abs(o_r).max()))


def test_jit_vmap_grad():
    q, k, v, W1, W2 = glu_inputs(8, B=2, N=6, dtype=jnp.float32)
    f = jax.jit(lambda q, k, v, W1, W2: vit3_glu(q, k, v, W1=W1, W2=W2)[0])
    o = f(q, k, v, W1, W2)
    ov = jax.vmap(f, in_axes=(0, 0, 0, None, None))(jnp.stack([q, 2 * q]), jnp.stack([k, k]),
                                                   jnp.stack([v, v]), W1, W2)
    np.testing.assert_allclose(ov[0], o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ov[1], f(2 * q, k, v, W1, W2), rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda W1: f(q, k, v, W1, W2).sum()))(W1)
    g2 = jax.grad(jax.checkpoint(lambda W1: f(q, k, v, W1, W2).sum()))(W1)
    assert bool(jnp.isfinite(g).all())
    np.testing.assert_allclose(g, g2, rtol=1e-5, atol=1e-6)
    qc, kc, vc, W = conv_inputs(8, B=2, dtype=jnp.float32)
    fc = jax.jit(lambda q, W: vit3_conv(q, kc, vc, W=W, grid=(3, 4))[0])
    gw = jax.grad(lambda W: fc(qc, W).sum())(W)
    assert gw.shape == W.shape and bool(jnp.isfinite(gw).all())


@pytest.mark.parametrize("kw,match", [
    (dict(k=(1, 6, 2, 4)), r"k: expected shape \[B, N, H, K\].*\(1, 6, 2, 3\), got \(1, 6, 2, 4\)"),
    (dict(v=(1, 5, 2, 4)), r"v: expected shape \[B, N, H, V\] with \(B, N, H\) = \(1, 6, 2\).*got \(1, 5, 2, 4\)"),
    (dict(W1=(2, 4, 3)), r"W1: expected shape \[H, K, V\] = \(2, 3, 4\), got \(2, 4, 3\)"),
    (dict(W2=(3, 4)), r"W2: expected shape \[H, K, V\] = \(2, 3, 4\), got \(3, 4\)"),
    (dict(q=(6, 2, 3)), r"q: expected a rank-4 array with layout \[B, N, H, D\], got shape \(6, 2, 3\)"),
    (dict(impl="fast"), r"impl: got 'fast', expected one of"),
])
def test_glu_bad_input(kw, match):
    shapes = dict(q=(1, 6, 2, 3), k=(1, 6, 2, 3), v=(1, 6, 2, 4), W1=(2, 3, 4), W2=(2, 3, 4))
    impl = kw.pop("impl", "auto")
    shapes.update(kw)
    a = {n: jnp.zeros(s) for n, s in shapes.items()}
    with pytest.raises(ValueError, match=match):
        vit3_glu(a["q"], a["k"], a["v"], W1=a["W1"], W2=a["W2"], impl=impl)


@pytest.mark.parametrize("kw,match", [
    (dict(q=(1, 11, 3)), r"q: expected N = Hg·Wg = 12 tokens for grid \(3, 4\), got N = 11"),
    (dict(v=(1, 12, 2)), r"v: expected shape \[B, N, C\] \(from q\) = \(1, 12, 3\), got \(1, 12, 2\)"),
    (dict(W=(3, 3, 1, 3)), r"W: expected shape \[3, 3, C\] = \(3, 3, 3\), got \(3, 3, 1, 3\)"),
    (dict(grid=(3, 0)), r"grid: expected a positive int, got 0"),
    (dict(grid=(12,)), r"grid: expected a pair \(Hg, Wg\), got \(12,\)"),
])
def test_conv_bad_input(kw, match):
    shapes = dict(q=(1, 12, 3), k=(1, 12, 3), v=(1, 12, 3), W=(3, 3, 3))
    grid = kw.pop("grid", (3, 4))
    shapes.update(kw)
    a = {n: jnp.zeros(s) for n, s in shapes.items()}
    with pytest.raises(ValueError, match=match):
        vit3_conv(a["q"], a["k"], a["v"], W=a["W"], grid=grid)


def test_numpy_and_jax_scalars_and_impl_protocol():
    """``grid`` / ``scale`` / ``lr`` accept NumPy and JAX scalars (stored as Python values);
    ``impls``: ``"auto"`` runs the gradient step, ``"chunked"`` is the parallel form."""
    r = ViT3ConvRule(grid=(np.int64(3), jnp.int32(4)), scale=jnp.float32(0.5), lr=np.float64(1.0))
    assert r == ViT3ConvRule(grid=(3, 4), scale=0.5, lr=1.0) and hash(r)
    g = ViT3GLURule(scale=np.float32(0.5))
    assert type(g.scale) is float
    for rule in (r, g):
        assert rule.impls == ("recurrent", "chunked") and rule.parallel_impls() == ("chunked",)
        assert rule.resolve_impl() == "recurrent" and rule.has_reading()
        assert rule.linear_attention_reason() is not None


def test_zero_keys_have_finite_gradients():
    """All-zero keys make ViT³'s fast-weight gradient zero, the point where its normalisation
    ``g / (‖g‖ + 1)`` has a norm of zeros: the gradients stay finite in every form (the
    norm's derivative there is 0, as autograd gives the reference), and the forms agree."""
    rng = np.random.default_rng(0)
    B, N, H, K = 1, 4, 2, 3
    q, v = (jnp.asarray(rng.normal(size=(B, N, H, K))) for _ in range(2))
    k = jnp.zeros((B, N, H, K))
    W1, W2 = (jnp.asarray(rng.normal(size=(H, K, K))) for _ in range(2))
    grads = []
    for impl in ("recurrent", "chunked"):
        f = lambda q, k, v, W1, W2, impl=impl: weighted_sum(vit3_glu(q, k, v, W1=W1, W2=W2, impl=impl)[0])
        g = fast_jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(q, k, v, W1, W2)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves(g)), impl
        grads.append(g)
    close(grads[0], grads[1], 1e-10, "glu zero-key gradients")
    C = 2
    qc, vc = (jnp.asarray(rng.normal(size=(B, 4, C))) for _ in range(2))
    W = jnp.asarray(rng.normal(size=(3, 3, C)))
    for impl in ("recurrent", "chunked"):
        f = lambda q, k, v, W, impl=impl: weighted_sum(vit3_conv(q, k, v, W=W, grid=(2, 2), impl=impl)[0])
        g = fast_jit(jax.grad(f, argnums=(0, 1, 2, 3)))(qc, jnp.zeros((B, 4, C)), vc, W)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves(g)), impl
