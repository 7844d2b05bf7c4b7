"""Pallas kernels for chunked causal / block-causal linear attention (docs/linear_attention.md).

The recurrence (update-then-query, token t sees its own write)::

    S_t = exp(g_t) · S_{t-1} + k_tᵀ v_t,      o_t = (scale · q_t) S_t     (masking="causal")

and ``masking="chunk"`` (block causal: every query of chunk c reads the state after the
chunks < c). Per chunk of ``C`` tokens, with ``b`` the in-chunk inclusive cumulative
log-decay, ``γ_i = exp(b_i)``, ``λ_j = exp(b_C − b_j)``, ``Γ = exp(b_C)`` and the decay
mask ``D_ij = exp(b_i − b_j)·[j ≤ i]`` (Yang et al., 2024, "Gated Linear Attention" §3)::

    causal:  O = (Q Kᵀ ⊙ D) V + (γ ⊙ Q) S          chunk:  O = Q S
    both:    S ← Γ S + (λ ⊙ K)ᵀ V

Log-decays in ``[−inf, 0]``: ``b`` is passed cut-aware with a segment column
(:func:`tttla_jax.ops.chunk.segment_cumsum`): a token whose decay underflows to 0 is a hard
reset, every factor across it is 0 by a mask, never ``exp(−inf − (−inf))``.

Two backends behind one wrapper, chosen by the platform being *lowered for*
(:func:`jax.lax.platform_dependent`, so ``jax.export(..., platforms=["tpu"])`` from a CPU
host produces the Mosaic kernel):

* GPU (``cuda``/``rocm``): Pallas' Triton lowering, one program per (batch, head, value
  block) with an in-kernel ``fori_loop`` over chunks carrying the ``[K, BV]`` state in
  registers.
* TPU: Mosaic, grid ``(batch, head, value block, chunk)`` with the chunk axis
  ``"arbitrary"`` (sequential) and the state in a VMEM scratch buffer.
* any other platform (CPU): the GPU-style kernel in Pallas interpret mode (slow; for
  tests), so the same call works everywhere.

Backward (``jax.custom_vjp``). No per-chunk state is stored or re-materialised in HBM;
the backward is three sweeps of the same two kernels:

* ``dQ`` is the forward kernel run on ``(dO, V, K)`` with initial state ``S_0ᵀ``
  (``dq_i = Σ_{j≤i} D_ij (do_i·v_j) k_j + γ_i do_i S_{c-1}ᵀ``: the transposed process);
* ``dK, dV, dS_0`` come from one reverse sweep over chunks carrying ``dS``::

      dV = (Q Kᵀ ⊙ D)ᵀ dO + (λ ⊙ K) dS,   dK = (dO Vᵀ ⊙ D)ᵀ Q + λ ⊙ (V dSᵀ),
      dS ← Γ dS + (γ ⊙ Q)ᵀ dO             (chunk masking: no intra terms, γ ≡ 1)

* the log-decay gradient needs no kernel: with ``B_t`` the global cumulative log-decay,
  every term depends on ``B`` through ``exp(B_query − B_key)`` factors, so
  ``∂L/∂B_t = q_t·dq_t − k_t·dk_t + [t = T−1]⟨S_T, dS_T⟩`` (chunk masking: the query term of
  chunk c lands on the last token of chunk c−1), and ``dg`` is its reverse cumulative sum,
  stopped at cuts (nothing past a reset depends on an earlier log-decay) and 0 on a cut
  (:func:`tttla_jax.ops.chunk.segmented_reverse_cumsum`).

Accumulation is float32 (float64 for float64 inputs, interpret mode only); matmul
operands are in the input dtype (bfloat16 / float16 / float32).
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
from tttla_jax import impl as _impl
from tttla_jax.ops import chunk as _chunk
from tttla_jax.ops import varlen as _varlen

MASKINGS = ("causal", "chunk")
# The head-dim tiles the kernels are written for; any K, V in [MIN_HEAD_DIM, MAX_HEAD_DIM] is
# zero-padded to the next tile inside the wrapper (exact: see :func:`padded_dim`).
HEAD_DIMS = (16, 32, 64, 128, 256)
MIN_HEAD_DIM, MAX_HEAD_DIM = HEAD_DIMS[0], HEAD_DIMS[-1]
CHUNK_SIZES = (16, 32, 64, 128, 256)
COMPILED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Causal masking: the chunk is only a tiling choice; an unsupported chunk_size falls back to this.
DEFAULT_CAUSAL_CHUNK = 64
# TPU: refuse a call whose estimated VMEM footprint exceeds this (v7x has 64 MiB per core).
TPU_VMEM_CAP = 48 * 1024 * 1024


# --------------------------------------------------------------------------- block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling and compiler knobs, per platform. ``None`` means the platform default.

    Attributes:
      block_v_gpu: value-dim tile per Triton program (state ``[K, block_v]`` lives in
        registers). Default 64 for ``K ≤ 128``, 32 for ``K = 256`` (capped at ``V``).
      block_v_tpu: value-dim tile per Mosaic program; a multiple of 128 or ``V``. Default ``V``.
      num_warps: Triton warps per program (default 4; 8 when ``K·block_v ≥ 128·64``).
      num_stages: Triton pipelining stages (default 1: the chunk loop is a carried recurrence).
      vmem_limit_bytes: Mosaic scoped-VMEM limit (default: 2× the estimate, ≥ 16 MiB).
    """

    block_v_gpu: Optional[int] = None
    block_v_tpu: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    vmem_limit_bytes: Optional[int] = None

    def __post_init__(self):
        for name in ("block_v_gpu", "block_v_tpu", "num_warps", "num_stages", "vmem_limit_bytes"):
            val = getattr(self, name)
            if val is not None:  # NumPy / JAX integers are stored as Python ints (hashable, static)
                object.__setattr__(self, name, _checks.check_positive_int(f"BlockSizes.{name}", val))
        for name in ("block_v_gpu", "num_warps"):
            val = getattr(self, name)
            if val is not None and val & (val - 1):
                raise ValueError(f"BlockSizes.{name}: expected a power of two, got {val}")
        if self.block_v_gpu is not None and self.block_v_gpu < 16:
            raise ValueError(f"BlockSizes.block_v_gpu: expected >= 16 (tl.dot minimum), got {self.block_v_gpu}")

    def gpu(self, K: int, V: int) -> tuple[int, int, int]:
        """Resolved ``(block_v, num_warps, num_stages)`` for the Triton kernel."""
        bv = self.block_v_gpu or (64 if K <= 128 else 32)
        bv = min(bv, V)
        if V % bv:
            raise ValueError(f"BlockSizes.block_v_gpu: {bv} does not divide V = {V}")
        nw = self.num_warps or (8 if K * bv >= 128 * 64 else 4)
        return bv, nw, self.num_stages or 1

    def tpu(self, K: int, V: int) -> int:
        """Resolved value-dim tile for the Mosaic kernel."""
        bv = self.block_v_tpu or V
        if bv != V and (bv % 128 or V % bv):
            raise ValueError(
                f"BlockSizes.block_v_tpu: expected V = {V} or a multiple of 128 dividing V, got {bv}")
        return bv


# --------------------------------------------------------------------------- per-chip tables
#
# No GPU or TPU is available to this project, so these are not timings: each entry is derived
# from the chip's limits (below) and checked by the tests — every TPU entry is compiled by
# libtpu for that chip's topology (VMEM fit, Mosaic legality), every GPU entry is lowered
# through Triton by jax.export. Keyed by the padded key head dim (:func:`padded_dim`).
#
# * H100 / H200 (both GH100: 65,536 registers and 228 KiB shared memory per SM; H200 differs
#   only in HBM size and bandwidth, so the entries are the same): the Triton program keeps the
#   ``[K, block_v]`` float32 state in registers, ``K·block_v / (32·num_warps)`` registers per
#   thread; the entries hold that at 32 and take the widest value block that does (the
#   ``C×C`` intra-chunk products are recomputed once per value block, so wider is cheaper).
# * TPU v5e / v5p (128×128 MXUs) take 128-wide value blocks — for V = 256 two programs,
#   which v5p's two TensorCores (megacore) run in parallel; TPU v6e (256×256 MXU) the whole
#   V. Scoped VMEM limit 32 MiB on all three (the defaults are 16 MiB on v5e/v5p, 32 MiB on
#   v6e; the largest entry's estimate, :func:`tpu_vmem_estimate`, is far below it).

_GPU_GH100 = {16: (256, 4), 32: (256, 8), 64: (128, 8), 128: (64, 8), 256: (32, 8)}  # K: (block_v, warps)
_TPU_VMEM = 32 * 2**20
CHIP_TABLES = {
    "h100": {K: dict(block_v_gpu=bv, num_warps=nw, num_stages=1) for K, (bv, nw) in _GPU_GH100.items()},
    "h200": {K: dict(block_v_gpu=bv, num_warps=nw, num_stages=1) for K, (bv, nw) in _GPU_GH100.items()},
    "tpu_v5e": {K: dict(block_v_tpu=128, vmem_limit_bytes=_TPU_VMEM) for K in (16, 32, 64, 128, 256)},
    "tpu_v5p": {K: dict(block_v_tpu=128, vmem_limit_bytes=_TPU_VMEM) for K in (16, 32, 64, 128, 256)},
    "tpu_v6e": {K: dict(block_v_tpu=256, vmem_limit_bytes=_TPU_VMEM) for K in (16, 32, 64, 128, 256)},
}
# device_kind substrings (lower case) -> table; the first match wins ("tpu v5 lite" before "tpu v5")
_CHIP_KINDS = (("h100", "h100"), ("h200", "h200"), ("v5 lite", "tpu_v5e"), ("v5e", "tpu_v5e"),
               ("v5p", "tpu_v5p"), ("tpu v5", "tpu_v5p"), ("v6 lite", "tpu_v6e"), ("v6e", "tpu_v6e"))


def chip_name(device_kind: str) -> Optional[str]:
    """The :data:`CHIP_TABLES` key of a ``jax.Device.device_kind`` (``None`` if no table)."""
    kind = device_kind.lower()
    for sub, chip in _CHIP_KINDS:
        if sub in kind:
            return chip
    return None


