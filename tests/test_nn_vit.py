"""ViT³ mixer and classifier (tttla_jax.nn.vit): impl equivalence, the reference block,
transforms, parameter counts, config and input errors.

float64 checks at 1e-10; float32 recurrent-vs-parallel agreement at the documented
tolerance FP32_TOL (measured ~1e-7 relative: the two forms sum in different orders).
Parameters are re-drawn at a large scale (std 0.5 instead of the initialiser's 0.02) so
the inner step, the gradient normalisation and the gate all change the outputs a lot.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.nn.model import count_params
from tttla_jax.nn.vit import ViT3Block, ViTClassifier, ViTConfig, patchify
from tttla_jax.nn.weights import export_reference_weights, load_reference_weights

F64 = jnp.float64
TOL = 1e-10
FP32_TOL = 2e-5
B, W, H, GRID = 2, 8, 2, (3, 4)
N = GRID[0] * GRID[1]

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)


def build(ctor, seed=0, std=0.5):
    """``ctor()`` built abstractly (``nnx.eval_shape``: nothing allocated or compiled), with
    every parameter drawn from numpy: ~ N(0, std²), norm scales ~ 1 + N(0, 0.1²)."""
    gd, state = nnx.split(nnx.eval_shape(ctor))
    flat, tree = jax.tree_util.tree_flatten_with_path(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray((1.0 + 0.1 * rng.normal(size=l.shape)) if "scale" in jax.tree_util.keystr(p)
                          else std * rng.normal(size=l.shape), l.dtype) for p, l in flat]
    return nnx.merge(gd, jax.tree.unflatten(tree, leaves))


def graph(ctor):
    """The graphdef of ``ctor()`` (abstract build): merge it with another module's state to
    run the same parameters in another impl."""
    return nnx.split(nnx.eval_shape(ctor))[0]


def block(impl, dtype=F64, seed=0, **kw):
    return build(lambda: ViT3Block(width=W, num_heads=H, grid=GRID, impl=impl, dtype=dtype,
                                   param_dtype=dtype, rngs=nnx.Rngs(seed), **kw), seed)


def tiny_config(impl="auto", dtype=F64, **kw):
    base = dict(image_size=(6, 8), patch_size=2, in_channels=2, num_classes=5, width=W,
                num_layers=1, num_heads=H, mlp_hidden=12, impl=impl, dtype=dtype, param_dtype=dtype)
    return ViTConfig(**{**base, **kw})


def classifier(impl, dtype=F64, seed=0, **kw):
    cfg = tiny_config(impl, dtype, **kw)
    return build(lambda: ViTClassifier(cfg, rngs=nnx.Rngs(seed)), seed)


def normal(shape, dtype=F64, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def images(dtype=F64, seed=1):
    return normal((B, 6, 8, 2), dtype, seed)


def tokens(dtype=F64, seed=1):
    return normal((B, N, W), dtype, seed)


def max_diff(a, b):
    """Largest absolute difference over all leaves (numpy: no per-shape compilations)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(la, lb))


