"""Benchmark: Titans (docs/rules/titans.md) recurrent vs parallel forms, and ViT³ (docs/rules/vit3.md), on this CPU.

Titans: linear memory, float32, B=1, H=4, K=V=64, chunk_size 16 and 1, T=4096, with
``batch_size=None`` (W_ref = W0, one parallel segment) and ``batch_size=64`` (a scan
over TTT batches of 4 chunks with the parallel form inside). Forms: ``recurrent``
(``lax.scan`` over chunks), ``chunked`` (blocks of ``block_tokens`` tokens: masked
matmuls inside, a scan across blocks), ``associative`` (``lax.associative_scan`` over
the chunks' 2×2 affine maps; materialises one memory per chunk).
ViT³: N=196 tokens (14×14 grid), B=8, GLU part H=4 heads of 64, conv part C=64 channels;
``recurrent`` (the gradient step) vs ``chunked`` (the linear-attention rewrite, the whole
non-causal sequence as one matmul block).

Forward and forward+backward (gradient of ``sum(o) + sum(final state)`` w.r.t. every
input and the initial fast weights) tokens/s: **median** of ``--repeats`` timed calls after
one compile + warm-up call (``benchmarks/_timing.timeit(...)["median"]``, as before the
shared helper; compile time reported separately). The machine is shared (2 cores, other
jobs running): treat absolute numbers as indicative, ratios as the result; the JSON's
``machine`` record (``_timing.machine``) has the load average at start and end and whether
malloc was tuned (``--no-tune-malloc``: glibc's defaults).

    python benchmarks/rules_titans_vit3.py [--T 4096] [--repeats 3] [--vit-grid 14] \
        [--no-tune-malloc] [--out benchmarks/results/rules_titans_vit3.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import describe, machine, setup, timeit  # noqa: E402

from tttla_jax.rules.titans import TitansRule, TitansState, _example_inputs  # noqa: E402
from tttla_jax.rules.vit3 import vit3_conv, vit3_glu  # noqa: E402


def median_s(fn, *args, repeats=3):
    """(median seconds, compile + first-call seconds)."""
    t = timeit(fn, *args, repeats=repeats)
    return t["median"], t["compile"]


def total(tree):
    return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(tree))


def bench_titans(impl, batch_size, B, T, H, D, c, block, repeats):
    rule = TitansRule(chunk_size=c, batch_size=batch_size, block_tokens=block)
    q, k, v, th, eta, alpha, st = _example_inputs(rule, 0, jnp.float32, B=B, T=T, H=H, K=D, V=D)
    args = (q, k, v, th, eta, alpha, st.memory, st.momentum)

    def run(q, k, v, th, eta, alpha, M, S):
        return rule(q, k, v, th, eta, alpha, TitansState(M, S), impl=impl)

    fwd = jax.jit(run)
    fb = jax.jit(jax.value_and_grad(lambda *a: total(run(*a)), argnums=tuple(range(8))))
    t_f, c_f = median_s(fwd, *args, repeats=repeats)
    t_b, c_b = median_s(fb, *args, repeats=repeats)
    return dict(op="titans_linear", impl=impl, batch_size=batch_size, B=B, T=T, H=H, D=D, chunk_size=c,
                block_tokens=block, fwd_s=t_f, fwd_bwd_s=t_b, fwd_tok_s=B * T / t_f,
                fwd_bwd_tok_s=B * T / t_b, compile_fwd_s=c_f, compile_fwd_bwd_s=c_b)


def bench_vit3(part, impl, B, grid, H, D, repeats):
    rng = np.random.default_rng(0)
    N = grid[0] * grid[1]
    mk = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
    if part == "glu":
        args = (mk(B, N, H, D), mk(B, N, H, D), mk(B, N, H, D), mk(H, D, D) * 0.2, mk(H, D, D) * 0.2)
        run = lambda q, k, v, W1, W2: vit3_glu(q, k, v, W1=W1, W2=W2, impl=impl, output_final_state=True)
    else:
        args = (mk(B, N, D), mk(B, N, D), mk(B, N, D), mk(3, 3, D))
        run = lambda q, k, v, W: vit3_conv(q, k, v, W=W, grid=grid, impl=impl, output_final_state=True)
    fwd = jax.jit(run)
    fb = jax.jit(jax.value_and_grad(lambda *a: total(run(*a)), argnums=tuple(range(len(args)))))
    t_f, c_f = median_s(fwd, *args, repeats=repeats)
    t_b, c_b = median_s(fb, *args, repeats=repeats)
    return dict(op=f"vit3_{part}", impl=impl, batch_size=None, B=B, T=N, H=H if part == "glu" else 1, D=D,
                fwd_s=t_f, fwd_bwd_s=t_b, fwd_tok_s=B * N / t_f, fwd_bwd_tok_s=B * N / t_b,
                compile_fwd_s=c_f, compile_fwd_bwd_s=c_b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 1])
    p.add_argument("--block-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[0, 64], help="0 means None")
    p.add_argument("--impls", nargs="+", default=["recurrent", "chunked", "associative"])
    p.add_argument("--vit-B", type=int, default=8)
    p.add_argument("--vit-grid", type=int, default=14, help="ViT³ token grid side [14]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rules_titans_vit3.json"))
    p.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    a = p.parse_args(argv)
    start = setup(tune=not a.no_tune_malloc)
    rows = []
    for c in a.chunk_sizes:
        for bs in a.batch_sizes:
            for impl in a.impls:
                if impl == "associative" and a.T // c > 1024:
                    continue  # one K×V memory per chunk, twice, plus the scan's levels
                rows.append(bench_titans(impl, bs or None, a.B, a.T, a.H, a.D, c, a.block_tokens, a.repeats))
                print(rows[-1], flush=True)
    for part in ("glu", "conv"):
        for impl in ("recurrent", "chunked"):
            rows.append(bench_vit3(part, impl, a.vit_B, (a.vit_grid, a.vit_grid), a.H, a.D, a.repeats))
            print(rows[-1], flush=True)

    hdr = f"{'op':14} {'impl':12} {'c':>3} {'batch':>6} {'T':>6} {'fwd tok/s':>12} {'fwd+bwd tok/s':>14} {'compile s':>10}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['op']:14} {r['impl']:12} {str(r.get('chunk_size', '-')):>3} {str(r['batch_size']):>6} {r['T']:>6} {r['fwd_tok_s']:>12.3e} "
              f"{r['fwd_bwd_tok_s']:>14.3e} {r['compile_fwd_s'] + r['compile_fwd_bwd_s']:>10.1f}")
    m = machine(start)
    print(describe(m))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    meta = dict(repeats=a.repeats, statistic="median of repeats after one compile/warm-up call",
                note="shared 2-core CPU with other jobs running; ratios are the result")
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, machine=m, rows=rows), f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
