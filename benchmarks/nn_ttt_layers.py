"""Benchmark: TTTLinear / TTTMLP / TitansMemory layers, the sequential vs the parallel implementation.

Per layer and implementation (``impl``, docs/implementations.md): forward and forward+backward (gradients w.r.t. all parameters) wall
time of a full call (``cache=None``, the training path) on ``[B, T, W]`` float32 inputs,
and the time of one decoding step (one token through the cache, after a prefill that
leaves a partial mini-batch). Prints a table and writes JSON with the shared ``machine``
record (load average at start and end, malloc tuning), because the CPU may be shared with
other jobs.

Timing: ``benchmarks/_timing.timeit`` — one compile + warm-up call, then ``--repeats`` timed
calls. The table and ``fwd_tok_per_s`` report the **median** (``["median"]``, as before the
shared helper); the JSON rows have both ``*_ms_median`` and ``*_ms_min`` (``["best"]``).
Since the move to the shared helper each (layer, impl, pass) runs its repeats back to back
(the modes used to be interleaved repeat by repeat, with a warm-up call before each timed
call). Results written before that change are not comparable for ``recurrent``: the jitted
functions then closed over the loop's graphdef and were first traced after the loop, so the
``recurrent`` rows timed the ``parallel`` layer (with a recurrent-prefill cache for decode).

    python benchmarks/nn_ttt_layers.py [--T 512] [--B 2] [--width 256] [--heads 4] [--repeats 5]
                                       [--layers ttt_linear ttt_mlp titans] [--no-tune-malloc]
                                       [--out benchmarks/results/nn_ttt_layers.json]

Implementations: TTT ``primal`` (per-row fast weights materialised, ``[C, D, D]`` per head
and mini-batch; the ``recurrent`` rows of results written before the ``impl`` vocabulary)
and ``dual`` (matmuls; formerly ``parallel``); Titans ``recurrent`` (``lax.scan`` over
chunks) and ``chunked`` (masked linear attention inside each TTT batch; formerly
``parallel``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import describe, machine, setup, timeit  # noqa: E402

from tttla_jax.nn.titans import TitansMemory  # noqa: E402
from tttla_jax.nn.ttt import TTTLinear, TTTMLP  # noqa: E402


def layers(width, heads):
    return {
        "ttt_linear": (("primal", "dual"), lambda impl: TTTLinear(
            width=width, num_heads=heads, mini_batch_size=16, impl=impl, rngs=nnx.Rngs(0))),
        "ttt_mlp": (("primal", "dual"), lambda impl: TTTMLP(
            width=width, num_heads=heads, mini_batch_size=16, impl=impl, rngs=nnx.Rngs(0))),
        "titans": (("recurrent", "chunked"), lambda impl: TitansMemory(
            width=width, num_heads=heads, chunk_size=16, batch_size=64, impl=impl, rngs=nnx.Rngs(0))),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", nargs="+", default=["ttt_linear", "ttt_mlp", "titans"],
                    choices=["ttt_linear", "ttt_mlp", "titans"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "nn_ttt_layers.json"))
    ap.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    args = ap.parse_args(argv)
    start = setup(tune=not args.no_tune_malloc)
    B, T, Wd = args.B, args.T, args.width
    x = jax.random.normal(jax.random.key(0), (B, T, Wd), jnp.float32)
    rows = []
    for name, (impls, mk) in layers(Wd, args.heads).items():
        if name not in args.layers:
            continue
        for impl in impls:
            gd, st = nnx.split(mk(impl))
            # gd is bound per impl (default argument): the impl is in the graphdef, and a
            # closure would see whichever gd is current when jit first traces the function
            fwd = jax.jit(lambda st, x, gd=gd: nnx.merge(gd, st)(x)[0])
            loss = lambda st, x, gd=gd: jnp.sum(nnx.merge(gd, st)(x)[0] ** 2)
            bwd = jax.jit(jax.grad(loss))
            prompt = x[:, : T - 5]
            _, cache = jax.jit(lambda st, x, gd=gd: nnx.merge(gd, st)(x))(st, prompt)
            dec = jax.jit(lambda st, x, c, gd=gd: nnx.merge(gd, st)(x, cache=c))
            t = {"fwd": timeit(fwd, st, x, repeats=args.repeats),
                 "fwd_bwd": timeit(bwd, st, x, repeats=args.repeats),
                 "decode": timeit(dec, st, x[:, :1], cache, repeats=args.repeats)}
            row = {"layer": name, "impl": impl, "B": B, "T": T, "width": Wd, "heads": args.heads}
            for k, v in t.items():
                row[f"{k}_ms_median"] = 1e3 * v["median"]
                row[f"{k}_ms_min"] = 1e3 * v["best"]
            row["fwd_tok_per_s"] = B * T / (row["fwd_ms_median"] / 1e3)
            rows.append(row)
    hdr = f"{'layer':<11} {'impl':<10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'decode ms':>10} {'fwd tok/s':>11}"
    print(f"B={B} T={T} W={Wd} H={args.heads} float32, medians over {args.repeats} repeats")
    print(hdr)
    for r in rows:
        print(f"{r['layer']:<11} {r['impl']:<10} {r['fwd_ms_median']:>9.1f} {r['fwd_bwd_ms_median']:>11.1f} "
              f"{r['decode_ms_median']:>10.2f} {r['fwd_tok_per_s']:>11.0f}")
    m = machine(start)
    print(describe(m))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": {"repeats": args.repeats, "dtype": "float32",
                              "statistic": "median (and min) of repeats after one compile/warm-up call"},
                   "machine": m, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
