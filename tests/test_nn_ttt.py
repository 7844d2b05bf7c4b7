"""TTT-Linear / TTT-MLP / Titans layers (tttla_jax.nn.ttt, tttla_jax.nn.titans).

float64 at 1e-10: the sequential view vs the parallel view — TTT's ``impl="primal"`` vs
``"dual"``, Titans' ``"recurrent"`` vs ``"chunked"`` (linear memory) / ``"associative"``
(MLP memory) — (outputs, final cache, gradients w.r.t. parameters, input and the starting
cache), pieces == one call (T not a multiple of the mini-batch / TTT batch), the layer ==
the rule's functional op on the whole sequence. float32 agreement of the two views at 1e-5
(documented: summation order of the primal vs dual / chunked forms).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.nn import LanguageModel, LMConfig, MIXERS, count_params
from tttla_jax.nn.titans import TitansMemory
from tttla_jax.nn.ttt import TTTLinear, TTTMLP, rope_interleaved
from tttla_jax.rules.titans import titans
from tttla_jax.rules.ttt import default_token_eta, gelu_tanh, ttt_linear, ttt_lr, ttt_mlp

F64 = jnp.float64
B, T, W, H = 2, 7, 8, 2
D = W // H
TOL = 1e-10

CASES = {
    "ttt_linear": (TTTLinear, dict(mini_batch_size=4, init_std=0.3)),
    "ttt_linear_qk_gate": (TTTLinear, dict(mini_batch_size=3, init_std=0.3, share_qk=True,
                                           conv_kernel=3, use_gate=True, base_lr=0.5)),
    "ttt_mlp": (TTTMLP, dict(mini_batch_size=3, init_std=0.3, mlp_expansion=2)),
    # fast network without its bias (x + LN(x W)), with the recall recipe's conv taps
    "ttt_linear_nobias": (TTTLinear, dict(mini_batch_size=3, init_std=0.3, fast_bias=False, short_conv=2)),
    "ttt_mlp_nobias": (TTTMLP, dict(mini_batch_size=3, init_std=0.3, mlp_expansion=2, fast_bias=False)),
    "titans_linear": (TitansMemory, dict(chunk_size=2, batch_size=4, max_lr=0.5)),
    "titans_mlp": (TitansMemory, dict(chunk_size=2, batch_size=4, max_lr=0.5, memory="mlp",
                                      mlp_expansion=2, activation="silu")),
}
INT_KEYS = ("buf_len", "pos")
SPLIT = (5, 6)  # prefill 5 tokens (not a multiple of 3 or 4), then 1 + 1

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)


def impl_of(case, view):
    """The layer ``impl`` of a test view: ``"recurrent"`` (the per-token / scan view) or
    ``"parallel"`` (the matmul view: TTT's dual form, Titans' parallel form inside each TTT
    batch), or an explicit impl (e.g. ``"auto"``)."""
    cls, kw = CASES[case]
    if view not in ("recurrent", "parallel"):
        return view
    if cls is TitansMemory:
        return "recurrent" if view == "recurrent" else (
            "chunked" if kw.get("memory", "linear") == "linear" else "associative")
    return "primal" if view == "recurrent" else "dual"


def make(case, view, dtype=F64, param_dtype=F64, seed=0, **over):
    cls, kw = CASES[case]
    return cls(width=W, num_heads=H, impl=impl_of(case, view), dtype=dtype, param_dtype=param_dtype,
               rngs=nnx.Rngs(seed), **{**kw, **over})


def inputs(dtype=F64, t=T, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, t, W), dtype)


def on_jit(m, fn, *args):
    """``fn(m, *args)`` traced once under jit (eager op-by-op dispatch of scans is slow)."""
    gd, st = nnx.split(m)
    return jit(lambda st, *a: fn(nnx.merge(gd, st), *a))(st, *args)


def max_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, F64) - jnp.asarray(y, F64))))
               for x, y in zip(la, lb))


def assert_close(a, b, atol=TOL):
    """chex equivalence of every leaf (in float64; absolute tolerance ``atol``, rtol 0)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    chex.assert_trees_all_close([np.asarray(x, np.float64) for x in la], [np.asarray(y, np.float64) for y in lb],
                                rtol=0.0, atol=atol)


