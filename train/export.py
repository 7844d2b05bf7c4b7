"""Export a trained run's layers to their PyTorch reference names:
``python -m train.export --run runs/lm-tiny --out weights.npz`` (from the repository root) or
``python -m tttla_jax.train.export`` (anywhere after install).

Writes one ``.npz`` whose keys are ``layers.<index>.<reference name>`` for every layer with
a reference implementation (LaCT, TTT-Linear, TTT-MLP; see
:func:`tttla_jax.train.load.export_run_weights`); ``np.load`` it and pass
``{name: torch.from_numpy(a)}`` of one layer to the reference layer's ``load_state_dict``.
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.export",
        description="Export the trained LaCT / TTT layers of a run (python -m train) as numpy "
                    "arrays named and laid out as the PyTorch reference layers.",
        allow_abbrev=False)
    p.add_argument("--run", required=True, metavar="DIR",
                   help="run directory written by python -m train, e.g. runs/lm-tiny")
    p.add_argument("--out", required=True, metavar="FILE.npz",
                   help="output file; keys layers.<index>.<reference name>")
    args = p.parse_args(argv)
    import numpy as np

    from tttla_jax.train.load import RunNotFoundError, export_run_weights

    try:
        layers = export_run_weights(args.run)
    except (RunNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flat = {f"layers.{i}.{name}": a for i, arrays in layers.items() for name, a in arrays.items()}
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    tmp = out + f".tmp{os.getpid()}.npz"
    try:
        np.savez(tmp, **flat)
        os.replace(tmp, out)  # atomic: a complete file or none
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        print(f"error: --out: cannot write {out!r} ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(flat)} arrays from layers {sorted(layers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
