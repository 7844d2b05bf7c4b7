"""Sequence (context) parallelism for layers and models: a trace-time context and the
pipelined form that shards any token mixer over a mesh axis.

Inside :func:`jax.shard_map` over a mesh axis (say ``"seq"``) every device holds a
contiguous slice of the sequence, ``x`` ``[B, T_local, W]``; device ``d`` holds tokens
``d·T_local … (d+1)·T_local − 1``. Under ``with sequence_parallel("seq"):`` every mixer
call ``mixer(x_local, cache=c, positions=p_local)`` means: the slice ``x_local`` of one
global sequence that starts from the cache ``c`` (identical on every device); the result
is that slice of the single-device output, and the returned cache is the state after the
last *global* token (identical on every device). Token-wise layers (projections, norms,
MLPs, the embedding and the head) need nothing.

How a mixer shards is a class attribute, :attr:`tttla_jax.nn.Mixer.sequence_parallel_form`:

* ``"pipelined"`` (the default; every mixer gets it): :func:`mixer_apply`. It relies on
  the mixer protocol alone — for any split of a sequence, calling the mixer on the pieces
  and threading the cache equals one call (tested for every mixer). In round ``r`` every
  device runs ``mixer(x_local, cache=incoming)`` and ``ppermute`` s the cache it returns
  to the next device; device 0's incoming cache is the start cache, and after round
  ``d − 1`` device ``d``'s incoming cache is exact and stays so. ``P`` rounds give every
  device its exact incoming cache and its outputs. Cost, honestly: each device computes
  its slice ``P`` times (forward and backward), so the wall time is about one device's
  time for the whole sequence; what falls by ``1/P`` is the activation memory per device
  (each round is rematerialised, only caches cross rounds) — this is what makes a
  sequence fit that one device cannot hold. Correct for every mixer, including the
  non-associative ones (TTT-MLP, LaCT with a non-linear fast-weight update) and those
  whose cache is a halo (sliding-window attention: the last ``window`` keys and values;
  short convolutions: the last ``conv_size − 1`` inputs).
* ``"associative"``: the mixer's own ``__call__`` is sequence-parallel aware (its state
  recurrence is combined across devices with an associative scan, see
  docs/context_parallel.md); it runs once per device.

Axis names: ``B`` batch, ``T`` tokens (``T_local`` per device), ``W`` width, ``P`` the
number of devices on the sequence axis.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

FORMS = ("pipelined", "associative")

_AXIS: contextvars.ContextVar = contextvars.ContextVar("tttla_jax_sequence_axis", default=None)


@contextlib.contextmanager
def sequence_parallel(axis_name: Optional[str]):
    """Trace-time context: code inside sees *local* slices of sequences sharded over
    ``axis_name`` (use it inside :func:`jax.shard_map` over that mesh axis).

    ``sequence_parallel(None)`` switches sequence parallelism off inside (e.g. for a
    per-device computation nested in a sharded one). The setting is a
    :class:`contextvars.ContextVar`: it only affects code traced inside the ``with``.

    Example::

        with tttla_jax.parallel.sequence_parallel("seq"):
            y, cache = mixer(x_local)          # inside jax.shard_map over "seq"

    Raises:
      ValueError: ``axis_name`` is not a string or ``None``.
    """
    if axis_name is not None and (not isinstance(axis_name, str) or not axis_name):
        raise ValueError(f"axis_name: expected a mesh axis name (a non-empty str) or None, "
                         f"got {axis_name!r}")
    token = _AXIS.set(axis_name)
    try:
        yield axis_name
    finally:
        _AXIS.reset(token)


def sequence_axis() -> Optional[str]:
    """The mesh axis the sequence is sharded over (set by :func:`sequence_parallel`), or ``None``."""
    return _AXIS.get()


def _resolve_axis(axis_name: Optional[str], where: str) -> str:
    axis = sequence_axis() if axis_name is None else axis_name
    if axis is None:
        raise ValueError(f"{where}: no sequence axis: pass axis_name=... or call it inside "
                         f"`with tttla_jax.parallel.sequence_parallel('seq'):`")
    return axis


def axis_size(axis_name: Optional[str] = None) -> int:
    """Number of devices ``P`` on the sequence axis (a Python int, known at trace time).

    Raises:
      ValueError: the axis is not bound (the code does not run inside :func:`jax.shard_map`
        over a mesh with that axis).
    """
    axis = _resolve_axis(axis_name, "axis_size")
    try:
        return int(lax.axis_size(axis))
    except NameError:
        raise ValueError(
            f"sequence axis {axis!r} is not bound: run the sharded code inside jax.shard_map over a "
            f"mesh with an axis {axis!r} (e.g. jax.sharding.Mesh(devices, ({axis!r},)) and "
            f"in_specs=P(None, {axis!r}) for [B, T, ...] inputs)") from None


def shard_offset(local_len: int, axis_name: Optional[str] = None) -> jax.Array:
    """Global index of this device's first token: ``axis_index · local_len`` (int32)."""
    axis = _resolve_axis(axis_name, "shard_offset")
    axis_size(axis)  # a clear error if the axis is unbound
    return lax.axis_index(axis).astype(jnp.int32) * jnp.int32(local_len)


