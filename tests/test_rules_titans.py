"""Titans (docs/rules/titans.md): scan rule and parallel forms against the float64 reference loop.

Tolerances (documented): float64 1e-10 absolute (O(1)-scaled inputs) for outputs,
final memory and outer gradients; float32 inputs 2e-5 relative to the reference's max
magnitude (states accumulate in float32; T ≤ 64 here, errors grow at most linearly).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttla_jax.reference.titans import titans_loop
from tttla_jax.impl import ImplError
from tttla_jax.rules.titans import TitansRule, TitansState, _example_inputs, titans, titans_inner_grad

leaves = jax.tree_util.tree_leaves


def inputs(rule, seed=0, **kw):
    args = _example_inputs(rule, seed, **kw)
    W0 = jax.tree_util.tree_map(lambda x: x[0], args[-1].memory)  # [H, …] learned W0
    return args[:-1], W0


def weighted_sum(o, M):
    """Scalar of outputs and final memory with fixed generic cotangents."""
    tot = 0.0
    for x in leaves((o, M)):
        w = jnp.sin(1.0 + jnp.arange(x.size, dtype=jnp.float64).reshape(x.shape))
        tot = tot + jnp.sum(x.astype(jnp.float64) * w)
    return tot


def close(a, b, atol, rtol=0.0, what=""):
    """chex equivalence of every leaf, in float64 (``atol``/``rtol`` as np.testing, shapes must match)."""
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb), what
    for i, (x, y) in enumerate(zip(la, lb)):
        chex.assert_trees_all_close(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=rtol,
                                    custom_message=f"{what} leaf {i}")


def run_api(impl, c, bs, act="gelu"):
    def fn(q, k, v, th, eta, alpha, W0):
        return titans(q, k, v, th, eta, alpha, W0=W0, chunk_size=c, batch_size=bs,
                      output_final_state=True, impl=impl, activation=act)
    return fn


def run_ref(c, bs, act="gelu"):
    def fn(q, k, v, th, eta, alpha, W0):
        return titans_loop(q, k, v, th, eta, alpha, W0=W0, chunk_size=c, batch_size=bs, activation=act)
    return fn


# XLA's CPU compile dominates this file's runtime; the numerics checked here do not
# depend on backend optimisation, so tests compile with the cheap pipeline.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
    def call(*args):
        return jax.jit(fn).lower(*args).compile(compiler_options=FAST)(*args)
    return call


def outs_and_grads(fn, args, argnums):
    """One compiled call: ``((o, M), grads w.r.t. argnums)`` of the weighted-sum loss."""
    def loss(*a):
        out = fn(*a)
        return weighted_sum(*out), out
    g, out = fast_jit(jax.grad(loss, argnums=argnums, has_aux=True))(*args)
    return out, g


# (memory, chunk_size, batch_size, T): T not a multiple of c, T = 1, c = 1 with batch 1
# (fully sequential), batch = several chunks, batch = whole sequence (None)
CASES = [
    pytest.param("linear", 3, None, 8, marks=pytest.mark.slow),
    pytest.param("linear", 2, 4, 9, marks=pytest.mark.slow),
    ("linear", 1, 1, 4),
    ("mlp", 2, 4, 7),
    pytest.param("linear", 4, None, 11, marks=pytest.mark.slow),
    pytest.param("mlp", 4, None, 10, marks=pytest.mark.slow),
    pytest.param("linear", 3, None, 1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("memory,c,bs,T", CASES)
def test_forms_match_reference_float64(memory, c, bs, T):
    """Outputs, final memory and gradients w.r.t. q, k, v, θ, η, α and W0 at 1e-10."""
    rule = TitansRule(chunk_size=c, batch_size=bs, memory=memory)
    args, W0 = inputs(rule, seed=T + c, B=2 if memory == "linear" else 1, T=T)
    argnums = tuple(range(7))
    ref_out, g_r = outs_and_grads(run_ref(c, bs), (*args, W0), argnums)
    impls = ["recurrent", "associative"] + (["chunked"] if memory == "linear" else [])
    for impl in impls:
        (o, M), g = outs_and_grads(run_api(impl, c, bs), (*args, W0), argnums)
        assert o.dtype == jnp.float64 and o.shape == ref_out[0].shape
        close((o, M), ref_out, 1e-10, what=f"{impl}: outputs/final memory")
        close(g, g_r, 1e-10, what=f"{impl}: grads q k v theta momentum decay W0")


@pytest.mark.parametrize("memory", ["linear", pytest.param("mlp", marks=pytest.mark.slow)])
def test_single_token(memory):
    """T = 1 < c: one partial chunk; o_0 reads M_0 = W0 and M_1 holds token 0's update."""
    rule = TitansRule(chunk_size=3, memory=memory)
    args, W0 = inputs(rule, seed=1, B=2, T=1)
    o_r, M_r = run_ref(3, None)(*args, W0)
    for impl in ["recurrent", "associative"] + (["chunked"] if memory == "linear" else []):
        close(fast_jit(run_api(impl, 3, None))(*args, W0), (o_r, M_r), 1e-10, what=impl)


