"""Building blocks shared by every mixer and model: RMSNorm, RoPE, SwiGLU, short conv.

Axis names: ``B`` batch, ``T`` tokens, ``H`` heads, ``D`` head dim, ``W`` model width
(``E`` in the sharding names below), ``F`` MLP hidden width.

Sharding. Every parameter initializer is wrapped in :func:`flax.nnx.with_partitioning`
with *logical* axis names so a training job can map them to a mesh later
(``nnx.get_partition_spec`` / ``nn.logical_to_mesh_axes``). The names used throughout
``tttla_jax.nn`` are:

* ``"vocab"`` — vocabulary axis of the embedding;
* ``"embed"`` — the model width ``W``;
* ``"heads"`` — the fused ``H·D`` axis of projections into/out of the heads;
* ``"mlp"`` — the MLP hidden axis ``F``;
* ``"head_dim"`` — a per-head feature axis (per-head output norms);
* ``"conv"`` — the kernel-tap axis of the short convolution;
* ``None`` — replicated.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax.ops.varlen import check_cu_seqlens
from tttla_jax.parallel import context as _sp


def positive_float(name: str, value) -> float:
    """A positive real from a Python, NumPy or concrete JAX int/float scalar, as a Python
    ``float`` (booleans, arrays of other shapes and traced values are refused, naming
    ``name``)."""
    bad = ValueError(f"{name}: expected a positive float (a Python, NumPy or concrete JAX scalar), "
                     f"got {value!r}")
    if value is None or isinstance(value, jax.core.Tracer):
        raise bad
    try:
        value = _checks.check_scale(value, name)
    except ValueError:
        raise bad from None
    if not value > 0:
        raise bad
    return value


def partitioned(init, axes: tuple):
    """``nnx.with_partitioning(init, axes)`` without eager sharding.

    The logical axis names are stored as metadata (``out_sharding``) on the variable;
    nothing is placed on devices at construction, so modules build with or without a
    mesh, and a training job shards them later (``nnx.get_partition_spec``).
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


class Dense(nnx.Linear):
    """``nnx.Linear`` (same parameters, values and dtype rules) computed as one 2-D product
    over the flattened leading axes of ``x [..., in]``.

    The values are those of ``nnx.Linear``; the difference is the backward: the weight
    gradient ``xᵀ ∂y`` becomes a plain 2-D product, where autodiff of the 3-D contraction
    ``[B, T, in] × [in, out]`` makes XLA:CPU write the output cotangent transposed in an extra
    pass first (forward+backward of one projection 20–45 % faster on this CPU host,
    docs/implementations.md).
    """

    def __call__(self, x, out_sharding=None):
        if x.ndim <= 2 or out_sharding is not None:  # an explicit output sharding: nnx.Linear as is
            return super().__call__(x, out_sharding=out_sharding)
        y = super().__call__(x.reshape(-1, x.shape[-1]))
        return y.reshape(x.shape[:-1] + y.shape[-1:])


def dense(in_features: int, out_features: int, axes: tuple, *, rngs: nnx.Rngs, dtype=None,
          param_dtype=jnp.float32, use_bias: bool = False, init=None) -> nnx.Linear:
    """A :class:`Dense` (an ``nnx.Linear``; bias-free unless ``use_bias``) whose kernel carries
    logical sharding ``axes``."""
    init = nnx.initializers.lecun_normal() if init is None else init
    return Dense(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=partitioned(init, axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), (axes[-1],)),
        rngs=rngs,
    )