def assert_close(a, b, atol=TOL):
    """chex equivalence of every leaf (in float64; absolute tolerance ``atol``, rtol 0)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    chex.assert_trees_all_close([np.asarray(x, np.float64) for x in la], [np.asarray(y, np.float64) for y in lb],
                                rtol=0.0, atol=atol)


def weighted_sum(y):
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))


# ----------------------------------------------------------------------------- equivalence


def _with(m, **fields):
    """A copy of module ``m`` (same parameters) with some static fields changed."""
    gd, st = nnx.split(m)
    m2 = nnx.merge(gd, st)
    for k, v in fields.items():
        setattr(m2, k, v)
    return m2


@pytest.fixture(scope="module")
def block_run():
    """One compilation for every block-level check (see the tests below)."""
    m_rec, m32 = block("recurrent"), block("recurrent", dtype=jnp.float32)
    mk = lambda impl, dtype=F64: graph(lambda: ViT3Block(width=W, num_heads=H, grid=GRID, impl=impl,
                                                         dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    p64, p32 = nnx.state(m_rec), nnx.state(m32)
    frozen = _with(m_rec, inner_lr=1e-300)  # effectively no inner step
    graphs = dict(rec=(mk("recurrent"), p64), par=(mk("chunked"), p64), auto=(mk("auto"), p64),
                  f32_rec=(mk("recurrent", jnp.float32), p32), f32_par=(mk("chunked", jnp.float32), p32),
                  frozen=nnx.split(frozen))
    mods = dict(rec=m_rec)
    x, x8 = tokens(), normal((1, 8, W), seed=2)

    @jit
    def f(states, x, x8):
        out = {}
        for name in ("rec", "par"):
            gd = graphs[name][0]

            def loss(st, x):
                y, s = nnx.merge(gd, st)(x, output_final_state=True)
                return weighted_sum(y) + sum(jnp.sum(jnp.sin(v)) for v in s.values()), (y, s)

            (_, (y, s)), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(states[name], x)
            out[name] = (y, s, g)
        call = lambda name, x, **kw: nnx.merge(graphs[name][0], states[name])(x, **kw)[0]
        out["auto"] = call("auto", x)
        out["frozen"] = call("frozen", x)
        out["f32_rec"] = call("f32_rec", x.astype(jnp.float32))
        out["f32_par"] = call("f32_par", x.astype(jnp.float32))
        out["grid_rec"] = call("rec", x8, grid=(2, 4))
        out["grid_par"] = call("par", x8, grid=(2, 4))
        return out

    return mods, f({k: st for k, (_, st) in graphs.items()}, x, x8)


def test_block_recurrent_and_parallel_agree_f64(block_run):
    """Outputs, per-image fast weights and gradients w.r.t. every parameter and the input."""
    mods, r = block_run
    (y0, s0, g0), (y1, s1, g1) = r["rec"], r["par"]
    assert y0.shape == (B, N, W) and y0.dtype == F64
    assert {k: v.shape for k, v in s0.items()} == {"W1": (B, H, 4, 4), "W2": (B, H, 4, 4), "W3": (B, 3, 3, 4)}
    assert_close(y0, y1)
    assert_close(s0, s1)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    assert_close(g0, g1)
    assert all(np.max(np.abs(np.asarray(l))) > 0 for l in jax.tree.leaves(g0))
    assert max_diff(r["auto"], y0) == 0.0  # auto runs the gradient step
    # the inner step matters: the fast weights moved, and without it the output differs
    assert max_diff(s0["W1"], np.broadcast_to(mods["rec"].w1[...], s0["W1"].shape)) > 1e-2
    assert max_diff(s0["W3"], np.broadcast_to(mods["rec"].w3[...], s0["W3"].shape)) > 1e-2
    assert max_diff(y0, r["frozen"]) > 1e-2


def test_block_other_grid_at_call_time(block_run):
    """A call may pass another grid (another image size); both impls still agree."""
    _, r = block_run
    assert r["grid_rec"].shape == (1, 8, W)
    assert_close(r["grid_rec"], r["grid_par"])


def test_float32_modes_agree(block_run):
    """float32: the two forms agree to FP32_TOL (relative to the output scale)."""
    _, r = block_run
    y0, y1 = r["f32_rec"], r["f32_par"]
    assert y0.dtype == jnp.float32
    assert max_diff(y0, y1) <= FP32_TOL * float(np.max(np.abs(np.asarray(y0))))


@pytest.fixture(scope="module")
def classifier_run():
    """One compilation: both impls' logits and gradients (same parameters), vmap over two
    models, jax.checkpoint around the loss and the remat=True configuration (the transform
    checks use the recurrent impl: its gradient compiles fastest)."""
    m, m2 = classifier("recurrent"), classifier("recurrent", seed=7)
    cg = lambda impl, **kw: graph(lambda: ViTClassifier(tiny_config(impl, **kw), rngs=nnx.Rngs(0)))
    gds = dict(rec=nnx.split(m)[0], par=cg("chunked"), remat=cg("recurrent", remat=True))
    p, p2 = nnx.state(m), nnx.state(m2)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), p, p2)
    x = images()

    @jit
    def f(p, p2, stacked, x):
        fwd = lambda gd: (lambda p, x: nnx.merge(gd, p)(x))
        loss = lambda gd: (lambda p, x: weighted_sum(fwd(gd)(p, x)))
        vg = lambda gd: jax.value_and_grad(loss(gd), argnums=(0, 1))
        (l_rec, g_rec), (l_par, g_par) = vg(gds["rec"])(p, x), vg(gds["par"])(p, x)
        return dict(
            y_rec=fwd(gds["rec"])(p, x), y_par=fwd(gds["par"])(p, x), y2=fwd(gds["rec"])(p2, x),
            l_rec=l_rec, l_par=l_par, g_rec=g_rec, g_par=g_par,
            g_ckpt=jax.grad(jax.checkpoint(loss(gds["rec"])), argnums=(0, 1))(p, x),
            g_remat=jax.grad(loss(gds["remat"]), argnums=(0, 1))(p, x),
            y_vmap=jax.vmap(fwd(gds["rec"]), in_axes=(0, None))(stacked, x))

    return f(p, p2, stacked, x)


def test_classifier_recurrent_and_parallel_agree_f64(classifier_run):
    r = classifier_run
    assert r["y_rec"].shape == (B, 5) and r["y_rec"].dtype == F64
    assert_close(r["y_rec"], r["y_par"])
    assert abs(float(r["l_rec"] - r["l_par"])) < TOL
    assert_close(r["g_rec"], r["g_par"])
    assert all(np.max(np.abs(np.asarray(l))) > 0 for l in jax.tree.leaves(r["g_rec"]))


def test_classifier_jit_vmap_grad_checkpoint(classifier_run):
    r = classifier_run
    assert_close(r["y_vmap"][0], r["y_rec"])
    assert_close(r["y_vmap"][1], r["y2"])
    assert max_diff(r["y_rec"], r["y2"]) > 1e-3  # the two models really differ
    assert_close(r["g_rec"], r["g_ckpt"])
    assert_close(r["g_rec"], r["g_remat"])


# ----------------------------------------------------------------------------- the reference


def _silu(z):
    return z / (1 + np.exp(-z))


def reference_block_numpy(x, w, num_heads, grid, s=9 ** -0.5):
    """The ViT³ reference ``TTT`` block transcribed into float64 numpy loops, in the
    reference's own layouts (``[out, in]`` linears, ``[1, H, D, D]``, ``[D, 1, 3, 3]``)."""
    x = np.asarray(x, np.float64)
    Bx, Nx, C = x.shape
    D = C // num_heads
    Hg, Wg = grid
    z = x @ w["qkv.weight"].T + w["qkv.bias"]
    q1, k1, v1 = (z[..., i * C:(i + 1) * C].reshape(Bx, Nx, num_heads, D) for i in range(3))
    q2, k2, v2 = (z[..., 3 * C + i * D:3 * C + (i + 1) * D] for i in range(3))
    o1 = np.zeros((Bx, Nx, num_heads, D))
    for b in range(Bx):
        for h in range(num_heads):
            k, v, q = k1[b, :, h], v1[b, :, h], q1[b, :, h]
            W1, W2 = w["w1"][0, h], w["w2"][0, h]
            za, zb = k @ W1, k @ W2
            sig = 1 / (1 + np.exp(-zb))
            e = -v / Nx * s
            g1 = k.T @ (e * _silu(zb))
            g2 = k.T @ (e * za * sig * (1 + zb * (1 - sig)))
            g1 = g1 / (np.linalg.norm(g1, axis=0, keepdims=True) + 1)
            g2 = g2 / (np.linalg.norm(g2, axis=0, keepdims=True) + 1)
            W1n, W2n = W1 - g1, W2 - g2
            o1[b, :, h] = (q @ W1n) * _silu(q @ W2n)
    o2 = np.zeros((Bx, Nx, D))
    for b in range(Bx):
        for c in range(D):
            kg = np.pad(k2[b, :, c].reshape(Hg, Wg), 1)
            qg = np.pad(q2[b, :, c].reshape(Hg, Wg), 1)
            e = -v2[b, :, c].reshape(Hg, Wg) / Nx * s
            g = np.array([[np.sum(kg[a:a + Hg, d:d + Wg] * e) for d in range(3)] for a in range(3)])
            g = g / (np.linalg.norm(g) + 1)
            K = w["w3"][c, 0] - g
            out = sum(K[a, d] * qg[a:a + Hg, d:d + Wg] for a in range(3) for d in range(3))
            o2[b, :, c] = out.reshape(-1)
    cat = np.concatenate([o1.reshape(Bx, Nx, C), o2], axis=-1)
    return cat @ w["proj.weight"].T + w["proj.bias"]