def _vma(a) -> frozenset:
    """The mesh axes ``a`` varies over inside ``shard_map`` (empty outside)."""
    t = jax.typeof(a)
    mat = getattr(t, "manual_axis_type", None)
    varying = getattr(mat, "varying", None) if mat is not None else getattr(t, "vma", None)
    return frozenset(varying or ())


def _varying(a, axes):
    """``a`` marked as varying over ``axes`` (only the axes it does not vary over yet)."""
    missing = tuple(sorted(set(axes) - _vma(a)))
    return lax.pcast(a, missing, to="varying") if missing else a


def from_last_shard(tree, axis_name: Optional[str] = None):
    """Every leaf of ``tree`` as held by the *last* device of the axis, on every device.

    Exact (a masked ``psum``: the other devices contribute zeros); used for the state
    after the last global token.
    """
    axis = _resolve_axis(axis_name, "from_last_shard")
    last = axis_size(axis) - 1
    is_last = lax.axis_index(axis) == last

    def one(a):
        a = jnp.asarray(a)
        if a.dtype == jnp.bool_:
            return lax.psum(jnp.where(is_last, a, False).astype(jnp.int32), axis).astype(jnp.bool_)
        return lax.psum(jnp.where(is_last, a, jnp.zeros_like(a)), axis)

    return jax.tree.map(one, tree)


def sequence_parallel_form(mixer) -> str:
    """How ``mixer`` (an instance or class) shards over the sequence: ``"pipelined"`` or
    ``"associative"`` (its ``sequence_parallel_form`` attribute; see the module doc)."""
    form = getattr(mixer, "sequence_parallel_form", "pipelined")
    if isinstance(mixer, type) and isinstance(form, property):
        return "associative"  # decided per instance (e.g. "pipelined" for some options)
    if form not in FORMS:
        name = mixer.__name__ if isinstance(mixer, type) else type(mixer).__name__
        raise ValueError(f"{name}.sequence_parallel_form: expected one of {FORMS}, got {form!r}")
    return form


