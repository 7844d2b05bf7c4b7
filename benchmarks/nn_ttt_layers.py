"""Benchmark: TTTLinear / TTTMLP / TitansMemory layers, recurrent vs parallel mode.

Per layer and mode: forward and forward+backward (gradients w.r.t. all parameters) wall
time of a full call (``cache=None``, the training path) on ``[B, T, W]`` float32 inputs,
and the time of one decoding step (one token through the cache, after a prefill that
leaves a partial mini-batch). Prints a table and writes JSON with the load average,
because the CPU may be shared with other jobs (medians over repeats; modes are timed
interleaved).

    python benchmarks/nn_ttt_layers.py [--T 512] [--width 256] [--heads 4] [--repeats 5]
                                       [--out benchmarks/results/nn_ttt_layers.json]

Modes: TTT ``recurrent`` = the rule's primal form (per-row fast weights materialised,
``[C, D, D]`` per head and mini-batch), ``parallel`` = dual form (matmuls); Titans
``recurrent`` = ``lax.scan`` over chunks, ``parallel`` = chunked masked linear attention
inside each TTT batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttla_jax.nn.titans import TitansMemory
from tttla_jax.nn.ttt import TTTLinear, TTTMLP


def timeit(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile + warm up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return ts


def layers(width, heads):
    return {
        "ttt_linear": lambda mode: TTTLinear(width=width, num_heads=heads, mini_batch_size=16,
                                             mode=mode, rngs=nnx.Rngs(0)),
        "ttt_mlp": lambda mode: TTTMLP(width=width, num_heads=heads, mini_batch_size=16,
                                       mode=mode, rngs=nnx.Rngs(0)),
        "titans": lambda mode: TitansMemory(width=width, num_heads=heads, chunk_size=16,
                                            batch_size=64, mode=mode, rngs=nnx.Rngs(0)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/nn_ttt_layers.json")
    args = ap.parse_args(argv)
    B, T, Wd = args.B, args.T, args.width
    x = jax.random.normal(jax.random.key(0), (B, T, Wd), jnp.float32)
    rows = []
    load = [os.getloadavg()]
    for name, mk in layers(Wd, args.heads).items():
        res = {}
        for mode in ("recurrent", "parallel"):
            m = mk(mode)
            gd, st = nnx.split(m)
            fwd = jax.jit(lambda st, x: nnx.merge(gd, st)(x)[0])
            loss = lambda st, x: jnp.sum(nnx.merge(gd, st)(x)[0] ** 2)
            bwd = jax.jit(jax.grad(loss))
            prompt = x[:, : T - 5]
            _, cache = jax.jit(lambda st, x: nnx.merge(gd, st)(x))(st, prompt)
            dec = jax.jit(lambda st, x, c: nnx.merge(gd, st)(x, cache=c))
            res[mode] = (fwd, bwd, dec, st, cache)
        times = {mode: {"fwd": [], "fwd_bwd": [], "decode": []} for mode in res}
        for _ in range(args.repeats):  # interleaved
            for mode, (fwd, bwd, dec, st, cache) in res.items():
                times[mode]["fwd"] += timeit(fwd, st, x, repeats=1)
                times[mode]["fwd_bwd"] += timeit(bwd, st, x, repeats=1)
                times[mode]["decode"] += timeit(dec, st, x[:, :1], cache, repeats=1)
        for mode, t in times.items():
            row = {"layer": name, "mode": mode, "B": B, "T": T, "width": Wd, "heads": args.heads}
            for k, v in t.items():
                row[f"{k}_ms_median"] = 1e3 * float(np.median(v))
                row[f"{k}_ms_min"] = 1e3 * float(np.min(v))
            row["fwd_tok_per_s"] = B * T / (row["fwd_ms_median"] / 1e3)
            rows.append(row)
        load.append(os.getloadavg())
    hdr = f"{'layer':<11} {'mode':<10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'decode ms':>10} {'fwd tok/s':>11}"
    print(f"B={B} T={T} W={Wd} H={args.heads} float32, medians over {args.repeats} repeats")
    print(hdr)
    for r in rows:
        print(f"{r['layer']:<11} {r['mode']:<10} {r['fwd_ms_median']:>9.1f} {r['fwd_bwd_ms_median']:>11.1f} "
              f"{r['decode_ms_median']:>10.2f} {r['fwd_tok_per_s']:>11.0f}")
    print(f"load average during the run: {load}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "loadavg": load, "platform": platform.platform(),
                   "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
