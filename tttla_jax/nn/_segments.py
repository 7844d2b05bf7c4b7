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

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax


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
    if empty:
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
