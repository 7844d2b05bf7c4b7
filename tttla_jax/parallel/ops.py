"""Sequence (context) parallelism for the linear-attention ops: one long sequence split over
the devices of a mesh axis (docs/context_parallel.md).

Axis names as in :mod:`tttla_jax.ops.linear_attention` (``B T H K V``), plus ``P`` the number
of devices on the sequence axis and ``L = T / P`` the tokens per device.

Two levels:

* **inside** ``jax.shard_map`` (composable, like ``lax.psum``): :func:`linear_attention` and
  :func:`delta_rule` take the local slice ``[B, L, H, ·]`` of device ``p`` (tokens
  ``p·L … (p+1)·L − 1``) and the name of the mesh axis the sequence is split over;
* **outside** (no ``shard_map`` to write): :func:`sharded_linear_attention` and
  :func:`sharded_delta_rule` take the whole ``[B, T, H, ·]`` arrays and a mesh, pad ``T`` to a
  multiple of ``P``, run the inside functions under ``jax.shard_map`` and unpad.

How (state passing; docs/context_parallel.md has the derivation). Both recurrences are affine
in the incoming state: over one device's tokens the state after the device is
``E_p = A_p c_p + B_p`` with ``c_p`` the state entering the device. Every device

1. runs the single-device chunked op on its slice with a zero incoming state, which gives
   ``B_p``, the outputs without the incoming state, and what ``A_p`` needs;
2. all-gathers the P transforms ``(A_p, B_p)`` (one small collective) and composes them with a
   ``lax.associative_scan`` (log depth in P): ``c_p = E_{p−1}``, ``c_0 = 0``;
3. adds the incoming state's contribution to its outputs (no second pass):

   - linear attention: ``A_p = exp(Σ_{t ∈ p} g_t)`` (a scalar per head) and
     ``o_t += exp(Σ_{s ≤ t, s ∈ p} g_s) (scale·q_t) c_p``;
   - (gated) delta rule: ``A_p`` is a ``K × K`` matrix. The state's V columns evolve
     independently, so the local pass runs on ``[v | 0]`` with the initial state ``[0 | I_K]``:
     its last K state columns are ``A_p`` and its last K output columns are ``q_t Φ_t`` (the
     map from the incoming state to ``S_t``), so ``o_t += (q_t Φ_t) c_p``.

Packed sequences: ``cu_seqlens`` are the *global* offsets (replicated). A document may span
any number of devices (its state passes across every boundary); a document that starts on a
device (at its first token or inside it) starts from its own initial state and cuts the
incoming state, so ``A_p = 0`` for a device whose last document starts on it. Each device runs
the op on its local segments (the global offsets clipped to its slice; a document with no
token on the device is an empty local segment). A document's final state is computed on the
device that holds its last token and shared with a masked ``lax.psum``.

Gradients: everything is differentiable through ``shard_map`` (the all-gather transposes to a
reduce-scatter, the local op keeps its own backward); no extra custom VJP.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax.ops import delta_rule as _delta_op
from tttla_jax.ops import linear_attention as _la_op

__all__ = ["delta_rule", "linear_attention", "sharded_delta_rule", "sharded_linear_attention"]


# --------------------------------------------------------------------------- helpers


def _check_axis(axis_name):
    """``(P, p)``: the size of the mapped axis and this device's index on it."""
    try:
        P = lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(f"axis_name: {axis_name!r} is not a mapped axis here; call this function inside "
                         f"jax.shard_map over a mesh with that axis (or use the sharded_* wrappers) ({e})") from None
    return P, lax.axis_index(axis_name)


