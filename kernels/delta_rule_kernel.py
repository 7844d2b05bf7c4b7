"""Pallas kernels for the chunked (gated) delta rule, forward and backward (docs/linear_attention.md).

Recurrence (decay first, then the delta step; token t reads its own write)::

    S ← exp(g_t) S_{t-1},   u_t = β_t (v_t − k_t S),   S_t = S + k_tᵀ u_t,   o_t = (scale·q_t) S_t

Per chunk (WY / UT form, Yang et al. 2024 "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length"; gated: "Gated Delta Networks"), with ``b`` the in-chunk inclusive
cumulative log-decay, ``A_ij = [j < i] β_i e^{b_i − b_j} k_i·k_j`` and
``P_ij = [j ≤ i] e^{b_i − b_j} q_i·k_j``::

    W_v = (I + A)⁻¹ (β V),   W_k = (I + A)⁻¹ (β e^b K),   U = W_v − W_k S
    O = (e^b Q) S + P U,     S ← e^{b_C} S + (e^{b_C − b} K)ᵀ U

``(I + A)⁻¹`` is computed in-kernel by doubling, ``Σ_n (−A)ⁿ = Π_i (I + (−A)^{2^i})``
(``A`` is strictly lower triangular, so the product has log2(C) factors;
:func:`tttla_jax.ops.chunk.unit_lower_inverse_by_products`).

Per-channel log-decay ``g [B, T, H, K]`` (Kimi Delta Attention, Kimi Team 2025, "Kimi
Linear": ``S ← diag(e^{g_t}) S`` before the delta step): ``b`` is one cumulative log-decay
per key channel, ``e^b`` multiplies keys and queries channel-wise, ``e^{b_C}`` scales the
state's rows, and ``A``, ``P`` contract the decay with the keys,
``A_ij = [j < i] β_i Σ_κ k_iκ k_jκ e^{b_iκ − b_jκ}``, ``P_ij = [j ≤ i] Σ_κ q_iκ k_jκ e^{b_iκ − b_jκ}``.
As the linear-attention per-channel kernel (:mod:`tttla_jax.kernels.linear_attention_kernel`,
section "per-channel chunk math", whose helpers this module imports), the kernels then run
:data:`PER_CHANNEL_CHUNK`-token chunks, the chunk boundary being the reference point of every
factor across chunks (all exponents ≤ 0), and build ``A`` and ``P`` one key column at a time
from the exact exponentials ``e^{b_iκ − b_jκ}``, masked before ``exp`` (``i ≥ j`` in the same
segment of channel κ: per-channel cuts, no ``inf − inf``).

Backends and dispatch as :mod:`tttla_jax.kernels.linear_attention_kernel` (Triton: one
program per (batch, head, value block) looping over chunks; Mosaic: grid
(batch, head, value block, chunk) with the chunk axis sequential and the state in VMEM).

Backward (``jax.custom_vjp``): a states sweep and a reverse sweep (section "backward
kernels" below; the log-decay gradient by an identity, no kernel). Packed sequences
(``cu_seqlens``) run every sweep on the re-chunked layout with per-sequence resets. The XLA
backward they replace (the VJP of :func:`tttla_jax.ops.chunk.delta_chunked`, or of the packed
chunked form) stays as ``_dr_bwd_xla`` / ``_dr_packed_bwd_xla``, the tests' reference. All
in-kernel math is float32 (float64 for float64 inputs in interpret mode) whatever the input
dtype. Head dims ``16 ≤ K, V ≤ 256`` are zero-padded to the next tile (exact).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from tttla_jax import _checks
from tttla_jax.kernels.linear_attention_kernel import (
    CHUNK_SIZES,
    END,
    FIRST,
    PER_CHANNEL_CHUNK,
    TPU_VMEM_CAP,
    BlockSizes,
    _acc,
    _check_block_sizes,
    _check_interpret,
    _cum_decay,
    _decay_mask,
    _decays,
    _dot,
    _interpret_mode,
    _is_compiled_dtype,
    _channel_decays,
    _col,
    _column_decay,
    _row,
    _from_slots,
    _packed_tables,
    _reverse_cumsum_stops,
    _static_scale,
    _to_slots,
    default_block_sizes,
    head_dim_reason,
    pad_head_dims,
    padded_dim,
    tpu_vmem_estimate,
)
from tttla_jax.ops import chunk as _chunk


def delta_rule_unsupported_reason(dtype, K: int, V: int, chunk_size: Optional[int] = None,
                                  interpret: bool = False, *, per_channel_decay: bool = False) -> Optional[str]:
    """Why the delta-rule kernel cannot run a call (``None`` if it can), as
    :func:`tttla_jax.kernels.unsupported_reason` (``chunk_size`` is only a tiling choice here;
    head dims in ``[16, 256]`` are zero-padded to the next tile, exact: ``β k kᵀ`` and ``k S``
    do not see zero key channels; a per-channel log-decay, ``per_channel_decay``, is taken)."""
    del per_channel_decay  # taken (Kimi Delta Attention: PER_CHANNEL_CHUNK-token chunks)
    if not (_is_compiled_dtype(dtype) or (interpret and jnp.dtype(dtype) == jnp.float64)):
        return (f"dtype {jnp.dtype(dtype)} is not supported (bfloat16, float16, float32; "
                "float64 only in interpret mode)")
    return head_dim_reason(K, V)


# --------------------------------------------------------------------------- chunk math


def _kda_grams(qs, kf, c, s):
    """Per-channel decayed grams of one chunk (Kimi Delta Attention): ``P_ij = Σ_κ q_iκ k_jκ
    E_ijκ`` and ``G_ij = Σ_κ k_iκ k_jκ E_ijκ`` ``[C, C]``, ``E_ijκ = exp(b_iκ − b_jκ)`` for
    ``i ≥ j`` in the same segment of channel κ, else 0: one key column ``j`` per step, the
    exponentials exact and masked before ``exp`` (:func:`_column_decay`, as the
    linear-attention per-channel kernel; every exponent evaluated is ≤ 0). ``qs=None``: ``G``
    only (``P`` is ``None``; the states sweep reads no query)."""
    C = kf.shape[0]
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    xs = (kf,) if qs is None else (qs, kf)

    def step(j, grams):
        e = _column_decay(c, s, j)
        kj = _row(kf, j)
        return tuple(jnp.where(cols == j, jnp.sum(x * e * kj, axis=1, keepdims=True), gr) for x, gr in zip(xs, grams))

    grams = lax.fori_loop(jnp.int32(0), jnp.int32(C), step,  # int32 index under x64 too
                          tuple(jnp.zeros((C, C), kf.dtype) for _ in xs))
    return (None,) + grams if qs is None else grams


def _chunk_terms(qs, kf, bcol, scol, bC, sC, acc):
    """The decay factors and grams of one chunk, per head (decay columns ``[C, 1]``: one mask
    ``D`` on ``Q Kᵀ`` and ``K Kᵀ``) or per key channel (``[C, K]``: :func:`_kda_grams`):
    ``(γ, λ, Γ, P, G, D)`` with ``D`` ``None`` per channel (``P`` ``None`` without queries)."""
    if bcol.shape[-1] == 1:
        D = _decay_mask(bcol, scol, kf.shape[0])  # cut-aware (tttla_jax.ops.chunk.segment_cumsum)
        gamma, lam, Gam = _decays(bcol, scol, bC, sC)
        P = None if qs is None else _dot(qs, kf, acc, tb=True) * D
        return gamma, lam, Gam, P, _dot(kf, kf, acc, tb=True) * D, D
    gamma, lam, Gam = _channel_decays(bcol, scol, bC, sC)  # Γ a [K, 1] column: it scales S's rows
    P, G = _kda_grams(qs, kf, bcol, scol)
    return gamma, lam, Gam, P, G, None


def _delta_chunk(q, k, v, beta, bcol, scol, bC, sC, S, *, scale, acc, out=True):
    """One chunk: ``(O [C, BV], S_next [K, BV])``; every operand in ``acc``. ``out=False``:
    ``(None, S_next)`` (the states sweep: no query read, no ``P``)."""
    C = k.shape[0]
    qs = q.astype(acc) * scale if out else None
    kf = k.astype(acc)
    vf = v.astype(acc)
    beta = beta.astype(acc)
    gamma, lam, Gam, P, G, _ = _chunk_terms(qs, kf, bcol, scol, bC, sC, acc)
    A = jnp.where(_chunk.lower_mask(C, strict=True), beta * G, 0.0)
    Tinv = _chunk.unit_lower_inverse_by_products(A, lambda a, b: _dot(a, b, acc))
    Wv = _dot(Tinv, beta * vf, acc)
    Wk = _dot(Tinv, beta * gamma * kf, acc)
    U = Wv - _dot(Wk, S, acc)
    o = _dot(qs * gamma, S, acc) + _dot(P, U, acc) if out else None
    S = Gam * S + _dot(kf * lam, U, acc, ta=True)
    return o, S


# --------------------------------------------------------------------------- kernels


def _gpu_kernel(q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, s0_ref, o_ref, st_ref, *, C, N, scale, acc):
    def body(c, S):
        t0 = pl.multiple_of(c * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        o, S = _delta_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], beta_ref[sl, :], b_ref[sl, :],
                            sg_ref[sl, :], b_ref[end, :], sg_ref[end, :], S,
                            scale=scale, acc=acc)
        o_ref[sl, :] = o.astype(o_ref.dtype)
        return S

    st_ref[...] = lax.fori_loop(0, N, body, s0_ref[...].astype(acc)).astype(st_ref.dtype)


def _tpu_kernel(q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, s0_ref, o_ref, st_ref, s_scr, *, N, scale, acc):
    c = pl.program_id(3)

    @pl.when(c == 0)
    def _():
        s_scr[...] = s0_ref[...].astype(acc)

    C = q_ref.shape[0]
    o, S = _delta_chunk(q_ref[...], k_ref[...], v_ref[...], beta_ref[...], b_ref[...], sg_ref[...],
                        b_ref[C - 1:C, :], sg_ref[C - 1:C, :], s_scr[...], scale=scale, acc=acc)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = S

    @pl.when(c == N - 1)
    def _():
        st_ref[...] = S.astype(st_ref.dtype)


def _cost(BH, N, K, V, C, nvb, itemsize, G=1):
    """Forward cost; ``G = K`` (per-channel log-decay): the grams' ``C²·K`` exponentials per chunk."""
    lg = max(1, (C - 1).bit_length() - 1)
    per_chunk = nvb * (2 * C * C * K * 2 + 2 * lg * 2 * C ** 3 + 2 * C * C * K) + 2 * C * C * V \
        + 2 * C * K * V * 3 + 2 * C * C * V
    exps = C * C * (K if G > 1 else 1) + 2 * C * G
    return pl.CostEstimate(flops=int(BH * N * per_chunk), transcendentals=int(BH * N * nvb * exps),
                           bytes_accessed=int(BH * N * C * ((2 * K * nvb + 2 * V) * itemsize + 8) + BH * 8 * K * V))