def cache_offsets(m, seed=2):
    """Random offsets making a non-trivial starting cache (added to ``init_cache`` inside
    the differentiated function, so the learned initial fast weights keep a gradient):
    random fast weights and buffers, a different partial mini-batch length per sequence
    (1 and 2) and a non-zero position."""
    c = m.init_cache(B)
    keys = iter(jax.random.split(jax.random.key(seed), len(c)))
    fc = {k: 0.5 * jax.random.normal(next(keys), v.shape, v.dtype) for k, v in c.items()
          if k not in INT_KEYS}
    if "buf_theta" in fc:  # Titans' θ is a (non-negative) learning rate
        fc["buf_theta"] = jnp.abs(fc["buf_theta"])
    ic = {"buf_len": jnp.array([1, 2], jnp.int32)}
    if "pos" in c:
        ic["pos"] = jnp.array([5, 2], jnp.int32)
    return fc, ic


@functools.lru_cache(maxsize=None)
def run(case, view):
    """One jitted function per (case, view): the call from a non-trivial cache with
    gradients w.r.t. parameters, input and the cache offsets; in parallel view (and in
    recurrent view for the slow sweep) also the full forward and the same sequence in
    pieces (5, 1, 1 tokens)."""
    m = make(case, view)
    gd, params = nnx.split(m)
    fc, ic = cache_offsets(m)

    def loss(params, x, fc):
        mm = nnx.merge(gd, params)
        c0 = mm.init_cache(B)
        y, c = mm(x, cache={**{k: c0[k] + v for k, v in fc.items()}, **ic})
        w = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        extra = sum(jnp.sum(jnp.sin(v)) for k, v in c.items() if k not in INT_KEYS)
        return jnp.sum(y * w) + extra, (y, c)

    @functools.partial(jit, static_argnums=3)
    def f(params, x, fc, pieces):
        (_, (y, c)), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, fc)
        out = dict(y=y, c=c, g=g)
        if pieces:
            mm = nnx.merge(gd, params)
            out["y_full"], out["c_full"] = mm(x)
            c2, ys, start = mm.init_cache(B), [], 0
            for stop in (*SPLIT, T):
                yp, c2 = mm(x[:, start:stop], cache=c2)
                ys.append(yp)
                start = stop
            out["y_pieces"], out["c_pieces"] = jnp.concatenate(ys, axis=1), c2
        return out

    return lambda pieces: f(params, inputs(), fc, pieces)


# default suite: TTT-Linear (with the shared-QK conv and the gate) and Titans (linear
# memory); plain TTT-Linear, TTT-MLP and the Titans MLP memory run in the slow sweep (the
# MLP variants' views are also compared in float32 below), to keep compile time low
# (the bias-free layers too: test_bias_free_* below check them against the float64 loop and
# decode against the full forward in the default suite)
DEFAULT = ["ttt_linear_qk_gate", "titans_linear"]
ALL = DEFAULT + [pytest.param(c, marks=pytest.mark.slow)
                 for c in ("ttt_linear", "ttt_mlp", "titans_mlp", "ttt_linear_nobias", "ttt_mlp_nobias")]


@pytest.mark.parametrize("case", ALL)
def test_recurrent_and_parallel_agree_f64(case):
    r0, r1 = run(case, "recurrent")(False), run(case, "parallel")(True)
    assert r0["y"].dtype == F64 and r0["y"].shape == (B, T, W)
    assert_close(r0["y"], r1["y"])
    assert_close(r0["c"], r1["c"])
    assert jax.tree.structure(r0["g"]) == jax.tree.structure(r1["g"])
    assert_close(r0["g"], r1["g"])
    # every gradient is non-trivial, except the buffered queries': they only produce the
    # outputs of tokens already emitted by the previous call, which are dropped
    for path, leaf in jax.tree_util.tree_leaves_with_path(r0["g"]):
        if "buf_q" not in str(path):
            assert float(jnp.max(jnp.abs(leaf))) > 0, path
    assert max_diff(r1["y"], r1["y_full"]) > 1e-6  # the starting cache matters