def test_read_index_semantics_by_hand():
    """T = 5, c = 2: tokens 0, 2 read M_{n−1}; tokens 1, 3 read their own chunk's M_n;
    token 4 (partial chunk 3) reads M_2, and M_3 (returned) includes token 4's update."""
    rule = TitansRule(chunk_size=2, memory="linear")
    (q, k, v, th, eta, alpha), W0 = inputs(rule, seed=3, T=5)
    o, M_final = fast_jit(run_api("recurrent", 2, None))(q, k, v, th, eta, alpha, W0)
    W = jnp.broadcast_to(W0, (1,) + W0.shape)
    V = v.shape[-1]
    Ms, S, M = [W], jnp.zeros_like(W), W
    for n in range(3):
        u = 0
        for t in range(2 * n, min(2 * n + 2, 5)):
            err = jnp.einsum("bhk,bhkv->bhv", k[:, t], W) - v[:, t]
            u = u - (2.0 / V) * th[:, t, :, None, None] * k[:, t, :, :, None] * err[:, :, None, :]
        S = eta[:, :, n, None, None] * S + u
        M = (1 - alpha[:, :, n, None, None]) * M + S
        Ms.append(M)
    read = [0, 1, 1, 2, 2]
    for t in range(5):
        np.testing.assert_allclose(o[:, t], jnp.einsum("bhk,bhkv->bhv", q[:, t], Ms[read[t]]), atol=1e-12)
    np.testing.assert_allclose(M_final, Ms[3], atol=1e-12)
    assert not np.allclose(Ms[3], Ms[2]), "the partial chunk must update the final memory"


@pytest.mark.parametrize("bs,c,T,block", [(None, 4, 77, 16), (12, 3, 50, 6),
                                          pytest.param(None, 1, 40, 8, marks=pytest.mark.slow)])
def test_parallel_equals_recurrent_linear(bs, c, T, block):
    """Longer T than the loop can take: chunked/associative == scan, incl. the full state
    (memory and momentum) and gradients w.r.t. every input and the initial state."""
    rule = TitansRule(chunk_size=c, batch_size=bs, block_tokens=block)
    *xs, st = _example_inputs(rule, seed=T, B=1, T=T, H=2, K=4, V=3)
    xs = (*xs, st.memory, 0.1 * jnp.ones_like(st.momentum))  # non-zero initial momentum

    def run(impl):
        def f(*a):
            o, s = rule(*a[:-2], TitansState(a[-2], a[-1]), impl=impl)
            return o, (s.memory, s.momentum)
        return f

    argnums = tuple(range(8))
    out_r, g_r = outs_and_grads(run("recurrent"), xs, argnums)
    out_c, g_c = outs_and_grads(run("chunked"), xs, argnums)
    close(out_c, out_r, 1e-10, what="chunked vs recurrent")
    close(g_c, g_r, 1e-10, what="chunked vs recurrent grads (incl. initial M, S)")
    close(fast_jit(run("associative"))(*xs), out_r, 1e-10, what="associative vs recurrent")
    assert rule.auto_impl() == ("recurrent" if bs == c else "chunked")


def test_parallel_mlp_associative_and_chunked_refuses():
    rule = TitansRule(chunk_size=3, batch_size=None, memory="mlp", activation="silu")
    *xs, st = _example_inputs(rule, seed=5, T=20)
    close(fast_jit(rule.parallel)(*xs, st), fast_jit(rule.recurrent)(*xs, st), 1e-10, what="mlp associative vs scan")
    with pytest.raises(ImplError, match="memory='mlp'.*linear read"):
        rule.parallel(*xs, st, impl="chunked")