def l2_normalize(x: Float[Array, "... d"], eps: float = 1e-6) -> Float[Array, "... d"]:
    """``x / sqrt(‖x‖² + eps)`` over the last axis, computed in float32 (float64 for f64)."""
    xf = x.astype(_checks.state_dtype(x))
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis: ``y = x / sqrt(mean(x²) + eps) · w``.

    (Zhang & Sennrich, 2019.) Statistics are computed in float32 (float64 for float64
    inputs); the output is in ``dtype`` (default: the input dtype). ``w`` starts at ones.

    Args:
      features: size of the normalised (last) axis.
      eps: added to the mean square.
      axis_name: logical sharding name of the scale vector (``"embed"`` or ``"head_dim"``).
    """

    def __init__(self, features: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32,
                 axis_name: Optional[str] = "embed", rngs: Optional[nnx.Rngs] = None):
        features = _checks.check_positive_int("features", features)
        self.features = features
        self.eps = positive_float("eps", eps)
        self.dtype = dtype
        init = partitioned(nnx.initializers.ones_init(), (axis_name,))
        key = jax.random.key(0)  # ones_init ignores the key; rngs are accepted for uniformity
        self.scale = nnx.Param(init(key, (features,), param_dtype))

    def __call__(self, x: Float[Array, "... f"]) -> Float[Array, "... f"]:
        if x.shape[-1] != self.features:
            raise ValueError(f"x: expected last axis of size {self.features}, got shape {tuple(x.shape)}")
        sd = _checks.state_dtype(x, self.scale[...])
        xf = x.astype(sd)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(sd)
        return y.astype(self.dtype or x.dtype)


def rope_angles(positions: Int[Array, "b t"], dim: int, base: float = 10000.0, dtype=jnp.float32):
    """``(cos, sin)`` of shape ``[B, T, 1, dim/2]`` for the rotary embedding."""
    inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=dtype) / dim)
    ang = positions.astype(dtype)[..., None] * inv_freq  # [B, T, dim/2]
    return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def check_positions(positions, B: int, T: int) -> Array:
    """Absolute token positions as ``[B, T]`` int32: ``[T]`` is broadcast over the batch;
    any other shape or a non-integer dtype is an error naming ``positions``."""
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = jnp.broadcast_to(positions[None], (B, T))
    _checks.check_shape("positions", positions, (B, T), "[B, T]")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions: expected an integer dtype, got {positions.dtype}")
    return positions.astype(jnp.int32)


def apply_rope(x: Float[Array, "b t h d"], positions: Int[Array, "b t"], *,
               base: float = 10000.0) -> Float[Array, "b t h d"]:
    """Rotary position embedding (Su et al., 2021, "RoFormer", eq. 34), rotate-half layout.

    Pairs ``(x_i, x_{i+D/2})`` are rotated by the angle ``p · base^(−2i/D)`` where ``p``
    is the token's integer position, so a decoding step passes its absolute position and
    gets exactly the rotation it would get inside a full forward.

    Args:
      x: ``[B, T, H, D]`` with even ``D``.
      positions: ``[B, T]`` (or ``[T]``, broadcast over the batch) integer positions.
      base: rotary base.
    """
    _checks.check_rank("x", x, 4, "[B, T, H, D]")
    B, T, H, D = x.shape
    if D % 2:
        raise ValueError(f"x: RoPE needs an even head dim, got D = {D}")
    positions = check_positions(positions, B, T)
    sd = _checks.state_dtype(x)
    cos, sin = rope_angles(positions, D, base, sd)
    xf = x.astype(sd)
    x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y.astype(x.dtype)


class SwiGLU(nnx.Module):
    """Gated MLP ``y = (silu(x W_g) ⊙ x W_u) W_d`` (Shazeer, 2020, "GLU Variants").

    Parameters: ``W_g, W_u`` ``[W, F]`` (sharding ``("embed", "mlp")``), ``W_d`` ``[F, W]``
    (``("mlp", "embed")``); no biases, so ``3·W·F`` parameters.
    """

    def __init__(self, width: int, hidden: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        width = _checks.check_positive_int("width", width)
        hidden = _checks.check_positive_int("hidden", hidden)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate = dense(width, hidden, ("embed", "mlp"), **kw)
        self.up = dense(width, hidden, ("embed", "mlp"), **kw)
        self.down = dense(hidden, width, ("mlp", "embed"), **kw)

    def __call__(self, x: Float[Array, "... w"]) -> Float[Array, "... w"]:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class ShortConv(nnx.Module):
    """Causal depthwise 1-D convolution over time (the short conv of DeltaNet / Mamba).

    ``y_t = Σ_{j<K} w_j ⊙ x_{t−K+1+j}`` (``K = kernel_size``, zero inputs before the
    start), then an optional SiLU. The decoding state is the last ``K−1`` inputs
    ``[B, K−1, F]``: ``__call__(x, state)`` convolves ``concat(state, x)`` and returns
    the new state, so token-by-token calls equal one call on the whole sequence.

    Parameters: ``w`` ``[K, F]`` (sharding ``("conv", "heads")``), no bias.
    """

    def __init__(self, features: int, kernel_size: int = 4, *, activation: bool = True,
                 param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        features = _checks.check_positive_int("features", features)
        kernel_size = _checks.check_positive_int("kernel_size", kernel_size)
        self.features = features
        self.kernel_size = kernel_size
        self.activation = activation
        self.dtype = dtype
        init = partitioned(
            nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=1),
            ("conv", "heads"))
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, features), param_dtype))

    def init_state(self, batch_size: int, dtype=jnp.float32) -> Float[Array, "b k1 f"]:
        return jnp.zeros((batch_size, self.kernel_size - 1, self.features), dtype)

    def __call__(self, x: Float[Array, "b t f"], state: Optional[Float[Array, "b k1 f"]] = None,
                 cu_seqlens: Optional[Int[Array, "n1"]] = None):
        """Returns ``(y [B, T, F], new_state [B, K−1, F])``.

        ``cu_seqlens`` ``[N + 1]``: ``x`` is ``[1, T, F]`` holding N packed sequences
        (offsets as in :mod:`tttla_jax.ops.varlen`), ``state`` and ``new_state`` are per
        sequence, ``[N, K−1, F]``; each sequence is convolved exactly as if it ran alone (a
        tap reaching before a sequence's start reads that sequence's state, zeros by
        default). Works with a traced ``cu_seqlens``.
        """
        _checks.check_rank("x", x, 3, "[B, T, F]")
        B, T, F = x.shape
        if F != self.features:
            raise ValueError(f"x: expected [B, T, F] with F = {self.features}, got {tuple(x.shape)}")
        if _sp.sequence_axis() is not None:  # x: a slice of a sequence sharded over devices
            return _sp.short_conv(self, x, state, cu_seqlens)
        if cu_seqlens is not None:
            return self._packed(x, state, cu_seqlens)
        Km1 = self.kernel_size - 1
        if state is None:
            state = jnp.zeros((B, Km1, F), x.dtype)
        _checks.check_shape("state", state, (B, Km1, F), "[B, kernel_size-1, F]")
        dt = self.dtype or x.dtype
        sd = _checks.state_dtype(x, self.kernel[...])
        xs = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+T, F]
        w = self.kernel[...].astype(sd)
        xf = xs.astype(sd)
        # tap products as einsums: the kernel gradient is then a dot over (B, T), not a reduction
        # of a product (~4x faster forward+backward of this conv on XLA:CPU at T=2048, F=768)
        y = sum(jnp.einsum("btf,f->btf", xf[:, j: j + T], w[j]) for j in range(self.kernel_size))
        if self.activation:
            y = jax.nn.silu(y)
        new_state = xs[:, xs.shape[1] - Km1:] if Km1 else xs[:, :0]
        return y.astype(dt), new_state.astype(state.dtype)

    def _packed(self, x, state, cu_seqlens):
        """The ``cu_seqlens`` form of :meth:`__call__` (see there)."""
        _, T, F = x.shape
        N = check_cu_seqlens(cu_seqlens, x.shape[0], T)
        Km1 = self.kernel_size - 1
        if state is None:
            state = jnp.zeros((N, Km1, F), x.dtype)
        _checks.check_shape("state", state, (N, Km1, F),
                            "[N, kernel_size-1, F] (one state per packed sequence, N from cu_seqlens)")
        dt = self.dtype or x.dtype
        sd = _checks.state_dtype(x, self.kernel[...])
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        # One source array: every sequence's state (rows n*(K-1) ...) then the T tokens.
        src = jnp.concatenate([state.astype(x.dtype).reshape(N * Km1, F), x[0]], axis=0)

        def gather(pos, n):
            """Rows of ``src`` for sequence-relative inputs at token index ``pos`` of sequence
            ``n``: the token itself if ``pos >= cu[n]``, else the sequence's state slot."""
            in_seq = pos >= cu[n]
            from_state = n * Km1 + jnp.clip(pos - cu[n] + Km1, 0, max(Km1 - 1, 0))
            idx = jnp.where(in_seq, N * Km1 + jnp.clip(pos, 0, max(T - 1, 0)), from_state)
            return jnp.take(src, idx, axis=0, mode="clip")

        t = jnp.arange(T, dtype=jnp.int32)
        n_t = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), N - 1).astype(jnp.int32)
        w = self.kernel[...].astype(sd)
        y = sum(w[j] * gather(t - Km1 + j, n_t).astype(sd) for j in range(self.kernel_size))
        if self.activation:
            y = jax.nn.silu(y)
        n = jnp.arange(N, dtype=jnp.int32)
        pos = cu[1:, None] - Km1 + jnp.arange(Km1, dtype=jnp.int32)[None]  # [N, K-1]
        new_state = gather(pos, jnp.broadcast_to(n[:, None], pos.shape))
        return y[None].astype(dt), new_state.astype(state.dtype)