@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("view", ["parallel", pytest.param("recurrent", marks=pytest.mark.slow)])
def test_pieces_equal_full_forward(case, view):
    """Prefill 5 tokens, decode 1 + 1: outputs and final cache equal one call on 7 tokens."""
    r = run(case, view)(True)
    assert_close(r["y_pieces"], r["y_full"])
    assert_close(r["c_pieces"], r["c_full"])
    # 7 tokens leave a partial mini-batch / TTT batch in the cache
    P = CASES[case][1].get("mini_batch_size") or CASES[case][1]["batch_size"]
    assert np.all(np.asarray(r["c_full"]["buf_len"]) == T % P)


def test_ttt_linear_layer_is_projections_plus_rule_op():
    """The layer from an empty cache == projections, interleaved RoPE (position mod C),
    the lr gate, ``ttt_linear`` on the whole sequence, post LN, gate, o_proj (docs/rules/ttt.md)."""
    def check(m, x):
        C, K = m.mini_batch_size, m.conv_kernel
        y, _ = m(x)
        xq = x @ m.q_proj.kernel[...]
        xp = jnp.pad(xq, ((0, 0), (K - 1, 0), (0, 0)))

        def conv(w, b):
            return sum(w[j] * xp[:, j:j + T] for j in range(K)) + b

        q = conv(m.conv_q.kernel[...], m.conv_q_bias[...]).reshape(B, T, H, D)
        k = conv(m.conv_k.kernel[...], m.conv_k_bias[...]).reshape(B, T, H, D)
        v = (x @ m.v_proj.kernel[...]).reshape(B, T, H, D)
        pos = jnp.broadcast_to(jnp.arange(T) % C, (B, T))
        q, k = rope_interleaved(q, pos, base=m.rope_theta), rope_interleaved(k, pos, base=m.rope_theta)
        lr = ttt_lr(x, m.ttt_lr_weight[...], m.ttt_lr_bias[...], base_lr=m.base_lr, head_dim=D)
        o, _ = ttt_linear(q, k, v, lr, W=m.W1[...], b=m.b1[...], ln_scale=m.ttt_norm_weight[...],
                          ln_bias=m.ttt_norm_bias[...], mini_batch_size=C,
                          token_eta=default_token_eta(C, m.learnable_token_idx[...], dtype=F64))
        o = o.reshape(B, T, H * D)
        mu = o.mean(-1, keepdims=True)
        var = ((o - mu) ** 2).mean(-1, keepdims=True)
        o = (o - mu) / jnp.sqrt(var + 1e-6) * m.post_norm.scale[...] + m.post_norm.bias[...]
        o = gelu_tanh(x @ m.g_proj.kernel[...]) * o
        return y, o @ m.o_proj.kernel[...]

    y, ref = on_jit(make("ttt_linear_qk_gate", "parallel"), check, inputs())
    assert_close(y, ref)


