"""Sequence parallelism of whole mixers: memory per device and wall time vs the number of devices.

One sequence (B = 1, width 256, 4 heads, float32) through one mixer, forward + backward (the
gradient of the sum of the outputs w.r.t. the input and every parameter), split over
P = 1, 2, 4, 8 devices of a ``"seq"`` mesh axis with :func:`tttla_jax.parallel.sharded_mixer`
(P = 1: the mixer itself on one device). Mixers: an **associative** one (``delta_net``: the
state combined by the ops' all-gather + scan, the short convs by a halo) and **pipelined** ones
(``swa``, ``ttt_linear``: ``P`` rounds passing the cache; each device computes its slice
``P`` times).

* **memory per device**: ``memory_analysis()`` of the compiled partitioned program
  (arguments + outputs + temporaries − aliased) against the ideal ``memory(P = 1) / P``.
* **wall time** (``--time``): median of ``--repeats`` calls. The P devices are host devices
  sharing this machine's cores, so it is the *total* work of the P devices (for the pipelined
  form about ``P×`` the single-device work), not the time on P accelerators.

Prints a Markdown table and writes ``benchmarks/results/context_parallel_model.json``.

    python benchmarks/context_parallel_model.py [--T 8192] [--P 1 2 4 8] [--mixers delta_net swa ttt_linear] [--time]
"""
from __future__ import annotations

import os

_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join(_FLAGS + ["--xla_force_host_platform_device_count=8"])

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import describe, machine, memory, setup, timeit  # noqa: E402

from tttla_jax.nn import MIXERS  # noqa: E402
from tttla_jax.parallel import sequence_parallel_form, sharded_mixer  # noqa: E402

OPTIONS = {"swa": {"window": 256}, "delta_net": {"chunk_size": 64}, "ttt_linear": {}}


def step_fn(name, P):
    m = MIXERS[name](width=256, num_heads=4, rngs=nnx.Rngs(0), **OPTIONS.get(name, {}))
    gd, st = nnx.split(m)
    mesh = Mesh(np.asarray(jax.devices()[:P]), ("seq",))

    def loss(st, x):
        mixer = nnx.merge(gd, st)
        y = mixer(x)[0] if P == 1 else sharded_mixer(mixer, x, mesh=mesh)
        return jnp.sum(y)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), st, sequence_parallel_form(m)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--mixers", nargs="+", default=["delta_net", "swa", "ttt_linear"])
    ap.add_argument("--time", action="store_true", help="also time each step (slow on a loaded machine)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    start = setup()
    rows = []
    for name in args.mixers:
        base = None
        for P in args.P:
            f, st, form = step_fn(name, P)
            x = jnp.ones((1, args.T, 256), jnp.float32) * 0.1
            compiled = f.lower(st, x).compile()
            mem = memory(compiled)
            peak = None if mem is None else mem["peak_bytes"]  # per device (partitioned program)
            base = peak if P == 1 else base
            row = {"mixer": name, "form": form, "T": args.T, "P": P, "memory": mem,
                   "peak_MB": None if peak is None else peak / 2**20,
                   "ideal_MB": None if base is None else base / P / 2**20}
            if args.time:
                row["time"] = timeit(compiled, st, x, repeats=args.repeats)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "memory"}), flush=True)
    m = machine(start)
    print(f"\n{describe(m)}\n")
    print("| mixer | form | T | P | memory / device (MB) | ideal 1/P (MB) | ratio |"
          + (" time (s) |" if args.time else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if args.time else ""))
    for r in rows:
        ratio = r["peak_MB"] / r["ideal_MB"] if r["peak_MB"] and r["ideal_MB"] else float("nan")
        t = f" {r['time']['median']:.3f} |" if args.time and "median" in r.get("time", {}) else ""
        print(f"| {r['mixer']} | {r['form']} | {r['T']} | {r['P']} | {r['peak_MB']:.1f} | "
              f"{r['ideal_MB']:.1f} | {ratio:.2f} |{t}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "context_parallel_model.json")
    with open(out, "w") as fh:
        json.dump({"machine": m, "rows": rows}, fh, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