def _check_inputs(q, k, v, gates, initial_state, cu_seqlens, P):
    """The op's input contract on the local slice; ``cu_seqlens`` are global offsets
    (``[N + 1]``, from 0 to ``P · L``). Returns the :class:`tttla_jax._checks.Dims` of the slice
    (``N`` the number of packed sequences with ``cu_seqlens``)."""
    d = _checks.check_qkv(q, k, v, gates=gates, initial_state=None if cu_seqlens is not None else initial_state)
    if cu_seqlens is None:
        return d
    shape = getattr(cu_seqlens, "shape", None)
    if shape is None or len(shape) != 1 or shape[0] < 2:
        raise ValueError("cu_seqlens: expected a 1-D integer array [N + 1] of the global cumulative sequence "
                         f"offsets (N >= 1), got {'shape ' + str(tuple(shape)) if shape is not None else type(cu_seqlens).__name__}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens: expected an integer dtype, got {cu_seqlens.dtype}")
    if d.B != 1:
        raise ValueError(f"cu_seqlens: packed sequences go in a batch of one ([1, T, H, D]), got batch size B = {d.B}")
    if not isinstance(cu_seqlens, jax.core.Tracer):
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != P * d.T:
            raise ValueError(f"cu_seqlens: expected global offsets from 0 to P·L = {P} · {d.T} = {P * d.T} "
                             f"(the whole sequence over the {P} devices), got {cu[0]} … {cu[-1]}")
        if np.any(np.diff(cu) < 0):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {cu.tolist()}")
    N = shape[0] - 1
    if initial_state is not None:
        _checks.check_shape("initial_state", initial_state, (N, d.H, d.K, d.V),
                            "[N, H, K, V] (one state per packed sequence, N from cu_seqlens)")
        _checks.check_floating("initial_state", initial_state)
    return d._replace(N=N)


class _Segments:
    """Where the global documents of ``cu_seqlens [N + 1]`` fall on device ``p`` (slice of ``L``)."""

    def __init__(self, cu_seqlens, p, L):
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        start = p * L
        N = cu.shape[0] - 1
        self.local_cu = jnp.clip(cu - start, 0, L)                     # [N + 1] local offsets
        self.span = (cu[:-1] < start) & (cu[1:] > start)               # [N] entered from the device before
        self.nonempty = cu[1:] > cu[:-1]                               # [N]
        last = cu[1:] - 1
        self.owns = self.nonempty & (last >= start) & (last < start + L)  # [N] final state is computed here
        t = start + jnp.arange(L, dtype=jnp.int32)
        n_t = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), N - 1)
        self.span_tok = self.span[n_t]                                 # [L] token of the spanning document
        self.n_last = n_t[-1]                                          # document of the device's last token
        self.end = jnp.clip(cu[1:] - start - 1, 0, L - 1)              # [N] each document's last local token


def _bcast(mask, ndim):
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def _carry_in(A, Bst, axis_name, p, matrix: bool):
    """All-gather the per-device affine transforms ``E = A c + B`` and compose them (an
    inclusive ``lax.associative_scan`` over the P devices): the state entering device ``p``,
    ``c_p = E_{p−1}`` (zeros on device 0). ``A``: ``[B, H]`` scalars (``matrix=False``) or
    ``[B, H, K, K]`` matrices acting on the state's K axis."""
    Ag, Bg = lax.all_gather((A, Bst), axis_name)  # [P, ...]

    def compose(first, second):  # second ∘ first
        A1, B1 = first
        A2, B2 = second
        if matrix:
            return jnp.matmul(A2, A1), jnp.matmul(A2, B1) + B2
        return A2 * A1, A2[..., None, None] * B1 + B2

    _, E = lax.associative_scan(compose, (Ag, Bg), axis=0)
    c = lax.dynamic_index_in_dim(E, jnp.maximum(p - 1, 0), 0, keepdims=False)
    return jnp.where(p > 0, c, jnp.zeros_like(c))


def _final_states(SF, owns, h0, nonempty, axis_name):
    """One final state per document, identical on every device: the device holding the
    document's last token contributes it (a masked ``lax.psum``); an empty document keeps its
    initial state."""
    S = lax.psum(jnp.where(_bcast(owns, SF.ndim), SF, jnp.zeros_like(SF)), axis_name)
    if nonempty is None:
        return S
    return S + jnp.where(_bcast(nonempty, h0.ndim), jnp.zeros_like(h0), h0)


