"""Linear attention, plain and decayed, in three equivalent forms (docs/linear_attention.md).

Axis names used throughout the library (documented once, here):
``B`` batch, ``T`` tokens, ``H`` heads, ``K`` key/query head dim, ``V`` value head dim,
``C`` chunk size, ``N`` number of chunks (``ceil(T / C)``).

The recurrence (update-then-query; token t sees its own write)::

    S_t = exp(g_t) · S_{t-1} + k_tᵀ v_t        g_t = log_decay[t] ≤ 0 (0 if absent)
    o_t = (scale · q_t) S_t                      (masking="causal")

With a per-channel log-decay (``log_decay [B, T, H, K]``, GLA: Yang et al., 2023, "Gated
Linear Attention Transformers with Hardware-Efficient Training") the state decays row by
row, ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t`` (row κ of ``S`` belongs to key channel κ).

``masking="chunk"`` (block causal, as LaCT's apply-then-update): every query of chunk c
reads the state after chunks < c, ``o_t = (scale·q_t) S_{cC-1}`` (``S_{-1} = S_0``, the
initial state); ``masking="none"`` (bidirectional, as ViT³): every query reads the final
state ``S_{T-1}``.

Forms (all give the same outputs, final state and gradients; ``tests/test_linear_attention.py``
checks each against the float64 loop in :mod:`tttla_jax.reference`):

* ``recurrent`` — ``lax.scan`` over tokens (rematerialised in blocks so the backward pass
  does not store T states).
* ``associative`` — ``lax.associative_scan`` over ``(g, X)`` pairs with
  ``(g1, X1) ∘ (g2, X2) = (g1 + g2, exp(g2)·X1 + X2)`` (the log-space version of docs/linear_attention.md (a)).
  Materialises T states of size K×V: for tests and short sequences.
* ``chunked`` — inside a chunk ``(Q Kᵀ ⊙ D) V`` with the decay mask
  ``D_ij = exp(b_i − b_j)·[j ≤ i]`` (``b`` the in-chunk cumulative log-decay), across
  chunks a scan over chunk states (docs/linear_attention.md (b); Yang et al., 2024, "Gated Linear
  Attention", §3). The fast path on CPU. Layouts and masks from :mod:`tttla_jax.ops.chunk`;
  a token whose decay underflows to 0 (``log_decay = -inf`` included) is a hard reset inside
  the chunk (:func:`tttla_jax.ops.chunk.segment_cumsum`), so every form is exact for
  log-decays in ``[−inf, 0]`` (the gradient w.r.t. such a token's log-decay is 0).
  Per-channel log-decays put the decay inside the ``q·k`` contraction
  (:func:`tttla_jax.ops.chunk.decayed_gram`: per sub-chunk reference points, every exponent
  ``≤ 0``; cuts per channel); that chunk scan is differentiated by autodiff, rematerialised
  per chunk.
* ``pallas`` — the Pallas kernel :func:`tttla_jax.kernels.linear_attention` (GPU via Triton,
  TPU via Mosaic; Pallas interpret mode elsewhere), ``masking="causal"`` or ``"chunk"``.

``impl="auto"`` resolves with :func:`tttla_jax.impl.resolve` over the candidates of
:func:`impl_reasons`, in this order: ``pallas`` (only on GPU/TPU, for shapes the kernel
supports), ``chunked``, ``recurrent``, ``associative`` (docs/implementations.md).
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
from tttla_jax.ops import varlen
from tttla_jax.ops.chunk import (
    channel_decays,
    cut_grad,
    decay_terms,
    decayed_gram,
    from_scan_layout,
    from_token_blocks,
    lower_mask,
    masked_decay,
    num_chunks,
    pad_time,
    reverse_cumsum_by_matmul,
    scan_layout,
    segment_cumsum,
    segment_decays,
    token_blocks,
)

#: Values of the ``masking`` argument.
MASKINGS = ("causal", "chunk", "none")
#: Implementations of :func:`linear_attention`, in ``impl="auto"`` preference order.
IMPLS = ("pallas", "chunked", "recurrent", "associative")

# Tokens per rematerialised block of the token scan: the backward pass of the
# recurrent form stores one state per block instead of one per token.
_REMAT_BLOCK = 128
# Unroll factor of the chunked form's chunk scans (forward and hand-written backward): the
# loop overhead per chunk (a dynamic slice of every input, the stacking of the outputs) is a
# sizeable share of a 64-token chunk's small matmuls on CPU. Measured interleaved against
# no unrolling (B=4, H=4, K=V=64, chunk 64, float32, CPU time under a load average of 6-7):
# forward 32 -> 27 ms (no decay) and 35 -> 28 ms (decayed) at T=2048, 187 -> 154 ms at
# T=8192; forward+backward 84 -> 72 / 86 -> 84 / 407 -> 398 ms. Only for scans of at least
# _UNROLL_MIN_CHUNKS chunks: unrolling adds compile time (forward+backward of 13 chunks:
# 1.3 -> 3.4 s), which short sequences do not win back.
_SCAN_UNROLL = 4
_UNROLL_MIN_CHUNKS = 16
# On a CPU host the chunked form without decay and with masking="causal" or "none" (where the
# chunk size is only a tiling choice: every tile gives the same results up to rounding) runs
# tiles of at most this many tokens, whatever chunk_size asks for: with XLA:CPU's small
# batched matmuls two 32-token steps took less time than one 64-token step (half the
# intra-chunk products are above the causal diagonal, wasted). B=4, T=2048, H=4, K=V=64,
# float32, chunk_size 64 vs 32, interleaved: forward 17.6 -> 15.4 ms, forward+backward
# 49.7 -> 44.2 ms (wall, real-time priority on a loaded 2-core host; on another run
# 25.8 -> 25.4 / 75.5 -> 78.6 ms), CPU time at normal priority 25.7 -> 24.1 / 77.6 -> 70.2 ms.
# 16-token tiles were slower forward+backward (62 ms). With a per-head log-decay (token-major
# chunk scan only: not packed sequences, not per-channel gates) the same tiles: forward,
# chunk_size 64 as 64 vs 32-token tiles, interleaved, load 2.3-2.4, 29.1 -> 25.1 ms at T=2048
# and 113.9 -> 107.3 ms at T=8192 (16-token tiles: 26.9 / 115.0); forward+backward (with the
# key-major backward step, _chunk_bwd_step_kmajor), interleaved, 11 rounds, real-time
# priority, load 8-9: 69.3 -> 63.1 ms at T=2048, 287 -> 276 ms at T=8192 (docs/implementations.md).
_CPU_TILE = 32
# Independent groups of (B, H) pairs in each step of the linear-attention forward chunk scan
# (_tokens_forward): each group slices its own part of the chunk and has its own products,
# state and output write, and XLA:CPU runs independent operations of a loop body
# concurrently, on both cores of this host, where one batched product per step runs on one.
_PAIR_GROUPS = 2
_MIN_GROUP_PAIRS = 8
# Groups of (B, H) pairs in each step of the backward chunk scan (_tokens_backward). Two
# groups were slower there (forward+backward without decay, B=4, T=2048, H=4, K=V=64,
# interleaved, 15 rounds, real-time priority, load 7: 57.3 ms with two groups, 49.3 ms with
# one; CPU time 76.7 / 77.8 ms), so the backward runs one.
_BWD_PAIR_GROUPS = 1


def _scan_unroll(n_chunks: int) -> int:
    """``lax.scan``'s ``unroll`` for a chunk scan over ``n_chunks`` chunks."""
    return _SCAN_UNROLL if n_chunks >= _UNROLL_MIN_CHUNKS else 1


