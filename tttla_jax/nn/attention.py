"""Full causal softmax attention with a key/value cache: the quadratic baseline of the recall
benchmarks (Zoology, Arora et al. 2023: attention solves MQAR at every setting).

Registered as mixer ``"attention"`` (:data:`tttla_jax.nn.mixers.MIXERS`). Position
information: none inside the layer by default (Zoology adds learned absolute positions to
the embedding, ``LMConfig(positions="learned")``); ``use_rope=True`` rotates q and k.

Axis names: ``B`` batch, ``T`` new tokens, ``S`` cached slots (``max_len``), ``H`` heads,
``D`` head dim, ``W`` width.
"""
from __future__ import annotations

import operator
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax.nn.layers import apply_rope, dense, positive_float
from tttla_jax.nn.mixers import (Cache, Mixer, _check_cache, check_layer_impl, register_mixer,
                                 resolve_heads, resolve_positions)
from tttla_jax.nn.recipes import RecipeMixin


def causal_attend(q, k, v, qpos, kpos, visible, keep=None, rate=0.0):
    """``o_t = softmax_j(q_t·k_j / √D over visible keys) v_j``; every query sees at least
    itself (the caller guarantees it).

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, N, H, D]``; qpos ``[B, T]``, kpos ``[B, N]`` int
      (−1: empty slot); visible ``[T, N]`` bool (the order condition: key j was fed no later
      than query t). A key is attended iff ``visible & kpos >= 0 & kpos <= qpos``.
      keep: optional ``[B, H, T, N]`` bool, attention dropout: the probabilities become
        ``p · keep / (1 − rate)`` (inverted dropout after the softmax, as in Zoology's MHA).
    """
    D = q.shape[-1]
    sd = _checks.state_dtype(q, k)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(sd), k.astype(sd)) * (D ** -0.5)
    mask = visible[None] & (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos[:, :, None])
    s = jnp.where(mask[:, None], s, jnp.finfo(sd).min)
    p = jax.nn.softmax(s, axis=-1)
    if keep is not None:
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return jnp.einsum("bhts,bshd->bthd", p, v.astype(sd)).astype(q.dtype)


