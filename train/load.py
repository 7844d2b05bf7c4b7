"""Reuse a trained run: :func:`load_run` rebuilds the model a run directory describes.

A run directory (``runs/lm-tiny``, or whatever ``--ckpt-dir`` named) holds
``ckpt/<step>/`` checkpoints; each carries the full :class:`TrainConfig` of the run in its
metadata. :func:`load_run` reads that config, builds a fresh model from it
(:func:`tttla_jax.train.loop.build_model`, the same constructor training used) and restores
the parameters of the newest checkpoint that loads and passes its integrity check
(:meth:`tttla_jax.train.checkpoint.Checkpointer.restore_latest`; a damaged checkpoint is
reported and the previous one used). See ``docs/`` and ``python -m train.generate --help``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from tttla_jax.train.config import TrainConfig

__all__ = ["RunNotFoundError", "export_run_weights", "load_run", "read_run_config"]


class RunNotFoundError(FileNotFoundError):
    """The path is not a run directory, or it holds no usable checkpoint."""


def _steps(ckpt_root: str) -> list:
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_root)
                  if n.isdigit() and os.path.isdir(os.path.join(ckpt_root, n)))


def _config_from_dict(saved: dict) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # JSON turned the config's tuples into lists; fields unknown to this TrainConfig (a
    # run of another version) are not needed to rebuild the model
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    return TrainConfig(**kw)


def read_run_config(path: str) -> TrainConfig:
    """The :class:`TrainConfig` saved with the newest checkpoint of run directory ``path``
    whose metadata reads (no arrays are loaded)."""
    run_dir = os.path.abspath(os.fspath(path))
    if not os.path.isdir(run_dir):
        raise RunNotFoundError(f"run: no run directory at {run_dir!r} (expected a directory "
                               f"written by python -m train, e.g. runs/lm-tiny)")
    root = os.path.join(run_dir, "ckpt")
    steps = _steps(root)
    if not steps:
        raise RunNotFoundError(f"run: {run_dir!r} holds no checkpoint (expected {root}/<step>/; "
                               f"train it with python -m train --ckpt-dir {path})")
    errors = []
    for step in reversed(steps):
        meta_file = os.path.join(root, str(step), "meta", "metadata")
        try:
            with open(meta_file) as f:
                meta = json.load(f)
            return _config_from_dict(meta["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            errors.append(f"step {step}: {type(e).__name__}: {e}")
    raise RunNotFoundError(f"run: no checkpoint of {run_dir!r} has readable metadata ("
                           + "; ".join(errors)[:400] + ")")


def _restore(path: str, log):
    """``(config, model, step, rng_key)`` of the newest valid checkpoint of ``path``."""
    from tttla_jax.train.checkpoint import Checkpointer
    from tttla_jax.train.loop import build_model, make_optimizer

    cfg = read_run_config(path)
    with jax.enable_x64(False):  # as training ran (tttla_jax.train.loop.run)
        model = build_model(cfg)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx, _ = make_optimizer(cfg)
        shapes = (params, jax.eval_shape(tx.init, params),
                  jax.eval_shape(lambda: jax.random.key_data(jax.random.key(cfg.seed))))
        like_leaves, treedef = jax.tree.flatten(shapes)
        like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in like_leaves]
        ckpt = Checkpointer(os.fspath(path), keep=None)
        try:
            found = ckpt.restore_latest(like, log=log)
        finally:
            ckpt.close()
        if found is None:
            raise RunNotFoundError(f"run: no checkpoint of {os.path.abspath(path)!r} loads and "
                                   f"verifies (see the messages above)")
        step, leaves, _meta = found
        p, _opt, rng = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])
        model = nnx.merge(graphdef, p, rest)
        return cfg, model, int(step), jax.random.wrap_key_data(rng)


def load_run(path: str, *, log=None):
    """``(model, config)`` of a trained run.

    Args:
      path: a run directory written by ``python -m train`` (``runs/lm-tiny``, ``--ckpt-dir``).
      log: callable for notes (a damaged checkpoint skipped and moved to ``ckpt_corrupt/``,
        as on resume); default: print to stderr.

    Returns:
      ``model``: a fresh :class:`tttla_jax.nn.LanguageModel` (or the ViT classifier of a
      ``vit`` run) holding the parameters of the newest valid checkpoint;
      ``config``: the run's :class:`TrainConfig`. ``model.trained_step`` is the step of
      the checkpoint loaded and ``model.sample_key`` the run's saved RNG key (the key the
      end-of-training sample was drawn with).

    Raises:
      RunNotFoundError: ``path`` is not a directory, holds no checkpoint, or none of its
        checkpoints loads and verifies.
    """
    if log is None:
        log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    cfg, model, step, key = _restore(path, log)
    model.trained_step = step
    model.sample_key = key
    return model, cfg


def export_run_weights(path: str, *, log=None) -> dict:
    """The trained token mixers of a run, named and laid out as their PyTorch reference layers.

    Loads the run with :func:`load_run` and applies
    :func:`tttla_jax.nn.export_reference_weights` to every layer whose mixer has a
    reference implementation (``"lact"``: the LaCT ``lact_model`` layer; ``"ttt_linear"`` /
    ``"ttt_mlp"``: the official ``ttt.py`` layers). The embedding, norms, MLPs and the other
    mixers have no reference layer and are not exported.

    Returns:
      ``{layer index: {reference name: np.ndarray}}``, loadable into the reference layer
      after ``torch.from_numpy`` and by :func:`tttla_jax.nn.load_reference_weights`.

    Raises:
      RunNotFoundError: as :func:`load_run`.
      ValueError: no layer of the run has a reference implementation.
    """
    from tttla_jax.nn.weights import export_reference_weights

    model, cfg = load_run(path, log=log)
    blocks = getattr(model, "blocks", None)
    out = {}
    for i, block in enumerate(blocks if blocks is not None else []):
        mixer = getattr(block, "mixer", None)
        if hasattr(mixer, "reference_weight_map"):
            out[i] = export_reference_weights(mixer)
    if not out:
        raise ValueError(f"path: run {os.fspath(path)!r} has no layer with a PyTorch reference "
                         f"(mixers {tuple(cfg.mixers)}; expected one of 'lact', 'ttt_linear', 'ttt_mlp')")
    return out
