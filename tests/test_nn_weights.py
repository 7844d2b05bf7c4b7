"""Reference-weight import/export (tttla_jax.nn.weights) with the TTT layers' maps.

* exported names and shapes are the official PyTorch ``ttt.py`` ones;
* export → load into a layer built with another seed → identical parameters and outputs;
* a TTT-Linear forward written here in numpy from the PyTorch code's structure (torch
  layouts, permute → rotate-half RoPE → un-permute, dual form) on the exported arrays
  equals the layer (float64, 1e-10) — the port is faithful, not only self-consistent;
* wrong shapes, unknown and missing names → one ValueError listing every problem, and
  nothing is assigned.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.nn import (LinearAttention, TTTLinear, TTTMLP, export_reference_weights,
                          load_reference_weights, prefixed_weight_map)

F64 = jnp.float64
B, W, H = 2, 8, 2
D = W // H
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)

LINEAR_NAMES = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                "learnable_ttt_lr_weight", "learnable_ttt_lr_bias", "learnable_token_idx",
                "ttt_norm_weight", "ttt_norm_bias", "post_norm.weight", "post_norm.bias", "W1", "b1"}


def forward(m, x):
    gd, st = nnx.split(m)
    return jit(lambda st, x: nnx.merge(gd, st)(x)[0])(st, x)


def params_of(m):
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def test_reference_names_and_shapes():
    C, K = 4, 3
    m = TTTLinear(width=W, num_heads=H, mini_batch_size=C, rngs=nnx.Rngs(0))
    a = export_reference_weights(m)
    assert set(a) == LINEAR_NAMES
    assert a["W1"].shape == (H, D, D) and a["b1"].shape == (H, 1, D)
    assert a["learnable_ttt_lr_weight"].shape == (H, 1, W) and a["learnable_ttt_lr_bias"].shape == (H, 1)
    assert a["q_proj.weight"].shape == (H * D, W) and a["o_proj.weight"].shape == (W, H * D)
    assert a["learnable_token_idx"].shape == (C,) and a["ttt_norm_weight"].shape == (H, D)
    assert a["post_norm.weight"].shape == (W,)
    mq = TTTLinear(width=W, num_heads=H, mini_batch_size=C, share_qk=True, conv_kernel=K,
                   use_gate=True, rngs=nnx.Rngs(0))
    aq = export_reference_weights(mq)
    assert set(aq) == (LINEAR_NAMES - {"k_proj.weight"}) | {
        "conv_q.weight", "conv_q.bias", "conv_k.weight", "conv_k.bias", "g_proj.weight"}
    assert aq["conv_q.weight"].shape == (W, 1, K) and aq["conv_k.bias"].shape == (W,)
    assert aq["g_proj.weight"].shape == (W, W)
    am = export_reference_weights(TTTMLP(width=W, num_heads=H, mini_batch_size=C, rngs=nnx.Rngs(0)))
    assert set(am) == LINEAR_NAMES | {"W2", "b2"}
    assert am["W1"].shape == (H, D, 4 * D) and am["b1"].shape == (H, 1, 4 * D)
    assert am["W2"].shape == (H, 4 * D, D) and am["b2"].shape == (H, 1, D)


@pytest.mark.parametrize("cls,kw", [
    (TTTLinear, dict(share_qk=True, use_gate=True, conv_kernel=3)),
    (TTTMLP, dict()),
])
def test_round_trip_is_exact(cls, kw):
    mk = lambda seed: cls(width=W, num_heads=H, mini_batch_size=4, init_std=0.3, dtype=F64,
                          param_dtype=F64, rngs=nnx.Rngs(seed), **kw)
    src, dst = mk(0), mk(7)
    x = jax.random.normal(jax.random.key(1), (B, 6, W), F64)
    arrays = export_reference_weights(src)
    assert not all(np.array_equal(params_of(src)[k], v) for k, v in params_of(dst).items())
    out = load_reference_weights(dst, arrays)
    assert out is dst
    ps, pd = params_of(src), params_of(dst)
    assert ps.keys() == pd.keys()
    for k in ps:
        assert ps[k].dtype == pd[k].dtype and np.array_equal(ps[k], pd[k]), k
    assert np.array_equal(np.asarray(forward(src, x)), np.asarray(forward(dst, x)))
    again = export_reference_weights(dst)
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)


def test_load_casts_to_param_dtype_and_keeps_partitioning():
    m = TTTLinear(width=W, num_heads=H, mini_batch_size=4, param_dtype=F64, rngs=nnx.Rngs(0))
    arrays = {k: v.astype(np.float32) for k, v in export_reference_weights(m).items()}
    load_reference_weights(m, arrays)
    assert m.W1[...].dtype == F64 and m.q_proj.kernel[...].dtype == F64
    assert m.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")


def test_errors_list_every_problem_and_assign_nothing():
    m = TTTLinear(width=W, num_heads=H, mini_batch_size=4, rngs=nnx.Rngs(0))
    before = params_of(m)
    arrays = export_reference_weights(TTTLinear(width=W, num_heads=H, mini_batch_size=4, rngs=nnx.Rngs(1)))
    arrays["W1"] = np.zeros((H, D + 1, D), np.float32)
    arrays["q_proj.weight"] = arrays["q_proj.weight"][:, :-1]
    arrays["learnable_token_idx"] = np.zeros((5,), np.float32)
    arrays["model.embed_tokens.weight"] = np.zeros((3, W))
    arrays["lm_head.weight"] = np.zeros((3, W))
    del arrays["b1"], arrays["post_norm.bias"]
    with pytest.raises(ValueError) as e:
        load_reference_weights(m, arrays)
    msg = str(e.value)
    for needle in ("7 problem(s)", "unknown", "model.embed_tokens.weight", "lm_head.weight",
                   "missing", "'b1'", "'post_norm.bias'",
                   f"'W1': got {(H, D + 1, D)}, expected {(H, D, D)}",
                   f"'q_proj.weight': got {(H * D, W - 1)}, expected {(H * D, W)}",
                   "'learnable_token_idx': got (5,), expected (4,)"):
        assert needle in msg, (needle, msg)
    after = params_of(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing was assigned


def test_non_strict_ignores_unknown_and_keeps_missing():
    m = TTTLinear(width=W, num_heads=H, mini_batch_size=4, rngs=nnx.Rngs(0))
    src = TTTLinear(width=W, num_heads=H, mini_batch_size=4, rngs=nnx.Rngs(1))
    arrays = {"W1": export_reference_weights(src)["W1"], "extra": np.zeros(3)}
    b1 = np.asarray(m.b1[...])
    load_reference_weights(m, arrays, strict=False)
    assert np.array_equal(np.asarray(m.W1[...]), np.asarray(src.W1[...]))
    assert np.array_equal(np.asarray(m.b1[...]), b1)
    with pytest.raises(ValueError, match="shape mismatch for 'W1'"):  # shapes always checked
        load_reference_weights(m, {"W1": np.zeros((1,))}, strict=False)


class TwoLayers(nnx.Module):
    """A nested container whose map is built from its children's with a prefix."""

    def __init__(self, rngs):
        self.layers = nnx.List([TTTLinear(width=W, num_heads=H, mini_batch_size=4, rngs=rngs),
                                TTTMLP(width=W, num_heads=H, mini_batch_size=4, rngs=rngs)])

    def reference_weight_map(self):
        out = {}
        for i, layer in enumerate(self.layers):
            out.update(prefixed_weight_map(f"layers.{i}.seq_modeling_block.", ("layers", i),
                                           layer.reference_weight_map()))
        return out


