"""The LaCT-LLM layer (docs/rules/lact.md "Layer around it"): SwiGLU fast weights trained in large
chunks at test time, optionally summed with a sliding-window softmax-attention branch,
with every rung of the paper's simplification ladder (docs/ladder.md) selectable by name.

Per token (row vectors; ``H`` fast-weight heads of dim ``D``, ``W`` width)::

    q, k, v      = split(x W_qkv)                        one fused projection [W, 3·H·D]
    q, k         = RMSNorm(q), RMSNorm(k)                 optional (attn_qk_norm)
    q̃, k̃         = q ⊙ s_q + b_q,  k ⊙ s_k + b_k          per-channel scale/offset (fast branch only)
    q̃, k̃, ṽ      = silu(q̃), silu(k̃), silu(v)               per head
    q̃, k̃         = q̃ / (‖q̃‖ + 1e-5), k̃ / (‖k̃‖ + 1e-5)      per-head L2 norm
    q̃, k̃         = RoPE(q̃), RoPE(k̃)                        (positions p; heads of the attention branch)
    lr0,lr1,lr2  = softplus(x W_lr + b_lr + softplus⁻¹(base_lr))      per head and token
    m            = sigmoid(x W_m + b_m)                    per head and token (momentum)
    o_ttt        = LaCT(q̃, k̃, ṽ, lr, m; W0, W1, W2)      chunk-causal, apply-then-update (docs/rules/lact.md)
    o_ttt        = RMSNorm_head(o_ttt) · silu(x W_g + b_g)   per-head norm and scalar gate
    y            = (o_ttt + SWA(q, k, v)) W_o              (SWA branch only with ``window``)

The fast-weight rule is :class:`tttla_jax.rules.LaCTRule` built from
``tttla_jax.rules.ladder.ladder(preset)``; this module adds the projections around it
and the decoding cache, and never re-derives the rule's math: it calls the rule's public
methods only (``prepare``, ``read``, ``chunk_update``, ``recurrent``, ``parallel``), and
reaches ``tt.linear_attention`` (hence the Pallas kernel) only through
``rule.linear_attention_reason()`` / ``rule.linear_attention_inputs(...)``. Parameter names follow the
official PyTorch ``lact_model`` layer (``LaCTSWIGLULayer``), so
:func:`tttla_jax.nn.weights.load_reference_weights` ports its checkpoints
(:meth:`LaCTLayer.reference_weight_map`).

Axis names: ``B`` batch, ``T`` tokens, ``H`` fast-weight heads, ``D`` head dim,
``dh`` fast-net hidden dim, ``C`` chunk size, ``W`` width.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax import impl as _impl
from tttla_jax.nn.layers import RMSNorm, apply_rope, dense, partitioned
from tttla_jax.nn.recipes import RecipeMixin, check_flag, feature_map as _feature_map
from tttla_jax.nn._segments import (packed_final, packed_gather, packed_next_pos, packed_positions,
                                   packed_scan, packed_scatter, packed_streams, packed_tail)
from tttla_jax.nn.mixers import (Cache, Mixer, _check_cache, check_layer_impl, register_mixer,
                                 resolve_heads, resolve_positions, sliding_window_attend,
                                 sliding_window_attend_packed)
from tttla_jax.nn.weights import (identity, jax_to_torch_linear, torch_linear_to_jax)
from tttla_jax.ops.chunk import chunk_layout, unchunk_layout
from tttla_jax.ops.linear_attention import linear_attention, pallas_reason
from tttla_jax.rules.lact import WEIGHT_NORMS, LaCTState
from tttla_jax.rules._numerics import sqrt0
from tttla_jax.rules.ladder import ANOMALIES, PRESETS, ladder

#: Every preset name accepted by ``LaCTLayer(preset=...)``: the ladder (docs/ladder.md) and the
#: anomalies of paper Table 1 (all on top of V0).
LACT_PRESETS = PRESETS + ANOMALIES

_L2_EPS = 1e-5  # reference: x / (‖x‖ + 1e-5)
_PRESET = "preset"  # sentinel: take the field from the preset


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def _real(name: str, value, *, what: str = "a positive float") -> float:
    """A Python float from a Python/NumPy/concrete JAX real scalar (bool and traced values refused)."""
    x = None if value is None else _checks.check_scale(value, name)
    if x is None or isinstance(x, jax.core.Tracer):
        raise ValueError(f"{name}: expected {what} (a Python, NumPy or concrete JAX scalar), got {value!r}")
    return x


def _l2_norm(x: Array) -> Array:
    """``x / (‖x‖ + 1e-5)`` over the last axis (the reference's ``l2_norm``), in float32/64."""
    xf = x.astype(_checks.state_dtype(x))
    # sqrt0: an all-zero row (padding) has the finite gradient I / eps, not NaN
    return (xf / (sqrt0(jnp.sum(xf * xf, axis=-1, keepdims=True)) + _L2_EPS)).astype(x.dtype)


def _fast_weight_init(fan_in: int):
    """``N(0, 1/fan_in)`` as the reference (``randn / sqrt(d_in)``), sharded over heads."""
    def init(key, shape, dtype):
        return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)
    return partitioned(init, ("heads", None, None))