def test_extreme_gates_no_nan():
    """η = 0 and α = 1 (factors exactly 0) — the log-space products must not produce NaN."""
    rule = TitansRule(chunk_size=2, block_tokens=8)
    q, k, v, th, eta, alpha, st = _example_inputs(rule, seed=9, T=17)
    eta = eta.at[:, :, 2].set(0.0)
    alpha = alpha.at[:, :, 4].set(1.0)
    o_c, s_c = fast_jit(lambda *a: rule(*a, impl="chunked"))(q, k, v, th, eta, alpha, st)
    o_r, s_r = fast_jit(rule.recurrent)(q, k, v, th, eta, alpha, st)
    assert bool(jnp.isfinite(o_c).all())
    close((o_c, s_c), (o_r, s_r), 1e-10, what="extreme gates")
    g = fast_jit(jax.grad(lambda e: rule(q, k, v, th, e, alpha, st, impl="chunked")[0].sum()))(eta)
    assert bool(jnp.isfinite(g).all())


def test_initial_state_chaining_matches_one_call():
    """With TTT batches aligned to the call boundary, two calls chained through the
    returned state equal one call (memory, momentum and W_ref all carried correctly)."""
    rule = TitansRule(chunk_size=2, batch_size=4)
    q, k, v, th, eta, alpha, st = _example_inputs(rule, seed=4, T=13)
    for impl in ("recurrent", "chunked"):  # associative: covered by the batch cases above
        f = lambda *a: rule(*a, impl=impl)
        o, s = fast_jit(f)(q, k, v, th, eta, alpha, st)
        o1, s1 = fast_jit(f)(q[:, :8], k[:, :8], v[:, :8], th[:, :8], eta[..., :4], alpha[..., :4], st)
        o2, s2 = fast_jit(f)(q[:, 8:], k[:, 8:], v[:, 8:], th[:, 8:], eta[..., 4:], alpha[..., 4:], s1)
        close((jnp.concatenate([o1, o2], 1), s2), (o, s), 1e-12, what=impl)


@pytest.mark.parametrize("memory,act", [("linear", "gelu"), ("mlp", "gelu"), ("mlp", "silu")])
def test_closed_form_inner_grad_equals_jax_grad(memory, act):
    rule = TitansRule(chunk_size=5, memory=memory, activation=act)
    (q, k, v, th, _, _), W0 = inputs(rule, seed=7, T=5)
    W = jax.tree_util.tree_map(lambda w: w[None], W0)  # [1, H, …]
    kc, vc, tc = (jnp.moveaxis(x, 1, 2) for x in (k, v, th))  # [B, H, c, ·]
    f = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu}[act]

    def inner_loss(W):
        pred = jnp.einsum("bhck,bhkv->bhcv", kc, W) if memory == "linear" else \
            jnp.einsum("bhcf,bhfv->bhcv", f(jnp.einsum("bhck,bhkf->bhcf", kc, W[0])), W[1])
        return jnp.sum(tc * jnp.mean((pred - vc) ** 2, axis=-1))

    close(titans_inner_grad(W, kc, vc, tc, activation=act), jax.grad(inner_loss)(W), 1e-12)


def test_c1_batch1_no_momentum_is_the_delta_rule():
    """docs/ttt_as_linear_attention.md: MSE loss => delta rule. c = 1, batch 1, η = α = 0: β_t = 2θ_t/V, scale 1."""
    dr = pytest.importorskip("tttla_jax.ops.delta_rule")
    rule = TitansRule(chunk_size=1, batch_size=1)
    (q, k, v, th, eta, alpha), W0 = inputs(rule, seed=8, T=9)
    o, M = fast_jit(run_api("auto", 1, 1))(q, k, v, th, 0 * eta, 0 * alpha, W0)
    S0 = jnp.broadcast_to(W0, (1,) + W0.shape)
    o_d, S_d = dr.delta_rule(q, k, v, 2.0 * th / v.shape[-1], scale=1.0, initial_state=S0,
                             output_final_state=True, impl="recurrent")
    close((o, M), (o_d, S_d), 1e-10, what="titans vs delta rule")


