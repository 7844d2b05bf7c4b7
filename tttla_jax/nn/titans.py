"""Titans neural-memory layer (Behrouz et al., 2025, "Titans: Learning to Memorize at Test
Time", §3.1) on :mod:`tttla_jax.rules.titans` (docs/rules/titans.md).

Layer (per token ``x ∈ R^W``, heads ``H`` of size ``D``)::

    q, k, v = x W_q, x W_k, x W_v         (q, k L2-normalised per head with qk_norm)
    θ_t = max_lr · sigmoid(x_t w_θ)        (per-token inner learning rate, per head)
    η_n = sigmoid(pool_c(x) w_η)           (per-chunk momentum, per head)
    α_n = sigmoid(pool_c(x) w_α)           (per-chunk forgetting, per head)
    o   = Titans memory read (docs/rules/titans.md):  o_t = M_{⌊(t+1)/c⌋}(q_t)
    y   = o_proj(RMSNorm_head(o))

``pool_c`` is the mean over the chunk's tokens; since ``w_η`` and ``w_α`` are linear it is
applied to the per-token projections (``mean(x) w = mean(x w)``). The memory is linear
(``M(k) = k W``, ``W_0 [H, D, D]`` learned) or a 2-layer MLP (``act(k W1) W2``).

TTT batches: the surprise of a token is taken at ``W_ref``, the memory at the start of its
TTT batch of ``batch_size`` tokens (a multiple of ``chunk_size``), counted from the first
token the cache has seen (the rule's ``batch_size``). The decoding cache holds the memory
and momentum at the last TTT-batch boundary plus the per-token inputs of the partial batch,
re-run with the next tokens (:mod:`tttla_jax.nn._segments`), so any split of a sequence
equals one call. The gates of a trailing partial chunk are pooled over its tokens and
zeros (they never reach an output: no token of a partial chunk reads its update).

Implementations (``impl``, docs/implementations.md) are the rule's: ``"chunked"`` (masked
linear attention inside each TTT batch, linear memory only), ``"associative"`` (a scan of
the chunks' affine maps inside each TTT batch) and ``"recurrent"`` (the ``lax.scan`` over
chunks); ``"auto"`` is the rule's choice (chunked for the linear memory, recurrent for the
MLP memory or when a TTT batch is one chunk).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax.nn._segments import run_segments, run_segments_packed
from tttla_jax.nn.layers import RMSNorm, dense, l2_normalize, partitioned
from tttla_jax.nn.mixers import Mixer, _check_cache, check_layer_impl, register_mixer, resolve_heads
from tttla_jax.nn.recipes import RecipeMixin
from tttla_jax.rules.titans import ACTIVATIONS, MEMORIES, TitansRule, TitansState

__all__ = ["TitansMemory"]


def _normal(std):
    def init(key, shape, dtype):
        return std * jax.random.normal(key, shape, dtype)
    return init


class TitansMemory(RecipeMixin, Mixer):
    """Titans neural memory as a token mixer (module docstring has the math).

    Args:
      width: model width ``W``. num_heads: ``H``. head_dim: ``D`` (default ``W // H``).
      chunk_size: ``c``, tokens per momentum / forgetting gate.
      batch_size: TTT batch in tokens (a positive multiple of ``chunk_size``); ``W_ref``
        is refreshed at every TTT-batch start. ``batch_size = chunk_size`` is the most
        sequential variant.
      memory: ``"linear"`` or ``"mlp"``. mlp_expansion: hidden width ``F = mlp_expansion·D``.
      activation: ``"gelu"`` (exact) or ``"silu"`` between the MLP memory's layers.
      max_lr: upper bound of ``θ_t``.
      qk_norm: L2-normalise q and k per head.
      short_conv, feature_map, head_norm: the other recall recipes (:mod:`tttla_jax.nn.recipes`,
        docs/recipes.md): conv taps (+ SiLU) on q, k, v (default 0 = off; cache ``"conv_q"``,
        ``"conv_k"``, ``"conv_v"`` ``[B, short_conv−1, H·D]``), a feature map on q, k before
        the L2 norm (default ``"identity"``), the per-head output RMSNorm (default on).
      block_tokens: block length of the rule's chunked form.
      impl: ``"chunked"`` (linear memory) | ``"associative"`` | ``"recurrent"`` | ``"auto"``
        (module docstring).

    Parameters (``HD = H·D``): ``4·W·HD`` (q, k, v, o) ``+ 3·W·H`` (θ, η, α) ``+ D``
    (output norm) ``+ H·D²`` (linear ``W_0``) or ``+ 2·H·D·F`` (MLP ``W_0``).
    """

    impls = TitansRule.impls  # ("chunked", "associative", "recurrent")

    def __init__(self, *, width: int, num_heads: int, head_dim: Optional[int] = None,
                 chunk_size: int = 16, batch_size: int = 64, memory: str = "linear",
                 mlp_expansion: int = 4, activation: str = "gelu", max_lr: float = 0.1,
                 qk_norm: bool = True, block_tokens: int = 64, norm_eps: float = 1e-6,
                 short_conv: int = 0, feature_map: str = "identity", head_norm: bool = True,
                 impl: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_heads(width, num_heads, head_dim)
        chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
        if batch_size is None:
            raise ValueError(
                "batch_size: a layer needs a finite TTT batch (a multiple of chunk_size) so that "
                "decoding can resume at TTT-batch boundaries; got None")
        batch_size = _checks.check_positive_int("batch_size", batch_size)
        if batch_size % chunk_size:
            raise ValueError(f"batch_size: expected a multiple of chunk_size = {chunk_size}, got {batch_size}")
        _checks.check_choice("memory", memory, MEMORIES)
        _checks.check_choice("activation", activation, ACTIVATIONS)
        mlp_expansion = _checks.check_positive_int("mlp_expansion", mlp_expansion)
        block_tokens = _checks.check_positive_int("block_tokens", block_tokens)
        lr = _checks.check_scale(max_lr, "max_lr")
        if lr is None or not lr > 0:
            raise ValueError(f"max_lr: expected a positive float, got {max_lr!r}")
        check_layer_impl(type(self), impl)
        self.width, self.num_heads = width, num_heads
        self.chunk_size, self.batch_size, self.memory = chunk_size, batch_size, memory
        self.mlp_expansion, self.activation, self.max_lr = mlp_expansion, activation, float(max_lr)
        self.qk_norm, self.block_tokens, self.impl = qk_norm, block_tokens, impl
        self.dtype, self.param_dtype = dtype, param_dtype
        H, D, HD = num_heads, self.head_dim, num_heads * self.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.k_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.v_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.theta_proj = dense(width, H, ("embed", None), **kw)
        self.eta_proj = dense(width, H, ("embed", None), **kw)
        self.alpha_proj = dense(width, H, ("embed", None), **kw)
        if memory == "linear":
            self.W0 = nnx.Param(partitioned(_normal(D ** -0.5), (None, "head_dim", None))(
                rngs.params(), (H, D, D), param_dtype))
            self.W0_1 = self.W0_2 = None
        else:
            F = mlp_expansion * D
            self.W0 = None
            self.W0_1 = nnx.Param(partitioned(_normal(D ** -0.5), (None, "head_dim", None))(
                rngs.params(), (H, D, F), param_dtype))
            self.W0_2 = nnx.Param(partitioned(_normal(F ** -0.5), (None, None, "head_dim"))(
                rngs.params(), (H, F, D), param_dtype))
        self._init_recipe(features=HD, short_conv=short_conv, feature_map=feature_map, qk_norm=qk_norm,
                          head_norm=head_norm, head_dim=D, norm_eps=norm_eps, **kw)
        self.o_proj = dense(HD, width, ("heads", "embed"), **kw)
        self._rule().resolve_impl(impl)  # e.g. impl="chunked" with the MLP memory: fail here, with the reason

    # ----------------------------------------------------------------- rule / state
    def _rule(self) -> TitansRule:
        return TitansRule(chunk_size=self.chunk_size, batch_size=self.batch_size, memory=self.memory,
                          activation=self.activation, block_tokens=self.block_tokens)

    def _W0(self):
        if self.memory == "linear":
            return self.W0[...]
        return (self.W0_1[...], self.W0_2[...])

    def _to_flat(self, st: TitansState) -> dict:
        if self.memory == "linear":
            return {"memory": st.memory, "momentum": st.momentum}
        return {"memory_1": st.memory[0], "memory_2": st.memory[1],
                "momentum_1": st.momentum[0], "momentum_2": st.momentum[1]}

    def _from_flat(self, c: dict) -> TitansState:
        if self.memory == "linear":
            return TitansState(c["memory"], c["momentum"])
        return TitansState((c["memory_1"], c["memory_2"]), (c["momentum_1"], c["momentum_2"]))

    def _cache_spec(self, B: int, b: str = "B") -> dict:
        H, D, P = self.num_heads, self.head_dim, self.batch_size
        if self.memory == "linear":
            spec = {k: ((B, H, D, D), f"[{b}, H, D, D]") for k in ("memory", "momentum")}
        else:
            F = self.mlp_expansion * D
            spec = {"memory_1": ((B, H, D, F), f"[{b}, H, D, F]"), "momentum_1": ((B, H, D, F), f"[{b}, H, D, F]"),
                    "memory_2": ((B, H, F, D), f"[{b}, H, F, D]"), "momentum_2": ((B, H, F, D), f"[{b}, H, F, D]")}
        for name in ("buf_q", "buf_k", "buf_v"):
            spec[name] = ((B, P - 1, H, D), f"[{b}, batch_size-1, H, D]")
        for name in ("buf_theta", "buf_eta", "buf_alpha"):
            spec[name] = ((B, P - 1, H), f"[{b}, batch_size-1, H]")
        spec["buf_len"] = ((B,), f"[{b}]")
        spec.update(self._recipe_cache_spec(B, b))
        return spec

    def init_cache(self, batch_size: int) -> dict:
        """Fresh decoding state: ``M = W_0`` (learned, broadcast), momentum 0 (float32 /
        float64) at the last TTT-batch boundary; ``"buf_q"``, ``"buf_k"``, ``"buf_v"``
        ``[B, P−1, H, D]`` and ``"buf_theta"``, ``"buf_eta"``, ``"buf_alpha"`` ``[B, P−1, H]``
        (θ and the pre-pooling gate projections) of the partial TTT batch, ``"buf_len"``
        ``[B]`` its valid length (``P = batch_size``)."""
        _checks.check_positive_int("batch_size", batch_size)
        H, D, P = self.num_heads, self.head_dim, self.batch_size
        sd, ad = self._state_dtype(), self._act_dtype()
        W0 = jax.tree_util.tree_map(lambda w: w.astype(sd), self._W0())
        cache = self._to_flat(self._rule().init_state(W0, batch_size))
        for name in ("buf_q", "buf_k", "buf_v"):
            cache[name] = jnp.zeros((batch_size, P - 1, H, D), ad)
        for name in ("buf_theta", "buf_eta", "buf_alpha"):
            cache[name] = jnp.zeros((batch_size, P - 1, H), sd)
        cache["buf_len"] = jnp.zeros((batch_size,), jnp.int32)
        cache.update(self._recipe_init_cache(batch_size, ad))
        return cache

    # ----------------------------------------------------------------- forward
    def __call__(self, x: Float[Array, "b t w"], *, cache: Optional[dict] = None,
                 positions: Optional[Int[Array, "b t"]] = None,
                 cu_seqlens: Optional[Int[Array, "n1"]] = None):
        """Returns ``(y [B, T, W], new_cache)``; ``positions`` is accepted and unused.

        ``cu_seqlens`` ``[N + 1]``: N packed sequences in ``x`` ``[1, T, W]``, each computed
        as if alone (every sequence starts a fresh TTT batch, the memory resets to its own
        cache entry); the cache in and out holds one entry per sequence (leading dim N).
        """
        B, T = self._check_x(x)
        NB, nb = self._cache_batch(B, T, cu_seqlens)
        empty = cache is None
        if empty:
            cache = self.init_cache(NB)
        _check_cache(cache, self._cache_spec(NB, nb))
        H, D, c, P = self.num_heads, self.head_dim, self.chunk_size, self.batch_size
        conv_cache = {}  # recall recipes: conv on q, k, v, feature map and L2 norm on q, k
        q, k, v = self._recipe_qkv(self.q_proj(x), self.k_proj(x), self.v_proj(x), cache, conv_cache,
                                   B, T, H, D, cu_seqlens)
        sd = cache["buf_theta"].dtype
        theta = self.max_lr * jax.nn.sigmoid(self.theta_proj(x).astype(sd))
        eta_pre, alpha_pre = self.eta_proj(x).astype(sd), self.alpha_proj(x).astype(sd)
        rule = self._rule()
        impl = rule.resolve_impl(self.impl)

        def step(st, seg):
            qs, ks, vs, th, ep, ap = seg
            N = -(-qs.shape[1] // c)

            def pool(a):  # [B, L, H] -> [B, H, N]: mean over each chunk (zero-padded at the end)
                a = jnp.pad(a, ((0, 0), (0, N * c - a.shape[1]), (0, 0)))
                return jnp.moveaxis(jnp.mean(a.reshape(B, N, c, H), axis=2), 1, 2)

            eta, alpha = jax.nn.sigmoid(pool(ep)), jax.nn.sigmoid(pool(ap))  # [B, H, N]
            o, st2 = rule(qs, ks, vs, th, eta, alpha, st, impl=impl)
            st2 = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), st2, st)
            return st2, o

        names = ("buf_q", "buf_k", "buf_v", "buf_theta", "buf_eta", "buf_alpha")
        bufs = tuple(cache[n] for n in names)
        xs = (q, k, v, theta, eta_pre, alpha_pre)
        if cu_seqlens is not None:
            o, st, nbufs, nlen = run_segments_packed(step, self._from_flat(cache), xs, bufs,
                                                     cache["buf_len"], P, cu_seqlens, empty=empty)
        else:
            o, st, nbufs, nlen = run_segments(step, self._from_flat(cache), xs, bufs,
                                              cache["buf_len"], P, empty=empty)
        new_cache = self._to_flat(st)
        for name, b, old in zip(names, nbufs, bufs):
            new_cache[name] = b.astype(old.dtype)
        new_cache["buf_len"] = nlen
        new_cache.update(conv_cache)
        o = self._recipe_out(o.astype(self._act_dtype())).reshape(B, T, H * D)
        return self.o_proj(o), new_cache


register_mixer("titans", TitansMemory)
