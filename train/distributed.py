"""Beyond one device: multi-host start, the ``("data", "fsdp")`` mesh and shardings.

The training step is written once, for global arrays; JAX's SPMD partitioner (``jax.jit``
with ``in_shardings``/``out_shardings``) inserts the collectives. What this module decides:

* **Processes** — :func:`init_distributed` calls :func:`jax.distributed.initialize` from the
  ``--coordinator/--num-processes/--process-id`` flags or the ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment variables (or with cluster
  auto-detection, ``--distributed on``), before any computation. A process that cannot
  reach the coordinator and its peers within ``--init-timeout`` seconds (default 120)
  fails with :class:`DistributedInitError`, one line naming the coordinator.
* **Mesh** — :func:`make_mesh`: a :class:`jax.sharding.Mesh` with axes ``("data", "fsdp")``
  (``--mesh data=2,fsdp=2``; default all devices on ``data``), plus ``"seq"`` when the spec
  names it (``--mesh data=2,seq=4``): sequence (context) parallelism.
* **Sequence parallelism** — with a ``"seq"`` axis every sequence is split over its devices
  (``T / seq`` tokens each); the loss runs in :func:`jax.shard_map` with the model under
  :func:`tttla_jax.parallel.sequence_parallel` (:func:`sequence_parallel_loss`): every mixer
  sees its device's slice (pipelined or associative, docs/context_parallel.md), positions
  are global, and the summed masked NLL is ``psum``-ed over all mesh axes. Parameters are
  replicated over ``"seq"`` (gathered from ``"fsdp"`` inside the loss).
* **Parameters** — every parameter carries logical axis names
  (``nnx.with_partitioning``, see :mod:`tttla_jax.nn.layers`). :data:`LOGICAL_RULES` maps
  each logical name to the mesh axis it may be sharded over; FSDP (ZeRO-3 style) shards
  the *largest* dimension whose logical name maps to ``"fsdp"`` and whose size divides by
  the fsdp axis size; a parameter with no such dimension is replicated. Parameters are
  replicated over ``"data"``. The optimiser state follows the parameters it belongs to
  (:func:`optax.tree_map_params`); its counters are replicated.
* **Batches** — sharded over ``("data", "fsdp")`` jointly on the batch axis: every device
  holds ``batch_size / (data·fsdp)`` rows. Each process reads only its own rows (grain
  ``ShardOptions(shard_index=process_index, shard_count=process_count)``, see
  :mod:`tttla_jax.train.data`) and :func:`global_batch` assembles the global array with
  :func:`jax.make_array_from_process_local_data`.
* **Data-iterator state** — grain's iterator state depends on the process index; the
  checkpoint stores it in the single-process form (:func:`data_state_to_global`) and each
  process converts it back (:func:`data_state_to_local`), so a run can be resumed with a
  different number of processes.
* **Integrity** — :func:`checksum` digests the training state on the devices (exact
  uint32 sums, independent of the sharding and of the process count), so checkpoints of
  sharded states are verified without gathering them on one host.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
SEQ_AXIS = "seq"  # optional third axis: sequence (context) parallelism
MESH_SPEC_AXES = MESH_AXES + (SEQ_AXIS,)

# logical axis name (tttla_jax.nn.layers) -> mesh axis it may be sharded over (None: never).
LOGICAL_RULES = {
    "vocab": "fsdp",
    "embed": "fsdp",
    "heads": "fsdp",
    "mlp": "fsdp",
    "head_dim": None,   # small per-head vectors
    "conv": None,       # a handful of kernel taps
}


def parse_mesh(spec: str) -> dict:
    """``"data=2,fsdp=2"`` -> ``{"data": 2, "fsdp": 2}``; ``""`` -> ``{}`` (all on data).

    Axes: ``data``, ``fsdp`` and ``seq`` (sequence parallelism), each at most once.

    Raises:
      ValueError: naming ``mesh``, the string and the expected form.
    """
    if not isinstance(spec, str):
        raise ValueError(f"mesh: expected a string like 'data=2,fsdp=2,seq=2', got {spec!r}")
    out = {}
    if not spec.strip():
        return out
    for part in spec.split(","):
        name, eq, size = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in MESH_SPEC_AXES or name in out:
            raise ValueError(f"mesh: expected comma-separated axis=size with axes from {MESH_SPEC_AXES} "
                             f"(each at most once), e.g. 'data=2,fsdp=2' or 'data=2,seq=4'; "
                             f"got {spec!r}")
        try:
            n = int(size)
        except ValueError:
            n = 0
        if n <= 0:
            raise ValueError(f"mesh: axis {name!r} needs a positive integer size, got {size.strip()!r} "
                             f"in {spec!r}")
        out[name] = n
    return out


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}: expected an integer environment variable, got {v!r}") from None


def init_distributed(cfg) -> bool:
    """Call :func:`jax.distributed.initialize` if the config / environment asks for it.

    Flags win over the environment. Returns whether it was called. Must run before any
    JAX computation (``python -m train`` calls it right after parsing the arguments).
    """
    if cfg.distributed == "off":
        return False
    coord = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
    nproc = cfg.num_processes or _env_int("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int("JAX_PROCESS_ID")
    if cfg.distributed == "auto" and coord is None and nproc is None and pid is None:
        return False
    if jax.distributed.is_initialized():
        return True
    timeout = int(getattr(cfg, "init_timeout", 120))
    print(f"multi-process start: process {pid} of {nproc}, coordinator {coord or '(auto-detected)'}; "
          f"waiting up to {timeout} s (--init-timeout) for the peers", file=sys.stderr, flush=True)
    if coord and pid:  # the runtime aborts the process on a timeout: probe the coordinator first
        _wait_for_coordinator(coord, timeout, pid, nproc)
    try:
        jax.distributed.initialize(coordinator_address=coord, num_processes=nproc, process_id=pid,
                                   initialization_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - the runtime raises several types; all mean "no peers"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DistributedInitError(
            f"multi-process start failed: process {pid} of {nproc} could not reach the coordinator "
            f"{coord or '(auto-detected)'} and its peers within --init-timeout {timeout} s "
            f"({type(e).__name__}: {first}); check that every process was started with the same "
            f"--coordinator and --num-processes") from None
    return True


class DistributedInitError(RuntimeError):
    """A multi-process start could not reach its peers within ``init_timeout`` seconds."""


def _wait_for_coordinator(coord: str, timeout: float, pid, nproc) -> None:
    """Retry a TCP connection to ``host:port`` until it succeeds or ``timeout`` s pass."""
    import socket
    import time
    host, _, port = coord.rpartition(":")
    deadline = time.monotonic() + timeout
    err = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except (OSError, ValueError) as e:
            err = e
            time.sleep(0.2)
    raise DistributedInitError(
        f"multi-process start failed: process {pid} of {nproc} could not reach the coordinator "
        f"{coord} within --init-timeout {timeout} s ({type(err).__name__}: {err}); start process 0 "
        f"there, or check --coordinator")


def make_mesh(spec: str) -> Mesh:
    """The ``("data", "fsdp")`` mesh described by ``spec`` (see :func:`parse_mesh`), with a
    third axis ``"seq"`` if ``spec`` names it.

    ``""`` puts every device on ``data``; without ``data``, ``data`` gets the devices left
    by the other axes. In a single process the mesh may use only the first
    ``data·fsdp·seq`` devices; with several processes it must cover all of them.

    Raises:
      ValueError: naming ``mesh`` if the sizes do not fit the devices.
    """
    sizes = parse_mesh(spec)
    n = jax.device_count()
    axes = MESH_AXES + ((SEQ_AXIS,) if SEQ_AXIS in sizes else ())
    if "data" not in sizes:
        f = sizes.get("fsdp", 1) * sizes.get(SEQ_AXIS, 1)
        if n % f:
            what = " x ".join(f"{a}={sizes[a]}" for a in axes[1:] if a in sizes)
            raise ValueError(f"mesh: {what} = {f} does not divide the {n} devices")
        sizes["data"] = n // f
    sizes.setdefault("fsdp", 1)
    shape = tuple(sizes[a] for a in axes)
    used = int(np.prod(shape))
    if used > n or (jax.process_count() > 1 and used != n):
        what = " x ".join(f"{a}={k}" for a, k in zip(axes, shape))
        raise ValueError(f"mesh: {what} = {used} devices, but there are {n} "
                         f"({jax.process_count()} process(es)); "
                         f"{'must equal' if jax.process_count() > 1 else 'must be at most'} {n}")
    if used == n:
        devices = jax.make_mesh(shape, axes).devices  # topology-aware device order
    else:
        devices = np.asarray(jax.devices()[:used]).reshape(shape)
    return Mesh(devices, axes)


def seq_size(mesh: Mesh) -> int:
    """Devices on the sequence axis (1 without one)."""
    return int(dict(mesh.shape).get(SEQ_AXIS, 1))


def mesh_key(mesh: Mesh) -> tuple:
    """A hashable identity of ``mesh`` (axis sizes and device ids), for compile caches."""
    return tuple(mesh.shape.items()), tuple(int(dev.id) for dev in mesh.devices.flat)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def spec_for(shape: tuple, logical: Optional[tuple], mesh: Mesh) -> P:
    """The :class:`PartitionSpec` of one parameter (see the module docstring).

    Among the dimensions whose logical name maps to ``"fsdp"`` in :data:`LOGICAL_RULES`,
    the largest one divisible by the fsdp axis size is sharded (the first on ties);
    everything else is replicated.
    """
    f = mesh.shape["fsdp"]
    if f == 1 or not logical:
        return P()
    best = None
    for i, (size, name) in enumerate(zip(shape, logical)):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} has no mesh rule; add it to "
                             f"tttla_jax.train.distributed.LOGICAL_RULES (known: {tuple(LOGICAL_RULES)})")
        if LOGICAL_RULES.get(name) == "fsdp" and size % f == 0 and (best is None or size > shape[best]):
            best = i
    if best is None:
        return P()
    return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def _logical_names(var) -> Optional[tuple]:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    for key in ("out_sharding", "sharding", "sharding_names"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def param_shardings(params, mesh: Mesh):
    """NamedShardings for an ``nnx.State`` of parameters (same tree structure)."""
    from flax import nnx

    def one(var):
        if isinstance(var, nnx.Variable):
            value = var[...]
            spec = spec_for(tuple(value.shape), _logical_names(var), mesh)
            return var.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(tree, mesh: Mesh):
    """Replicated NamedShardings for every leaf of ``tree`` (same structure)."""
    return jax.tree.map(lambda _: replicated(mesh), tree)


def opt_shardings(tx, opt_state, p_shardings, mesh: Mesh):
    """Optimiser-state shardings: moments like their parameters, counters replicated."""
    return optax_tree_map_params(tx, lambda _, s: s, opt_state, p_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def optax_tree_map_params(tx, f, state, *rest, transform_non_params):
    import optax
    return optax.tree_map_params(tx, f, state, *rest, transform_non_params=transform_non_params)


def batch_sharding(mesh: Mesh, seq_len: Optional[int] = None) -> NamedSharding:
    """Batch axis over ``("data", "fsdp")`` jointly, other axes replicated; with a ``"seq"``
    axis that divides ``seq_len``, the token axis over ``"seq"`` too (``[B, T]`` arrays).
    (Otherwise — ``seq_len=None``, e.g. for batches with packed documents' ``cu_seqlens`` —
    the rows stay whole on every sequence device and the loss pads and splits them, see
    :func:`sequence_parallel_loss`.)"""
    if seq_size(mesh) > 1 and seq_len is not None and seq_len % seq_size(mesh) == 0:
        return NamedSharding(mesh, P(BATCH_AXES, SEQ_AXIS))
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def process_row_block(mesh: Mesh) -> tuple:
    """``(block, blocks)``: this process addresses rows ``[block·B/blocks, (block+1)·B/blocks)``
    of every global ``[B, …]`` batch, so it reads exactly those rows.

    The rows are split over ``("data", "fsdp")``; processes that differ only along other
    axes (a ``"seq"`` axis spanning processes) hold the same rows and read the same block.
    With the batch axes spanning the processes, ``blocks`` is the process count.

    Raises:
      ValueError: naming ``mesh`` if this process's row shards are not one contiguous,
        aligned block (a device order :func:`make_mesh` does not produce).
    """
    rows = batch_shards(mesh)
    idx = NamedSharding(mesh, P(BATCH_AXES)).addressable_devices_indices_map((rows,))
    mine = sorted({s[0].indices(rows)[0] for s in idx.values()})
    n = len(mine)
    if mine != list(range(mine[0], mine[0] + n)) or mine[0] % n or rows % n:
        raise ValueError(f"mesh: process {jax.process_index()} addresses the row shards {mine} of "
                         f"{rows}; expected one contiguous block of equal size on every process")
    return mine[0] // n, rows // n


def sequence_parallel_loss(forward, mesh: Mesh):
    """``forward(params, rest, batch) -> sums`` run with every sequence split over ``"seq"``.

    ``forward`` computes per-batch *sums* (e.g. masked NLL, token count, correct count) of
    one model on a batch of ``[B, T]`` arrays (``inputs``, ``targets``, ``mask``); the
    returned function computes the same sums with ``T`` split over the mesh's ``"seq"`` axis:
    the rows are padded at the end to a multiple of the axis size (``mask`` False there:
    causality keeps padding out of every real position), :func:`jax.shard_map` gives each
    device ``[B / (data·fsdp), T / seq]``, ``forward`` runs under
    :func:`tttla_jax.parallel.sequence_parallel` and its sums are ``psum``-ed over every
    mesh axis. Parameters enter replicated (the partitioner gathers FSDP shards).

    Packed documents: a ``cu_seqlens`` ``[B, N + 1]`` entry (one row of *global* offsets per
    sequence) enters whole on every sequence device (split over the batch axes only); the
    padding joins each row's last document (masked out, after every real token of it), so a
    document may span any number of devices (docs/context_parallel.md).
    """
    from tttla_jax.parallel import sequence_parallel

    P_ = seq_size(mesh)
    axes = tuple(mesh.axis_names)

    def body(params, rest, batch):
        with sequence_parallel(SEQ_AXIS):
            out = forward(params, rest, batch)
        return jax.tree.map(lambda a: jax.lax.psum(a, axes), out)

    def run(params, rest, batch):
        bad = sorted(k for k, v in batch.items() if jnp.ndim(v) != 2)
        if bad:
            raise ValueError(f"batch: sequence parallelism needs [B, T] arrays (and cu_seqlens [B, N + 1]), "
                             f"got {bad} with shapes {[tuple(batch[k].shape) for k in bad]}")
        T = batch["inputs"].shape[1]
        pad = -T % P_
        if pad:  # padding at the end: masked out, and causal mixers never read it
            batch = {k: (v.at[:, -1].set(T + pad) if k == "cu_seqlens" else jnp.pad(v, [(0, 0), (0, pad)]))
                     for k, v in batch.items()}
        specs = {k: P(BATCH_AXES) if k == "cu_seqlens" else P(BATCH_AXES, SEQ_AXIS) for k in batch}
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), specs), out_specs=P())(
            params, rest, batch)

    return run


def global_batch(local: dict, sharding: NamedSharding, global_rows: int) -> dict:
    """Assemble this process's rows (numpy) into global ``jax.Array`` s."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
    return out


