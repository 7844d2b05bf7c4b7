"""ViT³: the vision test-time-training token mixer and a small image classifier.

The mixer follows the ViT³ reference block (Han et al., 2025, "ViT³: Unlocking Test-Time
Training in Vision", §4; docs/rules/vit3.md): one fused projection gives ``q, k, v`` for two
fast-weight parts that each take **one full-batch inner gradient step on all N tokens**
(non-causal, inner learning rate 1) and are then read with the queries:

* **GLU part** (``H`` heads of dim ``D``): ``f(x) = (x W1) ⊙ silu(x W2)`` with per-head
  ``W1, W2`` ``[H, D, D]`` — :func:`tttla_jax.rules.vit3.vit3_glu`;
* **3×3 depthwise-conv part** (one extra group of ``D`` channels on the token grid):
  ``f(x) = conv3×3(x, W3)`` — :func:`tttla_jax.rules.vit3.vit3_conv`;

both with the inner loss ``−(s/N) Σ_i ⟨f(k_i), v_i⟩`` (``s = 9^−1/2``) and gradient
normalisation ``g / (‖g‖_in + 1)``. Their outputs are concatenated (``H·D + D``) and
projected back to the width. By docs/rules/vit3.md / the paper's theorem 5.1 the same outputs come
from non-causal linear attention (GLU part) and a 3×3 sliding-window linear attention
(conv part): ``impl="chunked"`` runs those forms (the whole non-causal sequence as one
matmul block), ``impl="recurrent"`` the gradient step; they agree to 1e-10 in float64
(tests/test_nn_vit.py).

Axis names: ``B`` batch, ``N`` tokens (``N = Hg·Wg``, row-major over the token grid),
``W`` width, ``H`` heads, ``D`` head dim, ``P`` pixels per patch (``p·p·C``).

Images are channels-last ``[B, height, width, channels]`` (the JAX convention).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from tttla_jax import _checks
from tttla_jax.nn.layers import RMSNorm, SwiGLU, dense, partitioned
from tttla_jax import impl as _impl
from tttla_jax.nn.mixers import check_layer_impl, resolve_heads
from tttla_jax.nn.model import _check_dtype
from tttla_jax.nn.weights import identity, jax_to_torch_linear, torch_linear_to_jax
from tttla_jax.rules.vit3 import SCALE, vit3_conv, vit3_glu

__all__ = ["ViT3Block", "ViTConfig", "ViTClassifier", "ViTBlock"]

# std of the reference's initialisers: timm ``trunc_normal_(std=.02)`` truncates at ±2
# (absolute, i.e. ±100σ), which is a plain normal to within float precision.
INIT_STD = 0.02


def _trunc_normal(std: float = INIT_STD):
    """Normal with standard deviation ``std`` (the reference's ``trunc_normal_(std=.02)``,
    whose ±2 absolute truncation never binds)."""
    return nnx.initializers.normal(stddev=std)


def _pair(name: str, value) -> Tuple[int, int]:
    """An int ``n`` -> ``(n, n)``; a pair of positive ints -> itself (as a tuple of Python
    ints; Python, NumPy or JAX integer scalars accepted)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected a positive int or a pair (rows, cols) of them, got {value!r}")
        a, b = value
        return _checks.check_positive_int(f"{name}[0]", a), _checks.check_positive_int(f"{name}[1]", b)
    n = _checks.check_positive_int(name, value)
    return n, n


# ----------------------------------------------------------------------------- the mixer


