"""Benchmark: every rule family of ``tt.rules``, forward and forward+backward, on this CPU.

One row per (rule, implementation): tokens/s of the forward pass and of forward+backward
(gradient of ``sum(o)`` w.r.t. every floating input: queries, keys, values, learning rates,
gates and the initial fast weights), float32, B=1, H=4, head dim 64, T=4096 by default
(ViT³: a 64×64 token grid = 4096 tokens). Implementations (docs/implementations.md):
``recurrent`` (the ``lax.scan`` rule) and every one of ``rule.parallel_impls()`` (e.g.
``chunked``, ``associative``); TTT's mini-batch rule is timed in its dual (matmul) and
primal (per-row) forms (``impl="dual"`` / ``"primal"``). Inputs come from each family's registry
builder (the same generator the equivalence tests use), at benchmark size.

Each timing is the **minimum** over ``--repeats`` calls after one compile + warm-up call
(``benchmarks/_timing.timeit(...)["best"]``; min rather than median: the machine is shared,
and the minimum is the least disturbed estimate); the JSON's ``machine`` record
(``_timing.machine``) has the load average at start and end and whether malloc was tuned
(``--no-tune-malloc``: glibc's defaults).

    python benchmarks/rules.py [--T 4096] [--repeats 3] [--only lact ttt_linear ...]
        [--no-tune-malloc] [--out benchmarks/results/rules.json]

Family-specific sweeps with more knobs: ``benchmarks/ladder.py`` (LaCT V0–V6),
``benchmarks/rules_ttt.py`` (TTT dual vs primal), ``benchmarks/rules_titans_vit3.py``,
``benchmarks/delta_rule.py``, ``benchmarks/forms.py`` (linear-attention forms).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import describe, machine, setup, timeit  # noqa: E402

import tttla_jax as tt  # noqa: E402
from tttla_jax.rules import REGISTRY  # noqa: E402


def _cases(T: int, H: int, D: int):
    """(label, rule, builder keyword shapes) for every family, at benchmark size."""
    side = int(round(T ** 0.5))
    lin = dict(B=1, T=T, H=H, K=D, V=D)
    return [
        ("linear_attention", tt.rules.LinearFastWeightRule(loss="dot", gated=False, chunk_size=64),
         "linear_attention", lin),
        ("decayed_linear_attention", tt.rules.LinearFastWeightRule(loss="dot", gated=True, chunk_size=64),
         "decayed_linear_attention", lin),
        ("delta_net", tt.rules.LinearFastWeightRule(loss="mse", gated=False, chunk_size=64), "delta_net", lin),
        ("gated_delta_net", tt.rules.LinearFastWeightRule(loss="mse", gated=True, chunk_size=64),
         "gated_delta_net", lin),
        ("lact_v0 (C=64)", tt.rules.ladder("v0", chunk_size=64), "lact", dict(B=1, T=T, H=H, K=D, Dh=D, V=D)),
        ("lact_v2 (C=64)", tt.rules.ladder("v2", chunk_size=64), "lact", dict(B=1, T=T, H=H, K=D, Dh=D, V=D)),
        ("lact_v6 (C=64)", tt.rules.ladder("v6", chunk_size=64), "lact", dict(B=1, T=T, H=H, K=D, Dh=D, V=D)),
        ("ttt_linear dual (b=16)", tt.rules.TTTLinearRule(mini_batch_size=16, impl="dual"), "ttt_linear",
         dict(B=1, T=T, H=H, D=D)),
        ("ttt_linear primal (b=16)", tt.rules.TTTLinearRule(mini_batch_size=16, impl="primal"), "ttt_linear",
         dict(B=1, T=T, H=H, D=D)),
        ("ttt_mlp dual (b=16)", tt.rules.TTTMLPRule(mini_batch_size=16, impl="dual"), "ttt_mlp",
         dict(B=1, T=T, H=H, D=D)),
        ("titans_linear (C=16)", tt.rules.TitansRule(chunk_size=16, batch_size=None), "titans_linear",
         dict(B=1, T=T, H=H, K=D, V=D)),
        ("titans_mlp (C=16, b=64)", tt.rules.TitansRule(chunk_size=16, batch_size=64, memory="mlp"),
         "titans_mlp", dict(B=1, T=T, H=H, K=D, V=D, F=4 * D)),
        ("vit3_glu", tt.rules.ViT3GLURule(), "vit3_glu", dict(B=1, N=side * side, H=H, K=D, V=D)),
        ("vit3_conv", tt.rules.ViT3ConvRule(grid=(side, side)), "vit3_conv", dict(B=1, C=H * D)),
    ]


def _tokens(label: str, args) -> int:
    x = args[0]
    return int(x.shape[0] * x.shape[1])


def bench(label, rule, impl, args, repeats):
    call = rule.recurrent if impl == "recurrent" else functools.partial(rule.parallel, impl=impl)

    def out(*a):
        o = call(*a)
        return o[0] if isinstance(o, tuple) else o

    floating = [i for i, a in enumerate(args)
                if a is not None and all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(a))]

    def loss(*a):
        return jnp.sum(out(*a).astype(jnp.float32))

    fwd = jax.jit(out)
    fb = jax.jit(jax.value_and_grad(loss, argnums=tuple(floating)))
    tf, tb = timeit(fwd, *args, repeats=repeats), timeit(fb, *args, repeats=repeats)
    t_f, c_f, t_b, c_b = tf["best"], tf["compile"], tb["best"], tb["compile"]
    n = _tokens(label, args)
    return dict(rule=label, impl=impl, tokens=n, fwd_s=t_f, fwd_bwd_s=t_b, fwd_tok_s=n / t_f,
                fwd_bwd_tok_s=n / t_b, compile_fwd_s=c_f, compile_fwd_bwd_s=c_b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096, help="tokens per sequence [4096]")
    p.add_argument("--H", type=int, default=4, help="heads [4]")
    p.add_argument("--D", type=int, default=64, help="head dim [64]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="labels (prefix match) to run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rules.json"))
    p.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    a = p.parse_args(argv)
    start = setup(tune=not a.no_tune_malloc)
    rows = []
    print(f"{'rule':28s} {'impl':12s} {'fwd tok/s':>12s} {'fwd+bwd tok/s':>14s} {'compile s':>10s}")
    for label, rule, reg, shapes in _cases(a.T, a.H, a.D):
        if a.only and not any(label.startswith(o) for o in a.only):
            continue
        _, build = REGISTRY[reg]()
        args = build(rule, seed=0, dtype=jnp.float32, **shapes)
        for impl in ("recurrent",) + rule.parallel_impls():
            r = bench(label, rule, impl, args, a.repeats)
            rows.append(r)
            print(f"{label:28s} {impl:12s} {r['fwd_tok_s']:12.0f} {r['fwd_bwd_tok_s']:14.0f} "
                  f"{r['compile_fwd_s'] + r['compile_fwd_bwd_s']:10.1f}", flush=True)
    meta = dict(T=a.T, H=a.H, D=a.D, dtype="float32", repeats=a.repeats,
                statistic="min over repeats after one compile/warm-up call")
    m = machine(start)
    print(describe(m))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, machine=m, rows=rows), f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