def _check_kernel_args(impl, block_sizes, interpret) -> None:
    """``block_sizes`` / ``interpret`` configure the Pallas kernel: refuse them with an
    explicit non-kernel ``impl`` (with ``"auto"`` they apply when the kernel is chosen)."""
    for name, val in (("block_sizes", block_sizes), ("interpret", interpret)):
        if val is not None and impl not in ("pallas", "auto"):
            raise ValueError(f"{name}: configures the Pallas kernel (impl='pallas'), got impl={impl!r} "
                             f"with {name}={val!r}; drop {name} or use impl='pallas'")


def pallas_reason(kernel_reason, *, impl: str, cu_seqlens=None, interpret=None, dtypes=()) -> Optional[str]:
    """Why the Pallas kernel cannot serve a call (``None`` if it can), shared by both ops.

    ``"auto"`` picks the kernel only on an accelerator (:func:`tttla_jax.impl.on_accelerator`)
    unless ``interpret`` asks for Pallas interpret mode; an explicit ``impl="pallas"`` also
    runs in interpret mode on a CPU host. Packed sequences and mixed q/k/v dtypes have no
    kernel.

    Args:
      kernel_reason: ``(kernels_module, interpret_mode) -> reason``, the kernel's own
        shape/dtype check (e.g. :func:`tttla_jax.kernels.unsupported_reason`).
      impl: the request (``"auto"`` or ``"pallas"``) the reason is for.
      cu_seqlens: the call's packed-sequence offsets, if any.
      interpret: the call's ``interpret`` argument.
      dtypes: the dtypes of q, k and v.
    """
    if impl == "auto" and interpret is None and not _impl.on_accelerator():
        return (f"the platform is {_impl.platform()!r}, not a GPU/TPU: the kernel would run in Pallas "
                "interpret mode (pass impl='pallas' or interpret= to run it anyway)")
    if len({jnp.dtype(d) for d in dtypes}) > 1:
        return f"q, k, v have different dtypes {tuple(str(jnp.dtype(d)) for d in dtypes)}; the kernel takes one"
    try:
        from tttla_jax import kernels  # deferred: kernels sit below ops and import Pallas
    except ImportError as e:  # pragma: no cover - depends on the jax build
        return f"the Pallas kernels cannot be imported ({e})"
    return kernel_reason(kernels, interpret is not None or not _impl.on_accelerator())


def impl_reasons(q, k, v, *, masking: str = "causal", chunk_size: int = 64, cu_seqlens=None,
                 interpret: Any = None, impl: str = "auto", log_decay=None) -> Dict[str, Optional[str]]:
    """The implementations of :func:`linear_attention` for a call, in ``"auto"`` order.

    Args:
      q, k, v: the call's token tensors (only shapes and dtypes are read).
      masking, chunk_size, cu_seqlens, interpret: as in :func:`linear_attention`.
      impl: the request the reasons are for: ``"auto"`` also refuses the kernel off GPU/TPU
        (unless ``interpret`` is given), an explicit ``"pallas"`` does not.
      log_decay: the call's log-decay (only its shape is read: a per-channel ``[B, T, H, K]``
        one needs a kernel that supports per-channel gates).

    Returns:
      ``{impl: reason}`` for ``"pallas"``, ``"chunked"``, ``"recurrent"``, ``"associative"``;
      ``reason`` is ``None`` if the implementation can run this call. ``"auto"`` runs the
      first with ``None`` (:func:`tttla_jax.impl.resolve`).
    """
    return {c: (r() if callable(r) else r)
            for c, r in _candidates(q, k, v, masking, chunk_size, cu_seqlens, interpret, impl,
                                    log_decay).items()}


def per_channel(log_decay) -> bool:
    """Whether a log-decay is per key channel (``[B, T, H, K]``) rather than per head."""
    return log_decay is not None and jnp.ndim(log_decay) == 4


def kernel_channel_reason(kernels, op: str, log_decay) -> Optional[str]:
    """Why the Pallas kernel of ``op`` cannot take this log-decay (``None`` if it can): a
    per-channel log-decay needs ``op`` in the kernels' ``PER_CHANNEL_GATES`` (the names of the
    kernels that accept ``[B, T, H, K]`` log-decays)."""
    if per_channel(log_decay) and op not in getattr(kernels, "PER_CHANNEL_GATES", ()):
        return (f"per-channel log_decay [B, T, H, K] (shape {tuple(jnp.shape(log_decay))}) is not supported "
                f"by the Pallas {op} kernel (one log-decay per head only); use impl='chunked' (or 'auto')")
    return None


def _candidates(q, k, v, masking, chunk_size, cu_seqlens, interpret, impl, log_decay=None):
    K, V = q.shape[-1], v.shape[-1]

    def pallas():
        return pallas_reason(
            lambda kern, interp: (kernel_channel_reason(kern, "linear_attention", log_decay)
                                  or kern.unsupported_reason(q.dtype, masking, K, V, chunk_size, interpret=interp)),
            impl=impl, cu_seqlens=cu_seqlens, interpret=interpret, dtypes=(q.dtype, k.dtype, v.dtype))

    return {"pallas": pallas, "chunked": None, "recurrent": None, "associative": None}