class ViT3Block(nnx.Module):
    """The ViT³ token mixer: GLU + 3×3 depthwise-conv fast weights, one inner step each.

    ``[q1 | k1 | v1 | q2 | k2 | v2] = x W_qkv + b`` (widths ``H·D ×3`` then ``D ×3``);
    ``o1 = vit3_glu(q1, k1, v1; W1, W2)`` per head, ``o2 = vit3_conv(q2, k2, v2; W3)`` on
    the ``grid`` of tokens; ``y = [o1 | o2] W_proj + b``. This is the reference ``TTT``
    block of ViT³ (Han et al., 2025, §4 and its released code; docs/rules/vit3.md), including its
    initialisation (normal, std 0.02, for the projections and ``W1, W2, W3``; the reference's
    ``head_dim = width // num_heads`` unless ``head_dim`` is given). The fast weights
    ``W1, W2, W3`` are learned initial states; the inner step is taken anew for every
    image, so the layer is non-causal and has no decoding cache.

    Args:
      width: model width ``W``.
      num_heads: GLU heads ``H``.
      grid: default token grid ``(Hg, Wg)`` (an int means square); a call may pass
        another grid (e.g. a different image size).
      head_dim: ``D`` (default ``W // H``); also the channel count of the conv part.
      qkv_bias, proj_bias: biases of the two projections (the reference has both).
      scale: ``s`` of the inner loss (default ``9^−1/2``, the reference's choice).
      inner_lr: inner learning rate (1.0 in ViT³).
      normalize: gradient normalisation ``g / (‖g‖_in + 1)`` (on in ViT³).
      update_W2: also step the gate weights ``W2`` (ViT³ does; ``False`` freezes φ).
      impl: ``"recurrent"`` (gradient-step form) | ``"chunked"`` (linear-attention form)
        | ``"auto"`` (the gradient step: same matmuls, no second pass). There is no ViT³
        kernel (no ``"pallas"``).
      dtype, param_dtype: activation and parameter dtypes. The inner step runs in float32
        (float64 for float64 inputs) whatever ``dtype``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Parameters (hand count): ``W·(3HD + 3D) [+ 3HD + 3D bias] + 2·H·D² + 9·D +
    (HD + D)·W [+ W bias]``.

    Sharding names: ``qkv`` ``("embed", "heads")``, ``W1, W2`` ``("heads", None, None)``
    (the head axis), ``W3`` ``(None, None, "head_dim")``, ``proj`` ``("heads", "embed")``.

    Reference weights: :meth:`reference_weight_map` maps the reference names
    ``qkv.weight, qkv.bias, w1, w2, w3, proj.weight, proj.bias`` (layouts ``[out, in]``,
    ``[1, H, D, D]``, ``[D, 1, 3, 3]``) for :func:`tttla_jax.nn.weights.load_reference_weights`.
    """

    #: implementations (docs/implementations.md) in "auto" preference order (those of the
    #: ViT³ rules; no Pallas kernel exists for them)
    impls = ("recurrent", "chunked")

    def __init__(self, *, width: int, num_heads: int, grid: Union[int, Tuple[int, int]],
                 head_dim: Optional[int] = None, qkv_bias: bool = True, proj_bias: bool = True,
                 scale: float = SCALE, inner_lr: float = 1.0, normalize: bool = True,
                 update_W2: bool = True, impl: str = "auto", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_heads(width, num_heads, head_dim)
        self.grid = _pair("grid", grid)
        check_layer_impl(type(self), impl)
        for name, val in (("scale", scale), ("inner_lr", inner_lr)):
            x = _checks.check_scale(val, name)
            if x is None or not x > 0:
                raise ValueError(f"{name}: expected a positive float, got {val!r}")
        self.width, self.num_heads, self.impl = width, num_heads, impl
        self.scale, self.inner_lr = float(scale), float(inner_lr)
        self.normalize, self.update_W2 = bool(normalize), bool(update_W2)
        self.qkv_bias, self.proj_bias = bool(qkv_bias), bool(proj_bias)
        self.dtype, self.param_dtype = dtype, param_dtype
        H, D = num_heads, self.head_dim
        HD = H * D
        init = _trunc_normal()
        self.qkv = dense(width, 3 * HD + 3 * D, ("embed", "heads"), rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, use_bias=qkv_bias, init=init)
        self.w1 = nnx.Param(partitioned(init, ("heads", None, None))(rngs.params(), (H, D, D), param_dtype))
        self.w2 = nnx.Param(partitioned(init, ("heads", None, None))(rngs.params(), (H, D, D), param_dtype))
        self.w3 = nnx.Param(partitioned(init, (None, None, "head_dim"))(rngs.params(), (3, 3, D), param_dtype))
        self.proj = dense(HD + D, width, ("heads", "embed"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype, use_bias=proj_bias, init=init)

    def __call__(self, x: Float[Array, "b n w"], *, grid: Optional[Union[int, Tuple[int, int]]] = None,
                 output_final_state: bool = False):
        """Apply the mixer to the tokens of a batch of images.

        Args:
          x: ``[B, N, W]`` tokens, row-major over the grid (``n = i·Wg + j``).
          grid: token grid ``(Hg, Wg)`` with ``Hg·Wg = N`` (default: the constructor's).
          output_final_state: also return the per-image fast weights after the step.

        Returns:
          ``(y [B, N, W], state)``; ``state`` is ``None`` unless ``output_final_state``, then
          ``{"W1": [B, H, D, D], "W2": [B, H, D, D], "W3": [B, 3, 3, D]}`` (float32, float64
          for float64 inputs).
        """
        _checks.check_rank("x", x, 3, "[B, N, W]")
        _checks.check_floating("x", x)
        B, N, W = x.shape
        if W != self.width:
            raise ValueError(f"x: expected [B, N, W] with W = {self.width}, got {tuple(x.shape)}")
        grid = self.grid if grid is None else _pair("grid", grid)
        if N != grid[0] * grid[1]:
            raise ValueError(f"x: expected N = Hg·Wg = {grid[0] * grid[1]} tokens for grid {grid}, "
                             f"got N = {N} (shape {tuple(x.shape)})")
        H, D = self.num_heads, self.head_dim
        HD = H * D
        z = self.qkv(x)
        q1, k1, v1 = (z[..., i * HD:(i + 1) * HD].reshape(B, N, H, D) for i in range(3))
        q2, k2, v2 = (z[..., 3 * HD + i * D: 3 * HD + (i + 1) * D] for i in range(3))
        rule = dict(scale=self.scale, lr=self.inner_lr, normalize=self.normalize,
                    output_final_state=output_final_state, impl=self.impl)
        o1, Wg = vit3_glu(q1, k1, v1, W1=self.w1[...], W2=self.w2[...], update_W2=self.update_W2, **rule)
        o2, Wc = vit3_conv(q2, k2, v2, W=self.w3[...], grid=grid, **rule)
        y = self.proj(jnp.concatenate([o1.reshape(B, N, HD), o2], axis=-1).astype(z.dtype))
        state = None
        if output_final_state:
            state = {"W1": Wg[0], "W2": Wg[1], "W3": Wc}
        return y, state

    def reference_weight_map(self) -> dict:
        """Reference (PyTorch ViT³ ``TTT`` module) names -> this layer's parameters.

        ``qkv.weight [3HD+3D, W]``, ``qkv.bias``, ``w1``/``w2`` ``[1, H, D, D]``,
        ``w3 [D, 1, 3, 3]`` (``w3[c, 0, a, b]`` = ``W3[a, b, c]``), ``proj.weight [W, HD+D]``,
        ``proj.bias`` (biases only when enabled).
        """
        per_head_in = lambda a: np.asarray(a)[0]
        per_head_out = lambda a: np.asarray(a)[None]
        conv_in = lambda a: np.transpose(np.asarray(a)[:, 0], (1, 2, 0))      # [D,1,3,3] -> [3,3,D]
        conv_out = lambda a: np.transpose(np.asarray(a), (2, 0, 1))[:, None]  # [3,3,D] -> [D,1,3,3]
        m = {
            "qkv.weight": (("qkv", "kernel"), torch_linear_to_jax, jax_to_torch_linear),
            "w1": (("w1",), per_head_in, per_head_out),
            "w2": (("w2",), per_head_in, per_head_out),
            "w3": (("w3",), conv_in, conv_out),
            "proj.weight": (("proj", "kernel"), torch_linear_to_jax, jax_to_torch_linear),
        }
        if self.qkv_bias:
            m["qkv.bias"] = (("qkv", "bias"), identity, identity)
        if self.proj_bias:
            m["proj.bias"] = (("proj", "bias"), identity, identity)
        return m


# ----------------------------------------------------------------------------- the model


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Configuration of :class:`ViTClassifier`, validated when it is built.

    Every inconsistency raises a ``ValueError`` naming the field, before any parameter is
    allocated or anything is compiled.

    Attributes:
      image_size: ``(height, width)`` in pixels (an int means square); must be divisible
        by ``patch_size``.
      patch_size: side ``p`` of the square patches.
      in_channels: image channels ``C``.
      num_classes: classes of the linear head.
      width: model width ``W``.
      num_layers: number of :class:`ViTBlock` s.
      num_heads: GLU heads of every ViT³ mixer.
      head_dim: per-head dim (default ``width // num_heads``; then ``num_heads`` must
        divide ``width``); also the channel count of the conv part.
      mlp_hidden: SwiGLU hidden width (default ``8·W/3`` rounded up to a multiple of 8).
      impl: implementation of every ViT³ mixer (``"recurrent"`` | ``"chunked"`` | ``"auto"``,
        :attr:`ViT3Block.impls`).
      pos_embed: add a learned position embedding ``[N, W]`` after the patch embedding.
      cpe: conditional position encoding of the reference block, ``x + dwconv3×3(x)``
        before the mixer in every block (Chu et al., 2021; the ViT³ reference uses it
        instead of a position embedding).
      qkv_bias: bias of the mixers' qkv projection.
      norm_eps: RMSNorm epsilon.
      dtype: activation dtype (default: ``param_dtype``).
      param_dtype: parameter dtype.
      remat: rematerialise every block in the backward pass (``jax.checkpoint``).
    """

    image_size: Union[int, Tuple[int, int]]
    patch_size: int
    num_classes: int
    width: int
    num_layers: int
    num_heads: int
    in_channels: int = 3
    head_dim: Optional[int] = None
    mlp_hidden: Optional[int] = None
    impl: str = "auto"
    pos_embed: bool = True
    cpe: bool = True
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        object.__setattr__(self, "image_size", _pair("image_size", self.image_size))
        for name in ("patch_size", "num_classes", "width", "num_layers", "num_heads", "in_channels"):
            object.__setattr__(self, name, _checks.check_positive_int(name, getattr(self, name)))
        h, w = self.image_size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image_size: expected both sides divisible by patch_size={p}, got image_size="
                f"{self.image_size} (remainders {h % p}, {w % p})")
        try:
            resolve_heads(self.width, self.num_heads, self.head_dim)
        except ValueError as e:
            raise ValueError(f"ViTConfig: {e}") from None
        _impl.check_impl("impl", self.impl, ("auto",) + ViT3Block.impls, where="ViT3Block")
        if self.mlp_hidden is not None:
            object.__setattr__(self, "mlp_hidden", _checks.check_positive_int("mlp_hidden", self.mlp_hidden))
        eps = _checks.check_scale(self.norm_eps, "norm_eps")
        if eps is None or not eps > 0:
            raise ValueError(f"norm_eps: expected a positive float, got {self.norm_eps!r}")
        object.__setattr__(self, "norm_eps", eps)
        for name in ("pos_embed", "cpe", "qkv_bias", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        _check_dtype("dtype", self.dtype)
        _check_dtype("param_dtype", self.param_dtype)

    @property
    def grid(self) -> Tuple[int, int]:
        """Token grid ``(Hg, Wg) = image_size / patch_size``."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        """Pixels per patch ``P = p·p·C``."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def hidden(self) -> int:
        """SwiGLU hidden width."""
        return self.mlp_hidden if self.mlp_hidden is not None else _round_up(8 * self.width // 3, 8)


def patchify(images: Float[Array, "b h w c"], patch_size: int) -> Float[Array, "b n p"]:
    """``[B, h, w, C]`` -> ``[B, (h/p)·(w/p), p·p·C]``: patches row-major, each flattened
    in (row, column, channel) order."""
    B, h, w, C = images.shape
    p = patch_size
    x = images.reshape(B, h // p, p, w // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (h // p) * (w // p), p * p * C)


class DepthwiseConv3x3(nnx.Module):
    """Per-channel 3×3 convolution on the token grid, zero padding, with bias.

    ``y[i, j] = b + Σ_{a,b ∈ {−1,0,1}} K[a+1, b+1] ⊙ x[i+a, j+b]`` (cross-correlation, as
    ``conv2d`` with ``groups = channels``). Kernel ``[3, 3, F]`` (sharding
    ``(None, None, "embed")``), initialised normal (std 0.02) with zero bias (the reference keeps PyTorch's default ``Conv2d`` init).
    """

    def __init__(self, features: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _checks.check_positive_int("features", features)
        self.features, self.dtype = features, dtype
        self.kernel = nnx.Param(partitioned(_trunc_normal(), (None, None, "embed"))(
            rngs.params(), (3, 3, features), param_dtype))
        self.bias = nnx.Param(partitioned(nnx.initializers.zeros_init(), ("embed",))(
            rngs.params(), (features,), param_dtype))

    def __call__(self, x: Float[Array, "b n f"], grid: Tuple[int, int]) -> Float[Array, "b n f"]:
        B, N, F = x.shape
        Hg, Wg = grid
        dt = self.dtype or x.dtype
        sd = _checks.state_dtype(x, self.kernel[...])
        xg = jnp.pad(x.astype(sd).reshape(B, Hg, Wg, F), ((0, 0), (1, 1), (1, 1), (0, 0)))
        k = self.kernel[...].astype(sd)
        y = self.bias[...].astype(sd) + sum(
            xg[:, a:a + Hg, b:b + Wg] * k[a, b] for a in range(3) for b in range(3))
        return y.reshape(B, N, F).astype(dt)


class ViTBlock(nnx.Module):
    """``[x + cpe(x)]``; ``x + ViT3(norm(x))``; ``x + SwiGLU(norm(x))`` (pre-norm residual)."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.grid = config.grid
        self.cpe = DepthwiseConv3x3(config.width, rngs=rngs, **kw) if config.cpe else None
        self.mixer_norm = RMSNorm(config.width, eps=config.norm_eps, **kw)
        self.mixer = ViT3Block(width=config.width, num_heads=config.num_heads, grid=config.grid,
                               head_dim=config.head_dim, qkv_bias=config.qkv_bias, impl=config.impl,
                               rngs=rngs, **kw)
        self.mlp_norm = RMSNorm(config.width, eps=config.norm_eps, **kw)
        self.mlp = SwiGLU(config.width, config.hidden, rngs=rngs, **kw)

    def __call__(self, x: Float[Array, "b n w"]) -> Float[Array, "b n w"]:
        if self.cpe is not None:
            x = x + self.cpe(x, self.grid)
        h, _ = self.mixer(self.mixer_norm(x))
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


def _block_apply(block, x):
    return block(x)


def _block_apply_remat(block, x):
    # jax.checkpoint on the functional (graphdef, state) view: blocks mutate nothing.
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


class ViTClassifier(nnx.Module):
    """ViT³ image classifier: patch embedding, ViT³ blocks, final norm, mean pool, linear head.

    ``images [B, h, w, C] → patches [B, N, p·p·C] → x W_e + b_e (+ pos) →
    L × ViTBlock → RMSNorm → mean over tokens → head → logits [B, classes]``.
    The layout follows the ViT³ reference classifier (patch embedding, conditional
    position encoding per block, mean pooling, linear head); per this library's model
    conventions the norms are RMSNorm and the MLP is SwiGLU (the reference uses LayerNorm
    and a GELU MLP), and an optional learned position embedding is added.

    Logits are float32 (float64 for a float64 model).

    Parameters (hand count, ``P = p·p·C``, ``F`` = MLP hidden, ``D`` head dim):
    ``P·W + W`` (patch embedding) ``[+ N·W]`` (position embedding) ``+ L·(`` ViT3Block
    (see :class:`ViT3Block`) ``+ 3·W·F`` (SwiGLU) ``+ 2W`` (norms) ``[+ 10·W]`` (CPE) ``)
    + W`` (final norm) ``+ W·classes + classes`` (head).
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config: expected a ViTConfig, got {type(config).__name__}")
        self.config = config
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.patch_embed = dense(config.patch_dim, config.width, (None, "embed"), rngs=rngs,
                                 use_bias=True, init=_trunc_normal(), **kw)
        if config.pos_embed:
            self.pos_embed = nnx.Param(partitioned(_trunc_normal(), (None, "embed"))(
                rngs.params(), (config.num_tokens, config.width), config.param_dtype))
        else:
            self.pos_embed = None
        self.blocks = nnx.List([ViTBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.width, eps=config.norm_eps, **kw)
        self.head = dense(config.width, config.num_classes, ("embed", None), rngs=rngs,
                          use_bias=True, init=_trunc_normal(), **kw)

    def features(self, images: Float[Array, "b h w c"]) -> Float[Array, "b w"]:
        """Pooled features ``[B, W]`` (after the final norm, mean over tokens)."""
        cfg = self.config
        _checks.check_rank("images", images, 4, "[B, height, width, channels]")
        _checks.check_floating("images", images)
        B, h, w, C = images.shape
        expected = (B,) + tuple(cfg.image_size) + (cfg.in_channels,)
        _checks.check_shape("images", images, expected, "[B, height, width, channels]")
        dt = cfg.dtype or cfg.param_dtype
        x = self.patch_embed(patchify(images.astype(dt), cfg.patch_size))
        if self.pos_embed is not None:
            x = x + self.pos_embed[...].astype(x.dtype)
        apply = _block_apply_remat if cfg.remat else _block_apply
        for block in self.blocks:
            x = apply(block, x)
        x = self.final_norm(x)
        sd = _checks.state_dtype(x)
        return jnp.mean(x.astype(sd), axis=1).astype(x.dtype)

    def __call__(self, images: Float[Array, "b h w c"]) -> Float[Array, "b classes"]:
        """Returns logits ``[B, num_classes]`` in float32 (float64 for a float64 model)."""
        logits = self.head(self.features(images))
        return logits.astype(_checks.state_dtype(logits))
