"""Benchmark: TTT-Linear and TTT-MLP rules (SPEC §4), dual vs primal form, on this CPU.

Forward and forward+backward (gradient of ``sum(o)`` w.r.t. q, k, v, lr and the initial
fast weights) throughput in tokens/s, float32, B=1, H=4, hd=64, mini-batch 16, T=4096
(TTT-MLP hidden width 4·hd). Median of ``--repeats`` timed calls after one compile +
warm-up call; compile time is reported separately.

    python benchmarks/rules_ttt.py [--T 4096] [--repeats 3] [--out benchmarks/results/rules_ttt.json]

FLOPs per mini-batch of C tokens and one head (forward, matmuls only), TTT-Linear dual:
``k W`` 2CD², ``Q Kᵀ`` 2C²D, two ``[C, C] × [C, D]`` 4C²D, ``Q W`` 2CD², the weight
update 2CD² → ``6CD² + 6C²D``. The primal form replaces the ``Q Kᵀ`` trick by per-row
weights ``[C, D, D]`` (cumsum C·D², row reads 2CD²). Printed for orientation only.
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

from tttla_jax.rules.ttt import TTTLinearRule, TTTMLPRule, _example_inputs


def timeit(fn, *args, repeats=3):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))  # compile + warm up
    compile_s = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), compile_s


def bench(cls, form, B, T, H, D, C, repeats):
    rule = cls(mini_batch_size=C, form=form)
    q, k, v, lr, te, g, bt, st = _example_inputs(rule, seed=0, dtype=jnp.float32, B=B, T=T, H=H, D=D)
    fwd = jax.jit(lambda q, k, v, lr, st: rule.recurrent(q, k, v, lr, te, g, bt, st, output_final_state=True))

    def loss(q, k, v, lr, st):
        o, s = rule.recurrent(q, k, v, lr, te, g, bt, st, output_final_state=True)
        return jnp.sum(o) + sum(jnp.sum(x) for x in s)

    fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    t_f, c_f = timeit(fwd, q, k, v, lr, st, repeats=repeats)
    t_b, c_b = timeit(fb, q, k, v, lr, st, repeats=repeats)
    return dict(rule=cls.__name__, form=form, B=B, T=T, H=H, D=D, mini_batch_size=C,
                fwd_s=t_f, fwd_bwd_s=t_b, fwd_tok_s=B * T / t_f, fwd_bwd_tok_s=B * T / t_b,
                compile_fwd_s=c_f, compile_fwd_bwd_s=c_b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rules_ttt.json"))
    a = p.parse_args(argv)

    rows = []
    print(f"TTT rules, float32, B={a.B} T={a.T} H={a.H} hd={a.D} mini-batch={a.mini_batch_size} "
          f"on {jax.devices()[0].platform} ({os.cpu_count()} cpus)")
    print(f"{'rule':<14}{'form':<8}{'fwd tok/s':>12}{'fwd+bwd tok/s':>15}{'fwd ms':>10}{'fwd+bwd ms':>12}"
          f"{'compile s':>11}")
    for cls in (TTTLinearRule, TTTMLPRule):
        for form in ("dual", "primal"):
            r = bench(cls, form, a.B, a.T, a.H, a.D, a.mini_batch_size, a.repeats)
            rows.append(r)
            print(f"{r['rule']:<14}{form:<8}{r['fwd_tok_s']:>12.0f}{r['fwd_bwd_tok_s']:>15.0f}"
                  f"{1e3 * r['fwd_s']:>10.1f}{1e3 * r['fwd_bwd_s']:>12.1f}"
                  f"{r['compile_fwd_s'] + r['compile_fwd_bwd_s']:>11.1f}", flush=True)
    meta = dict(jax=jax.__version__, platform=platform.platform(), cpus=os.cpu_count(),
                backend=jax.devices()[0].platform, repeats=a.repeats, dtype="float32",
                load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None,
                note="median wall time; the machine's 2 cores were shared with other jobs")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