def mixer_apply(mixer, x, *, cache: Optional[dict] = None, positions=None,
                axis_name: Optional[str] = None, remat: bool = True):
    """The pipelined sequence-parallel form of any token mixer (call inside ``shard_map``).

    Args:
      mixer: a token mixer (the :class:`tttla_jax.nn.Mixer` protocol: ``init_cache`` and
        ``__call__(x, *, cache, positions) -> (y, cache)``).
      x: ``[B, T_local, W]`` this device's slice of the sequence.
      cache: the cache before the *global* sequence (the same on every device); default
        ``mixer.init_cache(B)``.
      positions: ``[B, T_local]`` global positions of this slice, or ``None`` (each
        device's mixer then continues from its incoming cache, which is exact).
      axis_name: the sequence axis (default: :func:`sequence_axis`).
      remat: rematerialise every round in the backward pass (``jax.checkpoint``).

    Returns:
      ``(y [B, T_local, W], cache)``: this slice of the single-device output and the cache
      after the last global token (the same on every device).

    ``P`` rounds (see the module doc): round ``r`` runs the mixer on every device from
    its incoming cache and ``ppermute`` s the returned cache to the next device; after
    ``P − 1`` rounds every incoming cache is exact and a last call gives the outputs.
    """
    axis = _resolve_axis(axis_name, "mixer_apply")
    P = axis_size(axis)
    from flax import nnx  # the only flax use in this package

    B = x.shape[0]
    cache0 = mixer.init_cache(B) if cache is None else cache
    graphdef, state = nnx.split(mixer)

    def local(state, x, c, positions):
        with sequence_parallel(None):  # per-device calls: plain local mixers
            return nnx.merge(graphdef, state)(x, cache=c, positions=positions)

    step = jax.checkpoint(local) if remat else local
    if P == 1:
        return step(state, x, cache0, positions)
    # every input varies over the axis, so per-device control flow inside the mixer (scan
    # carries, cond branches) sees one consistent type under shard_map's check_vma
    axes = frozenset({axis}).union(*(_vma(a) for a in jax.tree.leaves((x, state, cache0, positions))))
    state = jax.tree.map(lambda a: _varying(a, axes), state)
    if positions is not None:
        positions = _varying(jnp.asarray(positions), axes)
    first = lax.axis_index(axis) == 0
    start = jax.tree.map(lambda a: _varying(jnp.asarray(a), axes), cache0)

    def round_(c, _):
        _, out = step(state, x, c, positions)
        out = jax.tree.map(lambda o, a: o.astype(a.dtype), out, start)
        recv = lax.ppermute(out, axis, perm=[(j, j + 1) for j in range(P - 1)])
        return jax.tree.map(lambda a, b: jnp.where(first, a, b), start, recv), None

    incoming, _ = lax.scan(round_, start, None, length=P - 1)
    y, out = step(state, x, incoming, positions)
    return y, from_last_shard(out, axis)


def halo(x, state, axis_name: Optional[str] = None):
    """The last ``K`` rows *before* this device's slice, ``state`` ``[B, K, F]`` for device 0.

    ``x`` ``[B, T_local, F]`` is this device's slice of a sequence whose first ``K`` rows
    of history are ``state`` (the same on every device). An all-gather of each device's
    last ``min(K, T_local)`` rows; exact for any ``T_local`` (shorter slices than ``K``
    take rows from several earlier devices). Used by the short convolutions.
    """
    axis = _resolve_axis(axis_name, "halo")
    K = state.shape[1]
    if K == 0:
        return state
    P = axis_size(axis)
    B, T, F = x.shape
    m = min(K, T)
    tails = lax.all_gather(x[:, T - m:].astype(state.dtype), axis, axis=1)    # [B, P, m, F]
    hist = jnp.concatenate([_varying(state, _vma(tails)), tails.reshape(B, P * m, F)], axis=1)
    start = lax.axis_index(axis).astype(jnp.int32) * jnp.int32(m)
    return lax.dynamic_slice_in_dim(hist, start, K, axis=1)


def short_conv(conv, x, state=None, cu_seqlens=None):
    """A short causal convolution (:class:`tttla_jax.nn.ShortConv`) of a sequence sharded
    over the sequence axis: its state entering this device is the :func:`halo`; the returned
    state is the one after the last global token. (ShortConv calls this under
    :func:`sequence_parallel`.)"""
    axis = _resolve_axis(None, "short_conv")
    if cu_seqlens is not None:
        raise ValueError(f"cu_seqlens: packed sequences in a short convolution are not supported "
                         f"under sequence parallelism (sequence axis {axis!r})")
    if state is None:
        state = jnp.zeros((x.shape[0], conv.kernel_size - 1, x.shape[2]), x.dtype)
    with sequence_parallel(None):
        y, out = conv(x, halo(x, state, axis))
    return y, from_last_shard(out, axis)