def _call(backend, interp, q, k, v, beta, b, sg, S0, *, scale, cfg):
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    G = b.shape[-1]  # 1 (per head) or K (per key channel)
    C = cfg.C
    N = Tp // C
    acc = _acc(q.dtype)
    out_dtype = q.dtype
    if backend == "gpu":
        bv, nw, ns = cfg.block_sizes.gpu(K, V)
        full = lambda d: pl.BlockSpec((None, None, Tp, d), lambda i, j, n: (i, j, 0, 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, Tp, bv), lambda i, j, n: (i, j, 0, n))
        sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n: (i, j, 0, n))
        return pl.pallas_call(
            functools.partial(_gpu_kernel, C=C, N=N, scale=scale, acc=acc),
            out_shape=(jax.ShapeDtypeStruct((B, H, Tp, V), out_dtype), jax.ShapeDtypeStruct((B, H, K, V), acc)),
            grid=(B, H, V // bv),
            in_specs=[full(K), full(K), vblk, full(1), full(G), full(G), sblk],
            out_specs=(vblk, sblk),
            compiler_params=None if interp else plgpu.CompilerParams(num_warps=nw, num_stages=ns),
            cost_estimate=_cost(B * H, N, K, V, C, V // bv, jnp.dtype(q.dtype).itemsize, G),
            interpret=bool(interp),
            name="tttla_delta_rule_fwd_triton",
        )(q, k, v, beta, b, sg, S0)
    if jnp.dtype(q.dtype) == jnp.float16:  # Mosaic: no float16 vector loads on v5e
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    o_dt = jnp.float32 if jnp.dtype(out_dtype) == jnp.float16 else out_dtype
    bv = cfg.block_sizes.tpu(K, V)
    est = _tpu_estimate(K, V, C, bv, q.dtype, acc)
    tok = lambda d: pl.BlockSpec((None, None, C, d), lambda i, j, n, c: (i, j, c, 0))  # noqa: E731
    vblk = pl.BlockSpec((None, None, C, bv), lambda i, j, n, c: (i, j, c, n))
    sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n, c: (i, j, 0, n))
    o, S = pl.pallas_call(
        functools.partial(_tpu_kernel, N=N, scale=scale, acc=acc),
        out_shape=(jax.ShapeDtypeStruct((B, H, Tp, V), o_dt), jax.ShapeDtypeStruct((B, H, K, V), acc)),
        grid=(B, H, V // bv, N),
        in_specs=[tok(K), tok(K), vblk, tok(1), tok(G), tok(G), sblk],
        out_specs=(vblk, sblk),
        scratch_shapes=[pltpu.VMEM((K, bv), acc)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=int(cfg.block_sizes.vmem_limit_bytes or max(16 * 2**20, 2 * est))),
        cost_estimate=_cost(B * H, N, K, V, C, V // bv, jnp.dtype(q.dtype).itemsize, G),
        interpret=interp or False,
        name="tttla_delta_rule_fwd_mosaic",
    )(q, k, v, beta, b, sg, S0)
    return o.astype(out_dtype), S


def _tpu_estimate(K, V, C, bv, dtype, acc):
    est = tpu_vmem_estimate(K, V, C, bv, jnp.dtype(dtype).itemsize, jnp.dtype(acc).itemsize) + 8 * C * C * 4
    if est > TPU_VMEM_CAP:
        raise ValueError(f"TPU delta-rule kernel: estimated VMEM {est / 2**20:.1f} MiB exceeds "
                         f"{TPU_VMEM_CAP / 2**20:.0f} MiB; use a smaller chunk_size")
    return est


@dataclasses.dataclass(frozen=True)
class _Cfg:
    C: int
    block_sizes: BlockSizes
    interpret: Any


def _dispatch(cfg, *args, scale, call=None):
    it = cfg.interpret
    call = functools.partial(call or _call, scale=scale, cfg=cfg)
    if it is not None:
        if it is True or (isinstance(it, str) and it == "gpu"):
            return call("gpu", True, *args)
        if isinstance(it, str) and it == "tpu":
            it = pltpu.InterpretParams(uninitialized_memory="nan")
        return call("tpu", it, *args)
    return lax.platform_dependent(
        *args,
        cuda=lambda *a: call("gpu", False, *a),
        rocm=lambda *a: call("gpu", False, *a),
        tpu=lambda *a: call("tpu", False, *a),
        default=lambda *a: call("gpu", True, *a),
    )


# --------------------------------------------------------------------------- custom_vjp + wrapper



@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _dr(q, k, v, beta, g, S0, scale, cfg):
    return _dr_fwd(q, k, v, beta, g, S0, scale, cfg)[0]


def _dr_fwd(q, k, v, beta, g, S0, scale, cfg):
    T = q.shape[1]
    Tp = _chunk.num_chunks(T, cfg.C) * cfg.C
    acc = _acc(q.dtype)
    args = tuple(_chunk.heads_major(x, Tp) for x in (q, k, v, beta.astype(acc)[..., None]))
    o, S = _dispatch(cfg, *args, *_cum_decay(g.astype(acc), cfg.C, Tp), S0.astype(acc), scale=scale)
    return (_chunk.from_heads_major(o, T), S), (q, k, v, beta, g, S0, S)


# --------------------------------------------------------------------------- backward kernels
#
# Two sweeps, no per-chunk state kept from the forward:
#
# * states: the forward recurrence again, writing each chunk's starting state ``[N, K, V]``
#   (the only O(N·K·V) buffer, alive during the backward only);
# * reverse: per chunk, with ``S`` its starting state and ``dS`` the cotangent of the state
#   after it (``X = βV``, ``Y = βγK``, ``W_v = T X``, ``W_k = T Y``, ``U = W_v − W_k S``,
#   ``P = (Q Kᵀ) ⊙ D``, ``T = (I + A)⁻¹``)::
#
#       dU = Pᵀ dO + (λ ⊙ K) dS,      dP = dO Uᵀ
#       dQ = (dP ⊙ D) K + γ ⊙ (dO Sᵀ),   dK = (dP ⊙ D)ᵀ Q + λ ⊙ (U dSᵀ) + βγ ⊙ dY + (M + Mᵀ) K
#       dS_prev = Γ dS + (γ ⊙ Q)ᵀ dO − W_kᵀ dU
#       dX = Tᵀ dU,  dY = −Tᵀ (dU Sᵀ),  dV = β ⊙ dX,  dT = dU Xᵀ − (dU Sᵀ) Yᵀ
#       dA = −Tᵀ dT Tᵀ (strictly lower),  M = β ⊙ D ⊙ dA,  dβ = Σ_v dX ⊙ V + Σ_k dY ⊙ γK + Σ_j dA ⊙ D ⊙ KKᵀ
#
#   Everything but ``dV`` and ``dS_prev`` sums over the value dim, so with value blocks the
#   kernel writes per-block partials of ``dQ, dK, dβ`` that the wrapper adds.
# * the log-decay gradient needs no kernel. With ``B_t`` the global cumulative log-decay and
#   ``S̃_t = e^{−B_t} S_t``, the recurrence is ``S̃_t = S̃_{t−1} + β_t k_tᵀ (e^{−B_t} v_t − k_t S̃_{t−1})``
#   and ``o_t = e^{B_t} q_t S̃_t``: ``B`` enters only through ``e^{B_t} q_t``, ``e^{−B_t} v_t``
#   and ``S_T = e^{B_T} S̃_T``, so ``∂L/∂B_t = q_t·dq_t − v_t·dv_t + [t = T−1]⟨S_T, dS_T⟩`` and
#   ``dg`` is its reverse cumulative sum stopped at cuts (as the linear-attention kernel).
# * per key channel (``B_t`` a vector), ``e^{−B_t}`` cannot move onto ``v_t``: the recurrence is
#   ``S̃_t = S̃_{t−1} + β_t (e^{−B_t} ⊙ k_t)ᵀ (v_t − (e^{B_t} ⊙ k_t) S̃_{t−1})``, so with ``dk^r`` the
#   gradient through the keys that read the state (the rows of ``A``, ``Y``) and ``dk^w`` through
#   those that write it (the columns of ``A`` and ``P``, the state update),
#   ``∂L/∂B_tκ = q_tκ dq_tκ + k_tκ (dk^r_tκ − dk^w_tκ) + [t = T−1] Σ_v (S_T ⊙ dS_T)_κv``. The
#   reverse sweep writes this ``dB [C, K]`` per chunk (per value block partial) and ``dg`` is its
#   reverse cumulative sum per channel, stopped at that channel's cuts.


def _kda_grad_sides(dP, M, qs, kf, c, s):
    """The intra-chunk gradients through the per-channel grams of :func:`_kda_grams`, given
    ``dP`` (cotangent of ``P``) and ``M`` (of ``G``, strictly lower), one key column ``j`` per
    step with the same masked exponentials ``E^{(j)}``: the query side
    ``dq_i = Σ_j dP_ij k_j ⊙ E_ij``, the read-key side ``dk_i = Σ_j M_ij k_j ⊙ E_ij`` and the
    write-key side ``dk_j = Σ_i (dP_ij q_i + M_ij k_i) ⊙ E_ij`` ``[C, K]`` each."""
    C, K = qs.shape
    krows = lax.broadcasted_iota(jnp.int32, (C, K), 0)

    def step(j, acc3):
        dq, dkr, dkw = acc3
        e = _column_decay(c, s, j)
        kj = _row(kf, j)
        dPj, Mj = _col(dP, j), _col(M, j)
        wj = jnp.sum((dPj * qs + Mj * kf) * e, axis=0, keepdims=True)
        return dq + dPj * kj * e, dkr + Mj * kj * e, jnp.where(krows == j, wj, dkw)

    zero = jnp.zeros((C, K), qs.dtype)
    return lax.fori_loop(jnp.int32(0), jnp.int32(C), step, (zero, zero, zero))


def _delta_chunk_bwd(q, k, v, beta, bcol, scol, bC, sC, S, do, dS, *, scale, acc):
    """One chunk of the reverse sweep: ``(dq, dk, dβ [C, 1]) partial over this value block,
    dv, dS_prev, dB)``; every operand in ``acc``. ``dB`` is ``None`` per head; per key
    channel it is this block's partial of ``∂L/∂B [C, K]`` (the per-channel identity of the
    section comment)."""
    C = q.shape[0]
    qs = q.astype(acc) * scale
    kf = k.astype(acc)
    vf = v.astype(acc)
    do = do.astype(acc)
    beta = beta.astype(acc)
    gamma, lam, Gam, P, KK, D = _chunk_terms(qs, kf, bcol, scol, bC, sC, acc)
    strict = _chunk.lower_mask(C, strict=True)
    A = jnp.where(strict, beta * KK, 0.0)
    Tinv = _chunk.unit_lower_inverse_by_products(A, lambda a, b: _dot(a, b, acc))
    X = beta * vf
    Y = beta * gamma * kf
    Wk = _dot(Tinv, Y, acc)
    U = _dot(Tinv, X, acc) - _dot(Wk, S, acc)
    dU = _dot(P, do, acc, ta=True) + _dot(kf * lam, dS, acc)
    dP = _dot(do, U, acc, tb=True)
    dq = gamma * _dot(do, S, acc, tb=True)
    dkw = lam * _dot(U, dS, acc, tb=True)  # write-key terms (S's update, P's key side, G's column side)
    dS_prev = Gam * dS + _dot(qs * gamma, do, acc, ta=True) - _dot(Wk, dU, acc, ta=True)
    dWk = -_dot(dU, S, acc, tb=True)
    dX = _dot(Tinv, dU, acc, ta=True)
    dY = _dot(Tinv, dWk, acc, ta=True)
    dv = beta * dX
    dT = _dot(dU, X, acc, tb=True) + _dot(dWk, Y, acc, tb=True)
    dA = jnp.where(strict, -_dot(_dot(Tinv, dT, acc, ta=True), Tinv, acc, tb=True), 0.0)
    M = beta * dA
    dkr = beta * gamma * dY  # read-key terms (U's read of S, G's row side)
    dbeta = (jnp.sum(dX * vf, axis=1, keepdims=True) + jnp.sum(dY * gamma * kf, axis=1, keepdims=True)
             + jnp.sum(dA * KK, axis=1, keepdims=True))
    if D is not None:
        dPD, MD = dP * D, M * D
        dq = dq + _dot(dPD, kf, acc)
        dk = dkw + dkr + _dot(dPD, qs, acc, ta=True) + _dot(MD, kf, acc) + _dot(MD, kf, acc, ta=True)
        return dq * scale, dk, dbeta, dv, dS_prev, None
    dqi, dkri, dkwi = _kda_grad_sides(dP, M, qs, kf, bcol, scol)
    dq, dkr, dkw = dq + dqi, dkr + dkri, dkw + dkwi
    dB = qs * dq + kf * (dkr - dkw)
    return dq * scale, dkr + dkw, dbeta, dv, dS_prev, dB


def _store(refs, idx, vals):
    """Write the reverse sweep's per-chunk gradients ``(dq, dk, dβ, dv[, dB])`` to their refs."""
    for r, x in zip(refs, vals):
        r[idx] = x.astype(r.dtype)


def _gpu_states_kernel(q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, s0_ref, st_ref, *, C, N, acc):
    def body(c, S):
        st_ref[c] = S.astype(st_ref.dtype)
        t0 = pl.multiple_of(c * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        _, S = _delta_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], beta_ref[sl, :], b_ref[sl, :],
                            sg_ref[sl, :], b_ref[end, :], sg_ref[end, :], S, scale=1.0, acc=acc, out=False)
        return S

    lax.fori_loop(0, N, body, s0_ref[...].astype(acc))


def _gpu_bwd_kernel(q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, st_ref, do_ref, dst_ref,
                    dq_ref, dk_ref, dbeta_ref, dv_ref, ds0_ref, *db_ref, C, N, scale, acc):
    def body(i, dS):
        c = N - 1 - i
        t0 = pl.multiple_of(c * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        dq, dk, dbeta, dv, dS, dB = _delta_chunk_bwd(
            q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], beta_ref[sl, :], b_ref[sl, :], sg_ref[sl, :],
            b_ref[end, :], sg_ref[end, :], st_ref[c].astype(acc), do_ref[sl, :], dS, scale=scale, acc=acc)
        _store((dq_ref, dk_ref, dbeta_ref, dv_ref, *db_ref), (sl, slice(None)), (dq, dk, dbeta, dv, dB))
        return dS

    ds0_ref[...] = lax.fori_loop(0, N, body, dst_ref[...].astype(acc)).astype(ds0_ref.dtype)


def _tpu_states_kernel(q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, s0_ref, st_ref, s_scr, *, acc):
    c = pl.program_id(3)

    @pl.when(c == 0)
    def _():
        s_scr[...] = s0_ref[...].astype(acc)

    C = q_ref.shape[0]
    st_ref[...] = s_scr[...].astype(st_ref.dtype)
    _, S = _delta_chunk(q_ref[...], k_ref[...], v_ref[...], beta_ref[...], b_ref[...], sg_ref[...],
                        b_ref[C - 1:C, :], sg_ref[C - 1:C, :], s_scr[...], scale=1.0, acc=acc, out=False)
    s_scr[...] = S


def _tpu_bwd_kernel(q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, st_ref, do_ref, dst_ref,
                    dq_ref, dk_ref, dbeta_ref, dv_ref, ds0_ref, *rest, N, scale, acc):
    *db_ref, ds_scr = rest
    c = pl.program_id(3)

    @pl.when(c == 0)
    def _():
        ds_scr[...] = dst_ref[...].astype(acc)

    C = q_ref.shape[0]
    dq, dk, dbeta, dv, dS, dB = _delta_chunk_bwd(
        q_ref[...], k_ref[...], v_ref[...], beta_ref[...], b_ref[...], sg_ref[...], b_ref[C - 1:C, :],
        sg_ref[C - 1:C, :], st_ref[...].astype(acc), do_ref[...], ds_scr[...], scale=scale, acc=acc)
    _store((dq_ref, dk_ref, dbeta_ref, dv_ref, *db_ref), ..., (dq, dk, dbeta, dv, dB))
    ds_scr[...] = dS

    @pl.when(c == N - 1)
    def _():
        ds0_ref[...] = dS.astype(ds0_ref.dtype)


def _bwd_call(backend, interp, q, k, v, beta, b, sg, S0, do, dST, *, scale, cfg):
    """States sweep + reverse sweep: ``(dq, dk, dβ, dv, dS0, dB)`` (heads-major, in ``acc``;
    ``dB [B, H, Tp, K]`` per key channel, else ``None``)."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    G = b.shape[-1]
    db_shape = lambda nvb: (jax.ShapeDtypeStruct((nvb, B, H, Tp, G), acc),) if G > 1 else ()  # noqa: E731
    C = cfg.C
    N = Tp // C
    acc = _acc(q.dtype)
    st_shape = jax.ShapeDtypeStruct((B, H, N, K, V), acc)
    if backend == "gpu":
        bv, nw, ns = cfg.block_sizes.gpu(K, V)
        nvb = V // bv
        cp = None if interp else plgpu.CompilerParams(num_warps=nw, num_stages=ns)
        full = lambda d: pl.BlockSpec((None, None, Tp, d), lambda i, j, n: (i, j, 0, 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, Tp, bv), lambda i, j, n: (i, j, 0, n))
        sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n: (i, j, 0, n))
        stblk = pl.BlockSpec((None, None, N, K, bv), lambda i, j, n: (i, j, 0, 0, n))
        part = lambda d: pl.BlockSpec((None, None, None, Tp, d), lambda i, j, n: (n, i, j, 0, 0))  # noqa: E731
        st = pl.pallas_call(
            functools.partial(_gpu_states_kernel, C=C, N=N, acc=acc), out_shape=st_shape, grid=(B, H, nvb),
            in_specs=[full(K), full(K), vblk, full(1), full(G), full(G), sblk], out_specs=stblk,
            compiler_params=cp, interpret=bool(interp), name="tttla_delta_rule_states_triton",
        )(q, k, v, beta, b, sg, S0)
        return _sum_parts(pl.pallas_call(
            functools.partial(_gpu_bwd_kernel, C=C, N=N, scale=scale, acc=acc),
            out_shape=(jax.ShapeDtypeStruct((nvb, B, H, Tp, K), acc), jax.ShapeDtypeStruct((nvb, B, H, Tp, K), acc),
                       jax.ShapeDtypeStruct((nvb, B, H, Tp, 1), acc), jax.ShapeDtypeStruct((B, H, Tp, V), acc),
                       jax.ShapeDtypeStruct((B, H, K, V), acc)) + db_shape(nvb),
            grid=(B, H, nvb),
            in_specs=[full(K), full(K), vblk, full(1), full(G), full(G), stblk, vblk, sblk],
            out_specs=(part(K), part(K), part(1), vblk, sblk) + (part(G),) * (G > 1),
            compiler_params=cp, interpret=bool(interp), name="tttla_delta_rule_bwd_triton",
        )(q, k, v, beta, b, sg, st, do, dST))
    if jnp.dtype(q.dtype) == jnp.float16:
        q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
    bv = cfg.block_sizes.tpu(K, V)
    nvb = V // bv
    est = _tpu_estimate(K, V, C, bv, q.dtype, acc) + 12 * C * C * 4
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=int(cfg.block_sizes.vmem_limit_bytes or max(16 * 2**20, 2 * est)))

    def specs(rev):
        r = (lambda c: N - 1 - c) if rev else (lambda c: c)
        tok = lambda d: pl.BlockSpec((None, None, C, d), lambda i, j, n, c: (i, j, r(c), 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, C, bv), lambda i, j, n, c: (i, j, r(c), n))
        stblk = pl.BlockSpec((None, None, None, K, bv), lambda i, j, n, c: (i, j, r(c), 0, n))
        part = lambda d: pl.BlockSpec((None, None, None, C, d), lambda i, j, n, c: (n, i, j, r(c), 0))  # noqa: E731
        return tok, vblk, stblk, part

    sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n, c: (i, j, 0, n))
    tok, vblk, stblk, _ = specs(False)
    st = pl.pallas_call(
        functools.partial(_tpu_states_kernel, acc=acc), out_shape=st_shape, grid=(B, H, nvb, N),
        in_specs=[tok(K), tok(K), vblk, tok(1), tok(G), tok(G), sblk], out_specs=stblk,
        scratch_shapes=[pltpu.VMEM((K, bv), acc)], compiler_params=params,
        interpret=interp or False, name="tttla_delta_rule_states_mosaic",
    )(q, k, v, beta, b, sg, S0)
    tok, vblk, stblk, part = specs(True)
    return _sum_parts(pl.pallas_call(
        functools.partial(_tpu_bwd_kernel, N=N, scale=scale, acc=acc),
        out_shape=(jax.ShapeDtypeStruct((nvb, B, H, Tp, K), acc), jax.ShapeDtypeStruct((nvb, B, H, Tp, K), acc),
                   jax.ShapeDtypeStruct((nvb, B, H, Tp, 1), acc), jax.ShapeDtypeStruct((B, H, Tp, V), acc),
                   jax.ShapeDtypeStruct((B, H, K, V), acc)) + db_shape(nvb),
        grid=(B, H, nvb, N),
        in_specs=[tok(K), tok(K), vblk, tok(1), tok(G), tok(G), stblk, vblk, sblk],
        out_specs=(part(K), part(K), part(1), vblk, sblk) + (part(G),) * (G > 1),
        scratch_shapes=[pltpu.VMEM((K, bv), acc)], compiler_params=params,
        interpret=interp or False, name="tttla_delta_rule_bwd_mosaic",
    )(q, k, v, beta, b, sg, st, do, dST))


def _sum_parts(outs):
    """The reverse sweep's outputs with the per-value-block partials ``dq, dk, dβ[, dB]`` summed:
    ``(dq, dk, dβ, dv, dS0, dB or None)``."""
    dq, dk, dbeta, dv, dS0, *dB = outs
    return dq.sum(0), dk.sum(0), dbeta.sum(0), dv, dS0, (dB[0].sum(0) if dB else None)


def _dB_columns(qh, dq, vh, dv, dB, S_F, dS_F, acc):
    """``∂L/∂B`` ``[B, H, Tp, G]`` (``G`` = 1 per head: the identity ``q·dq − v·dv``; ``G = K``
    per key channel: the kernel's ``dB``) and the final-state term ``⟨S, dS⟩`` per column
    ``[B, H, G]`` (summed over the state per head, over its value dim per key channel)."""
    if dB is None:
        dB = jnp.sum(qh.astype(acc) * dq, axis=-1) - jnp.sum(vh.astype(acc) * dv, axis=-1)
        return dB[..., None], jnp.sum(S_F * dS_F, axis=(-2, -1))[..., None]
    return dB, jnp.sum(S_F * dS_F, axis=-1)


def _cut_columns(g, acc):
    """The cuts of a log-decay ``[B, T, H(, K)]`` as ``[B, H, T, G]``."""
    cut = g <= -_chunk.cut_threshold(acc)
    return jnp.swapaxes(cut if cut.ndim == 4 else cut[..., None], 1, 2)


def _dr_bwd(scale, cfg, res, cts):
    """The backward kernels (states + reverse sweep) and the log-decay identity above."""
    q, k, v, beta, g, S0, S_T = res
    do, dST = cts
    T = q.shape[1]
    Tp = _chunk.num_chunks(T, cfg.C) * cfg.C
    acc = _acc(q.dtype)
    ga = g.astype(acc)
    b, sg = _cum_decay(ga, cfg.C, Tp)
    qh, kh, vh, doh = (_chunk.heads_major(x, Tp) for x in (q, k, v, do.astype(q.dtype)))
    bh = _chunk.heads_major(beta.astype(acc)[..., None], Tp)
    dST = dST.astype(acc)
    dq, dk, dbeta, dv, dS0, dB = _dispatch(cfg, qh, kh, vh, bh, b, sg, S0.astype(acc), doh, dST, scale=scale,
                                           call=_bwd_call)
    # log-decay: dB_t (+ [t = T−1]<S_T, dS_T>), reverse cumsum stopped at cuts (per column)
    dB, st = _dB_columns(qh, dq, vh, dv, dB, S_T, dST, acc)
    dB = dB[:, :, :T].at[:, :, -1].add(st)
    dg = _chunk.segmented_reverse_cumsum(dB, _cut_columns(ga, acc), axis=2)
    back = lambda x, dt: _chunk.from_heads_major(x, T).astype(dt)  # noqa: E731
    return (back(dq, q.dtype), back(dk, k.dtype), back(dv, v.dtype), back(dbeta, beta.dtype)[..., 0],
            jnp.swapaxes(dg, 1, 2).reshape(g.shape).astype(g.dtype), dS0.astype(S0.dtype))


def _dr_bwd_xla(scale, cfg, res, cts):
    """The VJP of the same math in XLA, the chunked form of the delta rule
    (:func:`tttla_jax.ops.chunk.delta_chunked`) in the accumulation dtype (the reference the
    backward kernels are tested against)."""
    q, k, v, beta, g, S0, _ = res
    acc = _acc(q.dtype)

    def f(q, k, v, beta, g, S0):
        o, S = _chunk.delta_chunked(q.astype(acc) * scale, k.astype(acc), v.astype(acc), beta.astype(acc),
                                    g.astype(acc), S0.astype(acc), cfg.C)
        return o.astype(q.dtype), S

    _, vjp = jax.vjp(f, q, k, v, beta, g, S0)
    do, dS = cts
    return vjp((do.astype(q.dtype), dS.astype(acc)))


_dr.defvjp(_dr_fwd, _dr_bwd)


# --------------------------------------------------------------------------- packed sequences (cu_seqlens)
# As the linear-attention kernel: the re-chunked layout, per-chunk sequence / flag tables read
# in the Triton chunk loop or scalar-prefetched by Mosaic (h0 / final-state blocks by cs[c]).


def _gpu_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, h0_ref, o_ref, sf_ref, *,
                       C, N, scale, acc):
    def body(c, S):
        n = cs_ref[c]
        f = cf_ref[c]
        S = jnp.where((f & FIRST) != 0, h0_ref[n].astype(acc), S)
        t0 = pl.multiple_of(c * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        o, S = _delta_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], beta_ref[sl, :], b_ref[sl, :],
                            sg_ref[sl, :], b_ref[end, :], sg_ref[end, :], S, scale=scale, acc=acc)
        o_ref[sl, :] = o.astype(o_ref.dtype)

        @pl.when((f & END) != 0)
        def _():
            sf_ref[n] = S.astype(sf_ref.dtype)

        return S

    lax.fori_loop(0, N, body, jnp.zeros(h0_ref.shape[1:], acc))


def _tpu_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, h0_ref, o_ref, sf_ref, s_scr, *,
                       scale, acc):
    del cs_ref
    c = pl.program_id(3)

    @pl.when((cf_ref[c] & FIRST) != 0)
    def _():
        s_scr[...] = h0_ref[...].astype(acc)

    C = q_ref.shape[0]
    o, S = _delta_chunk(q_ref[...], k_ref[...], v_ref[...], beta_ref[...], b_ref[...], sg_ref[...],
                        b_ref[C - 1:C, :], sg_ref[C - 1:C, :], s_scr[...], scale=scale, acc=acc)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = S
    sf_ref[...] = S.astype(sf_ref.dtype)


def _call_packed(backend, interp, cs, cf, q, k, v, beta, b, sg, h0, *, scale, cfg):
    _, H, Tp, K = q.shape
    V = v.shape[-1]
    G = b.shape[-1]
    Ns = h0.shape[0]
    C = cfg.C
    Nc = Tp // C
    acc = _acc(q.dtype)
    out_dtype = q.dtype
    if backend == "gpu":
        bv, nw, ns = cfg.block_sizes.gpu(K, V)
        ints = pl.BlockSpec((Nc,), lambda i, j, n: (0,))
        full = lambda d: pl.BlockSpec((None, None, Tp, d), lambda i, j, n: (i, j, 0, 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, Tp, bv), lambda i, j, n: (i, j, 0, n))
        sblk = pl.BlockSpec((Ns, None, K, bv), lambda i, j, n: (0, j, 0, n))
        return pl.pallas_call(
            functools.partial(_gpu_packed_kernel, C=C, N=Nc, scale=scale, acc=acc),
            out_shape=(jax.ShapeDtypeStruct((1, H, Tp, V), out_dtype), jax.ShapeDtypeStruct((Ns, H, K, V), acc)),
            grid=(1, H, V // bv),
            in_specs=[ints, ints, full(K), full(K), vblk, full(1), full(G), full(G), sblk],
            out_specs=(vblk, sblk),
            compiler_params=None if interp else plgpu.CompilerParams(num_warps=nw, num_stages=ns),
            cost_estimate=_cost(H, Nc, K, V, C, V // bv, jnp.dtype(q.dtype).itemsize, G),
            interpret=bool(interp),
            name="tttla_delta_rule_packed_fwd_triton",
        )(cs, cf, q, k, v, beta, b, sg, h0)
    if jnp.dtype(q.dtype) == jnp.float16:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    o_dt = jnp.float32 if jnp.dtype(out_dtype) == jnp.float16 else out_dtype
    bv = cfg.block_sizes.tpu(K, V)
    est = _tpu_estimate(K, V, C, bv, q.dtype, acc)
    tok = lambda d: pl.BlockSpec((None, None, C, d), lambda i, j, n, c, cs, cf: (i, j, c, 0))  # noqa: E731
    vblk = pl.BlockSpec((None, None, C, bv), lambda i, j, n, c, cs, cf: (i, j, c, n))
    sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n, c, cs, cf: (cs[c], j, 0, n))
    o, S = pl.pallas_call(
        functools.partial(_tpu_packed_kernel, scale=scale, acc=acc),
        out_shape=(jax.ShapeDtypeStruct((1, H, Tp, V), o_dt), jax.ShapeDtypeStruct((Ns, H, K, V), acc)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(1, H, V // bv, Nc),
            in_specs=[tok(K), tok(K), vblk, tok(1), tok(G), tok(G), sblk],
            out_specs=(vblk, sblk),
            scratch_shapes=[pltpu.VMEM((K, bv), acc)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=int(cfg.block_sizes.vmem_limit_bytes or max(16 * 2**20, 2 * est))),
        cost_estimate=_cost(H, Nc, K, V, C, V // bv, jnp.dtype(q.dtype).itemsize, G),
        interpret=interp or False,
        name="tttla_delta_rule_packed_fwd_mosaic",
    )(cs, cf, q, k, v, beta, b, sg, h0)
    return o.astype(out_dtype), S


def _gpu_states_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, h0_ref, st_ref, *,
                              C, N, acc):
    def body(c, S):
        n = cs_ref[c]
        S = jnp.where((cf_ref[c] & FIRST) != 0, h0_ref[n].astype(acc), S)
        st_ref[c] = S.astype(st_ref.dtype)
        t0 = pl.multiple_of(c * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        _, S = _delta_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], beta_ref[sl, :], b_ref[sl, :],
                            sg_ref[sl, :], b_ref[end, :], sg_ref[end, :], S, scale=1.0, acc=acc, out=False)
        return S

    lax.fori_loop(0, N, body, jnp.zeros(h0_ref.shape[1:], acc))


def _gpu_bwd_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, st_ref, do_ref, dsf_ref,
                           dq_ref, dk_ref, dbeta_ref, dv_ref, dh0_ref, *db_ref, C, N, scale, acc):
    def body(i, dS):
        c = N - 1 - i
        n = cs_ref[c]
        f = cf_ref[c]
        dS = jnp.where((f & END) != 0, dsf_ref[n].astype(acc), dS)
        t0 = pl.multiple_of(c * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        dq, dk, dbeta, dv, dS, dB = _delta_chunk_bwd(
            q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], beta_ref[sl, :], b_ref[sl, :], sg_ref[sl, :],
            b_ref[end, :], sg_ref[end, :], st_ref[c].astype(acc), do_ref[sl, :], dS, scale=scale, acc=acc)
        _store((dq_ref, dk_ref, dbeta_ref, dv_ref, *db_ref), (sl, slice(None)), (dq, dk, dbeta, dv, dB))

        @pl.when((f & FIRST) != 0)
        def _():
            dh0_ref[n] = dS.astype(dh0_ref.dtype)

        return dS

    lax.fori_loop(0, N, body, jnp.zeros(dsf_ref.shape[1:], acc))


def _tpu_states_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, h0_ref, st_ref, s_scr, *,
                              acc):
    del cs_ref
    c = pl.program_id(3)

    @pl.when((cf_ref[c] & FIRST) != 0)
    def _():
        s_scr[...] = h0_ref[...].astype(acc)

    C = q_ref.shape[0]
    st_ref[...] = s_scr[...].astype(st_ref.dtype)
    _, S = _delta_chunk(q_ref[...], k_ref[...], v_ref[...], beta_ref[...], b_ref[...], sg_ref[...],
                        b_ref[C - 1:C, :], sg_ref[C - 1:C, :], s_scr[...], scale=1.0, acc=acc, out=False)
    s_scr[...] = S


def _tpu_bwd_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, beta_ref, b_ref, sg_ref, st_ref, do_ref, dsf_ref,
                           dq_ref, dk_ref, dbeta_ref, dv_ref, dh0_ref, *rest, N, scale, acc):
    del cs_ref
    *db_ref, ds_scr = rest
    i = pl.program_id(3)
    f = cf_ref[N - 1 - i]

    @pl.when(i == 0)
    def _():
        ds_scr[...] = jnp.zeros(ds_scr.shape, acc)

    @pl.when((f & END) != 0)
    def _():
        ds_scr[...] = dsf_ref[...].astype(acc)

    C = q_ref.shape[0]
    dq, dk, dbeta, dv, dS, dB = _delta_chunk_bwd(
        q_ref[...], k_ref[...], v_ref[...], beta_ref[...], b_ref[...], sg_ref[...], b_ref[C - 1:C, :],
        sg_ref[C - 1:C, :], st_ref[...].astype(acc), do_ref[...], ds_scr[...], scale=scale, acc=acc)
    _store((dq_ref, dk_ref, dbeta_ref, dv_ref, *db_ref), ..., (dq, dk, dbeta, dv, dB))
    ds_scr[...] = dS
    dh0_ref[...] = dS.astype(dh0_ref.dtype)  # last write in reverse order: the sequence's first chunk


def _bwd_packed_call(backend, interp, cs, cf, q, k, v, beta, b, sg, h0, do, dSF, *, scale, cfg):
    """Packed states + reverse sweep on the re-chunked layout: ``(dq, dk, dβ, dv, dh0, dB)``
    (``dh0`` of empty sequences not written; ``dB`` as :func:`_bwd_call`)."""
    _, H, Tp, K = q.shape
    V = v.shape[-1]
    G = b.shape[-1]
    Ns = h0.shape[0]
    C = cfg.C
    Nc = Tp // C
    acc = _acc(q.dtype)
    st_shape = jax.ShapeDtypeStruct((1, H, Nc, K, V), acc)
    grads_shape = lambda nvb: (  # noqa: E731
        jax.ShapeDtypeStruct((nvb, 1, H, Tp, K), acc), jax.ShapeDtypeStruct((nvb, 1, H, Tp, K), acc),
        jax.ShapeDtypeStruct((nvb, 1, H, Tp, 1), acc), jax.ShapeDtypeStruct((1, H, Tp, V), acc),
        jax.ShapeDtypeStruct((Ns, H, K, V), acc)) + (
        (jax.ShapeDtypeStruct((nvb, 1, H, Tp, G), acc),) if G > 1 else ())  # dB per key channel
    if backend == "gpu":
        bv, nw, ns = cfg.block_sizes.gpu(K, V)
        nvb = V // bv
        cp = None if interp else plgpu.CompilerParams(num_warps=nw, num_stages=ns)
        ints = pl.BlockSpec((Nc,), lambda i, j, n: (0,))
        full = lambda d: pl.BlockSpec((None, None, Tp, d), lambda i, j, n: (i, j, 0, 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, Tp, bv), lambda i, j, n: (i, j, 0, n))
        sblk = pl.BlockSpec((Ns, None, K, bv), lambda i, j, n: (0, j, 0, n))
        stblk = pl.BlockSpec((None, None, Nc, K, bv), lambda i, j, n: (i, j, 0, 0, n))
        part = lambda d: pl.BlockSpec((None, None, None, Tp, d), lambda i, j, n: (n, i, j, 0, 0))  # noqa: E731
        st = pl.pallas_call(
            functools.partial(_gpu_states_packed_kernel, C=C, N=Nc, acc=acc), out_shape=st_shape,
            grid=(1, H, nvb), in_specs=[ints, ints, full(K), full(K), vblk, full(1), full(G), full(G), sblk],
            out_specs=stblk, compiler_params=cp, interpret=bool(interp),
            name="tttla_delta_rule_packed_states_triton",
        )(cs, cf, q, k, v, beta, b, sg, h0)
        return _sum_parts(pl.pallas_call(
            functools.partial(_gpu_bwd_packed_kernel, C=C, N=Nc, scale=scale, acc=acc), out_shape=grads_shape(nvb),
            grid=(1, H, nvb),
            in_specs=[ints, ints, full(K), full(K), vblk, full(1), full(G), full(G), stblk, vblk, sblk],
            out_specs=(part(K), part(K), part(1), vblk, sblk) + (part(G),) * (G > 1), compiler_params=cp,
            interpret=bool(interp), name="tttla_delta_rule_packed_bwd_triton",
        )(cs, cf, q, k, v, beta, b, sg, st, do, dSF))
    if jnp.dtype(q.dtype) == jnp.float16:
        q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
    bv = cfg.block_sizes.tpu(K, V)
    nvb = V // bv
    est = _tpu_estimate(K, V, C, bv, q.dtype, acc) + 12 * C * C * 4
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=int(cfg.block_sizes.vmem_limit_bytes or max(16 * 2**20, 2 * est)))

    def specs(rev):
        r = (lambda c: Nc - 1 - c) if rev else (lambda c: c)
        tok = lambda d: pl.BlockSpec((None, None, C, d), lambda i, j, n, c, cs, cf: (i, j, r(c), 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, C, bv), lambda i, j, n, c, cs, cf: (i, j, r(c), n))
        sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n, c, cs, cf: (cs[r(c)], j, 0, n))
        stblk = pl.BlockSpec((None, None, None, K, bv), lambda i, j, n, c, cs, cf: (i, j, r(c), 0, n))
        part = lambda d: pl.BlockSpec((None, None, None, C, d),  # noqa: E731
                                      lambda i, j, n, c, cs, cf: (n, i, j, r(c), 0))
        return tok, vblk, sblk, stblk, part

    tok, vblk, sblk, stblk, _ = specs(False)
    st = pl.pallas_call(
        functools.partial(_tpu_states_packed_kernel, acc=acc), out_shape=st_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(1, H, nvb, Nc),
            in_specs=[tok(K), tok(K), vblk, tok(1), tok(G), tok(G), sblk], out_specs=stblk,
            scratch_shapes=[pltpu.VMEM((K, bv), acc)]),
        compiler_params=params, interpret=interp or False, name="tttla_delta_rule_packed_states_mosaic",
    )(cs, cf, q, k, v, beta, b, sg, h0)
    tok, vblk, sblk, stblk, part = specs(True)
    return _sum_parts(pl.pallas_call(
        functools.partial(_tpu_bwd_packed_kernel, N=Nc, scale=scale, acc=acc), out_shape=grads_shape(nvb),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(1, H, nvb, Nc),
            in_specs=[tok(K), tok(K), vblk, tok(1), tok(G), tok(G), stblk, vblk, sblk],
            out_specs=(part(K), part(K), part(1), vblk, sblk) + (part(G),) * (G > 1),
            scratch_shapes=[pltpu.VMEM((K, bv), acc)]),
        compiler_params=params, interpret=interp or False, name="tttla_delta_rule_packed_bwd_mosaic",
    )(cs, cf, q, k, v, beta, b, sg, st, do, dSF))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _dr_packed(q, k, v, beta, g, h0, cu_seqlens, scale, cfg):
    return _dr_packed_fwd(q, k, v, beta, g, h0, cu_seqlens, scale, cfg)[0]


def _dr_packed_fwd(q, k, v, beta, g, h0, cu_seqlens, scale, cfg):
    T = q.shape[1]
    acc = _acc(q.dtype)
    lay, cs, cf, last = _packed_tables(cu_seqlens, T, cfg.C)
    slots = lambda x: _to_slots(x, lay)  # noqa: E731
    Tp = lay.valid.size
    args = tuple(_chunk.heads_major(slots(x), Tp) for x in (q, k, v, beta.astype(acc)[..., None]))
    o, SF = _dispatch(cfg, cs, cf, *args, *_cum_decay(slots(g.astype(acc)), cfg.C, Tp), h0.astype(acc),
                      scale=scale, call=_call_packed)
    SF = jnp.where((last >= 0)[:, None, None, None], SF, h0.astype(acc))
    o = _from_slots(_chunk.from_heads_major(o, Tp), lay)
    return (o, SF), (q, k, v, beta, g, h0, cu_seqlens, SF)


def _dr_packed_bwd(scale, cfg, res, cts):
    """The backward kernels on the re-chunked layout (states sweep resetting to each
    sequence's ``h0``, reverse sweep resetting to its ``dS_final`` and writing its ``dh0``),
    and the log-decay identity per sequence: ``dB_t = q_t·dq_t − v_t·dv_t`` plus
    ``⟨S_n, dS_n⟩`` at each sequence's last token, a reverse cumulative sum stopped at
    sequence ends and cuts."""
    q, k, v, beta, g, h0, cu, SF = res
    do, dSF = cts
    T = q.shape[1]
    C = cfg.C
    acc = _acc(q.dtype)
    dSF = dSF.astype(acc)
    lay, cs, cf, last = _packed_tables(cu, T, C)
    Tp = lay.valid.size
    slots = lambda x: _to_slots(x, lay)  # noqa: E731
    qh, kh, vh, bh, doh = (_chunk.heads_major(slots(x), Tp)
                           for x in (q, k, v, beta.astype(acc)[..., None], do.astype(q.dtype)))
    gs = slots(g.astype(acc))
    b, sg = _cum_decay(gs, C, Tp)
    dq, dk, dbeta, dv, dh0, dB = _dispatch(cfg, cs, cf, qh, kh, vh, bh, b, sg, h0.astype(acc), doh, dSF,
                                           scale=scale, call=_bwd_packed_call)
    nonempty = last >= 0
    dh0 = jnp.where(nonempty[:, None, None, None], dh0, dSF)
    dB, st = _dB_columns(qh, dq, vh, dv, dB, SF, dSF, acc)  # [1, H, Tp, G], [Ns, H, G]
    st = jnp.where(nonempty[:, None, None], st, 0.0)
    dB = dB.at[:, :, jnp.maximum(last, 0) * C + C - 1].add(jnp.moveaxis(st, 0, 1)[None])
    cut = _cut_columns(gs, acc)  # [1, H, Tp, G]
    seq_end = (((cf & END) != 0)[:, None] & (jnp.arange(C) == C - 1)[None]).reshape(Tp, 1)
    stop = seq_end | jnp.concatenate([cut[:, :, 1:], jnp.zeros_like(cut[:, :, :1])], 2)
    dg = jnp.where(cut, 0.0, jnp.swapaxes(_reverse_cumsum_stops(jnp.swapaxes(dB, 2, 3), jnp.swapaxes(stop, 2, 3)),
                                          2, 3))
    back = lambda x, dt: _from_slots(_chunk.from_heads_major(x, Tp), lay).astype(dt)  # noqa: E731
    return (back(dq, q.dtype), back(dk, k.dtype), back(dv, v.dtype), back(dbeta, beta.dtype)[..., 0],
            _from_slots(jnp.swapaxes(dg, 1, 2), lay).reshape(g.shape).astype(g.dtype), dh0.astype(h0.dtype), None)


def _dr_packed_bwd_xla(scale, cfg, res, cts):
    """The VJP of the same math in XLA: the chunked packed form of ``tt.delta_rule`` (the
    reference the packed backward kernels are tested against)."""
    from tttla_jax.ops.delta_rule import delta_rule as _op  # deferred: ops import the kernels lazily

    q, k, v, beta, g, h0, cu, _ = res

    def f(q, k, v, beta, g, h0):
        return _op(q, k, v, beta, scale=scale, log_decay=g, initial_state=h0, output_final_state=True,
                   chunk_size=cfg.C, cu_seqlens=cu, impl="chunked")

    _, vjp = jax.vjp(f, q, k, v, beta, g, h0)
    do, dS = cts
    return vjp((do.astype(q.dtype), dS.astype(_acc(q.dtype)))) + (None,)


_dr_packed.defvjp(_dr_packed_fwd, _dr_packed_bwd)


def delta_rule(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    beta: Float[Array, "b t h"],
    *,
    scale: Optional[float] = None,
    log_decay: Optional[Float[Array, "b t h *k"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens=None,
    block_sizes: Optional[BlockSizes] = None,
    interpret: Any = None,
):
    """(Gated) delta rule as Pallas kernels (forward and backward): ``u_t = β_t(v_t − k_t e^{g_t}S)``,
    ``S_t = e^{g_t}S + k_tᵀu_t``, ``o_t = (scale·q_t)S_t`` (docs/linear_attention.md, rows "delta rule").

    Same contract as :func:`tttla_jax.delta_rule` (``impl="pallas"``; the arguments are checked
    by the same :func:`tttla_jax._checks.check_qkv`). ``chunk_size`` is a tiling choice
    (unsupported values fall back to 64; shortened for short sequences); ``scale``,
    ``block_sizes`` and ``interpret`` as :func:`tttla_jax.kernels.linear_attention`; head dims
    ``16 ≤ K, V ≤ 256`` (zero-padded to the next tile, exact). ``cu_seqlens``: packed
    sequences in a batch of one, as :func:`tttla_jax.kernels.linear_attention` (every kernel
    resets per sequence). ``log_decay``: ``[B, T, H]`` one per head, or ``[B, T, H, K]`` one per
    key channel (Kimi Delta Attention, ``S ← diag(e^{g_t}) S`` before the delta step; the
    kernels then run :data:`PER_CHANNEL_CHUNK`-token chunks whatever ``chunk_size``).

    Returns:
      ``(o [B, T, H, V] in q's dtype, S_T [B, H, K, V] ([N, H, K, V] packed) float32/float64 or None)``.

    Raises:
      ValueError: at trace time for bad shapes, or a dtype / head dim the kernel does not
        support (:func:`delta_rule_unsupported_reason`).
    """
    B, T, H, K, V, Ns = _checks.check_qkv(q, k, v, gates={"beta": beta, "log_decay": log_decay},
                                          initial_state=initial_state, cu_seqlens=cu_seqlens, same_dtype=True,
                                          channel_gates=("log_decay",))
    channel = log_decay is not None and jnp.ndim(log_decay) == 4
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    scale = _checks.check_scale(scale)
    _check_interpret(interpret)
    _check_block_sizes(block_sizes)
    reason = delta_rule_unsupported_reason(q.dtype, K, V, chunk_size, interpret=_interpret_mode(interpret))
    if reason is not None:
        raise ValueError(f"delta_rule(impl='pallas'): {reason}")
    if channel:
        C = PER_CHANNEL_CHUNK  # the chunk boundary is every factorised exponential's reference point
    else:
        C = chunk_size if chunk_size in CHUNK_SIZES else 64
        C = min(C, max(CHUNK_SIZES[0], pl.next_power_of_2(T)))
    cfg = _Cfg(C=C, block_sizes=block_sizes or default_block_sizes(K, V, interpret), interpret=interpret)
    Kp, Vp = padded_dim(K), padded_dim(V)
    cfg.block_sizes.gpu(Kp, Vp)
    cfg.block_sizes.tpu(Kp, Vp)
    acc = _acc(q.dtype)
    g = jnp.zeros((B, T, H), acc) if log_decay is None else log_decay
    S0 = jnp.zeros((Ns, H, K, V), acc) if initial_state is None else initial_state
    q, scale = _static_scale(q, K, scale)
    q, k, v, S0 = pad_head_dims(q, k, v, S0, Kp, Vp)
    if channel and Kp != K:  # padded key channels: log-decay 0 (their q, k and state rows are 0)
        g = jnp.pad(g, [(0, 0)] * 3 + [(0, Kp - K)])
    if cu_seqlens is None:
        o, S = _dr(q, k, v, beta, g, S0, scale, cfg)
    else:
        o, S = _dr_packed(q, k, v, beta, g, S0, jnp.asarray(cu_seqlens, jnp.int32), scale, cfg)
    return o[..., :V], (S[..., :K, :V] if output_final_state else None)
