"""Benchmark: TTT-Linear and TTT-MLP rules (docs/rules/ttt.md), dual vs primal form, on this CPU.

Forward and forward+backward (gradient of ``sum(o)`` w.r.t. q, k, v, lr and the initial
fast weights) throughput in tokens/s, float32, B=1, H=4, hd=64, mini-batch 16, T=4096
(TTT-MLP hidden width 4·hd). **Median** of ``--repeats`` timed calls after one compile +
warm-up call (``benchmarks/_timing.timeit(...)["median"]``, as before the shared helper);
compile time is reported separately. The JSON's ``machine`` record (``_timing.machine``)
has the load average at start and end and whether malloc was tuned (``--no-tune-malloc``:
glibc's defaults).

    python benchmarks/rules_ttt.py [--T 4096] [--repeats 3] [--no-tune-malloc]
                                   [--out benchmarks/results/rules_ttt.json]

FLOPs per mini-batch of C tokens and one head (forward, matmuls only), TTT-Linear dual:
``k W`` 2CD², ``Q Kᵀ`` 2C²D, two ``[C, C] × [C, D]`` 4C²D, ``Q W`` 2CD², the weight
update 2CD² → ``6CD² + 6C²D``. The primal form replaces the ``Q Kᵀ`` trick by per-row
weights ``[C, D, D]`` (cumsum C·D², row reads 2CD²). Printed for orientation only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import describe, machine, setup, timeit  # noqa: E402

from tttla_jax.rules.ttt import TTTLinearRule, TTTMLPRule, _example_inputs  # noqa: E402


def median_s(fn, *args, repeats=3):
    """(median seconds, compile + first-call seconds)."""
    t = timeit(fn, *args, repeats=repeats)
    return t["median"], t["compile"]


def bench(cls, impl, B, T, H, D, C, repeats):
    rule = cls(mini_batch_size=C, impl=impl)
    q, k, v, lr, te, g, bt, st = _example_inputs(rule, seed=0, dtype=jnp.float32, B=B, T=T, H=H, D=D)
    fwd = jax.jit(lambda q, k, v, lr, st: rule.recurrent(q, k, v, lr, te, g, bt, st, output_final_state=True))

    def loss(q, k, v, lr, st):
        o, s = rule.recurrent(q, k, v, lr, te, g, bt, st, output_final_state=True)
        return jnp.sum(o) + sum(jnp.sum(x) for x in s)

    fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    t_f, c_f = median_s(fwd, q, k, v, lr, st, repeats=repeats)
    t_b, c_b = median_s(fb, q, k, v, lr, st, repeats=repeats)
    return dict(rule=cls.__name__, impl=impl, B=B, T=T, H=H, D=D, mini_batch_size=C,
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
    p.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    a = p.parse_args(argv)
    start = setup(tune=not a.no_tune_malloc)

    rows = []
    print(f"TTT rules, float32, B={a.B} T={a.T} H={a.H} hd={a.D} mini-batch={a.mini_batch_size} "
          f"on {jax.devices()[0].platform} ({os.cpu_count()} cpus)")
    print(f"{'rule':<14}{'impl':<8}{'fwd tok/s':>12}{'fwd+bwd tok/s':>15}{'fwd ms':>10}{'fwd+bwd ms':>12}"
          f"{'compile s':>11}")
    for cls in (TTTLinearRule, TTTMLPRule):
        for impl in ("dual", "primal"):
            r = bench(cls, impl, a.B, a.T, a.H, a.D, a.mini_batch_size, a.repeats)
            rows.append(r)
            print(f"{r['rule']:<14}{impl:<8}{r['fwd_tok_s']:>12.0f}{r['fwd_bwd_tok_s']:>15.0f}"
                  f"{1e3 * r['fwd_s']:>10.1f}{1e3 * r['fwd_bwd_s']:>12.1f}"
                  f"{r['compile_fwd_s'] + r['compile_fwd_bwd_s']:>11.1f}", flush=True)
    meta = dict(repeats=a.repeats, dtype="float32",
                note="median wall time after one compile/warm-up call; the machine may be shared with "
                     "other jobs, see machine.loadavg_start/end")
    m = machine(start)
    print(describe(m))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, machine=m, results=rows), f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