def chip_block_sizes(chip: str, K: int, V: int) -> "BlockSizes":
    """The table entry of ``chip`` (a :data:`CHIP_TABLES` key) for head dims ``K``, ``V``
    (padded to the tiles; value blocks capped at the padded ``V``)."""
    if chip not in CHIP_TABLES:
        raise ValueError(f"chip: expected one of {tuple(CHIP_TABLES)}, got {chip!r}")
    Kp, Vp = padded_dim(K), padded_dim(V)
    kw = dict(CHIP_TABLES[chip][Kp])
    if "block_v_gpu" in kw:
        kw["block_v_gpu"] = min(kw["block_v_gpu"], Vp)
    if "block_v_tpu" in kw and kw["block_v_tpu"] >= Vp:
        kw["block_v_tpu"] = None  # the whole V
    return BlockSizes(**kw)


def default_block_sizes(K: int, V: int, interpret) -> "BlockSizes":
    """``block_sizes=None``: the table of the accelerator the call runs on (its first
    device's kind), else the platform defaults of :class:`BlockSizes`."""
    if interpret is None and _impl.on_accelerator():
        chip = chip_name(jax.devices()[0].device_kind)
        if chip is not None:
            return chip_block_sizes(chip, K, V)
    return BlockSizes()


# --------------------------------------------------------------------------- support checks


def _is_compiled_dtype(dt) -> bool:
    return any(jnp.dtype(dt) == jnp.dtype(d) for d in COMPILED_DTYPES)


def padded_dim(d: int) -> int:
    """The head-dim tile a dimension ``d`` runs in: the smallest of :data:`HEAD_DIMS` ``≥ d``.

    Zero padding is exact: padded key/query channels add ``0`` to every ``q·k`` and leave the
    padded state rows at 0 (their keys are 0), padded value channels give state columns and
    outputs that stay 0 and are sliced off; in the delta rule ``β k kᵀ`` and ``k S`` are
    unchanged by zero key channels. Gradients flow through the pad and the slice.
    """
    for t in HEAD_DIMS:
        if d <= t:
            return t
    raise ValueError(f"head dim {d}: expected at most {MAX_HEAD_DIM}")


def head_dim_reason(K: int, V: int) -> Optional[str]:
    """Why the kernels cannot take head dims ``K``, ``V`` (``None`` if they can)."""
    for name, d in (("K", K), ("V", V)):
        if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            return (f"head dim {name} = {d} is not supported (expected {MIN_HEAD_DIM} <= {name} <= {MAX_HEAD_DIM}; "
                    f"sizes between the tiles {HEAD_DIMS} are zero-padded to the next one; below "
                    f"{MIN_HEAD_DIM} the padded tile would be mostly zeros: use impl='chunked')")
    return None


def unsupported_reason(dtype, masking: str, K: int, V: int, chunk_size: Optional[int] = None,
                       interpret: bool = False, *, per_channel_decay: bool = False) -> Optional[str]:
    """Why the kernel cannot run a call (``None`` if it can); the ops' ``impl`` resolution
    (docs/implementations.md) reports it as the ``"pallas"`` candidate's reason.

    Args:
      dtype: the dtype of q, k and v.
      masking: ``"causal"`` | ``"chunk"`` (``"none"`` has no kernel).
      K, V: the key and value head dims (each in ``[16, 256]``; zero-padded to the next of
        :data:`HEAD_DIMS`, :func:`padded_dim`).
      chunk_size: the chunk length (semantic for ``masking="chunk"``: in :data:`CHUNK_SIZES`).
      interpret: whether the call runs in Pallas interpret mode (float64 only there).
      per_channel_decay: the call has a per-channel log-decay ``[B, T, H, K]`` (GLA style);
        the kernel takes it (as the delta-rule kernel, Kimi Delta Attention).
    """
    del per_channel_decay  # taken (PER_CHANNEL_CHUNK-token chunks for masking="causal")
    if masking not in MASKINGS:
        return f"masking={masking!r} is not supported by the Pallas kernel (supported: {MASKINGS}); use impl='chunked'"
    if not (_is_compiled_dtype(dtype) or (interpret and jnp.dtype(dtype) == jnp.float64)):
        return (f"dtype {jnp.dtype(dtype)} is not supported (bfloat16, float16, float32; "
                "float64 only in interpret mode)")
    hd = head_dim_reason(K, V)
    if hd is not None:
        return hd
    if masking == "chunk" and chunk_size is not None and chunk_size not in CHUNK_SIZES:
        return f"chunk_size = {chunk_size} is not supported in masking='chunk' (expected one of {CHUNK_SIZES})"
    return None


# --------------------------------------------------------------------------- chunk math (shared)