class Attention(RecipeMixin, Mixer):
    """Causal multi-head softmax attention over the whole prefix (Vaswani et al. 2017).

    ``o_t = softmax(q_t Kᵀ / √D + mask) V`` over every earlier token ``j ≤ t`` whose
    position is ``≤`` the query's (the same thing for increasing positions), then ``o_proj``.
    Optional RoPE (``use_rope``) and projection biases (``use_bias``; Zoology's MHA has them).

    Attention dropout (``attn_dropout``, default 0; Zoology's MHA uses 0.1): inverted
    dropout on the attention probabilities, active only when a call is given a
    ``dropout_key`` (training; the same convention as the embedding dropout of
    :meth:`tttla_jax.nn.LanguageModel.embed_inputs`); without a key the layer is
    deterministic. Parallel forms only (``"chunked"``/``"auto"``, packed too); a
    ``dropout_key`` with ``impl="recurrent"`` raises :class:`tttla_jax.impl.ImplError`.

    Implementations (``impl``, docs/implementations.md): ``"chunked"`` (and ``"auto"``) is
    the parallel form: all T queries at once against ``[cache ; T new keys]`` (a fresh call,
    ``cache=None``, attends within the T tokens only: ``T × T`` scores); ``"recurrent"``
    runs a ``lax.scan`` over tokens, each step writing one key into the cache and attending
    to the cache — exactly what decoding does. Both give the same outputs, caches and
    gradients.

    Cache (a fixed-capacity key/value cache of ``max_len`` slots): ``"k", "v"``
    ``[B, max_len, H, D]`` (activation dtype), ``"kpos"`` ``[B, max_len]`` int32 (the
    slot's position, −1 when empty), ``"len"`` ``[B]`` int32 (filled slots) and ``"pos"``
    ``[B]`` int32 (the next position). A fresh call with ``T > max_len`` is a
    ``ValueError``; a decoding call that would overflow the cache returns NaN outputs for
    that row (never silently overwritten keys). Its floats, ``2·max_len·H·D`` per layer,
    are the "state size" of attention in recall benchmarks.

    Recall recipes (:mod:`tttla_jax.nn.recipes`, docs/recipes.md; all off by default):
    ``short_conv`` (conv taps on q, k, v before RoPE, 0 = off; cache ``"conv_q"``,
    ``"conv_k"``, ``"conv_v"`` ``[B, short_conv−1, H·D]``), ``feature_map`` (on q, k,
    default ``"identity"``), ``qk_norm`` (L2 norm of q, k) and ``head_norm`` (per-head
    RMSNorm of the output).

    Parameters: ``4·W·H·D`` (``+ 3·H·D + W`` biases with ``use_bias``).
    """

    impls = ("chunked", "recurrent")

    def __init__(self, *, width: int, num_heads: int, head_dim: Optional[int] = None,
                 max_len: int = 2048, use_rope: bool = False, rope_base: float = 10000.0,
                 use_bias: bool = False, attn_dropout: float = 0.0, impl: str = "auto", short_conv: int = 0,
                 feature_map: str = "identity", qk_norm: bool = False, head_norm: bool = False,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_heads(width, num_heads, head_dim)
        self.max_len = _checks.check_positive_int("max_len", max_len)
        self.impl = check_layer_impl(type(self), impl)
        if use_rope and self.head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head dim, got {self.head_dim}")
        self.width, self.num_heads = operator.index(width), operator.index(num_heads)
        self.use_rope, self.rope_base = bool(use_rope), positive_float("rope_base", rope_base)
        self.attn_dropout = _dropout_rate("attn_dropout", attn_dropout)
        self.dtype, self.param_dtype = dtype, param_dtype
        HD = num_heads * self.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=bool(use_bias))
        self.q_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.k_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.v_proj = dense(width, HD, ("embed", "heads"), **kw)
        self.o_proj = dense(HD, width, ("heads", "embed"), **kw)
        self._init_recipe(features=HD, short_conv=short_conv, feature_map=feature_map, qk_norm=qk_norm,
                          head_norm=head_norm, head_dim=self.head_dim, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    def _cache_spec(self, B: int) -> dict:
        S, H, D = self.max_len, self.num_heads, self.head_dim
        return {"k": ((B, S, H, D), "[B, max_len, H, D]"), "v": ((B, S, H, D), "[B, max_len, H, D]"),
                "kpos": ((B, S), "[B, max_len]"), "len": ((B,), "[B]"), "pos": ((B,), "[B]"),
                **self._recipe_cache_spec(B)}

    def init_cache(self, batch_size: int) -> Cache:
        _checks.check_positive_int("batch_size", batch_size)
        S, H, D, dt = self.max_len, self.num_heads, self.head_dim, self._act_dtype()
        return {"k": jnp.zeros((batch_size, S, H, D), dt), "v": jnp.zeros((batch_size, S, H, D), dt),
                "kpos": jnp.full((batch_size, S), -1, jnp.int32),
                "len": jnp.zeros((batch_size,), jnp.int32),
                "pos": jnp.zeros((batch_size,), jnp.int32), **self._recipe_init_cache(batch_size, dt)}

    def _write(self, cache, k, v, qpos):
        """Write T new keys into slots ``len .. len+T-1`` of every row; returns (cache', overflow [B])."""
        T = k.shape[1]
        upd = jax.vmap(lambda buf, new, at: lax.dynamic_update_slice_in_dim(buf, new, at, axis=0))
        at = cache["len"]
        new = {"k": upd(cache["k"], k.astype(cache["k"].dtype), at),
               "v": upd(cache["v"], v.astype(cache["v"].dtype), at),
               "kpos": upd(cache["kpos"], qpos.astype(jnp.int32), at),
               "len": at + T, "pos": qpos[:, -1].astype(jnp.int32) + 1}
        return new, at + T > self.max_len

    def __call__(self, x: Float[Array, "b t w"], *, cache: Optional[Cache] = None,
                 positions: Optional[Int[Array, "b t"]] = None,
                 cu_seqlens: Optional[Int[Array, "n1"]] = None, dropout_key: Optional[jax.Array] = None):
        """Returns ``(y [B, T, W], new_cache)``. ``positions`` ``[B, T]`` (or ``[T]``):
        absolute positions (default ``cache["pos"] + arange(T)``); they drive RoPE and the
        position condition of the mask.

        ``dropout_key``: a PRNG key switches on the attention dropout (``attn_dropout``;
        training); ``None`` (default) is the deterministic forward.

        ``cu_seqlens`` ``[N + 1]``: N packed sequences in ``x`` ``[1, T, W]``, each attending
        only to itself and its own cache entry (caches in and out per sequence, leading dim
        N; positions restart per sequence); the ``"chunked"``/``"auto"`` impl only.
        """
        if cu_seqlens is not None:
            return self._packed(x, cache, positions, cu_seqlens, dropout_key)
        B, T = self._check_x(x)
        drop = self._dropping(dropout_key)
        fresh = cache is None
        if fresh:
            if T > self.max_len:
                raise ValueError(f"x: expected at most max_len = {self.max_len} tokens (the cache "
                                 f"capacity), got T = {T}")
            cache = self.init_cache(B)
        _check_cache(cache, self._cache_spec(B))
        positions = resolve_positions(positions, cache, B, T)
        conv_cache = {}  # the recipe conv's taps (short_conv), then the attention cache alone
        q, k, v = self._recipe_qkv(self.q_proj(x), self.k_proj(x), self.v_proj(x), cache, conv_cache,
                                   B, T, self.num_heads, self.head_dim)
        cache = {key: val for key, val in cache.items() if key not in conv_cache}
        if self.use_rope:
            q = apply_rope(q, positions, base=self.rope_base)
            k = apply_rope(k, positions, base=self.rope_base)
        S = self.max_len
        if self.impl == "recurrent":
            def step(c, xs):
                qt, kt, vt, pt = (a[:, None] for a in xs)
                c, over = self._write(c, kt, vt, pt)
                o = causal_attend(qt, c["k"], c["v"], pt, c["kpos"], jnp.ones((1, S), bool))
                return c, (o[:, 0], over)

            tm = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
            new_cache, (o, over) = lax.scan(step, cache, (tm(q), tm(k), tm(v), tm(positions)))
            o, overflow = jnp.moveaxis(o, 0, 1), jnp.any(over, axis=0)
        else:
            tri = jnp.tril(jnp.ones((T, T), bool))
            if fresh:  # nothing cached: T x T scores only
                o = causal_attend(q, k, v, positions, positions, tri,
                                  *self._keep(dropout_key, drop, (B, T, T)))
            else:
                kk = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)
                vv = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
                kp = jnp.concatenate([cache["kpos"], positions], axis=1)
                visible = jnp.concatenate([jnp.ones((T, S), bool), tri], axis=1)
                o = causal_attend(q, kk, vv, positions, kp, visible,
                                  *self._keep(dropout_key, drop, (B, T, S + T)))
            new_cache, overflow = self._write(cache, k, v, positions)
        o = jnp.where(overflow[:, None, None, None], jnp.nan, self._recipe_out(o))
        y = self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
        return y, {**new_cache, **conv_cache}

    def _dropping(self, dropout_key) -> bool:
        """Whether this call applies attention dropout (a key and a positive rate)."""
        if dropout_key is None or self.attn_dropout == 0.0:
            return False
        if self.impl == "recurrent":
            from tttla_jax.impl import ImplError
            raise ImplError("impl: Attention applies attention dropout (a dropout_key with "
                            f"attn_dropout = {self.attn_dropout}) in its parallel form only; got "
                            "impl='recurrent', use impl='chunked' or 'auto'")
        return True

    def _keep(self, dropout_key, drop: bool, shape) -> tuple:
        """``(keep [B, H, T, N], rate)`` for :func:`causal_attend`, or ``()`` without dropout."""
        if not drop:
            return ()
        B, T, N = shape
        keep = jax.random.bernoulli(dropout_key, 1.0 - self.attn_dropout, (B, self.num_heads, T, N))
        return keep, self.attn_dropout

    def _packed(self, x, cache, positions, cu_seqlens, dropout_key=None):
        """The ``cu_seqlens`` form of :meth:`__call__`: a sequence-id mask on the parallel form
        (``T × T`` scores fresh, ``T × (N·max_len + T)`` with a cache); each sequence's new
        keys are written into its own cache rows."""
        from tttla_jax.impl import ImplError
        from tttla_jax.nn._segments import packed_next_pos, packed_positions
        if self.impl == "recurrent":
            raise ImplError("impl: Attention runs packed sequences (cu_seqlens) with its parallel form "
                            "only; got impl='recurrent', use impl='chunked' or 'auto'")
        B, T = self._check_x(x)
        drop = self._dropping(dropout_key)
        N, nb = self._cache_batch(B, T, cu_seqlens)
        fresh = cache is None
        if fresh:
            cache = self.init_cache(N)
        spec = {k: (shape, layout.replace("[B", "[N")) for k, (shape, layout) in self._cache_spec(N).items()}
        _check_cache(cache, spec)
        positions = packed_positions(positions, cache["pos"], cu_seqlens, T)
        S, H, D = self.max_len, self.num_heads, self.head_dim
        conv_cache = {}
        q, k, v = self._recipe_qkv(self.q_proj(x), self.k_proj(x), self.v_proj(x), cache, conv_cache,
                                   B, T, H, D, cu_seqlens)
        cache = {key: val for key, val in cache.items() if key not in conv_cache}
        if self.use_rope:
            q = apply_rope(q, positions, base=self.rope_base)
            k = apply_rope(k, positions, base=self.rope_base)
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        t = jnp.arange(T, dtype=jnp.int32)
        seq = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), N - 1).astype(jnp.int32)
        same = jnp.tril(seq[:, None] == seq[None, :])                               # [T, T]
        if fresh:
            o = causal_attend(q, k, v, positions, positions, same, *self._keep(dropout_key, drop, (B, T, T)))
        else:
            kk = jnp.concatenate([cache["k"].reshape(1, N * S, H, D), k.astype(cache["k"].dtype)], axis=1)
            vv = jnp.concatenate([cache["v"].reshape(1, N * S, H, D), v.astype(cache["v"].dtype)], axis=1)
            kp = jnp.concatenate([cache["kpos"].reshape(1, N * S), positions], axis=1)
            own = seq[:, None] == jnp.repeat(jnp.arange(N, dtype=jnp.int32), S)[None, :]  # [T, N·S]
            o = causal_attend(q, kk, vv, positions, kp, jnp.concatenate([own, same], axis=1),
                              *self._keep(dropout_key, drop, (B, T, N * S + T)))
        slot = cache["len"][seq] + t - cu[seq]                                      # [T]
        overflow = cache["len"] + (cu[1:] - cu[:-1]) > S                            # [N]
        flat = seq * S + jnp.where(slot < S, slot, N * S)   # out of capacity: dropped (NaN below)
        put = lambda buf, new: buf.reshape((N * S,) + buf.shape[2:]).at[flat].set(
            new.astype(buf.dtype), mode="drop").reshape(buf.shape)
        new_cache = {"k": put(cache["k"], k[0]), "v": put(cache["v"], v[0]),
                     "kpos": put(cache["kpos"], positions[0]),
                     "len": cache["len"] + (cu[1:] - cu[:-1]),
                     "pos": packed_next_pos(positions, cache["pos"], cu_seqlens)}
        o = jnp.where(overflow[seq][None, :, None, None], jnp.nan, self._recipe_out(o))
        y = self.o_proj(o.reshape(B, T, H * D))
        return y, {**new_cache, **conv_cache}


def _dropout_rate(name: str, rate) -> float:
    try:
        r = float(rate)
    except (TypeError, ValueError):
        r = float("nan")
    if isinstance(rate, bool) or not 0.0 <= r < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1), got {rate!r}")
    return r


register_mixer("attention", Attention)
