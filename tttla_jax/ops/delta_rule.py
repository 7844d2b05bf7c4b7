"""DeltaNet and gated DeltaNet (docs/linear_attention.md), recurrent and chunked (WY / UT form).

Axis names as in :mod:`tttla_jax.ops.linear_attention` (``B T H K V C N``).

The recurrence (update-then-query; token t sees its own write)::

    S   ← exp(g_t) · S_{t-1}                 g_t = log_decay[t] (0 if absent)
    u_t = β_t (v_t − k_t S)                  S_t = S + k_tᵀ u_t
    o_t = (scale · q_t) S_t

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

  ``A, P, W_v, W_k, M_n, D_n`` do not depend on S and are computed for all chunks at
  once with batched matmuls; the sequential scan over chunks only does
  ``S ← M_n S + D_n`` (one K×K by K×V product), and the outputs are again batched
  over chunks given the state before each chunk. For cache locality the chunks are
  processed in groups of ``_GROUP_CHUNKS`` = 4 (an outer ``lax.scan`` carrying S, its body
  rematerialised for the backward pass).

Packed sequences (``cu_seqlens``, :mod:`tttla_jax.ops.varlen`): the tokens are re-chunked
so that every sequence has its own chunks, the chunk slots are grouped as above (by default
one chunk per group, ``_VARLEN_GROUP_CHUNKS``: measured faster for a batch of one), and the
affine scan inside a group resets ``S := S_0^{(n)}`` (that sequence's initial state) at the
first chunk of every sequence. Zero-padded slots (β = k = g = 0) have ``M = I, D = 0``.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax.ops import varlen
from tttla_jax.ops.linear_attention import _pad_time, chunk_layout, unchunk_layout

IMPLS = ("recurrent", "chunked", "pallas", "auto")

# Tokens per rematerialised block of the token scan (see ops/linear_attention.py).
_REMAT_BLOCK = 128
# Chunks per group of the chunked form (see _chunked).
_GROUP_CHUNKS = 4
# Chunks per group of the packed-sequence chunked form (see _chunked_varlen). Measured on this
# CPU (gated, B = 1 packed, H = 4, K = V = 64, C = 64, 8 sequences, float32, medians of 7
# interleaved rounds, machine shared): T = 8192, groups of 1 vs 4: fwd 113 vs 135 ms, fwd+bwd
# 417 vs 456 ms (the unpacked form, groups of 4: 109 / 391 ms); T = 4096 likewise. Groups of
# more chunks (resets inside a group) stay supported and tested.
_VARLEN_GROUP_CHUNKS = 1


def _validate(q, k, v, beta, log_decay, initial_state, chunk_size, impl, scale, cu_seqlens=None):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, x, 4, "[B, T, H, D]")
        _checks.check_floating(name, x)
    B, T, H, K = q.shape
    _checks.check_shape("k", k, (B, T, H, K), "[B, T, H, K] (from q)")
    if v.shape[:3] != (B, T, H):
        raise ValueError(
            f"v: expected shape [B, T, H, V] with (B, T, H) = {(B, T, H)} (from q), got {tuple(v.shape)}"
        )
    V = v.shape[3]
    if T == 0:
        raise ValueError("q: expected at least one token (T >= 1), got T = 0")
    _checks.check_shape("beta", beta, (B, T, H), "[B, T, H]")
    _checks.check_floating("beta", beta)
    if log_decay is not None:
        _checks.check_shape("log_decay", log_decay, (B, T, H), "[B, T, H]")
        _checks.check_floating("log_decay", log_decay)
    state_shape, state_layout = varlen.state_shape(cu_seqlens, B, T, H, K, V)
    if initial_state is not None:
        _checks.check_shape("initial_state", initial_state, state_shape, state_layout)
        _checks.check_floating("initial_state", initial_state)
    _checks.check_choice("impl", impl, IMPLS)
    _checks.check_positive_int("chunk_size", chunk_size)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return B, T, H, K, V


def delta_rule(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    beta: Float[Array, "b t h"],
    *,
    log_decay: Optional[Float[Array, "b t h"]] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
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
      log_decay: optional ``[B, T, H]`` log-decay ``g_t`` (≤ 0 for a contraction; not
        enforced) — the gated delta rule.
      scale: query scale, default ``K ** -0.5``.
      initial_state: optional ``[B, H, K, V]`` state ``S_0`` (zeros if absent).
      output_final_state: also return the state after the last token.
      chunk_size: chunk length of the chunked form.
      impl: ``"recurrent"`` | ``"chunked"`` | ``"pallas"`` (the Pallas forward kernel of
        :mod:`tttla_jax.kernels`, backward in XLA; interpret mode on a CPU host) |
        ``"auto"`` (the kernel on GPU/TPU where it supports the shape, else chunked).
      cu_seqlens: optional ``[N + 1]`` int offsets of N packed sequences in a batch of one
        (``B = 1``; :mod:`tttla_jax.ops.varlen`): every sequence runs as if alone — its own
        initial state, no state crossing a boundary (an empty sequence's final state is its
        initial state). ``initial_state`` and the returned state are then ``[N, H, K, V]``,
        one per sequence. ``"recurrent"`` or ``"chunked"`` (``"auto"`` picks chunked); not
        with ``"pallas"``. May be traced under ``jax.jit`` (its values are then not checked).

    Returns:
      ``(o, S)``: ``o`` ``[B, T, H, V]`` in q's dtype; ``S`` ``[B, H, K, V]`` (``[N, H, K, V]``
      with ``cu_seqlens``) in float32 (float64 for float64 inputs), or ``None`` unless
      ``output_final_state``.

    Raises:
      ValueError: a shape, dtype, ``impl`` or ``chunk_size`` is wrong (the message names
        the argument, what it got and what was expected). Raised at trace time.
      ValueError: ``impl="pallas"`` on a shape/dtype the kernel does not support (the
        message gives the reason; ``"auto"`` falls back silently).
    """
    B, T, H, K, V = _validate(q, k, v, beta, log_decay, initial_state, chunk_size, impl, scale, cu_seqlens)
    if scale is None:
        scale = K ** -0.5
    if cu_seqlens is not None:
        if impl == "pallas":
            raise ValueError("impl='pallas': packed sequences (cu_seqlens) are not supported by the Pallas "
                             "kernel; use impl='chunked' (or 'auto')")
        impl = "chunked" if impl == "auto" else impl
    if impl == "auto":
        # The fused forward kernel on GPU/TPU for supported shapes; on CPU the chunked XLA
        # form is the fast path.
        impl = "pallas" if _kernel_supported(q, K, V) else "chunked"
    if impl == "pallas":
        from tttla_jax import kernels  # deferred: kernels sit below ops in the data flow

        return kernels.delta_rule(q, k, v, beta, scale=scale, log_decay=log_decay,
                                  initial_state=initial_state,
                                  output_final_state=output_final_state, chunk_size=chunk_size)

    sd = _checks.state_dtype(q, k, v, beta, log_decay, initial_state)
    qf = q.astype(sd) * jnp.asarray(scale, sd)
    kf, vf, bf = k.astype(sd), v.astype(sd), beta.astype(sd)
    g = None if log_decay is None else log_decay.astype(sd)
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
        o, S = _chunked(qf, kf, vf, bf, g, S0, chunk_size)
    return o.astype(q.dtype), (S if output_final_state else None)


