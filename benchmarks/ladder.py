"""Ladder benchmark (docs/ladder.md, paper Table 2): tokens/s of the TTT operator, V0–V6.

Recurrent (``impl="recurrent"``: ``lax.scan`` over chunks) and parallel (V2–V6 only: the two
layouts of ``LaCTRule.parallel``, ``impl="chunked"`` and ``impl="associative"``;
``rule.parallel_impls()``) forward throughput on this machine's CPU, float32, B=1, T=8192, 4 heads of
dim 128 (dk = dh = dv = 128), chunk sizes 64 and 512; the parallel/recurrent ratio is
printed next to the paper's GPU ratio. Prints a Markdown table and writes
``benchmarks/results/ladder.json``.

Why the ratios are near 1 on a CPU (and 2.7–4x on the paper's GPU): both forms do the same
FLOPs, and for V2–V5 most of them are Muon's Newton–Schulz iterations on the dv×dh update,
once per chunk in both forms (5 × 3 matmuls of 128³ per head per chunk: ~90% of the time at
C=64). The chunked layout runs the same chunk loop with φ, the chunk sums and the recurrences
fused per chunk; the associative layout (the GPU/TPU default) turns the chunk loop into an
associative scan and a batched NS, which fills a device — on two cores there is nothing left
to fill.

The host's malloc is tuned first (:func:`tttla_jax.host.tune_malloc`; ``--no-tune-malloc`` to
measure glibc's defaults): XLA:CPU page-faults its large temporaries back in on every call
otherwise, which costs the cheap variants (V6) up to ~40% of their time.

    python benchmarks/ladder.py [--T 8192] [--heads 4] [--dim 128] [--chunks 64 512] [--rounds 7]
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
from _timing import describe, interleaved, machine, setup  # noqa: E402

from tttla_jax.rules.ladder import PRESETS, ladder  # noqa: E402

# paper Table 2 (GPU): recurrent / parallel tokens per second, millions
PAPER = {
    "v0": (4.30, None), "v1": (10.60, None), "v2": (11.02, 30.18), "v3": (12.95, 49.69),
    "v4": (13.31, 53.99), "v5": (14.40, 57.28), "v6": (89.67, 124.6),
}


def make_inputs(rule, B, T, H, D, seed=0):
    rng = np.random.default_rng(seed)
    f32 = jnp.float32
    q = jnp.asarray(rng.normal(size=(B, T, H, D)) / np.sqrt(D), f32)
    k = jnp.asarray(rng.normal(size=(B, T, H, D)) / np.sqrt(D), f32)
    v = jnp.asarray(rng.normal(size=(B, T, H, D)), f32)
    lr = jnp.asarray(rng.uniform(1e-4, 1e-3, size=(B, T, H, 3)), f32)
    m = jnp.asarray(rng.uniform(0.5, 0.95, size=(B, T, H)), f32)
    w1 = jnp.asarray(rng.normal(size=(H, D, D)) / np.sqrt(D), f32)
    if rule.linear:
        w0 = w2 = None
    else:
        w0 = jnp.asarray(rng.normal(size=(H, D, D)) / np.sqrt(D), f32)
        w2 = jnp.asarray(rng.normal(size=(H, D, D)) / np.sqrt(D), f32)
    return q, k, v, lr, rule.init_state(w0, w1, w2, B), m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds; the forms take turns in each")
    ap.add_argument("--variants", nargs="+", default=list(PRESETS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ladder.json"))
    ap.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    a = ap.parse_args()
    start = setup(tune=not a.no_tune_malloc)
    B, T, H, D = 1, a.T, a.heads, a.dim
    rows = []
    for C in a.chunks:
        for name in a.variants:
            rule = ladder(name, chunk_size=C)
            args = make_inputs(rule, B, T, H, D)
            forms = {"recurrent": jax.jit(lambda q, k, v, lr, st, m, rule=rule: rule.recurrent(q, k, v, lr, st, m)[0])}
            for impl in rule.parallel_impls():
                forms[impl] = jax.jit(lambda q, k, v, lr, st, m, rule=rule, impl=impl:
                                      rule.parallel(q, k, v, lr, st, m, impl=impl)[0])
            t = interleaved(forms, *args, rounds=a.rounds)
            o_rec = forms["recurrent"](*args)
            rec = t["recurrent"]
            row = dict(variant=name, chunk_size=C, recurrent_tok_s=T * B / rec["median"], parallel_tok_s=None,
                       ratio=None, ratio_rounds=None, max_rel_diff=None, parallel_associative_tok_s=None,
                       associative_ratio=None, associative_max_rel_diff=None,
                       samples_s={f: t[f]["samples"] for f in t}, compile_s={f: t[f]["compile"] for f in t})
            for impl in rule.parallel_impls():
                key = "" if impl == "chunked" else "associative_"
                par = t[impl]
                row[f"parallel_{key}tok_s"] = T * B / par["median"]
                row[f"{key}ratio"] = rec["median"] / par["median"]
                o_par = forms[impl](*args)
                row[f"{key}max_rel_diff"] = float(jnp.max(jnp.abs(o_par - o_rec)) / jnp.max(jnp.abs(o_rec)))
            if row["ratio"] is not None:  # the spread of the per-round ratios: the noise of this row
                per_round = [r / p for r, p in zip(rec["samples"], t["chunked"]["samples"])]
                row["ratio_rounds"] = [min(per_round), max(per_round)]
            pr, pp = PAPER[name]
            row["paper_recurrent_Mtok_s"], row["paper_parallel_Mtok_s"] = pr, pp
            row["paper_ratio"] = None if pp is None else pp / pr
            rows.append(row)
            print(f"  C={C} {name}: rec {row['recurrent_tok_s']:.0f} tok/s"
                  + (f", par {row['parallel_tok_s']:.0f} tok/s (associative {row['parallel_associative_tok_s']:.0f})"
                     if row["parallel_tok_s"] else ""), flush=True)
    v0 = {r["chunk_size"]: r["recurrent_tok_s"] for r in rows if r["variant"] == "v0"}
    v0 = {c: v0.get(c, float("nan")) for c in a.chunks}
    print()
    m = machine(start)
    print(f"LaCT ladder, forward, float32, B={B}, T={T}, H={H}, dk=dh=dv={D}; {describe(m)}")
    print()
    print("| variant | C | recurrent tok/s | parallel (chunked) tok/s | par/rec (per-round range) "
          "| parallel (associative) tok/s | assoc/rec | paper par/rec (GPU) | V6-par / V0-rec |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    rng = lambda x: "" if x is None else f" ({x[0]:.2f}–{x[1]:.2f})"  # noqa: E731
    for r in rows:
        vs = ""
        if r["variant"] == "v6" and r["parallel_tok_s"]:
            vs = f"{r['parallel_tok_s'] / v0[r['chunk_size']]:.1f}x"
        print(f"| {r['variant']} | {r['chunk_size']} | {r['recurrent_tok_s']:,.0f} | {fmt(r['parallel_tok_s'], ',.0f')} "
              f"| {fmt(r['ratio'], '.2f')}{rng(r['ratio_rounds'])} | {fmt(r['parallel_associative_tok_s'], ',.0f')} "
              f"| {fmt(r['associative_ratio'], '.2f')} | {fmt(r['paper_ratio'], '.2f')} | {vs} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(config=dict(B=B, T=T, H=H, dk=D, dh=D, dv=D, dtype="float32", rounds=a.rounds,
                                   timing="median of rounds after one compile/warm-up call each; the forms "
                                          "of a variant take turns in every round (_timing.interleaved)"),
                       machine=m, rows=rows), f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
