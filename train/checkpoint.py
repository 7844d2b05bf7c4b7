"""Checkpoints that never lose work: orbax ``CheckpointManager`` plus integrity checks.

A checkpoint (directory ``<run_dir>/ckpt/<step>``, written atomically by orbax: a
temporary directory renamed when complete) holds

* ``arrays``: every array of the training state (parameters, optimiser state, RNG key)
  as a flat ``{"a0000": ..., ...}`` dict in ``jax.tree`` leaf order;
* ``meta`` (JSON): the step, the config, the grain iterator state and a digest of all
  arrays (:func:`tttla_jax.train.distributed.checksum`: exact on-device sums, hashed).

Arrays may be sharded over a device mesh and over several processes: orbax writes each
shard from the process that owns it and restores into the shardings of the target
(``like_leaves`` ``jax.ShapeDtypeStruct`` s with ``sharding``), so a checkpoint can be
restored on another mesh. Restoring recomputes the digest; a checkpoint that fails to load or whose digest does
not match is reported, moved to ``<run_dir>/ckpt_corrupt/`` (never deleted) and the
next older one is tried.
"""
from __future__ import annotations

import hashlib
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


def _as_dict(leaves) -> dict:
    return {f"a{i:04d}": x for i, x in enumerate(leaves)}


class Checkpointer:
    """Save / restore the flat training state under ``<run_dir>/ckpt``."""

    def __init__(self, run_dir: str, keep: int):
        self.root = os.path.abspath(os.path.join(run_dir, "ckpt"))
        self.corrupt_dir = os.path.abspath(os.path.join(run_dir, "ckpt_corrupt"))
        self.keep = keep
        self._open()

    def _open(self):
        opts = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                            enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.root, options=opts,
                                             item_names=("arrays", "meta"))

    def steps(self) -> list:
        return sorted(self.manager.all_steps())

    def save(self, step: int, leaves, meta: dict) -> None:
        """Save ``leaves`` (jax or numpy arrays, possibly sharded) and ``meta`` (JSON).

        Every process must call it (orbax writes each shard from its owner; the JSON is
        written by process 0)."""
        leaves = list(leaves)
        meta = dict(meta, step=int(step), digest=checksum(leaves))
        self.manager.save(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(_as_dict(leaves)), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def _restore(self, step: int, like_leaves):
        target = _as_dict([x if isinstance(x, jax.ShapeDtypeStruct)
                           else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                           for x in like_leaves])
        out = self.manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        arrays, meta = out["arrays"], out["meta"]
        if set(arrays) != set(target):
            raise ValueError(f"array names differ from the training state ({len(arrays)} vs {len(target)})")
        leaves = [arrays[k] for k in sorted(target)]
        for k, a, t in zip(sorted(target), leaves, [target[k] for k in sorted(target)]):
            if a.shape != t.shape or a.dtype != t.dtype:
                raise ValueError(f"{k}: restored {a.dtype}{a.shape}, expected {t.dtype}{t.shape}")
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise ValueError(f"metadata does not describe step {step}: {str(meta)[:200]}")
        if checksum(leaves) != meta.get("digest"):
            raise ValueError("the checksum of the restored arrays does not match the one saved with them")
        return leaves, meta

    def restore_latest(self, like_leaves, log=print):
        """Newest checkpoint that loads and verifies: ``(step, leaves, meta)`` or ``None``.

        Bad checkpoints are reported via ``log`` and moved to ``ckpt_corrupt/``.
        """
        for step in reversed(self.steps()):
            try:
                leaves, meta = self._restore(step, like_leaves)
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
    return step, [np.asarray(arrays[k]) for k in sorted(arrays)], out["meta"]


def _eprint(*a):
    print(*a, file=sys.stderr, flush=True)
