"""LaCTLayer (tttla_jax.nn.lact): the layer against an independent float64 re-derivation of
the reference forward, equivalence of the implementations (outputs and parameter gradients, float64 1e-10),
cache threading (any split == one call, T not a multiple of the chunk), transforms,
parameter counts, the LM hybrid, reference-weight round trip and configuration errors.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.nn import LanguageModel, LMConfig, MIXERS, count_params
from tttla_jax.nn.lact import LaCTLayer
from tttla_jax.nn.weights import export_reference_weights, load_reference_weights
from tttla_jax.reference.lact import lact_loop

F64 = jnp.float64
B, T, W, H, C = 1, 7, 8, 2, 3   # T not a multiple of C: two updating chunks + a partial one
TOL = 1e-10
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)


def build(ctor, seed=0):
    """Construct abstractly (no initialiser is compiled: eager random inits cost seconds per
    shape) and fill every parameter from numpy: kernels ``N(0, 1/fan_in)``, fast weights
    ``N(0, 1/d_in)``, scales ``1 + 0.3·N``, biases / offsets / embeddings ``0.3·N`` — all
    non-trivial, so every parameter's gradient is exercised."""
    m = nnx.eval_shape(ctor)
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(m):
        if isinstance(var, nnx.Param):
            sds = var.get_value()
            z, name = rng.normal(size=sds.shape), path[-1]
            if name == "kernel":
                val = z / np.sqrt(sds.shape[0])
            elif name in ("w0", "w1", "w2"):
                val = z / np.sqrt(sds.shape[-1])
            elif name in ("scale", "qk_scale"):
                val = 1 + 0.3 * z
            else:
                val = 0.3 * z
            var.set_value(jnp.asarray(val, sds.dtype))
    return m


def make(preset="v0", impl="auto", seed=0, dtype=F64, param_dtype=F64, **kw):
    kw = {"chunk_size": C, "width": W, "num_heads": H, **kw}
    return build(lambda: LaCTLayer(preset=preset, impl=impl, dtype=dtype, param_dtype=param_dtype,
                                   rngs=nnx.Rngs(0), **kw), seed)


def inputs(t=T, seed=1, width=W, b=B):
    return jax.random.normal(jax.random.key(seed), (b, t, width), F64)


def assert_close(a, b, atol=TOL, what=""):
    """chex: the same tree structure and shapes, and ``|a − b| <= atol`` leaf by leaf (in float64)."""
    chex.assert_trees_all_equal_shapes(a, b, custom_message=what)
    f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    chex.assert_trees_all_close(f64(a), f64(b), rtol=0.0, atol=atol, custom_message=what)


def max_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, F64) - jnp.asarray(y, F64)))) for x, y in zip(la, lb))


# --------------------------------------------------------------------------- reference forward