def test_batch_none_no_momentum_is_linear_attention():
    """batch_size=None, c = 1, η = α = 0: o = q W0 + Σ_{i≤t} (q·k_i) ṽ_i with
    ṽ = (2/V) θ (v − k W0) — tt.linear_attention with initial state W0 (theorem 5.2)."""
    import tttla_jax as tt

    rule = TitansRule(chunk_size=1)
    (q, k, v, th, eta, alpha), W0 = inputs(rule, seed=10, T=12)
    o, M = fast_jit(run_api("chunked", 1, None))(q, k, v, th, 0 * eta, 0 * alpha, W0)
    vt = 2.0 / v.shape[-1] * th[..., None] * (v - jnp.einsum("bthk,hkv->bthv", k, W0))
    S0 = jnp.broadcast_to(W0, (1,) + W0.shape)
    o_la, S_la = tt.linear_attention(q, k, vt, scale=1.0, initial_state=S0, output_final_state=True)
    close((o, M), (o_la, S_la), 1e-10, what="titans vs linear attention")


@pytest.mark.parametrize("impl", ["recurrent", "chunked", "associative"])
def test_float32_tolerance(impl):
    rule = TitansRule(chunk_size=4, batch_size=16)
    args, W0 = inputs(rule, seed=11, T=30, H=2, K=8, V=8)
    args32 = tuple(x.astype(jnp.float32) for x in args)
    W32 = W0.astype(jnp.float32)
    o, M = fast_jit(run_api(impl, 4, 16))(*args32, W32)
    assert o.dtype == jnp.float32 and M.dtype == jnp.float32
    o_r, M_r = fast_jit(run_api("recurrent", 4, 16))(*(x.astype(jnp.float64) for x in args32), W32.astype(jnp.float64))
    np.testing.assert_allclose(o, o_r, atol=2e-5 * float(jnp.abs(o_r).max()))
    np.testing.assert_allclose(M, M_r, atol=2e-5 * float(jnp.abs(M_r).max()))


