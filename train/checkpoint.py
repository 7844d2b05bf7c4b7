"""Checkpoints that never lose work: orbax ``CheckpointManager`` plus integrity checks.

A checkpoint (directory ``<run_dir>/ckpt/<step>``, written atomically by orbax: a
temporary directory renamed when complete) holds

* ``arrays``: every array of the training state (parameters, optimiser state, RNG key)
  as a flat dict keyed by its path name (:func:`state_names`, e.g.
  ``params.blocks.0.mixer.q_proj.kernel``, ``opt_state.1.0.mu.embed.embedding``, ``rng``);
  ``meta["names"]`` lists them in ``jax.tree`` leaf order. Checkpoints of the earlier
  format (unnamed ``a0000``, ``a0001``, ... in leaf order) still restore;
* ``meta`` (JSON): the step, the config, the grain iterator state, the count of skipped
  non-finite steps, a digest of all arrays (:func:`tttla_jax.train.distributed.checksum`:
  exact on-device sums, hashed) and ``meta_digest``, a SHA-256 of every other metadata
  field: resume trusts nothing it has not verified (arrays, RNG key, data-iterator state,
  config). Checkpoints written before ``meta_digest`` existed still resume (the arrays
  are verified; a note says the metadata is not).

Never saved: a state with a non-finite value (:class:`NonFiniteError`). A failed write
(disk full, unwritable directory) raises :class:`CheckpointWriteError` with one line;
the earlier checkpoints are untouched (orbax writes into ``<step>.orbax-checkpoint-tmp``
and renames it when complete). Such temporary directories left by a kill or a failed
write are removed when the next run opens the directory (with a message).

Arrays may be sharded over a device mesh and over several processes: orbax writes each
shard from the process that owns it and restores into the shardings of the target
(``like_leaves`` ``jax.ShapeDtypeStruct`` s with ``sharding``), so a checkpoint can be
restored on another mesh. Restoring recomputes the digest; a checkpoint that fails to load or whose digest does
not match is reported, moved to ``<run_dir>/ckpt_corrupt/`` (never deleted) and the
next older one is tried.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from tttla_jax.train.distributed import checksum


class CheckpointDirError(RuntimeError):
    """The run directory cannot be written."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint or the metrics failed (disk full, unwritable path, ...)."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or state."""


TMP_SUFFIX = ".orbax-checkpoint-tmp"


def meta_digest(meta: dict) -> str:
    """SHA-256 of every metadata field except ``meta_digest`` itself (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def all_finite(leaves) -> bool:
    """Whether every floating-point value of ``leaves`` is finite (computed on device, in one
    compiled program: with sharded leaves, one launch on every device instead of one per leaf)."""
    import jax.numpy as jnp
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_all_finite(floats)) if floats else True


@jax.jit
def _all_finite(leaves):
    import jax.numpy as jnp
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _os_error(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def describe_write_error(e: BaseException) -> str:
    """One line for a failed write: the OS error if there is one in the chain."""
    ose = _os_error(e)
    if ose is not None:
        return f"{type(ose).__name__}: {ose.strerror or ose}" + (f" (errno {ose.errno})" if ose.errno else "")
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}"


def check_writable(run_dir: str) -> None:
    """Create ``run_dir`` and write/remove a probe file, or raise a clear error early."""
    path = os.path.abspath(run_dir)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise CheckpointDirError(
            f"checkpoint directory {path!r} is not writable ({type(e).__name__}: {e.strerror or e}); "
            f"choose another one with --ckpt-dir") from None


def digest(leaves) -> str:
    h = hashlib.sha256()
    for x in leaves:
        a = np.asarray(x)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _as_dict(leaves, names=None) -> dict:
    names = names or _legacy_names(len(leaves))
    return dict(zip(names, leaves))


def _legacy_names(n: int) -> list:
    return [f"a{i:04d}" for i in range(n)]


_TOP = ("params", "opt_state", "rng")


