"""``python -m train``: the main training job (see ``python -m train --help``).

With no arguments: preset ``lm-tiny``, a 2-layer byte-level LM on Python's embedded
``pydoc_data`` text in the LaCT-LLM style — a LaCT layer (V0: SwiGLU fast weights,
Muon, momentum, per-token lr) with its in-layer sliding-window attention branch, then a
sliding-window attention layer; 250 steps, held-out 2.55 bits/byte, 2 min 45 s on the
2-core machine shared at load average ~4 (idle-machine time not measured).
Checkpoints, ``metrics.jsonl`` and ``loss.png`` in ``runs/lm-tiny/``; running it again
writes ``runs/lm-tiny-2/`` (``--resume`` continues the most recent run). Multi-device:
``--mesh data=2,fsdp=2``; multi-host: ``--coordinator host:port --num-processes N
--process-id i`` (or the ``JAX_*`` environment variables), see train/distributed.py.
"""
import sys

from train.checkpoint import CheckpointDirError
from train.config import parse_args


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from train.distributed import init_distributed
    init_distributed(cfg)  # multi-host: before any JAX computation
    from train.loop import run  # after argument parsing: --help stays fast
    try:
        run(cfg)
    except CheckpointDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