def test_block_matches_reference_transcription():
    """Weights exported in the reference layout, run through a float64 numpy transcription
    of the reference forward, give the layer's output in both impls (a non-square grid, so
    any row/column mix-up shows)."""
    m = block("recurrent", seed=3)
    x = tokens(seed=4)
    w = export_reference_weights(m)
    assert sorted(w) == ["proj.bias", "proj.weight", "qkv.bias", "qkv.weight", "w1", "w2", "w3"]
    assert w["w1"].shape == (1, H, 4, 4) and w["w3"].shape == (4, 1, 3, 3)
    assert w["qkv.weight"].shape == (3 * W + 3 * 4, W) and w["proj.weight"].shape == (W, W + 4)
    gds = [graph(lambda: ViT3Block(width=W, num_heads=H, grid=GRID, impl=impl, dtype=F64,
                                   param_dtype=F64, rngs=nnx.Rngs(0))) for impl in ("recurrent", "chunked")]
    ys = jit(lambda st, x: [nnx.merge(gd, st)(x)[0] for gd in gds])(nnx.state(m), x)
    ref = reference_block_numpy(x, w, H, GRID)
    for y in ys:
        assert_close(y, ref)


def test_reference_weights_round_trip_and_errors():
    src, dst = block("auto", seed=1), block("auto", seed=2)
    w = export_reference_weights(src)
    load_reference_weights(dst, w)
    assert max_diff(nnx.state(dst, nnx.Param), nnx.state(src, nnx.Param)) == 0.0
    bad = dict(w, w3=np.zeros((4, 3, 3)), extra=np.zeros(1))
    del bad["proj.bias"]
    with pytest.raises(ValueError) as e:
        load_reference_weights(dst, bad)
    msg = str(e.value)
    assert "'extra'" in msg and "'proj.bias'" in msg and "shape mismatch for 'w3'" in msg
    nb = build(lambda: ViT3Block(width=W, num_heads=H, grid=GRID, qkv_bias=False, proj_bias=False,
                                 rngs=nnx.Rngs(0)))
    assert sorted(export_reference_weights(nb)) == ["proj.weight", "qkv.weight", "w1", "w2", "w3"]


