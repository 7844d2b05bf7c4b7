"""Token mixers: linear attention, (gated) DeltaNet and sliding-window softmax attention.

Every mixer follows the protocol described in :mod:`tttla_jax.nn` (``Mixer``):
keyword configuration, an explicit ``impl`` (docs/implementations.md),
``init_cache(batch_size)`` and ``__call__(x, *, cache=None, positions=None) -> (y, new_cache)``
with the fast-weight state carried explicitly in and out. Every registered mixer also takes
``cu_seqlens`` (packed documents, ``x`` ``[1, T, W]``, each computed as if alone, caches in and
out per document ``[N, ...]``, positions restarting per document; see
:mod:`tttla_jax.ops.varlen`, :mod:`tttla_jax.nn._segments` and the README's "Packed documents").

Axis names: ``B`` batch, ``T`` tokens, ``H`` heads, ``D`` head dim, ``W`` width,
``w`` attention window.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax import impl as _impl
from tttla_jax.parallel import context as _sp
from tttla_jax.nn.layers import (RMSNorm, ShortConv, apply_rope, check_positions, dense, l2_normalize,
                                 partitioned, positive_float)
from tttla_jax.nn.recipes import FEATURE_MAPS as RECIPE_FEATURE_MAPS, RecipeMixin, feature_map as _feature_map
from tttla_jax.ops.delta_rule import delta_rule
from tttla_jax.ops.linear_attention import linear_attention
from tttla_jax.ops.varlen import check_cu_seqlens
from tttla_jax.nn._segments import packed_next_pos, packed_positions

Cache = dict  # a flat dict of arrays (a pytree); its keys are documented per mixer


def resolve_heads(width: int, num_heads: int, head_dim: Optional[int]) -> int:
    """Validate ``(width, num_heads, head_dim)`` and return the head dim.

    ``head_dim=None`` means ``width // num_heads`` and then ``num_heads`` must divide
    ``width``; an explicit ``head_dim`` may differ (the projections map ``W → H·D``).
    """
    width = _checks.check_positive_int("width", width)
    num_heads = _checks.check_positive_int("num_heads", num_heads)
    if head_dim is None:
        if width % num_heads:
            raise ValueError(
                f"num_heads: must divide width when head_dim is not given, got width={width}, "
                f"num_heads={num_heads} (width % num_heads = {width % num_heads}); pass head_dim "
                f"explicitly or pick num_heads among the divisors of {width}")
        return width // num_heads
    return _checks.check_positive_int("head_dim", head_dim)


def check_layer_impl(cls, impl) -> str:
    """Validate a layer's ``impl`` argument against the vocabulary and ``cls.impls``.

    ``cls`` is the layer class (or an instance); ``impl`` must be ``"auto"`` or one of
    ``cls.impls`` (values of :data:`tttla_jax.impl.Impl`, docs/implementations.md).
    Raises ``ValueError`` naming the layer, the value got and the supported impls.
    """
    cls = cls if isinstance(cls, type) else type(cls)
    return _impl.check_impl("impl", impl, ("auto",) + tuple(cls.impls), where=cls.__name__)


def _check_cache(cache: Cache, expected: dict) -> None:
    """``expected`` maps key -> (shape, layout string)."""
    if not isinstance(cache, dict):
        raise ValueError(f"cache: expected a dict with keys {sorted(expected)}, got {type(cache).__name__}")
    missing = sorted(set(expected) - set(cache))
    if missing:
        raise ValueError(f"cache: missing keys {missing}; expected keys {sorted(expected)} "
                         f"(build it with init_cache(batch_size))")
    for key, (shape, layout) in expected.items():
        _checks.check_shape(f"cache[{key!r}]", cache[key], shape, layout)


def resolve_positions(positions, cache: Cache, B: int, T: int) -> Array:
    """Absolute token positions ``[B, T]`` int32: ``positions`` as given (``[T]`` is
    broadcast over the batch) or, if ``None``, continuing from ``cache["pos"]``."""
    if positions is None:
        positions = cache["pos"][:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    return check_positions(positions, B, T)


class Mixer(nnx.Module):
    """Base class of token mixers (see the protocol in :mod:`tttla_jax.nn`).

    Subclasses set ``impls`` (their implementations, values of
    :data:`tttla_jax.impl.Impl` in ``"auto"`` preference order, without ``"auto"``),
    validate their ``impl`` argument with :func:`check_layer_impl` and implement
    ``init_cache`` and ``__call__``. The base class makes every ``__call__`` return its
    output in the dtype of ``x`` (e.g. bfloat16 activations with float32 parameters give a
    bfloat16 output; the computation and the cache use the layer's own dtypes), and
    ``_check_x`` rejects non-floating ``x`` with a ``ValueError`` naming its dtype.

    Sequence parallelism (docs/context_parallel.md): under
    :func:`tttla_jax.parallel.sequence_parallel` (inside ``jax.shard_map``), ``x`` is this
    device's slice of one sequence. A ``"pipelined"`` mixer (``sequence_parallel_form``, the
    default) is then run by :func:`tttla_jax.parallel.mixer_apply` from its cache alone; an
    ``"associative"`` one runs its own call, which combines its state across devices.
    """

    impls: tuple = ("recurrent",)
    #: How the layer shards over a sequence axis (docs/context_parallel.md):
    #: ``"pipelined"`` (any mixer, from the cache protocol) or ``"associative"`` (the
    #: layer's own call combines its state across devices); see :mod:`tttla_jax.parallel`.
    sequence_parallel_form: str = "pipelined"

    def __init_subclass__(cls, **kwargs):
        # Every mixer returns its output in the dtype of ``x`` (a bfloat16 activation stays
        # bfloat16 whatever the parameter and state dtypes); the cache keeps its own dtypes.
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None and not getattr(call, "_casts_to_input_dtype", False):
            @functools.wraps(call)
            def __call__(self, *args, **kw):
                axis = _sp.sequence_axis()  # under sequence parallelism: x is a local slice
                if axis is not None and _sp.sequence_parallel_form(self) == "pipelined":
                    y, cache = _sp.sequence_parallel_call(self, axis, *args, **kw)
                else:
                    y, cache = call(self, *args, **kw)
                x = args[0] if args else kw["x"]
                return y.astype(jnp.result_type(x)), cache
            __call__._casts_to_input_dtype = True
            cls.__call__ = __call__

    def init_cache(self, batch_size: int) -> Cache:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x, *, cache: Optional[Cache] = None, positions=None):  # pragma: no cover
        raise NotImplementedError

    # shared helpers -----------------------------------------------------------------
    def _check_x(self, x) -> tuple:
        """``x`` must be ``[B, T, W]`` with ``W = self.width``; returns ``(B, T)``."""
        _checks.check_rank("x", x, 3, "[B, T, W]")
        _checks.check_floating("x", x)
        if x.shape[-1] != self.width:
            raise ValueError(f"x: expected [B, T, W] with W = {self.width}, got {tuple(x.shape)}")
        return x.shape[0], x.shape[1]

    def _cache_batch(self, B: int, T: int, cu_seqlens) -> tuple:
        """``(batch, layout)`` of the cache: ``B``, or ``N`` packed sequences with
        ``cu_seqlens`` (validated: ``x`` must then be ``[1, T, W]``)."""
        if cu_seqlens is None:
            return B, "B"
        return check_cu_seqlens(cu_seqlens, B, _sp.global_length(T)), "N"  # global offsets under sequence parallelism

    def _heads(self, y: Array, B: int, T: int) -> Array:
        return y.reshape(B, T, self.num_heads, self.head_dim)

    def _state_dtype(self):
        return jnp.float64 if jnp.dtype(self.dtype or self.param_dtype) == jnp.float64 else jnp.float32

    def _act_dtype(self):
        return jnp.dtype(self.dtype or self.param_dtype)


class DecayGate(nnx.Module):
    """Per-head data-dependent scalar log-decay (Mamba-2 / gated DeltaNet style), or one per
    key channel (GLA / Kimi Delta Attention style) with ``channels=D``.

    ``g_t = −exp(A_log) · softplus(x_t W_a + dt_bias)`` with ``W_a`` ``[W, H]``,
    ``A_log, dt_bias`` ``[H]``; ``g_t ≤ 0`` so ``exp(g_t) ∈ (0, 1]`` (Dao & Gu, 2024,
    "Transformers are SSMs", §7; Yang et al., 2024, "Gated Delta Networks", eq. 10).
    Parameters: ``W·H + 2H``. Per channel (``channels=D``): ``W_a`` ``[W, H·D]``,
    ``dt_bias`` ``[H·D]``, ``A_log`` ``[H]`` (one rate per head), output ``[B, T, H, D]``;
    parameters ``W·H·D + H·D + H``.
    """

    def __init__(self, width: int, num_heads: int, *, channels: Optional[int] = None, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads, self.channels = num_heads, channels
        n = num_heads * (channels or 1)
        self.proj = dense(width, n, ("embed", "heads"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

        def a_init(key, shape, dt):  # A ~ U[1, 16]
            return jnp.log(jax.random.uniform(key, shape, dt, 1.0, 16.0))

        def dt_init(key, shape, dt):  # softplus(dt_bias) ~ logU[1e-3, 1e-1]
            u = jax.random.uniform(key, shape, dt)
            d = jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            return d + jnp.log(-jnp.expm1(-d))  # inverse softplus

        self.A_log = nnx.Param(partitioned(a_init, ("heads",))(rngs.params(), (num_heads,), param_dtype))
        self.dt_bias = nnx.Param(partitioned(dt_init, ("heads",))(rngs.params(), (n,), param_dtype))

    def __call__(self, x: Float[Array, "b t w"]) -> Float[Array, "b t h *d"]:
        sd = _checks.state_dtype(x, self.A_log[...])
        a = self.proj(x).astype(sd) + self.dt_bias[...].astype(sd)
        if self.channels is None:
            return -jnp.exp(self.A_log[...].astype(sd)) * jax.nn.softplus(a)
        a = a.reshape(a.shape[:-1] + (self.num_heads, self.channels))
        return -jnp.exp(self.A_log[...].astype(sd))[:, None] * jax.nn.softplus(a)


#: ``gate_kind`` of :class:`LinearAttention` / :class:`DeltaNet`: one log-decay per head or per key channel.
GATE_KINDS = ("head", "channel")


def _gate_channels(gate_kind: str, head_dim: int) -> Optional[int]:
    return head_dim if gate_kind == "channel" else None


#: Feature maps of :class:`LinearAttention` (every mixer's ``feature_map`` option,
#: :data:`tttla_jax.nn.recipes.FEATURE_MAPS`).
FEATURE_MAPS = RECIPE_FEATURE_MAPS


def feature_map(name: str, x: Array) -> Array:
    """``identity``; ``silu``; ``elu+1`` (Katharopoulos et al., 2020); ``relu``; ``silu+l2``
    (``l2norm(silu(x))`` over D); ``l2`` (:func:`tttla_jax.nn.recipes.feature_map`)."""
    return _feature_map(name, x)


class LinearAttention(RecipeMixin, Mixer):
    """Causal linear attention with a feature map and an optional scalar decay gate.

    ``q, k, v = φ(x W_q), φ(x W_k), x W_v`` per head; ``S_t = e^{g_t} S_{t−1} + k_tᵀ v_t``,
    ``o_t = (D^{−1/2} q_t) S_t`` (docs/linear_attention.md, linear / decayed rows), then a per-head RMSNorm
    and ``o_proj``. Runs on :func:`tttla_jax.linear_attention` (causal masking).

    Args:
      width: model width ``W``.
      num_heads: heads ``H``.
      head_dim: ``D`` (default ``W // H``); keys and values both use ``D``.
      feature_map: applied to q and k (:data:`FEATURE_MAPS`; default ``"elu+1"``).
      short_conv, qk_norm, head_norm: the recall recipes (:mod:`tttla_jax.nn.recipes`,
        docs/recipes.md): conv taps on q, k, v (0 = off), L2 norm of q, k, and the per-head
        output RMSNorm (on by default).
      use_decay: add the data-dependent per-head log-decay gate (:class:`DecayGate`).
      gate_kind: ``"head"`` (one log-decay per head) | ``"channel"`` (one per key channel,
        GLA: ``S_t = diag(e^{g_t}) S_{t−1} + k_tᵀ v_t``); with ``use_decay``.
      chunk_size: chunk length of the parallel (chunked) form.
      impl: ``"pallas"`` | ``"chunked"`` | ``"recurrent"`` | ``"associative"`` | ``"auto"``:
        passed to :func:`tttla_jax.linear_attention`, which resolves ``"auto"`` (the kernel
        on GPU/TPU where it supports the shape, else the chunked form) and says why an
        explicit request cannot run (docs/implementations.md).
      norm_eps: epsilon of the output norm.

    Parameters: ``4·W·H·D + D`` (+ ``W·H + 2H`` with ``use_decay``; ``W·H·D + H·D + H`` with
    ``gate_kind="channel"``).

    Cache: ``{"state": [B, H, D, D]}`` in float32 (float64 for a float64 layer), plus
    ``"conv_q"``, ``"conv_k"``, ``"conv_v"`` ``[B, short_conv−1, H·D]`` with ``short_conv``.

    Packed sequences: ``__call__(x, cu_seqlens=cu)`` with ``x`` ``[1, T, W]`` and
    ``cu = [0, T_1, T_1 + T_2, …, T]`` runs every sequence as if alone; the cache in
    (optional) and out is per sequence, ``{"state": [N, H, D, D]}``, so decoding continues
    with batch size N.
    """

    impls = ("pallas", "chunked", "recurrent", "associative")

    @property
    def sequence_parallel_form(self) -> str:
        """``"associative"`` (the :mod:`tttla_jax.parallel` op combines the state across
        devices); ``"pipelined"`` with per-channel gates."""
        return "pipelined" if getattr(self, "gate_kind", "head") == "channel" else "associative"

    def __init__(self, *, width: int, num_heads: int, head_dim: Optional[int] = None,
                 feature_map: str = "elu+1", use_decay: bool = False, gate_kind: str = "head", chunk_size: int = 64,
                 impl: str = "auto", norm_eps: float = 1e-6, short_conv: int = 0,
                 qk_norm: bool = False, head_norm: bool = True, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_heads(width, num_heads, head_dim)
        _checks.check_choice("feature_map", feature_map, FEATURE_MAPS)
        _checks.check_choice("gate_kind", gate_kind, GATE_KINDS)
        self.gate_kind = gate_kind
        chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
        self.impl = check_layer_impl(type(self), impl)
        self.width, self.num_heads = operator.index(width), operator.index(num_heads)
        self.feature_map, self.use_decay = feature_map, use_decay
        self.chunk_size = chunk_size
        self.dtype, self.param_dtype = dtype, param_dtype
        HD = num_heads * self.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.k_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.v_proj = dense(width, HD, ("embed", "heads"), **kw)
        self._init_recipe(features=HD, short_conv=short_conv, feature_map=feature_map, qk_norm=qk_norm,
                          head_norm=head_norm, head_dim=self.head_dim, norm_eps=norm_eps, **kw)
        self.gate = DecayGate(width, num_heads, channels=_gate_channels(gate_kind, self.head_dim),
                              **kw) if use_decay else None
        self.o_proj = dense(HD, width, ("heads", "embed"), **kw)

    def init_cache(self, batch_size: int) -> Cache:
        _checks.check_positive_int("batch_size", batch_size)
        D = self.head_dim
        return {"state": jnp.zeros((batch_size, self.num_heads, D, D), self._state_dtype()),
                **self._recipe_init_cache(batch_size, self._act_dtype())}

    def __call__(self, x: Float[Array, "b t w"], *, cache: Optional[Cache] = None,
                 positions: Optional[Int[Array, "b t"]] = None,
                 cu_seqlens: Optional[Int[Array, "n1"]] = None):
        """Returns ``(y [B, T, W], {"state": S_T})``; ``positions`` is accepted and unused.

        ``cu_seqlens`` ``[N + 1]``: packed sequences in ``x`` ``[1, T, W]``; the cache is
        then ``{"state": [N, H, D, D]}`` (see the class doc).
        """
        B, T = self._check_x(x)
        NB, nb = self._cache_batch(B, T, cu_seqlens)
        if cache is None:
            cache = self.init_cache(NB)
        D, H = self.head_dim, self.num_heads
        _check_cache(cache, {"state": ((NB, H, D, D), f"[{nb}, H, D, D]"), **self._recipe_cache_spec(NB, nb)})
        new_cache = {}
        q, k, v = self._recipe_qkv(self.q_proj(x), self.k_proj(x), self.v_proj(x), cache, new_cache,
                                   B, T, H, D, cu_seqlens)
        g = None if self.gate is None else self.gate(x)
        o, S = _sp.sequence_op("linear_attention", linear_attention)(q, k, v, log_decay=g, initial_state=cache["state"],
                                output_final_state=True,
                                chunk_size=self.chunk_size, impl=self.impl,
                                cu_seqlens=cu_seqlens)
        o = self._recipe_out(o).reshape(B, T, H * D)
        return self.o_proj(o), {"state": S.astype(cache["state"].dtype), **new_cache}


#: Feature maps of :class:`DeltaNet` (every mixer's ``feature_map`` option).
DELTA_FEATURE_MAPS = RECIPE_FEATURE_MAPS


class DeltaNet(RecipeMixin, Mixer):
    """(Gated) DeltaNet: the delta rule with learned write strengths (docs/linear_attention.md).

    ``q, k, v = conv(x W_q), conv(x W_k), conv(x W_v)`` (optional short causal conv, each
    followed by SiLU), then q, k through ``feature_map`` (``silu+l2``: SiLU then L2 norm
    over D, the default — with the conv the SiLU is the conv's); ``β_t = σ(x_t W_β)``;
    optional gate ``g_t`` (:class:`DecayGate`, gated DeltaNet). Then
    ``S ← e^{g_t} S``, ``S ← S + β_t k_tᵀ (v_t − k_t S)``, ``o_t = (D^{−1/2} q_t) S`` via
    :func:`tttla_jax.delta_rule`, a per-head RMSNorm and ``o_proj``. (Yang et al., 2024,
    "Parallelizing Linear Transformers with the Delta Rule", §4; gated: Yang, Kautz &
    Hatamizadeh, 2024.)

    Args:
      width, num_heads, head_dim: as :class:`LinearAttention`.
      use_short_conv: causal depthwise conv of ``conv_size`` taps on q, k, v.
      conv_size: conv taps.
      feature_map: on q and k after the conv (:data:`DELTA_FEATURE_MAPS`; default ``"silu+l2"``).
      short_conv, qk_norm, head_norm: the recall recipes (:mod:`tttla_jax.nn.recipes`,
        docs/recipes.md), the same options as every mixer. ``short_conv`` (taps, 0 = off)
        overrides ``use_short_conv``/``conv_size`` when given (default ``None``: ``conv_size``
        with ``use_short_conv``, else 0); ``qk_norm`` adds an L2 norm of q, k after the
        feature map; ``head_norm`` (default on) is the per-head output RMSNorm.
      use_gate: gated DeltaNet (data-dependent log-decay).
      gate_kind: ``"head"`` (gated DeltaNet) | ``"channel"`` (one log-decay per key channel:
        Kimi Delta Attention, ``S ← diag(e^{g_t}) S`` before the delta step); with ``use_gate``.
      chunk_size: chunk length of the chunked (WY) form and of the kernel.
      impl: ``"pallas"`` | ``"chunked"`` | ``"recurrent"`` | ``"auto"``: passed to
        :func:`tttla_jax.delta_rule`, which resolves ``"auto"`` (the Pallas forward and
        backward kernels on GPU/TPU where they support the shape, else the chunked
        form) and says why an explicit request cannot run — e.g. ``"pallas"`` with an
        unsupported head dim or a per-channel gate (docs/implementations.md).

    Parameters: ``4·W·H·D + W·H + D`` (+ ``3·conv_size·H·D`` with the conv, + ``W·H + 2H``
    with the gate).

    Cache: ``{"state": [B, H, D, D]}`` plus, with the conv, ``"conv_q"``, ``"conv_k"``,
    ``"conv_v"``: the last ``conv_size − 1`` pre-conv inputs ``[B, conv_size−1, H·D]``.

    Packed sequences: ``__call__(x, cu_seqlens=cu)`` as :class:`LinearAttention`; every cache
    entry is per sequence (batch N), and the short convs do not cross a boundary (a tap
    before a sequence's start reads that sequence's conv state).
    """

    impls = ("pallas", "chunked", "recurrent")

    @property
    def sequence_parallel_form(self) -> str:
        """``"associative"`` (the :mod:`tttla_jax.parallel` op combines the state across
        devices); ``"pipelined"`` with per-channel gates."""
        return "pipelined" if getattr(self, "gate_kind", "head") == "channel" else "associative"

    def __init__(self, *, width: int, num_heads: int, head_dim: Optional[int] = None,
                 use_short_conv: bool = True, conv_size: int = 4, feature_map: str = "silu+l2",
                 use_gate: bool = False, gate_kind: str = "head", chunk_size: int = 64, impl: str = "auto",
                 norm_eps: float = 1e-6, short_conv: Optional[int] = None, qk_norm: bool = False,
                 head_norm: bool = True, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_heads(width, num_heads, head_dim)
        _checks.check_choice("feature_map", feature_map, DELTA_FEATURE_MAPS)
        _checks.check_choice("gate_kind", gate_kind, GATE_KINDS)
        self.gate_kind = gate_kind
        chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
        conv_size = _checks.check_positive_int("conv_size", conv_size)
        if short_conv is None:  # the older names: use_short_conv / conv_size
            short_conv = conv_size if use_short_conv else 0
        self.impl = check_layer_impl(type(self), impl)
        self.width, self.num_heads = operator.index(width), operator.index(num_heads)
        self.feature_map, self.use_gate = feature_map, use_gate
        self.chunk_size = chunk_size
        self.dtype, self.param_dtype = dtype, param_dtype
        HD = num_heads * self.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.k_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.v_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.b_proj = dense(width, num_heads, ("embed", "heads"), **kw)
        self._init_recipe(features=HD, short_conv=short_conv, feature_map=feature_map, qk_norm=qk_norm,
                          head_norm=head_norm, head_dim=self.head_dim, norm_eps=norm_eps, **kw)
        self.use_short_conv = self.short_conv > 0
        self.conv_size = self.short_conv or conv_size
        self.gate = DecayGate(width, num_heads, channels=_gate_channels(gate_kind, self.head_dim),
                              **kw) if use_gate else None
        self.o_proj = dense(HD, width, ("heads", "embed"), **kw)

    def _cache_spec(self, B: int, b: str = "B") -> dict:
        D, H = self.head_dim, self.num_heads
        return {"state": ((B, H, D, D), f"[{b}, H, D, D]"), **self._recipe_cache_spec(B, b)}

    def init_cache(self, batch_size: int) -> Cache:
        _checks.check_positive_int("batch_size", batch_size)
        spec = self._cache_spec(batch_size)
        cache = {"state": jnp.zeros(spec["state"][0], self._state_dtype())}
        for name in ("conv_q", "conv_k", "conv_v"):
            if name in spec:
                cache[name] = jnp.zeros(spec[name][0], self._act_dtype())
        return cache

    def __call__(self, x: Float[Array, "b t w"], *, cache: Optional[Cache] = None,
                 positions: Optional[Int[Array, "b t"]] = None,
                 cu_seqlens: Optional[Int[Array, "n1"]] = None):
        """Returns ``(y [B, T, W], new_cache)``; ``positions`` is accepted and unused.

        ``cu_seqlens`` ``[N + 1]``: packed sequences in ``x`` ``[1, T, W]``, caches per
        sequence (batch N; see the class doc).
        """
        B, T = self._check_x(x)
        NB, nb = self._cache_batch(B, T, cu_seqlens)
        if cache is None:
            cache = self.init_cache(NB)
        _check_cache(cache, self._cache_spec(NB, nb))
        new_cache = {}
        q, k, v = self._recipe_conv(self.q_proj(x), self.k_proj(x), self.v_proj(x), cache, new_cache,
                                    cu_seqlens)
        q, k, v = self._heads(q, B, T), self._heads(k, B, T), self._heads(v, B, T)
        # "silu+l2" after the conv is the L2 norm only: the conv already ends with SiLU
        fmap = "l2" if (self.feature_map == "silu+l2" and self.short_conv) else self.feature_map
        q, k = self._recipe_qk(q, k, fmap)
        sd = _checks.state_dtype(x, self.b_proj.kernel[...])
        beta = jax.nn.sigmoid(self.b_proj(x).astype(sd)).astype(q.dtype)
        g = None if self.gate is None else self.gate(x)
        o, S = _sp.sequence_op("delta_rule", delta_rule)(q, k, v, beta, log_decay=g, initial_state=cache["state"],
                          output_final_state=True, chunk_size=self.chunk_size,
                          impl=self.impl, cu_seqlens=cu_seqlens)
        new_cache["state"] = S.astype(cache["state"].dtype)
        D, H = self.head_dim, self.num_heads
        o = self._recipe_out(o).reshape(B, T, H * D)
        return self.o_proj(o), new_cache


def sliding_window_attend(q, k, v, qpos, cache: Cache, *, window: int, segments=None):
    """Causal softmax attention of T queries against ``[cached keys ; T new keys]``, blocked.

    In the sequence ``[cached keys ; new keys]`` the query of a token attends to the last
    ``window`` tokens up to and including itself, among them those at positions
    ``p − window < p' ≤ p`` (``p`` its position; slots with position −1 are empty):
    ``o = softmax(q Kᵀ / √D + mask) V``. With increasing positions (the default, or any
    strictly increasing ``positions``) the position condition alone selects exactly those
    tokens; with arbitrary positions the order condition keeps a full call, the same
    sequence fed in pieces and token-by-token decoding equal (the cache holds the last
    ``window`` tokens). Shared by :class:`SlidingWindowAttention` and the hybrid branch of
    the LaCT layer.

    Memory is ``O(T·window)``: for ``T > window`` the queries are cut into blocks of
    ``window`` tokens, each attending to its own block and the previous one (the cache
    for the first), so no ``T × T`` score matrix is formed; for ``T ≤ window`` one block
    attends to all ``window + T`` keys.

    Args:
      q, k, v: ``[B, T, H, D]`` (q, k already rotated).
      qpos: ``[B, T]`` int positions of the new tokens.
      cache: ``{"k", "v": [B, window, H, D], "kpos": [B, window]}`` (other keys ignored).
      window: attention window.
      segments: optional ``[B, T]`` int ids of the new tokens: a query then sees only new
        keys of its own id (the cached keys of ``cache`` none); used by
        :func:`sliding_window_attend_packed`.

    Returns:
      ``(o [B, T, H, D], {"k", "v", "kpos", "pos"})``: the last ``window`` keys/values and
      their positions, and the next position.
    """
    w = window
    B, T, H, D = q.shape
    kk = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)      # [B, w+T, H, D]
    vv = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
    kpos = jnp.concatenate([cache["kpos"], qpos.astype(jnp.int32)], axis=1)    # [B, w+T]
    new = {"k": kk[:, T:], "v": vv[:, T:], "kpos": kpos[:, T:],
           "pos": qpos[:, -1].astype(jnp.int32) + 1}
    qpos = qpos.astype(jnp.int32)
    if segments is None:
        qseg = jnp.zeros((B, T), jnp.int32)
        kseg = jnp.zeros((B, w + T), jnp.int32)
    else:
        qseg = jnp.asarray(segments, jnp.int32)
        kseg = jnp.concatenate([jnp.full((B, w), -1, jnp.int32), qseg], axis=1)
    if T <= w:  # one block of T queries against all w + T keys
        c, n = T, 1
        qb, qpb = q[:, None], qpos[:, None]                                    # [B, 1, T, ...]
        kb, vb, kpb = kk[:, None], vv[:, None], kpos[:, None]                  # [B, 1, w+T, ...]
        qsb, ksb = qseg[:, None], kseg[:, None]
    else:  # n blocks of w queries, each against its previous and its own block (2w keys)
        c, n = w, -(-T // w)
        pad = n * w - T

        def padded(a, value=0):
            return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=value)

        def two_blocks(a, value=0):  # [B, w + T, ...] -> [B, n, 2w, ...]
            a = padded(a, value).reshape(B, n + 1, w, *a.shape[2:])
            return jnp.concatenate([a[:, :-1], a[:, 1:]], axis=2)

        qb, qpb = padded(q).reshape(B, n, w, H, D), padded(qpos).reshape(B, n, w)
        kb, vb, kpb = two_blocks(kk), two_blocks(vv), two_blocks(kpos, -1)   # pads: empty slots
        qsb, ksb = padded(qseg).reshape(B, n, w), two_blocks(kseg, -1)
    sd = _checks.state_dtype(q, kk)
    s = jnp.einsum("bnthd,bnshd->bnhts", qb.astype(sd), kb.astype(sd)) * (D ** -0.5)
    # query r of a block sits at key slot r + w of that block's keys: it sees slots r+1 .. r+w
    r, j = jnp.arange(c)[:, None], jnp.arange(c + w)[None, :]
    last_w = (j > r) & (j <= r + w)                                            # [c, c+w]
    kp, qp = kpb[:, :, None, :], qpb[:, :, :, None]
    mask = last_w & (kp >= 0) & (kp <= qp) & (kp > qp - w)                    # [B, n, c, c+w]
    mask = mask & (ksb[:, :, None, :] == qsb[:, :, :, None])
    s = jnp.where(mask[:, :, None], s, jnp.finfo(sd).min)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bnhts,bnshd->bnthd", p, vb.astype(sd)).reshape(B, n * c, H, D)[:, :T]
    return o.astype(q.dtype), new


def sliding_window_attend_packed(q, k, v, qpos, cache: Cache, *, window: int, cu_seqlens,
                                 recurrent: bool = False, fresh: bool = False):
    """:func:`sliding_window_attend` for N packed sequences (``cu_seqlens`` ``[N + 1]``).

    ``q, k, v`` ``[1, T, H, D]``, ``qpos`` ``[1, T]``; ``cache`` per sequence (``"k"``, ``"v"``
    ``[N, window, H, D]``, ``"kpos"`` ``[N, window]``). Each sequence's cached keys are put in
    front of its new tokens (an extended stream of ``T + N·window`` tokens, so ``O((T +
    N·window)·window)`` memory) and the blocked attention runs on it with a sequence-id mask
    (``recurrent``: the token scan, reset at every sequence's first slot): no key crosses a
    sequence boundary, and each sequence's new cache is the last ``window`` slots of its
    extended stream — what the sequence alone gives.

    ``fresh`` (static: ``cache`` is a fresh ``init_cache``, e.g. training): no cached keys to
    put in front, so the blocked attention runs on the ``T`` packed tokens with the sequence
    mask directly (same outputs and caches, ``O(T·window)``).

    Returns:
      ``(o [1, T, H, D], {"k", "v", "kpos"})`` with per-sequence caches.
    """
    w = window
    _, T, H, D = q.shape
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    N = cu.shape[0] - 1
    if fresh and not recurrent:
        t = jnp.arange(T, dtype=jnp.int32)
        n_t = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), N - 1).astype(jnp.int32)
        empty = {"k": jnp.zeros((1, w, H, D), cache["k"].dtype), "v": jnp.zeros((1, w, H, D), cache["v"].dtype),
                 "kpos": jnp.full((1, w), -1, jnp.int32)}
        o, _ = sliding_window_attend(q, k, v, qpos, empty, window=w, segments=n_t[None])
        idx = cu[1:, None] - w + jnp.arange(w, dtype=jnp.int32)[None]                  # [N, w]
        ok = idx >= cu[:-1, None]
        take = lambda a, fill: jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - 2)),   # noqa: E731
                                         jnp.take(a[0], jnp.clip(idx, 0, T - 1), axis=0), fill)
        new = {"k": take(k.astype(cache["k"].dtype), jnp.zeros((), cache["k"].dtype)),
               "v": take(v.astype(cache["v"].dtype), jnp.zeros((), cache["v"].dtype)),
               "kpos": take(qpos.astype(jnp.int32), jnp.int32(-1))}
        return o, new
    Te = T + N * w
    e = jnp.arange(Te, dtype=jnp.int32)
    ends = cu[1:] + jnp.arange(1, N + 1, dtype=jnp.int32) * w               # [N] end of each extended stream
    ie = jnp.minimum(jnp.searchsorted(ends, e, side="right"), N - 1).astype(jnp.int32)
    local = e - (cu[ie] + ie * w)
    idx = jnp.where(local < w, ie * w + jnp.clip(local, 0, w - 1), N * w + cu[ie] + local - w)

    def ext(c, a):  # [N, w, ...] cache rows then [1, T, ...] tokens -> [1, Te, ...]
        src = jnp.concatenate([c.astype(a.dtype).reshape((N * w,) + c.shape[2:]), a[0]], axis=0)
        return jnp.take(src, idx, axis=0, mode="clip")[None]

    ke, ve = ext(cache["k"], k.astype(cache["k"].dtype)), ext(cache["v"], v.astype(cache["v"].dtype))
    pe = ext(cache["kpos"], qpos.astype(jnp.int32))
    qe = ext(jnp.zeros(cache["k"].shape, q.dtype), q)
    empty = {"k": jnp.zeros((1, w, H, D), ke.dtype), "v": jnp.zeros((1, w, H, D), ve.dtype),
             "kpos": jnp.full((1, w), -1, jnp.int32)}
    if recurrent:
        def step(c, xs):
            qt, kt, vt, pt, first = xs
            c = jax.tree_util.tree_map(lambda a, b: jnp.where(first, b, a), c, empty)
            o, c2 = sliding_window_attend(qt[:, None], kt[:, None], vt[:, None], pt[:, None], c, window=w)
            return {key: c2[key] for key in empty}, o[:, 0]

        tm = lambda a: jnp.moveaxis(a, 1, 0)
        _, oe = lax.scan(step, empty, (tm(qe), tm(ke), tm(ve), tm(pe), local == 0))
        oe = jnp.moveaxis(oe, 0, 1)
    else:
        oe, _ = sliding_window_attend(qe, ke, ve, pe, empty, window=w, segments=ie[None])
    t = jnp.arange(T, dtype=jnp.int32)
    n_t = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), N - 1).astype(jnp.int32)
    o = jnp.take(oe[0], t + (n_t + 1) * w, axis=0)[None]
    last = (cu[1:] + jnp.arange(N, dtype=jnp.int32) * w)[:, None] + jnp.arange(w, dtype=jnp.int32)[None]
    new = {"k": jnp.take(ke[0], last, axis=0), "v": jnp.take(ve[0], last, axis=0),
           "kpos": jnp.take(pe[0], last, axis=0)}
    return o, new


class SlidingWindowAttention(RecipeMixin, Mixer):
    """Causal softmax attention over a sliding window of ``window`` tokens, with RoPE.

    Token at position ``p`` attends to keys at positions ``p − window < p' ≤ p`` (among
    the last ``window`` tokens, which is the same thing for increasing positions; see
    :func:`sliding_window_attend`): ``o = softmax(q Kᵀ / √D + mask) V`` (Beltagy et al.,
    2020; the hybrid partner of LaCT-LLM). Keys are rotated (:func:`apply_rope`) before
    they are cached.

    Implementations (``impl``, docs/implementations.md): ``"chunked"`` (and ``"auto"``)
    is blocked attention: blocks of ``window`` queries attend to their own block and the
    previous one (the cache for the first), ``O(T·window)`` memory, no ``T × T`` scores;
    ``"recurrent"`` runs a ``lax.scan`` over tokens, each step appending one key to the
    rolling cache and attending — exactly what decoding does. Both give the same outputs,
    caches and gradients.

    Recall recipes (:mod:`tttla_jax.nn.recipes`, docs/recipes.md; all off by default):
    ``short_conv`` (conv taps on q, k, v before RoPE, 0 = off; cache ``"conv_q"``,
    ``"conv_k"``, ``"conv_v"`` ``[B, short_conv−1, H·D]``), ``feature_map`` (on q, k,
    default ``"identity"``), ``qk_norm`` (L2 norm of q, k), ``head_norm`` (per-head output
    RMSNorm).

    Parameters: ``4·W·H·D``.

    Cache: ``"k", "v"`` ``[B, window, H, D]`` (the last ``window`` rotated keys and values,
    in the activation dtype), ``"kpos"`` ``[B, window]`` int32 (their positions, −1 for an
    empty slot) and ``"pos"`` ``[B]`` int32 (the next position, used when ``positions``
    is not passed).
    """

    impls = ("chunked", "recurrent")

    def __init__(self, *, width: int, num_heads: int, head_dim: Optional[int] = None,
                 window: int = 64, use_rope: bool = True, rope_base: float = 10000.0,
                 impl: str = "auto", short_conv: int = 0, feature_map: str = "identity",
                 qk_norm: bool = False, head_norm: bool = False, norm_eps: float = 1e-6, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_heads(width, num_heads, head_dim)
        window = _checks.check_positive_int("window", window)
        self.impl = check_layer_impl(type(self), impl)
        if use_rope and self.head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head dim, got {self.head_dim}")
        self.width, self.num_heads, self.window = operator.index(width), operator.index(num_heads), window
        self.use_rope, self.rope_base = use_rope, positive_float("rope_base", rope_base)
        self.dtype, self.param_dtype = dtype, param_dtype
        HD = num_heads * self.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.k_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.v_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.o_proj = dense(HD, width, ("heads", "embed"), **kw)
        self._init_recipe(features=HD, short_conv=short_conv, feature_map=feature_map, qk_norm=qk_norm,
                          head_norm=head_norm, head_dim=self.head_dim, norm_eps=norm_eps, **kw)

    def _cache_spec(self, B: int, b: str = "B") -> dict:
        w, H, D = self.window, self.num_heads, self.head_dim
        return {"k": ((B, w, H, D), f"[{b}, window, H, D]"), "v": ((B, w, H, D), f"[{b}, window, H, D]"),
                "kpos": ((B, w), f"[{b}, window]"), "pos": ((B,), f"[{b}]"), **self._recipe_cache_spec(B, b)}

    def init_cache(self, batch_size: int) -> Cache:
        _checks.check_positive_int("batch_size", batch_size)
        w, H, D, dt = self.window, self.num_heads, self.head_dim, self._act_dtype()
        return {"k": jnp.zeros((batch_size, w, H, D), dt), "v": jnp.zeros((batch_size, w, H, D), dt),
                "kpos": jnp.full((batch_size, w), -1, jnp.int32),
                "pos": jnp.zeros((batch_size,), jnp.int32), **self._recipe_init_cache(batch_size, dt)}

    def _attend(self, q, k, v, qpos, cache):
        """T queries against ``[cache ; T new keys]`` (blocked). Returns (o, cache')."""
        return sliding_window_attend(q, k, v, qpos, cache, window=self.window)

    def __call__(self, x: Float[Array, "b t w"], *, cache: Optional[Cache] = None,
                 positions: Optional[Int[Array, "b t"]] = None,
                 cu_seqlens: Optional[Int[Array, "n1"]] = None):
        """Returns ``(y [B, T, W], new_cache)``.

        ``positions`` ``[B, T]`` (or ``[T]``) absolute integer positions; default
        ``cache["pos"] + arange(T)``. They drive both RoPE and the window mask.

        ``cu_seqlens`` ``[N + 1]``: N packed sequences in ``x`` ``[1, T, W]``, each attending
        only to itself (:func:`sliding_window_attend_packed`, both impls); the cache in and
        out holds one entry per sequence (leading dim N) and positions default to each
        sequence's ``cache["pos"] + 0, 1, …`` (restarting at 0 with a fresh cache).
        """
        B, T = self._check_x(x)
        NB, nb = self._cache_batch(B, T, cu_seqlens)
        fresh = cache is None
        if fresh:
            cache = self.init_cache(NB)
        _check_cache(cache, self._cache_spec(NB, nb))
        if cu_seqlens is not None:
            positions = packed_positions(positions, cache["pos"], cu_seqlens, T)
        else:
            positions = resolve_positions(positions, cache, B, T)
        conv_cache = {}  # the recipe conv's taps (short_conv), then the attention cache alone
        q, k, v = self._recipe_qkv(self.q_proj(x), self.k_proj(x), self.v_proj(x), cache, conv_cache,
                                   B, T, self.num_heads, self.head_dim, cu_seqlens)
        cache = {key: val for key, val in cache.items() if key not in conv_cache}
        if self.use_rope:
            q = apply_rope(q, positions, base=self.rope_base)
            k = apply_rope(k, positions, base=self.rope_base)
        if cu_seqlens is not None:
            o, new_cache = sliding_window_attend_packed(q, k, v, positions, cache, window=self.window,
                                                        cu_seqlens=cu_seqlens, fresh=fresh,
                                                        recurrent=self.impl == "recurrent")
            new_cache["pos"] = packed_next_pos(positions, cache["pos"], cu_seqlens)
        elif self.impl == "recurrent":
            def step(c, xs):
                qt, kt, vt, pt = xs
                o, c = self._attend(qt[:, None], kt[:, None], vt[:, None], pt[:, None], c)
                return c, o[:, 0]

            tm = lambda a: jnp.moveaxis(a, 1, 0)
            new_cache, o = lax.scan(step, cache, (tm(q), tm(k), tm(v), tm(positions)))
            o = jnp.moveaxis(o, 0, 1)
        else:
            o, new_cache = self._attend(q, k, v, positions, cache)
        o = self._recipe_out(o)
        y = self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
        return y, {**new_cache, **conv_cache}


#: Mixer registry: config name -> class. ``LMConfig.mixers`` entries are keys of this.
MIXERS: dict[str, type] = {
    "linear_attention": LinearAttention,
    "delta_net": DeltaNet,
    "swa": SlidingWindowAttention,
}


def register_mixer(name: str, cls: type) -> type:
    """Add a mixer class to :data:`MIXERS` (used by the rule-zoo layers)."""
    if not (isinstance(cls, type) and issubclass(cls, Mixer)):
        raise ValueError(f"cls: expected a subclass of tttla_jax.nn.Mixer, got {cls!r}")
    MIXERS[name] = cls
    return cls


#: Constructor arguments every mixer receives from the model (not settable per mixer).
COMMON_ARGS = ("width", "num_heads", "head_dim", "impl", "dtype", "param_dtype", "rngs")


def mixer_options(cls: type) -> tuple:
    """Keyword options a mixer accepts beyond :data:`COMMON_ARGS` (e.g. ``chunk_size``)."""
    params = inspect.signature(cls.__init__).parameters
    return tuple(n for n, p in params.items()
                 if n != "self" and n not in COMMON_ARGS and p.kind == p.KEYWORD_ONLY)
