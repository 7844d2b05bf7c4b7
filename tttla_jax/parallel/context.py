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

Packed documents: ``mixer(x_local, cache=c, cu_seqlens=cu)`` with the *global* offsets
``cu`` (replicated) and per-document caches ``[N, ...]``; a document may span devices. The
pipelined form passes the whole per-document cache along (:func:`mixer_apply`), the short
convolutions' halo is masked by document (:func:`short_conv`), the associative ops take the
global offsets themselves.

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
_BOUNDARY: contextvars.ContextVar = contextvars.ContextVar("tttla_jax_boundary_caches", default=False)


def boundary_caches() -> bool:
    """True inside :func:`mixer_apply`'s per-device calls of a fresh sequence (``cache=None``,
    unpacked): every cache a device receives is the state after a whole number of slices from
    an empty cache, so a mixer streaming fixed segments (TTT mini-batches, Titans TTT batches)
    whose slice length is a multiple of its segment knows statically that the cache's segment
    buffer is empty (:func:`tttla_jax.nn._segments.run_segments` then runs its no-buffer path
    from the cache's state)."""
    return _BOUNDARY.get()


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


def global_length(local_len: int, axis_name: Optional[str] = None) -> int:
    """Tokens of the whole sequence: ``P · local_len`` under :func:`sequence_parallel`
    (``local_len`` outside). Packed documents' ``cu_seqlens`` span ``0 … global_length``."""
    axis = sequence_axis() if axis_name is None else axis_name
    return local_len if axis is None else axis_size(axis) * local_len


def local_cu_seqlens(cu_seqlens, local_len: int, axis_name: Optional[str] = None) -> jax.Array:
    """This device's segments of N packed documents: the *global* offsets ``cu_seqlens``
    ``[N + 1]`` clipped to the slice, ``clip(cu − axis_index·L, 0, L)``. A document with no
    token on the device is an empty local segment; the first local segment may continue a
    document from the device before."""
    off = shard_offset(local_len, axis_name)
    return jnp.clip(jnp.asarray(cu_seqlens, jnp.int32) - off, 0, local_len)


def _check_global_cu(cu_seqlens, B: int, local_len: int, axis: str) -> int:
    """Validate global ``cu_seqlens`` for local slices ``[B, local_len, ...]``; returns N."""
    from tttla_jax._checks import check_cu_seqlens
    try:
        return check_cu_seqlens(cu_seqlens, B, axis_size(axis) * local_len)
    except ValueError as e:
        raise ValueError(f"{e} (under sequence parallelism cu_seqlens are the global offsets of "
                         f"the whole sequence: {axis_size(axis)} devices × {local_len} local "
                         f"tokens on axis {axis!r})") from None


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
                axis_name: Optional[str] = None, remat: bool = True, cu_seqlens=None):
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
      cu_seqlens: optional ``[N + 1]`` *global* offsets of N packed documents (``B = 1``,
        the same on every device, may be traced); the cache is then per document
        (``[N, ...]`` leaves, default ``mixer.init_cache(N)``).

    Returns:
      ``(y [B, T_local, W], cache)``: this slice of the single-device output and the cache
      after the last global token (the same on every device).

    ``P`` rounds (see the module doc): round ``r`` runs the mixer on every device from
    its incoming cache and ``ppermute`` s the returned cache to the next device; after
    ``P − 1`` rounds every incoming cache is exact and a last call gives the outputs.

    Packed documents need nothing more: every device calls the mixer with its local
    segments (:func:`local_cu_seqlens`) and the whole per-document cache. A document with no
    token on the device keeps its cache, so the cache a device passes on holds, for the
    document crossing the boundary, its state after the device's last token, and for every
    document that starts later, its start cache; the first local segment thus continues
    its document, every other one starts from its own cache entry.
    """
    axis = _resolve_axis(axis_name, "mixer_apply")
    P = axis_size(axis)
    from flax import nnx  # the only flax use in this package

    B, L = x.shape[0], x.shape[1]
    packed = cu_seqlens is not None
    NB = _check_global_cu(cu_seqlens, B, L, axis) if packed else B
    cache0 = mixer.init_cache(NB) if cache is None else cache
    local_cu = local_cu_seqlens(cu_seqlens, L, axis) if packed else None
    graphdef, state = nnx.split(mixer)

    fresh = cache is None and not packed  # every incoming cache: a whole number of slices from empty

    def local(state, x, c, positions, cu):
        kw = {} if cu is None else {"cu_seqlens": cu}
        token = _BOUNDARY.set(fresh)
        try:
            with sequence_parallel(None):  # per-device calls: plain local mixers
                return nnx.merge(graphdef, state)(x, cache=c, positions=positions, **kw)
        finally:
            _BOUNDARY.reset(token)

    step = jax.checkpoint(local) if remat else local
    # the rounds only hand on the cache: their outputs are not computed (nor rematerialised)
    cache_only = lambda *a: local(*a)[1]  # noqa: E731
    step_cache = jax.checkpoint(cache_only) if remat else cache_only
    if P == 1:
        return step(state, x, cache0, positions, local_cu)
    # every input varies over the axis, so per-device control flow inside the mixer (scan
    # carries, cond branches) sees one consistent type under shard_map's check_vma
    axes = frozenset({axis}).union(*(_vma(a) for a in jax.tree.leaves((x, state, cache0, positions))))
    state = jax.tree.map(lambda a: _varying(a, axes), state)
    if positions is not None:
        positions = _varying(jnp.asarray(positions), axes)
    first = lax.axis_index(axis) == 0
    start = jax.tree.map(lambda a: _varying(jnp.asarray(a), axes), cache0)

    def round_(c, _):
        out = step_cache(state, x, c, positions, local_cu)
        out = jax.tree.map(lambda o, a: o.astype(a.dtype), out, start)
        recv = lax.ppermute(out, axis, perm=[(j, j + 1) for j in range(P - 1)])
        return jax.tree.map(lambda a, b: jnp.where(first, a, b), start, recv), None

    incoming, _ = lax.scan(round_, start, None, length=P - 1)
    y, out = step(state, x, incoming, positions, local_cu)
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
    :func:`sequence_parallel`.) With global ``cu_seqlens`` the halo is masked by document and
    the states are per document (``[N, K−1, F]``)."""
    axis = _resolve_axis(None, "short_conv")
    if cu_seqlens is not None:
        return _short_conv_packed(conv, x, state, cu_seqlens, axis)
    if state is None:
        state = jnp.zeros((x.shape[0], conv.kernel_size - 1, x.shape[2]), x.dtype)
    with sequence_parallel(None):
        y, out = conv(x, halo(x, state, axis))
    return y, from_last_shard(out, axis)