def process_rows(batch: dict, block: int, blocks: int) -> dict:
    """Row block ``block`` of ``blocks`` of a global numpy batch (this process's rows of an eval
    set: ``block, blocks = process_row_block(mesh)``)."""
    p, n = block, blocks
    rows = len(next(iter(batch.values())))
    per = rows // n
    return {k: v[p * per:(p + 1) * per] for k, v in batch.items()}


# ----------------------------------------------------------------- grain iterator state

_LSI = "last_seen_indices"


def data_state_to_global(state: bytes, process_index: int, process_count: int) -> str:
    """The grain ``DataLoader`` state of process ``process_index`` in single-process form.

    With ``worker_count=0`` and ``ShardOptions(i, n)`` grain stores
    ``last_seen = i - n + next_local * n``; the single-process form is
    ``next_global - 1`` with ``next_global = next_local * n`` (every process has
    consumed the same number of records).
    """
    s = json.loads(state)
    if s.get("worker_count", 0) != 0 or set(s[_LSI]) != {"0"}:
        raise ValueError(f"data state: expected a worker_count=0 grain state, got {s}")
    i, n = process_index, process_count
    next_local = (int(s[_LSI]["0"]) - (i - n)) // n
    s[_LSI]["0"] = next_local * n - 1
    return json.dumps(s, indent=4)