def _dot(a, b, acc, ta=False, tb=False):
    """``a @ b`` with optional transposes, accumulating in ``acc``."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    prec = lax.Precision.HIGHEST if a.dtype in (jnp.float32, jnp.float64) else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=acc)


def _decay_mask(bcol, scol, C):
    """``D_ij = exp(b_i − b_j)·[j ≤ i]`` from the cut-aware columns ``c`` (``bcol``) and
    ``s`` (``scol``) ``[C, 1]`` of :func:`tttla_jax.ops.chunk.segment_cumsum`: ``exp(c_i −
    c_j)`` where ``j ≤ i`` in the same segment, else 0 (:func:`tttla_jax.ops.chunk.masked_decay`;
    the rows are read off the diagonal, which lowers in Triton and Mosaic where a transpose
    of a column may not)."""
    rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    diag = rows == cols
    brow = jnp.sum(jnp.where(diag, bcol, 0.0), axis=0, keepdims=True)  # [1, C]
    srow = jnp.sum(jnp.where(diag, scol, 0.0), axis=0, keepdims=True)
    return _chunk.masked_decay(bcol, brow, _chunk.lower_mask(C) & (scol == srow))


def _decays(bcol, scol, bC, sC):
    """``γ = exp(b)``, ``λ = exp(b_C − b)`` (columns ``[C, 1]``) and ``Γ = exp(b_C)`` ``[1, 1]``
    of one chunk, cut-aware (:func:`tttla_jax.ops.chunk.segment_decays`)."""
    gamma = jnp.where(scol == 0, jnp.exp(bcol), 0.0)
    lam = jnp.where(scol == sC, jnp.exp(bC - bcol), 0.0)
    Gam = jnp.where(sC == 0, jnp.exp(bC), 0.0)
    return gamma, lam, Gam


def _fwd_chunk(q, k, v, bcol, scol, bC, sC, S, *, scale, causal, cdt, acc):
    """One chunk forward: returns ``(O [C, BV] in acc, S_next [K, BV])``. Decay columns
    ``[C, K]`` (one per key channel) take :func:`_fwd_chunk_channel`."""
    if bcol.shape[-1] != 1:
        return _fwd_chunk_channel(q, k, v, bcol, scol, bC, sC, S, scale=scale, causal=causal, cdt=cdt, acc=acc)
    C = q.shape[0]
    qs = q.astype(acc) * scale
    gamma, lam, Gam = _decays(bcol, scol, bC, sC)  # [C, 1], [C, 1], [1, 1]
    if causal:
        D = _decay_mask(bcol, scol, C)
        A = _dot(qs.astype(cdt), k, acc, tb=True) * D
        o = _dot(A.astype(cdt), v, acc) + _dot((qs * gamma).astype(cdt), S.astype(cdt), acc)
    else:
        o = _dot(qs.astype(cdt), S.astype(cdt), acc)
    S = Gam * S + _dot((k.astype(acc) * lam).astype(cdt), v, acc, ta=True)
    return o, S


def _dkv_chunk(q, k, v, do, bcol, scol, bC, sC, dS, *, scale, causal, cdt, acc):
    """One chunk of the reverse sweep: ``(dK partial over this V block, dV, dS_prev)``
    (per-channel decay columns: :func:`_dkv_chunk_channel`)."""
    if bcol.shape[-1] != 1:
        return _dkv_chunk_channel(q, k, v, do, bcol, scol, bC, sC, dS, scale=scale, causal=causal, cdt=cdt, acc=acc)
    C = q.shape[0]
    qs = (q.astype(acc) * scale).astype(cdt)
    gamma, lam, Gam = _decays(bcol, scol, bC, sC)
    dSc = dS.astype(cdt)
    dv = _dot((k.astype(acc) * lam).astype(cdt), dSc, acc)
    dk = _dot(v, dSc, acc, tb=True) * lam
    if causal:
        D = _decay_mask(bcol, scol, C)
        A = _dot(qs, k, acc, tb=True) * D
        dA = _dot(do, v, acc, tb=True) * D
        dv = dv + _dot(A.astype(cdt), do, acc, ta=True)
        dk = dk + _dot(dA.astype(cdt), qs, acc, ta=True)
        qg = (qs.astype(acc) * gamma).astype(cdt)
    else:
        qg = qs
    dS = Gam * dS + _dot(qg, do, acc, ta=True)
    return dk, dv, dS


# --------------------------------------------------------------------------- per-channel chunk math
#
# A per-channel log-decay (GLA, Yang et al., 2023, "Gated Linear Attention Transformers with
# Hardware-Efficient Training", §4) gives every key channel κ its own cumulative log-decay
# b_iκ, so the intra-chunk scores P_ij = [j ≤ i] Σ_κ q_iκ k_jκ exp(b_iκ − b_jκ) are no longer
# one mask on Q Kᵀ. The kernels never factorise exp(b_i − b_j) as exp(b_i)·exp(−b_j)
# (exp(−b) overflows along the chunk): the per-channel causal kernels run chunks of
# PER_CHANNEL_CHUNK tokens, so every factor across chunks goes through the state with the
# chunk boundary as its reference point (γ = exp(b_i), λ = exp(b_C − b_j), Γ = exp(b_C), all
# exponents ≤ 0), and inside a chunk P is built one key column at a time with the exact,
# masked-before-exp exponentials exp(b_iκ − b_jκ), i ≥ j in the same segment of channel κ
# (the diagonal sub-chunk blocks of tttla_jax.ops.chunk.decayed_gram). Cuts (log-decay ≤
# −cut_threshold, −inf included) are per channel: the segment columns mask them, no
# exp(−inf − (−inf)). Only 2-D tensors, iotas, masked sums and dots: lowers on Triton and Mosaic.

PER_CHANNEL_CHUNK = 16


def _row(x, j):
    """Row ``j`` (traced) of a ``[C, n]`` value as ``[1, n]``, by a masked sum (exact: the other
    rows add 0; no dynamic slice of a value, which Triton cannot lower)."""
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(rows == j, x, 0.0), axis=0, keepdims=True)


def _col(x, j):
    """Column ``j`` (traced) of a ``[C, n]`` value as ``[C, 1]``."""
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.sum(jnp.where(cols == j, x, 0.0), axis=1, keepdims=True)


def _row_to_col(r):
    """A ``[1, K]`` row as a ``[K, 1]`` column (read off the diagonal, as :func:`_decay_mask`)."""
    K = r.shape[1]
    eye = lax.broadcasted_iota(jnp.int32, (K, K), 0) == lax.broadcasted_iota(jnp.int32, (K, K), 1)
    return jnp.sum(jnp.where(eye, r, 0.0), axis=1, keepdims=True)


def _channel_decays(c, s, cC, sC):
    """Per channel, cut-aware: ``γ = exp(b)``, ``λ = exp(b_C − b)`` ``[C, K]`` and ``Γ`` as a
    ``[K, 1]`` column (it scales the state's rows) from the columns ``c, s [C, K]`` and their
    last rows ``cC, sC [1, K]`` (:func:`tttla_jax.ops.chunk.channel_decays`)."""
    gamma = jnp.where(s == 0, jnp.exp(c), 0.0)
    same = s == sC
    lam = jnp.where(same, jnp.exp(jnp.where(same, cC - c, 0.0)), 0.0)
    Gam = jnp.where(sC == 0, jnp.exp(cC), 0.0)
    return gamma, lam, _row_to_col(Gam)


def _column_decay(c, s, j):
    """``E_iκ = exp(b_iκ − b_jκ)`` for rows ``i ≥ j`` in the same segment of channel κ, else 0
    (``[C, K]``; masked before the exponential: every exponent evaluated is ≤ 0)."""
    rows = lax.broadcasted_iota(jnp.int32, c.shape, 0)
    m = (rows >= j) & (s == _row(s, j))
    return jnp.where(m, jnp.exp(jnp.where(m, c - _row(c, j), 0.0)), 0.0)


def _channel_scores(qs, ka, c, s, dP=None):
    """``P [C, C]`` (``P_ij = Σ_κ q_iκ k_jκ E^{(j)}_iκ``, one key column per step) and, given
    ``dP [C, C]``, also ``dK`` of the intra term ``dk_j = Σ_i dP_ij q_i ⊙ E^{(j)}_i`` ``[C, K]``."""
    C, K = qs.shape
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    krows = lax.broadcasted_iota(jnp.int32, (C, K), 0)

    def body(j, carry):
        P, dk = carry
        qE = qs * _column_decay(c, s, j)
        P = jnp.where(cols == j, jnp.sum(qE * _row(ka, j), axis=1, keepdims=True), P)
        if dP is not None:
            dk = jnp.where(krows == j, jnp.sum(_col(dP, j) * qE, axis=0, keepdims=True), dk)
        return P, dk

    return lax.fori_loop(jnp.int32(0), jnp.int32(C), body, (jnp.zeros((C, C), qs.dtype), jnp.zeros((C, K), qs.dtype)))


def _fwd_chunk_channel(q, k, v, c, s, cC, sC, S, *, scale, causal, cdt, acc):
    """:func:`_fwd_chunk` with a per-channel log-decay (``c, s [C, K]``):
    ``O = P V + (γ ⊙ Q) S`` (causal) or ``Q S`` (chunk), ``S ← Γ ⊙ S + (λ ⊙ K)ᵀ V``."""
    qs = q.astype(acc) * scale
    ka = k.astype(acc)
    gamma, lam, Gam = _channel_decays(c, s, cC, sC)
    if causal:
        P, _ = _channel_scores(qs, ka, c, s)
        o = _dot(P.astype(cdt), v, acc) + _dot((qs * gamma).astype(cdt), S.astype(cdt), acc)
    else:
        o = _dot(qs.astype(cdt), S.astype(cdt), acc)
    S = Gam * S + _dot((ka * lam).astype(cdt), v, acc, ta=True)
    return o, S


def _dq_chunk_channel(k, v, do, c, s, cC, sC, S, *, scale, causal, cdt, acc):
    """The dQ sweep of the per-channel kernel (forward order, carrying the forward state):
    ``dQ̃ = γ ⊙ (dO Sᵀ) + Σ_j dP_{:j} k_j ⊙ E^{(j)}`` w.r.t. the scaled queries, over this value
    block (``dP = dO Vᵀ``), and the next state. ``masking="chunk"``: ``dQ̃ = dO Sᵀ``."""
    del scale
    ka = k.astype(acc)
    gamma, lam, Gam = _channel_decays(c, s, cC, sC)
    dq = _dot(do, S.astype(cdt), acc, tb=True)
    if causal:
        dP = _dot(do, v, acc, tb=True)
        dq = dq * gamma

        def body(j, dq):
            return dq + _col(dP, j) * _row(ka, j) * _column_decay(c, s, j)

        dq = lax.fori_loop(jnp.int32(0), jnp.int32(ka.shape[0]), body, dq)  # int32 index under x64 too
    S = Gam * S + _dot((ka * lam).astype(cdt), v, acc, ta=True)
    return dq, S


def _dkv_chunk_channel(q, k, v, do, c, s, cC, sC, dS, *, scale, causal, cdt, acc):
    """:func:`_dkv_chunk` with a per-channel log-decay: ``dV = Pᵀ dO + (λ ⊙ K) dS``,
    ``dK = (intra, :func:`_channel_scores`) + λ ⊙ (V dSᵀ)``, ``dS ← Γ ⊙ dS + (γ ⊙ Q̃)ᵀ dO``."""
    qs = q.astype(acc) * scale
    ka = k.astype(acc)
    gamma, lam, Gam = _channel_decays(c, s, cC, sC)
    dSc = dS.astype(cdt)
    dv = _dot((ka * lam).astype(cdt), dSc, acc)
    dk = _dot(v, dSc, acc, tb=True) * lam
    if causal:
        P, dki = _channel_scores(qs, ka, c, s, _dot(do, v, acc, tb=True))
        dv = dv + _dot(P.astype(cdt), do, acc, ta=True)
        dk = dk + dki
        qg = qs * gamma
    else:
        qg = qs
    dS = Gam * dS + _dot(qg.astype(cdt), do, acc, ta=True)
    return dk, dv, dS


# --------------------------------------------------------------------------- GPU (Triton)


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, b_ref, sg_ref, s0_ref, o_ref, st_ref, *, C, N, scale, causal, cdt, acc,
                    chunk_fn=None):
    def body(c, S):
        t0 = pl.multiple_of(c * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        o, S = (chunk_fn or _fwd_chunk)(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], b_ref[sl, :], sg_ref[sl, :],
                          b_ref[end, :], sg_ref[end, :], S,
                          scale=scale, causal=causal, cdt=cdt, acc=acc)
        o_ref[sl, :] = o.astype(o_ref.dtype)
        return S

    st_ref[...] = lax.fori_loop(0, N, body, s0_ref[...].astype(acc)).astype(st_ref.dtype)


def _gpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, sg_ref, dst_ref, dk_ref, dv_ref, ds0_ref, *,
                    C, N, scale, causal, cdt, acc):
    def body(i, dS):
        t0 = pl.multiple_of((N - 1 - i) * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        dk, dv, dS = _dkv_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], do_ref[sl, :], b_ref[sl, :],
                                sg_ref[sl, :], b_ref[end, :], sg_ref[end, :], dS, scale=scale, causal=causal, cdt=cdt, acc=acc)
        dk_ref[sl, :] = dk.astype(dk_ref.dtype)
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        return dS

    ds0_ref[...] = lax.fori_loop(0, N, body, dst_ref[...].astype(acc)).astype(ds0_ref.dtype)


# --------------------------------------------------------------------------- TPU (Mosaic)


def _tpu_fwd_kernel(q_ref, k_ref, v_ref, b_ref, sg_ref, s0_ref, o_ref, st_ref, s_scr, *, N, scale, causal, cdt, acc,
                    chunk_fn=None):
    c = pl.program_id(3)

    @pl.when(c == 0)
    def _():
        s_scr[...] = s0_ref[...].astype(acc)

    C = q_ref.shape[0]
    o, S = (chunk_fn or _fwd_chunk)(q_ref[...], k_ref[...], v_ref[...], b_ref[...], sg_ref[...], b_ref[C - 1:C, :],
                      sg_ref[C - 1:C, :], s_scr[...],
                      scale=scale, causal=causal, cdt=cdt, acc=acc)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = S

    @pl.when(c == N - 1)
    def _():
        st_ref[...] = S.astype(st_ref.dtype)


def _tpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, sg_ref, dst_ref, dk_ref, dv_ref, ds0_ref, ds_scr, *,
                    N, scale, causal, cdt, acc):
    c = pl.program_id(3)

    @pl.when(c == 0)
    def _():
        ds_scr[...] = dst_ref[...].astype(acc)

    C = q_ref.shape[0]
    dk, dv, dS = _dkv_chunk(q_ref[...], k_ref[...], v_ref[...], do_ref[...], b_ref[...], sg_ref[...],
                            b_ref[C - 1:C, :], sg_ref[C - 1:C, :], ds_scr[...], scale=scale, causal=causal, cdt=cdt, acc=acc)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    ds_scr[...] = dS

    @pl.when(c == N - 1)
    def _():
        ds0_ref[...] = dS.astype(ds0_ref.dtype)


# --------------------------------------------------------------------------- cost model


def chunk_costs(K: int, V: int, C: int, causal: bool, n_vblocks: int = 1) -> dict:
    """FLOPs and transcendentals of one chunk of one (batch, head), forward and backward.

    Forward: ``Q Kᵀ`` (2C²K, once per value block), ``A V`` (2C²V), ``(γQ) S`` (2CKV),
    ``(λK)ᵀ V`` (2CKV). Backward: the dQ sweep is one forward; the dK/dV sweep is
    ``Q Kᵀ`` and ``dO Vᵀ`` (2C²K + 2C²V), ``Aᵀ dO`` (2C²V), ``dAᵀ Q`` (2C²K) and three
    C·K·V products (6CKV).
    """
    if causal:
        fwd = 2 * C * C * K * n_vblocks + 2 * C * C * V + 4 * C * K * V
        dkv = 2 * C * C * K * n_vblocks + 4 * C * C * V + 2 * C * C * K + 6 * C * K * V
        trans = (C * C + 3 * C) * n_vblocks
    else:
        fwd = 4 * C * K * V
        dkv = 6 * C * K * V
        trans = 2 * C * n_vblocks
    return {"fwd_flops": fwd, "bwd_flops": fwd + dkv, "transcendentals": trans}


def _cost(BH, N, K, V, C, causal, nvb, itemsize, bwd):
    cc = chunk_costs(K, V, C, causal, nvb)
    T = N * C
    if not bwd:
        flops = cc["fwd_flops"]
        nbytes = BH * (T * (2 * K * nvb + 2 * V) * itemsize + T * 4 + 2 * K * V * 4)
    else:
        flops = cc["bwd_flops"] - cc["fwd_flops"]
        nbytes = BH * (T * (2 * K * nvb + 2 * V) * itemsize + T * 4 + T * (K * nvb + V) * 4 + 2 * K * V * 4)
    return pl.CostEstimate(flops=int(BH * N * flops), transcendentals=int(BH * N * cc["transcendentals"]),
                           bytes_accessed=int(nbytes))


def tpu_vmem_estimate(K: int, V: int, C: int, bv: int, itemsize: int, acc_size: int = 4) -> int:
    """Bytes of VMEM the Mosaic kernels need (double-buffered blocks, scratch, C×C temporaries)."""
    lane = lambda n: -(-n // 128) * 128  # noqa: E731  (minor dims are padded to 128 lanes)
    blocks = C * lane(K) * 2 * itemsize + 2 * C * lane(bv) * itemsize + C * 128 * acc_size
    outs = C * lane(K) * acc_size + C * lane(bv) * acc_size
    state = 3 * K * lane(bv) * acc_size
    temps = 6 * C * lane(C) * acc_size
    return 2 * (blocks + outs) + state + temps


# --------------------------------------------------------------------------- pallas_call builders


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static configuration of one call (hashable: it is a nondiff argument of the custom_vjp)."""

    C: int
    causal: bool
    block_sizes: BlockSizes
    interpret: Any  # None | "gpu" | "tpu" | pltpu.InterpretParams


def _acc(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _fwd_call(backend, interp, q, k, v, b, sg, S0, *, scale, cfg, out_dtype, dq=False):
    """``(O [B, H, Tp, V] in out_dtype, S_T [B, H, K, V] in acc)`` with the chosen backend;
    ``b`` / ``sg`` the cut-aware cumulative log-decay and segment columns (:func:`_cum_decay`:
    ``[..., 1]`` per head, ``[..., K]`` per channel).

    ``dq=True`` (per-channel decay): the dQ sweep (:func:`_dq_chunk_channel`) on ``(k, v, dO)``
    in the places of ``(q, k, v)``: returns ``(dQ̃ [B, H, Tp, K] in acc, S_T)``, summed over
    value blocks."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    nb = b.shape[-1]
    C = cfg.C
    N = Tp // C
    cdt = q.dtype
    acc = _acc(cdt)
    out_shape = (jax.ShapeDtypeStruct((B, H, Tp, V), out_dtype), jax.ShapeDtypeStruct((B, H, K, V), acc))
    kw = dict(scale=scale, causal=cfg.causal, cdt=cdt, acc=acc, chunk_fn=_dq_chunk_channel if dq else None)
    if backend == "gpu":
        bv, nw, ns = cfg.block_sizes.gpu(K, V)
        nvb = V // bv
        full = lambda d: pl.BlockSpec((None, None, Tp, d), lambda i, j, n: (i, j, 0, 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, Tp, bv), lambda i, j, n: (i, j, 0, n))
        sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n: (i, j, 0, n))
        if dq:
            out_shape = (jax.ShapeDtypeStruct((nvb, B, H, Tp, K), acc), out_shape[1])
            oblk = pl.BlockSpec((None, None, None, Tp, K), lambda i, j, n: (n, i, j, 0, 0))
        else:
            oblk = vblk
        o, S = pl.pallas_call(
            functools.partial(_gpu_fwd_kernel, C=C, N=N, **kw),
            out_shape=out_shape,
            grid=(B, H, nvb),
            in_specs=[full(K), vblk if dq else full(K), vblk, full(nb), full(nb), sblk],
            out_specs=(oblk, sblk),
            compiler_params=None if interp else plgpu.CompilerParams(num_warps=nw, num_stages=ns),
            cost_estimate=_cost(B * H, N, K, V, C, cfg.causal, nvb, jnp.dtype(cdt).itemsize, False),
            interpret=bool(interp),
            name="tttla_linear_attention_dq_triton" if dq else "tttla_linear_attention_fwd_triton",
        )(q, k, v, b, sg, S0)
        return (jnp.sum(o, axis=0) if dq else o), S
    if jnp.dtype(cdt) == jnp.float16:  # Mosaic has no float16 vector loads on v5e: compute in float32
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        cdt = jnp.float32
        kw["cdt"] = cdt
    f16_out = jnp.dtype(out_dtype) == jnp.float16 and not dq
    if f16_out:
        out_shape = (jax.ShapeDtypeStruct((B, H, Tp, V), jnp.float32), out_shape[1])
    bv = cfg.block_sizes.tpu(K, V)
    nvb = V // bv
    tok = lambda d: pl.BlockSpec((None, None, C, d), lambda i, j, n, c: (i, j, c, 0))  # noqa: E731
    vblk = pl.BlockSpec((None, None, C, bv), lambda i, j, n, c: (i, j, c, n))
    sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n, c: (i, j, 0, n))
    if dq:
        out_shape = (jax.ShapeDtypeStruct((nvb, B, H, Tp, K), acc), out_shape[1])
        oblk = pl.BlockSpec((None, None, None, C, K), lambda i, j, n, c: (n, i, j, c, 0))
    else:
        oblk = vblk
    o, S = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, N=N, **kw),
        out_shape=out_shape,
        grid=(B, H, nvb, N),
        in_specs=[tok(K), vblk if dq else tok(K), vblk, tok(nb), tok(nb), sblk],
        out_specs=(oblk, sblk),
        scratch_shapes=[pltpu.VMEM((K, bv), acc)],
        compiler_params=_tpu_params(cfg, K, V, bv, cdt),
        cost_estimate=_cost(B * H, N, K, V, C, cfg.causal, nvb, jnp.dtype(cdt).itemsize, False),
        interpret=interp or False,
        name="tttla_linear_attention_dq_mosaic" if dq else "tttla_linear_attention_fwd_mosaic",
    )(q, k, v, b, sg, S0)
    if dq:
        return jnp.sum(o, axis=0), S
    return (o.astype(out_dtype) if f16_out else o), S


def _dkv_call(backend, interp, q, k, v, do, b, sg, dST, *, scale, cfg):
    """Reverse sweep: ``(dK, dV [acc], dS_0 [acc])``; dK is summed over value blocks."""
    B, H, Tp, K = q.shape
    V = v.shape[-1]
    C = cfg.C
    N = Tp // C
    cdt = q.dtype
    acc = _acc(cdt)
    kw = dict(scale=scale, causal=cfg.causal, cdt=cdt, acc=acc)
    if backend == "gpu":
        bv, nw, ns = cfg.block_sizes.gpu(K, V)
        nvb = V // bv
        full = lambda d: pl.BlockSpec((None, None, Tp, d), lambda i, j, n: (i, j, 0, 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, Tp, bv), lambda i, j, n: (i, j, 0, n))
        sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n: (i, j, 0, n))
        dkblk = pl.BlockSpec((None, None, None, Tp, K), lambda i, j, n: (n, i, j, 0, 0))
        dk, dv, dS0 = pl.pallas_call(
            functools.partial(_gpu_dkv_kernel, C=C, N=N, **kw),
            out_shape=(jax.ShapeDtypeStruct((nvb, B, H, Tp, K), acc), jax.ShapeDtypeStruct((B, H, Tp, V), acc),
                       jax.ShapeDtypeStruct((B, H, K, V), acc)),
            grid=(B, H, nvb),
            in_specs=[full(K), full(K), vblk, vblk, full(b.shape[-1]), full(b.shape[-1]), sblk],
            out_specs=(dkblk, vblk, sblk),
            compiler_params=None if interp else plgpu.CompilerParams(num_warps=nw, num_stages=ns),
            cost_estimate=_cost(B * H, N, K, V, C, cfg.causal, nvb, jnp.dtype(cdt).itemsize, True),
            interpret=bool(interp),
            name="tttla_linear_attention_dkv_triton",
        )(q, k, v, do, b, sg, dST)
        return jnp.sum(dk, axis=0), dv, dS0
    if jnp.dtype(cdt) == jnp.float16:  # as in _fwd_call: float32 on TPU
        q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
        cdt = jnp.float32
        kw["cdt"] = cdt
    bv = cfg.block_sizes.tpu(K, V)
    nvb = V // bv
    rev = lambda c: N - 1 - c  # noqa: E731
    tok = lambda d: pl.BlockSpec((None, None, C, d), lambda i, j, n, c: (i, j, rev(c), 0))  # noqa: E731
    vblk = pl.BlockSpec((None, None, C, bv), lambda i, j, n, c: (i, j, rev(c), n))
    sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n, c: (i, j, 0, n))
    dkblk = pl.BlockSpec((None, None, None, C, K), lambda i, j, n, c: (n, i, j, rev(c), 0))
    dk, dv, dS0 = pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, N=N, **kw),
        out_shape=(jax.ShapeDtypeStruct((nvb, B, H, Tp, K), acc), jax.ShapeDtypeStruct((B, H, Tp, V), acc),
                   jax.ShapeDtypeStruct((B, H, K, V), acc)),
        grid=(B, H, nvb, N),
        in_specs=[tok(K), tok(K), vblk, vblk, tok(b.shape[-1]), tok(b.shape[-1]), sblk],
        out_specs=(dkblk, vblk, sblk),
        scratch_shapes=[pltpu.VMEM((K, bv), acc)],
        compiler_params=_tpu_params(cfg, K, V, bv, cdt),
        cost_estimate=_cost(B * H, N, K, V, C, cfg.causal, nvb, jnp.dtype(cdt).itemsize, True),
        interpret=interp or False,
        name="tttla_linear_attention_dkv_mosaic",
    )(q, k, v, do, b, sg, dST)
    return jnp.sum(dk, axis=0), dv, dS0


def _tpu_params(cfg, K, V, bv, cdt):
    est = tpu_vmem_estimate(K, V, cfg.C, bv, jnp.dtype(cdt).itemsize, jnp.dtype(_acc(cdt)).itemsize)
    if est > TPU_VMEM_CAP:
        raise ValueError(
            f"TPU kernel: estimated VMEM {est / 2**20:.1f} MiB for K={K}, block_v={bv}, chunk={cfg.C} "
            f"exceeds {TPU_VMEM_CAP / 2**20:.0f} MiB; use a smaller chunk_size or BlockSizes.block_v_tpu")
    limit = cfg.block_sizes.vmem_limit_bytes or max(16 * 2**20, 2 * est)
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"), vmem_limit_bytes=int(limit))


def _dispatch(call, cfg, *args, **kw):
    """Run ``call(backend, interp, *args)`` on the backend of the platform being lowered for."""
    kw = dict(kw, cfg=cfg)
    it = cfg.interpret
    if it is not None:
        if isinstance(it, str) and it == "gpu" or it is True:
            return call("gpu", True, *args, **kw)
        if isinstance(it, str) and it == "tpu":
            it = pltpu.InterpretParams(uninitialized_memory="nan")
        return call("tpu", it, *args, **kw)
    return lax.platform_dependent(
        *args,
        cuda=lambda *a: call("gpu", False, *a, **kw),
        rocm=lambda *a: call("gpu", False, *a, **kw),
        tpu=lambda *a: call("tpu", False, *a, **kw),
        default=lambda *a: call("gpu", True, *a, **kw),
    )


# --------------------------------------------------------------------------- layout + custom_vjp


def _cum_decay(g, C, Tp):
    """In-chunk cut-aware inclusive cumulative log-decay and segment index
    (:func:`tttla_jax.ops.chunk.cumsum_in_chunks`), two columns ``[B, H, Tp, 1]`` (accumulation
    dtype): exact for log-decays in ``[−inf, 0]``. A per-channel ``g [B, T, H, K]`` gives
    ``[B, H, Tp, K]`` (each channel its own cumulative sum and cuts)."""
    if g.ndim == 4:
        B, T, H, K = g.shape
        c, s = _chunk.cumsum_in_chunks(g.reshape(B, T, H * K), C)
        return tuple(_chunk.heads_major(x.reshape(B, -1, H, K), Tp) for x in (c, s))
    c, s = _chunk.cumsum_in_chunks(g, C)
    return _chunk.heads_major(c, Tp)[..., None], _chunk.heads_major(s, Tp)[..., None]


def _channel_dB(qh, dqs, kh, dk, scale, causal, first, acc):
    """Per-channel ``∂L/∂B_tκ = q̃_tκ dq̃_tκ − k_tκ dk_tκ`` ``[B, H, Tp, K]`` (every term depends on
    the channel's cumulative log-decay through ``exp(B_query,κ − B_key,κ)``); ``masking="chunk"``:
    the query term of chunk c lands on the last token of chunk c − 1, none across a ``first``
    chunk (a sequence start, packed) or before chunk 0."""
    qdq = qh.astype(acc) * scale * dqs
    if not causal:
        B, H, Tp, K = qdq.shape
        C = Tp // first.shape[0]
        per_chunk = jnp.sum(qdq.reshape(B, H, -1, C, K), axis=3)  # [B, H, N, K]
        shifted = jnp.where(first[1:, None], 0.0, per_chunk[:, :, 1:])
        qdq = jnp.zeros((B, H, Tp // C, C, K), acc).at[:, :, :-1, C - 1].set(shifted).reshape(B, H, Tp, K)
    return qdq - kh.astype(acc) * dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _la(q, k, v, g, S0, scale, cfg):
    return _la_fwd(q, k, v, g, S0, scale, cfg)[0]


def _la_fwd(q, k, v, g, S0, scale, cfg):
    T = q.shape[1]
    Tp = -(-T // cfg.C) * cfg.C
    acc = _acc(q.dtype)
    b, sg = _cum_decay(g.astype(acc), cfg.C, Tp)
    o, S = _dispatch(_fwd_call, cfg, _chunk.heads_major(q, Tp), _chunk.heads_major(k, Tp), _chunk.heads_major(v, Tp), b,
                     sg, S0.astype(acc), scale=scale, out_dtype=q.dtype)
    o = _chunk.from_heads_major(o, T)
    return (o, S), (q, k, v, g, S0, S)


def _la_bwd(scale, cfg, res, cts):
    q, k, v, g, S0, S_T = res
    do, dST = cts
    B, T, H, K = q.shape
    C = cfg.C
    Tp = -(-T // C) * C
    N = Tp // C
    acc = _acc(q.dtype)
    ga = g.astype(acc)
    b, sg = _cum_decay(ga, C, Tp)
    qh, kh, vh, doh = (_chunk.heads_major(x, Tp) for x in (q, k, v, do.astype(q.dtype)))
    dST = dST.astype(acc)
    if ga.ndim == 4:
        return _la_channel_bwd(scale, cfg, q, k, v, g, S0, S_T, qh, kh, vh, doh, b, sg, dST)
    # dQ (w.r.t. the scaled query): the forward kernel on the transposed process (dO, V, K; S_0ᵀ).
    # Its value dim is K: BlockSizes.block_v_* tile V, so this pass uses the platform defaults.
    cfg_dq = dataclasses.replace(cfg, block_sizes=dataclasses.replace(
        cfg.block_sizes, block_v_gpu=None, block_v_tpu=None))
    dqs, _ = _dispatch(_fwd_call, cfg_dq, doh, vh, kh, b, sg, jnp.swapaxes(S0.astype(acc), -1, -2),
                       scale=1.0, out_dtype=acc)
    dk, dv, dS0 = _dispatch(_dkv_call, cfg, qh, kh, vh, doh, b, sg, dST, scale=scale)
    # log-decay: dL/dB_t = q_t·dq_t (query side) − k_t·dk_t (key side) + [t = T−1]<S_T, dS_T>.
    qdq = jnp.sum(qh.astype(acc) * scale * dqs, axis=-1)  # [B, H, Tp]
    kdk = jnp.sum(kh.astype(acc) * dk, axis=-1)
    if not cfg.causal:  # chunk c's queries read the state after token cC − 1
        per_chunk = jnp.sum(qdq.reshape(B, H, N, C), axis=-1)
        qdq = jnp.zeros((B, H, N, C), acc).at[:, :, :-1, C - 1].set(per_chunk[:, :, 1:]).reshape(B, H, Tp)
    dB = (qdq - kdk)[:, :, :T]
    # the state's own decay: ∂/∂B_{T−1} of S_T gets <S_T, dS_T>
    dB = dB.at[..., -1].add(jnp.sum(S_T * dST, axis=(-2, -1)))
    # dg_t = Σ_{s ≥ t} dB_s up to the next cut (a cut resets the state: nothing after it depends
    # on g_t), and 0 at a cut (tttla_jax.ops.chunk.segment_cumsum)
    cut = jnp.swapaxes(ga <= -_chunk.cut_threshold(acc), 1, 2)  # [B, H, T]
    dg = _chunk.segmented_reverse_cumsum(dB, cut)
    dq = _chunk.from_heads_major(dqs * scale, T)
    dk = _chunk.from_heads_major(dk, T)
    dv = _chunk.from_heads_major(dv, T)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            jnp.swapaxes(dg, 1, 2).astype(g.dtype), dS0.astype(S0.dtype))


def _la_channel_bwd(scale, cfg, q, k, v, g, S0, S_T, qh, kh, vh, doh, b, sg, dST):
    """:func:`_la_bwd` for a per-channel log-decay: the dQ sweep is its own kernel
    (:func:`_dq_chunk_channel`; the transposed process would carry the decay on its value dim),
    the reverse sweep is :func:`_dkv_chunk_channel`, and the log-decay gradient is the
    per-channel identity (:func:`_channel_dB`) with per-channel cuts."""
    B, T, H, K = q.shape
    Tp = qh.shape[2]
    acc = _acc(q.dtype)
    dqs, _ = _dispatch(_fwd_call, cfg, kh, vh, doh, b, sg, S0.astype(acc), scale=scale, out_dtype=acc, dq=True)
    dk, dv, dS0 = _dispatch(_dkv_call, cfg, qh, kh, vh, doh, b, sg, dST, scale=scale)
    first = jnp.arange(Tp // cfg.C) == 0
    dB = _channel_dB(qh, dqs, kh, dk, scale, cfg.causal, first, acc)[:, :, :T]
    dB = dB.at[:, :, -1].add(jnp.sum(S_T * dST, axis=-1))  # <S_T, dS_T> per key channel (row)
    cut = jnp.swapaxes(g.astype(acc) <= -_chunk.cut_threshold(acc), 1, 2)  # [B, H, T, K]
    dg = _chunk.segmented_reverse_cumsum(dB, cut, axis=2)
    dq = _chunk.from_heads_major(dqs * scale, T)
    return (dq.astype(q.dtype), _chunk.from_heads_major(dk, T).astype(k.dtype),
            _chunk.from_heads_major(dv, T).astype(v.dtype), jnp.swapaxes(dg, 1, 2).astype(g.dtype),
            dS0.astype(S0.dtype))


_la.defvjp(_la_fwd, _la_bwd)


# --------------------------------------------------------------------------- packed sequences (cu_seqlens)
#
# The wrapper re-chunks the packed tokens (:func:`tttla_jax.ops.varlen.layout`: every sequence
# starts a chunk, no chunk straddles two sequences, zero slots between them) and passes one
# int32 per chunk: its sequence ``cs`` and flags ``cf`` (FIRST: the state resets to the
# sequence's ``h0``; END: the state after it is the sequence's final state). The Triton
# kernel reads them as scalars inside its chunk loop; the Mosaic kernel gets them by scalar
# prefetch (SMEM), and its ``h0`` / final-state blocks are selected by ``cs[c]`` in the
# index maps (sequences are contiguous in chunk order, so each block is visited once, in
# one run of consecutive steps).

FIRST, END = 1, 2


def _gpu_fwd_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, b_ref, sg_ref, h0_ref, o_ref, sf_ref, *,
                           C, N, scale, causal, cdt, acc, chunk_fn=None):
    def body(c, S):
        n = cs_ref[c]
        f = cf_ref[c]
        S = jnp.where((f & FIRST) != 0, h0_ref[n].astype(acc), S)
        t0 = pl.multiple_of(c * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        o, S = (chunk_fn or _fwd_chunk)(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], b_ref[sl, :], sg_ref[sl, :],
                          b_ref[end, :], sg_ref[end, :], S, scale=scale, causal=causal, cdt=cdt, acc=acc)
        o_ref[sl, :] = o.astype(o_ref.dtype)

        @pl.when((f & END) != 0)
        def _():
            sf_ref[n] = S.astype(sf_ref.dtype)

        return S

    lax.fori_loop(0, N, body, jnp.zeros(h0_ref.shape[1:], acc))


def _gpu_dkv_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, do_ref, b_ref, sg_ref, dsf_ref, dk_ref, dv_ref,
                           dh0_ref, *, C, N, scale, causal, cdt, acc):
    def body(i, dS):
        c = N - 1 - i
        n = cs_ref[c]
        f = cf_ref[c]
        dS = jnp.where((f & END) != 0, dsf_ref[n].astype(acc), dS)
        t0 = pl.multiple_of(c * C, C)
        sl = pl.ds(t0, C)
        end = pl.ds(t0 + C - 1, 1)
        dk, dv, dS = _dkv_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], do_ref[sl, :], b_ref[sl, :],
                                sg_ref[sl, :], b_ref[end, :], sg_ref[end, :], dS,
                                scale=scale, causal=causal, cdt=cdt, acc=acc)
        dk_ref[sl, :] = dk.astype(dk_ref.dtype)
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)

        @pl.when((f & FIRST) != 0)
        def _():
            dh0_ref[n] = dS.astype(dh0_ref.dtype)

        return dS

    lax.fori_loop(0, N, body, jnp.zeros(dsf_ref.shape[1:], acc))


def _tpu_fwd_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, b_ref, sg_ref, h0_ref, o_ref, sf_ref, s_scr, *,
                           scale, causal, cdt, acc, chunk_fn=None):
    del cs_ref  # used by the index maps
    c = pl.program_id(3)

    @pl.when((cf_ref[c] & FIRST) != 0)  # chunk 0 is always the first of its sequence
    def _():
        s_scr[...] = h0_ref[...].astype(acc)

    C = q_ref.shape[0]
    o, S = (chunk_fn or _fwd_chunk)(q_ref[...], k_ref[...], v_ref[...], b_ref[...], sg_ref[...], b_ref[C - 1:C, :],
                      sg_ref[C - 1:C, :], s_scr[...], scale=scale, causal=causal, cdt=cdt, acc=acc)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = S
    sf_ref[...] = S.astype(sf_ref.dtype)  # the block of sequence cs[c]: written back after its last chunk


def _tpu_dkv_packed_kernel(cs_ref, cf_ref, q_ref, k_ref, v_ref, do_ref, b_ref, sg_ref, dsf_ref, dk_ref, dv_ref,
                           dh0_ref, ds_scr, *, N, scale, causal, cdt, acc):
    del cs_ref
    i = pl.program_id(3)
    f = cf_ref[N - 1 - i]

    @pl.when(i == 0)
    def _():
        ds_scr[...] = jnp.zeros(ds_scr.shape, acc)

    @pl.when((f & END) != 0)
    def _():
        ds_scr[...] = dsf_ref[...].astype(acc)

    C = q_ref.shape[0]
    dk, dv, dS = _dkv_chunk(q_ref[...], k_ref[...], v_ref[...], do_ref[...], b_ref[...], sg_ref[...],
                            b_ref[C - 1:C, :], sg_ref[C - 1:C, :], ds_scr[...],
                            scale=scale, causal=causal, cdt=cdt, acc=acc)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    ds_scr[...] = dS
    dh0_ref[...] = dS.astype(dh0_ref.dtype)  # last write in reverse order: the sequence's first chunk


def _fwd_packed_call(backend, interp, cs, cf, q, k, v, b, sg, h0, *, scale, cfg, out_dtype, dq=False):
    """Packed forward: ``(O [1, H, Tp, V], S_final [Ns, H, K, V])`` (final states of empty
    sequences are not written: the caller takes ``h0`` for them). ``dq=True``: the per-channel
    dQ sweep on ``(k, v, dO)`` as in :func:`_fwd_call`."""
    _, H, Tp, K = q.shape
    V = v.shape[-1]
    nb = b.shape[-1]
    Ns = h0.shape[0]
    C = cfg.C
    Nc = Tp // C
    cdt = q.dtype
    acc = _acc(cdt)
    out_shape = (jax.ShapeDtypeStruct((1, H, Tp, V), out_dtype), jax.ShapeDtypeStruct((Ns, H, K, V), acc))
    kw = dict(scale=scale, causal=cfg.causal, cdt=cdt, acc=acc, chunk_fn=_dq_chunk_channel if dq else None)
    if backend == "gpu":
        bv, nw, ns = cfg.block_sizes.gpu(K, V)
        nvb = V // bv
        ints = pl.BlockSpec((Nc,), lambda i, j, n: (0,))
        full = lambda d: pl.BlockSpec((None, None, Tp, d), lambda i, j, n: (i, j, 0, 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, Tp, bv), lambda i, j, n: (i, j, 0, n))
        sblk = pl.BlockSpec((Ns, None, K, bv), lambda i, j, n: (0, j, 0, n))
        if dq:
            out_shape = (jax.ShapeDtypeStruct((nvb, 1, H, Tp, K), acc), out_shape[1])
            oblk = pl.BlockSpec((None, None, None, Tp, K), lambda i, j, n: (n, i, j, 0, 0))
        else:
            oblk = vblk
        o, S = pl.pallas_call(
            functools.partial(_gpu_fwd_packed_kernel, C=C, N=Nc, **kw),
            out_shape=out_shape,
            grid=(1, H, nvb),
            in_specs=[ints, ints, full(K), vblk if dq else full(K), vblk, full(nb), full(nb), sblk],
            out_specs=(oblk, sblk),
            compiler_params=None if interp else plgpu.CompilerParams(num_warps=nw, num_stages=ns),
            cost_estimate=_cost(H, Nc, K, V, C, cfg.causal, nvb, jnp.dtype(cdt).itemsize, False),
            interpret=bool(interp),
            name="tttla_linear_attention_packed_dq_triton" if dq else "tttla_linear_attention_packed_fwd_triton",
        )(cs, cf, q, k, v, b, sg, h0)
        return (jnp.sum(o, axis=0) if dq else o), S
    if jnp.dtype(cdt) == jnp.float16:  # as _fwd_call
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        cdt = jnp.float32
        kw["cdt"] = cdt
    f16_out = jnp.dtype(out_dtype) == jnp.float16 and not dq
    if f16_out:
        out_shape = (jax.ShapeDtypeStruct((1, H, Tp, V), jnp.float32), out_shape[1])
    bv = cfg.block_sizes.tpu(K, V)
    nvb = V // bv
    tok = lambda d: pl.BlockSpec((None, None, C, d), lambda i, j, n, c, cs, cf: (i, j, c, 0))  # noqa: E731
    vblk = pl.BlockSpec((None, None, C, bv), lambda i, j, n, c, cs, cf: (i, j, c, n))
    sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n, c, cs, cf: (cs[c], j, 0, n))
    if dq:
        out_shape = (jax.ShapeDtypeStruct((nvb, 1, H, Tp, K), acc), out_shape[1])
        oblk = pl.BlockSpec((None, None, None, C, K), lambda i, j, n, c, cs, cf: (n, i, j, c, 0))
    else:
        oblk = vblk
    o, S = pl.pallas_call(
        functools.partial(_tpu_fwd_packed_kernel, **kw),
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(1, H, nvb, Nc),
            in_specs=[tok(K), vblk if dq else tok(K), vblk, tok(nb), tok(nb), sblk],
            out_specs=(oblk, sblk),
            scratch_shapes=[pltpu.VMEM((K, bv), acc)]),
        compiler_params=_tpu_params(cfg, K, V, bv, cdt),
        cost_estimate=_cost(H, Nc, K, V, C, cfg.causal, nvb, jnp.dtype(cdt).itemsize, False),
        interpret=interp or False,
        name="tttla_linear_attention_packed_dq_mosaic" if dq else "tttla_linear_attention_packed_fwd_mosaic",
    )(cs, cf, q, k, v, b, sg, h0)
    if dq:
        return jnp.sum(o, axis=0), S
    return (o.astype(out_dtype) if f16_out else o), S


def _dkv_packed_call(backend, interp, cs, cf, q, k, v, do, b, sg, dSF, *, scale, cfg):
    """Packed reverse sweep: ``(dK, dV, dh0)`` (``dh0`` of empty sequences not written)."""
    _, H, Tp, K = q.shape
    V = v.shape[-1]
    Ns = dSF.shape[0]
    C = cfg.C
    Nc = Tp // C
    cdt = q.dtype
    acc = _acc(cdt)
    kw = dict(scale=scale, causal=cfg.causal, cdt=cdt, acc=acc)
    if backend == "gpu":
        bv, nw, ns = cfg.block_sizes.gpu(K, V)
        nvb = V // bv
        ints = pl.BlockSpec((Nc,), lambda i, j, n: (0,))
        full = lambda d: pl.BlockSpec((None, None, Tp, d), lambda i, j, n: (i, j, 0, 0))  # noqa: E731
        vblk = pl.BlockSpec((None, None, Tp, bv), lambda i, j, n: (i, j, 0, n))
        sblk = pl.BlockSpec((Ns, None, K, bv), lambda i, j, n: (0, j, 0, n))
        dkblk = pl.BlockSpec((None, None, None, Tp, K), lambda i, j, n: (n, i, j, 0, 0))
        dk, dv, dh0 = pl.pallas_call(
            functools.partial(_gpu_dkv_packed_kernel, C=C, N=Nc, **kw),
            out_shape=(jax.ShapeDtypeStruct((nvb, 1, H, Tp, K), acc), jax.ShapeDtypeStruct((1, H, Tp, V), acc),
                       jax.ShapeDtypeStruct((Ns, H, K, V), acc)),
            grid=(1, H, nvb),
            in_specs=[ints, ints, full(K), full(K), vblk, vblk, full(b.shape[-1]), full(b.shape[-1]), sblk],
            out_specs=(dkblk, vblk, sblk),
            compiler_params=None if interp else plgpu.CompilerParams(num_warps=nw, num_stages=ns),
            cost_estimate=_cost(H, Nc, K, V, C, cfg.causal, nvb, jnp.dtype(cdt).itemsize, True),
            interpret=bool(interp),
            name="tttla_linear_attention_packed_dkv_triton",
        )(cs, cf, q, k, v, do, b, sg, dSF)
        return jnp.sum(dk, axis=0), dv, dh0
    if jnp.dtype(cdt) == jnp.float16:
        q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
        cdt = jnp.float32
        kw["cdt"] = cdt
    bv = cfg.block_sizes.tpu(K, V)
    nvb = V // bv
    rev = lambda c: Nc - 1 - c  # noqa: E731
    tok = lambda d: pl.BlockSpec((None, None, C, d), lambda i, j, n, c, cs, cf: (i, j, rev(c), 0))  # noqa: E731
    vblk = pl.BlockSpec((None, None, C, bv), lambda i, j, n, c, cs, cf: (i, j, rev(c), n))
    sblk = pl.BlockSpec((None, None, K, bv), lambda i, j, n, c, cs, cf: (cs[rev(c)], j, 0, n))
    dkblk = pl.BlockSpec((None, None, None, C, K), lambda i, j, n, c, cs, cf: (n, i, j, rev(c), 0))
    dk, dv, dh0 = pl.pallas_call(
        functools.partial(_tpu_dkv_packed_kernel, N=Nc, **kw),
        out_shape=(jax.ShapeDtypeStruct((nvb, 1, H, Tp, K), acc), jax.ShapeDtypeStruct((1, H, Tp, V), acc),
                   jax.ShapeDtypeStruct((Ns, H, K, V), acc)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(1, H, nvb, Nc),
            in_specs=[tok(K), tok(K), vblk, vblk, tok(b.shape[-1]), tok(b.shape[-1]), sblk],
            out_specs=(dkblk, vblk, sblk),
            scratch_shapes=[pltpu.VMEM((K, bv), acc)]),
        compiler_params=_tpu_params(cfg, K, V, bv, cdt),
        cost_estimate=_cost(H, Nc, K, V, C, cfg.causal, nvb, jnp.dtype(cdt).itemsize, True),
        interpret=interp or False,
        name="tttla_linear_attention_packed_dkv_mosaic",
    )(cs, cf, q, k, v, do, b, sg, dSF)
    return jnp.sum(dk, axis=0), dv, dh0


def _reverse_cumsum_stops(x, stop):
    """``y_t = Σ_{t ≤ s ≤ e} x_s`` over the last axis, ``e`` the first position ``≥ t`` with
    ``stop`` (the end if none): a reverse cumulative sum that restarts after every stop."""
    xr = jnp.flip(x, -1)
    sr = jnp.flip(stop, -1)  # reversed: a stop starts a new segment

    def combine(a, b):
        a1, f1 = a
        a2, f2 = b
        return jnp.where(f2, a2, a1 + a2), f1 | f2

    y, _ = lax.associative_scan(combine, (xr, sr), axis=x.ndim - 1)
    return jnp.flip(y, -1)


def _packed_tables(cu_seqlens, T, C):
    """The re-chunked layout and its per-chunk int32 tables ``(lay, cs, cf, last)``."""
    lay = _varlen.layout(cu_seqlens, T, C)
    cf = (lay.first.astype(jnp.int32) * FIRST + lay.ends.astype(jnp.int32) * END).astype(jnp.int32)
    return lay, lay.seq.astype(jnp.int32), cf, lay.last.astype(jnp.int32)


def _to_slots(x, lay):
    """``[1, T, H, ...]`` → the re-chunked token-major layout ``[1, Nc·C, H, ...]``."""
    y = jnp.moveaxis(_varlen.to_chunks(x, lay, gather_vjp=True)[:, 0], 2, 1)  # [Nc, C, H, ...]
    return y.reshape((1, -1) + y.shape[2:])


def _from_slots(y, lay):
    C = lay.valid.shape[1]
    y = y.reshape((-1, C) + y.shape[2:])
    return _varlen.from_chunks(jnp.moveaxis(y, 1, 2)[:, None], lay, gather_vjp=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _la_packed(q, k, v, g, h0, cs, cf, last, scale, cfg):
    return _la_packed_fwd(q, k, v, g, h0, cs, cf, last, scale, cfg)[0]


def _la_packed_fwd(q, k, v, g, h0, cs, cf, last, scale, cfg):
    """On the slot layout ``[1, Tp, H, ·]``: ``(o, S_final [Ns, H, K, V])``."""
    Tp = q.shape[1]
    acc = _acc(q.dtype)
    h0 = h0.astype(acc)
    b, sg = _cum_decay(g.astype(acc), cfg.C, Tp)
    o, SF = _dispatch(_fwd_packed_call, cfg, cs, cf, *(_chunk.heads_major(x, Tp) for x in (q, k, v)), b, sg, h0,
                      scale=scale, out_dtype=q.dtype)
    SF = jnp.where((last >= 0)[:, None, None, None], SF, h0)  # an empty sequence keeps its h0
    return (_chunk.from_heads_major(o, Tp), SF), (q, k, v, g, h0, cs, cf, last, SF)


def _la_packed_bwd(scale, cfg, res, cts):
    q, k, v, g, h0, cs, cf, last, SF = res
    do, dSF = cts
    _, Tp, H, K = q.shape
    C = cfg.C
    Nc = Tp // C
    acc = _acc(q.dtype)
    ga = g.astype(acc)
    dSF = dSF.astype(acc)
    b, sg = _cum_decay(ga, C, Tp)
    qh, kh, vh, doh = (_chunk.heads_major(x, Tp) for x in (q, k, v, do.astype(q.dtype)))
    if ga.ndim == 4:
        return _la_packed_channel_bwd(scale, cfg, q, k, v, g, h0, cs, cf, last, SF, qh, kh, vh, doh, b, sg, dSF)
    cfg_dq = dataclasses.replace(cfg, block_sizes=dataclasses.replace(
        cfg.block_sizes, block_v_gpu=None, block_v_tpu=None))
    dqs, _ = _dispatch(_fwd_packed_call, cfg_dq, cs, cf, doh, vh, kh, b, sg, jnp.swapaxes(h0, -1, -2),
                       scale=1.0, out_dtype=acc)
    dk, dv, dh0 = _dispatch(_dkv_packed_call, cfg, cs, cf, qh, kh, vh, doh, b, sg, dSF, scale=scale)
    dh0 = jnp.where((last >= 0)[:, None, None, None], dh0, dSF)
    # log-decay, per sequence as in _la_bwd: dB_t = q_t·dq_t − k_t·dk_t + [t last of its sequence]<S_n, dS_n>
    qdq = jnp.sum(qh.astype(acc) * scale * dqs, axis=-1)  # [1, H, Tp]
    kdk = jnp.sum(kh.astype(acc) * dk, axis=-1)
    first = (cf & FIRST) != 0
    if not cfg.causal:  # chunk c's queries read the state after chunk c − 1 of the same sequence (h0 if first)
        per_chunk = jnp.sum(qdq.reshape(1, H, Nc, C), axis=-1)
        shifted = jnp.where(first[1:], 0.0, per_chunk[:, :, 1:])
        qdq = jnp.zeros((1, H, Nc, C), acc).at[:, :, :-1, C - 1].set(shifted).reshape(1, H, Tp)
    dB = qdq - kdk
    st = jnp.where((last >= 0)[:, None], jnp.sum(SF * dSF, axis=(-2, -1)), 0.0)  # [Ns, H]
    # at the last slot of the sequence's last chunk (slots after its last token hold g = 0)
    dB = dB.at[:, :, jnp.maximum(last, 0) * C + C - 1].add(st.T[None])
    cut = jnp.swapaxes(ga <= -_chunk.cut_threshold(acc), 1, 2)  # [1, H, Tp]
    seq_end = (((cf & END) != 0)[:, None] & (jnp.arange(C) == C - 1)[None]).reshape(Tp)
    stop = seq_end | jnp.concatenate([cut[..., 1:], jnp.zeros_like(cut[..., :1])], -1)
    dg = jnp.where(cut, 0.0, _reverse_cumsum_stops(dB, stop))
    dq = _chunk.from_heads_major(dqs * scale, Tp)
    dk = _chunk.from_heads_major(dk, Tp)
    dv = _chunk.from_heads_major(dv, Tp)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.swapaxes(dg, 1, 2).astype(g.dtype),
            dh0, None, None, None)


def _la_packed_channel_bwd(scale, cfg, q, k, v, g, h0, cs, cf, last, SF, qh, kh, vh, doh, b, sg, dSF):
    """:func:`_la_packed_bwd` for a per-channel log-decay (as :func:`_la_channel_bwd`, per sequence)."""
    Tp = q.shape[1]
    C = cfg.C
    acc = _acc(q.dtype)
    dqs, _ = _dispatch(_fwd_packed_call, cfg, cs, cf, kh, vh, doh, b, sg, h0, scale=scale, out_dtype=acc, dq=True)
    dk, dv, dh0 = _dispatch(_dkv_packed_call, cfg, cs, cf, qh, kh, vh, doh, b, sg, dSF, scale=scale)
    dh0 = jnp.where((last >= 0)[:, None, None, None], dh0, dSF)
    first = (cf & FIRST) != 0
    dB = _channel_dB(qh, dqs, kh, dk, scale, cfg.causal, first, acc)  # [1, H, Tp, K]
    st = jnp.where((last >= 0)[:, None, None], jnp.sum(SF * dSF, axis=-1), 0.0)  # [Ns, H, K]
    dB = dB.at[:, :, jnp.maximum(last, 0) * C + C - 1, :].add(jnp.moveaxis(st, 0, 1)[None])
    dB = jnp.moveaxis(dB, 2, 3)  # [1, H, K, Tp]
    cut = jnp.transpose(g.astype(acc) <= -_chunk.cut_threshold(acc), (0, 2, 3, 1))  # [1, H, K, Tp]
    seq_end = (((cf & END) != 0)[:, None] & (jnp.arange(C) == C - 1)[None]).reshape(Tp)
    stop = seq_end | jnp.concatenate([cut[..., 1:], jnp.zeros_like(cut[..., :1])], -1)
    dg = jnp.transpose(jnp.where(cut, 0.0, _reverse_cumsum_stops(dB, stop)), (0, 3, 1, 2))  # [1, Tp, H, K]
    return (_chunk.from_heads_major(dqs * scale, Tp).astype(q.dtype), _chunk.from_heads_major(dk, Tp).astype(k.dtype),
            _chunk.from_heads_major(dv, Tp).astype(v.dtype), dg.astype(g.dtype), dh0, None, None, None)


_la_packed.defvjp(_la_packed_fwd, _la_packed_bwd)


# --------------------------------------------------------------------------- public wrapper


def pad_head_dims(q, k, v, S0, Kp: int, Vp: int):
    """Zero-pad the key channels of ``q, k`` and ``S0`` to ``Kp`` and the value channels of
    ``v`` and ``S0`` to ``Vp`` (:func:`padded_dim`: exact; no-op when already there)."""
    K, V = q.shape[-1], v.shape[-1]
    if (K, V) == (Kp, Vp):
        return q, k, v, S0
    pk = [(0, 0)] * 3 + [(0, Kp - K)]
    q, k = jnp.pad(q, pk), jnp.pad(k, pk)
    v = jnp.pad(v, [(0, 0)] * 3 + [(0, Vp - V)])
    S0 = jnp.pad(S0, [(0, 0), (0, 0), (0, Kp - K), (0, Vp - V)])
    return q, k, v, S0


def _check_interpret(interpret) -> None:
    if interpret is not None and not (interpret is True or (isinstance(interpret, str) and interpret in ("gpu", "tpu"))
                                      or isinstance(interpret, pltpu.InterpretParams)):
        raise ValueError(f"interpret: expected None, True, 'gpu', 'tpu' or pltpu.InterpretParams, got {interpret!r}")


def _check_block_sizes(block_sizes) -> None:
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes: expected a tttla_jax.kernels.BlockSizes or None, got {block_sizes!r}")


def _interpret_mode(interpret) -> bool:
    """Whether the call runs in Pallas interpret mode: asked for, or no GPU/TPU to compile for
    (:func:`tttla_jax.impl.on_accelerator`; float64 has no compiled kernel)."""
    return interpret is not None or not _impl.on_accelerator()


def _static_scale(q, K, scale):
    """``(q, scale)`` with ``scale`` a Python float (a static kernel parameter): the default
    ``K ** -0.5``, a concrete scalar as is, and a scale traced under ``jit`` folded into the
    queries (``q·scale`` in q's dtype, then scale 1), so it is differentiated like any input."""
    if scale is None:
        return q, K ** -0.5
    if isinstance(scale, float):
        return q, scale
    return (q.astype(_acc(q.dtype)) * scale).astype(q.dtype), 1.0



def linear_attention(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    *,
    scale: Optional[float] = None,
    log_decay: Optional[Float[Array, "b t h"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    masking: str = "causal",
    chunk_size: int = 64,
    cu_seqlens=None,
    block_sizes: Optional[BlockSizes] = None,
    interpret: Any = None,
):
    """Chunked (block-)causal linear attention with optional log-decay, as a Pallas kernel.

    ``S_t = exp(g_t) S_{t-1} + k_tᵀ v_t``, ``o_t = (scale·q_t) S_t`` (docs/linear_attention.md); ``masking="chunk"``
    reads the state after the previous chunk. Same contract as
    :func:`tttla_jax.linear_attention` (``impl="pallas"`` calls this).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (one dtype); any T; ``16 ≤ K, V ≤ 256``
        (zero-padded to the next of :data:`HEAD_DIMS` inside the wrapper, exact;
        :func:`padded_dim`).
      scale: query scale (default ``K ** -0.5``): a Python, NumPy or JAX real scalar; a scale
        traced under ``jit`` is folded into the queries (``q·scale`` in q's dtype).
      log_decay: optional log-decay ``g``: ``[B, T, H]`` (one per head) or ``[B, T, H, K]``
        (one per key channel, GLA: ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t``; ``masking="causal"``
        then runs :data:`PER_CHANNEL_CHUNK`-token chunks whatever ``chunk_size``).
      initial_state: optional ``[B, H, K, V]`` state ``S_0``.
      output_final_state: also return ``S_T`` (float32; float64 for float64 inputs).
      masking: ``"causal"`` or ``"chunk"``.
      chunk_size: chunk length; semantic for ``masking="chunk"`` (must be in ``CHUNK_SIZES``),
        a tiling choice for ``"causal"`` (unsupported values fall back to 64; shortened to
        the next power of two ≥ T for short sequences).
      cu_seqlens: optional ``[N + 1]`` int offsets of N sequences packed in a batch of one
        (:mod:`tttla_jax.ops.varlen`): each runs as if alone (its own initial state, chunks
        of ``masking="chunk"`` counted from its start); ``initial_state`` and the returned
        state are then ``[N, H, K, V]``. The kernel walks the re-chunked layout and resets
        its state on each sequence's first chunk (forward and backward).
      block_sizes: :class:`BlockSizes` (per-platform tiling / compiler knobs; the tiles are
        of the padded head dims). ``None``: the chip's entry of :data:`CHIP_TABLES` on an
        H100/H200/TPU v5e/v5p/v6e, else the platform defaults.
      interpret: ``None`` (compiled on GPU/TPU, interpret mode elsewhere), ``"gpu"`` (the
        Triton-style kernel in interpret mode), ``"tpu"`` (the Mosaic kernel in interpret
        mode with NaN-filled uninitialized memory) or a ``pltpu.InterpretParams``.

    Returns:
      ``(o [B, T, H, V] in q's dtype, S_T or None)`` (``S_T`` ``[N, H, K, V]`` with ``cu_seqlens``).

    Raises:
      ValueError: at trace time for bad shapes or an unsupported masking/dtype/head dim/chunk
        (the argument checks are :func:`tttla_jax._checks.check_qkv`, shared with the ops).
    """
    B, T, H, K, V, Ns = _checks.check_qkv(q, k, v, gates={"log_decay": log_decay}, initial_state=initial_state,
                                          cu_seqlens=cu_seqlens, same_dtype=True, channel_gates=("log_decay",))
    channel = log_decay is not None and jnp.ndim(log_decay) == 4
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    scale = _checks.check_scale(scale)
    _check_interpret(interpret)
    _check_block_sizes(block_sizes)
    reason = unsupported_reason(q.dtype, masking, K, V, chunk_size, interpret=_interpret_mode(interpret))
    if reason is not None:
        raise ValueError(f"impl='pallas': {reason}")
    Kp, Vp = padded_dim(K), padded_dim(V)
    if masking == "causal" and channel:
        C = PER_CHANNEL_CHUNK  # the chunk boundary is every factorised exponential's reference point
    elif masking == "causal":
        C = chunk_size if chunk_size in CHUNK_SIZES else DEFAULT_CAUSAL_CHUNK
        C = min(C, max(CHUNK_SIZES[0], pl.next_power_of_2(T)))
    else:
        C = chunk_size
    cfg = _Cfg(C=C, causal=masking == "causal", block_sizes=block_sizes or default_block_sizes(K, V, interpret),
               interpret=interpret)
    cfg.block_sizes.gpu(Kp, Vp)  # validate both platforms' tiles at trace time
    cfg.block_sizes.tpu(Kp, Vp)
    acc = _acc(q.dtype)
    g = jnp.zeros((B, T, H), acc) if log_decay is None else log_decay
    S0 = jnp.zeros((Ns, H, K, V), acc) if initial_state is None else initial_state
    q, scale = _static_scale(q, K, scale)
    q, k, v, S0 = pad_head_dims(q, k, v, S0, Kp, Vp)
    if channel and Kp != K:  # padded key channels: log-decay 0 (their q, k and state rows are 0)
        g = jnp.pad(g, [(0, 0)] * 3 + [(0, Kp - K)])
    if cu_seqlens is None:
        o, S = _la(q, k, v, g, S0, scale, cfg)
    else:
        lay, cs, cf, last = _packed_tables(cu_seqlens, T, C)
        o, S = _la_packed(*(_to_slots(x, lay) for x in (q, k, v, g)), S0.astype(acc), cs, cf, last, scale, cfg)
        o = _from_slots(o, lay)
    return o[..., :V], (S[..., :K, :V] if output_final_state else None)
