"""The chunk toolkit: layouts, padding, decay masks, the unit lower-triangular inverse and
the delta-rule chunk step, shared by the XLA forms of :mod:`tttla_jax.ops` and the XLA
paths around the Pallas kernels (:mod:`tttla_jax.kernels`).

Axis names as in :mod:`tttla_jax.ops.linear_attention` (``B T H K V``; ``C`` the chunk
size, ``N = ceil(T / C)`` chunks, ``G`` chunks per group, ``NG`` groups). The math is on
docs/linear_attention.md ("chunked form" and "delta rule"); this module holds the pieces
every chunked computation needs, once:

* **layouts** — token-major ``[B, T, H, ...]`` to and from the chunked layouts, zero-padding
  the last chunk (zero keys, values, gates and log-decays leave every state unchanged, so
  padded tokens are inert): :func:`chunk_layout` ``[B, H, N, C, ...]`` (rules),
  :func:`scan_layout` ``[N, B, H, C, ...]`` / ``[NG, B, H, G, C, ...]`` (a ``lax.scan`` over
  chunks or groups of chunks), :func:`token_blocks` ``[nb, blk, B, H, ...]`` (a token scan
  in rematerialised blocks), :func:`heads_major` ``[B, H, Tp, D]`` (kernel operands);
* **decay masks** — :func:`lower_mask` (from iotas, so it also lowers inside Pallas kernels),
  :func:`masked_decay` ``D_ij = exp(b_i − b_j)·[mask]`` masked *before* the exponential
  (nothing overflows however strong the decay), :func:`decay_terms` (``D, γ, λ, Γ`` of one
  chunk of decayed linear attention), the in-chunk cumulative log-decay
  (:func:`cumsum_in_chunks`, :func:`cumsum_by_matmul`), cut-aware so that log-decays
  anywhere in ``[−inf, 0]`` are exact (:func:`cut_threshold`, :func:`segment_cumsum`,
  :func:`segment_decays`, :func:`segmented_reverse_cumsum`);
* **(I + A)⁻¹** for strictly lower-triangular ``A`` — :func:`unit_lower_inverse` (XLA: block
  doubling, analytic JVP) and :func:`unit_lower_inverse_by_products` (inside kernels:
  ``Π_i (I + (−A)^{2^i})`` with the kernel's matmul);
* **per-channel decays** (GLA / Kimi Delta Attention log-decays ``[..., C, K]``) —
  :func:`channel_decays` and :func:`decayed_gram` (the decay inside the ``q·k`` contraction,
  factorised per sub-chunk around a reference point so no exponent is positive);
* **the delta-rule chunk step** (WY / UT form) — :func:`delta_chunk_group` (a group of
  chunks, optionally resetting to per-sequence initial states) and the whole chunked form
  :func:`delta_chunked`, which is also the XLA path that differentiates the delta-rule kernel;
  the same form on token-major inputs with its hand-written reverse mode,
  :func:`delta_chunked_tokens` / :func:`delta_chunked_tokens_bwd` (no whole-sequence layout
  copies).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

# Chunks per group of the chunked delta-rule form (see delta_chunked).
GROUP_CHUNKS = 4


# --------------------------------------------------------------------------- layouts


def num_chunks(T: int, C: int) -> int:
    """``ceil(T / C)``."""
    return -(-T // C)


def pad_time(x, T_pad: int, axis: int = 1):
    """Zero-pad axis ``axis`` of ``x`` to length ``T_pad`` (no-op if it already is)."""
    T = x.shape[axis]
    if T_pad == T:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, T_pad - T)
    return jnp.pad(x, pad)


def chunk_layout(x, C: int):
    """``[B, T, H, ...]`` → ``[B, H, N, C, ...]`` with zero padding of the last chunk."""
    B, T = x.shape[:2]
    N = num_chunks(T, C)
    x = pad_time(x, N * C)
    x = x.reshape((B, N, C) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)


def unchunk_layout(x, T: int):
    """Inverse of :func:`chunk_layout`: ``[B, H, N, C, ...]`` → ``[B, T, H, ...]``."""
    B, H, N, C = x.shape[:4]
    x = jnp.moveaxis(x, 1, 3).reshape((B, N * C, H) + x.shape[4:])
    return x[:, :T]


def scan_layout(x, C: int, groups=None):
    """``[B, T, H, ...]`` → the layout of a ``lax.scan`` over chunks, zero-padded.

    ``groups=None``: ``[N, B, H, C, ...]`` (one chunk per step). ``groups=G``:
    ``[NG, B, H, G, C, ...]`` with ``NG = ceil(N / G)`` (G chunks per step, batched).
    """
    B, T = x.shape[:2]
    N = num_chunks(T, C)
    if groups is None:
        x = pad_time(x, N * C).reshape((B, N, C) + x.shape[2:])
        return jnp.transpose(x, (1, 0, 3, 2) + tuple(range(4, x.ndim)))
    NG = num_chunks(N, groups)
    x = pad_time(x, NG * groups * C)
    x = x.reshape((B, NG, groups, C) + x.shape[2:])
    return jnp.moveaxis(x, (1, 4), (0, 2))


def from_scan_layout(y, T: int):
    """Inverse of :func:`scan_layout` (either form, told apart by rank) for per-token
    outputs ``[N, B, H, C, V]`` / ``[NG, B, H, G, C, V]`` → ``[B, T, H, V]``."""
    if y.ndim == 5:
        N, B, H, C, V = y.shape
        return jnp.transpose(y, (1, 0, 3, 2, 4)).reshape(B, N * C, H, V)[:, :T]
    NG, B, H, G, C, V = y.shape
    return jnp.moveaxis(y, (0, 2), (1, 4)).reshape(B, NG * G * C, H, V)[:, :T]


def group_layout(x, C: int, G: int):
    """``[B, T, H, ...]`` → ``[NG, G, B, H, C, ...]`` (zero-padded): groups of ``G`` chunks
    for a ``lax.scan`` over groups, the chunk axis first inside a group (so the chunk scan
    inside the group slices its leading axis; :func:`delta_chunked`)."""
    B, T = x.shape[:2]
    NG = num_chunks(num_chunks(T, C), G)
    x = pad_time(x, NG * G * C).reshape((B, NG, G, C) + x.shape[2:])
    return jnp.transpose(x, (1, 2, 0, 4, 3) + tuple(range(5, x.ndim)))


def from_group_layout(y, T: int):
    """Inverse of :func:`group_layout` for per-token outputs ``[NG, G, B, H, C, V]`` →
    ``[B, T, H, V]``."""
    NG, G, B, H, C, V = y.shape
    return jnp.transpose(y, (2, 0, 1, 4, 3, 5)).reshape(B, NG * G * C, H, V)[:, :T]


def token_blocks(x, blk: int):
    """``[B, T, H, ...]`` → time-major blocks ``[nb, blk, B, H, ...]`` (zero-padded) for a
    token scan rematerialised per block."""
    T = x.shape[1]
    Tp = num_chunks(T, blk) * blk
    x = jnp.moveaxis(pad_time(x, Tp), 1, 0)
    return x.reshape((Tp // blk, blk) + x.shape[1:])


def from_token_blocks(y, T: int):
    """Inverse of :func:`token_blocks` for outputs: ``[nb, blk, B, H, ...]`` → ``[B, T, H, ...]``."""
    y = y.reshape((y.shape[0] * y.shape[1],) + y.shape[2:])[:T]
    return jnp.moveaxis(y, 0, 1)


def heads_major(x, Tp: int):
    """``[B, T, H, ...]`` → ``[B, H, Tp, ...]`` (zero-padded tokens): the kernels' operand layout."""
    return jnp.swapaxes(pad_time(x, Tp), 1, 2)


