"""Benchmark: the Pallas linear-attention kernel vs the XLA chunked form.

On a GPU or TPU host: forward and forward+backward tokens/s of
``tt.linear_attention(impl="pallas")`` and ``impl="chunked"`` (causal, with log-decay,
bfloat16 inputs, K = V in {64, 128, 256}).

On any host (and the only numbers on a CPU host, where the kernel runs only in interpret
mode): the analytic roofline per token for an H100 SXM and a TPU v5e, so the expected speed
is on record — FLOPs per token, HBM bytes per token, arithmetic intensity, and the roofline
tokens/s ``min(peak FLOP/s / FLOPs, bandwidth / bytes)``. On CPU the XLA chunked form is
also timed (float32) for reference.

    python benchmarks/kernels.py [--T 2048 8192] [--B 4] [--H 16] [--repeats 5]
                                 [--no-tune-malloc] [--out benchmarks/results/kernels.json]
    python benchmarks/kernels.py --accuracy   # bfloat16 vs float64, every kernel (kernels_bf16.json),
                                              # linear attention per head and per channel

Measured times are the **median** of ``--repeats`` calls after one compile + warm-up call
(``benchmarks/_timing.timeit(...)["median"]``, as before the shared helper); the JSON's
``machine`` record (``_timing.machine``) has the backend, the load average at start and end
and whether malloc was tuned (``--no-tune-malloc``: glibc's defaults).

FLOP model (per chunk of C tokens and head, :func:`tttla_jax.kernels.chunk_costs`): forward
``QKᵀ`` 2C²K (once per value block), ``AV`` 2C²V, ``(γQ)S`` 2CKV, ``(λK)ᵀV`` 2CKV; backward =
one forward (the dQ sweep) + the dK/dV sweep. Bytes model: every sweep reads its token
inputs once per value block, writes its outputs (o in the input dtype, gradients in
float32), plus the gates and the state in/out once per sequence (T = 8192). The roofline ignores the C×C ``exp`` work and
assumes enough (batch·head·value-block) programs to fill the chip; the chunk loop is
sequential per program, so a small B·H will fall below it.
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
from tttla_jax import impl as tt_impl  # noqa: E402
from tttla_jax.kernels import BlockSizes, chunk_costs  # noqa: E402

# Published peak numbers (dense bf16 matmul, HBM bandwidth).
CHIPS = {
    "H100-SXM": dict(flops=989e12, bw=3.35e12, platform="gpu"),
    "TPU-v5e": dict(flops=197e12, bw=819e9, platform="tpu"),
}


def roofline_per_token(K, V, C, H, itemsize, platform_, T=8192):
    """Analytic FLOPs and HBM bytes per token (all H heads) for forward and forward+backward."""
    if platform_ == "gpu":
        bv, bv_dq = BlockSizes().gpu(K, V)[0], BlockSizes().gpu(V, K)[0]
    else:
        bv, bv_dq = BlockSizes().tpu(K, V), BlockSizes().tpu(V, K)
    nvb, nvb_dq = V // bv, K // bv_dq  # the dQ sweep tiles K (its "value" dim)
    cc = chunk_costs(K, V, C, True, nvb)
    state = 2 * K * V * 4 / T  # S_0 in, S_T out (float32) once per sequence: the state stays on chip
    fwd_bytes = (2 * K * nvb + V) * itemsize + V * itemsize + 4 + state
    dq_bytes = (2 * V * nvb_dq + K) * itemsize + K * 4 + 4  # dO, V (per K block), K; dQ in f32
    dkv_bytes = (2 * K * nvb + 2 * V) * itemsize + (K * nvb + V) * 4 + 4 + state
    epilogue = (2 * K * itemsize + 2 * K * 4) + 3 * 4  # dg: q·dq − k·dk, reverse cumsum
    fb_bytes = fwd_bytes + dq_bytes + dkv_bytes + epilogue
    out = {}
    for name, flops, nbytes in (("fwd", cc["fwd_flops"] / C, fwd_bytes), ("fwd_bwd", (cc["fwd_flops"] + cc["bwd_flops"]) / C, fb_bytes)):
        out[name] = dict(flops=H * flops, bytes=H * nbytes, intensity=flops / nbytes)
    return out


def make(B, T, H, K, V, dtype):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), dtype)
    g = jnp.asarray(-rng.uniform(0.0, 0.1, size=(B, T, H)), jnp.float32)
    return q, k, v, g


def measure(impl, B, T, H, K, V, C, dtype, repeats):
    q, k, v, g = make(B, T, H, K, V, dtype)

    def fwd(q, k, v, g):
        return tt.linear_attention(q, k, v, log_decay=g, chunk_size=C, impl=impl)[0]

    def loss(q, k, v, g):
        return jnp.sum(fwd(q, k, v, g).astype(jnp.float32))

    f = jax.jit(fwd)
    fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    t_f = timeit(f, q, k, v, g, repeats=repeats)["median"]
    t_fb = timeit(fb, q, k, v, g, repeats=repeats)["median"]
    return dict(fwd_tokens_per_s=B * T / t_f, fwd_bwd_tokens_per_s=B * T / t_fb, fwd_s=t_f, fwd_bwd_s=t_fb)


def accuracy(out_path, T=256, K=64, C=64, seed=0):
    """bfloat16 accuracy of every kernel against float64 (``--accuracy``; interpret mode, so
    the kernels' own arithmetic: bf16 matmul operands, float32 accumulation).

    Inputs are drawn in float64, rounded once to bfloat16 (gates, β and the initial state in
    float32), and the truth is the float64 XLA form on the *same rounded* inputs — so the
    numbers are the kernel's error, not the input rounding. Error of each output, final state
    and gradient (fixed generic cotangents) = ``max |kernel − truth| / max |truth|``.
    """
    import tttla_jax as tt
    from tttla_jax import kernels

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(seed)
    B, H, V = 1, 2, K
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    k_unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, V))
    g = -rng.uniform(0.0, 0.1, size=(B, T, H))
    beta = rng.uniform(0.1, 0.9, size=(B, T, H))
    S0 = rng.normal(size=(B, H, K, V))
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731

    def run(fn, args):
        def loss(*a):
            o, S = fn(*a)
            wo = jnp.sin(jnp.arange(o.size, dtype=jnp.float64).reshape(o.shape))
            ws = jnp.cos(jnp.arange(S.size, dtype=jnp.float64).reshape(S.shape))
            return jnp.sum(o.astype(jnp.float64) * wo) + jnp.sum(S.astype(jnp.float64) * ws), (o, S)
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
        return [np.asarray(x, np.float64) for x in tuple(out) + tuple(grads)]

    g_channel = -rng.uniform(0.0, 0.1, size=(B, T, H, K))  # per key channel (GLA, KDA)
    cases = []
    for masking, gate in (("causal", g), ("chunk", g), ("causal", g_channel), ("chunk", g_channel)):
        args = (bf(q), bf(k / np.sqrt(K)), bf(v), f32(gate), f32(S0))
        names = ("o", "S_T", "dq", "dk", "dv", "dlog_decay", "dS0")
        kern = lambda q_, k_, v_, g_, s_, m=masking: kernels.linear_attention(  # noqa: E731
            q_, k_, v_, log_decay=g_, initial_state=s_, masking=m, chunk_size=C, output_final_state=True,
            interpret="gpu")
        ref = lambda q_, k_, v_, g_, s_, m=masking: tt.linear_attention(  # noqa: E731
            q_, k_, v_, log_decay=g_, initial_state=s_, masking=m, chunk_size=C, output_final_state=True,
            impl="chunked")
        label = "linear_attention" + (" per-channel" if gate.ndim == 4 else "")
        cases.append((f"{label} {masking}", names, kern, ref, args))
    names = ("o", "S_T", "dq", "dk", "dv", "dbeta", "dlog_decay", "dS0")
    kern = lambda q_, k_, v_, b_, g_, s_: kernels.delta_rule(  # noqa: E731
        q_, k_, v_, b_, log_decay=g_, initial_state=s_, chunk_size=C, output_final_state=True, interpret="gpu")
    ref = lambda q_, k_, v_, b_, g_, s_: tt.delta_rule(  # noqa: E731
        q_, k_, v_, b_, log_decay=g_, initial_state=s_, chunk_size=C, output_final_state=True, impl="recurrent")
    for label, gate in (("delta_rule (gated)", g), ("delta_rule per-channel (KDA)", g_channel)):
        cases.append((label, names, kern, ref, (bf(q), bf(k_unit), bf(v), f32(beta), f32(gate), f32(S0))))

    start = setup(tune=True)
    result = dict(T=T, K=K, V=V, H=H, chunk_size=C, inputs="bfloat16 q,k,v; float32 gates/state",
                  truth="float64 XLA form on the same rounded inputs", errors={})
    print(f"# bfloat16 kernels vs float64 (T={T}, K=V={K}, C={C}; interpret mode): max|err| / max|truth|")
    for label, names, kern, ref, args in cases:
        got = run(kern, args)
        want = run(ref, tuple(f64(x) for x in args))
        errs = {n: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) for n, a, b in zip(names, got, want)}
        result["errors"][label] = errs
        print(f"{label:36s} " + "  ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    result["machine"] = m = machine(start)
    print(describe(m))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out_path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", action="store_true",
                   help="instead: bfloat16 accuracy of every kernel against float64 (interpret mode)")
    p.add_argument("--T", type=int, nargs="+", default=None)
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
    p.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    a = p.parse_args(argv)
    if a.accuracy:
        out = a.out if a.out != p.get_default("out") else os.path.join(os.path.dirname(a.out), "kernels_bf16.json")
        return accuracy(out)
    start = setup(tune=not a.no_tune_malloc)
    backend = tt_impl.platform()
    accel = tt_impl.on_accelerator()
    C, H = a.chunk_size, a.H
    # the device's name is kept next to the shared machine record, which only counts devices
    result = dict(device=str(jax.devices()[0]), chunk_size=C, H=H, repeats=a.repeats,
                  statistic="median of repeats after one compile/warm-up call", roofline=[], measured=[])

    print(f"# analytic roofline per token (H={H} heads, C={C}, T=8192, bfloat16 inputs, causal with decay)")
    print(f"{'chip':10s} {'K=V':>4s} {'pass':8s} {'MFLOP/tok':>10s} {'KB/tok':>8s} {'FLOP/B':>7s} "
          f"{'bound':>7s} {'Mtok/s':>8s}")
    for chip, spec in CHIPS.items():
        for d in a.head_dims:
            rf = roofline_per_token(d, d, C, H, 2, spec["platform"])
            for pas, r in rf.items():
                t_compute, t_mem = r["flops"] / spec["flops"], r["bytes"] / spec["bw"]
                tok_s = 1.0 / max(t_compute, t_mem)
                bound = "compute" if t_compute > t_mem else "memory"
                print(f"{chip:10s} {d:4d} {pas:8s} {r['flops'] / 1e6:10.2f} {r['bytes'] / 1e3:8.1f} "
                      f"{r['intensity']:7.1f} {bound:>7s} {tok_s / 1e6:8.1f}")
                result["roofline"].append(dict(chip=chip, K=d, V=d, pass_=pas, flops_per_token=r["flops"],
                                               bytes_per_token=r["bytes"], intensity=r["intensity"],
                                               bound=bound, roofline_tokens_per_s=tok_s))

    Ts = a.T or ([2048, 8192] if accel else [1024])
    B = a.B or (4 if accel else 1)
    impls = ["pallas", "chunked"] if accel else ["chunked"]
    dtype = jnp.bfloat16 if accel else jnp.float32
    heads = H if accel else 4
    print(f"\n# measured on {backend} ({jax.devices()[0]}), B={B}, H={heads}, {jnp.dtype(dtype).name}"
          + ("" if accel else "  [CPU: the kernel runs only in interpret mode, not timed]"))
    print(f"{'impl':8s} {'T':>6s} {'K=V':>4s} {'fwd tok/s':>12s} {'fwd+bwd tok/s':>14s}")
    for T in Ts:
        for d in a.head_dims:
            for impl in impls:
                r = measure(impl, B, T, heads, d, d, C, dtype, a.repeats)
                print(f"{impl:8s} {T:6d} {d:4d} {r['fwd_tokens_per_s']:12.0f} {r['fwd_bwd_tokens_per_s']:14.0f}")
                result["measured"].append(dict(impl=impl, B=B, T=T, H=heads, K=d, V=d,
                                               dtype=jnp.dtype(dtype).name, **r))
    result["machine"] = m = machine(start)
    print(describe(m))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