def data_state_to_local(state: str, process_index: int, process_count: int) -> bytes:
    """Inverse of :func:`data_state_to_global` for process ``process_index`` of ``process_count``."""
    s = json.loads(state)
    i, n = process_index, process_count
    next_global = int(s[_LSI]["0"]) + 1
    if next_global % n:
        raise ValueError(f"data state: {next_global} records consumed do not split over "
                         f"{n} processes")
    s[_LSI]["0"] = next_global - n + i
    return json.dumps(s, indent=4).encode()


# ----------------------------------------------------------------- integrity checksum

def _as_u32(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32).reshape(-1)
    if size == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32).reshape(-1)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    raise ValueError(f"checksum: unsupported dtype {x.dtype}")


def _leaf_sums(x):
    u = _as_u32(x)
    i = jnp.arange(u.shape[0], dtype=jnp.uint32)
    a = jnp.sum(u * (2 * i + 1), dtype=jnp.uint32)
    rot = (u << 13) | (u >> 19)
    b = jnp.sum((rot ^ (i * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B), dtype=jnp.uint32)
    c = jnp.sum(u, dtype=jnp.uint32)
    return jnp.stack([a, b, c])


@jax.jit
def _sums(leaves):
    return [_leaf_sums(x) for x in leaves]


def checksum(leaves) -> str:
    """Digest of a list of (possibly sharded, possibly multi-process) arrays.

    Three exact uint32 sums per array over its bits (position-weighted, mixed and
    plain; integer addition is associative, so the result does not depend on how the
    array is sharded or on the number of processes), hashed with the dtypes and shapes
    by SHA-256. Any change of a value changes the position-weighted sum with
    probability about ``1 - 2^-32``.
    """
    leaves = list(leaves)
    with jax.enable_x64(False):
        sums = _sums([x if isinstance(x, jax.Array) else np.asarray(x) for x in leaves])
        sums = [np.asarray(s) for s in sums]  # replicated outputs: readable on every process
    h = hashlib.sha256()
    for x, s in zip(leaves, sums):
        h.update(f"{np.dtype(x.dtype).str}{tuple(x.shape)}".encode())
        h.update(s.astype("<u4").tobytes())
    return h.hexdigest()