def _np_rope(x, pos, base):
    """Rotate-half RoPE on ``[B, T, h, d]`` at integer positions ``pos [T]``."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_forward(p, x, *, H, Ha, window, C, eps, muon, momentum, rope_base):
    """The PyTorch LaCTSWIGLULayer forward (post-norm, dot-product loss, lr_dim 1) written
    from its description, on numpy float64 and the float64 rule loop (tttla_jax.reference)."""
    x = np.asarray(x)
    sig = lambda a: 1 / (1 + np.exp(-a))
    silu = lambda a: a * sig(a)
    softplus = lambda a: np.log1p(np.exp(a))
    b, t, w = x.shape
    HD = p["qkv.weight"].shape[0] // 3
    D, Da = HD // H, HD // Ha
    qkv = x @ p["qkv.weight"].T
    q, k, v = qkv[..., :HD], qkv[..., HD:2 * HD], qkv[..., 2 * HD:]
    pos = np.arange(t)
    # attention branch: heads of Da, RoPE, causal window of `window` keys incl. itself
    qa = _np_rope(q.reshape(b, t, Ha, Da), pos, rope_base)
    ka = _np_rope(k.reshape(b, t, Ha, Da), pos, rope_base)
    va = v.reshape(b, t, Ha, Da)
    oa = np.zeros_like(qa)
    for i in range(t):
        lo = max(0, i - window + 1)
        s = np.einsum("bhd,bshd->bhs", qa[:, i], ka[:, lo:i + 1]) / np.sqrt(Da)
        e = np.exp(s - s.max(-1, keepdims=True))
        oa[:, i] = np.einsum("bhs,bshd->bhd", e / e.sum(-1, keepdims=True), va[:, lo:i + 1])
    # fast branch
    fq = q * p["qk_scale"][:, 0] + p["qk_offset"][:, 0]
    fk = k * p["qk_scale"][:, 1] + p["qk_offset"][:, 1]
    fq, fk, fv = (silu(a).reshape(b, t, H, D) for a in (fq, fk, v))
    l2 = lambda a: a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-5)
    fq, fk = l2(fq), l2(fk)
    fq = _np_rope(fq.reshape(b, t, Ha, Da), pos, rope_base).reshape(b, t, H, D)
    fk = _np_rope(fk.reshape(b, t, Ha, Da), pos, rope_base).reshape(b, t, H, D)
    lr = softplus(x @ p["lr_proj.weight"].T + p["lr_proj.bias"] + np.log(np.expm1(1e-3))).reshape(b, t, H, 3)
    m = sig(x @ p["momentum_proj.0.weight"].T + p["momentum_proj.0.bias"]) if momentum else None
    tile = lambda a: np.broadcast_to(a[None], (b,) + a.shape)
    loop = jit(functools.partial(lact_loop, chunk_size=C, muon=muon, weight_norm="post"))
    o, _ = loop(fq, fk, fv, (lr[..., 0], lr[..., 1], lr[..., 2]), w0=tile(p["w0"]), w1=tile(p["w1"]),
                w2=tile(p["w2"]), momentum=m)
    o = np.asarray(o)
    o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + eps) * p["ttt_norm.weight"]
    o = o * silu(x @ p["ttt_scale_proj.weight"].T + p["ttt_scale_proj.bias"])[..., None]
    return (o.reshape(b, t, HD) + oa.reshape(b, t, HD)) @ p["o_proj.weight"].T


def test_layer_matches_reference_forward_v0_hybrid():
    """V0 (all of W0/W1/W2, post weight norm, per-token lr, momentum, Muon) with the
    sliding-window branch and 4 attention heads against the reference forward."""
    m = make("v0", "recurrent", window=3, num_attn_heads=4, inter_multi=1.5)
    x = inputs()
    y, cache = jit(lambda x: m(x))(x)
    ref = reference_forward(export_reference_weights(m), x, H=H, Ha=4, window=3, C=C, eps=1e-5,
                            muon=True, momentum=True, rope_base=10000.0)
    assert_close(y, ref)
    # the two updates moved every fast weight by O(1) (Muon): the test is not degenerate
    for i in (0, 1, 2):
        assert max_diff(cache[f"w{i}"][0], getattr(m, f"w{i}")[...]) > 1e-2


# --------------------------------------------------------------------------- implementations


def _loss(gd):
    def loss(params, x):
        y, c = nnx.merge(gd, params)(x)
        wts = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        extra = sum(jnp.sum(jnp.sin(v)) for key, v in c.items() if key.startswith(("w", "mom")))
        return jnp.sum(y * wts) + extra, (y, c)
    return loss


@pytest.mark.parametrize("preset", ["v2", pytest.param("v3", marks=pytest.mark.slow),
                                    pytest.param("v4", marks=pytest.mark.slow),
                                    pytest.param("v5", marks=pytest.mark.slow), "v6"])
def test_recurrent_and_parallel_agree_f64(preset):
    """Outputs, final cache and gradients w.r.t. every parameter and the input (float64):
    the chunked layout (for V6 ``tt.linear_attention``'s) against the recurrent form."""
    mr, mp = make(preset, "recurrent"), make(preset, "chunked")
    gr, params = nnx.split(mr)
    gp, params_p = nnx.split(mp)
    chex.assert_trees_all_equal(params, params_p)

    @jit
    def f(params, x):
        outs = []
        for gd in (gr, gp):
            (_, (y, c)), g = jax.value_and_grad(_loss(gd), argnums=(0, 1), has_aux=True)(params, x)
            outs.append((y, c, g))
        return outs

    (y0, c0, g0), (y1, c1, g1) = f(params, inputs())
    assert_close(y0, y1, what="outputs")
    assert_close(c0, c1, what="caches")
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    assert_close(g0, g1)
    gp_ = g0[0]
    assert float(jnp.max(jnp.abs(gp_["w1"][...]))) > 0
    if "lr_proj" in gp_:
        assert float(jnp.max(jnp.abs(gp_["lr_proj"]["kernel"][...]))) > 0
    if "momentum_proj" in gp_:
        assert float(jnp.max(jnp.abs(gp_["momentum_proj"]["kernel"][...]))) > 0


def test_zero_tokens_have_finite_gradients_f64():
    """All-zero input rows (padding, a zero embedding) make q, k and a whole chunk's
    fast-weight gradient zero: every norm there (the q/k L2 norm, Muon's ``G / ‖G‖``, the
    weight norm) has a zero-norm point. Gradients stay finite (the reference's autograd gives
    a norm of zeros the derivative 0), and the recurrent form (hand-written backward) agrees
    with the chunked layout (autodiff) at 1e-10."""
    x = inputs().at[:, :C + 1].set(0.0)              # the first chunk and one more token zero
    grads = []
    for impl in ("recurrent", "chunked"):
        gd, params = nnx.split(make("v2", impl, short_conv=2))
        g = jit(jax.grad(lambda p, x: _loss(gd)(p, x)[0], argnums=(0, 1)))(params, x)
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g)), impl
        grads.append(g)
    assert float(jnp.max(jnp.abs(grads[0][1][:, :C + 1]))) > 0   # the zero tokens do get gradients
    assert_close(grads[0], grads[1], what="zero-token gradients")
    gd, params = nnx.split(make("v0", "recurrent"))                  # Muon on (v0)
    g = jit(jax.grad(lambda p, x: _loss(gd)(p, x)[0], argnums=(0, 1)))(params, x)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))