@pytest.mark.parametrize("view", ["parallel", pytest.param("recurrent", marks=pytest.mark.slow)])
def test_bias_free_ttt_linear_layer_equals_float64_loop(view):
    """``fast_bias=False``, primal and dual form, from an empty cache == projections, RoPE,
    the lr gate, the float64 per-token loop of ``x + LN(x W)`` (``ttt_linear_loop`` with
    ``bias=False``), post LN, o_proj: outputs and gradients w.r.t. every parameter and x.
    T = 5: a full mini-batch of 3 and a partial one. (The primal form is also compared with
    the dual one in test_recurrent_and_parallel_agree_f64, with a non-empty cache.)"""
    from tttla_jax.reference.ttt import ttt_linear_loop
    m = make("ttt_linear_nobias", view, short_conv=0)
    assert m.b1 is None and "b1" not in m.init_cache(1)
    C, T = m.mini_batch_size, 5

    def reference(m, x):
        q, k, v = ((x @ p.kernel[...]).reshape(B, T, H, D) for p in (m.q_proj, m.k_proj, m.v_proj))
        pos = jnp.broadcast_to(jnp.arange(T) % C, (B, T))
        q, k = rope_interleaved(q, pos, base=m.rope_theta), rope_interleaved(k, pos, base=m.rope_theta)
        lr = ttt_lr(x, m.ttt_lr_weight[...], m.ttt_lr_bias[...], base_lr=m.base_lr, head_dim=D)
        o, (_, b_final) = ttt_linear_loop(
            q, k, v, lr, W=m.W1[...], b=jnp.zeros((H, D), F64), ln_scale=m.ttt_norm_weight[...],
            ln_bias=m.ttt_norm_bias[...], mini_batch_size=C, bias=False,
            token_eta=default_token_eta(C, m.learnable_token_idx[...], dtype=F64))
        o = o.reshape(B, T, H * D)
        mu = o.mean(-1, keepdims=True)
        var = ((o - mu) ** 2).mean(-1, keepdims=True)
        o = (o - mu) / jnp.sqrt(var + 1e-6) * m.post_norm.scale[...] + m.post_norm.bias[...]
        return o @ m.o_proj.kernel[...]

    gd, params = nnx.split(m)
    wts = jnp.cos(jnp.arange(B * T * W, dtype=F64)).reshape(B, T, W)
    assert "b1" not in {str(p[-1]) for p, _ in nnx.to_flat_state(params)}

    def grads(fn):
        def loss(params, x):
            y = fn(nnx.merge(gd, params), x)
            return jnp.sum(y * wts), y
        return jax.grad(loss, argnums=(0, 1), has_aux=True)

    (g, y), (g_ref, y_ref) = jit(lambda p, x: (grads(lambda mm, xx: mm(xx)[0])(p, x),
                                              grads(reference)(p, x)))(params, inputs(t=T))
    assert_close(y, y_ref)
    assert_close(g, g_ref)
    assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(g))


def test_bias_free_decode_equals_full_forward():
    """``fast_bias=False`` at mini-batch 1 (no write buffer, the recall configuration), with
    conv taps: prefill 5 tokens, decode 1 + 1 == one call on 7 tokens (outputs and final
    cache, which has no bias). A partial mini-batch in the cache: the slow sweep's
    test_pieces_equal_full_forward[ttt_linear_nobias]."""
    ms = [make("ttt_linear_nobias", "parallel", mini_batch_size=1)]
    graphs = [nnx.split(mm) for mm in ms]

    @jit
    def f(states, x):
        out = []
        for (gd, _), st in zip(graphs, states):
            mm = nnx.merge(gd, st)
            y_full, c_full = mm(x)
            c, ys, start = mm.init_cache(B), [], 0
            for stop in (*SPLIT, T):
                yp, c = mm(x[:, start:stop], cache=c)
                ys.append(yp)
                start = stop
            out.append((y_full, c_full, jnp.concatenate(ys, axis=1), c))
        return out

    for y_full, c_full, y_p, c_p in f([st for _, st in graphs], inputs()):
        assert "b1" not in c_full
        assert_close(y_p, y_full)
        assert_close(c_p, c_full)