def from_heads_major(y, T: int):
    """Inverse of :func:`heads_major`: ``[B, H, Tp, ...]`` → ``[B, T, H, ...]``."""
    return jnp.swapaxes(y, 1, 2)[:, :T]


# --------------------------------------------------------------------------- decay masks


def lower_mask(C: int, strict: bool = False):
    """``[C, C]`` boolean ``j ≤ i`` (``j < i`` if ``strict``), built from iotas (lowers inside
    Pallas kernels too)."""
    rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return cols < rows if strict else cols <= rows


def masked_decay(b_i, b_j, mask, zero_outside: bool = True):
    """``exp(b_i − b_j)`` where ``mask``, else 0 — masked *before* the exponential, so only
    the exponents that are kept (``≤ 0`` for a non-positive log-decay below the diagonal)
    are ever evaluated: no overflow, no ``inf·0``. ``b_i`` / ``b_j`` broadcast as a column
    and a row. ``zero_outside=False`` leaves ``exp(0) = 1`` outside the mask, for a caller
    that masks the product it multiplies anyway (one select fewer)."""
    E = jnp.exp(jnp.where(mask, b_i - b_j, 0.0))
    return jnp.where(mask, E, 0.0) if zero_outside else E


def cut_threshold(dtype) -> float:
    """``L`` such that ``exp(x)`` rounds to exactly 0 in ``dtype`` for every ``x ≤ −L``
    (``−log`` of the smallest subnormal, plus 2: ≈ 105.3 in float32, ≈ 746.4 in float64).

    A token whose log-decay is ``≤ −L`` (``−inf`` included) is a *cut*: its decay factor
    ``exp(g_t)`` is exactly 0 in the recurrence, so it erases the state before it, and every
    cumulative decay through it, ``exp(g_t + Σ others)`` with the others ``≤ 0``, is exactly
    0 as well. The chunked forms therefore treat a cut as a hard reset (a mask) instead of
    adding ``g_t`` into a cumulative sum, which would produce ``inf − inf`` (``−inf``) or
    destroy the precision of every later difference ``b_i − b_j`` (``−1e6`` in float32):
    docs/linear_attention.md, "chunked form"."""
    return -math.log(float(jnp.finfo(dtype).smallest_subnormal)) + 2.0


def segment_cumsum(g, by_matmul: bool = False):
    """Cut-aware in-chunk cumulative log-decay over the last axis ``[..., C]``: ``(c, s)``.

    ``c = cumsum(g')`` with ``g' = g`` except 0 at cuts (:func:`cut_threshold`), and
    ``s = cumsum([cut])`` the segment index of each token (a float count). For ``j ≤ i`` the
    true cumulative decay ``exp(b_i − b_j)`` (``b = cumsum(g)``) equals
    ``exp(c_i − c_j)·[s_i = s_j]`` exactly: with no cut in ``(j, i]`` the two exponents are
    the same sum, and with one it is exactly 0. Likewise ``exp(b_i) = exp(c_i)·[s_i = 0]``.
    Every ``c`` is finite (``|c| ≤ C·L``) and every exponent used is ``≤ 0`` for ``g ≤ 0``.
    Gradients: the derivative of the result w.r.t. a cut's ``g_t`` is exactly 0 (``d/dg
    exp(g) = exp(g) = 0`` there), which is what flows through ``g'`` (no ``inf·0``).
    ``by_matmul``: cumulative sums as :func:`cumsum_by_matmul`."""
    cut = g <= -cut_threshold(g.dtype)
    gp = jnp.where(cut, jnp.zeros_like(g), g)
    cutf = cut.astype(g.dtype)
    if by_matmul:
        return cumsum_by_matmul(gp), cumsum_by_matmul(cutf)
    return jnp.cumsum(gp, axis=-1), jnp.cumsum(cutf, axis=-1)