@pytest.mark.parametrize("preset", ["v0", "v1", "ascent", "q_is_k", "inner_steps"])
def test_parallel_impls_refused_for_non_associative_presets(preset):
    why = {"v0": "update='all'", "v1": "weight_norm='post'", "ascent": "update='all'",
           "q_is_k": "update='all'", "inner_steps": "update='all'"}[preset]
    for impl in ("chunked", "associative"):
        with pytest.raises(ValueError, match=rf"LaCTLayer\(preset='{preset}'\): impl='{impl}' cannot run "
                                             rf"this call: no parallel form: {why}"):
            make(preset, impl)
    assert make(preset, "auto").resolved_impl == "recurrent"


def test_inner_steps_anomaly_without_weight_norm_names_inner_steps():
    with pytest.raises(ValueError, match=r"no parallel form: inner_steps=2"):
        make("v2", "chunked", inner_steps=2)


def test_auto_resolution_follows_the_rule():
    """auto: V6 is plain linear attention (chunked tt.linear_attention on CPU), V2 the rule's
    chunked layout, V0 the recurrent form; an explicit associative layout runs too."""
    assert [make(p).resolved_impl for p in ("v0", "v2", "v6")] == ["recurrent", "chunked", "chunked"]
    m = make("v6")
    assert m.rule.linear_attention_reason() is None and make("v2").rule.linear_attention_reason() is not None
    ms = [make("v2", "recurrent"), make("v2", "associative"), make("v6", "recurrent"), make("v6", "associative")]
    gds = [nnx.split(mm) for mm in ms]
    x = inputs()
    ys = jit(lambda sts, x: [nnx.merge(gd, st)(x) for (gd, _), st in zip(gds, sts)])([st for _, st in gds], x)
    assert_close(ys[1], ys[0], TOL, "v2 associative vs recurrent")
    assert_close(ys[3], ys[2], TOL, "v6 associative (tt.linear_attention) vs recurrent")


@pytest.mark.parametrize("grads", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pallas_mode_v6_matches_recurrent(grads):
    """V6 routes to tt.linear_attention(masking="chunk", impl="pallas") (interpret mode on
    CPU, float64): same outputs and cache (and parameter gradients) as the rule's scan."""
    kw = dict(width=32, num_heads=2, chunk_size=16)
    mr, mk = make("v6", "recurrent", **kw), make("v6", "pallas", **kw)
    assert mk.resolved_impl == "pallas"
    gr, params = nnx.split(mr)
    gk, _ = nnx.split(mk)

    @jit
    def f(params, x):
        if grads:
            return [jax.value_and_grad(_loss(gd), has_aux=True)(params, x) for gd in (gr, gk)]
        return [((None, nnx.merge(gd, params)(x)), None) for gd in (gr, gk)]

    ((_, (y0, c0)), g0), ((_, (y1, c1)), g1) = f(params, inputs(t=20, width=32))
    assert_close(y0, y1, what="outputs")
    assert_close(c0, c1, what="caches")
    if grads:
        assert_close(g0, g1)


# --------------------------------------------------------------------------- cache threading

PIECE_CASES = {
    # preset, impl, extra layer options
    "v0_hybrid_qknorm": ("v0", "recurrent", dict(window=3, attn_qk_norm=True)),
    "v2_parallel": ("v2", "chunked", {}),
    "v2_parallel_grads": ("v2", "chunked", {}),
    "v6_linear_attention": ("v6", "auto", {}),
    "inner_steps_prenorm": ("inner_steps", "recurrent", dict(weight_norm="pre", chunk_size=2)),
}
SLOW_PIECES = ("v2_parallel_grads", "inner_steps_prenorm")
SPLITS = (4, 5)   # pieces of 4, 1, 6 tokens (T = 11, C = 4): a full buffer, a decode step that
                  # triggers its update, a piece that completes a chunk and crosses into the next


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_PIECES else c
                                  for c in PIECE_CASES])