def _short_conv_packed(conv, x, state, cu_seqlens, axis: str):
    """:func:`short_conv` of N packed documents (global ``cu_seqlens``, per-document states
    ``[N, K−1, F]``). The device convolves ``[halo ; x]`` with the documents' offsets
    shifted by the halo length ``K − 1``: a tap never reads a row of another document (a
    document that starts inside the halo or the slice reads its own state before its start;
    one that started earlier reads only its own rows). The halo's own outputs are dropped. A
    document's new state comes from the device holding its last token (a masked ``psum``);
    an empty document keeps its state."""
    B, L, F = x.shape
    N = _check_global_cu(cu_seqlens, B, L, axis)
    Km1 = conv.kernel_size - 1
    if state is None:
        state = jnp.zeros((N, Km1, F), x.dtype)
    if tuple(state.shape) != (N, Km1, F):
        raise ValueError(f"state: expected [N, kernel_size-1, F] = {(N, Km1, F)} (one state per packed "
                         f"sequence, N from cu_seqlens), got {tuple(state.shape)}")
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    off = shard_offset(L, axis)
    hist = halo(x, jnp.zeros((B, Km1, F), x.dtype), axis)          # the Km1 global rows before
    ext = jnp.concatenate([hist, x], axis=1)                        # [1, Km1 + L, F]
    ext_cu = jnp.clip(cu - off + Km1, 0, Km1 + L)
    with sequence_parallel(None):
        y, out = conv(ext, state, ext_cu)
    last = cu[1:] - 1 - off
    nonempty = cu[1:] > cu[:-1]
    owns = (nonempty & (last >= 0) & (last < L))[:, None, None]
    new = lax.psum(jnp.where(owns, out, jnp.zeros_like(out)), axis)
    new = jnp.where(nonempty[:, None, None], new, state.astype(new.dtype))
    return y[:, Km1:], new


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
        o, S = op(q, *args, initial_state=initial_state, axis_name=axis, **kw)
        if S is not None and axis in _vma(S):  # the same on every device: typed so (a masked psum)
            S = from_last_shard(S, axis)
        return o, S

    return call