def test_bias_free_state_is_deltanets():
    """At width 64 with conv taps 4 and mini-batch 1 (no write buffer), a bias-free
    TTT-Linear head carries DeltaNet's state: a 64 × 64 matrix and the q, k, v taps."""
    floats = lambda c: sum(int(v.size) for v in c.values() if jnp.issubdtype(v.dtype, jnp.floating))
    cache = lambda cls, **kw: jax.eval_shape(  # traced: no parameters are materialised
        lambda: cls(width=64, num_heads=1, short_conv=4, rngs=nnx.Rngs(0), **kw).init_cache(1))
    c_dn = cache(MIXERS["delta_net"])
    c_nb = cache(TTTLinear, mini_batch_size=1, fast_bias=False)
    c_b = cache(TTTLinear, mini_batch_size=1)
    assert floats(c_nb) == floats(c_dn) == 64 * 64 + 3 * 3 * 64
    assert floats(c_b) == floats(c_nb) + 64 and set(c_b) - set(c_nb) == {"b1"}


def test_rope_interleaved_matches_reference_permutation():
    """The reference permutes (pairs → halves), applies rotate-half RoPE, permutes back."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 2, 6))
    pos = np.arange(5)[None] % 3
    inv = 1.0 / 10000.0 ** (np.arange(0, 6, 2) / 6)
    ang = np.concatenate([pos[..., None] * inv] * 2, -1)[:, :, None]  # [1, T, 1, D]
    perm = x.reshape(1, 5, 2, 3, 2).swapaxes(-1, -2).reshape(x.shape)
    rot = np.concatenate([-perm[..., 3:], perm[..., :3]], -1)
    y = perm * np.cos(ang) + rot * np.sin(ang)
    y = y.reshape(1, 5, 2, 2, 3).swapaxes(-1, -2).reshape(x.shape)
    got = rope_interleaved(jnp.asarray(x), jnp.asarray(pos), base=10000.0)
    assert_close(got, y, atol=1e-12)


def test_ttt_mlp_and_titans_layers_equal_rule_ops():
    """Empty-cache layer == projections + the functional rule op on the whole sequence
    (``ttt_mlp``; ``titans`` with ``batch_size`` = the layer's TTT batch and the gates
    pooled over each chunk's tokens)."""
    def check_mlp(m, x):
        C = m.mini_batch_size
        q, k, v = ((x @ p.kernel[...]).reshape(B, T, H, D) for p in (m.q_proj, m.k_proj, m.v_proj))
        lr = ttt_lr(x, m.ttt_lr_weight[...], m.ttt_lr_bias[...], base_lr=m.base_lr, head_dim=D)
        o, _ = ttt_mlp(q, k, v, lr, W1=m.W1[...], b1=m.b1[...], W2=m.W2[...], b2=m.b2[...],
                       ln_scale=m.ttt_norm_weight[...], ln_bias=m.ttt_norm_bias[...],
                       mini_batch_size=C,
                       token_eta=default_token_eta(C, m.learnable_token_idx[...], dtype=F64))
        return m(x)[0], m.o_proj(m.post_norm(o.reshape(B, T, H * D)))

    def check_titans(t, x):
        c, P = t.chunk_size, t.batch_size
        q, k, v = ((x @ p.kernel[...]).reshape(B, T, H, D) for p in (t.q_proj, t.k_proj, t.v_proj))
        nrm = lambda a: a / jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + 1e-6)
        theta = t.max_lr * jax.nn.sigmoid(x @ t.theta_proj.kernel[...])
        N = -(-T // c)
        xpad = jnp.pad(x, ((0, 0), (0, N * c - T), (0, 0))).reshape(B, N, c, W)
        cnt = jnp.minimum(c, T - c * jnp.arange(N))[None, :, None]
        pooled = xpad.sum(2) / cnt  # mean over the tokens present
        gate = lambda p: jnp.moveaxis(jax.nn.sigmoid(pooled @ p.kernel[...]), 1, 2)
        o, _ = titans(nrm(q), nrm(k), v, theta, gate(t.eta_proj), gate(t.alpha_proj), W0=t.W0[...],
                      chunk_size=c, batch_size=P, impl="recurrent")
        return t(x)[0], t.o_proj(t.out_norm(o).reshape(B, T, H * D))

    x = inputs()
    y, ref = on_jit(make("ttt_mlp", "parallel", use_rope=False), check_mlp, x)
    assert_close(y, ref)
    # the trailing partial chunk (token 6) reads the memory after chunk 3, as in the rule
    y, ref = on_jit(make("titans_linear", "recurrent"), check_titans, x)
    assert_close(y, ref)


@pytest.mark.parametrize("case", ["ttt_linear_qk_gate", pytest.param("titans_mlp", marks=pytest.mark.slow)])
def test_jit_vmap_grad_checkpoint(case):
    m = make(case, "parallel")
    m2 = make(case, "parallel", seed=5)
    x = inputs()
    gd, params = nnx.split(m)

    def f(params, x):
        return nnx.merge(gd, params)(x)[0]

    def loss(params, x):
        y = f(params, x)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))

    params2 = nnx.state(m2)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, params2)

    @jit
    def g(stacked, params, params2, x):
        return (f(params, x), f(params2, x), jax.vmap(f, in_axes=(0, None))(stacked, x),
                jax.grad(loss)(params, x), jax.grad(jax.checkpoint(loss))(params, x))

    y, y2, yv, g_plain, g_remat = g(stacked, params, params2, x)
    assert_close(yv[0], y)
    assert_close(yv[1], y2)
    assert max_diff(y, y2) > 1e-3
    assert_close(g_plain, g_remat)