def linear_attention(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    *,
    scale: Optional[float] = None,
    log_decay: Optional[Float[Array, "b t h *k"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    masking: str = "causal",
    chunk_size: int = 64,
    impl: str = "auto",
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    block_sizes: Any = None,
    interpret: Any = None,
):
    """Causal / block-causal / bidirectional linear attention with optional decay.

    ``S_t = exp(g_t) S_{t-1} + k_tᵀ v_t``, ``o_t = (scale·q_t) S_t`` (docs/linear_attention.md; the
    "decayed" row is Mamba-2/RetNet style with one log-decay per token and head). With a
    per-channel log-decay (GLA) ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t``, ``g_t ∈ [−inf, 0]^K``
    (docs/linear_attention.md, "Per-channel gates").

    Args:
      q, k: ``[B, T, H, K]`` queries and keys. No feature map is applied.
      v: ``[B, T, H, V]`` values.
      scale: query scale, default ``K ** -0.5``: a Python, NumPy or JAX real scalar (may be
        traced under ``jax.jit``; it is then differentiable like any input).
      log_decay: optional log-decay ``g_t`` (≤ 0 for a contraction; not enforced; ``-inf``
        allowed): ``[B, T, H]`` one per head, or ``[B, T, H, K]`` one per key channel (GLA
        gates; the Pallas kernel takes them only if it lists them, see :func:`impl_reasons`).
      initial_state: optional ``[B, H, K, V]`` state ``S_0`` (zeros if absent).
      output_final_state: also return the state after the last token.
      masking: ``"causal"`` | ``"chunk"`` (block causal with blocks of ``chunk_size``: every
        query reads the state before its chunk) | ``"none"`` (every query reads the final state).
      chunk_size: chunk length for ``impl="chunked"`` and for ``masking="chunk"``; a Python,
        NumPy or concrete JAX integer. With ``masking="causal"`` / ``"none"`` it is a tiling
        choice only (the results do not depend on it beyond rounding); the chunked form on a
        CPU host then runs tiles of at most 32 tokens without a log-decay or with a per-head
        one (faster there; packed sequences and per-channel gates keep ``chunk_size``).
      impl: ``"auto"`` | ``"pallas"`` | ``"chunked"`` | ``"recurrent"`` | ``"associative"``
        (docs/implementations.md). ``"auto"`` takes the first of these that can run: the
        kernel only on GPU/TPU for shapes it supports, else the chunked XLA form.
      cu_seqlens: optional ``[N + 1]`` int offsets of N packed sequences in a batch of one
        (``B = 1``; :mod:`tttla_jax.ops.varlen`): every sequence runs as if alone — its own
        initial state, no state crossing a boundary, ``masking="chunk"`` blocks counted from
        its start, ``masking="none"`` reading its own final state. ``initial_state`` and the
        returned state are then ``[N, H, K, V]``, one per sequence (the kernels too:
        ``"pallas"`` walks the re-chunked layout with per-sequence resets).
      block_sizes: :class:`tttla_jax.kernels.BlockSizes` for the kernel (``impl="pallas"``,
        or ``"auto"`` when it picks the kernel; a ``ValueError`` with any other impl).
      interpret: the kernel's interpret flag (:func:`tttla_jax.kernels.linear_attention`):
        ``True`` / ``"gpu"`` / ``"tpu"`` / ``pltpu.InterpretParams`` run the kernel in Pallas
        interpret mode (then ``"auto"`` may pick it on any platform); same rule as ``block_sizes``.

    Returns:
      ``(o, S)``: ``o`` ``[B, T, H, V]`` in q's dtype; ``S`` ``[B, H, K, V]`` (``[N, H, K, V]``
      with ``cu_seqlens``) in float32 (float64 for float64 inputs) or ``None`` unless
      ``output_final_state``.

    Raises:
      ValueError: a shape, dtype, ``masking``, ``impl``, ``chunk_size`` or ``scale`` is wrong
        (the message names the argument, what it got and what was expected), at trace time.
      tttla_jax.impl.ImplError: the requested ``impl`` cannot run this call (with the reason,
        e.g. the kernel does not support the head dim).
    """
    B, T, H, K, V, _ = _checks.check_qkv(q, k, v, gates={"log_decay": log_decay}, initial_state=initial_state,
                                         cu_seqlens=cu_seqlens, channel_gates=("log_decay",))
    _checks.check_choice("masking", masking, MASKINGS)
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    scale = _checks.check_scale(scale)
    _impl.check_impl("impl", impl, ("auto",) + IMPLS, where="tt.linear_attention")
    _check_kernel_args(impl, block_sizes, interpret)
    impl = _impl.resolve(impl, _candidates(q, k, v, masking, chunk_size, cu_seqlens, interpret, impl, log_decay),
                         where="tt.linear_attention")
    if scale is None:
        scale = K ** -0.5
    if impl == "pallas":
        from tttla_jax import kernels  # deferred: kernels are optional at import time

        return kernels.linear_attention(q, k, v, scale=scale, log_decay=log_decay, initial_state=initial_state,
                                        output_final_state=output_final_state, masking=masking,
                                        chunk_size=chunk_size, cu_seqlens=cu_seqlens, block_sizes=block_sizes,
                                        interpret=interpret)

    sd = _checks.state_dtype(q, k, v)
    kf, vf = k.astype(sd), v.astype(sd)
    # the chunked form scales q chunk by chunk (no whole-sequence pass); a traced scale is
    # applied here (its gradient then flows through the product)
    in_chunks = impl == "chunked" and cu_seqlens is None and not per_channel(log_decay) and isinstance(scale, float)
    qf = q.astype(sd) if in_chunks else q.astype(sd) * jnp.asarray(scale, sd)
    # zeros_like: under shard_map the zero gate varies over the mesh axes like q does (the
    # chunked form's custom_vjp returns cotangents of that type)
    g = jnp.zeros_like(qf[..., 0]) if log_decay is None else log_decay.astype(sd)
    if impl == "chunked" and log_decay is None:
        g = None  # the chunked form's no-decay path: no decay terms, no log-decay gradient
    if (impl == "chunked" and masking != "chunk" and _impl.platform() == "cpu"
            and (g is None or (cu_seqlens is None and not per_channel(g)))):
        chunk_size = min(chunk_size, _CPU_TILE)  # a tiling choice only (see _CPU_TILE)
    if cu_seqlens is not None:
        N = cu_seqlens.shape[0] - 1
        h0 = jnp.zeros((N, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
        form = {"recurrent": _recurrent_varlen, "associative": _associative_varlen,
                "chunked": _chunked_channel_varlen if per_channel(g) else _chunked_varlen}[impl]
        o, S = form(qf, kf, vf, g, h0, masking, chunk_size, cu_seqlens)
        return o.astype(q.dtype), (S if output_final_state else None)
    S0 = jnp.zeros((B, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
    if in_chunks:
        o, S = _chunked(qf, kf, vf, g, S0, masking, chunk_size, scale)
        return o.astype(q.dtype), (S if output_final_state else None)
    form = {"recurrent": _recurrent, "associative": _associative,
            "chunked": _chunked_channel if per_channel(g) else _chunked}[impl]
    o, S = form(qf, kf, vf, g, S0, masking, chunk_size)
    return o.astype(q.dtype), (S if output_final_state else None)


# --------------------------------------------------------------------------- recurrent


def decay(g, X):
    """``exp(g)·X`` for a log-decay per head (``g [...]``, ``X [..., K, V]``) or per key
    channel (``g [..., K]``: ``diag(exp(g)) X``), told apart by rank."""
    return jnp.exp(g)[(...,) + (None,) * (X.ndim - g.ndim)] * X


def _recurrent(q, k, v, g, S0, masking, chunk_size):
    """Token-by-token ``lax.scan``; zero-padded tokens (g=0, k=0) leave the state unchanged."""
    T = q.shape[1]
    blk = min(_REMAT_BLOCK, T)
    Tp = -(-T // blk) * blk
    xs = tuple(token_blocks(x, blk) for x in (q, k, v, g)) + (jnp.arange(Tp).reshape(Tp // blk, blk),)

    def step(carry, x):
        S, R = carry
        qt, kt, vt, gt, t = x
        S = decay(gt, S) + kt[..., :, None] * vt[..., None, :]
        if masking == "causal":
            o = jnp.einsum("bhk,bhkv->bhv", qt, S)
        elif masking == "chunk":
            o = jnp.einsum("bhk,bhkv->bhv", qt, R)
            R = jnp.where((t + 1) % chunk_size == 0, S, R)
        else:
            o = jnp.zeros(vt.shape, S.dtype)
        return (S, R), o

    @jax.checkpoint
    def block(carry, xb):
        return lax.scan(step, carry, xb)

    (S, _), o = lax.scan(block, (S0, S0), xs)
    o = from_token_blocks(o, T)
    if masking == "none":
        o = jnp.einsum("bthk,bhkv->bthv", q, S)
    return o, S


# --------------------------------------------------------------------------- associative


def _associative(q, k, v, g, S0, masking, chunk_size):
    """``lax.associative_scan`` over ``(cumulative log-decay, state)`` pairs."""
    B, T, H, K = q.shape
    X = k[..., :, None] * v[..., None, :]  # [B, T, H, K, V]

    def combine(a, b):
        g1, X1 = a
        g2, X2 = b
        return g1 + g2, decay(g2, X1) + X2

    G, S = lax.associative_scan(combine, (g, X), axis=1)
    S = S + decay(G, S0[:, None])  # S_t for every t: [B, T, H, K, V]
    S_final = S[:, -1]
    if masking == "causal":
        o = jnp.einsum("bthk,bthkv->bthv", q, S)
    elif masking == "none":
        o = jnp.einsum("bthk,bhkv->bthv", q, S_final)
    else:
        N = -(-T // chunk_size)
        # state read by chunk c: S_0 for c = 0, else the state after token cC - 1
        ends = jnp.arange(1, N) * chunk_size - 1
        R = jnp.concatenate([S0[:, None], S[:, ends]], axis=1)  # [B, N, H, K, V]
        R = jnp.repeat(R, chunk_size, axis=1)[:, :T]
        o = jnp.einsum("bthk,bthkv->bthv", q, R)
    return o, S_final


# --------------------------------------------------------------------------- chunked


def _chunked(q, k, v, g, S0, masking, chunk_size, scale=1.0):
    """Chunk-parallel form: masked matmuls inside chunks, a scan over chunks carrying the state.

    The scan runs over chunks with all (B, H) pairs of one chunk batched in each step:
    XLA:CPU runs a batched dot of a few dozen 64×64 blocks at 2–3× the rate of one
    batched dot over every chunk at once (cache), so the scan is also the fast layout.
    Each step slices its chunk straight from the ``[B, T, H, d]`` inputs and writes its
    outputs back in place (:func:`_chunk_tokens`): no whole-sequence layout copy is made.
    The backward pass is hand-written (:func:`_tokens_backward`): it keeps only the state
    before each chunk and recomputes the intra-chunk products. ``g=None`` (no decay): the
    same scan without any decay term (a causal mask instead of ``D``, no exponentials, no
    log-decay gradient). ``scale`` (a Python float) multiplies each chunk's queries.
    """
    T = q.shape[1]
    C = min(chunk_size, T) if masking != "chunk" else chunk_size
    Tp = num_chunks(T, C) * C
    q, k, v = (pad_time(x, Tp) for x in (q, k, v))
    g = None if g is None else pad_time(g, Tp)
    if masking == "none":
        _, S_final = _chunk_tokens(q, k, v, g, S0, scale, C, False, False)
        return jnp.einsum("bthk,bhkv->bthv", q[:, :T] * scale, S_final), S_final
    o, S_final = _chunk_tokens(q, k, v, g, S0, scale, C, masking == "causal", True)
    return o[:, :T], S_final


def _token_chunk(x, t0, C, scale=None):
    """Tokens ``[t0, t0 + C)`` of ``x [B, Tp, H, ...]`` as one chunk ``[B, H, C, ...]``."""
    if x is None:
        return None
    x = jnp.swapaxes(lax.dynamic_slice_in_dim(x, t0, C, axis=1), 1, 2)
    return x if scale is None else x * jnp.asarray(scale, x.dtype)


def _put_chunk(y, yn, t0):
    """Write one chunk ``yn [B, H, C, ...]`` into ``y [B, Tp, H, ...]`` at token ``t0``."""
    return lax.dynamic_update_slice_in_dim(y, jnp.swapaxes(yn, 1, 2), t0, axis=1)


def _pair_groups(B: int, H: int, G: int):
    """Static blocks ``(b0, nb, h0, nh)`` splitting the ``(B, H)`` pairs into ``G`` groups of
    equal size: over the batch if ``G`` divides ``B``, else one batch row at a time with
    its heads split; fewer groups (``G // 2``, down to 1) when neither divides or a group
    would have fewer than ``_MIN_GROUP_PAIRS`` pairs."""
    while G > 1 and B * H // G < _MIN_GROUP_PAIRS:
        G //= 2
    if G <= 1:
        return ((0, B, 0, H),)
    if B % G == 0:
        return tuple((i * (B // G), B // G, 0, H) for i in range(G))
    if G % B == 0 and H % (G // B) == 0:
        nh = H // (G // B)
        return tuple((b, 1, j * nh, nh) for b in range(B) for j in range(G // B))
    return _pair_groups(B, H, G // 2)


def _block(x, b0, nb, t0, C, h0, nh):
    """``x [B, Tp, H, ...]`` restricted to batch rows ``[b0, b0 + nb)``, tokens
    ``[t0, t0 + C)`` and heads ``[h0, h0 + nh)``: ``[nb, C, nh, ...]``."""
    if x is None:
        return None
    return lax.dynamic_slice(x, (b0, t0, h0) + (0,) * (x.ndim - 3), (nb, C, nh) + x.shape[3:])


def _tokens_forward(q, k, v, g, S0, scale, C, intra, emit, keep_states, groups=None):
    """The scan of :func:`_chunk_tokens`: returns ``(o or None, S_final, S_prev [N, B, H, K, V]
    or None)`` (the state before every chunk if ``keep_states``).

    Each step runs the (B, H) pairs as ``groups`` independent blocks (default
    :func:`_pair_groups` with ``_PAIR_GROUPS``), each with its own slices, products, state and
    in-place output write, so that XLA:CPU can run the blocks on different cores."""
    B, Tp, H = q.shape[:3]
    if groups is None:  # with a log-decay the groups were no faster (_PAIR_GROUPS)
        groups = _pair_groups(B, H, _PAIR_GROUPS if g is None else 1)

    def assemble(parts):
        if len(parts) == 1:
            return parts[0]
        out = jnp.zeros(S0.shape, parts[0].dtype)
        for (b0, nb, h0, nh), Sg in zip(groups, parts):
            out = lax.dynamic_update_slice(out, Sg, (b0, h0, 0, 0))
        return out

    def step(carry, n):
        S, o = carry
        t0 = n * C
        S_next = []
        for (b0, nb, h0, nh), Sg in zip(groups, S):
            blk = lambda x: _block(x, b0, nb, t0, C, h0, nh)  # noqa: E731
            qn = jnp.swapaxes(blk(q), 1, 2) * jnp.asarray(scale, q.dtype)
            kt = jnp.transpose(blk(k), (0, 2, 3, 1))
            vn = jnp.swapaxes(blk(v), 1, 2)
            gn = None if g is None else jnp.swapaxes(blk(g), 1, 2)
            Sg_next, on = _chunk_fwd_step(Sg, (qn, kt, vn, gn), intra, emit, k_major=True)
            S_next.append(Sg_next)
            if emit:
                o = lax.dynamic_update_slice(o, jnp.swapaxes(on, 1, 2), (b0, t0, h0, 0))
        return (tuple(S_next), o), (assemble(S) if keep_states else None)

    o = jnp.zeros_like(v, S0.dtype) if emit else None  # zeros_like: varies like v under shard_map
    S0g = tuple(S0[b0:b0 + nb, h0:h0 + nh] for b0, nb, h0, nh in groups)
    (S, o), S_prev = lax.scan(step, (S0g, o), jnp.arange(Tp // C), unroll=_scan_unroll(Tp // C))
    return o, assemble(S), S_prev


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _chunk_tokens(q, k, v, g, S0, scale, C, intra, emit):
    """The chunk scan over token-major inputs ``[B, Tp, H, d]`` (``Tp`` a multiple of ``C``;
    see :func:`_chunked`). Returns ``(o [B, Tp, H, V] or None, S_final)``. Same step and
    backward formulas as :func:`_chunk_scan` (the backward's step key-major:
    :func:`_chunk_bwd_step_kmajor`)."""
    o, S, _ = _tokens_forward(q, k, v, g, S0, scale, C, intra, emit, False)
    return o, S


def _chunk_tokens_fwd(q, k, v, g, S0, scale, C, intra, emit):
    o, S, S_prev = _tokens_forward(q, k, v, g, S0, scale, C, intra, emit, True)
    return (o, S), (q, k, v, g, S_prev)


def _chunk_tokens_bwd(scale, C, intra, emit, res, cts, *, scale_grad: bool = False, offset=None):
    """Chunks in reverse (:func:`_tokens_backward`), the gradients written back to
    ``[B, Tp, H, d]`` in place. ``scale_grad``: also return ``Σ q ⊙ ∂/∂(scale·q)``, the
    gradient w.r.t. ``scale`` (a scalar of ``q``'s sharding type), accumulated chunk by
    chunk. ``offset = (Φ [N, B, H], S_in)``: the state before chunk ``n`` is
    ``S_prev[n] + Φ_n S_in``, formed chunk by chunk (no second stack of states)."""
    do, dS = cts
    q, k, v, g, S_prev = res
    return _tokens_backward(q, k, v, g, S_prev, do if emit else None, dS, scale, C, intra,
                            scale_grad=scale_grad, offset=offset)


def _tokens_backward(q, k, v, g, S_prev, do, dS, scale, C, intra, *, scale_grad=False, offset=None,
                     groups=None):
    """The chunk-by-chunk backward of :func:`_chunk_tokens_bwd`: a reverse scan over the chunks
    whose step runs the (B, H) pairs as ``groups`` independent blocks (default
    :func:`_pair_groups` with ``_BWD_PAIR_GROUPS``), each slicing its chunk from the
    ``[B, Tp, H, d]`` inputs (queries and keys both token-major ``[C, K]`` and key-major
    ``[K, C]``), differentiating it with :func:`_chunk_bwd_step_kmajor` (every product a
    plain batched matmul, or one whose right operand is transposed) and writing its gradients
    in place. ``do`` None: no output cotangent."""
    B, Tp, H = q.shape[:3]
    if groups is None:
        groups = _pair_groups(B, H, _BWD_PAIR_GROUPS)
    sd = S_prev.dtype

    def buf(x, fill):
        # every element is overwritten (the chunks tile [0, Tp)); distinct fill values keep
        # XLA from sharing one zero buffer among the gradients and copying it for each
        return None if x is None else jnp.full_like(x, fill, sd)

    def part(x, b0, nb, h0, nh):
        return x[b0:b0 + nb, h0:h0 + nh]

    def step(carry, xs):
        dS, dq, dk, dv, dg, dsc = carry
        n, S, phi = xs
        t0 = n * C
        dS_next = []
        for (b0, nb, h0, nh), dSg in zip(groups, dS):
            blk = lambda x: _block(x, b0, nb, t0, C, h0, nh)  # noqa: E731
            Sg = part(S, b0, nb, h0, nh)
            if phi is not None:
                Sg = Sg + part(phi, b0, nb, h0, nh)[..., None, None] * part(offset[1], b0, nb, h0, nh)
            qb, kb = blk(q), blk(k)
            sc = jnp.asarray(scale, qb.dtype)
            qt_raw = jnp.transpose(qb, (0, 2, 3, 1))
            x = (jnp.swapaxes(qb, 1, 2) * sc, qt_raw * sc, jnp.swapaxes(kb, 1, 2), jnp.transpose(kb, (0, 2, 3, 1)),
                 jnp.swapaxes(blk(v), 1, 2), None if g is None else jnp.swapaxes(blk(g), 1, 2))
            don = None if do is None else jnp.swapaxes(blk(do), 1, 2)
            dqt, dkn, dvn, dgn, dSg = _chunk_bwd_step_kmajor(dSg, x, Sg, don, intra)
            dS_next.append(dSg)
            if scale_grad:
                dsc = dsc + jnp.sum(qt_raw * dqt)
            dq = lax.dynamic_update_slice(dq, jnp.transpose(dqt * sc, (0, 3, 1, 2)), (b0, t0, h0, 0))
            dk = lax.dynamic_update_slice(dk, jnp.swapaxes(dkn, 1, 2), (b0, t0, h0, 0))
            dv = lax.dynamic_update_slice(dv, jnp.swapaxes(dvn, 1, 2), (b0, t0, h0, 0))
            if g is not None:
                dg = lax.dynamic_update_slice(dg, jnp.swapaxes(dgn, 1, 2), (b0, t0, h0))
        return (tuple(dS_next), dq, dk, dv, dg, dsc), None

    dS0g = tuple(part(dS, b0, nb, h0, nh) for b0, nb, h0, nh in groups)
    dsc0 = jnp.zeros_like(q[0, 0, 0, 0], sd) if scale_grad else None
    (dSg, dq, dk, dv, dg, dsc), _ = lax.scan(
        step, (dS0g, buf(q, 1.0), buf(k, 2.0), buf(v, 3.0), buf(g, 4.0), dsc0),
        (jnp.arange(Tp // C), S_prev, None if offset is None else offset[0]), reverse=True,
        unroll=_scan_unroll(Tp // C))
    if len(groups) == 1:
        dS0 = dSg[0]
    else:
        dS0 = jnp.zeros(dS.shape, sd)
        for (b0, nb, h0, nh), d in zip(groups, dSg):
            dS0 = lax.dynamic_update_slice(dS0, d, (b0, h0, 0, 0))
    return (dq, dk, dv, dg, dS0, dsc) if scale_grad else (dq, dk, dv, dg, dS0)


def _upper_decay(gn):
    """:func:`tttla_jax.ops.chunk.decay_terms` with ``D`` transposed: ``(Dᵀ, γ, λ, Γ)``,
    ``Dᵀ_ji = exp(b_i − b_j)·[j ≤ i]`` (same cuts, same exponents)."""
    c, s = segment_cumsum(gn, by_matmul=True)
    mask, gamma, lam, Gam = segment_decays(c, s)
    maskt = jnp.swapaxes(mask, -1, -2)
    Dt = masked_decay(c[..., None, :], c[..., :, None], maskt)
    return Dt, gamma, lam, Gam


def _state_update_grads(kn, vn, lam, Gam, S, dS):
    """A decayed chunk's contributions through its state update ``S' = Γ S + (λK)ᵀ V``:
    ``(dv, dk, db, dbC, dS_prev)`` — ``db`` the log-decay-cumsum gradient through ``λ_j``,
    ``dbC`` the one through ``Γ`` (added at the chunk's last token)."""
    kl = kn * lam[..., None]
    dv = jnp.matmul(kl, dS)
    vdS = jnp.einsum("bhcv,bhkv->bhck", vn, dS)
    dk = vdS * lam[..., None]
    e = jnp.sum(kl * vdS, axis=-1)  # ∂/∂b_j through λ_j (negative sign)
    dbC = jnp.sum(e, axis=-1) + Gam * jnp.sum(S * dS, axis=(-2, -1))
    return dv, dk, -e, dbC, Gam[..., None, None] * dS


def _chunk_bwd_step_kmajor(dS, x, S, don, intra):
    """:func:`_chunk_bwd_step` with every product's left operand contracted over its last
    axis (XLA:CPU hands those to its fused matmul library; a transposed left operand ran as a
    separate, slower dot). ``x = (q [B, H, C, K], qᵀ [B, H, K, C], k, kᵀ, v [B, H, C, V],
    g [B, H, C] or None)``; the intra-chunk matrices are formed transposed,
    ``Aᵀ = (K Qᵀ) ⊙ Dᵀ`` and ``dPᵀ = (V dOᵀ) ⊙ Dᵀ``, so that
    ``dV = (λK) dS' + Aᵀ dO``, ``dK = λ ⊙ (V dS'ᵀ) + dPᵀ Q``,
    ``dQᵀ = Kᵀ dPᵀ + γ ⊙ (S dOᵀ)`` (the query gradient comes out key-major) and
    ``dS = Γ dS' + (γ ⊙ Q)ᵀ dO``. Returns ``(dqᵀ [B, H, K, C], dk, dv, dg or None, dS_prev)``."""
    qn, qt, kn, kt, vn, gn = x
    mm = jnp.matmul
    if gn is None:
        dv = mm(kn, dS)
        dk = jnp.einsum("bhcv,bhkv->bhck", vn, dS)
        dS_prev = dS
        dqt = jnp.zeros_like(qt)
        if don is not None:
            dqt = jnp.einsum("bhkv,bhiv->bhki", S, don)
            dS_prev = dS_prev + mm(qt, don)
            if intra:
                maskt = jnp.swapaxes(lower_mask(qn.shape[-2]), 0, 1)
                At = jnp.where(maskt, jnp.einsum("bhjk,bhik->bhji", kn, qn), 0.0)
                dPt = jnp.where(maskt, jnp.einsum("bhjv,bhiv->bhji", vn, don), 0.0)
                dv = dv + mm(At, don)
                dk = dk + mm(dPt, qn)
                dqt = dqt + mm(kt, dPt)
        return dqt, dk, dv, None, dS_prev
    Dt, gamma, lam, Gam = _upper_decay(gn)
    dv, dk, db, dbC, dS_prev = _state_update_grads(kn, vn, lam, Gam, S, dS)
    dqt = jnp.zeros_like(qt)
    if don is not None:
        if intra:
            At = jnp.einsum("bhjk,bhik->bhji", kn, qn) * Dt
            dAt = jnp.einsum("bhjv,bhiv->bhji", vn, don)
            dv = dv + mm(At, don)
            dPt = dAt * Dt
            dk = dk + mm(dPt, qn)
            Et = dAt * At
            db = db + jnp.sum(Et, axis=-2) - jnp.sum(Et, axis=-1)
            dOSt = jnp.einsum("bhkv,bhiv->bhki", S, don)
            qgt = qt * gamma[..., None, :]
            dqt = mm(kt, dPt) + dOSt * gamma[..., None, :]
            db = db + jnp.sum(qgt * dOSt, axis=-2)
            dS_prev = dS_prev + mm(qgt, don)
        else:
            dqt = jnp.einsum("bhkv,bhiv->bhki", S, don)
            dS_prev = dS_prev + mm(qt, don)
    db = db.at[..., -1].add(dbC)
    dg = cut_grad(reverse_cumsum_by_matmul(db), gn)
    return dqt, dk, dv, dg, dS_prev


_chunk_tokens.defvjp(_chunk_tokens_fwd, _chunk_tokens_bwd)


def _chunk_fwd_step(S, x, intra, emit, k_major=False):
    """One chunk of the forward: ``(S_next, o or None)``. ``x = (q, k, v, g)`` as
    ``[B, H, C, K]``, ``[B, H, C, K]``, ``[B, H, C, V]``, ``[B, H, C]`` (``g`` None: no decay);
    ``k_major``: the keys come as ``[B, H, K, C]`` (as :func:`_tokens_forward` slices them), so that
    ``Q Kᵀ`` and ``Kᵀ V`` are plain batched matmuls (XLA:CPU hands those to its fused matmul
    library; with a transposed operand the state increment was a separate, slower dot)."""
    if k_major:
        return _chunk_fwd_step_kmajor(S, x, intra, emit)
    qn, kn, vn, gn = x
    if gn is None:
        o = None
        if emit:
            o = jnp.einsum("bhik,bhkv->bhiv", qn, S)
            if intra:  # causal: O = tril(Q Kᵀ) V + Q S
                A = jnp.where(lower_mask(qn.shape[-2]), jnp.einsum("bhik,bhjk->bhij", qn, kn), 0.0)
                o = jnp.einsum("bhij,bhjv->bhiv", A, vn) + o
        return S + jnp.einsum("bhck,bhcv->bhkv", kn, vn), o
    D, gamma, lam, Gam = decay_terms(gn)
    o = None
    if emit:
        if intra:  # causal: O = (Q Kᵀ ⊙ D) V + (γ ⊙ Q) S
            A = jnp.einsum("bhik,bhjk->bhij", qn, kn) * D
            o = jnp.einsum("bhij,bhjv->bhiv", A, vn)
            o = o + jnp.einsum("bhik,bhkv->bhiv", qn * gamma[..., None], S)
        else:  # block causal: O = Q S
            o = jnp.einsum("bhik,bhkv->bhiv", qn, S)
    S_next = Gam[..., None, None] * S + jnp.einsum("bhck,bhcv->bhkv", kn * lam[..., None], vn)
    return S_next, o


def _chunk_fwd_step_kmajor(S, x, intra, emit):
    """:func:`_chunk_fwd_step` with keys ``kt [B, H, K, C]``: the same formulas, every
    product a plain batched matmul."""
    qn, kt, vn, gn = x
    if gn is None:
        o = None
        if emit:
            o = jnp.matmul(qn, S)
            if intra:  # causal: O = tril(Q Kᵀ) V + Q S
                o = jnp.matmul(jnp.where(lower_mask(qn.shape[-2]), jnp.matmul(qn, kt), 0.0), vn) + o
        return S + jnp.matmul(kt, vn), o
    D, gamma, lam, Gam = decay_terms(gn)
    o = None
    if emit:
        if intra:  # causal: O = (Q Kᵀ ⊙ D) V + (γ ⊙ Q) S
            o = jnp.matmul(jnp.matmul(qn, kt) * D, vn) + jnp.matmul(qn * gamma[..., None], S)
        else:  # block causal: O = Q S
            o = jnp.matmul(qn, S)
    S_next = Gam[..., None, None] * S + jnp.matmul(kt * lam[..., None, :], vn)
    return S_next, o


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _chunk_scan(q, k, v, g, S0, h0, marks, intra, emit):
    """Scan over chunks. Inputs ``[N, B, H, C, D]``, gates ``[N, B, H, C]``, state ``[B, H, K, V]``.

    Packed sequences (``cu_seqlens``): ``h0 [Ns, B, H, K, V]``, the initial states of the
    sequences, and ``marks = (first, ends, seq)``, per chunk: it is the first / the last of
    its sequence, and which sequence it belongs to. A first chunk starts from its sequence's
    ``h0`` instead of the carried state; the state after a last chunk is its sequence's
    final state (sequences without a chunk keep ``h0``). Both ``None`` otherwise.

    Returns ``(o [N, B, H, C, V] or None, S_final)``, plus the final states
    ``[Ns, B, H, K, V]`` with ``marks``.
    """
    out, _ = _chunk_scan_fwd(q, k, v, g, S0, h0, marks, intra, emit)
    return out


def _chunk_scan_fwd(q, k, v, g, S0, h0, marks, intra, emit):
    def step(carry, x):
        S, SF = carry
        qn, kn, vn, gn, m = x
        if m is not None:  # the first chunk of a packed sequence starts from its own state
            f, e, n = m
            S = jnp.where(f, lax.dynamic_index_in_dim(h0, n, 0, keepdims=False), S)
        S_next, o = _chunk_fwd_step(S, (qn, kn, vn, gn), intra, emit)
        if m is not None:  # ... and its last chunk leaves the sequence's final state
            cur = lax.dynamic_index_in_dim(SF, n, 0, keepdims=False)
            SF = lax.dynamic_update_index_in_dim(SF, jnp.where(e, S_next, cur), n, 0)
        return (S_next, SF), (o, S)  # keep the state *before* each chunk for the backward

    (S, SF), (o, S_prev) = lax.scan(step, (S0, h0), (q, k, v, g, marks), unroll=_scan_unroll(q.shape[0]))
    out = (o, S) if marks is None else (o, S, SF)
    return out, (q, k, v, g, S_prev, marks)


def _chunk_scan_bwd(intra, emit, res, cts):
    """Reverse scan: carry dS (cotangent of the state after the chunk).

    With P = Q Kᵀ, A = P ⊙ D (causal; chunk masking has no A and γ ≡ 1):
      dA = dO Vᵀ,  dV = Aᵀ dO + (λK) dS',  dP = dA ⊙ D,
      dQ = dP K + γ ⊙ (dO Sᵀ),  dK = dPᵀ Q + λ ⊙ (V dS'ᵀ),  dS = Γ dS' + (γQ)ᵀ dO,
    and the log-decay gradient through D, γ, λ, Γ followed by a reverse cumsum. Packed
    sequences: a last chunk's dS' is its sequence's final-state cotangent, and a first
    chunk's dS goes to its sequence's ``h0`` instead of the chunk before.
    """
    q, k, v, g, S_prev, marks = res
    do, dS_final = cts[0], cts[1]
    dSF = cts[2] if marks is not None else None
    if do is None or not emit:
        do = None
    dh0 = None
    if marks is not None:  # sequences without a chunk return h0 itself
        first, _, seq = marks
        has = jnp.zeros(dSF.shape[:1], jnp.int32).at[seq].add(first.astype(jnp.int32)) > 0
        dh0 = jnp.where(has.reshape((-1,) + (1,) * (dSF.ndim - 1)), 0.0, dSF)

    def step(carry, x):
        dS, dh0 = carry
        qn, kn, vn, gn, S, don, m = x
        if m is not None:
            f, e, n = m
            dS = jnp.where(e, lax.dynamic_index_in_dim(dSF, n, 0, keepdims=False), dS)
        dq, dk, dv, dg, dS_prev = _chunk_bwd_step(dS, (qn, kn, vn, gn), S, don, intra)
        if m is not None:  # a first chunk read its sequence's h0, not the chunk before
            cur = lax.dynamic_index_in_dim(dh0, n, 0, keepdims=False)
            dh0 = lax.dynamic_update_index_in_dim(dh0, cur + jnp.where(f, dS_prev, 0.0), n, 0)
            dS_prev = jnp.where(f, 0.0, dS_prev)
        return (dS_prev, dh0), (dq, dk, dv, dg)

    xs = (q, k, v, g, S_prev, do, marks)
    (dS0, dh0), (dq, dk, dv, dg) = lax.scan(step, (dS_final, dh0), xs, reverse=True,
                                                 unroll=_scan_unroll(q.shape[0]))
    return dq, dk, dv, dg, dS0, dh0, None


_chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)


def _chunk_bwd_step(dS, x, S, don, intra):
    """The backward of one chunk (formulas in :func:`_chunk_scan_bwd`): ``dS`` the cotangent
    of the state after the chunk, ``S`` the state before it, ``don`` the output cotangent
    (``None``: no outputs). Returns ``(dq, dk, dv, dg or None, dS_prev)``."""
    qn, kn, vn, gn = x
    if gn is None:  # no decay: D the causal mask, γ = λ = Γ = 1, no log-decay gradient
        return _nodecay_bwd_step(dS, qn, kn, vn, S, don, intra)
    D, gamma, lam, Gam = decay_terms(gn)
    dv, dk, db, dbC, dS_prev = _state_update_grads(kn, vn, lam, Gam, S, dS)
    dq = jnp.zeros_like(qn)
    if don is not None:
        if intra:
            P = jnp.einsum("bhik,bhjk->bhij", qn, kn)
            A = P * D
            dA = jnp.einsum("bhiv,bhjv->bhij", don, vn)
            dv = dv + jnp.einsum("bhij,bhiv->bhjv", A, don)
            dP = dA * D
            dq = jnp.einsum("bhij,bhjk->bhik", dP, kn)
            dk = dk + jnp.einsum("bhij,bhik->bhjk", dP, qn)
            E = dA * A
            db = db + jnp.sum(E, axis=-1) - jnp.sum(E, axis=-2)
            dOS = jnp.einsum("bhiv,bhkv->bhik", don, S)
            qg = qn * gamma[..., None]
            dq = dq + dOS * gamma[..., None]
            db = db + jnp.sum(qg * dOS, axis=-1)
            dS_prev = dS_prev + jnp.einsum("bhik,bhiv->bhkv", qg, don)
        else:
            dq = jnp.einsum("bhiv,bhkv->bhik", don, S)
            dS_prev = dS_prev + jnp.einsum("bhik,bhiv->bhkv", qn, don)
    db = db.at[..., -1].add(dbC)
    # b = cumsum(g) with cuts as resets (decay_terms): the gradient w.r.t. a cut's g is 0
    dg = cut_grad(reverse_cumsum_by_matmul(db), gn)
    return dq, dk, dv, dg, dS_prev


def _nodecay_bwd_step(dS, qn, kn, vn, S, don, intra):
    """:func:`_chunk_bwd_step` without decay (``g=None``): the same formulas with ``D`` the
    causal mask and ``γ = λ = Γ = 1``."""
    dv = jnp.einsum("bhck,bhkv->bhcv", kn, dS)
    dk = jnp.einsum("bhcv,bhkv->bhck", vn, dS)
    dS_prev = dS
    dq = jnp.zeros_like(qn)
    if don is not None:
        dq = jnp.einsum("bhiv,bhkv->bhik", don, S)
        dS_prev = dS_prev + jnp.einsum("bhik,bhiv->bhkv", qn, don)
        if intra:
            mask = lower_mask(qn.shape[-2])
            A = jnp.where(mask, jnp.einsum("bhik,bhjk->bhij", qn, kn), 0.0)
            dP = jnp.where(mask, jnp.einsum("bhiv,bhjv->bhij", don, vn), 0.0)
            dv = dv + jnp.einsum("bhij,bhiv->bhjv", A, don)
            dq = dq + jnp.einsum("bhij,bhjk->bhik", dP, kn)
            dk = dk + jnp.einsum("bhij,bhik->bhjk", dP, qn)
    return dq, dk, dv, None, dS_prev


# --------------------------------------------------------------------------- chunked, per-channel decay


def _channel_chunk_step(S, qn, kn, vn, gn, intra, emit):
    """One chunk with a per-channel log-decay ``gn [B, H, C, K]``: with ``b`` the in-chunk
    cumulative log-decay (a row per token), ``O = P V + (e^{b} ⊙ Q) S`` where
    ``P_ij = [j ≤ i] Σ_κ q_iκ k_jκ e^{b_iκ − b_jκ}`` (:func:`tttla_jax.ops.chunk.decayed_gram`)
    and ``S ← diag(e^{b_C}) S + (e^{b_C − b} ⊙ K)ᵀ V``."""
    c, s, gamma, lam, Gam = channel_decays(gn)
    o = None
    if emit:
        if intra:
            o = jnp.matmul(decayed_gram(qn, kn, c, s), vn) + jnp.matmul(qn * gamma, S)
        else:
            o = jnp.matmul(qn, S)
    S_next = Gam[..., :, None] * S + jnp.einsum("bhck,bhcv->bhkv", kn * lam, vn)
    return S_next, o


def _chunked_channel(q, k, v, g, S0, masking, chunk_size):
    """:func:`_chunked` for a per-channel log-decay ``g [B, T, H, K]``: a ``lax.scan`` over
    chunks of :func:`_channel_chunk_step`, rematerialised per chunk (the backward pass keeps
    the state before each chunk), differentiated by autodiff."""
    T = q.shape[1]
    C = min(chunk_size, T) if masking != "chunk" else chunk_size
    xs = tuple(scan_layout(x, C) for x in (q, k, v, g))  # [N, B, H, C, ...]
    emit = masking != "none"

    @jax.checkpoint
    def step(S, x):
        S_next, o = _channel_chunk_step(S, *x, masking == "causal", emit)
        return S_next, o

    S_final, o = lax.scan(step, S0, xs)
    if not emit:
        return jnp.einsum("bthk,bhkv->bthv", q, S_final), S_final
    return from_scan_layout(o, T), S_final


def _chunked_channel_varlen(q, k, v, g, h0, masking, chunk_size, cu_seqlens):
    """:func:`_chunked_channel` on packed sequences: each sequence in its own chunks
    (:mod:`tttla_jax.ops.varlen`), the chunk scan resetting to the sequence's initial state
    on its first chunk."""
    lay = varlen.layout(cu_seqlens, q.shape[1], chunk_size)
    xs = tuple(varlen.to_chunks(x, lay) for x in (q, k, v, g))  # [Nc, 1, H, C, ...]
    emit = masking != "none"

    @jax.checkpoint
    def step(S, x):
        qn, kn, vn, gn, f, n = x
        S = jnp.where(f, lax.dynamic_index_in_dim(h0, n, 0, keepdims=False)[None], S)
        S_next, o = _channel_chunk_step(S, qn, kn, vn, gn, masking == "causal", emit)
        return S_next, (o, S_next)

    _, (o, S_after) = lax.scan(step, jnp.zeros_like(h0[:1]), xs + (lay.first, lay.seq))
    return _varlen_outputs(o, xs[0], varlen.final_states(S_after, h0, lay), lay, masking)


# --------------------------------------------------------------------------- packed sequences


def _chunked_varlen(q, k, v, g, h0, masking, chunk_size, cu_seqlens):
    """:func:`_chunked` on packed sequences: each sequence cut into its own chunks
    (:mod:`tttla_jax.ops.varlen`), the chunk scan resetting to the sequence's initial state
    on its first chunk and keeping its final state after its last (same custom VJP)."""
    lay = varlen.layout(cu_seqlens, q.shape[1], chunk_size)
    # the layout's derivative by gathers (the chunk scan is a custom_vjp: no forward mode anyway)
    qc, kc, vc, gc = (None if x is None else varlen.to_chunks(x, lay, gather_vjp=True)
                      for x in (q, k, v, g))  # [Nc, 1, H, C, ...]
    emit = masking != "none"
    o, _, SF = _chunk_scan(qc, kc, vc, gc, jnp.zeros_like(h0[0])[None], h0[:, None],
                           (lay.first, lay.ends, lay.seq), masking == "causal", emit)
    return _varlen_outputs(o, qc, SF[:, 0], lay, masking, gather_vjp=True)


def _varlen_outputs(o, qc, S_final, lay, masking, gather_vjp=False):
    """Chunk outputs back to tokens; ``masking="none"``: every query reads its own sequence's
    final state."""
    if masking == "none":
        o = jnp.einsum("nbhck,nbhkv->nbhcv", qc, jnp.take(S_final, lay.seq, axis=0)[:, None])
    return varlen.from_chunks(o, lay, gather_vjp=gather_vjp), S_final


def _recurrent_varlen(q, k, v, g, h0, masking, chunk_size, cu_seqlens):
    """Token scan on packed sequences, in the re-chunked layout: an outer scan over chunks
    (resetting on each sequence's first chunk; rematerialised per chunk) around the token
    scan of :func:`_recurrent`."""
    lay = varlen.layout(cu_seqlens, q.shape[1], chunk_size)
    xs = tuple(varlen.to_chunks(x, lay) for x in (q, k, v, g))  # [Nc, 1, H, C, ...]
    tm = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731  [1, H, C, ...] -> [C, 1, H, ...]

    def token(S, x):
        qt, kt, vt, gt = x
        S = decay(gt, S) + kt[..., :, None] * vt[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", qt, S)

    @jax.checkpoint
    def chunk(S, x):
        qn, kn, vn, gn, f, n = x
        S = jnp.where(f, lax.dynamic_index_in_dim(h0, n, 0, keepdims=False)[None], S)
        S_next, o = lax.scan(token, S, tuple(tm(y) for y in (qn, kn, vn, gn)))
        if masking == "chunk":  # block causal: the whole chunk reads the state before it
            o = jnp.einsum("bhck,bhkv->bhcv", qn, S)
        else:
            o = jnp.moveaxis(o, 0, 2)
        return S_next, (o, S_next)

    _, (o, S_after) = lax.scan(chunk, jnp.zeros_like(h0[:1]), xs + (lay.first, lay.seq))
    return _varlen_outputs(o, xs[0], varlen.final_states(S_after, h0, lay), lay, masking)


def _associative_varlen(q, k, v, g, h0, masking, chunk_size, cu_seqlens):
    """Segmented ``lax.associative_scan``: a pair that starts a sequence does not combine with
    what is before it, ``(g1, X1, r1) ∘ (g2, X2, r2) = (g2, X2, 1)`` if ``r2`` else
    ``(g1 + g2, exp(g2)·X1 + X2, r1)``; then ``S_t = X_t + exp(G_t)·h0[n_t]``."""
    T = q.shape[1]
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    n_t = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), cu.shape[0] - 2)  # sequence of each token
    pos = t - cu[n_t]                                                            # position in it
    r = jnp.broadcast_to((pos == 0)[None, :, None], g.shape[:3])
    X = k[..., :, None] * v[..., None, :]  # [1, T, H, K, V]

    def combine(a, b):
        g1, X1, r1 = a
        g2, X2, r2 = b
        keep = jnp.logical_not(r2)
        return (jnp.where(keep[(...,) + (None,) * (g1.ndim - keep.ndim)], g1, 0.0) + g2,
                jnp.where(keep[..., None, None], decay(g2, X1), 0.0) + X2,
                r1 | r2)

    G, S, _ = lax.associative_scan(combine, (g, X, r), axis=1)
    H0t = jnp.take(h0, n_t, axis=0)[None]                       # [1, T, H, K, V]
    S = S + decay(G, H0t)                                        # S_t for every t
    last = cu[1:] - 1
    S_final = jnp.where((cu[1:] > cu[:-1])[:, None, None, None], S[0, jnp.maximum(last, 0)], h0)
    if masking == "causal":
        o = jnp.einsum("bthk,bthkv->bthv", q, S)
    elif masking == "none":
        o = jnp.einsum("bthk,bthkv->bthv", q, jnp.take(S_final, n_t, axis=0)[None])
    else:  # block causal within each sequence: read the state before the token's block
        start = pos - pos % chunk_size                          # block start, in the sequence
        before = cu[n_t] + start - 1                             # the token before the block (global)
        R = jnp.where((start == 0)[:, None, None, None], jnp.take(h0, n_t, axis=0),
                      S[0, jnp.maximum(before, 0)])
        o = jnp.einsum("bthk,bthkv->bthv", q, R[None])
    return o, S_final
