"""Benchmark: how fast can the chunked linear-attention forward (and forward+backward) be on XLA:CPU here?

Times ONLY the products the chunked forward must do — per tile of C tokens (``--tiles``) and per (B, H)
pair ``Q Kᵀ`` (C×K·K×C), ``(Q Kᵀ) V`` (C×C·C×V), ``Q S`` (C×K·K×V) and the state increment
``Kᵀ V`` (K×C·C×V) — on inputs already laid out per tile (``[N, B, H, C, d]``, keys as
``[N, B, H, K, C]``: every product a plain batched matmul, the layout the forward's step uses),
nothing else: no causal mask, no slicing from ``[B, T, H, d]``, no transposes. Two ways:

* ``batched``: each product as one batched dot over all ``N·B·H`` tiles at once (no loop, no
  dependency between tiles; ``Q S`` reads one stand-in state per tile, the work is the same);
* ``scan``: the recurrence itself — a ``lax.scan`` over the N tiles whose step does the four
  products batched over the (B, H) pairs, plus the two adds the data flow needs
  (``o = (Q Kᵀ) V + Q S``, ``S ← S + Kᵀ V``) and the stacking of the outputs (unroll 4, as
  the chunked form); ``scan in 2 groups``: the same with the batch split into two
  independent groups inside each step, as the forward without decay runs it.

and ``fwd+bwd products``: the forward's products (keeping the state before every tile) then
the backward's nine per tile in a reverse scan (``Aᵀ = K Qᵀ``, ``dPᵀ = V dOᵀ``,
``dV = K dS + Aᵀ dO``, ``dK = V dSᵀ + dPᵀ Q``, ``dQᵀ = Kᵀ dPᵀ + S dOᵀ``, ``dS ← dS + Qᵀ dO``;
the chunked backward's step without decay, :func:`tttla_jax.ops.linear_attention._chunk_bwd_step_kmajor`),
with a stand-in output cotangent, nothing else — the implied best-possible forward+backward;

and prints, next to them: the FLOPs, their rate, the rate of one large 2-D matmul measured in
the same run (``--matmul-n``³, before and after), the forward of ``tt.linear_attention``
(``impl="chunked"``, ``chunk_size=64``, no decay: it runs 32-token tiles on a CPU host), its
forward+backward (loss ``sum(o²)``, as ``benchmarks/forms.py``; without and with a per-head
log-decay) and, with ``--fla``, flash-linear-attention's PyTorch ``naive_chunk_linear_attn``
(forward, and forward+backward of the same loss; in a worker of
``--torch-python``, as ``benchmarks/peers.py``). The faster of the two product timings is the
implied best-possible forward on XLA:CPU in this layout; ``peer / 3`` is what 3× the peer needs.
All timings are interleaved (every form once per round), medians of ``--rounds``.

    python benchmarks/la_bound.py [--fla PATH] [--rounds 11] [--tiles 32 64] [--T 2048]
                                  [--out benchmarks/results/la_bound.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import describe, machine, setup  # noqa: E402

import tttla_jax as tt  # noqa: E402


def product_flops(B, T, H, K, V, C):
    """FLOPs of the four products over ``ceil(T / C)`` tiles of C tokens (multiply-add = 2)."""
    N = -(-T // C)
    return B * H * N * (2 * C * C * K + 2 * C * C * V + 4 * C * K * V)


def fwdbwd_flops(B, T, H, K, V, C):
    """FLOPs of the forward's four products and the backward's nine over ``ceil(T / C)`` tiles:
    ``Aᵀ``, ``dPᵀ``, ``Aᵀ dO``, ``dPᵀ Q``, ``Kᵀ dPᵀ`` (C×C each) and ``K dS``, ``V dSᵀ``,
    ``S dOᵀ``, ``Qᵀ dO`` (C×K×V each)."""
    N = -(-T // C)
    return product_flops(B, T, H, K, V, C) + B * H * N * (2 * C * C * (3 * K + 2 * V) + 8 * C * K * V)


def inputs(B, T, H, K, V):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    return q, k, v


def tile_forms(q, k, v, C, scale):
    """The product-only callables (jitted) for tiles of C tokens, with their inputs."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    rng = np.random.default_rng(1)
    N = T // C
    tiles = lambda x: jnp.transpose(x.reshape(B, N, C, H, -1), (1, 0, 3, 2, 4))  # noqa: E731  [N, B, H, C, d]
    Qc, Vc = jax.block_until_ready(tiles(q) * scale), jax.block_until_ready(tiles(v))
    Kt = jax.block_until_ready(jnp.swapaxes(tiles(k), -1, -2))  # [N, B, H, K, C]
    S_all = jnp.asarray(rng.normal(size=(N, B, H, K, V)), jnp.float32)  # stand-in states, one per tile
    A_all = jnp.asarray(rng.normal(size=(N, B, H, C, C)), jnp.float32)  # stand-in C×C scores, one per tile

    mm = jnp.matmul

    def batched(Qc, Kt, Vc, S_all, A_all):
        return mm(Qc, Kt), mm(mm(Qc, Kt), Vc), mm(Qc, S_all), mm(Kt, Vc)

    def batched_each(which):
        return {"qk": lambda Qc, Kt, Vc, S_all, A_all: mm(Qc, Kt),
                "av": lambda Qc, Kt, Vc, S_all, A_all: mm(A_all, Vc),
                "qs": lambda Qc, Kt, Vc, S_all, A_all: mm(Qc, S_all),
                "kv": lambda Qc, Kt, Vc, S_all, A_all: mm(Kt, Vc)}[which]

    def scan(Qc, Kt, Vc, S_all, A_all, groups=1):
        # groups > 1: the batch split into independent groups inside each step, as the
        # forward's step without decay does (two groups of (B, H) pairs)
        def step(S, x):
            outs, states = [], []
            for i, Sg in enumerate(S):
                qn, ktn, vn = (y[i * (B // groups):(i + 1) * (B // groups)] for y in x)
                outs.append(mm(mm(qn, ktn), vn) + mm(qn, Sg))
                states.append(Sg + mm(ktn, vn))
            return tuple(states), tuple(outs)

        S0 = tuple(jnp.zeros((B // groups, H, K, V), jnp.float32) for _ in range(groups))
        S, o = lax.scan(step, S0, (Qc, Kt, Vc), unroll=4)
        return o, S

    Kc, Qt = jax.block_until_ready(tiles(k)), jax.block_until_ready(jnp.swapaxes(tiles(q) * scale, -1, -2))
    dOc = jax.block_until_ready(jnp.asarray(rng.normal(size=(N, B, H, C, V)), jnp.float32))  # stand-in dO

    def fwdbwd(Qc, Qt, Kc, Kt, Vc, dOc, groups=1):
        # the forward as above, also keeping the state before every tile (the residual the
        # backward reads), then the backward's nine products per tile in a reverse scan:
        # Aᵀ = K Qᵀ, dPᵀ = V dOᵀ, dV = K dS + Aᵀ dO, dK = V dSᵀ + dPᵀ Q, dQᵀ = Kᵀ dPᵀ + S dOᵀ,
        # dS ← dS + Qᵀ dO (every left operand contracted over its last axis), the three adds
        # to dV, dK, dQ and the state-cotangent add, the gradients stacked
        nb = B // groups
        sl = lambda x, i: x[i * nb:(i + 1) * nb]  # noqa: E731

        def fstep(S, x):
            outs, states = [], []
            for i, Sg in enumerate(S):
                qn, ktn, vn = (sl(y, i) for y in x)
                outs.append(mm(mm(qn, ktn), vn) + mm(qn, Sg))
                states.append(Sg + mm(ktn, vn))
            return tuple(states), (tuple(outs), S)

        S0 = tuple(jnp.zeros((nb, H, K, V), jnp.float32) for _ in range(groups))
        S, (o, S_prev) = lax.scan(fstep, S0, (Qc, Kt, Vc), unroll=4)

        def bstep(dS, x):
            grads, dSn = [], []
            for i, dSg in enumerate(dS):
                qn, qt, kn, kt, vn, don = (sl(y, i) for y in x[:6])
                Sg = x[6][i]
                At = jnp.einsum("bhjk,bhik->bhji", kn, qn)
                dPt = jnp.einsum("bhjv,bhiv->bhji", vn, don)
                dv = mm(kn, dSg) + mm(At, don)
                dk = jnp.einsum("bhcv,bhkv->bhck", vn, dSg) + mm(dPt, qn)
                dqt = mm(kt, dPt) + jnp.einsum("bhkv,bhiv->bhki", Sg, don)
                grads.append((dqt, dk, dv))
                dSn.append(dSg + mm(qt, don))
            return tuple(dSn), tuple(grads)

        dS, grads = lax.scan(bstep, S, (Qc, Qt, Kc, Kt, Vc, dOc, S_prev), reverse=True, unroll=4)
        return o, grads, dS

    tile_args = (Qc, Kt, Vc, S_all, A_all)
    fb_args = (Qc, Qt, Kc, Kt, Vc, dOc)
    fns = {f"fwd+bwd products, scan, tile {C}": (jax.jit(fwdbwd), fb_args),
           f"fwd+bwd products, scan in 2 groups, tile {C}": (jax.jit(functools.partial(fwdbwd, groups=2)), fb_args),
           f"products, scan, tile {C}": (jax.jit(scan), tile_args),
           f"products, scan in 2 groups, tile {C}": (jax.jit(functools.partial(scan, groups=2)), tile_args),
           f"products, batched (4 dots), tile {C}": (jax.jit(batched), tile_args)}
    for w in ("qk", "av", "qs", "kv"):
        fns[f"  batched {w}, tile {C}"] = (jax.jit(batched_each(w)), tile_args)
    return fns


def matmul_rate(n, repeats=5):
    a = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def timed(fn, args):
    def run():
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0, time.process_time() - c0
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--tiles", type=int, nargs="+", default=[32, 64],
                   help="tokens per tile of the products [32 (what the forward runs on a CPU host) and 64]")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--fla", help="checkout of flash-linear-attention: also time its naive_chunk_linear_attn")
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", "/tmp/torchenv/bin/python"))
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "la_bound.json"))
    a = p.parse_args(argv)
    start = setup()
    B, T, H, K, V = a.B, a.T, a.H, a.D, a.D
    for C in a.tiles + [64]:
        if T % C:
            p.error(f"--T: got {T}, expected a multiple of every --tiles entry ({a.tiles}) and of 64 (the peer's chunk)")
    scale = K ** -0.5
    q, k, v = inputs(B, T, H, K, V)
    fns = {}
    for C in a.tiles:
        fns.update(tile_forms(q, k, v, C, scale))
    fns["tt.linear_attention fwd"] = (
        jax.jit(lambda q, k, v: tt.linear_attention(q, k, v, scale=scale, impl="chunked", chunk_size=64)[0]), (q, k, v))
    g = jnp.asarray(-np.random.default_rng(2).uniform(0, 0.1, size=(B, T, H)), jnp.float32)

    def loss(q, k, v, g=None):  # as benchmarks/forms.py
        return jnp.sum(tt.linear_attention(q, k, v, scale=scale, log_decay=g, impl="chunked", chunk_size=64)[0] ** 2)

    fns["tt.linear_attention fwd+bwd"] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), (q, k, v))
    fns["tt.linear_attention fwd+bwd, log-decay"] = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))), (q, k, v, g))
    arrays = dict(q=np.asarray(q), k=np.asarray(k), v=np.asarray(v))
    runs = {n: timed(f, args) for n, (f, args) in fns.items()}
    peer = None
    workdir = tempfile.mkdtemp()
    if a.fla:
        from peers import TorchPeer  # the PyTorch worker of benchmarks/peers.py
        path = os.path.join(a.fla, "fla", "ops", "linear_attn", "naive.py")
        peer = TorchPeer(a.torch_python, dict(kind="fla_la", file=path, chunk=64, scale=scale), arrays,
                         a.torch_threads, workdir)
        runs["fla naive_chunk_linear_attn fwd (PyTorch)"] = lambda: (peer.call("fwd")(), float("nan"))
        runs["fla naive_chunk_linear_attn fwd+bwd (PyTorch)"] = lambda: (peer.call("fwdbwd")(), float("nan"))
    rate_before = matmul_rate(a.matmul_n)
    for r in runs.values():  # compile / warm up
        r()
    wall = {n: [] for n in runs}
    cpu = {n: [] for n in runs}
    load0 = os.getloadavg()
    for i in range(a.rounds):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for n in order:
            w, c = runs[n]()
            wall[n].append(w)
            cpu[n].append(c)
    load1 = os.getloadavg()
    rate_after = matmul_rate(a.matmul_n)
    if peer is not None:
        peer.close()
    rate = 0.5 * (rate_before + rate_after)

    def flops_of(name):
        """The FLOPs a row does: its tile's four products, or one of them; the forward is
        charged the 32-token tiles' products (what it runs on a CPU host)."""
        C = int(name.rsplit("tile ", 1)[1]) if "tile " in name else 32
        if "fwd+bwd" in name:
            return fwdbwd_flops(B, T, H, K, V, C)
        each = {"qk": 2 * C * C * K, "av": 2 * C * C * V, "qs": 2 * C * K * V, "kv": 2 * C * K * V}
        for key, f in each.items():
            if name.strip().startswith(f"batched {key}"):
                return B * H * (T // C) * f
        return product_flops(B, T, H, K, V, C)

    rows = []
    for n in runs:
        w = statistics.median(wall[n])
        c = statistics.median(cpu[n]) if not np.isnan(cpu[n][0]) else None
        f = flops_of(n)
        rows.append(dict(name=n, wall_ms=1e3 * w, cpu_ms=None if c is None else 1e3 * c, flops=f,
                         gflops=f / w / 1e9, frac_matmul=f / w / 1e9 / rate, wall_samples_ms=[1e3 * x for x in wall[n]]))
    get = {r["name"]: r for r in rows}
    best_name = min((n for n in get if n.startswith("products,")), key=lambda n: get[n]["wall_ms"])
    best = get[best_name]["wall_ms"]
    fl = product_flops(B, T, H, K, V, min(a.tiles))
    ideal_ms = fl / (rate * 1e9) * 1e3
    print(f"B={B} T={T} H={H} K=V={K}: " + ", ".join(
        f"tiles of {C} tokens {product_flops(B, T, H, K, V, C) / 1e9:.3f} GFLOP of products" for C in a.tiles))
    print(f"2-D matmul {a.matmul_n}^3 float32: {rate_before:.1f} GFLOP/s before, {rate_after:.1f} after; "
          f"load {load0[0]:.2f} -> {load1[0]:.2f}\n")
    print("| what | wall ms | CPU ms | GFLOP/s | % of 2-D matmul |")
    print("|---|---|---|---|---|")
    for r in rows:
        cpu_s = "—" if r["cpu_ms"] is None else f"{r['cpu_ms']:.2f}"
        print(f"| {r['name']} | {r['wall_ms']:.2f} | {cpu_s} | {r['gflops']:.1f} | {100 * r['frac_matmul']:.1f} |")
    summary = dict(product_gflop=fl / 1e9, matmul_gflops=rate, ideal_ms_at_matmul_rate=ideal_ms,
                   best_products_ms=best, best_products=best_name, ours_fwd_ms=get["tt.linear_attention fwd"]["wall_ms"],
                   ours_over_products=get["tt.linear_attention fwd"]["wall_ms"] / best)
    fb_name = min((n for n in get if n.startswith("fwd+bwd products")), key=lambda n: get[n]["wall_ms"])
    fb_best = get[fb_name]["wall_ms"]
    fb_fl = fwdbwd_flops(B, T, H, K, V, min(a.tiles))
    summary.update(fwdbwd_product_gflop=fb_fl / 1e9, fwdbwd_ideal_ms_at_matmul_rate=fb_fl / (rate * 1e9) * 1e3,
                   best_fwdbwd_products_ms=fb_best, best_fwdbwd_products=fb_name,
                   ours_fwdbwd_ms=get["tt.linear_attention fwd+bwd"]["wall_ms"],
                   ours_fwdbwd_over_products=get["tt.linear_attention fwd+bwd"]["wall_ms"] / fb_best,
                   ours_fwdbwd_decay_ms=get["tt.linear_attention fwd+bwd, log-decay"]["wall_ms"],
                   ours_fwdbwd_decay_over_products=get["tt.linear_attention fwd+bwd, log-decay"]["wall_ms"] / fb_best)
    print(f"\nfwd+bwd products of {min(a.tiles)}-token tiles ({fb_fl / 1e9:.3f} GFLOP) at the 2-D matmul rate: "
          f"{summary['fwdbwd_ideal_ms_at_matmul_rate']:.2f} ms; fastest measured products alone ({fb_name}): {fb_best:.2f} ms; "
          f"our fwd+bwd {summary['ours_fwdbwd_ms']:.2f} ms ({summary['ours_fwdbwd_over_products']:.2f}x), with a log-decay "
          f"{summary['ours_fwdbwd_decay_ms']:.2f} ms ({summary['ours_fwdbwd_decay_over_products']:.2f}x)")
    print(f"\nproducts of {min(a.tiles)}-token tiles at the 2-D matmul rate: {ideal_ms:.2f} ms; fastest measured "
          f"products alone ({best_name}): {best:.2f} ms; our forward {summary['ours_fwd_ms']:.2f} ms ({summary['ours_over_products']:.2f}x the products)")
    if peer is not None:
        pm = get["fla naive_chunk_linear_attn fwd (PyTorch)"]["wall_ms"]
        summary.update(peer_fwd_ms=pm, peer_over_3_ms=pm / 3, ours_speedup=pm / summary["ours_fwd_ms"],
                       best_possible_speedup=pm / best, peer_min_ms=min(get["fla naive_chunk_linear_attn fwd (PyTorch)"]["wall_samples_ms"]),
                       three_x_reachable_by_products=best <= pm / 3)
        pfb = get["fla naive_chunk_linear_attn fwd+bwd (PyTorch)"]["wall_ms"]
        summary.update(peer_fwdbwd_ms=pfb, ours_fwdbwd_speedup=pfb / summary["ours_fwdbwd_ms"],
                       ours_fwdbwd_decay_vs_peer_nodecay=pfb / summary["ours_fwdbwd_decay_ms"],
                       best_possible_fwdbwd_speedup=pfb / fb_best)
        print(f"peer fwd+bwd {pfb:.2f} ms: ours {summary['ours_fwdbwd_speedup']:.2f}x (with a log-decay "
              f"{summary['ours_fwdbwd_decay_vs_peer_nodecay']:.2f}x); the products alone would give "
              f"{summary['best_possible_fwdbwd_speedup']:.2f}x")
        print(f"peer {pm:.2f} ms (fastest round {summary['peer_min_ms']:.2f} ms): 3x the peer needs <= {pm / 3:.2f} ms; "
              f"ours {summary['ours_speedup']:.2f}x; the products alone would give {summary['best_possible_speedup']:.2f}x "
              f"({'reachable' if best <= pm / 3 else 'NOT reachable'} by the products alone)")
    m = machine(start)
    print(describe(m))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(dict(config=dict(B=B, T=T, H=H, K=K, V=V, tiles=a.tiles, dtype="float32", rounds=a.rounds,
                                   matmul_n=a.matmul_n, statistic="median of interleaved rounds"),
                       machine=m, matmul_gflops_before=rate_before, matmul_gflops_after=rate_after,
                       rows=rows, summary=summary), fh, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