def test_pieces_equal_full_forward(case):
    """Any split of the sequence threaded through the cache (starting from an explicit
    init_cache) == one call without a cache: outputs and final cache; with "_grads" also
    the parameter gradients through the threaded cache."""
    preset, impl, kw = PIECE_CASES[case]
    kw = dict(kw)
    m = make(preset, impl, chunk_size=kw.pop("chunk_size", 4), **kw)
    gd, params = nnx.split(m)
    t = 11

    def pieces(params, x):
        mm = nnx.merge(gd, params)
        c, ys, start = mm.init_cache(B), [], 0
        for stop in (*SPLITS, t):
            y, c = mm(x[:, start:stop], cache=c)
            ys.append(y)
            start = stop
        return jnp.concatenate(ys, axis=1), c

    def full(params, x):
        return nnx.merge(gd, params)(x)

    def scalar(fn):
        def loss(params, x):
            y, c = fn(params, x)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=F64)).reshape(y.shape))
        return loss

    with_grad = case.endswith("_grads")

    @jit
    def f(params, x):
        out = dict(full=full(params, x), pieces=pieces(params, x))
        if with_grad:
            out["g_full"] = jax.grad(scalar(full))(params, x)
            out["g_pieces"] = jax.grad(scalar(pieces))(params, x)
        return out

    r = f(params, inputs(t=t))
    (yf, cf), (yp, cp) = r["full"], r["pieces"]
    assert_close(yp, yf, what="outputs")
    assert_close(cp, cf, what="caches")
    C_ = m.chunk_size
    assert int(cf["buf_len"][0]) == t - ((t - 1) // C_) * C_
    if with_grad:
        assert_close(r["g_pieces"], r["g_full"])


# --------------------------------------------------------------------------- transforms


def test_jit_vmap_grad_checkpoint():
    m, m2 = make("v2", "chunked"), make("v2", "chunked", seed=5)
    gd, params = nnx.split(m)
    x = inputs()
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, nnx.state(m2))
    loss = lambda p, x: _loss(gd)(p, x)[0]

    @jit
    def g(stacked, params, x):
        yv, _ = jax.vmap(lambda p: nnx.merge(gd, p)(x))(stacked)
        (_, (y, _)), g_plain = jax.value_and_grad(_loss(gd), has_aux=True)(params, x)
        return yv, y, g_plain, jax.grad(jax.checkpoint(loss))(params, x)

    yv, y, g_plain, g_remat = g(stacked, params, x)
    assert_close(yv[0], y)           # vmap over models == the plain call of model 0
    assert max_diff(yv[1], y) > 1e-3          # and the second model really differs
    assert_close(g_plain, g_remat)


def test_float32_and_bfloat16():
    """float32 parameters: the parallel and recurrent forms agree to 1e-5 (summation
    order); bfloat16 activations give a bfloat16 output and float32 fast weights."""
    x = inputs().astype(jnp.float32)
    mk = lambda impl, dt: make("v2", impl, dtype=dt, param_dtype=jnp.float32)
    ms = [mk("recurrent", jnp.float32), mk("chunked", jnp.float32), mk("chunked", jnp.bfloat16)]
    graphs = [nnx.split(mm) for mm in ms]

    @jit
    def f(states, x):
        return [nnx.merge(gd, st)(xx) for (gd, _), st, xx in zip(graphs, states, (x, x, x.astype(jnp.bfloat16)))]

    (y0, _), (y1, _), (yb, cb) = f([st for _, st in graphs], x)
    assert y0.dtype == jnp.float32
    chex.assert_trees_all_close(y0, y1, atol=1e-5, rtol=1e-5)
    assert yb.dtype == jnp.bfloat16 and cb["w1"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(yb.astype(jnp.float32))))