def test_patchify_layout():
    """Patches are row-major over the grid, each flattened in (row, column, channel) order."""
    img = jnp.arange(4 * 6 * 2, dtype=F64).reshape(1, 4, 6, 2)
    p = patchify(img, 2)
    assert p.shape == (1, 6, 8)
    np.testing.assert_array_equal(p[0, 1], np.asarray(img[0, 0:2, 2:4]).reshape(-1))
    np.testing.assert_array_equal(p[0, 3], np.asarray(img[0, 2:4, 0:2]).reshape(-1))


# ----------------------------------------------------------------------------- counts, sharding


def test_parameter_counts_by_hand():
    D = 3  # explicit head dim != W // H
    HD = H * D
    abstract = lambda f: nnx.eval_shape(f)  # shapes only: nothing allocated or compiled
    blk = abstract(lambda: ViT3Block(width=W, num_heads=H, head_dim=D, grid=GRID, rngs=nnx.Rngs(0)))
    block_count = (W * (3 * HD + 3 * D) + 3 * HD + 3 * D) + 2 * H * D * D + 9 * D + ((HD + D) * W + W)
    assert count_params(blk) == block_count
    nb = abstract(lambda: ViT3Block(width=W, num_heads=H, head_dim=D, grid=GRID, qkv_bias=False,
                                    proj_bias=False, rngs=nnx.Rngs(0)))
    assert count_params(nb) == block_count - (3 * HD + 3 * D) - W

    cfg = tiny_config(head_dim=D, num_layers=2, dtype=None, param_dtype=jnp.float32)
    P, Nt, F, L, K = 2 * 2 * 2, 12, 12, 2, 5
    per_layer = block_count + 3 * W * F + 2 * W + (9 * W + W)
    expected = (P * W + W) + Nt * W + L * per_layer + W + (W * K + K)
    assert count_params(abstract(lambda: ViTClassifier(cfg, rngs=nnx.Rngs(0)))) == expected
    bare = ViTConfig(**{**dataclass_kw(cfg), "pos_embed": False, "cpe": False})
    assert count_params(abstract(lambda: ViTClassifier(bare, rngs=nnx.Rngs(0)))) == expected - Nt * W - L * 10 * W


