"""Training entry points: config, data (grain), MQAR, ViT digits, checkpoints, the loop and the
paper's ladder at small scale.

Installed inside the package as ``tttla_jax.train`` (the source folder is ``train/`` at the
repository root, mapped like ``kernels/``), so ``python -m tttla_jax.train`` works from
anywhere after ``pip install``; from the repository root ``python -m train`` runs the same
code. The modules import each other as ``tttla_jax.train.*`` whichever way they were
started, so a process holds one copy of them (one ``TrainConfig`` class, one registry).
"""

__all__ = ["load_run"]


def __getattr__(name):
    # lazy, so ``python -m train --help`` does not import the loader (flax, orbax)
    if name == "load_run":
        from tttla_jax.train.load import load_run
        return load_run
    raise AttributeError(f"module 'tttla_jax.train' has no attribute {name!r}")