def state_names(state) -> list:
    """Path names of the leaves of ``state = (params, opt_state, rng)`` in leaf order:
    ``params.blocks.0.mixer.q_proj.kernel`` (NNX parameter paths; the ``.value`` of a
    variable dropped), ``opt_state.<optax path>``, ``rng``."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        parts = []
        for i, k in enumerate(path):
            if isinstance(k, jax.tree_util.SequenceKey):
                parts.append(_TOP[k.idx] if i == 0 and len(_TOP) > k.idx else str(k.idx))
            elif isinstance(k, jax.tree_util.DictKey):
                parts.append(str(k.key))
            elif isinstance(k, jax.tree_util.GetAttrKey):
                parts.append(k.name)
            else:
                parts.append(str(getattr(k, "idx", getattr(k, "key", k))))
        if len(parts) > 1 and parts[-1] == "value":
            parts.pop()
        out.append(".".join(parts))
    if len(set(out)) != len(out):
        raise AssertionError("state_names: two leaves share a path name")
    return out


def _saved_names(meta: dict, n_saved: int) -> list:
    """Leaf-order names of a checkpoint: ``meta["names"]`` or the earlier unnamed format."""
    names = meta.get("names") if isinstance(meta, dict) else None
    return list(names) if names else _legacy_names(n_saved)


class Checkpointer:
    """Save / restore the flat training state under ``<run_dir>/ckpt``."""

    def __init__(self, run_dir: str, keep: int, log=print):
        self.root = os.path.abspath(os.path.join(run_dir, "ckpt"))
        self.corrupt_dir = os.path.abspath(os.path.join(run_dir, "ckpt_corrupt"))
        self.keep = keep
        self.log = log
        self._open()

    def clean_tmp(self) -> list:
        """Remove ``*.orbax-checkpoint-tmp`` directories (an interrupted or failed save).

        Only the run that trains in this directory calls it (at its start): a reader
        (``load_run``) must not remove the save in flight of a run still training."""
        removed = []
        if jax.process_index() == 0 and os.path.isdir(self.root):
            for name in sorted(os.listdir(self.root)):
                if TMP_SUFFIX in name:
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                    removed.append(name)
            if removed:
                self.log(f"removed {len(removed)} incomplete checkpoint(s) left by an interrupted or "
                         f"failed save in {self.root}: {', '.join(removed)}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("clean incomplete checkpoints")
        return removed

    def _open(self):
        opts = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                            enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.root, options=opts,
                                             item_names=("arrays", "meta"))

    def steps(self) -> list:
        return sorted(self.manager.all_steps())

    def save(self, step: int, leaves, meta: dict, names=None) -> None:
        """Save ``leaves`` (jax or numpy arrays, possibly sharded) and ``meta`` (JSON),
        the arrays keyed by ``names`` (leaf order, :func:`state_names`; default the
        unnamed ``a0000`` ... keys).

        Every process must call it (orbax writes each shard from its owner; the JSON is
        written by process 0)."""
        leaves = list(leaves)
        if not all_finite(leaves):
            raise NonFiniteError(f"the training state at step {step} holds non-finite values; "
                                 f"checkpoint not written (kept: steps {self.steps()} in {self.root})")
        meta = dict(meta, step=int(step), digest=checksum(leaves))
        if names is not None:
            if len(names) != len(leaves):
                raise ValueError(f"names: expected {len(leaves)} names, got {len(names)}")
            meta["names"] = list(names)
        meta["meta_digest"] = meta_digest(meta)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(_as_dict(leaves, names)), meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any failed write ends the run with one line
            if jax.process_index() == 0:
                shutil.rmtree(os.path.join(self.root, f"{step}{TMP_SUFFIX}"), ignore_errors=True)
            kept = sorted(n for n in (os.listdir(self.root) if os.path.isdir(self.root) else [])
                          if n.isdigit())
            raise CheckpointWriteError(
                f"writing checkpoint step {step} to {self.root} failed ({describe_write_error(e)}); "
                f"the earlier checkpoints (steps {[int(n) for n in sorted(kept, key=int)]}) are intact: "
                f"free space or fix the directory, then rerun with --resume") from None

    def _restore(self, step: int, like_leaves, names=None):
        like = [x if isinstance(x, jax.ShapeDtypeStruct)
                else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in like_leaves]
        meta0 = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved = _saved_names(meta0, len(like))
        if names is not None and meta0.get("names") and list(names) != saved:
            diff = sorted(set(names) ^ set(saved))[:4]
            raise ValueError(f"array names differ from the training state (e.g. {diff})")
        if len(saved) != len(like):
            raise ValueError(f"the checkpoint holds {len(saved)} arrays, the training state {len(like)}")
        target = dict(zip(saved, like))
        out = self.manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        arrays, meta = out["arrays"], out["meta"]
        if set(arrays) != set(target):
            raise ValueError(f"array names differ from the training state ({len(arrays)} vs {len(target)})")
        leaves = [arrays[k] for k in saved]
        for k, a, t in zip(saved, leaves, like):
            if a.shape != t.shape or a.dtype != t.dtype:
                raise ValueError(f"{k}: restored {a.dtype}{a.shape}, expected {t.dtype}{t.shape}")
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise ValueError(f"metadata does not describe step {step}: {str(meta)[:200]}")
        if checksum(leaves) != meta.get("digest"):
            raise ValueError("the checksum of the restored arrays does not match the one saved with them")
        _check_meta(meta, step, self.log)
        return leaves, meta

    def restore_latest(self, like_leaves, log=print, names=None):
        """Newest checkpoint that loads and verifies: ``(step, leaves, meta)`` or ``None``.

        ``leaves`` come in the order of ``like_leaves`` (the training state's leaf order);
        ``names`` (:func:`state_names`), when given, must match the checkpoint's (a
        checkpoint of the earlier unnamed format restores by position). Bad checkpoints
        are reported via ``log`` and moved to ``ckpt_corrupt/``.
        """
        for step in reversed(self.steps()):
            try:
                leaves, meta = self._restore(step, like_leaves, names)
            except Exception as e:  # noqa: BLE001 - any failure means "do not trust it"
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                dest = self.quarantine(step)
                log(f"CORRUPTED CHECKPOINT: step {step} in {self.root} failed to restore "
                    f"({type(e).__name__}: {msg}); moved to {dest}; trying the previous checkpoint")
                continue
            return step, leaves, meta
        return None

    def quarantine(self, step: int) -> str:
        """Move checkpoint ``step`` to ``ckpt_corrupt/`` (process 0 moves, all wait)."""
        src = os.path.join(self.root, str(step))
        dest = os.path.join(self.corrupt_dir, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_dir, exist_ok=True)
            if os.path.exists(dest):
                dest += f"-{os.getpid()}"
            shutil.move(src, dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.close()
        self._open()
        return dest

    def close(self):
        self.manager.close()


def _check_meta(meta: dict, step: int, log) -> None:
    if "meta_digest" not in meta:
        log(f"note: checkpoint step {step} predates metadata checksums: its arrays are verified, "
            f"its config and data-iterator state are not")
    elif meta_digest(meta) != meta["meta_digest"]:
        raise ValueError("the checksum of the metadata (config, data-iterator state, step) does not "
                         "match the one saved with it")


def restore_latest_valid(run_dir: str, log=print):
    """Newest checkpoint of ``run_dir`` that loads and verifies, without a template.

    Returns ``(step, leaves, meta)`` (``leaves``: numpy arrays in the training state's
    ``jax.tree`` leaf order, whatever mesh saved them; ``meta``: the JSON metadata with
    ``config``) or ``None`` when no checkpoint verifies. Read-only: a bad checkpoint is
    reported via ``log`` and skipped, not moved.
    """
    root = os.path.abspath(os.path.join(run_dir, "ckpt"))
    if not os.path.isdir(root):
        return None
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers={"arrays": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                shapes = mngr.item_metadata(step)["arrays"]
                like = {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}
                out = mngr.restore(step, args=ocp.args.Composite(
                    arrays=ocp.args.StandardRestore(like), meta=ocp.args.JsonRestore()))
                arrays, meta = out["arrays"], out["meta"]
                leaves = [np.asarray(arrays[k]) for k in _saved_names(meta, len(arrays))]
                if not isinstance(meta, dict) or meta.get("step") != step:
                    raise ValueError(f"metadata does not describe step {step}")
                if checksum(leaves) != meta.get("digest"):
                    raise ValueError("the checksum of the arrays does not match the one saved with them")
                _check_meta(meta, step, log)
            except Exception as e:  # noqa: BLE001 - any failure means "do not trust it"
                msg = (str(e).strip().splitlines() or [""])[0][:300]
                log(f"CORRUPTED CHECKPOINT: step {step} in {root} ({type(e).__name__}: {msg}); "
                    f"trying the previous checkpoint")
                continue
            return step, leaves, meta
        return None
    finally:
        mngr.close()


def load_final(run_dir: str):
    """``(step, leaves (list of numpy arrays, leaf order), meta)`` of the newest checkpoint,
    without a template (for tests and inspection)."""
    root = os.path.abspath(os.path.join(run_dir, "ckpt"))
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers={"arrays": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})
    step = mngr.latest_step()
    shapes = mngr.item_metadata(step)["arrays"]  # restore as numpy, whatever mesh saved it
    like = {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    out = mngr.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(like),
                                                     meta=ocp.args.JsonRestore()))
    mngr.close()
    arrays = out["arrays"]
    return step, [np.asarray(arrays[k]) for k in _saved_names(out["meta"], len(arrays))], out["meta"]


def _eprint(*a):
    print(*a, file=sys.stderr, flush=True)