class LaCTLayer(RecipeMixin, Mixer):
    """LaCT-LLM token mixer: large-chunk TTT with SwiGLU fast weights (docs/rules/lact.md), optionally
    hybrid with sliding-window attention, any ladder step or anomaly by name (docs/ladder.md).

    Args:
      width: model width ``W``.
      num_heads: fast-weight heads ``H`` (the reference's ``num_lact_heads``).
      head_dim: ``D`` (default ``W // H``); q, k, v of the fast branch are ``[H, D]``.
      preset: ``"v0"`` … ``"v6"`` (the ladder, cumulative: V0 = LaCT with all of W0/W1/W2
        updated, post weight norm, per-token lr, momentum, Muon; V1 updates only W1; V2
        drops weight norm (associative from here on); V3 a single linear fast layer;
        V4 a constant lr ``base_lr``; V5 no momentum; V6 no Muon = chunk-causal linear
        attention ``o = q (W1ᵀ + Σ lr kᵀv)``), or an anomaly on top of V0: ``"ascent"``
        (flipped update sign), ``"q_is_k"`` (read with keys), ``"inner_steps"`` (2 steps
        per chunk).
      chunk_size: ``C``, tokens per fast-weight update (the reference uses 2048).
      inter_multi: SwiGLU fast-net hidden dim ``dh = int(D · inter_multi)``.
      base_lr: ``softplus(0 + softplus⁻¹(base_lr)) = base_lr`` at a zero lr projection;
        the constant lr of presets without per-token lr (V4+).
      muon, use_momentum, weight_norm, inner_steps, muon_dtype: override the preset's
        rule field (``None`` / ``"preset"``: keep it). ``weight_norm`` is ``"post"``,
        ``"pre"`` or ``None``; ``muon_dtype="bfloat16"`` mimics the reference's NS5.
      window: if set, add the sliding-window softmax-attention branch over ``window``
        tokens (the LaCT-LLM hybrid; it shares the fused qkv projection).
      num_attn_heads: heads of the attention branch (default ``H``); must divide ``H·D``.
        RoPE of the fast branch uses the same head split (as the reference).
      attn_qk_norm: RMSNorm over ``H·D`` on q and k before both branches.
      qkv_bias: bias on the fused qkv projection.
      qkv_silu: SiLU on the fast q, k (and v unless ``v_silu=False``).
      v_silu: SiLU on the fast v (the reference's ``no_v_silu`` negated).
      ttt_rope: RoPE on the fast q, k (the reference's ``ttt_nope`` negated).
      rope_base: rotary base (the reference's ``rope_theta``).
      output_gate: the per-head ``silu(x W_g + b_g)`` output gate (the reference's
        ``learnable_ttt_scale``).
      norm_eps: epsilon of the per-head output RMSNorm (and of the q/k norms).
      short_conv, feature_map, qk_norm, head_norm: the recall recipes, as in every mixer
        (:mod:`tttla_jax.nn.recipes`, docs/recipes.md): conv taps (+ SiLU) on q, k, v right
        after the fused projection, before both branches (default 0 = off; cache
        ``"conv_q"``, ``"conv_k"``, ``"conv_v"`` ``[B, short_conv−1, H·D]``);
        ``feature_map`` on the fast q, k in place of their SiLU (default ``None``:
        ``"silu"`` with ``qkv_silu``, else ``"identity"``); ``qk_norm`` the fast branch's
        L2 norm of q, k (default on, the reference's); ``head_norm`` the per-head output
        RMSNorm ``ttt_norm`` (default on).
      impl: the implementation of a call without a cache (``cache=None``: training, and
        prefill through ``LanguageModel``, which passes ``None`` on a fresh call;
        docs/implementations.md): ``"pallas"`` (the linear-attention kernel; only when the
        rule is plain chunk-masked linear attention, ``rule.linear_attention_reason()`` is
        ``None``: V6-like), ``"chunked"`` / ``"associative"`` (for plain linear attention
        ``tt.linear_attention(masking="chunk", impl=...)`` on
        ``rule.linear_attention_inputs(...)``, else the rule's parallel layout of that name:
        associative presets, V2–V6), ``"recurrent"`` (the rule's chunk scan, every preset)
        or ``"auto"`` (the first of :attr:`impls` that can run — on GPU/TPU the associative
        layout before the chunked one — resolved at construction with
        :func:`tttla_jax.impl.resolve`; :attr:`resolved_impl`). A call with a cache
        (decoding, chunked prefill) runs the rule's chunk update in a masked scan whatever
        the impl (same results).
      dtype, param_dtype, rngs: as every mixer.

    Attributes:
      impl: the requested implementation; resolved_impl: the one a call without a cache runs.

    Raises:
      ValueError: at construction, naming the field: unknown preset, an impl the preset
        cannot run (:class:`tttla_jax.impl.ImplError`, with the reason: for a parallel
        layout the component from ``rule.breaks_associativity()``, for ``"pallas"`` the one
        from ``rule.linear_attention_reason()`` or the kernel's), bad sizes.

    Parameters (``HD = H·D``, reference names): ``qkv`` ``3·W·HD`` (+ ``3·HD`` bias),
    ``q_norm``/``k_norm`` ``2·HD`` (attn_qk_norm), ``qk_scale``/``qk_offset`` ``4·HD``,
    ``w0``/``w2`` ``2·H·dh·D`` (SwiGLU presets), ``w1`` ``H·D·dh`` (``H·D·D`` linear),
    ``lr_proj`` ``3·H·(W+1)`` (per-token lr), ``momentum_proj`` ``H·(W+1)`` (momentum),
    ``ttt_scale_proj`` ``H·(W+1)`` (output gate), ``ttt_norm`` ``D``, ``o_proj`` ``HD·W``.

    Cache (chunk-causal, apply-then-update: tokens of a chunk read the fast weights from
    before that chunk's update, which happens once the chunk is complete and another
    token follows — exactly the reference schedule where the last chunk is apply-only):
    ``"w0"/"w1"/"w2"`` fast weights before the buffered chunk ``[B, H, rows, cols]``
    (only the matrices of the preset), ``"main{i}"`` pre-norm accumulators,
    ``"mom{i}"`` momentum buffers (updated matrices), ``"buf_k"``, ``"buf_v"``
    ``[B, C, H, D]``, ``"buf_lr"`` ``[B, C, H, 3]`` (per-token lr), ``"buf_m"``
    ``[B, C, H]`` (momentum): the tokens of the current chunk (after RoPE / lr / gate
    nonlinearities), ``"buf_len"`` ``[B]`` int32 (0 only before the first token, then
    1..C), ``"pos"`` ``[B]`` int32 next position; with ``window``: ``"attn_k"``,
    ``"attn_v"`` ``[B, window, Ha, Da]``, ``"attn_kpos"`` ``[B, window]``. Fast weights and
    buffers in float32 (float64 for a float64 layer). ``buf_len == 0`` means a fresh
    sequence: the learned initial fast weights ``W^(0)`` are used and the cache's
    weights are ignored, so ``init_cache`` returns zeros.
    """

    #: implementations in "auto" preference order (docs/implementations.md)
    impls = ("pallas", "chunked", "associative", "recurrent")

    def __init__(self, *, width: int, num_heads: int, head_dim: Optional[int] = None,
                 preset: str = "v0", chunk_size: int = 64, inter_multi: float = 1.0,
                 base_lr: float = 1e-3, muon: Optional[bool] = None,
                 use_momentum: Optional[bool] = None, weight_norm=_PRESET,
                 inner_steps: Optional[int] = None, muon_dtype: Optional[str] = None,
                 window: Optional[int] = None, num_attn_heads: Optional[int] = None,
                 attn_qk_norm: bool = False, qkv_bias: bool = False, qkv_silu: bool = True,
                 v_silu: bool = True, ttt_rope: bool = True, rope_base: float = 10000.0,
                 output_gate: bool = True, norm_eps: float = 1e-5, impl: str = "auto",
                 short_conv: int = 0, feature_map: Optional[str] = None, qk_norm: bool = True,
                 head_norm: bool = True, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        D = self.head_dim = resolve_heads(width, num_heads, head_dim)
        _checks.check_choice("preset", preset, LACT_PRESETS)
        chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
        impl = check_layer_impl(type(self), impl)
        inter_multi = _real("inter_multi", inter_multi, what="a positive number")
        if int(D * inter_multi) < 1:
            raise ValueError(f"inter_multi: expected a positive number with int(head_dim * inter_multi) >= 1, "
                             f"got {inter_multi!r} (head_dim = {D})")
        base_lr = _real("base_lr", base_lr)
        if not base_lr > 0:
            raise ValueError(f"base_lr: expected a positive float, got {base_lr!r}")
        norm_eps = _real("norm_eps", norm_eps)
        if not norm_eps > 0:
            raise ValueError(f"norm_eps: expected a positive float, got {norm_eps!r}")
        for name, val in (("muon", muon), ("use_momentum", use_momentum)):
            if val is not None and not isinstance(val, bool):
                raise ValueError(f"{name}: expected True, False or None (keep the preset's), got {val!r}")
        overrides = {}
        if muon is not None:
            overrides["muon"] = muon
        if use_momentum is not None:
            overrides["use_momentum"] = use_momentum
        if weight_norm != _PRESET:
            _checks.check_choice("weight_norm", weight_norm, WEIGHT_NORMS + (_PRESET,))
            overrides["weight_norm"] = weight_norm
        if inner_steps is not None:
            overrides["inner_steps"] = _checks.check_positive_int("inner_steps", inner_steps)
        if muon_dtype is not None:
            overrides["muon_dtype"] = muon_dtype
        rule = ladder(preset, chunk_size=chunk_size, **overrides)
        if rule.constant_lr is not None:
            rule = dataclasses.replace(rule, constant_lr=float(base_lr))
        self.rule = rule

        HD = num_heads * D
        Ha = num_heads if num_attn_heads is None else num_attn_heads
        Ha = _checks.check_positive_int("num_attn_heads", Ha)
        if HD % Ha:
            raise ValueError(f"num_attn_heads: must divide num_heads * head_dim = {HD}, got {Ha}")
        Da = HD // Ha
        if window is not None:
            window = _checks.check_positive_int("window", window)
        if (window is not None or ttt_rope) and Da % 2:
            raise ValueError(f"num_attn_heads: RoPE needs an even head dim, got {HD} / {Ha} = {Da} "
                             f"(pass ttt_rope=False without a window to drop RoPE)")

        # the implementation of a call from an empty cache
        self.impl, self.preset = impl, preset
        sd = jnp.float64 if jnp.dtype(dtype or param_dtype) == jnp.float64 else jnp.float32
        self.resolved_impl = _impl.resolve(impl, self._impl_reasons(rule, impl, sd, D),
                                           where=f"LaCTLayer(preset={preset!r})")

        self.width, self.num_heads = width, num_heads
        self.chunk_size, self.window, self.num_attn_heads, self.attn_head_dim = chunk_size, window, Ha, Da
        self.attn_qk_norm, self.qkv_bias, self.qkv_silu, self.v_silu = attn_qk_norm, qkv_bias, qkv_silu, v_silu
        self.ttt_rope, self.rope_base, self.output_gate = ttt_rope, rope_base, output_gate
        self.base_lr, self.dtype, self.param_dtype = float(base_lr), dtype, param_dtype
        self.fast_hidden = D if rule.linear else int(D * inter_multi)
        dh = self.fast_hidden

        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = dense(width, 3 * HD, ("embed", "heads"), use_bias=qkv_bias, **kw)
        if feature_map is None:  # the older option: qkv_silu
            feature_map = "silu" if qkv_silu else "identity"
        self._init_recipe(features=HD, short_conv=short_conv, feature_map=feature_map, qk_norm=qk_norm, **kw)
        if attn_qk_norm:
            nkw = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype, axis_name="heads")
            self.q_norm, self.k_norm = RMSNorm(HD, **nkw), RMSNorm(HD, **nkw)
        else:
            self.q_norm = self.k_norm = None
        self.qk_scale = nnx.Param(partitioned(nnx.initializers.ones_init(), ("heads", None))(
            rngs.params(), (HD, 2), param_dtype))
        self.qk_offset = nnx.Param(partitioned(nnx.initializers.zeros_init(), ("heads", None))(
            rngs.params(), (HD, 2), param_dtype))
        if rule.linear:
            self.w0 = self.w2 = None
            self.w1 = nnx.Param(_fast_weight_init(D)(rngs.params(), (num_heads, D, D), param_dtype))
        else:
            self.w0 = nnx.Param(_fast_weight_init(D)(rngs.params(), (num_heads, dh, D), param_dtype))
            self.w1 = nnx.Param(_fast_weight_init(dh)(rngs.params(), (num_heads, D, dh), param_dtype))
            self.w2 = nnx.Param(_fast_weight_init(D)(rngs.params(), (num_heads, dh, D), param_dtype))
        self.per_token_lr = rule.constant_lr is None
        self.lr_proj = (dense(width, 3 * num_heads, ("embed", "heads"), use_bias=True, **kw)
                        if self.per_token_lr else None)
        self.momentum_proj = (dense(width, num_heads, ("embed", "heads"), use_bias=True, **kw)
                              if rule.use_momentum else None)
        self.ttt_scale_proj = (dense(width, num_heads, ("embed", "heads"), use_bias=True, **kw)
                               if output_gate else None)
        self.head_norm = check_flag("head_norm", head_norm)
        self.ttt_norm = (RMSNorm(D, eps=norm_eps, dtype=dtype, param_dtype=param_dtype, axis_name="head_dim")
                         if head_norm else None)
        self.o_proj = dense(HD, width, ("heads", "embed"), **kw)

    # ------------------------------------------------------------------ configuration
    def _impl_reasons(self, rule, impl: str, state_dtype, D: int) -> Dict[str, object]:
        """:attr:`impls` in "auto" order for this platform, each with why it cannot run this
        layer (``None``: it can; a callable is evaluated only when reached)."""
        la = rule.linear_attention_reason()
        par = rule.breaks_associativity()
        preset = self.preset

        def pallas():
            if la is not None:
                return f"the Pallas kernel computes linear attention and preset={preset!r} is {la}"
            return pallas_reason(lambda kernels, interpret: kernels.unsupported_reason(
                state_dtype, "chunk", D, D, rule.chunk_size, interpret=interpret), impl=impl)

        no_par = None if par is None else f"no parallel form: {par}"
        layouts = ("associative", "chunked") if _impl.on_accelerator() else ("chunked", "associative")
        return {"pallas": pallas, **{i: no_par for i in layouts}, "recurrent": None}

    def _fast_params(self):
        return tuple(None if w is None else w[...] for w in (self.w0, self.w1, self.w2))

    def _shapes(self):
        """``{i: (rows, cols)}`` of the fast-weight matrices of the preset."""
        D, dh = self.head_dim, self.fast_hidden
        if self.rule.linear:
            return {1: (D, D)}
        return {0: (dh, D), 1: (D, dh), 2: (dh, D)}

    def _cache_spec(self, B: int, b: str = "B") -> dict:
        H, D, C = self.num_heads, self.head_dim, self.rule.chunk_size
        spec = {}
        for i, (r, c) in self._shapes().items():
            spec[f"w{i}"] = ((B, H, r, c), f"[{b}, H, rows, cols]")
        for i in self.rule.updated:
            r, c = self._shapes()[i]
            if self.rule.weight_norm == "pre":
                spec[f"main{i}"] = ((B, H, r, c), f"[{b}, H, rows, cols]")
            if self.rule.use_momentum:
                spec[f"mom{i}"] = ((B, H, r, c), f"[{b}, H, rows, cols]")
        spec["buf_k"] = ((B, C, H, D), f"[{b}, chunk_size, H, D]")
        spec["buf_v"] = ((B, C, H, D), f"[{b}, chunk_size, H, D]")
        if self.per_token_lr:
            spec["buf_lr"] = ((B, C, H, 3), f"[{b}, chunk_size, H, 3]")
        if self.rule.use_momentum:
            spec["buf_m"] = ((B, C, H), f"[{b}, chunk_size, H]")
        spec["buf_len"] = ((B,), f"[{b}]")
        spec["pos"] = ((B,), f"[{b}]")
        if self.window is not None:
            w, Ha, Da = self.window, self.num_attn_heads, self.attn_head_dim
            spec["attn_k"] = ((B, w, Ha, Da), f"[{b}, window, Ha, Da]")
            spec["attn_v"] = ((B, w, Ha, Da), f"[{b}, window, Ha, Da]")
            spec["attn_kpos"] = ((B, w), f"[{b}, window]")
        spec.update(self._recipe_cache_spec(B, b))
        return spec

    _INT_KEYS = ("buf_len", "pos", "attn_kpos")

    def init_cache(self, batch_size: int) -> Cache:
        _checks.check_positive_int("batch_size", batch_size)
        sd, ad = self._state_dtype(), self._act_dtype()
        cache = {}
        for key, (shape, _) in self._cache_spec(batch_size).items():
            if key == "attn_kpos":
                cache[key] = jnp.full(shape, -1, jnp.int32)
            elif key in self._INT_KEYS:
                cache[key] = jnp.zeros(shape, jnp.int32)
            elif key.startswith("attn_") or key.startswith("conv_"):
                cache[key] = jnp.zeros(shape, ad)
            else:
                cache[key] = jnp.zeros(shape, sd)
        return cache

    # ------------------------------------------------------------------ projections
    def _project(self, x, positions, cache=None, new_cache=None, cu_seqlens=None):
        """Fast-branch q, k, v ``[B, T, H, D]``, lr ``[B, T, H, 3]`` (or None), momentum
        ``[B, T, H]`` (or None) and the attention branch's (q, k, v) (or None)."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        Ha, Da = self.num_attn_heads, self.attn_head_dim
        sd = _checks.state_dtype(x, self.qkv.kernel[...])
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        q, k, v = self._recipe_conv(q, k, v, cache, new_cache, cu_seqlens)  # recipe conv (short_conv)
        if self.attn_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        attn = None
        if self.window is not None:
            qa = apply_rope(q.reshape(B, T, Ha, Da), positions, base=self.rope_base)
            ka = apply_rope(k.reshape(B, T, Ha, Da), positions, base=self.rope_base)
            attn = (qa, ka, v.reshape(B, T, Ha, Da))
        sc, off = self.qk_scale[...].astype(q.dtype), self.qk_offset[...].astype(q.dtype)
        fq, fk, fv = q * sc[:, 0] + off[:, 0], k * sc[:, 1] + off[:, 1], v
        fq, fk, fv = (a.reshape(B, T, H, D) for a in (fq, fk, fv))
        fq, fk = _feature_map(self.feature_map, fq), _feature_map(self.feature_map, fk)  # SiLU by default
        if self.qkv_silu and self.v_silu:
            fv = jax.nn.silu(fv)
        if self.qk_norm:
            fq, fk = _l2_norm(fq), _l2_norm(fk)
        if self.ttt_rope:  # the reference rotates with the attention branch's head split
            fq = apply_rope(fq.reshape(B, T, Ha, Da), positions, base=self.rope_base).reshape(B, T, H, D)
            fk = apply_rope(fk.reshape(B, T, Ha, Da), positions, base=self.rope_base).reshape(B, T, H, D)
        lr = m = None
        if self.per_token_lr:
            z = self.lr_proj(x).astype(sd).reshape(B, T, H, 3)
            lr = jax.nn.softplus(z + _inv_softplus(self.base_lr))
        if self.rule.use_momentum:
            m = jax.nn.sigmoid(self.momentum_proj(x).astype(sd))
        return fq, fk, fv, lr, m, attn

    # ------------------------------------------------------------------ fast-weight forms
    def _state_to_cache(self, st: LaCTState) -> dict:
        sd = self._state_dtype()
        out = {}
        for i in self._shapes():
            out[f"w{i}"] = st.w[i].astype(sd)
        for i in self.rule.updated:
            if self.rule.weight_norm == "pre":
                out[f"main{i}"] = st.main[i].astype(sd)
            if self.rule.use_momentum:
                out[f"mom{i}"] = st.mom[i].astype(sd)
        return out

    def _buffers(self, k, v, lr, m):
        """The buffered-chunk cache entries from ``[B, C, ...]`` arrays (None: not kept)."""
        sd = self._state_dtype()
        out = {"buf_k": k.astype(sd), "buf_v": v.astype(sd)}
        if self.per_token_lr:
            out["buf_lr"] = lr.astype(sd)
        if self.rule.use_momentum:
            out["buf_m"] = m.astype(sd)
        return out

    def _fresh(self, q, k, v, lr, m):
        """A call from an empty cache: :attr:`resolved_impl` on T tokens from ``W^(0)``."""
        rule = self.rule
        B, T = k.shape[:2]
        st0 = rule.init_state(*self._fast_params(), B)
        impl = self.resolved_impl
        if impl != "recurrent" and rule.linear_attention_reason() is None:
            # plain chunk-masked linear attention (docs/ladder.md, V6): the op and its kernel
            o, S = linear_attention(**rule.linear_attention_inputs(q, k, v, lr, st0, m, output_final_state=True),
                                    impl=impl)
            o, st = o.astype(v.dtype), rule.state_from_linear_attention(S, st0)
        elif impl == "recurrent":
            o, st = rule.recurrent(q, k, v, lr, st0, momentum=m, output_final_state=True)
        else:
            o, st = rule.parallel(q, k, v, lr, st0, momentum=m, output_final_state=True, impl=impl)
        C = rule.chunk_size
        s = (-(-T // C) - 1) * C
        L = T - s
        pad = lambda a: None if a is None else jnp.pad(a[:, s:], [(0, 0), (0, C - L)] + [(0, 0)] * (a.ndim - 2))
        cache = {**self._state_to_cache(st), **self._buffers(pad(k), pad(v), pad(lr), pad(m)),
                 "buf_len": jnp.full((B,), L, jnp.int32)}
        return o, cache

    def _stream(self, q, k, v, lr, m, fc):
        """A call continuing a cache whose chunk buffer holds ``n = buf_len`` tokens.

        The buffered tokens and the new ones form one chunk-aligned sequence of
        ``R = n + T`` tokens (padded to whole chunks): chunk ``j`` is read with the state
        before it and updates it iff it is complete and followed by a token
        (``(j+1)·C < R``) — the rule's schedule, per batch row. Runs the rule's own
        preparation (``LaCTRule.prepare``: learning rates, chunk-mean momentum), chunk
        update (``LaCTRule.chunk_update``) and read (``LaCTRule.read``) in a masked scan.
        """
        rule = self.rule
        B, T, H, D = k.shape
        C = rule.chunk_size
        sd = self._state_dtype()
        n = fc["buf_len"].astype(jnp.int32)
        N = -(-(C + T) // C)
        P = N * C
        pos = jnp.arange(P, dtype=jnp.int32)
        idx = pos[None] - n[:, None]                               # [B, P] index into the new tokens
        in_new = (idx >= 0) & (idx < T)
        in_buf = pos[None] < n[:, None]
        take = jax.vmap(lambda a, i: a[i])

        def combine(buf, new):
            g = take(new.astype(sd), jnp.clip(idx, 0, T - 1))
            e = lambda msk: msk.reshape(msk.shape + (1,) * (g.ndim - 2))
            bufp = jnp.zeros_like(g) if buf is None else jnp.pad(
                buf.astype(sd), [(0, 0), (0, P - C)] + [(0, 0)] * (g.ndim - 2))
            return jnp.where(e(in_new), g, jnp.where(e(in_buf), bufp, jnp.zeros_like(g)))

        qc = combine(None, q)
        kc, vc = combine(fc["buf_k"], k), combine(fc["buf_v"], v)
        lrc = combine(fc["buf_lr"], lr) if self.per_token_lr else None
        mc = combine(fc["buf_m"], m) if rule.use_momentum else None

        # the state before the buffered chunk; a fresh row (n == 0) starts from W^(0)
        st0 = rule.init_state(*self._fast_params(), B)
        fresh = (n == 0)[:, None, None, None]
        pick = lambda p, key: None if p is None else jnp.where(fresh, p.astype(sd), fc[key].astype(sd))
        w = tuple(pick(p, f"w{i}") for i, p in enumerate(st0.w))
        main = None if st0.main is None else tuple(pick(p, f"main{i}") for i, p in enumerate(st0.main))
        mom = None if st0.mom is None else tuple(pick(p, f"mom{i}") for i, p in enumerate(st0.mom))
        st = LaCTState(w=w, main=main, mom=mom, norm=st0.norm)
        x = rule.prepare(qc, kc, vc, lrc, st, mc)  # chunk means over whole chunks (P = N·C)
        chunks = lambda a: jnp.moveaxis(chunk_layout(a, C), 2, 0)  # [N, B, H, C, ...]
        upd = ((jnp.arange(N)[:, None] + 1) * C) < (n + T)[None, :]  # [N, B]

        def step(st, xs):
            qi, ki, vi, l0, l1, l2, mb, u = xs
            o = rule.read(st, qi)

            def update(st):
                new = rule.chunk_update(st, ki, vi, (l0, l1, l2), mb)
                return jax.tree.map(lambda a, b: jnp.where(u[:, None, None, None], a, b), new, st)

            st = lax.cond(jnp.any(u), update, lambda s: s, st)
            return st, o

        xs = ((chunks(x.q), chunks(x.k), chunks(x.v)) + tuple(chunks(a) for a in x.lrs)
              + (jnp.moveaxis(x.chunk_momentum, 2, 0), upd))
        st, o = lax.scan(step, x.state, xs)
        o = unchunk_layout(jnp.moveaxis(o, 0, 2), P)                 # [B, P, H, D]
        o = jax.vmap(lambda a, s: lax.dynamic_slice_in_dim(a, s, T, 0))(o, n)
        # the new buffer: the last (partial or full) chunk of the R real tokens
        R = n + T
        start = ((R - 1) // C) * C
        cut = jax.vmap(lambda a, s: lax.dynamic_slice_in_dim(a, s, C, 0))
        bufs = self._buffers(cut(kc, start), cut(vc, start),
                             None if lrc is None else cut(lrc, start), None if mc is None else cut(mc, start))
        cache = {**self._state_to_cache(st), **bufs, "buf_len": (R - start).astype(jnp.int32)}
        return o.astype(v.dtype), cache

    def _packed(self, q, k, v, lr, m, fc, cu_seqlens, given: bool):
        """N packed sequences (``cu_seqlens``): every sequence's stream (its buffered chunk,
        then its new tokens) re-laid to start at a chunk boundary
        (:func:`tttla_jax.nn._segments.packed_streams`, at most ``T + N·(2C − 1)`` slots), one
        chunk scan over all of them with the state reset at each stream's first chunk — the
        schedule of :meth:`_stream` per sequence: a chunk is read with the state before it and
        updates it iff a token of its sequence follows. Caches per sequence (leading dim N)."""
        rule = self.rule
        _, T, H, D = k.shape
        C = rule.chunk_size
        sd = self._state_dtype()
        N = int(jnp.shape(cu_seqlens)[0]) - 1
        n = fc["buf_len"].astype(jnp.int32) if given else None
        lay = packed_streams(cu_seqlens, T, C, n, C if given else 0)
        buf = lambda key: fc[key].astype(sd) if (given and key is not None) else None

        def seg(a, key):  # [1, T, ...] -> [1, Nc·C, ...] (chunk-aligned streams)
            if a is None:
                return None
            g = packed_gather(lay, a.astype(sd), buf(key))                  # [Nc, 1, C, ...]
            return jnp.moveaxis(g, 0, 1).reshape((1, -1) + g.shape[3:])

        qc, kc, vc = seg(q, None), seg(k, "buf_k"), seg(v, "buf_v")
        lrc = seg(lr, "buf_lr") if self.per_token_lr else None
        mc = seg(m, "buf_m") if rule.use_momentum else None
        st0 = rule.init_state(*self._fast_params(), N)
        if given:  # a sequence with an empty buffer starts from W^(0)
            fresh = (n == 0)[:, None, None, None]
            pick = lambda p, key: None if p is None else jnp.where(fresh, p.astype(sd), fc[key].astype(sd))
            w = tuple(pick(p, f"w{i}") for i, p in enumerate(st0.w))
            main = None if st0.main is None else tuple(pick(p, f"main{i}") for i, p in enumerate(st0.main))
            mom = None if st0.mom is None else tuple(pick(p, f"mom{i}") for i, p in enumerate(st0.mom))
            st0 = LaCTState(w=w, main=main, mom=mom, norm=st0.norm)
        one = jax.tree_util.tree_map(lambda a: a[:1], st0)
        x = rule.prepare(qc, kc, vc, lrc, one, mc)       # chunk means over whole chunks
        init = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), st0, x.state)
        chunks = lambda a: jnp.moveaxis(chunk_layout(a, C), 2, 0)   # [Nc, 1, H, C, ...]
        upd = (lay.local + 1) * C < lay.R[lay.seq]                  # [Nc]: a token of the stream follows

        def step(st, xs):
            qi, ki, vi, l0, l1, l2, mb, u = xs
            o = rule.read(st, qi)
            st = lax.cond(u, lambda s: rule.chunk_update(s, ki, vi, (l0, l1, l2), mb), lambda s: s, st)
            return st, o

        xs = ((chunks(x.q), chunks(x.k), chunks(x.v)) + tuple(chunks(a) for a in x.lrs)
              + (jnp.moveaxis(x.chunk_momentum, 2, 0), upd))
        outs, states = packed_scan(step, init, lay, xs)
        o = packed_scatter(lay, jnp.swapaxes(outs, 2, 3))              # [1, T, H, D]
        nch = (lay.R + C - 1) // C
        st = packed_final(states, init, lay, jnp.maximum(nch - 1, 0))   # the state before the last chunk
        start = jnp.maximum((lay.R - 1) // C, 0) * C
        tail = lambda a, key: None if a is None else packed_tail(lay, a.astype(sd), buf(key), start, C)
        bufs = self._buffers(tail(k, "buf_k"), tail(v, "buf_v"),
                             tail(lr, "buf_lr") if self.per_token_lr else None,
                             tail(m, "buf_m") if rule.use_momentum else None)
        cache = {**self._state_to_cache(st), **bufs, "buf_len": (lay.R - start).astype(jnp.int32)}
        old = fc if given else {key: val for key, val in self.init_cache(N).items() if key in cache}
        keep = lay.R == 0   # an empty sequence leaves its cache as it was
        cache = {key: jnp.where(keep.reshape((-1,) + (1,) * (val.ndim - 1)), old[key].astype(val.dtype), val)
                 for key, val in cache.items()}
        return o.astype(v.dtype), cache

    # ------------------------------------------------------------------ call
    def __call__(self, x: Float[Array, "b t w"], *, cache: Optional[Cache] = None,
                 positions: Optional[Int[Array, "b t"]] = None,
                 cu_seqlens: Optional[Int[Array, "n1"]] = None):
        """Returns ``(y [B, T, W], new_cache)``.

        ``positions`` ``[B, T]`` (or ``[T]``) absolute positions for RoPE and the window;
        default ``cache["pos"] + arange(T)``.

        ``cu_seqlens`` ``[N + 1]``: N packed sequences in ``x`` ``[1, T, W]``, each computed
        as if alone (every sequence starts a fresh chunk, the attention branch never crosses a
        boundary); the cache in and out holds one entry per sequence (leading dim N);
        positions default to each sequence's ``cache["pos"] + 0, 1, …``. Packed calls run the
        chunk scan (``impl`` ``"recurrent"`` or ``"auto"``); the parallel impls raise
        :class:`tttla_jax.impl.ImplError`.
        """
        B, T = self._check_x(x)
        if T == 0:
            raise ValueError("x: expected at least one token (T >= 1), got T = 0")
        NB, nb = self._cache_batch(B, T, cu_seqlens)
        packed = cu_seqlens is not None
        if packed and self.impl not in ("auto", "recurrent"):
            raise _impl.ImplError(
                f"impl: LaCTLayer(preset={self.preset!r}) runs packed sequences (cu_seqlens) with its "
                f"chunk scan only; got impl={self.impl!r}, use impl='recurrent' or 'auto'")
        given = cache is not None
        if given:
            _check_cache(cache, self._cache_spec(NB, nb))
        else:
            cache = self.init_cache(NB)
        if packed:
            positions = packed_positions(positions, cache["pos"], cu_seqlens, T)
        else:
            positions = resolve_positions(positions, cache, B, T)

        conv_cache = {}
        q, k, v, lr, m, attn = self._project(x, positions, cache, conv_cache, cu_seqlens)
        fast_keys = [key for key in self._cache_spec(NB)
                     if key not in ("pos",) and not key.startswith(("attn_", "conv_"))]
        fc = {key: cache[key] for key in fast_keys}
        if packed:
            o, new_fc = self._packed(q, k, v, lr, m, fc, cu_seqlens, given)
        elif given:  # continue the cache: the masked chunk scan (rows with buf_len 0 start from W^(0))
            o, new_fc = self._stream(q, k, v, lr, m, fc)
        else:      # a fresh sequence: the resolved impl
            o, new_fc = self._fresh(q, k, v, lr, m)

        H, D = self.num_heads, self.head_dim
        o = o.astype(self._act_dtype())
        if self.ttt_norm is not None:
            o = self.ttt_norm(o)
        if self.output_gate:
            gate = jax.nn.silu(self.ttt_scale_proj(x))                 # [B, T, H]
            o = o * gate[..., None].astype(o.dtype)
        o = o.reshape(B, T, H * D)
        if packed:
            new_cache = {**new_fc, "pos": packed_next_pos(positions, cache["pos"], cu_seqlens)}
        else:
            new_cache = {**new_fc, "pos": positions[:, -1] + 1}
        new_cache.update(conv_cache)
        if self.window is not None:
            qa, ka, va = attn
            sub = {"k": cache["attn_k"], "v": cache["attn_v"], "kpos": cache["attn_kpos"]}
            if packed:
                oa, sub = sliding_window_attend_packed(qa, ka, va, positions, sub, window=self.window,
                                                       cu_seqlens=cu_seqlens, fresh=not given)
            else:
                oa, sub = sliding_window_attend(qa, ka, va, positions, sub, window=self.window)
            o = o + oa.reshape(B, T, H * D).astype(o.dtype)
            new_cache.update(attn_k=sub["k"], attn_v=sub["v"], attn_kpos=sub["kpos"])
        return self.o_proj(o), new_cache

    # ------------------------------------------------------------------ reference weights
    def reference_weight_map(self) -> dict:
        """Names of the official PyTorch ``lact_model`` layer (``LaCTSWIGLULayer``) →
        ``(attribute path, to_jax, to_torch)`` (protocol of :mod:`tttla_jax.nn.weights`).

        ``nn.Linear`` weights ``[out, in]`` are transposed; fast weights (``w0``, ``w2``
        ``[H, dh, D]``, ``w1`` ``[H, D, dh]``), ``qk_scale``/``qk_offset`` ``[H·D, 2]`` and
        the norms' ``weight`` share the reference layout. Only the parameters this
        configuration has are listed (e.g. no ``w0``/``w2`` for the linear presets V3+, no
        ``lr_proj`` with a constant lr). The attention branch of the reference has no
        parameters of its own (it shares ``qkv`` and ``o_proj``).
        """
        lin = (torch_linear_to_jax, jax_to_torch_linear)
        same = (identity, identity)
        m = {"qkv.weight": (("qkv", "kernel"), *lin),
             "qk_scale": (("qk_scale",), *same),
             "qk_offset": (("qk_offset",), *same),
             "w1": (("w1",), *same),
             "o_proj.weight": (("o_proj", "kernel"), *lin)}
        if self.head_norm:
            m["ttt_norm.weight"] = (("ttt_norm", "scale"), *same)
        if self.qkv_bias:
            m["qkv.bias"] = (("qkv", "bias"), *same)
        if self.attn_qk_norm:
            m["q_norm.weight"] = (("q_norm", "scale"), *same)
            m["k_norm.weight"] = (("k_norm", "scale"), *same)
        if not self.rule.linear:
            m["w0"] = (("w0",), *same)
            m["w2"] = (("w2",), *same)
        if self.per_token_lr:
            m["lr_proj.weight"] = (("lr_proj", "kernel"), *lin)
            m["lr_proj.bias"] = (("lr_proj", "bias"), *same)
        if self.output_gate:
            m["ttt_scale_proj.weight"] = (("ttt_scale_proj", "kernel"), *lin)
            m["ttt_scale_proj.bias"] = (("ttt_scale_proj", "bias"), *same)
        if self.rule.use_momentum:
            m["momentum_proj.0.weight"] = (("momentum_proj", "kernel"), *lin)
            m["momentum_proj.0.bias"] = (("momentum_proj", "bias"), *same)
        return m


register_mixer("lact", LaCTLayer)