def dataclass_kw(cfg):
    import dataclasses
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_parameters_carry_logical_sharding():
    m = nnx.eval_shape(lambda: ViTClassifier(tiny_config(dtype=None, param_dtype=jnp.float32), rngs=nnx.Rngs(0)))
    mix = m.blocks[0].mixer
    assert mix.qkv.kernel.out_sharding == ("embed", "heads")
    assert mix.proj.kernel.out_sharding == ("heads", "embed")
    assert mix.w1.out_sharding == ("heads", None, None)
    assert mix.w3.out_sharding == (None, None, "head_dim")
    assert m.patch_embed.kernel.out_sharding == (None, "embed")
    assert m.pos_embed.out_sharding == (None, "embed")
    assert m.blocks[0].cpe.kernel.out_sharding == (None, None, "embed")
    assert m.head.kernel.out_sharding == ("embed", None)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,match", [
    (dict(image_size=(7, 8)), r"image_size: expected both sides divisible by patch_size=2, got image_size=\(7, 8\)"),
    (dict(image_size=(6, 8), patch_size=4), r"image_size: expected both sides divisible by patch_size=4"),
    (dict(num_heads=3), r"num_heads: must divide width"),
    (dict(impl="pallas"), r"impl: ViT3Block does not support impl='pallas'"),
    (dict(impl="fast"), r"impl: got 'fast', expected one of"),
    (dict(patch_size=0), r"patch_size: expected a positive int, got 0"),
    (dict(num_classes=1.5), r"num_classes: expected a positive int"),
    (dict(image_size=(6,)), r"image_size: expected a positive int or a pair"),
    (dict(param_dtype=jnp.int32), r"param_dtype: expected a floating dtype"),
    (dict(cpe="yes"), r"cpe: expected a bool"),
    (dict(norm_eps=0.0), r"norm_eps: expected a positive float"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(impl="pallas"), r"ViT3Block does not support impl='pallas'; supported: "),
    (dict(grid=(3, 0)), r"grid\[1\]: expected a positive int, got 0"),
    (dict(num_heads=3), r"num_heads: must divide width"),
    (dict(inner_lr=0.0), r"inner_lr: expected a positive float"),
])
def test_block_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        ViT3Block(**{**dict(width=W, num_heads=H, grid=GRID, rngs=nnx.Rngs(0)), **kw})


def test_bad_call_inputs_raise():
    # abstract modules: the checks run before any parameter is touched
    m = nnx.eval_shape(lambda: ViT3Block(width=W, num_heads=H, grid=GRID, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"x: expected N = Hg·Wg = 12 tokens for grid \(3, 4\), got N = 10"):
        m(jnp.zeros((B, 10, W)))
    with pytest.raises(ValueError, match=r"x: expected \[B, N, W\] with W = 8"):
        m(jnp.zeros((B, N, 5)))
    with pytest.raises(ValueError, match=r"x: expected a rank-3 array"):
        m(jnp.zeros((N, W)))
    c = nnx.eval_shape(lambda: ViTClassifier(tiny_config(dtype=None, param_dtype=jnp.float32), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"images: expected shape \[B, height, width, channels\] = \(2, 6, 8, 2\), got \(2, 8, 6, 2\)"):
        c(jnp.zeros((B, 8, 6, 2)))
    with pytest.raises(ValueError, match=r"images: expected a floating dtype"):
        c(jnp.zeros((B, 6, 8, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"config: expected a ViTConfig"):
        ViTClassifier({"width": 8}, rngs=nnx.Rngs(0))


def test_numpy_and_jax_scalars_in_config_and_block():
    """Sizes and scalars accept NumPy / JAX scalars (stored as Python values); ``impl`` is
    validated with the implementation vocabulary (ViT3Block.impls)."""
    cfg = tiny_config(width=np.int64(W), patch_size=jnp.int32(2), norm_eps=np.float32(0.5))
    assert cfg == tiny_config(norm_eps=0.5) and type(cfg.width) is int and type(cfg.norm_eps) is float
    assert ViT3Block.impls == ("recurrent", "chunked")
    scale = jnp.float32(0.5)  # concrete (made outside the abstract build)
    m = nnx.eval_shape(lambda: ViT3Block(width=W, num_heads=H, grid=(np.int64(3), 4), inner_lr=np.float32(1.0),
                                         scale=scale, impl="chunked", rngs=nnx.Rngs(0)))
    assert m.grid == (3, 4) and m.impl == "chunked" and m.scale == 0.5