# --------------------------------------------------------------------------- counts, sharding


def test_parameter_counts_by_hand():
    D, dh, Wd, Hh = 4, 6, 8, 3      # explicit head dim: HD = 12 != W
    HD = Hh * D
    base = dict(width=Wd, num_heads=Hh, head_dim=D)

    def LaCTLayer(**kw):  # abstract construction: shapes only, nothing allocated or compiled
        from tttla_jax.nn.lact import LaCTLayer as L
        return nnx.eval_shape(lambda: L(**kw, rngs=nnx.Rngs(0)))
    common = 3 * Wd * HD + 4 * HD + D + HD * Wd + Hh * (Wd + 1)      # qkv, qk scale/offset, ttt_norm, o_proj, gate
    swiglu = 3 * Hh * dh * D
    lr = 3 * Hh * (Wd + 1)
    mom = Hh * (Wd + 1)
    assert count_params(LaCTLayer(preset="v0", inter_multi=1.5, **base)) == common + swiglu + lr + mom
    assert count_params(LaCTLayer(preset="v2", inter_multi=1.5, window=4, num_attn_heads=2, **base)) == (
        common + swiglu + lr + mom)   # the attention branch has no parameters of its own
    assert count_params(LaCTLayer(preset="v3", **base)) == common + Hh * D * D + lr + mom
    assert count_params(LaCTLayer(preset="v4", **base)) == common + Hh * D * D + mom
    assert count_params(LaCTLayer(preset="v5", **base)) == common + Hh * D * D
    assert count_params(LaCTLayer(preset="v6", output_gate=False, attn_qk_norm=True, qkv_bias=True, **base)) == (
        common - Hh * (Wd + 1) + Hh * D * D + 2 * HD + 3 * HD)


def test_parameters_carry_logical_sharding():
    m = nnx.eval_shape(lambda: LaCTLayer(width=W, num_heads=H, attn_qk_norm=True, rngs=nnx.Rngs(0)))
    assert m.qkv.kernel.out_sharding == ("embed", "heads")
    assert m.o_proj.kernel.out_sharding == ("heads", "embed")
    assert m.w0.out_sharding == ("heads", None, None) and m.w1.out_sharding == ("heads", None, None)
    assert m.qk_scale.out_sharding == ("heads", None)
    assert m.lr_proj.kernel.out_sharding == ("embed", "heads") and m.lr_proj.bias.out_sharding == ("heads",)
    assert m.ttt_norm.scale.out_sharding == ("head_dim",)
    assert m.q_norm.scale.out_sharding == ("heads",)


# --------------------------------------------------------------------------- model


