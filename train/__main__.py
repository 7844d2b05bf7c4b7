"""``python -m train``: the main training job (see ``python -m train --help``).

With no arguments: preset ``lm-tiny``, a 2-layer DeltaNet / sliding-window-attention
hybrid byte-level LM on Python's embedded ``pydoc_data`` text (LaCT is not implemented
yet), about 75 s on 2 mostly idle CPU cores (3.4 min when heavily shared); checkpoints, ``metrics.jsonl`` and ``loss.png``
in ``runs/lm-tiny/``.
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