def test_nested_model_round_trip():
    a, b = TwoLayers(nnx.Rngs(0)), TwoLayers(nnx.Rngs(3))
    arrays = export_reference_weights(a)
    assert "layers.1.seq_modeling_block.W2" in arrays and "layers.0.seq_modeling_block.W1" in arrays
    load_reference_weights(b, arrays)
    pa, pb = params_of(a), params_of(b)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_layer_without_map():
    la = LinearAttention(width=W, num_heads=H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="reference_weight_map"):
        export_reference_weights(la)
    with pytest.raises(ValueError, match="arrays: expected a dict"):
        load_reference_weights(TTTLinear(width=W, num_heads=H, rngs=nnx.Rngs(0)), [1, 2])


# ----------------------------------------------------------------- the PyTorch forward in numpy


def _ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return w * (x - mu) / np.sqrt(var + eps) + b


def _ln_l2_bwd(x, target, w, b, eps=1e-6):
    n = x.shape[-1]
    mu = x.mean(-1, keepdims=True)
    std = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xh = (x - mu) / std
    g = (w * xh + b - target) * w
    return (n * g - g.sum(-1, keepdims=True) - xh * (g * xh).sum(-1, keepdims=True)) / (n * std)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def torch_ttt_linear_forward(x, P, *, heads, mini_batch, base_lr, theta, share_qk, use_gate, kernel):
    """TTT-Linear forward in the PyTorch reference's layouts and order of operations
    (no cache): [B, H, T, D] heads, EasyLM permutation around rotate-half RoPE, dual form."""
    Bn, T, Wd = x.shape
    Dh, C = Wd // heads, mini_batch
    lin = lambda a, name: a @ P[name].T
    if share_qk:
        xq = lin(x, "q_proj.weight")
        xp = np.pad(xq, ((0, 0), (kernel - 1, 0), (0, 0)))
        conv = lambda n: sum(P[f"{n}.weight"][:, 0, j] * xp[:, j:j + T] for j in range(kernel)) + P[f"{n}.bias"]
        XQ, XK = conv("conv_q"), conv("conv_k")
    else:
        XQ, XK = lin(x, "q_proj.weight"), lin(x, "k_proj.weight")
    XV = lin(x, "v_proj.weight")
    hd = lambda a: a.reshape(Bn, T, heads, Dh).transpose(0, 2, 1, 3)
    XQ, XK, XV = hd(XQ), hd(XK), hd(XV)
    inv = 1.0 / theta ** (np.arange(0, Dh, 2) / Dh)
    fr = (np.arange(T) % C)[:, None] * inv[None]
    emb = np.concatenate([fr, fr], -1)
    cos, sin = np.cos(emb), np.sin(emb)
    perm = lambda a: a.reshape(Bn, heads, T, Dh // 2, 2).swapaxes(3, 4).reshape(a.shape)
    unperm = lambda a: a.reshape(Bn, heads, T, 2, Dh // 2).swapaxes(3, 4).reshape(a.shape)
    rot = lambda a: np.concatenate([-a[..., Dh // 2:], a[..., :Dh // 2]], -1)
    XQ, XK = (unperm(perm(a) * cos + rot(perm(a)) * sin) for a in (XQ, XK))
    lr = np.einsum("btc,hdc->bhtd", x, P["learnable_ttt_lr_weight"]) + P["learnable_ttt_lr_bias"].reshape(1, -1, 1, 1)
    lr = base_lr / (1 + np.exp(-lr)) / Dh  # [B, H, T, 1]
    token_idx = np.maximum(1.0 / np.arange(1, C + 1) + P["learnable_token_idx"], 0.0)
    lw = P["ttt_norm_weight"].reshape(heads, 1, Dh)
    lb = P["ttt_norm_bias"].reshape(heads, 1, Dh)
    Wf = np.broadcast_to(P["W1"], (Bn,) + P["W1"].shape)
    bf = np.broadcast_to(P["b1"], (Bn,) + P["b1"].shape)
    outs = []
    for s in range(0, T, C):
        e = min(s + C, T)
        q, k, v = XQ[:, :, s:e], XK[:, :, s:e], XV[:, :, s:e]
        eta = token_idx[: e - s][:, None] * lr[:, :, s:e, 0][:, :, None, :]  # [B, H, K, K]
        G = _ln_l2_bwd(k @ Wf + bf, v - k, lw, lb)
        attn = np.tril(q @ k.swapaxes(-1, -2))
        b_bar = bf - np.tril(eta) @ G
        Z = q @ Wf - (eta * attn) @ G + b_bar
        last = eta[:, :, -1, :, None]
        Wf = Wf - (last * k).swapaxes(-1, -2) @ G
        bf = bf - np.sum(last * G, axis=-2, keepdims=True)
        outs.append(q + _ln(Z, lw, lb))
    o = np.concatenate(outs, axis=2).transpose(0, 2, 1, 3).reshape(Bn, T, Wd)
    o = _ln(o, P["post_norm.weight"], P["post_norm.bias"])
    if use_gate:
        o = _gelu_tanh(lin(x, "g_proj.weight")) * o
    return lin(o, "o_proj.weight")


@pytest.mark.parametrize("kw", [dict(), dict(share_qk=True, use_gate=True, conv_kernel=3, base_lr=0.7)])
def test_layer_matches_pytorch_reference_forward(kw):
    m = TTTLinear(width=W, num_heads=H, mini_batch_size=4, init_std=0.3, rope_theta=100.0,
                  dtype=F64, param_dtype=F64, rngs=nnx.Rngs(0), **kw)
    rng = np.random.default_rng(0)
    P = export_reference_weights(m)
    # non-trivial norms, lr bias and token offsets, loaded through the reference names
    for name in ("ttt_norm_weight", "ttt_norm_bias", "learnable_ttt_lr_bias", "learnable_token_idx",
                 "post_norm.weight", "post_norm.bias", "b1"):
        P[name] = P[name] + 0.2 * rng.normal(size=P[name].shape)
    load_reference_weights(m, P)
    x = rng.normal(size=(B, 10, W))  # two full mini-batches and a partial one
    ref = torch_ttt_linear_forward(x, P, heads=H, mini_batch=4, base_lr=m.base_lr, theta=100.0,
                                   share_qk=m.share_qk, use_gate=m.use_gate, kernel=m.conv_kernel)
    got = np.asarray(forward(m, jnp.asarray(x)))
    assert np.max(np.abs(got - ref)) < 1e-10