def test_language_model_hybrid_forward_and_decode():
    """LMConfig(mixers=("lact", "swa")): a full forward equals prefill + token-by-token
    decoding (logits), through LMConfig's mixer options."""
    cfg = LMConfig(vocab_size=11, width=W, num_layers=2, num_heads=H, mixers=("lact", "swa"),
                   mixer_options={"lact": {"chunk_size": 3, "preset": "v2", "window": 2}, "swa": {"window": 4}},
                   dtype=F64, param_dtype=F64)
    model = build(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    gd, st = nnx.split(model)
    toks = jax.random.randint(jax.random.key(0), (2, 8), 0, 11)

    @jit
    def f(st, toks):
        mm = nnx.merge(gd, st)
        return mm(toks)[0], mm(toks[:, :4])

    step = jit(lambda st, tok, cache: nnx.merge(gd, st)(tok, cache=cache))  # compiled once
    full, (logits, cache) = f(st, toks)
    outs = [logits]
    for i in range(4, 8):
        lg, cache = step(st, toks[:, i:i + 1], cache)
        outs.append(lg)
    stepped = jnp.concatenate(outs, axis=1)
    assert full.shape == (2, 8, 11)
    assert_close(full, stepped)
    assert "lact" in MIXERS and isinstance(model.blocks[0].mixer, LaCTLayer)


# --------------------------------------------------------------------------- reference weights


def test_reference_weights_round_trip_and_errors():
    src = make("v0", window=3, attn_qk_norm=True, qkv_bias=True)
    arrays = export_reference_weights(src)
    assert set(arrays) == {"qkv.weight", "qkv.bias", "q_norm.weight", "k_norm.weight", "o_proj.weight",
                           "w0", "w1", "w2", "lr_proj.weight", "lr_proj.bias", "qk_scale", "qk_offset",
                           "ttt_scale_proj.weight", "ttt_scale_proj.bias", "ttt_norm.weight",
                           "momentum_proj.0.weight", "momentum_proj.0.bias"}
    HD = H * (W // H)
    assert arrays["qkv.weight"].shape == (3 * HD, W)       # torch Linear layout [out, in]
    assert arrays["lr_proj.weight"].shape == (3 * H, W)
    assert arrays["w1"].shape == (H, W // H, W // H)
    dst = make("v0", seed=7, window=3, attn_qk_norm=True, qkv_bias=True)
    load_reference_weights(dst, arrays)
    chex.assert_trees_all_equal(nnx.state(dst, nnx.Param), nnx.state(src, nnx.Param))
    bad = dict(arrays, w0=np.zeros((H, 3, 3)), **{"qkv.weight": np.zeros((5, W))})
    with pytest.raises(ValueError, match=r"2 problem\(s\)") as err:
        load_reference_weights(dst, bad)
    assert "'qkv.weight': got (5, 8), expected (24, 8)" in str(err.value)
    assert "'w0': got (2, 3, 3), expected (2, 4, 4)" in str(err.value)
    # the linear presets have no w0 / w2, constant-lr presets no lr_proj
    assert not {"w0", "w2", "lr_proj.weight", "momentum_proj.0.weight"} & set(make("v6").reference_weight_map())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(preset="v7"), r"preset: got 'v7', expected one of \('v0', .*'inner_steps'\)"),
    (dict(impl="fast"), r"impl: got 'fast', expected one of"),
    (dict(impl="dual"), r"impl: LaCTLayer does not support impl='dual'"),
    (dict(preset="v0", impl="pallas"), r"impl='pallas' cannot run this call: the Pallas kernel computes linear "
                                       r"attention and preset='v0' is not plain chunk-masked linear attention.*"
                                       r"fast_net='swiglu'.*muon=True"),
    (dict(preset="v6", impl="pallas"), r"impl='pallas' cannot run this call: head dim K = 4"),
    (dict(chunk_size=0), r"chunk_size: expected a positive int"),
    (dict(num_heads=3), r"num_heads: must divide width"),
    (dict(num_attn_heads=3), r"num_attn_heads: must divide num_heads \* head_dim = 8, got 3"),
    (dict(num_attn_heads=8), r"num_attn_heads: RoPE needs an even head dim, got 8 / 8 = 1"),
    (dict(window=0), r"window: expected a positive int"),
    (dict(base_lr=0.0), r"base_lr: expected a positive float, got 0.0"),
    (dict(inter_multi=0.1), r"inter_multi: expected a positive number"),
    (dict(weight_norm="mid"), r"weight_norm: got 'mid', expected one of"),
    (dict(muon="yes"), r"muon: expected True, False or None"),
])
def test_bad_config_raises(kwargs, match):
    base = dict(width=W, num_heads=H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        LaCTLayer(**{**base, **kwargs})


def test_numpy_scalars_accepted_in_config():
    m = nnx.eval_shape(lambda: LaCTLayer(width=W, num_heads=H, chunk_size=np.int64(4), base_lr=np.float32(1e-3),
                                         inter_multi=np.float64(1.5), inner_steps=np.int32(2), rngs=nnx.Rngs(0)))
    assert m.rule.chunk_size == 4 and type(m.rule.chunk_size) is int and m.rule.inner_steps == 2
    assert m.fast_hidden == int((W // H) * 1.5) and isinstance(m.base_lr, float)


def test_bad_call_inputs_and_config_errors():
    m = make("v2", "chunked")
    with pytest.raises(ValueError, match=r"x: expected \[B, T, W\] with W = 8"):
        m(jnp.zeros((B, T, 5), F64))
    c = m.init_cache(B)
    with pytest.raises(ValueError, match=r"cache: missing keys \['buf_k'\]"):
        m(inputs(), cache={k: v for k, v in c.items() if k != "buf_k"})
    with pytest.raises(ValueError, match=r"cache\['w1'\]: expected shape \[B, H, rows, cols\] = \(1, 2, 4, 4\)"):
        m(inputs(), cache={**c, "w1": jnp.zeros((B, H, 4, 5))})
    with pytest.raises(ValueError, match=r"LMConfig: mixer 'lact': LaCTLayer\(preset='v0'\): impl='chunked' cannot "
                                         r"run this call: no parallel form"):
        LMConfig(vocab_size=8, width=W, num_layers=1, num_heads=H, mixers="lact", impl="chunked")