def test_jit_vmap_grad_checkpoint():
    rule = TitansRule(chunk_size=4, batch_size=8)
    *xs, st = _example_inputs(rule, seed=12, T=19, dtype=jnp.float32)
    f = jax.jit(lambda *a: rule(*a[:-1], a[-1], impl="chunked"))
    o, s = f(*xs, st)
    stack = lambda x: jnp.stack([x, 0.5 * x])
    ov, sv = jax.vmap(f)(*(stack(x) for x in xs), jax.tree_util.tree_map(stack, st))
    o1, s1 = f(*(0.5 * x for x in xs), jax.tree_util.tree_map(lambda x: 0.5 * x, st))
    np.testing.assert_allclose(ov[0], o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ov[1], o1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sv.memory[1], s1.memory, rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda W: f(*xs, TitansState(W, st.momentum))[0].sum()))(st.memory)
    g2 = jax.grad(jax.checkpoint(lambda W: f(*xs, TitansState(W, st.momentum))[0].sum()))(st.memory)
    assert g.shape == st.memory.shape and bool(jnp.isfinite(g).all())
    np.testing.assert_allclose(g, g2, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

B, T, H, K, V = 2, 10, 3, 4, 5
GOOD = dict(q=(B, T, H, K), k=(B, T, H, K), v=(B, T, H, V), theta=(B, T, H),
            momentum=(B, H, 3), decay=(B, H, 3), W0=(H, K, V))


@pytest.mark.parametrize("change,kw,match", [
    (dict(k=(B, T, H, K + 1)), {}, r"k: expected shape \[B, T, H, K\].*\(2, 10, 3, 4\), got \(2, 10, 3, 5\)"),
    (dict(v=(B, T, 2, V)), {}, r"v: expected shape \[B, T, H, V\].*\(2, 10, 3\).*got \(2, 10, 2, 5\)"),
    (dict(theta=(B, T, H, 1)), {}, r"theta: expected shape \[B, T, H\] = \(2, 10, 3\), got \(2, 10, 3, 1\)"),
    (dict(momentum=(B, H, 2)), {}, r"momentum: expected shape \[B, H, ceil\(T / chunk_size\)\].*T = 10, chunk_size = 4.* = \(2, 3, 3\), got \(2, 3, 2\)"),
    (dict(decay=(B, 3 * H)), {}, r"decay: expected shape .*\(2, 3, 3\), got \(2, 9\)"),
    (dict(W0=(H, K + 1, V)), {}, r"W0: expected leading dims \[H, K\] = \(3, 4\) \(from q\), got \(3, 5, 5\)"),
    (dict(W0=(H, K, V + 2)), {}, r"W0: expected last dim V = 5 \(from v\), got shape \(3, 4, 7\)"),
    (dict(W0=(K, V)), {}, r"W0: expected a rank-3 array with layout \[H, K, V\], got shape \(4, 5\)"),
    ({}, dict(batch_size=6), r"batch_size: expected None or a multiple of chunk_size = 4, got 6"),
    ({}, dict(chunk_size=0), r"chunk_size: expected a positive int, got 0"),
    ({}, dict(impl="fast"), r"impl: got 'fast', expected one of"),
    ({}, dict(activation="relu"), r"activation: got 'relu', expected one of \('gelu', 'silu'\)"),
    (dict(q=(B, T, H)), {}, r"q: expected a rank-4 array .*got shape \(2, 10, 3\)"),
])
def test_bad_input_names_argument_and_shapes(change, kw, match):
    shapes = dict(GOOD, **change)
    a = {n: jnp.zeros(s, jnp.float32) for n, s in shapes.items()}
    kwargs = dict(dict(chunk_size=4), **kw)
    with pytest.raises(ValueError, match=match):
        titans(a["q"], a["k"], a["v"], a["theta"], a["momentum"], a["decay"], W0=a["W0"], **kwargs)


def test_bad_mlp_W0_and_state():
    z = lambda *s: jnp.zeros(s)
    q = z(B, T, H, K)
    args = (q, q, z(B, T, H, V), z(B, T, H), z(B, H, 3), z(B, H, 3))
    with pytest.raises(ValueError, match=r"W0\[1\]: expected shape \[H, F, V\] with \(H, F\) = \(3, 6\)"):
        titans(*args, W0=(z(H, K, 6), z(H, 7, V)), chunk_size=4)
    rule = TitansRule(chunk_size=4)
    with pytest.raises(ValueError, match=r"state.momentum: expected shape \[B, H, K, V\] = \(2, 3, 4, 5\)"):
        rule.recurrent(*args, TitansState(z(B, H, K, V), z(B, H, K, 4)))
    with pytest.raises(ValueError, match=r"state: expected a TitansState"):
        rule.recurrent(*args, z(B, H, K, V))


def test_numpy_and_jax_scalars_and_impl_protocol():
    """Sizes accept NumPy and JAX integer scalars (stored as Python ints); the rule's
    implementations and ``"auto"`` (chunked for the linear memory, recurrent for the MLP
    memory or one-chunk TTT batches) through the protocol."""
    r = TitansRule(chunk_size=np.int32(4), batch_size=jnp.int32(8), block_tokens=np.int64(16))
    assert r == TitansRule(chunk_size=4, batch_size=8, block_tokens=16) and hash(r)
    assert r.impls == ("chunked", "associative", "recurrent")
    assert r.parallel_impls() == ("chunked", "associative") and r.resolve_impl() == "chunked"
    mlp = TitansRule(chunk_size=4, memory="mlp")
    assert mlp.parallel_impls() == ("associative",) and mlp.resolve_impl() == "recurrent"
    assert "linear read" in mlp.impl_reasons()["chunked"]
    assert TitansRule(chunk_size=4, batch_size=4).resolve_impl() == "recurrent"
    assert r.linear_attention_reason() is not None


def test_mlp_memory_float32_stays_float32():
    """The MLP memory's GELU derivative uses Python constants: float32 inputs keep a float32
    scan carry even with jax_enable_x64 (a NumPy float64 constant used to promote it)."""
    rule = TitansRule(chunk_size=4, batch_size=8, memory="mlp")
    *xs, st = _example_inputs(rule, seed=13, T=9, dtype=jnp.float32)
    for impl in ("recurrent", "associative"):
        o, s = jax.eval_shape(lambda *a: rule(*a, impl=impl), *xs, st)
        assert o.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in leaves(s)), impl
