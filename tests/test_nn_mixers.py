"""Token mixers (tttla_jax.nn.mixers): implementation equivalence, decoding, transforms, counts, errors.

float64 checks at 1e-10 (models built with dtype = param_dtype = float64); float32
implementation agreement at 1e-4 (documented tolerance: chunked vs token-scan summation order).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.nn.layers import apply_rope
from tttla_jax.nn.mixers import DeltaNet, LinearAttention, SlidingWindowAttention, sliding_window_attend

F64 = jnp.float64
B, T, W, H = 2, 7, 8, 2
TOL = 1e-10
# float64 equivalence: every element within TOL (absolute), shapes and tree structure equal
assert_close = functools.partial(chex.assert_trees_all_close, rtol=0.0, atol=TOL)

CASES = {
    "la_elu": (LinearAttention, dict(feature_map="elu+1", chunk_size=4)),
    "la_decay_silul2": (LinearAttention, dict(feature_map="silu+l2", use_decay=True, chunk_size=4)),
    "delta_noconv_l2": (DeltaNet, dict(use_short_conv=False, feature_map="l2", chunk_size=4)),
    "gated_delta_conv": (DeltaNet, dict(use_gate=True, chunk_size=3, conv_size=3)),
    "swa_rope": (SlidingWindowAttention, dict(window=4)),
    "swa_window2": (SlidingWindowAttention, dict(window=2)),  # T = 7: four blocks, one padded
}
NOGRAD_KEYS = ("kpos", "pos")  # integer cache entries
SPLITS = ((5, 6),)  # prefill 5 tokens (not a multiple of the chunk size), then 1 + 1

# Test shapes are tiny, so XLA's optimisation passes cost far more than they save: compile
# the test functions at backend optimisation level 0 (results are the same to 1e-10).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)


def make(case, impl, dtype=F64, param_dtype=F64, seed=0, **over):
    cls, kw = CASES[case]
    return cls(width=W, num_heads=H, impl=impl, dtype=dtype, param_dtype=param_dtype,
               rngs=nnx.Rngs(seed), **{**kw, **over})


def inputs(dtype=F64, t=T, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, t, W), dtype)


def max_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, F64) - jnp.asarray(y, F64))))
               for x, y in zip(la, lb))


def loss_fn(graphdef):
    def loss(params, x, cache):
        y, c = nnx.merge(graphdef, params)(x, cache=cache)
        w = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        extra = sum(jnp.sum(jnp.sin(v.astype(F64))) for k, v in c.items() if k not in NOGRAD_KEYS)
        return jnp.sum(y * w) + extra
    return loss


def random_cache(m, seed=2):
    """A non-trivial starting cache: random fast weights / conv inputs; for the sliding
    window, random keys and values at positions -1 (empty), 0, ..., window-2."""
    c = m.init_cache(B)
    keys = iter(jax.random.split(jax.random.key(seed), len(c)))
    out = {k: 0.5 * jax.random.normal(next(keys), v.shape, v.dtype) for k, v in c.items()
           if k not in NOGRAD_KEYS}
    if "kpos" in c:
        w = c["kpos"].shape[1]
        out["kpos"] = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32) - 1, (B, w))
        out["pos"] = jnp.full((B,), w - 1, jnp.int32)
    return out


@functools.lru_cache(maxsize=None)
def run(case, impl):
    """Everything the float64 tests compare, computed in one jitted function per (case, impl):
    the call from a non-trivial cache with its gradients w.r.t. parameters, inputs and the
    float entries of that cache; the full forward from an empty cache and the same sequence
    fed in pieces."""
    m = make(case, impl)
    gd, params = nnx.split(m)
    cache = random_cache(m)
    fc = {k: v for k, v in cache.items() if k not in NOGRAD_KEYS}
    ic = {k: v for k, v in cache.items() if k in NOGRAD_KEYS}

    def loss(params, x, fc):
        y, c = nnx.merge(gd, params)(x, cache={**fc, **ic})
        w = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        extra = sum(jnp.sum(jnp.sin(v.astype(F64))) for k, v in c.items() if k not in NOGRAD_KEYS)
        return jnp.sum(y * w) + extra, (y, c)

    @jit
    def f(params, x, fc):
        (_, (y, c)), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, fc)
        m = nnx.merge(gd, params)
        y_full, c_full = m(x)
        pieces = []
        for split in SPLITS:
            c2, ys, start = m.init_cache(B), [], 0
            for stop in (*split, T):
                yp, c2 = m(x[:, start:stop], cache=c2)
                ys.append(yp)
                start = stop
            pieces.append((jnp.concatenate(ys, axis=1), c2))
        return dict(y=y, c=c, g=g, y_full=y_full, c_full=c_full, pieces=pieces)

    return f(params, inputs(), fc)


@pytest.mark.parametrize("case", list(CASES))
def test_recurrent_and_chunked_agree_f64(case):
    """Outputs, final cache and gradients w.r.t. parameters, inputs and initial cache."""
    r0, r1 = run(case, "recurrent"), run(case, "chunked")
    assert r0["y"].dtype == F64 and r0["y"].shape == (B, T, W)
    assert_close(r0["y"], r1["y"])
    assert_close(r0["c"], r1["c"])
    assert jax.tree.structure(r0["g"]) == jax.tree.structure(r1["g"])
    assert_close(r0["g"], r1["g"])
    # the gradients are not trivially zero (every parameter, the input and the cache)
    assert all(float(jnp.max(jnp.abs(l))) > 0 for l in jax.tree.leaves(r0["g"]))
    # starting from the non-trivial cache matters
    assert max_diff(r0["y"], r0["y_full"]) > 1e-6


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_pieces_equal_full_forward(case, impl):
    """Prefill + token-by-token decoding (pieces 5, 1, 1) equals one full call, outputs and
    final cache."""
    r = run(case, impl)
    for y, c in r["pieces"]:
        assert_close(y, r["y_full"])
        assert_close(c, r["c_full"])


def test_jit_vmap_checkpoint():
    case = "la_decay_silul2"
    m = make(case, "chunked")
    x = inputs()
    gd, params = nnx.split(m)

    def f(params, x):
        return nnx.merge(gd, params)(x)

    y, c = f(params, x)  # eager
    yj, cj = jit(f)(params, x)
    assert_close((yj, cj), (y, c))

    # jax.vmap over a batch of two models (stacked parameter states)
    m2 = make(case, "chunked", seed=5)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, nnx.state(m2))
    loss = loss_fn(gd)
    cache0 = m.init_cache(B)

    @jit
    def g(stacked, params, x):
        yv, _ = jax.vmap(f, in_axes=(0, None))(stacked, x)
        g_plain = jax.grad(loss)(params, x, cache0)
        g_remat = jax.grad(jax.checkpoint(loss))(params, x, cache0)
        return yv, g_plain, g_remat

    yv, g_plain, g_remat = g(stacked, params, x)
    y2, _ = m2(x)
    assert_close((yv[0], yv[1]), (y, y2))
    assert max_diff(y, y2) > 1e-3  # the two models really differ
    # jax.checkpoint around the call gives the same gradient
    assert_close(g_plain, g_remat)


def test_auto_impl_equals_chunked_linear_attention():
    x = inputs()
    ya, _ = make("la_decay_silul2", "auto")(x)
    yp, _ = make("la_decay_silul2", "chunked")(x)
    assert_close(ya, yp)


@pytest.mark.parametrize("case", ["la_decay_silul2", "gated_delta_conv", "swa_rope"])
def test_float32_impls_agree_and_dtypes(case):
    """float32: recurrent and chunked agree to 1e-4 (summation order); bfloat16
    activations with float32 parameters give a bfloat16 output and float32 fast weights."""
    x = inputs(jnp.float32)
    ms = [make(case, impl, dtype=jnp.float32, param_dtype=jnp.float32) for impl in ("recurrent", "chunked")]
    mb = make(case, "chunked", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    graphs = [nnx.split(mm) for mm in (*ms, mb)]

    @jit
    def f(states, x):
        return [nnx.merge(gd, st)(xx) for (gd, _), st, xx in
                zip(graphs, states, (x, x, x.astype(jnp.bfloat16)))]

    (y0, _), (y1, _), (yb, cb) = f([st for _, st in graphs], x)
    assert y0.dtype == jnp.float32
    np.testing.assert_allclose(y0, y1, atol=1e-4, rtol=1e-4)
    assert yb.dtype == jnp.bfloat16
    if "state" in cb:
        assert cb["state"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(yb.astype(jnp.float32))))


def test_sliding_window_matches_naive_loop():
    """SWA against a per-query float64 loop: softmax over the last `window` positions."""
    window = 3
    m = make("swa_rope", "chunked", window=window)
    x = inputs()
    y, _ = m(x)
    pos = jnp.arange(T)
    D = W // H
    q = apply_rope(m.q_proj(x).reshape(B, T, H, D), pos)
    k = apply_rope(m.k_proj(x).reshape(B, T, H, D), pos)
    v = m.v_proj(x).reshape(B, T, H, D)
    q, k, v = (np.asarray(a) for a in (q, k, v))
    o = np.zeros((B, T, H, D))
    for t in range(T):
        lo = max(0, t - window + 1)
        s = np.einsum("bhd,bshd->bhs", q[:, t], k[:, lo:t + 1]) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o[:, t] = np.einsum("bhs,bshd->bhd", p, v[:, lo:t + 1])
    ref = m.o_proj(jnp.asarray(o).reshape(B, T, H * D))
    assert_close(y, ref)


def test_rope_positions_are_relative():
    """<R(p)q, R(p')k> depends only on p - p' (RoPE), so shifting all positions is a no-op
    for attention scores; and apply_rope at position 0 is the identity."""
    q = jax.random.normal(jax.random.key(0), (1, 5, 2, 6), F64)
    k = jax.random.normal(jax.random.key(1), (1, 5, 2, 6), F64)
    pos = jnp.arange(5)
    s0 = jnp.einsum("bthd,bshd->bhts", apply_rope(q, pos), apply_rope(k, pos))
    s1 = jnp.einsum("bthd,bshd->bhts", apply_rope(q, pos + 11), apply_rope(k, pos + 11))
    assert_close(s0, s1)
    chex.assert_trees_all_equal(apply_rope(q, jnp.zeros(5, jnp.int32)), q)
    assert max_diff(s0, jnp.einsum("bthd,bshd->bhts", q, k)) > 1e-3


def count(m):
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_parameter_counts_by_hand():
    D = 3  # explicit head dim != W // H
    HD = H * D
    kw = dict(width=W, num_heads=H, head_dim=D, rngs=nnx.Rngs(0))
    assert count(LinearAttention(**kw)) == 4 * W * HD + D
    assert count(LinearAttention(use_decay=True, **kw)) == 4 * W * HD + D + W * H + 2 * H
    assert count(DeltaNet(use_short_conv=False, **kw)) == 4 * W * HD + W * H + D
    assert count(DeltaNet(conv_size=4, **kw)) == 4 * W * HD + W * H + D + 3 * 4 * HD
    assert count(DeltaNet(conv_size=4, use_gate=True, **kw)) == (
        4 * W * HD + W * H + D + 3 * 4 * HD + W * H + 2 * H)
    assert count(SlidingWindowAttention(width=W, num_heads=H, head_dim=4, rngs=nnx.Rngs(0))) == 4 * W * H * 4


def test_parameters_carry_logical_sharding():
    m = DeltaNet(width=W, num_heads=H, use_gate=True, rngs=nnx.Rngs(0))
    assert m.q_proj.kernel.out_sharding == ("embed", "heads")
    assert m.o_proj.kernel.out_sharding == ("heads", "embed")
    assert m.q_conv.kernel.out_sharding == ("conv", "heads")
    assert m.gate.A_log.out_sharding == ("heads",)
    assert m.out_norm.scale.out_sharding == ("head_dim",)


@pytest.mark.parametrize("cls,kwargs,match", [
    (LinearAttention, dict(num_heads=3), r"num_heads: must divide width"),
    (LinearAttention, dict(impl="fast"), r"impl: got 'fast', expected one of \('auto', 'pallas', 'chunked', "
                                         r"'recurrent', 'associative'\) \(the implementation vocabulary is"),
    (LinearAttention, dict(impl="dual"), r"impl: LinearAttention does not support impl='dual'; supported: "
                                         r"\('auto', 'pallas', 'chunked', 'recurrent', 'associative'\)"),
    (LinearAttention, dict(impl="parallel"), r"impl: got 'parallel'"),
    (LinearAttention, dict(feature_map="softmax"), r"feature_map: got 'softmax'"),
    (LinearAttention, dict(chunk_size=0), r"chunk_size: expected a positive int"),
    (DeltaNet, dict(impl="associative"), r"impl: DeltaNet does not support impl='associative'; "
                                         r"supported: \('auto', 'pallas', 'chunked', 'recurrent'\)"),
    (DeltaNet, dict(feature_map="softmax"), r"feature_map: got 'softmax'"),
    (SlidingWindowAttention, dict(impl="pallas"), r"impl: SlidingWindowAttention does not support "
                                                  r"impl='pallas'; supported: \('auto', 'chunked', 'recurrent'\)"),
    (SlidingWindowAttention, dict(window=0), r"window: expected a positive int"),
    (SlidingWindowAttention, dict(head_dim=3), r"head_dim: RoPE needs an even head dim"),
])
def test_bad_config_raises(cls, kwargs, match):
    base = dict(width=W, num_heads=H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        cls(**{**base, **kwargs})


def test_bad_call_inputs_raise():
    m = make("gated_delta_conv", "chunked")
    with pytest.raises(ValueError, match=r"x: expected \[B, T, W\] with W = 8"):
        m(jnp.zeros((B, T, 5), F64))
    with pytest.raises(ValueError, match=r"x: expected a rank-3 array"):
        m(jnp.zeros((T, W), F64))
    c = m.init_cache(B)
    with pytest.raises(ValueError, match=r"cache: missing keys \['conv_q'\]"):
        m(inputs(), cache={k: v for k, v in c.items() if k != "conv_q"})
    with pytest.raises(ValueError, match=r"cache\['state'\]: expected shape \[B, H, D, D\] = \(2, 2, 4, 4\)"):
        m(inputs(), cache={**c, "state": jnp.zeros((B, H, 4, 5))})
    s = make("swa_rope", "chunked")
    with pytest.raises(ValueError, match=r"positions: expected shape \[B, T\]"):
        s(inputs(), positions=jnp.zeros((B, T + 1), jnp.int32))
    with pytest.raises(ValueError, match=r"positions: expected an integer dtype"):
        s(inputs(), positions=jnp.zeros((B, T), F64))


def test_pallas_impl_linear_attention_matches_chunked():
    """impl="pallas" runs the Pallas kernel (interpret mode on CPU; it needs a head dim in
    {16, 32, ...}); float32 tolerance 1e-5."""
    x = jax.random.normal(jax.random.key(0), (1, 5, 16), jnp.float32)
    ys = []
    for impl in ("pallas", "chunked"):
        m = LinearAttention(width=16, num_heads=1, impl=impl, chunk_size=16, use_decay=True,
                            rngs=nnx.Rngs(0))
        ys.append(m(x))
    np.testing.assert_allclose(ys[0][0], ys[1][0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ys[0][1]["state"], ys[1][1]["state"], atol=1e-5, rtol=1e-5)


def dense_window_attend(q, k, v, qpos, cache, window):
    """Reference: every query against all ``window + T`` keys with the position mask only
    (a T × (window + T) score matrix)."""
    kk = jnp.concatenate([cache["k"], k], axis=1)
    vv = jnp.concatenate([cache["v"], v], axis=1)
    kpos = jnp.concatenate([cache["kpos"], qpos], axis=1)
    s = jnp.einsum("bthd,bshd->bhts", q, kk) * (q.shape[-1] ** -0.5)
    kp, qp = kpos[:, None, :], qpos[:, :, None]
    mask = (kp >= 0) & (kp <= qp) & (kp > qp - window)
    p = jax.nn.softmax(jnp.where(mask[:, None], s, jnp.finfo(s.dtype).min), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, vv)


BLOCK_CASES = ((1, 5), (3, 3), (3, 10), (4, 9), (5, 2), (8, 16))  # (window, T)


def test_blocked_window_attention_equals_dense_mask():
    """The blocked form (blocks of `window` queries against their own and the previous block)
    equals dense masked attention against [cache ; new keys] for increasing positions, from a
    cache holding fewer than `window` tokens; T below, at and above the window, T not a
    multiple of it. The returned cache is the last `window` keys, values and positions."""
    Bq, Hq, D = 2, 2, 4

    def case(window, t):
        filled = min(2, window)
        ks = jax.random.split(jax.random.key(t * 10 + window), 5)
        q, k, v = (jax.random.normal(kk, (Bq, t, Hq, D), F64) for kk in ks[:3])
        ck = jax.random.normal(ks[3], (Bq, window, Hq, D), F64)
        cv = jax.random.normal(ks[4], (Bq, window, Hq, D), F64)
        kpos = jnp.broadcast_to(jnp.arange(window) - (window - filled), (Bq, window)).astype(jnp.int32)
        cache = {"k": ck, "v": cv, "kpos": jnp.where(kpos >= 0, kpos, -1)}
        qpos = jnp.broadcast_to(filled + jnp.arange(t), (Bq, t)).astype(jnp.int32)
        o, new = sliding_window_attend(q, k, v, qpos, cache, window=window)
        expected = {"k": jnp.concatenate([ck, k], axis=1)[:, -window:],
                    "v": jnp.concatenate([cv, v], axis=1)[:, -window:],
                    "kpos": jnp.concatenate([cache["kpos"], qpos], axis=1)[:, -window:],
                    "pos": qpos[:, -1] + 1}
        return o, dense_window_attend(q, k, v, qpos, cache, window), new, expected

    results = jit(lambda: [case(*c) for c in BLOCK_CASES])()
    for (window, t), (o, ref, new, expected) in zip(BLOCK_CASES, results):
        chex.assert_shape(o, (Bq, t, Hq, D))
        assert_close(o, ref)
        chex.assert_trees_all_equal(new, expected)


def test_swa_chunked_equals_recurrent_for_arbitrary_positions():
    """With positions that jump, repeat and go back, chunked and recurrent still agree
    (outputs, cache and gradients w.r.t. x): both attend to the last `window` tokens, among
    them those inside the position window."""
    m0, m1 = (make("swa_window2", impl) for impl in ("recurrent", "chunked"))
    x = inputs()
    pos = jnp.asarray([[0, 1, 5, 5, 3, 4, 9], [2, 3, 4, 5, 6, 7, 8]], jnp.int32)

    def f(m, x):
        def loss(x):
            y, c = m(x, positions=pos)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), (y, c)
        (_, (y, c)), g = jax.value_and_grad(loss, has_aux=True)(x)
        return y, c, g

    r0, r1 = jit(lambda x: f(m0, x))(x), jit(lambda x: f(m1, x))(x)
    assert_close(r0, r1)


def test_swa_chunked_memory_is_linear_in_t():
    """T = 4096, window 16, float64: the compiled chunked layer (forward, and forward +
    backward) needs far less scratch memory than one T × T float64 score matrix
    (T·T·8 B = 134 MB; the blocked scores are T·2·window·8 B = 1 MB per head). Bound: an
    eighth of that matrix (16.8 MB). Checked on the compiled program's memory analysis;
    the dense reference is checked to exceed the matrix, so the measure sees it."""
    Tl, window = 4096, 16
    m = SlidingWindowAttention(width=8, num_heads=1, window=window, impl="chunked", dtype=F64,
                               param_dtype=F64, rngs=nnx.Rngs(0))
    gd, params = nnx.split(m)
    x = jax.ShapeDtypeStruct((1, Tl, 8), F64)

    def fwd(params, x):
        return nnx.merge(gd, params)(x)[0]

    def grad(params, x):
        return jax.grad(lambda p, x: jnp.sum(fwd(p, x) ** 2), argnums=(0, 1))(params, x)

    dense_scores = Tl * Tl * 8
    for fn in (fwd, grad):
        mem = jax.jit(fn).lower(params, x).compile().memory_analysis()
        if mem is None:
            pytest.skip("no compiled memory analysis on this backend")
        assert mem.temp_size_in_bytes < dense_scores // 8, (fn.__name__, mem.temp_size_in_bytes)

    q = jax.ShapeDtypeStruct((1, Tl, 1, 8), F64)
    cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                         {k: v for k, v in m.init_cache(1).items() if k != "pos"})
    dense = jax.jit(lambda q, c: dense_window_attend(q, q, q, jnp.arange(Tl)[None], c, window))
    assert dense.lower(q, cache).compile().memory_analysis().temp_size_in_bytes >= dense_scores


def test_pallas_impl_delta_net_matches_chunked():
    """DeltaNet(impl="pallas") runs the delta-rule Pallas forward kernel (interpret mode on
    CPU; head dim in {16, 32, ...}) with its XLA backward: gated, with the short conv, from a
    non-zero cache; outputs, cache and input gradients equal the chunked form (float32,
    1e-5)."""
    x = jax.random.normal(jax.random.key(0), (1, 5, 16), jnp.float32)
    out = []
    for impl in ("pallas", "chunked"):
        m = DeltaNet(width=16, num_heads=1, impl=impl, chunk_size=16, use_gate=True, conv_size=3,
                     rngs=nnx.Rngs(0))
        c0 = jax.tree.map(lambda a: 0.1 * jnp.ones_like(a), m.init_cache(1))

        def loss(x, c0, m=m):
            y, c = m(x, cache=c0)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), (y, c)

        (_, yc), g = jit(jax.value_and_grad(loss, has_aux=True))(x, c0)
        out.append((yc, g))
    assert out[0][0][1]["state"].dtype == jnp.float32
    chex.assert_trees_all_close(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_numpy_and_jax_scalars_in_mixer_configs():
    """NumPy / JAX integer and float scalars configure a mixer exactly like Python numbers."""
    x = inputs()
    pairs = [
        (dict(window=np.int64(3), rope_base=jnp.float32(100.0), head_dim=np.int32(4)),
         dict(window=3, rope_base=100.0, head_dim=4), SlidingWindowAttention),
        (dict(chunk_size=np.int64(4), norm_eps=np.float32(1e-5), num_heads=jnp.int32(H)),
         dict(chunk_size=4, norm_eps=float(np.float32(1e-5)), num_heads=H), LinearAttention),
        (dict(chunk_size=jnp.int32(3), conv_size=np.int64(3)), dict(chunk_size=3, conv_size=3), DeltaNet),
    ]
    for np_kw, py_kw, cls in pairs:
        base = dict(width=W, num_heads=H, dtype=F64, param_dtype=F64)
        a, b = (cls(**{**base, **kw}, rngs=nnx.Rngs(0)) for kw in (np_kw, py_kw))
        for name in ("window", "chunk_size", "conv_size", "head_dim", "num_heads", "width"):
            if hasattr(a, name):
                assert type(getattr(a, name)) is int, name
        assert_close(a(x), b(x))
    with pytest.raises(ValueError, match=r"window: expected a positive int, got True"):
        SlidingWindowAttention(width=W, num_heads=H, window=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rope_base: expected a positive float"):
        SlidingWindowAttention(width=W, num_heads=H, rope_base=-1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", sorted(__import__("tttla_jax.nn", fromlist=["MIXERS"]).MIXERS))
def test_every_mixer_keeps_the_input_dtype_and_rejects_integers(name):
    """Every registered mixer (float32 parameters, default dtype=None) returns bfloat16 for
    bfloat16 activations (the float32 call's output rounded once to bfloat16), also when
    decoding from a cache; integer activations are a ValueError naming x and its dtype."""
    from tttla_jax.nn import MIXERS
    layer = MIXERS[name](width=16, num_heads=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 6, 16), jnp.float32).astype(jnp.bfloat16)
    with jax.enable_x64(False):
        y, cache = layer(x)
        y32, _ = layer(x.astype(jnp.float32))
        y_dec, _ = layer(x[:, :1], cache=layer.init_cache(1))
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert y_dec.dtype == jnp.bfloat16
    assert y32.dtype == jnp.float32
    # float32 parameters: the layer computes in float32 either way, then rounds once
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(y32.astype(jnp.bfloat16), np.float32))
    assert cache is not None
    with pytest.raises(ValueError, match=r"x: expected a floating dtype, got int32"):
        layer(jnp.ones((1, 6, 16), jnp.int32))