def cumsum_in_chunks(g, C: int):
    """In-chunk cut-aware cumulative log-decay (:func:`segment_cumsum`) of a ``[B, T, H]``
    log-decay: ``(c, s)``, each ``[B, Tp, H]`` with ``Tp = N·C`` (padded tokens add 0)."""
    B, T, H = g.shape
    Tp = num_chunks(T, C) * C
    g = pad_time(g, Tp)
    c, s = segment_cumsum(jnp.moveaxis(g.reshape(B, Tp // C, C, H), 2, -1))
    back = lambda x: jnp.moveaxis(x, -1, 2).reshape(B, Tp, H)  # noqa: E731
    return back(c), back(s)


def cumsum_by_matmul(g):
    """Inclusive cumulative sum over the last axis ``[..., C]`` as a matmul with the
    upper-triangular ones matrix (on XLA:CPU ``jnp.cumsum``'s reduce-window fused badly into
    the ``C × C`` exponentials that follow; this measured ~15-20 % faster in the delta rule)."""
    C = g.shape[-1]
    return jnp.matmul(g, jnp.triu(jnp.ones((C, C), g.dtype)))


def segment_decays(c, s, cC=None, sC=None):
    """From :func:`segment_cumsum` ``(c, s)`` of one chunk ``[..., C]``: the mask of pairs
    ``j ≤ i`` in the same segment ``[..., C, C]``, ``γ_i = exp(b_i)`` (chunk start to token
    i), ``λ_j = exp(b_C − b_j)`` (token j to the chunk end) and ``Γ = exp(b_C)`` ``[...]``,
    all exact for cuts (0 across one) and ``≤ 1`` for ``g ≤ 0``. ``cC`` / ``sC`` default to
    the last entries (a caller holding them as columns passes them)."""
    C = c.shape[-1]
    cC = c[..., -1] if cC is None else cC
    sC = s[..., -1] if sC is None else sC
    mask = lower_mask(C) & (s[..., :, None] == s[..., None, :])
    gamma = jnp.where(s == 0, jnp.exp(c), 0.0)
    lam = jnp.where(s == sC[..., None], jnp.exp(cC[..., None] - c), 0.0)
    Gam = jnp.where(sC == 0, jnp.exp(cC), 0.0)
    return mask, gamma, lam, Gam


def decay_terms(gn):
    """One chunk of decayed linear attention from its log-decays ``gn [..., C]``:
    ``(D, γ, λ, Γ)`` with ``b = cumsum(gn)``, ``D_ij = exp(b_i − b_j)·[j ≤ i]``,
    ``γ_i = exp(b_i)`` (chunk start to token i, inclusive), ``λ_j = exp(b_C − b_j)`` (token j,
    exclusive, to the chunk end) and ``Γ = exp(b_C)``; all ≤ 1 for ``g ≤ 0``. Computed
    cut-aware (:func:`segment_cumsum`): exact for any log-decay in ``[−inf, 0]``; the
    derivatives are w.r.t. ``c`` (the caller maps them to ``g`` with :func:`cut_grad`).
    The cumulative sums are matmuls (:func:`cumsum_by_matmul`: ~15 % less CPU time for the
    decayed linear-attention forward than ``jnp.cumsum`` on this CPU)."""
    c, s = segment_cumsum(gn, by_matmul=True)
    mask, gamma, lam, Gam = segment_decays(c, s)
    D = masked_decay(c[..., :, None], c[..., None, :], mask)
    return D, gamma, lam, Gam


def reverse_cumsum_by_matmul(x):
    """Inclusive reverse cumulative sum over the last axis ``[..., C]``,
    ``r_j = Σ_{i ≥ j} x_i``, as a matmul with the lower-triangular ones matrix (the
    transpose of :func:`cumsum_by_matmul`)."""
    C = x.shape[-1]
    return jnp.matmul(x, jnp.tril(jnp.ones((C, C), x.dtype)))


def cut_grad(dg, g):
    """The log-decay gradient at cuts is exactly 0 (:func:`segment_cumsum`): ``dg`` with
    those entries zeroed (a hand-written backward that differentiates w.r.t. ``c``)."""
    return jnp.where(g <= -cut_threshold(g.dtype), jnp.zeros_like(dg), dg)


def segmented_reverse_cumsum(x, cut, axis: int = -1):
    """``y_t = Σ_{t ≤ s < t'} x_s`` with ``t'`` the first cut after ``t`` (the whole tail if
    none), and ``y_t = 0`` at cuts: the log-decay gradient of a global cumulative log-decay
    whose cuts are hard resets (a perturbation of ``g_t`` moves ``b_s`` for ``t ≤ s`` but
    reaches nothing past a cut). A ``lax.associative_scan``, no differences of sums."""
    x = jnp.moveaxis(x, axis, -1)
    cut = jnp.moveaxis(cut, axis, -1)
    # reversed order: position p starts a new segment if the token after it (p − 1 reversed) is a cut
    xr = jnp.flip(x, -1)
    start = jnp.flip(jnp.concatenate([cut[..., 1:], jnp.zeros_like(cut[..., :1])], -1), -1)

    def combine(a, b):
        a1, f1 = a
        a2, f2 = b
        return jnp.where(f2, a2, a1 + a2), f1 | f2

    y, _ = lax.associative_scan(combine, (xr, start), axis=x.ndim - 1)
    y = jnp.where(cut, jnp.zeros_like(x), jnp.flip(y, -1))
    return jnp.moveaxis(y, -1, axis)


# --------------------------------------------------------------------------- per-channel decays

# Tokens per sub-chunk of decayed_gram: the reference point of the factorised off-diagonal
# blocks sits between sub-chunks; only the diagonal sub-chunk blocks form [sub, sub, K].
SUB_CHUNK = 16


def channel_decays(g):
    """Cut-aware per-channel decays of one chunk from its log-decays ``g [..., C, K]`` (the
    cumulative sums run over the token axis ``C``, channel by channel).

    Returns ``(c, s, γ, λ, Γ)``: :func:`segment_cumsum` per channel ``c, s [..., C, K]``;
    ``γ_i = exp(b_i)`` (chunk start to token i, inclusive) and ``λ_j = exp(b_C − b_j)`` (token
    j, exclusive, to the chunk end) ``[..., C, K]``; ``Γ = exp(b_C)`` ``[..., K]`` — the
    per-channel versions of :func:`segment_decays`, exact for cuts, ``≤ 1`` for ``g ≤ 0``."""
    cut = g <= -cut_threshold(g.dtype)
    c = jnp.cumsum(jnp.where(cut, jnp.zeros_like(g), g), axis=-2)
    s = jnp.cumsum(cut.astype(g.dtype), axis=-2)
    cC, sC = c[..., -1:, :], s[..., -1:, :]
    gamma = jnp.where(s == 0, jnp.exp(c), 0.0)
    lam = jnp.where(s == sC, jnp.exp(jnp.where(s == sC, cC - c, 0.0)), 0.0)
    Gam = jnp.where(sC == 0, jnp.exp(cC), 0.0)[..., 0, :]
    return c, s, gamma, lam, Gam


def decayed_gram(x, y, c, s, *, strict: bool = False, sub=None):
    """``G_ij = [j ≤ i] Σ_κ x_iκ y_jκ exp(b_iκ − b_jκ)`` (``j < i`` if ``strict``) of one chunk
    with a per-channel cumulative log-decay, cut-aware (``(c, s)`` from :func:`channel_decays`:
    ``exp(b_iκ − b_jκ) = exp(c_iκ − c_jκ)·[s_iκ = s_jκ]``). ``x, y, c, s [..., C, K]`` →
    ``[..., C, C]``; ``sub`` tokens per sub-chunk (default :data:`SUB_CHUNK`, read at call time).

    The decay sits inside the contraction, so it cannot be one mask on ``x yᵀ``, and the
    textbook factorisation ``(x ⊙ e^{b}) (y ⊙ e^{−b})ᵀ`` overflows (``e^{−b}`` grows without
    bound along the chunk). Instead the chunk is cut into sub-chunks of ``sub`` tokens
    (Yang et al., 2023, "Gated Linear Attention Transformers with Hardware-Efficient
    Training", §4.2, secondary chunking):

    * a block of rows ``I`` below a column sub-chunk ``J`` uses the reference point ``r``,
      the cumulative decay at the last token of ``J``:
      ``exp(b_i − b_j) = exp(b_i − r) · exp(r − b_j)`` with both exponents ``≤ 0`` (``i`` is
      after ``r``, ``j`` at or before it), so each block is one matmul of rescaled rows and
      columns and no factor exceeds 1 (a factor that underflows to 0 makes the true product
      underflow as well). Segments are monotone, so ``[s_i = s_j] = [s_i = s_r]·[s_r = s_j]``;
    * the diagonal sub-chunk blocks take the exact ``[sub, sub, K]`` exponentials, masked
      before the exponential (:func:`masked_decay`).

    Every exponent evaluated is ``≤ 0`` for ``g ≤ 0``; differentiable by autodiff (no
    ``inf·0``: masked entries never reach an exponential)."""
    C, K = x.shape[-2:]
    sub = max(1, min(SUB_CHUNK if sub is None else sub, C))
    n = num_chunks(C, sub)
    Cp = n * sub
    if Cp != C:  # zero rows/columns; decays continued flat (every exponent stays <= 0)
        padz = [(0, 0)] * (x.ndim - 2) + [(0, Cp - C), (0, 0)]
        x, y = jnp.pad(x, padz), jnp.pad(y, padz)
        c, s = jnp.pad(c, padz, mode="edge"), jnp.pad(s, padz, mode="edge")
    batch = x.shape[:-2]
    blk = lambda a: a.reshape(batch + (n, sub, K))  # noqa: E731
    xb, yb, cb, sb = blk(x), blk(y), blk(c), blk(s)
    # diagonal sub-chunk blocks: exact per-channel exponents [.., n, sub, sub, K]
    m = lower_mask(sub, strict)[:, :, None] & (sb[..., :, None, :] == sb[..., None, :, :])
    E = masked_decay(cb[..., :, None, :], cb[..., None, :, :], m)
    Gd = jnp.sum(xb[..., :, None, :] * yb[..., None, :, :] * E, axis=-1)  # [.., n, sub, sub]
    if n == 1:
        return Gd[..., 0, :C, :C]
    # blocks below the diagonal: reference point r_J = c at the last token of sub-chunk J
    r, rs = cb[..., :, -1, :], sb[..., :, -1, :]  # [.., n, K]
    after = (jnp.arange(Cp)[None, :] // sub) > jnp.arange(n)[:, None]  # [n, Cp]: row i after J
    mrow = after[:, :, None] & (s[..., None, :, :] == rs[..., :, None, :])  # [.., n, Cp, K]
    xs = x[..., None, :, :] * masked_decay(c[..., None, :, :], r[..., :, None, :], mrow)
    ys = yb * masked_decay(r[..., :, None, :], cb, sb == rs[..., :, None, :])  # [.., n, sub, K]
    G = jnp.einsum("...Jik,...Jjk->...iJj", xs, ys).reshape(batch + (Cp, Cp))
    G = G + jnp.einsum("...Iij,IJ->...IiJj", Gd, jnp.eye(n, dtype=Gd.dtype)).reshape(batch + (Cp, Cp))
    return G[..., :C, :C]


# --------------------------------------------------------------------------- (I + A)^-1


# Size of the diagonal blocks of (I + A)^-1 that _inverse_by_doubling computes by forward
# substitution before doubling with matmuls.
_SUBST_BLOCK = 8


def _diagonal_blocks(A, b: int, off: int = 0):
    """The ``C // b`` blocks ``A[j·b + off : j·b + off + b − off, j·b : j·b + b − off]`` of
    ``[..., C, C]``, stacked ``[..., C // b, b − off, b − off]`` (static slices):
    ``off = 0`` the diagonal blocks of size ``b``, ``off = b / 2`` their lower-left corners."""
    C = A.shape[-1]
    w = b - off
    return jnp.stack([A[..., j * b + off:j * b + off + w, j * b:j * b + w] for j in range(C // b)], -3)


def _inverse_by_doubling(A):
    """``(I + A)⁻¹`` for strictly lower-triangular ``A`` ``[..., C, C]``, by block doubling.

    A unit lower-triangular matrix ``[[L11, 0], [L21, L22]]`` has inverse
    ``[[L11⁻¹, 0], [−L22⁻¹ L21 L11⁻¹, L22⁻¹]]``. The inverses of the diagonal blocks of size
    ``b = _SUBST_BLOCK`` (8) come first, by forward substitution (row ``i`` of the inverse is
    ``e_i − Σ_{j<i} A_ij · row_j``: elementwise products over every block at once); each
    level then merges pairs of diagonal blocks of size s into blocks of size 2s with two
    batched matmuls; ``log2 (C / b)`` levels, ≈ (2/3) C³ flops per matrix. (XLA:CPU's
    batched ``triangular_solve`` was ~40× slower than this on the benchmark shapes, and its
    compile took seconds; doubling from 1×1 blocks spent most of its time in the 1×1 … 4×4
    matmuls: ~1.7× the CPU time of this at C = 64.) C is zero-padded to a power of two;
    padded rows/columns stay identity.
    """
    C = A.shape[-1]
    Cp = 1 << max(0, (C - 1).bit_length())
    if Cp != C:
        A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, Cp - C), (0, Cp - C)])
    batch = A.shape[:-2]
    b = min(_SUBST_BLOCK, Cp)
    Ab = _diagonal_blocks(A, b)  # [..., Cp / b, b, b]
    eye = jnp.eye(b, dtype=A.dtype)
    rows = [jnp.broadcast_to(eye[0], Ab.shape[:-1])]
    for i in range(1, b):
        rows.append(eye[i] - sum(Ab[..., i, j:j + 1] * rows[j] for j in range(i)))
    D = jnp.stack(rows, -2)  # inverses of the diagonal blocks, size s
    s = b
    while s < Cp:
        m = Cp // (2 * s)
        L21 = _diagonal_blocks(A, 2 * s, off=s)  # [..., m, s, s] lower-left corners
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
    """``T = (I + A)⁻¹`` for strictly lower-triangular ``A`` (the UT transform's matrix), in XLA.

    Block doubling (:func:`_inverse_by_doubling`), differentiated analytically,
    ``dT = −T dA T`` (so reverse mode is two matmuls and does not store the doubling
    levels). ``A`` must be strictly lower triangular (the caller masks it): the forward
    reads only that part, the JVP formula assumes it.
    """
    return _inverse_by_doubling(A)


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    (A,), (dA,) = primals, tangents
    T = unit_lower_inverse(A)
    return T, -jnp.matmul(jnp.matmul(T, dA), T)


def unit_lower_inverse_by_products(A, dot):
    """``(I + A)⁻¹`` of one strictly lower-triangular ``[C, C]`` matrix inside a kernel:
    ``Σ_n (−A)ⁿ = Π_i (I + (−A)^{2^i})`` (``A`` is nilpotent, so ``log2 C`` factors), with
    ``dot(a, b)`` the kernel's matmul. Only 2-D iotas, adds and matmuls: it lowers with
    Triton and Mosaic. (≈ 4C³ flops per doubling, ``log2 C − 1`` doublings; the XLA forms use
    :func:`unit_lower_inverse`, ≈ (2/3)C³ flops in all.)"""
    C = A.shape[0]
    eye = (lax.broadcasted_iota(jnp.int32, (C, C), 0) == lax.broadcasted_iota(jnp.int32, (C, C), 1)).astype(A.dtype)
    X = -A
    R = eye + X
    n = 2
    while n < C:
        X = dot(X, X)
        R = dot(R, eye + X)
        n *= 2
    return R


# --------------------------------------------------------------------------- delta rule chunk step


# The chunk scan inside a group of at most this many chunks is unrolled (_delta_group_tail),
# by delta_chunked only for sequences of at least _UNROLL_MIN_CHUNKS chunks: unrolling cuts
# the run time of long sequences but adds compile time, which short ones would not win back.
_UNROLL_MAX = 8
_UNROLL_MIN_CHUNKS = 16


def delta_chunk_group(qc, kc, vc, bc, gc, S0, first=None, seq=None, h0=None, unroll=None):
    """One group of chunks of the (gated) delta rule, WY / UT form; tensors ``[B, H, G, C, ·]``
    (β and log-decay ``[B, H, G, C]``, ``gc`` may be ``None``), ``q`` already scaled.

    Inside chunk n, with ``S`` the state before it and ``b`` the in-chunk inclusive
    cumulative log-decay (docs/linear_attention.md, "delta rule"; Yang et al., 2024,
    "Parallelizing Linear Transformers with the Delta Rule over Sequence Length")::

        (I + A) U = β V − (β e^b K) S,   A_ij = [j < i] β_i e^{b_i − b_j} k_i·k_j
        [W_v, W_k] = (I + A)⁻¹ [β V, β e^b K],   U = W_v − W_k S
        o = (e^b Q − P W_k) S + P W_v,    P_ij = [j ≤ i] e^{b_i − b_j} q_i·k_j
        S_new = (e^{b_C} I − K̃ᵀ W_k) S + K̃ᵀ W_v =: M_n S + D_n,   K̃ = e^{b_C − b} K

    ``A``, ``P`` and ``(I + A)⁻¹`` are batched over the group's chunks; a scan over them
    (:func:`_delta_group_tail`) computes ``U = (I + A)⁻¹ (β V − (β e^b K) S)`` (that is
    ``W_v − W_k S``), the outputs ``o = e^b Q S + P U`` and ``S ← e^{b_C} S + K̃ᵀ U`` (that is
    ``M_n S + D_n``). Returns
    ``(S after the group, o [B, H, G, C, V])``. With ``first [G]``, ``seq [G]`` and
    ``h0 [Ns, B, H, K, V]`` (packed sequences) the chunks with ``first`` set start from
    ``h0[seq]``, and the state after every chunk ``[G, B, H, K, V]`` is returned as a third
    output.

    Per-channel log-decay (``gc [B, H, G, C, K]``, Kimi Delta Attention: the state decays
    per key channel, ``S ← diag(e^{g_t}) S`` before the delta step): the same equations with
    ``e^{b}`` a row per token multiplying keys and queries channel-wise, ``e^{b_C} I`` the
    diagonal ``diag(e^{b_C})``, and the decay inside the contractions,
    ``A_ij = [j < i] β_i Σ_κ k_iκ k_jκ e^{b_iκ − b_jκ}``, ``P_ij = [j ≤ i] Σ_κ q_iκ k_jκ e^{b_iκ − b_jκ}``
    (:func:`decayed_gram`; :func:`channel_decays` for ``γ, λ, Γ``).

    ``unroll``: unroll the scan over the group's chunks (default: for groups of at most
    ``_UNROLL_MAX`` chunks; :func:`delta_chunked` passes it).

    CPU notes: every product is a batched matmul with the batch axes leading; products
    are not concatenated (the copies cost more than the extra dot launches); ``(I + A)⁻¹``
    by block doubling (:func:`unit_lower_inverse`), not ``triangular_solve``.
    :func:`delta_chunked` keeps its groups chunk-axis-first (``[G, B, H, C, ·]``,
    :func:`group_layout`), so the chunk scan slices a leading axis instead of transposing
    its operands; this function moves the chunk axis of its ``[B, H, G, C, ·]`` arguments.
    """
    first_ = lambda x: None if x is None else jnp.moveaxis(x, 2, 0)  # noqa: E731  [G, B, H, C, ·]
    out = _chunks_first_group(*(first_(x) for x in (qc, kc, vc, bc, gc)), S0, first, seq, h0, unroll)
    return (out[0], jnp.moveaxis(out[1], 0, 2)) + out[2:]


def _chunks_first_group(qc, kc, vc, bc, gc, S0, first=None, seq=None, h0=None, unroll=None):
    """:func:`delta_chunk_group` on tensors with the chunk axis first, ``[G, B, H, C, ·]``
    (the layout :func:`delta_chunked` scans: no transposes inside a group); returns
    ``o [G, B, H, C, V]``."""
    bc = bc[..., None]  # [G,B,H,C,1]
    P, A, rhs_k, Kt, Qt0, state_decay = delta_chunk_terms(qc, kc, bc, gc)
    return _delta_group_tail(P, A, bc, vc, rhs_k, Kt, Qt0, state_decay, S0, first, seq, h0, unroll)


def delta_chunk_terms(qc, kc, bc, gc):
    """The decay terms of :func:`delta_chunk_group` for a group of chunks ``[B, H, G, C, ·]``
    (any leading axes: only the trailing ``C`` and head-dim axes are read; ``bc`` = β
    ``[B, H, G, C, 1]``; ``qc`` scaled, or ``None`` when only the chunk maps are
    needed): ``(P, A, β e^b K, K̃, e^b Q, state_decay)`` in its notation, ``P`` and ``e^b Q``
    ``None`` without ``qc``; ``state_decay`` is ``e^{b_C}`` ``[B, H, G, 1, 1]``,
    ``diag(e^{b_C})`` as ``[B, H, G, K, 1]`` (per-channel log-decay) or ``None`` (no decay)."""
    C = kc.shape[-2]
    incl = lower_mask(C)  # j <= i
    strict = lower_mask(C, strict=True)  # j < i
    if gc is not None and gc.ndim == kc.ndim:
        # per-channel log-decay [B,H,G,C,K] (Kimi Delta Attention): the decay sits inside
        # the contractions of P and A (decayed_gram); γ, λ, Γ are per channel
        c, s, gamma, lam, Gam = channel_decays(gc)
        P = None if qc is None else decayed_gram(qc, kc, c, s)
        A = decayed_gram(kc, kc, c, s, strict=True) * bc
        Qt0 = None if qc is None else gamma * qc
        return P, A, bc * gamma * kc, lam * kc, Qt0, Gam[..., :, None]
    kT = jnp.swapaxes(kc, -1, -2)  # [B,H,G,K,C]
    QK = None if qc is None else jnp.matmul(qc, kT)  # q_i·k_j
    KK = jnp.matmul(kc, kT)  # k_i·k_j
    if gc is None:
        P = None if qc is None else jnp.where(incl, QK, 0.0)
        return P, jnp.where(strict, KK, 0.0) * bc, bc * kc, kc, qc, None
    # cut-aware cumulative log-decay (segment_cumsum): exact for g in [-inf, 0]
    c, s = segment_cumsum(gc, by_matmul=True)  # [B,H,G,C]
    same, gamma, lam, Gam = segment_decays(c, s)
    E = masked_decay(c[..., :, None], c[..., None, :], same, zero_outside=False)
    P = None if qc is None else jnp.where(same, QK * E, 0.0)
    A = jnp.where(strict & same, KK * E, 0.0) * bc
    eb = gamma[..., None]  # e^{b_i} ≤ 1
    Qt0 = None if qc is None else eb * qc
    # K̃ = e^{b_C − b_j} k_j (exponent ≤ 0); the state decays by e^{b_C}
    return P, A, (bc * eb) * kc, lam[..., None] * kc, Qt0, Gam[..., None, None]


def _delta_group_tail(P, A, bc, vc, rhs_k, Kt, Qt0, state_decay, S0, first, seq, h0, unroll=None):
    """The part of :func:`delta_chunk_group` after the decay terms (shared by the per-head
    and the per-channel log-decay), on tensors with the chunk axis first, ``[G, B, H, C, ·]``;
    ``state_decay`` multiplies the state: ``e^{b_C}`` ``[G, B, H, 1, 1]``, ``diag(e^{b_C})``
    as ``[G, B, H, K, 1]``, or ``None``.

    ``(I + A)⁻¹`` for the whole group, then a scan over its chunks that carries S and keeps
    ``U = (I + A)⁻¹ (β V − (β e^b K) S)`` (that is ``W_v − W_k S``) and the outputs
    ``o = e^b Q S + P U``, with ``S ← e^{b_C} S + K̃ᵀ U`` (that is ``M_n S + D_n``): five
    matmuls per chunk. Forming ``W_v`` and ``W_k`` first takes one more per chunk (``W_v``,
    ``W_k``, ``W_k S``), forming ``M_n``, ``D_n`` and ``P W_k`` three more. The scan is
    unrolled (a Python loop over the leading chunk axis: no loop, no stacking of states) if
    ``unroll``, by default for a group of at most ``_UNROLL_MAX`` chunks. Returns
    ``(S after the group, o [G, B, H, C, V])`` and, with ``first``, the state after every
    chunk ``[G, B, H, K, V]``."""
    Tinv = unit_lower_inverse(A)
    xs = (Tinv, bc * vc, rhs_k, Kt, Qt0, P, state_decay, first, seq)

    def step(S, x):
        tinv, bv, rk, kt, qt, p, sdec, f, n = x
        if f is not None:  # the first chunk of a packed sequence starts from its own state
            S = jnp.where(f, lax.dynamic_index_in_dim(h0, n, 0, keepdims=False), S)
        U = jnp.matmul(tinv, bv - jnp.matmul(rk, S))
        o = jnp.matmul(qt, S) + jnp.matmul(p, U)
        S_next = (S if sdec is None else sdec * S) + jnp.einsum("...ck,...cv->...kv", kt, U)
        return S_next, (o, S_next)

    G = Tinv.shape[0]
    if unroll is None:
        unroll = G <= _UNROLL_MAX
    if unroll:
        S, outs = S0, []
        for i in range(G):
            S, out = step(S, tuple(None if x is None else x[i] for x in xs))
            outs.append(out)
        o, S_after = (jnp.stack(y) for y in zip(*outs))
        S_final = S
    else:
        S_final, (o, S_after) = lax.scan(step, S0, xs)
    if first is None:
        return S_final, o
    return S_final, o, S_after


def delta_chunked(q, k, v, beta, g, S0, chunk_size: int, group=None, remat: bool = True):
    """The chunked (gated) delta rule on ``[B, T, H, ·]`` inputs (``q`` already scaled, all in
    the accumulation dtype; ``g`` may be ``None``, ``[B, T, H]`` or per channel ``[B, T, H, K]``):
    returns ``(o [B, T, H, V], S_T)``.

    The N chunks are processed in groups of ``group`` chunks (default :data:`GROUP_CHUNKS`;
    a ``lax.scan`` over groups carrying S): inside a group everything is batched over its
    chunks (:func:`delta_chunk_group`), so the ``[B, H, G, C, C]`` intermediates stay
    cache-sized instead of growing with T (on this CPU, T = 8192, measured under shared
    load: ≈2× faster forward and ≈1.6× faster forward+backward than one all-chunks batch).
    With ``remat`` the group body is rematerialised, so the backward pass stores one state
    per group rather than every ``C × C`` intermediate. Padded tokens have β = g = k = 0.
    """
    T = q.shape[1]
    C = min(chunk_size, T)
    G = min(group or GROUP_CHUNKS, num_chunks(T, C))
    unroll = G <= _UNROLL_MAX and num_chunks(T, C) >= _UNROLL_MIN_CHUNKS
    xs = tuple(None if x is None else group_layout(x, C, G) for x in (q, k, v, beta, g))  # [NG, G, B, H, C, ·]

    def body(S, x):
        return _chunks_first_group(*x, S, unroll=unroll)

    if remat:
        body = jax.checkpoint(body)
    S_final, o = lax.scan(body, S0, xs)  # o: [NG, G, B, H, C, V]
    return from_group_layout(o, T), S_final


def _token_groups(T: int, chunk_size: int, group):
    """The chunk and group choices of :func:`delta_chunked` for ``T`` tokens:
    ``(C, G, unroll, NG, L, Tp)`` with ``L = G·C`` tokens per group and ``Tp = NG·L``."""
    C = min(chunk_size, T)
    N = num_chunks(T, C)
    G = min(group or GROUP_CHUNKS, N)
    NG = num_chunks(N, G)
    return C, G, G <= _UNROLL_MAX and N >= _UNROLL_MIN_CHUNKS, NG, G * C, NG * G * C


def _token_group_step(C, G, unroll, scale=None):
    """One group of :func:`delta_chunked` on token-major slices: ``step(S, q, k, v, β, g)``
    with ``[B, G·C, H, ·]`` slices (``g`` may be ``None``; ``q`` multiplied by ``scale`` here
    unless it is ``None``) → ``(S after the group, o [B, G·C, H, V])``. The transposes to the
    group's ``[G, B, H, C, ·]`` and back are cache-sized."""

    def grouped(x):  # [B, G·C, H, ·] -> [G, B, H, C, ·]
        if x is None:
            return None
        y = x.reshape((x.shape[0], G, C) + x.shape[2:])
        return jnp.transpose(y, (1, 0, 3, 2) + tuple(range(4, y.ndim)))

    def step(S, q, k, v, beta, g):
        if scale is not None:
            q = q * jnp.asarray(scale, q.dtype)
        S, on = _chunks_first_group(*(grouped(x) for x in (q, k, v, beta, g)), S, unroll=unroll)
        Gn, B, H, Cn, V = on.shape
        return S, jnp.transpose(on, (1, 0, 3, 2, 4)).reshape(B, Gn * Cn, H, V)

    return step


def _varying_zero(*xs):
    """A float zero scalar that varies over every mesh axis any of ``xs`` varies over (under
    ``shard_map``; a plain zero otherwise): added to a loop-carried buffer so its type holds
    whatever the loop body writes into it."""
    return sum(jnp.zeros_like(x.reshape(-1)[:1]).sum() for x in xs if x is not None)


def delta_chunked_tokens(q, k, v, beta, g, S0, chunk_size: int, group=None, *, scale=None,
                         keep_states: bool = False):
    """The forward of :func:`delta_chunked` (same arguments, chunks, groups and step, same
    results) on token-major inputs ``[B, T, H, ·]``: each step of the scan over groups slices
    its ``G·C`` tokens straight from ``[B, Tp, H, ·]`` (``lax.dynamic_slice``, a cache-sized
    transpose to ``[G, B, H, C, ·]``) and writes its outputs into a carried ``[B, Tp, H, V]``
    buffer in place (``lax.dynamic_update_slice``), instead of laying the whole sequence out
    in :func:`group_layout` and back (copies that leave the cache at long T:
    docs/implementations.md, "The chunked forms on a CPU host"). Not differentiable by
    autodiff (per-step slicing of closed-over inputs would accumulate full-size cotangent
    buffers): its reverse mode is :func:`delta_chunked_tokens_bwd`, from the states kept
    with ``keep_states``. ``g``: ``None`` or ``[B, T, H]`` (a per-channel log-decay works
    too: every input is sliced alike). ``scale``: if given, ``q`` is unscaled and each
    group's queries are multiplied by it (no whole-sequence pass).

    Returns ``(o [B, T, H, V], S_T)``, and with ``keep_states`` also the state before every
    group ``[NG, B, H, K, V]``."""
    B, T = q.shape[:2]
    C, G, unroll, NG, L, Tp = _token_groups(T, chunk_size, group)
    xs = tuple(None if x is None else pad_time(x, Tp) for x in (q, k, v, beta, g))
    step = _token_group_step(C, G, unroll, scale)

    def body(carry, n):
        S, o = carry
        t0 = n * L
        S_next, on = step(S, *(None if x is None else lax.dynamic_slice_in_dim(x, t0, L, axis=1) for x in xs))
        return (S_next, lax.dynamic_update_slice_in_dim(o, on.astype(o.dtype), t0, axis=1)), (S if keep_states else None)

    # under shard_map the carries vary over every mesh axis any input varies over
    vz = _varying_zero(*xs, S0)
    (S_final, o), S_groups = lax.scan(body, (S0 + vz, jnp.zeros_like(xs[2]) + vz), jnp.arange(NG))
    return (o[:, :T], S_final) + ((S_groups,) if keep_states else ())


def delta_chunked_tokens_bwd(q, k, v, beta, g, S_groups, do, dS, chunk_size: int, group=None, *,
                             scale=None):
    """Reverse mode of :func:`delta_chunked_tokens` from the states it kept before every group
    (``S_groups [NG, B, H, K, V]``; the other arguments as there, ``do [B, T, H, V]`` and
    ``dS [B, H, K, V]`` the cotangents of the outputs and the final state).

    A reverse scan over the groups: each group's ``G·C`` tokens are sliced from the
    token-major inputs and the group step is recomputed from its stored start state and
    differentiated (``jax.vjp`` of the step: the decay terms, the ``(I + A)⁻¹`` of its chunks,
    the chunk scan; what autodiff of :func:`delta_chunked`'s rematerialised scan computes for a
    group), and its input cotangents are written into ``[B, Tp, H, ·]`` buffers in place — no
    whole-sequence layout copies of the inputs, of ``do`` or of the gradients. Returns
    ``(dq, dk, dv, dβ, dg or None, dS_0)`` (``dq`` w.r.t. the unscaled ``q`` if ``scale`` is
    given)."""
    B, T = q.shape[:2]
    C, G, unroll, NG, L, Tp = _token_groups(T, chunk_size, group)
    xs = tuple(None if x is None else pad_time(x, Tp) for x in (q, k, v, beta, g))
    dop = pad_time(do, Tp)
    step = _token_group_step(C, G, unroll, scale)
    vz = _varying_zero(*xs, S_groups, dop, dS)  # the state's cotangent varies like the state

    def sl(x, t0):
        return None if x is None else lax.dynamic_slice_in_dim(x, t0, L, axis=1)

    def body(carry, x):
        dS, bufs = carry
        n, S = x
        t0 = n * L
        _, vjp = jax.vjp(step, S, *(sl(x, t0) for x in xs))
        dS_prev, *dx = vjp((dS, sl(dop, t0)))
        bufs = tuple(None if b is None else lax.dynamic_update_slice_in_dim(b, d.astype(b.dtype), t0, axis=1)
                     for b, d in zip(bufs, dx))
        return (dS_prev + vz, bufs), None

    # every element is overwritten (the groups tile [0, Tp)); distinct fill values keep XLA
    # from sharing one buffer among the gradients and copying it for each. Each buffer has
    # its input's type under shard_map, as the cotangents jax.vjp gives for the slices
    bufs = tuple(None if x is None else jnp.full_like(x, i + 1.0) for i, x in enumerate(xs))
    (dS0, bufs), _ = lax.scan(body, (dS + vz, bufs), (jnp.arange(NG), S_groups), reverse=True)
    return tuple(None if b is None else b[:, :T] for b in bufs) + (dS0,)