# --------------------------------------------------------------------------- inside shard_map


def linear_attention(
    q: Float[Array, "b l h k"],
    k: Float[Array, "b l h k"],
    v: Float[Array, "b l h v"],
    log_decay: Optional[Float[Array, "b l h"]] = None,
    *,
    axis_name,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """Causal (decayed) linear attention on a sequence split over the mesh axis ``axis_name``;
    call inside ``jax.shard_map`` on the local slice.

    ``S_t = exp(g_t) S_{t−1} + k_tᵀ v_t``, ``o_t = (scale·q_t) S_t`` over the *whole* sequence
    (``tt.linear_attention(..., masking="causal")``), device ``p`` holding tokens
    ``p·L … (p+1)·L − 1``. The state crosses devices by an all-gather of one
    ``(decay, state)`` pair per device and a log-depth scan (docs/context_parallel.md).

    Args:
      q, k: ``[B, L, H, K]`` this device's queries and keys; v: ``[B, L, H, V]``.
      log_decay: optional ``[B, L, H]`` log-decays (``[−inf, 0]``; 0 if absent).
      axis_name: the mesh axis the sequence is split over (as for ``lax.psum``).
      scale: query scale, default ``K ** -0.5`` (may be traced).
      chunk_size: chunk length of the local chunked op.
      cu_seqlens: optional ``[N + 1]`` *global* offsets of N packed documents (``B = 1``;
        the same on every device, may be traced): a document may cross devices; a document
        that starts on a device cuts the state entering it.
      initial_state: optional ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) state
        before the first token (of each document), the same on every device.
      output_final_state: also return the state after the last global token (after each
        document's last token with ``cu_seqlens``), the same on every device.
      impl: the local op's implementation (``tt.linear_attention``'s ``impl``).

    Returns:
      ``(o [B, L, H, V] in q's dtype, S or None)`` as ``tt.linear_attention``.

    Raises:
      ValueError: a wrong shape/dtype/offset (naming the argument), or ``axis_name`` is not a
        mapped axis.
    """
    P, p = _check_axis(axis_name)
    B, L, H, K, V, N = _check_inputs(q, k, v, {"log_decay": log_decay}, initial_state, cu_seqlens, P)
    scale = _checks.check_scale(scale)
    if scale is None:
        scale = K ** -0.5
    sd = _checks.state_dtype(q, k, v, log_decay, initial_state)
    qf, kf, vf = q.astype(sd), k.astype(sd), v.astype(sd)
    g = None if log_decay is None else log_decay.astype(sd)
    h0 = jnp.zeros((N, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
    # cumulative log-decay from the device's first token (a sum of values in [-inf, 0]:
    # exp of it is exact 0 past a cut, with gradient 0)
    G = None if g is None else jnp.cumsum(g, axis=1)  # [B, L, H]
    decay = lambda idx: jnp.ones((B, H), sd) if G is None else jnp.exp(G[:, idx])  # noqa: E731
    if cu_seqlens is None:
        h0_loc = jnp.where(p == 0, h0, jnp.zeros_like(h0))
        o, SF = _la_op(qf, kf, vf, scale=scale, log_decay=g, initial_state=h0_loc, output_final_state=True,
                       chunk_size=chunk_size, impl=impl)
        span_tok = jnp.broadcast_to(p > 0, (L,))
        A = jnp.where(p > 0, decay(-1), 0.0)  # [B, H]
        c = _carry_in(A, SF, axis_name, p, matrix=False)
        SF = SF + A[..., None, None] * c
        owns, nonempty = jnp.broadcast_to(p == P - 1, (B,)), None
    else:
        seg = _Segments(cu_seqlens, p, L)
        h0_loc = jnp.where(_bcast(seg.span, 4), jnp.zeros_like(h0), h0)
        o, SF = _la_op(qf, kf, vf, scale=scale, log_decay=g, initial_state=h0_loc, output_final_state=True,
                       chunk_size=chunk_size, impl=impl, cu_seqlens=seg.local_cu)
        span_tok = seg.span_tok
        A = jnp.where(seg.span[seg.n_last], decay(-1), 0.0)  # [1, H]
        c = _carry_in(A, SF[seg.n_last][None], axis_name, p, matrix=False)  # [1, H, K, V]
        a_end = jnp.where(_bcast(seg.span, 2), decay(seg.end)[0] if G is not None else 1.0, 0.0)  # [N, H]
        SF = SF + a_end[..., None, None] * c
        owns, nonempty = seg.owns, seg.nonempty
    gam = jnp.ones((B, L, H), sd) if G is None else jnp.exp(G)
    gam = jnp.where(span_tok[None, :, None], gam, 0.0)
    o = o + _incoming_la(qf, gam, c, jnp.asarray(scale, sd))
    S = _final_states(SF, owns, h0, nonempty, axis_name) if output_final_state else None
    return o.astype(q.dtype), S


@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
def _incoming_la(q, gam, c, scale):
    """The incoming state's share of the outputs, ``e^{G_t} (scale·q_t) c``; rematerialised so
    the backward keeps only its inputs (no ``[B, L, H, K]`` product is stored)."""
    return jnp.einsum("blhk,bhkv->blhv", q * (scale * gam)[..., None], c)


def delta_rule(
    q: Float[Array, "b l h k"],
    k: Float[Array, "b l h k"],
    v: Float[Array, "b l h v"],
    beta: Float[Array, "b l h"],
    log_decay: Optional[Float[Array, "b l h"]] = None,
    *,
    axis_name,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """(Gated) delta rule on a sequence split over the mesh axis ``axis_name``; call inside
    ``jax.shard_map`` on the local slice.

    ``S_t = (I − β_t k_tᵀ k_t) e^{g_t} S_{t−1} + β_t k_tᵀ v_t``, ``o_t = (scale·q_t) S_t`` over
    the whole sequence (``tt.delta_rule``). Over one device the map from the incoming state is
    affine, ``S ↦ A_p S + B_p`` with ``A_p`` ``K × K``: one local chunked pass on ``[v | 0]``
    from ``[0 | I_K]`` gives ``B_p``, ``A_p`` and the outputs' dependence on the incoming state;
    an all-gather and a log-depth scan of the P transforms give the incoming state
    (docs/context_parallel.md).

    Args:
      q, k: ``[B, L, H, K]``; v: ``[B, L, H, V]``; beta: ``[B, L, H]`` write strengths.
      log_decay: optional ``[B, L, H]`` log-decays (the gated delta rule).
      axis_name, scale, chunk_size, cu_seqlens, initial_state, output_final_state, impl: as in
        :func:`linear_attention` (``impl`` is ``tt.delta_rule``'s).

    Returns:
      ``(o [B, L, H, V] in q's dtype, S or None)`` as ``tt.delta_rule``.

    Raises:
      ValueError: a wrong shape/dtype/offset (naming the argument), or ``axis_name`` is not a
        mapped axis.
    """
    P, p = _check_axis(axis_name)
    B, L, H, K, V, N = _check_inputs(q, k, v, {"beta": beta, "log_decay": log_decay}, initial_state,
                                     cu_seqlens, P)
    scale = _checks.check_scale(scale)
    if scale is None:
        scale = K ** -0.5
    sd = _checks.state_dtype(q, k, v, beta, log_decay, initial_state)
    qf, kf, vf, bf = q.astype(sd), k.astype(sd), v.astype(sd), beta.astype(sd)
    g = None if log_decay is None else log_decay.astype(sd)
    h0 = jnp.zeros((N, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
    eye = jnp.broadcast_to(jnp.eye(K, dtype=sd), (N, H, K, K))
    fresh = jnp.concatenate([h0, jnp.zeros_like(eye)], axis=-1)
    entered = jnp.concatenate([jnp.zeros_like(h0), eye], axis=-1)
    cu_loc = None
    if cu_seqlens is None:
        h0_loc = jnp.where(p == 0, fresh, entered)
        owns, nonempty = jnp.broadcast_to(p == P - 1, (B,)), None
    else:
        seg = _Segments(cu_seqlens, p, L)
        h0_loc, cu_loc = jnp.where(_bcast(seg.span, 4), entered, fresh), seg.local_cu
        owns, nonempty = seg.owns, seg.nonempty
    o, SF = _delta_op(qf, kf, _widen(vf, K), bf, scale=scale, log_decay=g, initial_state=h0_loc,
                      output_final_state=True, chunk_size=chunk_size, impl=impl, cu_seqlens=cu_loc)
    last = SF if cu_seqlens is None else SF[seg.n_last][None]
    c = _carry_in(last[..., V:], last[..., :V], axis_name, p, matrix=True)  # [B or 1, H, K, V]
    # A = 0 wherever the state did not come from the previous device (no I_K columns there)
    SF = SF[..., :V] + jnp.matmul(SF[..., V:], c)
    o = o[..., :V] + jnp.einsum("blhk,bhkv->blhv", o[..., V:], c)
    S = _final_states(SF, owns, h0, nonempty, axis_name) if output_final_state else None
    return o.astype(q.dtype), S


def _widen(v, K):
    """``[v | 0_K]``: K extra value columns (the state's columns evolve independently)."""
    return jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (K,), v.dtype)], axis=-1)


# --------------------------------------------------------------------------- outside shard_map


def _axes_tuple(name, axes, mesh):
    if axes is None:
        return ()
    t = (axes,) if isinstance(axes, str) else tuple(axes)
    for a in t:
        if a not in mesh.axis_names:
            raise ValueError(f"{name}: axis {a!r} is not in the mesh, whose axes are {tuple(mesh.axis_names)}")
    return t


def _sharded(op, name, arrays, gates, *, mesh, seq_axis, batch_axes, scale, chunk_size, cu_seqlens,
             initial_state, output_final_state, impl):
    q, k, v = arrays
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if seq_axis not in mesh.axis_names:
        raise ValueError(f"seq_axis: {seq_axis!r} is not an axis of the mesh, whose axes are "
                         f"{tuple(mesh.axis_names)} (make one, e.g. jax.make_mesh((n,), ('seq',)))")
    bax = _axes_tuple("batch_axes", batch_axes, mesh)
    if seq_axis in bax:
        raise ValueError(f"batch_axes: {bax} contains the sequence axis {seq_axis!r}")
    B, T, H, K, V, N = _checks.check_qkv(q, k, v, gates=gates, initial_state=initial_state, cu_seqlens=cu_seqlens)
    nb = int(np.prod([mesh.shape[a] for a in bax])) if bax else 1
    if bax and cu_seqlens is not None:
        raise ValueError(f"batch_axes: packed sequences (cu_seqlens) are a batch of one, got batch_axes={batch_axes!r}")
    if B % nb:
        raise ValueError(f"batch_axes: the batch size B = {B} is not a multiple of the {nb} devices on {bax}")
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    scale = _checks.check_scale(scale)
    P = mesh.shape[seq_axis]
    Tp = -(-T // P) * P
    # padding after the last token (zero k, v, β and log-decay 0) leaves outputs and states
    # unchanged: the last document just runs on through it
    pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    names = ["q", "k", "v"] + list(gates)
    vals = [pad(x) for x in (q, k, v)] + [pad(x) for x in gates.values()]
    bspec = bax if len(bax) != 1 else bax[0]
    bspec = bspec if bax else None
    tok = PartitionSpec(bspec, seq_axis)
    specs = [tok] * len(vals)
    if cu_seqlens is not None:
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        names.append("cu_seqlens")
        vals.append(cu.at[-1].set(Tp) if Tp != T else cu)
        specs.append(PartitionSpec())
    if initial_state is not None:
        names.append("initial_state")
        vals.append(initial_state)
        specs.append(PartitionSpec() if cu_seqlens is not None else PartitionSpec(bspec))
    if scale is not None and not isinstance(scale, float):  # traced: an operand
        names.append("scale")
        vals.append(jnp.asarray(scale))
        specs.append(PartitionSpec())
    present = [i for i, x in enumerate(vals) if x is not None]
    state_spec = PartitionSpec() if cu_seqlens is not None else PartitionSpec(bspec)

    def body(*xs):
        kw = dict(zip([names[i] for i in present], xs))
        kw.setdefault("scale", scale)
        return op(**kw, axis_name=seq_axis, chunk_size=chunk_size, output_final_state=output_final_state,
                  impl=impl)

    f = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs[i] for i in present),
                      out_specs=(tok, state_spec if output_final_state else None))
    args = [vals[i] for i in present]
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:  # explicit-sharding meshes (jax.make_mesh's default): the operands must carry the specs
        args = [jax.reshard(x, jax.sharding.NamedSharding(mesh, specs[i])) for i, x in zip(present, args)]
    o, S = f(*args)
    if Tp == T:
        return o, S
    if explicit:  # T tokens do not split evenly over the axis: the unpadded output is not sequence-sharded
        o = jax.reshard(o, jax.sharding.NamedSharding(mesh, PartitionSpec(bspec)))
    return o[:, :T], S


def sharded_linear_attention(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    log_decay: Optional[Float[Array, "b t h"]] = None,
    *,
    mesh,
    seq_axis: str = "seq",
    batch_axes: Union[None, str, Sequence[str]] = None,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """:func:`linear_attention` on whole ``[B, T, H, ·]`` arrays: the tokens split over the
    mesh axis ``seq_axis`` (and the batch over ``batch_axes``), without writing ``shard_map``.

    ``T`` is zero-padded to a multiple of the axis size (zero k, v and log-decay 0 after the
    last token change neither the outputs nor the state) and the outputs unpadded. Same
    results as ``tt.linear_attention(..., masking="causal")``; works under ``jax.jit``.

    Args:
      q, k, v, log_decay, scale, chunk_size, cu_seqlens, initial_state, output_final_state,
        impl: as ``tt.linear_attention`` (``cu_seqlens`` with ``B = 1``).
      mesh: a ``jax.sharding.Mesh`` with an axis ``seq_axis``.
      seq_axis: the mesh axis the tokens are split over (default ``"seq"``).
      batch_axes: optional mesh axis name(s) the batch is split over (not with ``cu_seqlens``).

    Returns:
      ``(o [B, T, H, V], S or None)``.

    Raises:
      ValueError: an axis not in the mesh, a batch not divisible by ``batch_axes``, or a bad
        input shape (naming the argument and what was expected).
    """
    return _sharded(linear_attention, "sharded_linear_attention", (q, k, v), {"log_decay": log_decay},
                    mesh=mesh, seq_axis=seq_axis, batch_axes=batch_axes, scale=scale, chunk_size=chunk_size,
                    cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
                    impl=impl)


def sharded_delta_rule(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    beta: Float[Array, "b t h"],
    log_decay: Optional[Float[Array, "b t h"]] = None,
    *,
    mesh,
    seq_axis: str = "seq",
    batch_axes: Union[None, str, Sequence[str]] = None,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """:func:`delta_rule` on whole ``[B, T, H, ·]`` arrays, as :func:`sharded_linear_attention`
    (padding: β = 0, k = v = 0 and log-decay 0 leave the state unchanged). Same results as
    ``tt.delta_rule``."""
    return _sharded(delta_rule, "sharded_delta_rule", (q, k, v), {"beta": beta, "log_decay": log_decay},
                    mesh=mesh, seq_axis=seq_axis, batch_axes=batch_axes, scale=scale, chunk_size=chunk_size,
                    cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
                    impl=impl)
