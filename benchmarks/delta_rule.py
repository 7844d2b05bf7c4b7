"""Benchmark: tt.delta_rule, recurrent vs chunked (WY/UT) form, on this machine.

Forward and forward+backward (gradients w.r.t. q, k, v, β, log-decay) wall time for
B=4, H=4, K=V=64, float32, gated delta rule (log-decay in [-0.1, 0]), k L2-normalised,
β in (0.1, 0.9), over T in {512, 2048, 8192}. Prints a table and writes JSON.

    python benchmarks/delta_rule.py [--T 512 2048 8192] [--repeats 5] [--chunk-sizes 64]
                                    [--no-gate] [--matmul-n 1024] [--no-tune-malloc]
                                    [--out benchmarks/results/delta_rule.json]

FLOPs counted for the chunked forward per chunk of C tokens (elementwise work ignored):
Gram products ``Q Kᵀ``, ``K Kᵀ`` 4C²K; ``(I + A)⁻¹`` by block doubling ≈ (2/3)C³;
the chunk scan ``U = (I + A)⁻¹ (β V − (β e^b K) S)`` 2CKV + 2C²V, ``K̃ᵀ U`` 2CKV; outputs
``(e^b Q) S`` 2CKV, ``P U`` 2C²V. Recurrent: ≈ 7KV per token. (Results written before
the scan applied ``(I + A)⁻¹`` itself were counted for ``W_v, W_k`` 2C²(V+K) and
``W_k S`` 2CKV instead of its 2C²V + 2CKV; before the chunk scan carried ``U``, for the
form that formed ``D, M`` 2CK(V+K), ``M S`` 2K²V and ``P W_k`` 2C²K too.)
Forward+backward is counted as 3× the forward.

Timing: ``benchmarks/_timing.timeit`` — one compile + warm-up call, then ``--repeats``
timed calls; the table and ``fwd_s``/``fwdbwd_s`` report the **minimum** (``["best"]``, as
before the shared helper), the JSON also has the medians (``*_median``). Since the move to
the shared helper each variant's repeats run back to back (they used to be interleaved,
repeat by repeat, across variants), so a load change during the run can favour one
variant. The JSON's ``machine`` record has the load average at start and end and whether
malloc was tuned (``--no-tune-malloc``: glibc's defaults), because the CPU may be shared.
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

from tttla_jax.ops.delta_rule import delta_rule  # noqa: E402


def matmul_gflops(n=1024, repeats=5):
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    t = timeit(jax.jit(lambda a: a @ a), a, repeats=repeats)["median"]
    return 2 * n**3 / t / 1e9


def chunked_flops(B, T, H, K, V, C):
    N = -(-T // C)
    per_chunk = (4 * C * C * K + (2 / 3) * C**3 + 2 * C * K * V + 2 * C * C * V + 2 * C * K * V
                 + 2 * C * K * V + 2 * C * C * V)
    return B * H * N * per_chunk


def recurrent_flops(B, T, H, K, V):
    return B * H * T * 7 * K * V


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", nargs="+", default=["recurrent", "chunked"])
    p.add_argument("--no-gate", action="store_true", help="plain DeltaNet (no log-decay)")
    p.add_argument("--matmul-n", type=int, default=1024, help="size of the reference 2-D matmul [1024]")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "delta_rule.json"))
    p.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    a = p.parse_args(argv)
    start = setup(tune=not a.no_tune_malloc)
    B, H, K, V = a.B, a.H, a.D, a.D
    gated = not a.no_gate

    peak = matmul_gflops(a.matmul_n)
    print(f"{a.matmul_n}^3 float32 matmul: {peak:.1f} GFLOP/s (median)")
    variants = [(impl, None) for impl in a.impls if impl != "chunked"]
    if "chunked" in a.impls:
        variants += [("chunked", C) for C in a.chunk_sizes]
    rows = []
    for T in a.T:
        rng = np.random.default_rng(T)
        q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
        k = rng.normal(size=(B, T, H, K))
        k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.float32)
        v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
        beta = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), jnp.float32)
        g = jnp.asarray(-rng.uniform(0, 0.1, size=(B, T, H)), jnp.float32)
        for impl, C in variants:
            def fwd(q, k, v, beta, g, impl=impl, C=C):
                return delta_rule(q, k, v, beta, log_decay=g if gated else None, impl=impl,
                                  chunk_size=C or 64)[0]

            def loss(q, k, v, beta, g, impl=impl, C=C):
                return jnp.sum(fwd(q, k, v, beta, g, impl, C) ** 2)

            f, fb = jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
            t_f = timeit(f, q, k, v, beta, g, repeats=a.repeats)
            t_fb = timeit(fb, q, k, v, beta, g, repeats=a.repeats)
            tf, tfb = t_f["best"], t_fb["best"]
            fl = chunked_flops(B, T, H, K, V, C) if impl == "chunked" else recurrent_flops(B, T, H, K, V)
            name = impl if C is None else f"{impl}(C={C})"
            row = dict(T=T, impl=impl, chunk_size=C, fwd_s=tf, fwdbwd_s=tfb,
                       fwd_s_median=t_f["median"], fwdbwd_s_median=t_fb["median"],
                       fwd_tok_s=B * T / tf, fwdbwd_tok_s=B * T / tfb,
                       fwd_gflops=fl / tf / 1e9, fwdbwd_gflops=3 * fl / tfb / 1e9)
            rows.append(row)
            print(f"T={T:6d} {name:16s} fwd {tf * 1e3:9.2f} ms   fwd+bwd {tfb * 1e3:9.2f} ms   "
                  f"({row['fwd_gflops']:5.1f} / {row['fwdbwd_gflops']:5.1f} GFLOP/s; medians "
                  f"{row['fwd_s_median'] * 1e3:.1f} / {row['fwdbwd_s_median'] * 1e3:.1f} ms)", flush=True)

    names = [impl if C is None else f"{impl}(C={C})" for impl, C in variants]

    def get(T, impl, C, key):
        for r in rows:
            if r["T"] == T and r["impl"] == impl and r["chunk_size"] == C:
                return r[key]

    print("\n| T | " + " | ".join(f"{n} fwd ms | {n} fwd+bwd ms" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for T in a.T:
        cells = [f"{get(T, impl, C, key) * 1e3:.1f}" for impl, C in variants for key in ("fwd_s", "fwdbwd_s")]
        print(f"| {T} | " + " | ".join(cells) + " |")
    summary = {}
    if {"recurrent", "chunked"} <= set(a.impls):
        C0 = a.chunk_sizes[0]
        for T in a.T:
            summary[f"speedup_chunked_C{C0}_vs_recurrent_T{T}"] = dict(
                fwd=get(T, "recurrent", None, "fwd_s") / get(T, "chunked", C0, "fwd_s"),
                fwdbwd=get(T, "recurrent", None, "fwdbwd_s") / get(T, "chunked", C0, "fwdbwd_s"))
    print("\nsummary:", json.dumps(summary, indent=1))
    m = machine(start)
    print(describe(m))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(dict(config=dict(B=B, H=H, K=K, V=V, chunk_sizes=a.chunk_sizes, dtype="float32",
                                   gated=gated, repeats=a.repeats, matmul_n=a.matmul_n,
                                   statistic="min over repeats after one compile/warm-up call, each variant's "
                                             "repeats back to back (medians also given)"),
                       machine=m, matmul_gflops=peak, rows=rows, summary=summary), fh, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