def sequence_parallel_call(mixer, axis_name: str, x, *, cache=None, positions=None, cu_seqlens=None,
                           **kw):
    """A ``"pipelined"`` mixer's call under :func:`sequence_parallel` (the ``Mixer`` base
    class routes it here): :func:`mixer_apply` (``cu_seqlens``: the global offsets of packed
    documents), or, for the LaCT (ladder V2–V6) and Titans (linear memory) layers on a fresh
    sequence (any slice length; packed documents too) or a cache at a segment boundary with
    device-aligned segments, their combined form
    (:func:`tttla_jax.parallel.combine.combined_apply`; ``combine_reason`` says which applies).
    Other keyword arguments are rejected with a ``ValueError`` naming them."""
    extra = sorted(k for k, v in kw.items() if v is not None)
    if extra:
        raise ValueError(f"{type(mixer).__name__}: {extra} not supported by the pipelined "
                         f"sequence-parallel form (sequence axis {axis_name!r}); call the mixer "
                         f"outside `sequence_parallel(...)` or without them")
    from tttla_jax.parallel import combine
    if combine.combine_reason(mixer, x.shape[1], cache=cache, cu_seqlens=cu_seqlens) is None:
        if cache is None or cu_seqlens is not None:  # fresh, or packed documents continuing a cache
            return combine.combined_apply(mixer, x, positions=positions, axis_name=axis_name,
                                          cu_seqlens=cu_seqlens, cache=cache)
        # continuing a cache: combined at a segment boundary (combine.cache_at_boundary: Titans'
        # TTT-batch buffer empty, LaCT's chunk buffer empty or whole, in every row), else
        # pipelined — chosen at run time (the cache is the same on every device)
        from flax import nnx
        graphdef, state = nnx.split(mixer)

        def comb(state, x, cache, positions):
            return combine.combined_apply(nnx.merge(graphdef, state), x, positions=positions,
                                          axis_name=axis_name, cache=cache)

        def pipe(state, x, cache, positions):
            return mixer_apply(nnx.merge(graphdef, state), x, cache=cache, positions=positions,
                               axis_name=axis_name)

        return lax.cond(combine.cache_at_boundary(mixer, cache), comb, pipe, state, x, cache, positions)
    return mixer_apply(mixer, x, cache=cache, positions=positions, axis_name=axis_name,
                       cu_seqlens=cu_seqlens)


def sharded_mixer(mixer, x, *, mesh, seq_axis: str = "seq", batch_axes=None, cache=None,
                  positions=None, cu_seqlens=None):
    """Run ``mixer`` on a global ``x`` ``[B, T, W]`` sharded over ``mesh``'s ``seq_axis``.

    The outside wrapper (no ``shard_map`` to write): pads ``T`` at the end to a multiple
    of the axis size by repeating the last token (causality keeps the padding out of every
    real output and, the pad outputs being dropped, out of every gradient), shards the
    sequence over ``seq_axis`` (and the batch over ``batch_axes``, if given), runs the
    mixer under :func:`sequence_parallel` and returns ``y`` ``[B, T, W]``.

    ``positions`` ``[B, T]`` are padded with continuing positions. The final cache is not
    returned (with padding it would include the pad tokens); inside ``shard_map`` the mixer
    call returns it.

    ``cu_seqlens`` ``[N + 1]``: N packed documents in ``x`` ``[1, T, W]`` (a document may
    span devices; the padding extends the last one); ``cache`` is then per document.

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
    packed = {}
    if cu_seqlens is not None:
        from tttla_jax._checks import check_cu_seqlens
        check_cu_seqlens(cu_seqlens, B, T)
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        packed = {"cu_seqlens": cu.at[-1].set(T + pad)}  # the padding joins the last document
    # pad by repeating the last token (not zeros: an all-zero token can hit a layer's
    # singular point, e.g. the L2 norm's gradient at 0, and NaN * 0 would reach real gradients)
    xp = jnp.pad(x, [(0, 0), (0, pad), (0, 0)], mode="edge") if pad else x
    bspec = (baxes if len(baxes) != 1 else baxes[0]) if baxes else None
    spec = Pspec(bspec, seq_axis)
    graphdef, state = nnx.split(mixer)

    def body(state, x, cache, positions, packed):
        with sequence_parallel(seq_axis):
            y, _ = nnx.merge(graphdef, state)(x, cache=cache, positions=positions, **packed)
        return y

    y = jax.shard_map(body, mesh=mesh,
                      in_specs=(Pspec(), spec, Pspec() if packed else Pspec(bspec), spec, Pspec()),
                      out_specs=spec)(state, xp, cache, positions, packed)
    return y[:, :T]