def sequence_op(name: str, local_op: Callable) -> Callable:
    """``local_op`` (e.g. :func:`tttla_jax.linear_attention`), or, under
    :func:`sequence_parallel`, its sequence-parallel version ``tttla_jax.parallel.<name>``
    with ``axis_name`` bound (same arguments; the final state is the global one)."""
    axis = sequence_axis()
    if axis is None:
        return local_op
    from tttla_jax.parallel import ops
    op = getattr(ops, name)

    def call(q, *args, initial_state=None, **kw):
        if initial_state is not None:  # vary like q (e.g. over data axes too) for the op's custom_vjp
            initial_state = _varying(initial_state, _vma(q) | {axis})
        return op(q, *args, initial_state=initial_state, axis_name=axis, **kw)

    return call


def sequence_parallel_call(mixer, axis_name: str, x, *, cache=None, positions=None, **kw):
    """A ``"pipelined"`` mixer's call under :func:`sequence_parallel` (the ``Mixer`` base
    class routes it here): :func:`mixer_apply`. Other keyword arguments (e.g.
    ``cu_seqlens``) are rejected with a ``ValueError`` naming them."""
    extra = sorted(k for k, v in kw.items() if v is not None)
    if extra:
        raise ValueError(f"{type(mixer).__name__}: {extra} not supported by the pipelined "
                         f"sequence-parallel form (sequence axis {axis_name!r}); call the mixer "
                         f"outside `sequence_parallel(...)` or without them")
    return mixer_apply(mixer, x, cache=cache, positions=positions, axis_name=axis_name)


def sharded_mixer(mixer, x, *, mesh, seq_axis: str = "seq", batch_axes=None, cache=None,
                  positions=None):
    """Run ``mixer`` on a global ``x`` ``[B, T, W]`` sharded over ``mesh``'s ``seq_axis``.

    The outside wrapper (no ``shard_map`` to write): pads ``T`` at the end to a multiple
    of the axis size (causality keeps the padding out of every real output), shards the
    sequence over ``seq_axis`` (and the batch over ``batch_axes``, if given), runs the
    mixer under :func:`sequence_parallel` and returns ``y`` ``[B, T, W]``.

    ``positions`` ``[B, T]`` are padded with continuing positions. The final cache is not
    returned (with padding it would include the pad tokens); inside ``shard_map`` the mixer
    call returns it.

    Raises:
      ValueError: ``seq_axis`` / ``batch_axes`` not in the mesh, or ``x`` not ``[B, T, W]``.
    """
    from jax.sharding import PartitionSpec as Pspec
    from flax import nnx

    names = tuple(mesh.axis_names)
    if seq_axis not in names:
        raise ValueError(f"seq_axis: {seq_axis!r} is not an axis of the mesh (axes {names})")
    baxes = () if batch_axes is None else ((batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes))
    bad = [a for a in baxes if a not in names or a == seq_axis]
    if bad:
        raise ValueError(f"batch_axes: {bad} are not mesh axes other than seq_axis (mesh axes {names})")
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x: expected [B, T, W], got shape {getattr(x, 'shape', None)}")
    B, T, _ = x.shape
    P = mesh.shape[seq_axis]
    pad = -T % P
    if positions is not None:
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, T)) \
            if jnp.ndim(positions) == 1 else jnp.asarray(positions, jnp.int32)
        if positions.shape != (B, T):
            raise ValueError(f"positions: expected [B, T] = {(B, T)} or [T], got {tuple(positions.shape)}")
        positions = jnp.concatenate(
            [positions, positions[:, -1:] + 1 + jnp.arange(pad, dtype=jnp.int32)[None]], axis=1)
    xp = jnp.pad(x, [(0, 0), (0, pad), (0, 0)])
    bspec = (baxes if len(baxes) != 1 else baxes[0]) if baxes else None
    spec = Pspec(bspec, seq_axis)
    graphdef, state = nnx.split(mixer)

    def body(state, x, cache, positions):
        with sequence_parallel(seq_axis):
            y, _ = nnx.merge(graphdef, state)(x, cache=cache, positions=positions)
        return y

    y = jax.shard_map(body, mesh=mesh, in_specs=(Pspec(), spec, Pspec(bspec), spec),
                      out_specs=spec)(state, xp, cache, positions)
    return y[:, :T]
