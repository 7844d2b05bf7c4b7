"""DeltaNet and gated DeltaNet (docs/linear_attention.md), recurrent and chunked (WY / UT form).

Axis names as in :mod:`tttla_jax.ops.linear_attention` (``B T H K V C N``).

The recurrence (update-then-query; token t sees its own write)::

    S   ← exp(g_t) · S_{t-1}                 g_t = log_decay[t] (0 if absent)
    u_t = β_t (v_t − k_t S)                  S_t = S + k_tᵀ u_t
    o_t = (scale · q_t) S_t

With a per-channel log-decay (``log_decay [B, T, H, K]``) the first line is
``S ← diag(exp(g_t)) S_{t-1}``: Kimi Delta Attention (Kimi Team, 2025, "Kimi Linear", eq. for
KDA: ``S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ`` in column convention) —
decay first, per key channel, then the delta step on the decayed state.

Forms (same outputs, final state and gradients; ``tests/test_delta_rule.py`` checks
both against the float64 loop :func:`tttla_jax.reference.delta.delta_rule_loop`):

* ``recurrent`` — ``lax.scan`` over tokens, rematerialised in blocks so the backward
  pass stores one state per block, not one per token.
* ``chunked`` — the WY / UT representation (Yang et al., 2024, "Parallelizing Linear
  Transformers with the Delta Rule over Sequence Length"; gated: Yang, Kautz &
  Hatamizadeh, 2024, "Gated Delta Networks"). Inside chunk n, with ``S`` the
  state before the chunk and ``b`` the in-chunk inclusive cumulative log-decay::

      (I + A) U = β V − (β e^b K) S,   A_ij = [j < i] β_i e^{b_i − b_j} k_i·k_j

  so ``U = W_v − W_k S`` with ``[W_v, W_k] = (I + A)⁻¹ [β V, β e^b K]`` (the inverse of
  one unit lower-triangular matrix per chunk, by block doubling; independent of S). Then with
  ``P_ij = [j ≤ i] e^{b_i − b_j} q_i·k_j`` and ``K̃ = e^{b_C − b} K``::

      o     = (e^b Q − P W_k) S + P W_v
      S_new = (e^{b_C} I − K̃ᵀ W_k) S + K̃ᵀ W_v  =:  M_n S + D_n

  With a per-channel log-decay ``e^{b}`` multiplies keys and queries channel-wise, the decay
  enters the contractions of ``A`` and ``P`` (:func:`tttla_jax.ops.chunk.decayed_gram`) and
  ``e^{b_C} I`` becomes ``diag(e^{b_C})``.
  ``A``, ``P`` and ``(I + A)⁻¹`` do not depend on S and are computed for a group of chunks
  at once with batched matmuls; the sequential scan over chunks computes
  ``U = (I + A)⁻¹ (β V − (β e^b K) S)`` (``= W_v − W_k S`` without forming ``W_v, W_k``),
  ``o = e^b Q S + P U`` and ``S ← e^{b_C} S + K̃ᵀ U`` (= ``M_n S + D_n`` without forming
  ``M_n``, ``D_n``): five products per chunk, where forming ``W_v, W_k`` takes six and
  ``M_n, D_n, P W_k`` eight. Inside a group the chunk axis is leading (no transposes for
  the scan). Measured interleaved against the six-product form at B = 4, T = 2048, H = 4,
  K = V = 64 (float32, CPU time under shared load): forward −8 %, forward+backward −9 %
  (docs/implementations.md). For cache locality the chunks are
  processed in groups of ``_GROUP_CHUNKS`` = 4 (an outer ``lax.scan`` carrying S, its body
  rematerialised for the backward pass). The chunk step is
  :func:`tttla_jax.ops.chunk.delta_chunk_group` (the reference of the kernels' backward tests).
  With one log-decay per head or none (not packed) the groups are sliced from the
  token-major inputs and written back in place, forward and backward, by a hand-written
  reverse mode that stores the state before every group and recomputes each group
  (:func:`_chunked_token_major`; docs/implementations.md): reverse mode only, ``jax.jvp``
  through it raises.
* ``pallas`` — the Pallas kernels :func:`tttla_jax.kernels.delta_rule` (forward and backward).

``impl="auto"`` resolves with :func:`tttla_jax.impl.resolve` over ``pallas`` (only on
GPU/TPU, for shapes the kernel supports), ``chunked``, ``recurrent``
(docs/implementations.md).

Packed sequences (``cu_seqlens``, :mod:`tttla_jax.ops.varlen`): the tokens are re-chunked
so that every sequence has its own chunks, the chunk slots are grouped as above (by default
one chunk per group, ``_VARLEN_GROUP_CHUNKS``: measured faster for a batch of one), and the
chunk scan inside a group resets ``S := S_0^{(n)}`` (that sequence's initial state) at the
first chunk of every sequence. Zero-padded slots (β = k = g = 0) have ``M = I, D = 0``.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax import impl as _impl
from tttla_jax.ops import chunk, varlen
from tttla_jax.ops.chunk import from_token_blocks, token_blocks, unit_lower_inverse  # noqa: F401
from tttla_jax.ops.linear_attention import _check_kernel_args, decay, kernel_channel_reason, pallas_reason

#: Implementations of :func:`delta_rule`, in ``impl="auto"`` preference order.
IMPLS = ("pallas", "chunked", "recurrent")

# Tokens per rematerialised block of the token scan (see ops/linear_attention.py).
_REMAT_BLOCK = 128
# Chunks per group of the chunked form (see tttla_jax.ops.chunk.delta_chunked).
_GROUP_CHUNKS = chunk.GROUP_CHUNKS
# Chunks per group of the packed-sequence chunked form (see _chunked_varlen). Measured on this
# CPU (gated, B = 1 packed, H = 4, K = V = 64, C = 64, 8 sequences, float32, medians of 7
# interleaved rounds, machine shared): T = 8192, groups of 1 vs 4: fwd 113 vs 135 ms, fwd+bwd
# 417 vs 456 ms (the unpacked form, groups of 4: 109 / 391 ms); T = 4096 likewise. Groups of
# more chunks (resets inside a group) stay supported and tested.
_VARLEN_GROUP_CHUNKS = 1
# On a CPU host the chunked form with a per-head or no log-decay runs chunks of at most this
# many tokens, whatever chunk_size asks for (the chunk size is a tiling choice: the results
# do not depend on it beyond rounding). Gated, B = 4, T = 2048, H = 4, K = V = 64, float32,
# groups of 4 chunks, interleaved (wall, real-time priority on a loaded 2-core host):
# chunk 64 vs 32 forward 32.2 -> 27.8 ms, forward+backward 137 -> 93 ms; chunks of 32 in
# groups of 8: 28.2 / 102 ms; chunks of 16: 28.9 / 98 ms (groups of 8), 32.1 / 128 ms (16).
_CPU_TILE = 32


def impl_reasons(q, k, v, *, chunk_size: int = 64, cu_seqlens=None, interpret: Any = None,
                 impl: str = "auto", log_decay=None) -> Dict[str, Optional[str]]:
    """The implementations of :func:`delta_rule` for a call, in ``"auto"`` order:
    ``{impl: reason}`` for ``"pallas"``, ``"chunked"``, ``"recurrent"`` (``None`` if it can
    run), as :func:`tttla_jax.ops.linear_attention_impl_reasons` (``log_decay``: only its
    shape is read, a per-channel one needs a kernel that supports it)."""
    return {c: (r() if callable(r) else r)
            for c, r in _candidates(q, k, v, chunk_size, cu_seqlens, interpret, impl, log_decay).items()}


def _candidates(q, k, v, chunk_size, cu_seqlens, interpret, impl, log_decay=None):
    K, V = q.shape[-1], v.shape[-1]

    def pallas():
        return pallas_reason(
            lambda kern, interp: (kernel_channel_reason(kern, "delta_rule", log_decay)
                                  or kern.delta_rule_unsupported_reason(q.dtype, K, V, chunk_size,
                                                                        interpret=interp)),
            impl=impl, cu_seqlens=cu_seqlens, interpret=interpret, dtypes=(q.dtype, k.dtype, v.dtype))

    return {"pallas": pallas, "chunked": None, "recurrent": None}


def delta_rule(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    beta: Float[Array, "b t h"],
    *,
    log_decay: Optional[Float[Array, "b t h *k"]] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    block_sizes: Any = None,
    interpret: Any = None,
):
    """(Gated) delta rule: ``S_t = (I − β_t k_tᵀ k_t) e^{g_t} S_{t−1} + β_t k_tᵀ v_t``, ``o_t = (scale·q_t) S_t``.

    docs/linear_attention.md rows "delta rule" and "gated delta rule": the decay (if any) is applied
    first, then ``u_t = β_t (v_t − k_t S)``, ``S ← S + k_tᵀ u_t``; token t reads the
    state after its own write. No feature map or normalisation is applied inside
    (normalise k yourself: with ‖k_t‖ = 1 and β_t ∈ (0, 2) each step is a contraction).

    Args:
      q, k: ``[B, T, H, K]`` queries and keys.
      v: ``[B, T, H, V]`` values.
      beta: ``[B, T, H]`` write strengths β_t (the inner learning rate).
      log_decay: optional log-decay ``g_t`` (≤ 0 for a contraction; not enforced; ``-inf``
        allowed) — the gated delta rule: ``[B, T, H]`` one per head, or ``[B, T, H, K]`` one
        per key channel (Kimi Delta Attention, ``S ← diag(exp(g_t)) S`` before the delta step).
      scale: query scale, default ``K ** -0.5``: a Python, NumPy or JAX real scalar (may be
        traced under ``jax.jit``).
      initial_state: optional ``[B, H, K, V]`` state ``S_0`` (zeros if absent).
      output_final_state: also return the state after the last token.
      chunk_size: chunk length of the chunked form (a tiling choice for the kernel); a
        Python, NumPy or concrete JAX integer. The chunked form on a CPU host runs chunks of
        at most 32 tokens (faster there; per-head or no decay; same results up to rounding).
      impl: ``"auto"`` | ``"pallas"`` (the Pallas forward and backward kernels of
        :mod:`tttla_jax.kernels`; interpret mode on a CPU host) | ``"chunked"`` | ``"recurrent"``
        (docs/implementations.md). ``"auto"``: the kernel on GPU/TPU where it supports the
        shape, else chunked. Forward-mode autodiff (``jax.jvp``) needs ``"recurrent"`` unless
        the log-decay is per channel or ``cu_seqlens`` is given: the chunked form has a
        hand-written reverse mode.
      cu_seqlens: optional ``[N + 1]`` int offsets of N packed sequences in a batch of one
        (``B = 1``; :mod:`tttla_jax.ops.varlen`): every sequence runs as if alone — its own
        initial state, no state crossing a boundary (an empty sequence's final state is its
        initial state). ``initial_state`` and the returned state are then ``[N, H, K, V]``,
        one per sequence. Every impl (``"pallas"``: the kernels reset per sequence). May be traced under ``jax.jit`` (its values are then not checked).
      block_sizes: :class:`tttla_jax.kernels.BlockSizes` for the kernel (``impl="pallas"``,
        or ``"auto"`` when it picks the kernel; a ``ValueError`` with any other impl).
      interpret: the kernel's interpret flag (:func:`tttla_jax.kernels.delta_rule`); same
        rule as ``block_sizes`` (with ``"auto"`` it lets the kernel be picked on any platform).

    Returns:
      ``(o, S)``: ``o`` ``[B, T, H, V]`` in q's dtype; ``S`` ``[B, H, K, V]`` (``[N, H, K, V]``
      with ``cu_seqlens``) in float32 (float64 for float64 inputs), or ``None`` unless
      ``output_final_state``.

    Raises:
      ValueError: a shape, dtype, ``impl``, ``chunk_size`` or ``scale`` is wrong (the message
        names the argument, what it got and what was expected). Raised at trace time.
      tttla_jax.impl.ImplError: the requested ``impl`` cannot run this call, e.g.
        ``impl="pallas"`` on a shape/dtype the kernel does not support (the message gives the
        reason; ``"auto"`` then takes the next candidate).
    """
    B, T, H, K, V, _ = _checks.check_qkv(q, k, v, gates={"beta": beta, "log_decay": log_decay},
                                         initial_state=initial_state, cu_seqlens=cu_seqlens,
                                         channel_gates=("log_decay",))
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    scale = _checks.check_scale(scale)
    _impl.check_impl("impl", impl, ("auto",) + IMPLS, where="tt.delta_rule")
    _check_kernel_args(impl, block_sizes, interpret)
    impl = _impl.resolve(impl, _candidates(q, k, v, chunk_size, cu_seqlens, interpret, impl, log_decay),
                         where="tt.delta_rule")
    if scale is None:
        scale = K ** -0.5
    if impl == "pallas":
        from tttla_jax import kernels  # deferred: kernels sit below ops in the data flow

        return kernels.delta_rule(q, k, v, beta, scale=scale, log_decay=log_decay,
                                  initial_state=initial_state, output_final_state=output_final_state,
                                  chunk_size=chunk_size, cu_seqlens=cu_seqlens, block_sizes=block_sizes,
                                  interpret=interpret)

    sd = _checks.state_dtype(q, k, v, beta, log_decay, initial_state)
    # the unpacked chunked form with one log-decay per head or none scales q group by group
    # (no whole-sequence pass); a traced scale is applied here (its gradient then flows
    # through the product)
    in_groups = (impl == "chunked" and cu_seqlens is None and (log_decay is None or log_decay.ndim == 3)
                 and isinstance(scale, float))
    qf = q.astype(sd) if in_groups else q.astype(sd) * jnp.asarray(scale, sd)
    kf, vf, bf = k.astype(sd), v.astype(sd), beta.astype(sd)
    g = None if log_decay is None else log_decay.astype(sd)
    if impl == "chunked" and (g is None or g.ndim == 3) and _impl.platform() == "cpu":
        chunk_size = min(chunk_size, _CPU_TILE)  # a tiling choice only (see _CPU_TILE)
    if cu_seqlens is not None:
        N = cu_seqlens.shape[0] - 1
        h0 = jnp.zeros((N, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
        form = _recurrent_varlen if impl == "recurrent" else _chunked_varlen
        o, S = form(qf, kf, vf, bf, g, h0, chunk_size, cu_seqlens)
        return o.astype(q.dtype), (S if output_final_state else None)
    S0 = jnp.zeros((B, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
    if impl == "recurrent":
        o, S = _recurrent(qf, kf, vf, bf, g, S0)
    else:
        o, S = _chunked(qf, kf, vf, bf, g, S0, chunk_size, scale=scale if in_groups else None)
    return o.astype(q.dtype), (S if output_final_state else None)


# --------------------------------------------------------------------------- recurrent


def _token_step(S, x):
    """One token: ``x = (q, k, v, β[, g])`` each ``[B, H, ...]``; returns ``(S_t, o_t)``."""
    if len(x) == 5:
        qt, kt, vt, bt, gt = x
        S = decay(gt, S)  # per head, or per key channel
    else:
        qt, kt, vt, bt = x
    u = bt[..., None] * (vt - jnp.einsum("bhk,bhkv->bhv", kt, S))
    S = S + kt[..., :, None] * u[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", qt, S)


def _recurrent(q, k, v, beta, g, S0):
    """Token-by-token ``lax.scan``; zero-padded tokens (β=0, g=0, k=0) leave S unchanged."""
    T = q.shape[1]
    blk = min(_REMAT_BLOCK, T)
    xs = tuple(token_blocks(x, blk) for x in (q, k, v, beta) + (() if g is None else (g,)))

    @jax.checkpoint
    def block(S, xb):
        return lax.scan(_token_step, S, xb)

    S, o = lax.scan(block, S0, xs)
    return from_token_blocks(o, T), S


# --------------------------------------------------------------------------- chunked


def _chunked(q, k, v, beta, g, S0, chunk_size, group=None, remat=True, scale=None):
    """WY / UT chunked form (module docstring): :func:`tttla_jax.ops.chunk.delta_chunked` with
    groups of ``group`` (default ``_GROUP_CHUNKS``) chunks. With one log-decay per head or
    none it runs token-major, forward and backward (:func:`_chunked_token_major`); ``scale``
    (a Python float) then multiplies each group's queries (``q`` unscaled), else ``q`` comes
    scaled. A per-channel log-decay takes the group layout (``scale`` must be ``None``)."""
    group = group or _GROUP_CHUNKS
    if g is None or g.ndim == 3:
        return _chunked_token_major(q, k, v, beta, g, S0, chunk_size, group, scale)
    assert scale is None, "the group-layout form takes scaled queries"
    return chunk.delta_chunked(q, k, v, beta, g, S0, chunk_size, group=group, remat=remat)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _chunked_token_major(q, k, v, beta, g, S0, chunk_size, group, scale):
    """The chunked form on token-major inputs, forward and backward (no whole-sequence
    layout copies: docs/implementations.md, "The chunked forms on a CPU host"). Forward:
    :func:`tttla_jax.ops.chunk.delta_chunked_tokens`, keeping the state before every group
    when differentiated; backward: :func:`tttla_jax.ops.chunk.delta_chunked_tokens_bwd`, the
    groups in reverse, each recomputed from its stored start state and differentiated, the
    gradients written in place. Results and gradients are those of
    :func:`tttla_jax.ops.chunk.delta_chunked` (same chunks, groups and group step). A
    ``custom_vjp``: reverse mode only (``jax.jvp`` through the chunked form raises; the
    recurrent form supports it)."""
    return chunk.delta_chunked_tokens(q, k, v, beta, g, S0, chunk_size, group, scale=scale)


def _chunked_token_major_fwd(q, k, v, beta, g, S0, chunk_size, group, scale):
    o, S, S_groups = chunk.delta_chunked_tokens(q, k, v, beta, g, S0, chunk_size, group, scale=scale,
                                                keep_states=True)
    return (o, S), (q, k, v, beta, g, S_groups, S0)


def _chunked_token_major_bwd(chunk_size, group, scale, res, cts):
    do, dS = cts
    grads = chunk.delta_chunked_tokens_bwd(*res[:6], do, dS, chunk_size, group, scale=scale)
    # under shard_map the state is carried varying over every mesh axis any input varies
    # over; an initial state that does not (e.g. zeros) gets the sum of the per-device
    # cotangents (the transpose of that broadcast), in its own type. The inputs' cotangents
    # already have their inputs' types (the group step's vjp transposes their broadcasts).
    return grads[:5] + (_sum_over_extra_axes(grads[5], res[6]),)


def _sum_over_extra_axes(d, x):
    from tttla_jax.parallel.context import _vma  # deferred: parallel sits above ops

    extra = tuple(sorted(_vma(d) - _vma(x)))
    return lax.psum(d, extra) if extra else d


_chunked_token_major.defvjp(_chunked_token_major_fwd, _chunked_token_major_bwd)


# --------------------------------------------------------------------------- packed sequences


def _varlen_chunks(q, k, v, beta, g, C, cu_seqlens):
    """The layout and the re-chunked inputs ``[Nc, 1, H, C, ...]`` (:mod:`tttla_jax.ops.varlen`;
    ``g`` may be ``None``)."""
    lay = varlen.layout(cu_seqlens, q.shape[1], C)
    return lay, tuple(None if x is None else varlen.to_chunks(x, lay) for x in (q, k, v, beta, g))


def _chunked_varlen(q, k, v, beta, g, h0, chunk_size, cu_seqlens, group=None, remat=True):
    """:func:`_chunked` on packed sequences: each sequence cut into its own chunks, the
    ``Nc`` chunk slots processed in groups of ``group`` (zero slots pad the last group:
    ``M = I, D = 0``), and the chunk scan inside a group resetting to the sequence's
    initial state on its first chunk (:func:`tttla_jax.ops.chunk.delta_chunk_group` with
    ``first`` / ``seq`` / ``h0``, ``h0`` read by index inside the scan)."""
    C = min(chunk_size, q.shape[1])
    lay, xs = _varlen_chunks(q, k, v, beta, g, C, cu_seqlens)
    hb = h0[:, None]  # [N, 1, H, K, V]
    Nc = lay.first.shape[0]
    G = min(group or _VARLEN_GROUP_CHUNKS, Nc)
    NG = -(-Nc // G)

    def to_groups(x):  # [Nc, ...] -> [NG, G, ...] (zero / False padded)
        x = jnp.pad(x, [(0, NG * G - Nc)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((NG, G) + x.shape[1:])

    def chunk_groups(x):  # [Nc, 1, H, C, ...] -> [NG, 1, H, G, C, ...]
        return None if x is None else jnp.moveaxis(to_groups(x), 1, 3)

    ys = tuple(chunk_groups(x) for x in xs) + (to_groups(lay.first), to_groups(lay.seq))

    def body(S, x):
        S_final, o, S_after = chunk.delta_chunk_group(*x[:5], S, *x[5:], hb)
        return S_final, (o, S_after)

    if remat:
        body = jax.checkpoint(body)
    _, (o, S_after) = lax.scan(body, jnp.zeros_like(hb[0]), ys)  # o: [NG, 1, H, G, C, V]
    o = jnp.moveaxis(o, 3, 1).reshape((NG * G,) + o.shape[1:3] + o.shape[4:])[:Nc]
    S_after = S_after.reshape((NG * G,) + S_after.shape[2:])[:Nc]
    return varlen.from_chunks(o, lay), varlen.final_states(S_after, h0, lay)


def _recurrent_varlen(q, k, v, beta, g, h0, chunk_size, cu_seqlens):
    """Token scan on packed sequences, in the re-chunked layout: an outer scan over chunks
    (resetting to the sequence's initial state, read by index, on its first chunk;
    rematerialised per chunk) around the token scan of :func:`_recurrent`."""
    lay, xs = _varlen_chunks(q, k, v, beta, g, chunk_size, cu_seqlens)
    xs = xs if g is not None else xs[:4]
    tm = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731  [1, H, C, ...] -> [C, 1, H, ...]

    @jax.checkpoint
    def chunk_step(S, x):
        *ys, f, n = x
        S = jnp.where(f, lax.dynamic_index_in_dim(h0, n, 0, keepdims=False)[None], S)
        S_next, o = lax.scan(_token_step, S, tuple(tm(y) for y in ys))
        return S_next, (jnp.moveaxis(o, 0, 2), S_next)

    _, (o, S_after) = lax.scan(chunk_step, jnp.zeros_like(h0[:1]), xs + (lay.first, lay.seq))
    return varlen.from_chunks(o, lay), varlen.final_states(S_after, h0, lay)
