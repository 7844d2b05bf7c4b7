"""Segment-aligned streaming for rules that update their fast weights once per segment.

TTT (mini-batches of ``C`` tokens, docs/rules/ttt.md) and Titans (TTT batches, docs/rules/titans.md) take every
inner gradient of a segment at the segment's *initial* weights. A trailing partial
segment therefore cannot be folded into the state: the next tokens of the same segment
still need the gradients at the segment's initial weights. The decoding cache thus holds
the state at the last segment boundary plus the per-token inputs of the partial segment
(at most ``P − 1`` tokens, ``n`` of them valid). A call re-runs that partial segment
together with the new tokens, so any split of a sequence threaded through the cache
gives the outputs and state of one call (the mixer protocol's invariant).

Shapes are static under ``jit``: the valid buffer prefix ``n`` is a traced ``[B]`` int.
The ``n`` buffered and ``T`` new tokens are gathered into one left-aligned stream of
``nb·P`` tokens (zero padding after them), ``step`` runs over its ``nb`` segments in a
``lax.scan``, the state after segment ``m = (n + T) // P`` is kept (selected inside the
scan, so no per-segment states are stored) and the new buffer is the tail after it.
Padding tokens come after every valid token, so causality keeps them out of every valid
output; they reach only states after segment ``m``, which are discarded.

Without a cache (training, prefill from scratch) nothing is buffered: the leading whole
segments go through the rule in one call (its own scan) and the remainder in a second
call, with no padding and no gather.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from tttla_jax.parallel import context as _sp


def run_segments(step: Callable, state, xs: Sequence, bufs: Sequence, n, period: int, *,
                 empty: bool = False):
    """Stream ``xs`` through ``step`` in segments of ``period`` tokens.

    Args:
      step: ``step(state, seg) -> (state', out)`` with ``seg`` a tuple of ``[B, L, ...]``
        arrays (one per input) and ``out`` ``[B, L, ...]``; ``state`` a pytree whose
        leaves have a leading batch axis. ``L`` is ``P``, or (with ``empty``) any multiple
        of ``P`` (segments counted from its first token) or a remainder ``< P``.
      state: fast weights at the last segment boundary.
      xs: new per-token inputs, each ``[B, T, ...]``.
      bufs: buffered inputs of the partial segment, each ``[B, P − 1, ...]`` (first ``n``
        valid), matching ``xs`` beyond the time axis.
      n: ``[B]`` int, valid buffered tokens (``0 ≤ n < P``).
      period: ``P``.
      empty: statically known empty buffer (``cache=None``, the training path): no buffer,
        no gather, no padding: ``step`` runs once on the ``⌊T/P⌋·P`` leading tokens (the
        rule's own scan over segments) and once on the remainder.

    Returns:
      ``(out [B, T, ...], state at the last boundary, new bufs, new n)``.
    """
    P = period
    B, T = xs[0].shape[:2]
    if empty or (T % P == 0 and _sp.boundary_caches()):
        # no buffer (statically: a fresh call, or a pipelined sequence-parallel round whose
        # cache sits at a segment boundary): run from the state, no gather
        return _run_from_start(step, state, xs, P)
    nbuf = P - 1
    L = nbuf + T
    nb = -(-L // P)
    Lp = nb * P
    n = jnp.asarray(n, jnp.int32)
    # compact stream: [buffer[:n], x, zeros]; length Lp + P − 1 (extra tail for the new buffer)
    Lc = Lp + P - 1
    idx = jnp.arange(Lc, dtype=jnp.int32)[None]
    src = jnp.where(idx < n[:, None], idx, idx + (nbuf - n[:, None]))

    def compact(buf, x):
        parts = [buf.astype(x.dtype), x]
        total = nbuf + T
        pad = (Lc + nbuf + 1) - total
        cat = jnp.concatenate(parts + [jnp.zeros((B, pad) + x.shape[2:], x.dtype)], axis=1)
        s = jnp.minimum(src, cat.shape[1] - 1)
        s = jnp.broadcast_to(s.reshape(s.shape + (1,) * (x.ndim - 2)), (B, Lc) + x.shape[2:])
        return jnp.take_along_axis(cat, s, axis=1)

    comp = [compact(b, x) for b, x in zip(bufs, xs)]
    m = (n + T) // P  # segments fully valid after this call

    def seg(a):  # [B, Lc, ...] -> [nb, B, P, ...]
        a = a[:, :Lp].reshape((B, nb, P) + a.shape[2:])
        return jnp.moveaxis(a, 1, 0)

    def select(mask, new, old):
        return jax.tree_util.tree_map(
            lambda a, b: jnp.where(mask.reshape((B,) + (1,) * (a.ndim - 1)), a, b), new, old)

    def body(carry, inp):
        st, sel = carry
        i, segs = inp
        st2, out = step(st, segs)
        sel = select(i + 1 == m, st2, sel)
        return (st2, sel), out

    segs = tuple(seg(c) for c in comp)
    if nb == 1:  # e.g. a decoding step: no loop
        (_, new_state), out0 = body((state, state), (jnp.int32(0), tuple(s[0] for s in segs)))
        outs = out0[None]
    else:
        (_, new_state), outs = lax.scan(body, (state, state), (jnp.arange(nb, dtype=jnp.int32), segs))
    outs = jnp.moveaxis(outs, 0, 1).reshape((B, Lp) + outs.shape[3:])
    out = jax.vmap(lambda o, s: lax.dynamic_slice_in_dim(o, s, T, 0))(outs, n)
    start = m * P
    new_bufs = tuple(jax.vmap(lambda c, s: lax.dynamic_slice_in_dim(c, s, P - 1, 0))(c, start)
                     for c in comp)
    return out, new_state, new_bufs, (n + T - start).astype(jnp.int32)


def _run_from_start(step, state, xs, P):
    """``run_segments`` for an empty buffer: static split into whole segments + remainder."""
    B, T = xs[0].shape[:2]
    m = T // P
    outs = []
    if m:
        state, o = step(state, tuple(x[:, :m * P] for x in xs))
        outs.append(o)
    rem = tuple(x[:, m * P:] for x in xs)
    if T > m * P:
        _, o = step(state, rem)
        outs.append(o)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    bufs = tuple(jnp.pad(r, [(0, 0), (0, P - 1 - r.shape[1])] + [(0, 0)] * (r.ndim - 2)) for r in rem)
    return out, state, bufs, jnp.full((B,), T - m * P, jnp.int32)


# ---------------------------------------------------------------------------------------------
# Packed sequences (``cu_seqlens``): every sequence's stream re-laid to start at a segment boundary
# ---------------------------------------------------------------------------------------------

class PackedStreams(NamedTuple):
    """Where the tokens of N packed streams sit in a segment-aligned layout ``[Nc, P]``.

    Stream ``i`` is ``[buffer_i[:n_i] ; x[cu_i : cu_{i+1}]]`` (``R_i = n_i + L_i`` tokens); it
    occupies ``⌈R_i / P⌉`` consecutive segments starting at segment ``co_i``, so every stream
    starts a fresh segment. ``Nc = (T + N·nbuf) // P + N`` bounds ``Σ_i ⌈R_i / P⌉`` statically
    (``nbuf`` the buffer capacity, 0 without a cache): at most ``T + N·(nbuf + P − 1)`` slots,
    never ``N·T``.
    """

    src: jax.Array     # [Nc, P] int32: row of the source ``[buffers (N·nbuf) ; tokens (T)]``
    valid: jax.Array   # [Nc, P] bool: the slot holds a real token
    seq: jax.Array     # [Nc] int32: the stream of each segment (clipped to N − 1 past the end)
    first: jax.Array   # [Nc] bool: the segment is the first of its stream (the state resets)
    local: jax.Array   # [Nc] int32: the segment's index inside its stream
    co: jax.Array      # [N + 1] int32: segment offsets
    R: jax.Array       # [N] int32: stream lengths ``n + L``
    out: jax.Array     # [T] int32: flat slot of every new token
    cu: jax.Array      # [N + 1] int32
    n: jax.Array       # [N] int32: buffered tokens per stream
    nbuf: int          # buffer capacity (static)
    P: int             # segment length (static)


def _seq_of(cu, t, N):
    return jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), N - 1).astype(jnp.int32)


def packed_streams(cu_seqlens, T: int, period: int, n=None, nbuf: int = 0) -> PackedStreams:
    """The segment-aligned layout of N packed streams (see :class:`PackedStreams`).

    ``n`` ``[N]`` buffered tokens per stream (``None``: no buffer, ``nbuf`` must be 0).
    Pure ``jnp`` on the values of ``cu_seqlens`` and ``n`` (traceable under ``jit``).
    """
    P = period
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    N = cu.shape[0] - 1
    n = jnp.zeros((N,), jnp.int32) if n is None else jnp.asarray(n, jnp.int32)
    L = cu[1:] - cu[:-1]
    R = n + L
    nch = (R + P - 1) // P
    co = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(nch).astype(jnp.int32)])
    Nc = (T + N * nbuf) // P + N
    j = jnp.arange(Nc, dtype=jnp.int32)
    real = j < co[N]
    seq = jnp.minimum(jnp.searchsorted(co[1:], j, side="right"), N - 1).astype(jnp.int32)
    local = j - co[seq]
    s = local[:, None] * P + jnp.arange(P, dtype=jnp.int32)[None]          # [Nc, P] stream position
    valid = real[:, None] & (s < R[seq][:, None])
    src = jnp.where(valid, _source(cu, n, nbuf, N, seq[:, None], s), 0)
    first = real & (local == 0)
    t = jnp.arange(T, dtype=jnp.int32)
    n_t = _seq_of(cu, t, N)
    st = n[n_t] + t - cu[n_t]
    out = (co[n_t] + st // P) * P + st % P
    return PackedStreams(src, valid, seq, first, local, co, R, out.astype(jnp.int32), cu, n, nbuf, P)


def _source(cu, n, nbuf, N, i, s):
    """Row of ``[buffers ; tokens]`` holding position ``s`` of stream ``i``."""
    from_buf = i * nbuf + jnp.clip(s, 0, max(nbuf - 1, 0))
    from_new = N * nbuf + cu[i] + s - n[i]
    return jnp.where(s < n[i], from_buf, from_new)


def packed_gather(lay: PackedStreams, x, buf=None):
    """``x [1, T, ...]`` (and ``buf [N, nbuf, ...]``, zeros if ``None``) → segments
    ``[Nc, 1, P, ...]`` (zeros in slots without a token)."""
    N = lay.n.shape[0]
    if lay.nbuf:
        b = (jnp.zeros((N, lay.nbuf) + x.shape[2:], x.dtype) if buf is None else buf.astype(x.dtype))
        srcs = jnp.concatenate([b.reshape((N * lay.nbuf,) + x.shape[2:]), x[0]], axis=0)
    else:
        srcs = x[0]
    y = jnp.take(srcs, lay.src, axis=0, mode="clip")                        # [Nc, P, ...]
    y = jnp.where(lay.valid.reshape(lay.valid.shape + (1,) * (y.ndim - 2)), y, jnp.zeros((), y.dtype))
    return y[:, None]


def packed_scatter(lay: PackedStreams, y):
    """Segments ``[Nc, 1, P, ...]`` → the new tokens ``[1, T, ...]`` (inverse of :func:`packed_gather`)."""
    y = y[:, 0].reshape((-1,) + y.shape[3:])
    return jnp.take(y, lay.out, axis=0)[None]


def packed_tail(lay: PackedStreams, x, buf, start, size: int):
    """Per stream, the ``size`` positions from ``start`` ``[N]`` (zeros past its end):
    ``[N, size, ...]`` from ``x [1, T, ...]`` and ``buf [N, nbuf, ...]`` (or ``None``)."""
    N = lay.n.shape[0]
    i = jnp.arange(N, dtype=jnp.int32)[:, None]
    s = start[:, None] + jnp.arange(size, dtype=jnp.int32)[None]
    ok = s < lay.R[:, None]
    if lay.nbuf:
        b = (jnp.zeros((N, lay.nbuf) + x.shape[2:], x.dtype) if buf is None else buf.astype(x.dtype))
        srcs = jnp.concatenate([b.reshape((N * lay.nbuf,) + x.shape[2:]), x[0]], axis=0)
    else:
        srcs = x[0]
    idx = jnp.where(ok, _source(lay.cu, lay.n, lay.nbuf, N, i, s), 0)
    y = jnp.take(srcs, idx, axis=0, mode="clip")
    return jnp.where(ok.reshape(ok.shape + (1,) * (y.ndim - 2)), y, jnp.zeros((), y.dtype))


def packed_scan(step, init, lay: PackedStreams, segs, *, keep: bool = True):
    """Run ``step`` over the segments of all streams, the state reset to ``init[i]`` at the
    first segment of stream ``i``.

    Args:
      step: ``step(state, seg) -> (state', out)`` on one segment (batch 1; ``seg`` a tuple of
        ``[1, P, ...]``), as for :func:`run_segments`.
      init: the initial state of every stream (pytree, leaves ``[N, ...]``).
      segs: tuple of ``[Nc, 1, P, ...]`` (:func:`packed_gather`).
      keep: also return the state after every segment (``[Nc, ...]`` leaves).

    Returns:
      ``(out [Nc, 1, P, ...], states after each segment or None)``.
    """
    def body(carry, inp):
        first, seq, sg = inp
        st = jax.tree_util.tree_map(
            lambda c, i0: jnp.where(first, lax.dynamic_index_in_dim(i0, seq, 0, keepdims=True), c),
            carry, init)
        st2, out = step(st, sg)
        return st2, ((out, st2) if keep else (out, None))

    carry0 = jax.tree_util.tree_map(lambda a: a[:1], init)
    _, (outs, states) = lax.scan(body, carry0, (lay.first, lay.seq, tuple(segs)))
    return outs, states


def packed_final(states, init, lay: PackedStreams, m):
    """Each stream's state after its first ``m [N]`` segments: ``init[i]`` if ``m_i = 0``,
    else the state after segment ``co_i + m_i − 1`` (``states`` from :func:`packed_scan`)."""
    idx = jnp.maximum(lay.co[:-1] + m - 1, 0)

    def pick(s, i0):
        got = jnp.take(s[:, 0], idx, axis=0)
        return jnp.where((m > 0).reshape((-1,) + (1,) * (got.ndim - 1)), got.astype(i0.dtype), i0)

    return jax.tree_util.tree_map(pick, states, init)


def packed_positions(positions, cache_pos, cu_seqlens, T: int):
    """Positions ``[1, T]`` of packed tokens: as given (``[1, T]`` or ``[T]``), else each
    sequence's continue from ``cache_pos [N]`` (0 for a fresh cache: they restart at every
    document)."""
    if positions is not None:
        positions = jnp.asarray(positions)
        if positions.ndim == 1:
            positions = positions[None]
        if positions.shape != (1, T):
            raise ValueError(f"positions: with cu_seqlens expected [1, T] or [T] with T = {T}, "
                             f"got {tuple(positions.shape)}")
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(f"positions: expected an integer dtype, got {positions.dtype}")
        return positions.astype(jnp.int32)
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    N = cu.shape[0] - 1
    t = jnp.arange(T, dtype=jnp.int32)
    if _sp.sequence_axis() is not None:  # T local tokens of a sequence sharded over devices
        t = t + _sp.shard_offset(T)
    n_t = _seq_of(cu, t, N)
    return (cache_pos.astype(jnp.int32)[n_t] + t - cu[n_t])[None]


def packed_next_pos(positions, cache_pos, cu_seqlens):
    """Next position per sequence ``[N]``: its last token's position + 1 (``cache_pos`` for an
    empty sequence). Under :func:`tttla_jax.parallel.sequence_parallel` (``positions`` the
    local ``[1, T]``, ``cu_seqlens`` global) the device holding a document's last token
    provides it (a masked ``psum``); the result is the same on every device."""
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    nonempty = cu[1:] > cu[:-1]
    axis = _sp.sequence_axis()
    if axis is None:
        last = jnp.take(positions[0], jnp.maximum(cu[1:] - 1, 0), axis=0)
        return jnp.where(nonempty, last + 1, cache_pos).astype(jnp.int32)
    T = positions.shape[1]
    loc = cu[1:] - 1 - _sp.shard_offset(T, axis)
    owns = nonempty & (loc >= 0) & (loc < T)
    last = jnp.take(positions[0], jnp.clip(loc, 0, T - 1), axis=0).astype(jnp.int32)
    got = lax.psum(jnp.where(owns, last + 1, 0), axis)
    return jnp.where(nonempty, got, cache_pos).astype(jnp.int32)


def run_segments_packed(step: Callable, state, xs: Sequence, bufs: Sequence, n, period: int,
                        cu_seqlens, *, empty: bool = False):
    """:func:`run_segments` for N packed sequences (``cu_seqlens`` ``[N + 1]``).

    ``state`` leaves, ``bufs`` ``[N, P − 1, ...]`` and ``n`` ``[N]`` are per sequence, ``xs``
    ``[1, T, ...]`` the packed new tokens. Every sequence's stream (its buffered tokens, then
    its new ones) is re-laid to start at a segment boundary (:func:`packed_streams`), one
    ``lax.scan`` runs ``step`` over all segments with the state reset at each stream's first
    segment, and each sequence keeps the state after its last whole segment and the tail
    after it as its new buffer — exactly :func:`run_segments` on every sequence alone.

    Returns:
      ``(out [1, T, ...], per-sequence state, new bufs [N, P − 1, ...], new n [N])``.
    """
    P = period
    T = xs[0].shape[1]
    lay = packed_streams(cu_seqlens, T, P, None if empty else n, 0 if empty else P - 1)
    src_bufs = [None if empty else b for b in bufs]
    segs = tuple(packed_gather(lay, x, b) for x, b in zip(xs, src_bufs))
    outs, states = packed_scan(step, state, lay, segs)
    out = packed_scatter(lay, outs)
    m = lay.R // P
    final = packed_final(states, state, lay, m)
    start = m * P
    new_bufs = tuple(packed_tail(lay, x, b, start, P - 1).astype(old.dtype)
                     for x, b, old in zip(xs, src_bufs, bufs))
    return out, final, new_bufs, (lay.R - start).astype(jnp.int32)