def test_parameter_counts_by_hand():
    C, K, HD, F = 4, 3, H * D, 2 * D
    n = lambda cls, **kw: count_params(nnx.eval_shape(lambda: cls(width=W, num_heads=H, rngs=nnx.Rngs(0), **kw)))
    common = 4 * W * HD + W * H + H + 2 * H * D + 2 * HD  # q k v o, lr gate, inner LN, post LN
    assert n(TTTLinear, mini_batch_size=C) == common + C + H * D * D + H * D
    assert n(TTTLinear, mini_batch_size=C, share_qk=True, conv_kernel=K, use_gate=True) == (
        common - W * HD + 2 * (K * HD + HD) + W * HD + C + H * D * D + H * D)
    assert n(TTTMLP, mini_batch_size=C, mlp_expansion=2) == common + C + H * (2 * D * F + F + D)
    assert n(TTTLinear, mini_batch_size=C, fast_bias=False) == common + C + H * D * D
    assert n(TTTMLP, mini_batch_size=C, mlp_expansion=2, fast_bias=False) == common + C + H * 2 * D * F
    tit = 4 * W * HD + 3 * W * H + D
    assert n(TitansMemory, chunk_size=2, batch_size=4) == tit + H * D * D
    assert n(TitansMemory, chunk_size=2, batch_size=4, memory="mlp", mlp_expansion=2) == tit + 2 * H * D * F


def test_partitioning_metadata():
    """Every parameter carries one logical axis name (or None) per dimension."""
    for mk in (lambda: TTTMLP(width=W, num_heads=H, mini_batch_size=4, share_qk=True, use_gate=True,
                              rngs=nnx.Rngs(0)),
               lambda: TitansMemory(width=W, num_heads=H, chunk_size=2, batch_size=4, memory="mlp",
                                    rngs=nnx.Rngs(0))):
        mod = nnx.eval_shape(mk)
        for path, var in nnx.to_flat_state(nnx.state(mod, nnx.Param)):
            axes = var.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == len(var.shape), (path, axes)


def test_float32_modes_agree_and_bf16_runs():
    """float32: recurrent and parallel agree to 1e-5 (summation order); bfloat16
    activations with float32 parameters give a bfloat16 output and float32 fast weights."""
    x = inputs(jnp.float32)
    for case in ("ttt_mlp", "titans_mlp"):
        ms = [make(case, view, dtype=jnp.float32, param_dtype=jnp.float32)
              for view in ("recurrent", "parallel")]
        mb = make(case, "parallel", dtype=jnp.bfloat16, param_dtype=jnp.float32)
        graphs = [nnx.split(mm) for mm in (*ms, mb)]

        @jit
        def f(states, x):
            return [nnx.merge(gd, st)(xx) for (gd, _), st, xx in
                    zip(graphs, states, (x, x, x.astype(jnp.bfloat16)))]

        (y0, _), (y1, _), (yb, cb) = f([st for _, st in graphs], x)
        assert y0.dtype == jnp.float32
        np.testing.assert_allclose(y0, y1, atol=1e-5, rtol=1e-5)
        assert yb.dtype == jnp.bfloat16
        assert cb["W1" if "W1" in cb else "memory_1"].dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(yb.astype(jnp.float32))))