# --------------------------------------------------------------------------- recurrent


def _token_step(S, x):
    """One token: ``x = (q, k, v, β[, g])`` each ``[B, H, ...]``; returns ``(S_t, o_t)``."""
    if len(x) == 5:
        qt, kt, vt, bt, gt = x
        S = jnp.exp(gt)[..., None, None] * S
    else:
        qt, kt, vt, bt = x
    u = bt[..., None] * (vt - jnp.einsum("bhk,bhkv->bhv", kt, S))
    S = S + kt[..., :, None] * u[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", qt, S)


def _recurrent(q, k, v, beta, g, S0):
    """Token-by-token ``lax.scan``; zero-padded tokens (β=0, g=0, k=0) leave S unchanged."""
    B, T, H, K = q.shape
    blk = min(_REMAT_BLOCK, T)
    Tp = -(-T // blk) * blk
    gated = g is not None

    def tm(x):  # [B, T, H, ...] -> [nb, blk, B, H, ...] time-major blocks
        x = _pad_time(x, Tp)
        x = jnp.moveaxis(x, 1, 0)
        return x.reshape((Tp // blk, blk) + x.shape[1:])

    xs = (tm(q), tm(k), tm(v), tm(beta)) + ((tm(g),) if gated else ())

    @jax.checkpoint
    def block(S, xb):
        return lax.scan(_token_step, S, xb)

    S, o = lax.scan(block, S0, xs)
    o = o.reshape((Tp,) + o.shape[2:])[:T]
    return jnp.moveaxis(o, 0, 1), S


# --------------------------------------------------------------------------- chunked


def _inverse_by_doubling(A):
    """``(I + A)⁻¹`` for strictly lower-triangular ``A`` ``[..., C, C]``, by block doubling.

    A unit lower-triangular matrix ``[[L11, 0], [L21, L22]]`` has inverse
    ``[[L11⁻¹, 0], [−L22⁻¹ L21 L11⁻¹, L22⁻¹]]``. Starting from the 1×1 diagonal blocks
    (inverse 1), each level merges pairs of diagonal blocks of size s into blocks of
    size 2s with two batched matmuls; ``log2 C`` levels, ≈ (2/3) C³ flops per matrix.
    (XLA:CPU's batched ``triangular_solve`` was ~40× slower than this on the benchmark
    shapes, and its compile took seconds.) C is zero-padded to a power of two; padded rows/columns stay identity.
    """
    C = A.shape[-1]
    Cp = 1 << max(0, (C - 1).bit_length())
    if Cp != C:
        A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, Cp - C), (0, Cp - C)])
    batch = A.shape[:-2]
    D = jnp.ones(batch + (Cp, 1, 1), A.dtype)  # inverses of the diagonal blocks, size s
    s = 1
    while s < Cp:
        m = Cp // (2 * s)
        # the m diagonal blocks of size 2s of A, and their lower-left s×s corners
        Ad = jnp.diagonal(A.reshape(batch + (m, 2 * s, m, 2 * s)), axis1=-4, axis2=-2)
        L21 = jnp.moveaxis(Ad, -1, -3)[..., s:, :s]  # [..., m, s, s]
        Dp = D.reshape(batch + (m, 2, s, s))
        D11, D22 = Dp[..., 0, :, :], Dp[..., 1, :, :]
        X21 = -jnp.matmul(jnp.matmul(D22, L21), D11)
        D = jnp.concatenate(
            [jnp.concatenate([D11, jnp.zeros_like(D11)], -1), jnp.concatenate([X21, D22], -1)], -2
        )
        s *= 2
    return D.reshape(batch + (Cp, Cp))[..., :C, :C]


@jax.custom_jvp
def unit_lower_inverse(A: Float[Array, "... c c"]) -> Float[Array, "... c c"]:
    """``T = (I + A)⁻¹`` for strictly lower-triangular ``A`` (the UT transform's matrix).

    Differentiated analytically, ``dT = −T dA T`` (so reverse mode is two matmuls and does
    not store the doubling levels). ``A`` must be strictly lower triangular (the caller
    masks it): the forward reads only that part, the JVP formula assumes it.
    """
    return _inverse_by_doubling(A)


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    (A,), (dA,) = primals, tangents
    T = unit_lower_inverse(A)
    return T, -jnp.matmul(jnp.matmul(T, dA), T)


def _chunk_scan_loop(M, D, S0, first=None, seq=None, h0=None):
    if first is None:
        def step(S, x):
            Mn, Dn = x
            return jnp.matmul(Mn, S) + Dn, S  # emit the state *before* the chunk

        return lax.scan(step, S0, (M, D))

    def step_reset(S, x):
        Mn, Dn, f, n = x
        # the first chunk of a packed sequence starts from its own initial state
        S = jnp.where(f, lax.dynamic_index_in_dim(h0, n, 0, keepdims=False), S)
        S_next = jnp.matmul(Mn, S) + Dn
        return S_next, (S, S_next)

    S_final, (S_prev, S_after) = lax.scan(step_reset, S0, (M, D, first, seq))
    return S_final, S_prev, S_after


@jax.custom_jvp
def _chunk_scan(M, D, S0, first=None, seq=None, h0=None):
    """``S_{n+1} = M_n S_n + D_n`` over chunks n (leading axis); returns ``(S_N, [S_0 … S_{N−1}])``.

    Packed sequences (``cu_seqlens``): ``first [N]`` (bool) and ``seq [N]`` (int), per chunk:
    it is the first of its sequence, and which sequence it belongs to; ``h0 [Ns, ...]`` the
    sequences' initial states. A chunk with ``first`` set starts from ``h0[seq]`` (read by
    index inside the scan) instead of the carried state (``S_prev`` holds that reset state),
    and the state after every chunk ``[S_1 … S_N]`` is returned as a third output. All three
    ``None`` otherwise.

    The JVP ``dS_{n+1} = M_n dS_n + (dM_n S_n + dD_n)`` is written so that the
    ``dM_n S_n`` term is one batched matmul outside the loop: after transposition the
    reverse scan only carries ``Gₙ = M_nᵀ G_{n+1} + …`` (one matmul per step instead of
    two) and ``dM = G Sᵀ`` is one batched matmul after the loop. With resets the tangent
    scan resets to ``dh0[seq]`` on the same chunks, so the transposed scan routes a first
    chunk's incoming cotangent to its sequence's ``h0`` (and none to the chunk before it).
    """
    return _chunk_scan_loop(M, D, S0, first, seq, h0)


@_chunk_scan.defjvp
def _chunk_scan_jvp(primals, tangents):
    (M, D, S0, first, seq, h0), (dM, dD, dS0, _, _, dh0) = primals, tangents
    out = _chunk_scan(M, D, S0, first, seq, h0)
    X = jnp.matmul(dM, out[1]) + dD  # out[1]: the state before each chunk (after a reset)
    return out, _chunk_scan_loop(M, X, dS0, first, seq, dh0)


def _chunk_group(qc, kc, vc, bc, gc, S0, first=None, seq=None, h0=None):
    """One group of chunks, all tensors ``[B, H, G, C, ·]`` (beta/log-decay ``[B, H, G, C]``).

    Returns ``(S after the group, o [B, H, G, C, V])``. Module docstring for the math.
    With ``first [G]``, ``seq [G]`` and ``h0 [Ns, B, H, K, V]`` (packed sequences, see
    :func:`_chunk_scan`) the chunks with ``first`` set start from ``h0[seq]``, and the state
    after every chunk ``[G, B, H, K, V]`` is returned as a third output.

    CPU notes: every product is a plain batched matmul with the batch axes leading; K is
    transposed once (``kT``) so both Gram products are NN matmuls; products are not
    concatenated (the copies cost more than the extra dot launches); ``(I + A)⁻¹`` by
    block doubling (:func:`unit_lower_inverse`), not ``triangular_solve``.
    """
    C, K = kc.shape[-2], kc.shape[-1]
    dt = qc.dtype
    bc = bc[..., None]  # [B,H,G,C,1]
    incl = jnp.tril(jnp.ones((C, C), bool))  # j <= i
    strict = jnp.tril(jnp.ones((C, C), bool), -1)  # j < i
    kT = jnp.swapaxes(kc, -1, -2)  # [B,H,G,K,C]
    QK = jnp.matmul(qc, kT)  # q_i·k_j
    KK = jnp.matmul(kc, kT)  # k_i·k_j
    if gc is None:
        P = jnp.where(incl, QK, 0.0)
        A = jnp.where(strict, KK, 0.0) * bc
        rhs_k = bc * kc
        Kt = kc
        Qt0 = qc
        eye_decay = jnp.eye(K, dtype=dt)
    else:
        # inclusive in-chunk cumulative log-decay [B,H,G,C], as a matmul with the upper-
        # triangular ones matrix (on XLA:CPU, jnp.cumsum's reduce-window got fused into
        # the C×C exp below; the matmul form measured ~15-20% faster overall).
        b = jnp.matmul(gc, jnp.triu(jnp.ones((C, C), dt)))
        bC = b[..., -1:]  # [B,H,G,1]
        # Mask *before* exp: only b_i − b_j with j ≤ i (≤ 0 for g ≤ 0) is exponentiated,
        # so strong decay over a long chunk cannot overflow (nor produce inf·0 = NaN).
        E = jnp.exp(jnp.where(incl, b[..., :, None] - b[..., None, :], 0.0))
        P = jnp.where(incl, QK * E, 0.0)
        A = jnp.where(strict, KK * E, 0.0) * bc
        eb = jnp.exp(b)[..., None]  # e^{b_i} ≤ 1
        rhs_k = (bc * eb) * kc
        Kt = jnp.exp(bC - b)[..., None] * kc  # e^{b_C − b_j} k_j, exponent ≤ 0
        Qt0 = eb * qc
        eye_decay = jnp.exp(bC)[..., None] * jnp.eye(K, dtype=dt)  # e^{b_C} I

    # [W_v, W_k] = (I + A)^{-1} [β V, β e^b K]  (unit lower-triangular system)
    Tinv = unit_lower_inverse(A)
    Wv = jnp.matmul(Tinv, bc * vc)  # [B,H,G,C,V]
    Wk = jnp.matmul(Tinv, rhs_k)  # [B,H,G,C,K]
    # Per-chunk transition: S_new = M S + D with D = K̃ᵀ W_v, M = e^{b_C} I − K̃ᵀ W_k.
    D = jnp.einsum("bhnck,bhncv->bhnkv", Kt, Wv)
    M = eye_decay - jnp.einsum("bhnck,bhncj->bhnkj", Kt, Wk)
    scanned = _chunk_scan(jnp.moveaxis(M, 2, 0), jnp.moveaxis(D, 2, 0), S0, first, seq, h0)
    S_final, S_prev = scanned[0], jnp.moveaxis(scanned[1], 0, 2)  # S_prev: [B,H,G,K,V]

    # o = (e^b Q − P W_k) S_prev + P W_v
    Qt = Qt0 - jnp.matmul(P, Wk)
    o = jnp.matmul(Qt, S_prev) + jnp.matmul(P, Wv)
    if first is None:
        return S_final, o
    return S_final, o, scanned[2]


def _chunked(q, k, v, beta, g, S0, chunk_size, group=None, remat=True):
    """WY / UT chunked form (module docstring); padded tokens have β = g = k = 0.

    The N chunks are processed in groups of ``group`` chunks (a ``lax.scan`` over groups
    carrying S): inside a group everything is batched over its chunks, so the
    ``[B, H, G, C, C]`` intermediates stay cache-sized instead of growing with T (on
    this CPU, T = 8192, measured under shared load: ≈2× faster forward and ≈1.6× faster
    forward+backward than one all-chunks batch). With ``remat`` the group body is rematerialised, so the backward
    pass stores one state per group rather than every ``C × C`` intermediate.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    G = min(group or _GROUP_CHUNKS, N)
    NG = -(-N // G)
    Tp = NG * G * C

    def to_groups(x):  # [B, T, H, ...] -> [NG, B, H, G, C, ...]
        x = _pad_time(x, Tp)
        x = x.reshape((B, NG, G, C, H) + x.shape[3:])
        return jnp.moveaxis(x, (1, 4), (0, 2))

    xs = (to_groups(q), to_groups(k), to_groups(v), to_groups(beta),
          None if g is None else to_groups(g))

    def body(S, x):
        return _chunk_group(*x, S)

    if remat:
        body = jax.checkpoint(body)
    S_final, o = lax.scan(body, S0, xs)  # o: [NG, B, H, G, C, V]
    o = jnp.moveaxis(o, (0, 2), (1, 4)).reshape(B, Tp, H, V)
    return o[:, :T], S_final


# --------------------------------------------------------------------------- packed sequences


def _varlen_chunks(q, k, v, beta, g, C, cu_seqlens):
    """The layout and the re-chunked inputs ``[Nc, 1, H, C, ...]`` (:mod:`tttla_jax.ops.varlen`;
    ``g`` may be ``None``)."""
    lay = varlen.layout(cu_seqlens, q.shape[1], C)
    return lay, tuple(None if x is None else varlen.to_chunks(x, lay) for x in (q, k, v, beta, g))


def _chunked_varlen(q, k, v, beta, g, h0, chunk_size, cu_seqlens, group=None, remat=True):
    """:func:`_chunked` on packed sequences: each sequence cut into its own chunks, the
    ``Nc`` chunk slots processed in groups of ``group`` (zero slots pad the last group:
    ``M = I, D = 0``), and the affine scan inside a group resetting to the sequence's
    initial state on its first chunk (:func:`_chunk_scan` with ``first`` / ``seq`` / ``h0``,
    ``h0`` read by index inside the scan)."""
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
        S_final, o, S_after = _chunk_group(*x[:5], S, *x[5:], hb)
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
    def chunk(S, x):
        *ys, f, n = x
        S = jnp.where(f, lax.dynamic_index_in_dim(h0, n, 0, keepdims=False)[None], S)
        S_next, o = lax.scan(_token_step, S, tuple(tm(y) for y in ys))
        return S_next, (jnp.moveaxis(o, 0, 2), S_next)

    _, (o, S_after) = lax.scan(chunk, jnp.zeros_like(h0[:1]), xs + (lay.first, lay.seq))
    return varlen.from_chunks(o, lay), varlen.final_states(S_after, h0, lay)


def _kernel_supported(q, K: int, V: int) -> bool:
    try:
        from tttla_jax import kernels
    except ImportError:  # pragma: no cover
        return False
    return kernels.delta_rule_supported(q, K, V)
