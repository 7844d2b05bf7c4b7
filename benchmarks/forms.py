"""Benchmark: the forms of tt.linear_attention on this machine.

Forward and forward+backward wall time of each implementation for B=4, H=4, K=V=64,
float32, causal with log-decay, over T in {512, 2048, 8192, 32768}; plus the achieved
GFLOP/s of the chunked form against the machine's measured 2-D matmul GFLOP/s.

    python benchmarks/forms.py [--T 512 2048 8192 32768] [--repeats 5] [--matmul-n 2048]
                               [--no-tune-malloc] [--no-decay] [--out benchmarks/results/forms.json]

Each time is the **median** of ``--repeats`` calls after one compile + warm-up call
(``benchmarks/_timing.timeit(...)["median"]``, as before the shared helper, so older
results stay comparable). The JSON's ``machine`` record (``_timing.machine``) has the CPU,
the load average at start and end and whether malloc was tuned (``--no-tune-malloc``:
glibc's defaults).

FLOPs counted for the chunked causal forward (per chunk of C tokens, ignoring the
elementwise decay work): ``QKᵀ`` 2C²K, ``(A)V`` 2C²V, chunk state ``KᵀV`` 2CKV,
inter-chunk read ``Q S`` 2CKV. Forward+backward is counted as 3× the forward.

Matmul-rate column: every implementation is charged the same *useful* FLOPs (the chunked
count above: the work the op needs, whatever a form spends), divided by its time and by the
rate of a large 2-D float32 matmul (``--matmul-n``³) measured in the same run — before and
after the sweep, the mean of the two, so a change of machine load during the sweep shows
up in both. ``% of matmul`` is how close a form runs to what this CPU's matmul unit can do.
The associative form materialises T·K·V floats per (B, H) and is skipped where that
exceeds ``--assoc-max-gb``.
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

import tttla_jax as tt  # noqa: E402


def median_s(fn, *args, repeats=5):
    return timeit(fn, *args, repeats=repeats)["median"]


def matmul_gflops(n=2048, repeats=5):
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t = median_s(f, a, repeats=repeats)
    return 2 * n**3 / t / 1e9


def chunked_flops(B, T, H, K, V, C):
    N = -(-T // C)
    per_chunk = 2 * C * C * K + 2 * C * C * V + 4 * C * K * V
    return B * H * N * per_chunk


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", nargs="+", default=["recurrent", "associative", "chunked"])
    p.add_argument("--assoc-max-gb", type=float, default=2.0)
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the reference 2-D matmul [2048]")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "forms.json"))
    p.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    p.add_argument("--no-decay", action="store_true",
                   help="plain linear attention (no log_decay; the chunked form's no-decay path)")
    a = p.parse_args(argv)
    start = setup(tune=not a.no_tune_malloc)
    B, H, K, V, C = a.B, a.H, a.D, a.D, a.chunk_size

    peak_before = matmul_gflops(a.matmul_n)
    print(f"2-D matmul {a.matmul_n}^3 float32: {peak_before:.1f} GFLOP/s")
    peak = peak_before
    rows = []
    for T in a.T:
        rng = np.random.default_rng(T)
        q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), jnp.float32)
        v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
        g = jnp.asarray(-rng.uniform(0, 0.1, size=(B, T, H)), jnp.float32)
        for impl in a.impls:
            if impl == "associative" and B * H * T * K * V * 4 * 3 / 2**30 > a.assoc_max_gb:
                rows.append(dict(T=T, impl=impl, fwd_s=None, fwdbwd_s=None, note="skipped: memory"))
                print(f"T={T:6d} {impl:12s} skipped (T·K·V states exceed --assoc-max-gb)")
                continue

            def fwd(q, k, v, g, impl=impl):
                return tt.linear_attention(q, k, v, log_decay=None if a.no_decay else g, impl=impl, chunk_size=C)[0]

            def loss(q, k, v, g, impl=impl):
                return jnp.sum(fwd(q, k, v, g, impl) ** 2)

            f = jax.jit(fwd)
            fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
            tf = median_s(f, q, k, v, g, repeats=a.repeats)
            tfb = median_s(fb, q, k, v, g, repeats=a.repeats)
            row = dict(T=T, impl=impl, fwd_s=tf, fwdbwd_s=tfb,
                       fwd_tok_s=B * T / tf, fwdbwd_tok_s=B * T / tfb)
            fl = chunked_flops(B, T, H, K, V, C)  # useful FLOPs, charged to every form
            row.update(fwd_gflops=fl / tf / 1e9, fwdbwd_gflops=3 * fl / tfb / 1e9)
            rows.append(row)
            extra = (f"  {row['fwd_gflops']:6.1f} / {row['fwdbwd_gflops']:6.1f} useful GFLOP/s "
                     f"({100 * row['fwd_gflops'] / peak_before:.0f}% / "
                     f"{100 * row['fwdbwd_gflops'] / peak_before:.0f}% of the first matmul measurement)")
            print(f"T={T:6d} {impl:12s} fwd {tf * 1e3:9.2f} ms   fwd+bwd {tfb * 1e3:9.2f} ms{extra}", flush=True)

    peak_after = matmul_gflops(a.matmul_n)
    peak = 0.5 * (peak_before + peak_after)
    print(f"2-D matmul after the sweep: {peak_after:.1f} GFLOP/s; rate used: {peak:.1f} GFLOP/s")
    for row in rows:
        if row.get("fwd_s"):
            row.update(fwd_frac_peak=row["fwd_gflops"] / peak, fwdbwd_frac_peak=row["fwdbwd_gflops"] / peak)

    def get(T, impl, key):
        for r in rows:
            if r["T"] == T and r["impl"] == impl:
                return r.get(key)

    print(f"\n| T | impl | fwd ms | fwd+bwd ms | fwd % of matmul | fwd+bwd % of matmul |  (2-D matmul {peak:.0f} GFLOP/s)")
    print("|---|---|---|---|---|---|")
    for T in a.T:
        for impl in a.impls:
            cells = []
            for key, f in (("fwd_s", 1e3), ("fwdbwd_s", 1e3), ("fwd_frac_peak", 100), ("fwdbwd_frac_peak", 100)):
                x = get(T, impl, key)
                cells.append("—" if x is None else f"{x * f:.1f}")
            print(f"| {T} | {impl} | " + " | ".join(cells) + " |")
    summary = {}
    if 8192 in a.T and {"recurrent", "chunked"} <= set(a.impls):
        summary["speedup_fwdbwd_chunked_vs_recurrent_T8192"] = get(8192, "recurrent", "fwdbwd_s") / get(8192, "chunked", "fwdbwd_s")
    if {8192, 32768} <= set(a.T) and "chunked" in a.impls:
        summary["chunked_fwdbwd_T32768_over_4x_T8192"] = get(32768, "chunked", "fwdbwd_s") / (4 * get(8192, "chunked", "fwdbwd_s"))
    print("\nsummary:", json.dumps(summary, indent=1))
    m = machine(start)
    print(describe(m))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(dict(config=dict(B=B, H=H, K=K, V=V, chunk_size=C, dtype="float32", masking="causal", decay=not a.no_decay,
                                   repeats=a.repeats, matmul_n=a.matmul_n,
                                   matmul_rate="mean of a 2-D matmul measured before and after the sweep",
                                   statistic="median of repeats after one compile/warm-up call"),
                       machine=m, matmul_gflops=peak, matmul_gflops_before=peak_before,
                       matmul_gflops_after=peak_after, rows=rows, summary=summary), fh, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