def test_language_model_with_ttt_and_titans_mixers():
    """Registered mixers work in a hybrid LM; prefill + decode == full forward."""
    assert {"ttt_linear", "ttt_mlp", "titans"} <= set(MIXERS)
    cfg = LMConfig(vocab_size=11, width=W, num_layers=2, num_heads=H, mixers=("ttt_linear", "titans"),
                   mixer_options={"ttt_linear": {"mini_batch_size": 4, "init_std": 0.3, "impl": "dual"},
                                  "titans": {"chunk_size": 2, "batch_size": 4, "impl": "chunked"}},
                   dtype=F64, param_dtype=F64)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (B, 6), 0, 11)
    gd, st = nnx.split(model)

    @jit
    def f(st, tokens):
        mm = nnx.merge(gd, st)
        full, _ = mm(tokens)
        logits, cache = mm(tokens[:, :5])  # prefill 5 (not a multiple of 4), decode 1
        last, _ = mm(tokens[:, 5:], cache=cache)
        return full, jnp.concatenate([logits, last], axis=1)

    full, pieces = f(st, tokens)
    assert full.shape == (B, 6, 11)
    assert_close(full, pieces)


def test_errors():
    with pytest.raises(ValueError, match="impl"):
        TTTLinear(width=W, num_heads=H, impl="pallas", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl"):
        TitansMemory(width=W, num_heads=H, impl="pallas", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch_size"):
        TitansMemory(width=W, num_heads=H, chunk_size=4, batch_size=6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch_size"):
        TitansMemory(width=W, num_heads=H, batch_size=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head_dim"):
        TTTLinear(width=6, num_heads=2, rngs=nnx.Rngs(0))  # D = 3: RoPE needs an even head dim
    with pytest.raises(ValueError, match="mini_batch_size"):
        TTTMLP(width=W, num_heads=H, mini_batch_size=0, rngs=nnx.Rngs(0))
    m = TTTLinear(width=W, num_heads=H, mini_batch_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x: expected \[B, T, W\]"):
        m(jnp.zeros((1, 3, W + 1)))
    bad = m.init_cache(2)
    bad["buf_q"] = bad["buf_q"][:, :2]
    with pytest.raises(ValueError, match=r"cache\['buf_q'\]"):
        m(jnp.zeros((2, 3, W)), cache=bad)
    # fast_bias: a bool; a bias-free layer takes no bias in its cache and has no reference layout
    with pytest.raises(ValueError, match=r"fast_bias: expected True .* or False .*, got 'no'"):
        TTTLinear(width=W, num_heads=H, fast_bias="no", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"fast_bias: expected .* got 0"):
        TTTMLP(width=W, num_heads=H, fast_bias=0, rngs=nnx.Rngs(0))
    nb = TTTLinear(width=W, num_heads=H, mini_batch_size=4, fast_bias=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"cache: has fast-weight biases \['b1'\], but this layer has fast_bias=False"):
        nb(jnp.zeros((2, 3, W)), cache=m.init_cache(2))
    from tttla_jax.nn import export_reference_weights, load_reference_weights
    with pytest.raises(ValueError, match=r"fast_bias: the reference layout has fast-weight biases"):
        load_reference_weights(nb, export_reference_weights(m))
    with pytest.raises(ValueError, match=r"fast_bias: the reference layout"):
        export_reference_weights(nb)
