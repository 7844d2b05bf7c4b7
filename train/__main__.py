"""``python -m train`` (from the repository root) or ``python -m tttla_jax.train`` (anywhere
after install): the main training job (see ``python -m train --help``).

With no arguments: preset ``lm-tiny``, a 2-layer byte-level LM on Python's embedded
``pydoc_data`` text in the LaCT-LLM style — a LaCT layer (V0: SwiGLU fast weights,
Muon, momentum, per-token lr) with its in-layer sliding-window attention branch, then a
sliding-window attention layer; 250 steps, held-out 2.55 bits/byte, 1 min 31 s on the
nearly idle 2-core machine (2 min 45 s at load average ~4).
Checkpoints, ``metrics.jsonl`` and ``loss.png`` in ``runs/lm-tiny/``; running it again
writes ``runs/lm-tiny-2/`` (``--resume`` continues the most recent run). Multi-device:
``--mesh data=2,fsdp=2``; multi-host: ``--coordinator host:port --num-processes N
--process-id i`` (or the ``JAX_*`` environment variables), see
:mod:`tttla_jax.train.distributed`.
"""
import sys

from tttla_jax.train.checkpoint import CheckpointDirError
from tttla_jax.train.config import parse_args


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from tttla_jax.train.distributed import DistributedInitError, init_distributed
    try:
        init_distributed(cfg)  # multi-host: before any JAX computation
    except DistributedInitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tttla_jax.train.loop import NonFiniteError, run  # after argument parsing: --help stays fast
    from tttla_jax.train.checkpoint import CheckpointWriteError
    try:
        run(cfg)
    except CheckpointDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
