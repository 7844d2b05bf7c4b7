"""Sequence (context) parallelism of the ops: memory per device and wall time vs the number of devices.

One sequence of T tokens (B = 1, H = 4, K = V = 64, float32, chunk 64, causal with log-decay)
split over P = 1, 2, 4, 8 devices of a ``"seq"`` mesh axis with
:func:`tttla_jax.parallel.sharded_linear_attention` / :func:`tttla_jax.parallel.sharded_delta_rule`
(gated: L2-normalised keys, β in (0, 1)); P = 1 is the single-device op itself
(``tt.linear_attention`` / ``tt.delta_rule``, ``impl="chunked"``). Everything is forward +
backward (the gradient of the sum of the outputs w.r.t. q, k, v, log-decay and β).

* **memory per device**: ``jax.jit(f).lower(...).compile().memory_analysis()`` of the
  partitioned program (arguments + outputs + temporaries − aliased), against the ideal
  ``memory(P = 1) / P`` and against the local op alone on the device's ``T / P`` tokens in the
  same ``shard_map`` (``local``: no state passing, the floor). Only compiles
  (``jax.ShapeDtypeStruct`` inputs), so every T is cheap.
* **wall time** (T ≤ ``--time-max-T``): median of ``--repeats`` calls. The P devices are
  ``--xla_force_host_platform_device_count=8`` host devices sharing this machine's cores, so the
  time is the *total* work of the P devices on those cores, not the time on P accelerators.
* **combine share** (T = ``--combine-T``, P = 8, and each ``--combine-extra T:P``; interleaved
  rounds): the full sharded step vs the
  same shard_map running only the local op on each slice (``local``: no state passing, the
  compute floor): ``combine = (full − local) / full`` (state passes, collectives, scans). (The
  single-device linear-attention op is token-major at every size, like the sharded form, so
  ``local`` is its like-for-like floor; older results also have a ``local_token_major`` row
  from when a differentiated slice of at most 8 MiB took a whole-slice layout.) Each call's
  CPU time of the process (the 8
  devices' total work) is recorded too (``cpu_times``): under a loaded machine it moves far less
  than wall time.

Layers (``--ops lact_v2 lact_v2_pipelined``): the LaCT layer at ladder step V2 (width
``H·D``, SwiGLU fast weights, momentum, Muon; chunk ``--lact-chunk``, the reference's 2048)
through :func:`tttla_jax.parallel.sharded_mixer` — ``lact_v2`` takes the associative combined
form (:mod:`tttla_jax.parallel.combine`), ``lact_v2_pipelined`` forces the pipelined form
(:func:`tttla_jax.parallel.mixer_apply`) for comparison; gradients w.r.t. the input and every
parameter; ``local`` = the layer alone on each slice. ``lact_v2_packed`` /
``lact_v2_packed_pipelined``: the same on packed documents of ``--doc-len`` tokens
(``cu_seqlens``; P = 1 is the single-device packed call, ``local`` the layer on each slice's
local documents). ``lact_v2_unaligned`` / ``lact_v2_unaligned_pipelined``: unpacked rows whose
slices are not a multiple of the chunk (``T / P`` not a multiple of ``--lact-chunk``, e.g.
T = 12288 on 8 devices with chunk 2048: chunks straddle devices); the combined form runs each
row as one packed document (docs/context_parallel.md, "When it applies"), the pipelined one is
forced for comparison, also in the same interleaved rounds of the combine-share run.

Prints a Markdown table and writes ``benchmarks/results/context_parallel.json`` (rows of the ops
not run this time are kept from the existing file).

    python benchmarks/context_parallel.py [--T 16384 ... 262144] [--P 1 2 4 8] [--ops linear_attention delta_rule lact_v2]
"""
from __future__ import annotations

import os

_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join(_FLAGS + ["--xla_force_host_platform_device_count=8"])

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as Ps  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import describe, interleaved, machine, memory, setup, timeit  # noqa: E402

import tttla_jax as tt  # noqa: E402
from tttla_jax import parallel as tp  # noqa: E402


# "ones": the loss is the sum of the outputs (the output cotangent a constant); "data": the sum
# of the outputs weighted by an input "w" of their shape (the cotangent data, as in training)
COTANGENT = ["ones"]
LAYERS = ("lact_v2", "lact_v2_pipelined", "lact_v2_packed", "lact_v2_packed_pipelined",
          "lact_v2_unaligned", "lact_v2_unaligned_pipelined")
OPS = ("linear_attention", "delta_rule") + LAYERS
LACT_CHUNK = [2048]  # set from --lact-chunk
DOC_LEN = [3000]     # set from --doc-len: packed rows' documents (the last one shorter)


def doc_offsets(T):
    """``cu_seqlens`` of the packed LaCT rows: documents of ``DOC_LEN`` tokens (the last one
    takes the rest), so device boundaries fall inside chunks at changing phases."""
    return jnp.asarray(list(range(0, T, DOC_LEN[0])) + [T], jnp.int32)


def lact_layer(H, D):
    from flax import nnx
    from tttla_jax.nn import LaCTLayer
    m = LaCTLayer(width=H * D, num_heads=H, preset="v2", chunk_size=LACT_CHUNK[0], rngs=nnx.Rngs(0))
    return nnx.split(m)


def layer_loss_fn(op, P, mesh, H, D, local=False):
    """Sum of the LaCT layer's outputs (one device for P = 1; sharded_mixer, or the forced
    pipelined form, or the layer alone on each slice with ``local``)."""
    from flax import nnx
    gd, _ = lact_layer(H, D)
    tok = Ps(None, "seq")

    packed = "packed" in op

    def f(x):
        T = x["x"].shape[1]
        kw = {"cu_seqlens": doc_offsets(T)} if packed else {}
        if P == 1:
            return jnp.sum(nnx.merge(gd, x["params"])(x["x"], **kw)[0])
        if op in ("lact_v2", "lact_v2_packed", "lact_v2_unaligned") and not local:
            return jnp.sum(tp.sharded_mixer(nnx.merge(gd, x["params"]), x["x"], mesh=mesh, **kw))

        def body(st, xs):
            m = nnx.merge(gd, st)
            if local:
                lk = {"cu_seqlens": tp.local_cu_seqlens(kw["cu_seqlens"], T // P, "seq")} if packed else {}
                with tp.sequence_parallel(None):
                    y = m(xs, **lk)[0]
            else:
                y = tp.mixer_apply(m, xs, axis_name="seq", **kw)[0]
            return jax.lax.psum(jnp.sum(y), "seq")

        return jax.shard_map(body, mesh=mesh, in_specs=(Ps(), tok), out_specs=Ps(),
                             check_vma=not local)(x["params"], x["x"])
    return f


def mesh_of(P):
    return jax.make_mesh((P,), ("seq",), devices=jax.devices()[:P])


def shapes(op, T, H, D):
    s = {"q": (1, T, H, D), "k": (1, T, H, D), "v": (1, T, H, D), "log_decay": (1, T, H)}
    if op == "delta_rule":
        s["beta"] = (1, T, H)
    if COTANGENT[0] == "data" and op not in LAYERS:
        s["w"] = (1, T, H, D)
    return s


def loss_fn(op, P, C, mesh, H=4, D=64):
    """Sum of the outputs of the op (single device for P = 1, sharded otherwise)."""
    if op in LAYERS:
        return layer_loss_fn(op, P, mesh, H, D)

    def f(x):
        gates = (x["beta"],) if op == "delta_rule" else ()
        if P == 1:
            fn = tt.delta_rule if op == "delta_rule" else tt.linear_attention
            o, _ = fn(x["q"], x["k"], x["v"], *gates, log_decay=x["log_decay"], chunk_size=C, impl="chunked")
        else:
            fn = tp.sharded_delta_rule if op == "delta_rule" else tp.sharded_linear_attention
            o, _ = fn(x["q"], x["k"], x["v"], *gates, x["log_decay"], mesh=mesh, chunk_size=C, impl="chunked")
        return jnp.sum(o) if "w" not in x else jnp.sum(o * x["w"])
    return f


def local_loss_fn(op, C, mesh, H=4, D=64):
    """The local op alone on each slice (no state passing)."""
    if op in LAYERS:
        return layer_loss_fn(op, 8 if mesh is None else len(mesh.devices.flat), mesh, H, D, local=True)

    def body(q, k, v, g, *rest):
        if op == "delta_rule":
            o, _ = tt.delta_rule(q, k, v, rest[0], log_decay=g, chunk_size=C, impl="chunked")
        else:
            o, _ = tt.linear_attention(q, k, v, log_decay=g, chunk_size=C, impl="chunked")
        w = rest[-1] if COTANGENT[0] == "data" else None
        return jax.lax.psum(jnp.sum(o) if w is None else jnp.sum(o * w), "seq")

    tok = Ps(None, "seq")

    def f(x):
        args = [x[n] for n in ("q", "k", "v", "log_decay")] + ([x["beta"]] if op == "delta_rule" else [])
        args += [x["w"]] if "w" in x else []
        # check_vma off: the ops create their zero initial state inside (not marked varying)
        return jax.shard_map(body, mesh=mesh, in_specs=(tok,) * len(args), out_specs=Ps(), check_vma=False)(*args)
    return f


def delta_breakdown_fns(x, P, C, mesh, H, D):
    """The parts of the delta rule's sharded step (``--delta-breakdown``), each a jitted
    shard_map over the P devices on the same inputs: the step with the state-only passes
    (``_DELTA_WIDENED`` off: a transform pass, then the local op; backward a cotangent pass,
    then the local backward), the forwards alone (sharded new / old, the local op), the
    widened form's own loops without the widening and the combine (``local_loops``: its floor;
    ``_delta_widened_first(..., combine=False)``), the
    transform pass (``_delta_state_pass`` from ``[0 | I_K]``), the cotangent pass
    (``_delta_cot_pass``) and the collectives with their scans (``_carry_in`` + ``_carry_back``)."""
    from tttla_jax.parallel import ops as cp_ops
    tok = Ps(None, "seq")
    names = ("q", "k", "v", "log_decay", "beta")

    def sharded(body):
        def f(x):
            return jax.shard_map(body, mesh=mesh, in_specs=(tok,) * 5, out_specs=Ps(), check_vma=False)(
                *[x[n] for n in names])
        return jax.jit(f)

    def fwd(q, k, v, g, b):
        o, _ = tp.delta_rule(q, k, v, b, g, axis_name="seq", chunk_size=C, impl="chunked")
        return jax.lax.psum(jnp.sum(o), "seq")

    def local_fwd(q, k, v, g, b):
        o, _ = tt.delta_rule(q, k, v, b, log_decay=g, chunk_size=C, impl="chunked")
        return jax.lax.psum(jnp.sum(o), "seq")

    def transform(q, k, v, g, b):
        S0 = jnp.concatenate([jnp.zeros((1, H, D, D), jnp.float32),
                              jnp.broadcast_to(jnp.eye(D, dtype=jnp.float32), (1, H, D, D))], -1)
        return jax.lax.psum(jnp.sum(cp_ops._delta_state_pass(k, v, b, g, S0, C)), "seq")

    def cot(q, k, v, g, b):
        X = cp_ops._delta_cot_pass(q, k, b, g, v, jnp.zeros((1, H, D, D), jnp.float32), C, D ** -0.5)
        return jax.lax.psum(jnp.sum(X), "seq")

    def collectives(q, k, v, g, b):
        p = jax.lax.axis_index("seq")
        A, Bst = jnp.swapaxes(k[:, :D], 1, 2), jnp.swapaxes(v[:, :D], 1, 2)   # [1, H, K, K], [1, H, K, V]
        c = cp_ops._carry_in(A, Bst, "seq", p, True)
        dE = cp_ops._carry_back(A, c, "seq", p, P, True)
        return jax.lax.psum(jnp.sum(dE), "seq")

    def loops(q, k, v, g, b):  # the widened form's loops without the widening and the combine
        P_, p = jax.lax.axis_size("seq"), jax.lax.axis_index("seq")
        L = q.shape[1]
        core = cp_ops._delta_widened_first("seq", C, L, combine=False)
        lay = cp_ops._Layout.build(None, p, P_, 1, L)
        h0m = jnp.zeros((1, H, D, D), jnp.float32) + jnp.zeros_like(q[:1, 0, :, :, None])
        o, _ = core((q, k, v, b, g, jnp.asarray(D ** -0.5, jnp.float32)), h0m, lay)
        return jax.lax.psum(jnp.sum(o), "seq")

    def grad_of(body):
        def f(x):
            return jax.shard_map(body, mesh=mesh, in_specs=(tok,) * 5, out_specs=Ps(), check_vma=False)(
                *[x[n] for n in names])
        return jax.jit(jax.grad(f))

    cp_ops._DELTA_WIDENED = False
    try:  # traced (and compiled) with the flag off
        old = {"full_state_passes": jax.jit(jax.grad(loss_fn("delta_rule", P, C, mesh, H, D))).lower(x).compile(),
               "fwd_state_passes": sharded(fwd).lower(x).compile()}
    finally:
        cp_ops._DELTA_WIDENED = True
    return {**old, "local_loops": grad_of(loops), "fwd": sharded(fwd), "local_fwd": sharded(local_fwd),
            "local_loops_fwd": sharded(loops), "transform_pass": sharded(transform),
            "cot_pass": sharded(cot), "collectives": sharded(collectives)}


def delta_flop_counts(L, H, D, C):
    """Where the folded delta form's extra work goes, in FLOPs per device on a slice of ``L``
    tokens (XLA's ``cost_analysis()`` of one group step of the chunked form, compiled alone, so
    loop-free and load-independent): the local op is ``NG`` group steps forward plus ``NG``
    backward steps (each the group's ``jax.vjp``, its forward recomputed); the folded form runs
    its forward group step on ``V + K`` value columns instead of ``V``, plus the output correction
    ``(q̃Φ) c`` and the contraction ``Σ_t (q̃_t Φ_t)ᵀ dO_t`` (``2 L H K V`` each). ``phi_only``:
    the recurrence of ``Φ`` alone (per chunk ``W Φ``, ``(I + A)⁻¹ ·``, ``K̃ᵀ ·`` on ``K``
    columns, no outputs) — what any form needs for the device's transform ``A_p``."""
    from tttla_jax import impl as _impl
    from tttla_jax.ops import chunk as ck
    dmod = importlib.import_module("tttla_jax.ops.delta_rule")
    C = min(C, dmod._CPU_TILE) if _impl.platform() == "cpu" else C
    G = dmod._GROUP_CHUNKS
    n = G * C
    step = ck._token_group_step(C, G, True)

    def sds(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    def flops(f, *a):
        ca = jax.jit(f).lower(*a).compile().cost_analysis()
        return float((ca[0] if isinstance(ca, list) else ca)["flops"])

    def args(W):
        return sds(1, H, D, W), sds(1, n, H, D), sds(1, n, H, D), sds(1, n, H, W), sds(1, n, H), sds(1, n, H)

    def fwd_bwd(*a):
        out, vjp = jax.vjp(step, *a)
        return vjp(out)

    fwd, fwd_w, bwd = flops(step, *args(D)), flops(step, *args(2 * D)), flops(fwd_bwd, *args(D))
    NG = L // n
    local = NG * (fwd + bwd)
    rec = {"L": L, "chunk": C, "group_chunks": G, "group_fwd": fwd, "group_fwd_widened": fwd_w,
           "group_vjp": bwd, "local": local, "widening": NG * (fwd_w - fwd),
           "correction": 2.0 * L * H * D * D, "dcl": 2.0 * L * H * D * D,
           "phi_only": NG * G * 2.0 * H * (C * D * D + C * C * D + D * C * D)}
    rec["extra"] = rec["widening"] + rec["correction"] + rec["dcl"]
    rec["extra_share_of_full"] = rec["extra"] / (local + rec["extra"])
    rec["phi_only_share_of_full"] = rec["phi_only"] / (local + rec["phi_only"])
    return rec


def specs_for(op, T, H, D, P, mesh):
    tok = NamedSharding(mesh, Ps(None, "seq")) if P > 1 else None
    if op in LAYERS:
        _, st = lact_layer(H, D)
        return {"x": jax.ShapeDtypeStruct((1, T, H * D), jnp.float32, sharding=tok),
                "params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), st)}
    return {n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=tok) for n, s in shapes(op, T, H, D).items()}


def inputs_for(op, T, H, D, P, mesh, seed=0):
    rng = np.random.default_rng(seed)
    if op in LAYERS:
        x = jnp.asarray(rng.normal(size=(1, T, H * D)), jnp.float32)
        if P > 1:
            x = jax.device_put(x, NamedSharding(mesh, Ps(None, "seq")))
        return {"x": x, "params": lact_layer(H, D)[1]}
    x = {}
    for n, s in shapes(op, T, H, D).items():
        if n == "log_decay":
            a = rng.uniform(-0.3, 0.0, s)
        elif n == "beta":
            a = rng.uniform(0.0, 1.0, s)
        else:
            a = rng.normal(size=s)
            if n == "k":
                a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        x[n] = jnp.asarray(a, jnp.float32)
        if P > 1:
            x[n] = jax.device_put(x[n], NamedSharding(mesh, Ps(None, "seq")))
    return x


def cpu_timed(fn, acc):
    """``fn`` recording the process's CPU time of every call in ``acc`` (the host devices'
    total work, less sensitive to other processes on the machine than wall time)."""
    def g(*args):
        c0 = time.process_time()
        out = jax.block_until_ready(fn(*args))
        acc.append(time.process_time() - c0)
        return out
    return g


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 262144])
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--time-max-T", type=int, default=65536, help="time the steps up to this T (memory: every T)")
    ap.add_argument("--combine-T", type=int, default=65536)
    ap.add_argument("--combine-extra", nargs="*", default=[], metavar="T:P",
                    help="further combine-share measurements at T tokens on P devices (e.g. 16384:2, the "
                         "per-device slice of 65536:8 with one core per device)")
    ap.add_argument("--ops", nargs="+", default=["linear_attention", "delta_rule"], choices=list(OPS))
    ap.add_argument("--lact-chunk", type=int, default=2048, help="chunk of the LaCT layer rows")
    ap.add_argument("--doc-len", type=int, default=3000, help="document length of the packed LaCT rows")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "context_parallel.json"))
    ap.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    ap.add_argument("--la-transform", action="store_true",
                    help="combine share of linear_attention: also time the separate-transform form "
                         "(tttla_jax.parallel.ops._LA_STATES_FIRST off) in the same interleaved rounds")
    ap.add_argument("--cotangent", choices=["ones", "data"], default="ones",
                    help="the loss: the sum of the outputs (ones: a constant output cotangent), or weighted by "
                         "an input of their shape (data: the cotangent is an argument, as in training); the "
                         "rows of 'data' go to rows_data_cotangent / combine_data_cotangent in the JSON")
    ap.add_argument("--delta-flops", action="store_true",
                    help="delta_rule: FLOPs per device of the folded form's extra work against the local "
                         "op (cost_analysis of one compiled group step; the slice of --combine-T / 8 tokens)")
    ap.add_argument("--delta-breakdown", action="store_true",
                    help="combine share of delta_rule: also time, in the same interleaved rounds, the "
                         "state-only-passes form (tttla_jax.parallel.ops._DELTA_WIDENED off) and the parts "
                         "of the step (forwards alone, the transform pass, the cotangent pass, the collectives)")
    a = ap.parse_args()
    COTANGENT[0] = a.cotangent
    start = setup(tune=not a.no_tune_malloc)
    H, D, C = a.H, a.D, a.chunk
    LACT_CHUNK[0] = a.lact_chunk
    DOC_LEN[0] = a.doc_len
    rows, combine = [], []
    for op in a.ops:
        if op.startswith("lact_v2_unaligned"):
            runs = [(T, P) for T in a.T for P in a.P if P > 1] + [(T, 8) for T in [a.combine_T] if T and 8 in a.P]
            runs += [tuple(int(n) for n in r.split(":")) for r in a.combine_extra]
            bad = [(T, P) for T, P in runs if (T // P) % a.lact_chunk == 0]
            if bad:
                raise SystemExit(f"--ops {op}: T / P must not be a multiple of --lact-chunk = {a.lact_chunk} "
                                 f"(aligned slices: {bad}); e.g. --T 12288 --P 1 8 --combine-T 12288")
    flop_rec = None
    if a.delta_flops and "delta_rule" in a.ops:
        flop_rec = delta_flop_counts((a.combine_T or 65536) // 8, H, D, C)
        print("delta_rule FLOPs per device on L = {L}: local op {local:.3e}; folded form's extra {extra:.3e} "
              "(widening {widening:.3e}, correction {correction:.3e}, dcl {dcl:.3e}) = {s:.1f} % of its step; "
              "the recurrence of Phi alone {phi_only:.3e} = {p:.1f} %".format(
                  **flop_rec, s=100 * flop_rec["extra_share_of_full"], p=100 * flop_rec["phi_only_share_of_full"]),
              flush=True)
    for op in a.ops:
        for T in a.T:
            base = None
            for P in a.P:
                mesh = mesh_of(P)
                grad = jax.jit(jax.grad(loss_fn(op, P, C, mesh, H, D)))
                t0 = time.perf_counter()
                compiled = grad.lower(specs_for(op, T, H, D, P, mesh)).compile()
                rec = {"op": op, "T": T, "P": P, "compile_s": time.perf_counter() - t0, "memory": memory(compiled)}
                if op in LAYERS and P > 1 and not op.endswith("_pipelined"):  # the form the call takes
                    from flax import nnx
                    from tttla_jax.parallel.combine import combine_reason
                    rec["combine_reason"] = combine_reason(
                        nnx.merge(*lact_layer(H, D)), T // P, cu_seqlens=doc_offsets(T) if "packed" in op else None)
                peak = rec["memory"]["peak_bytes"] if rec["memory"] else None
                if P == 1:
                    base = peak
                if base and peak:
                    rec["ideal_bytes"] = base / P
                    rec["vs_ideal"] = peak / (base / P)
                if P > 1 and peak:
                    lm = memory(jax.jit(jax.grad(local_loss_fn(op, C, mesh, H, D))).lower(
                        specs_for(op, T, H, D, P, mesh)).compile())
                    rec["local_memory"] = lm
                    rec["vs_local"] = peak / lm["peak_bytes"]
                if T <= a.time_max_T:
                    x = inputs_for(op, T, H, D, P, mesh)
                    rec["time"] = timeit(compiled, x, repeats=a.repeats)
                    del x
                rows.append(rec)
                t = rec.get("time", {}).get("median")
                print(f"{op:17s} T={T:7d} P={P}  peak/device {peak / 2**20 if peak else float('nan'):9.1f} MiB"
                      f"  x ideal {rec.get('vs_ideal', float('nan')):5.2f}"
                      f"  x local {rec.get('vs_local', float('nan')):5.2f}"
                      + (f"  fwd+bwd {t * 1e3:9.1f} ms" if t else ""), flush=True)
        runs = ([(a.combine_T, 8)] if a.combine_T and 8 in a.P else []) + [
            tuple(int(n) for n in r.split(":")) for r in a.combine_extra]
        for T, P in runs:
            mesh = mesh_of(P)
            x = inputs_for(op, T, H, D, P, mesh)
            fns = {"full": jax.jit(jax.grad(loss_fn(op, P, C, mesh, H, D))),
                   "local": jax.jit(jax.grad(local_loss_fn(op, C, mesh, H, D)))}
            if a.la_transform and op == "linear_attention":  # traced (and compiled) with the flag off
                from tttla_jax.parallel import ops as cp_ops
                cp_ops._LA_STATES_FIRST = False
                try:
                    fns["full_transform"] = jax.jit(jax.grad(loss_fn(op, P, C, mesh, H, D))).lower(x).compile()
                finally:
                    cp_ops._LA_STATES_FIRST = True
            if op in ("lact_v2_packed", "lact_v2_unaligned"):  # the pipelined form in the same interleaved rounds
                fns["full_pipelined"] = jax.jit(jax.grad(loss_fn(op + "_pipelined", P, C, mesh, H, D)))
            if a.delta_breakdown and op == "delta_rule":
                fns.update(delta_breakdown_fns(x, P, C, mesh, H, D))
            cpu = {k: [] for k in fns}  # CPU time of the process per call (all 8 devices' work; the first call dropped)
            r = interleaved({k: cpu_timed(f, cpu[k]) for k, f in fns.items()}, x, rounds=a.rounds)
            full, floor = r["full"]["median"], r["local"]["median"]
            rec = {"op": op, "T": T, "P": P, "times": {k: v["median"] for k, v in r.items()},
                   "best": {k: v["best"] for k, v in r.items()},
                   "cpu_times": {k: float(np.median(v[1:])) for k, v in cpu.items()},
                   "combine_share": (full - floor) / full, "loadavg": list(os.getloadavg())}
            if "full_state_passes" in r:
                ft = r["full_state_passes"]["median"]
                rec["combine_share_state_passes"] = (ft - floor) / ft
            if "full_transform" in r:
                ft = r["full_transform"]["median"]
                rec["combine_share_transform"] = (ft - floor) / ft
            combine.append(rec)
            print(f"{op:17s} T={T} P={P} combine: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in rec["times"].items())
                  + f"; combine {100 * rec['combine_share']:.1f} % of the step"
                  + (f" (separate transform: {100 * rec['combine_share_transform']:.1f} %)"
                     if "combine_share_transform" in rec else "")
                  + (f" (state-only passes: {100 * rec['combine_share_state_passes']:.1f} %)"
                     if "combine_share_state_passes" in rec else "")
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
            del x
    m = machine(start)
    print()
    print(f"Context parallelism, fwd+bwd, B=1 H={H} K=V={D} chunk {C} float32; {describe(m)}")
    print("P host devices share the machine's cores: times are total work, not P-accelerator times.")
    print()
    print("| op | T | P | peak MiB/device | × ideal (1/P) | × local op alone | fwd+bwd ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pk = r["memory"]["peak_bytes"] / 2**20 if r["memory"] else float("nan")
        t = r.get("time", {}).get("median")
        print(f"| {r['op']} | {r['T']} | {r['P']} | {pk:.1f} | {r.get('vs_ideal', float('nan')):.2f} | "
              f"{r.get('vs_local', float('nan')):.2f} | "
              f"{'' if t is None else f'{t * 1e3:.1f}'} |")
    for c in combine:
        print(f"\n{c['op']} T={c['T']} P={c['P']}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in c["times"].items())
              + f" — combine {100 * c['combine_share']:.1f} % of the step")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    cfg = {"H": H, "D": D, "chunk": C, "lact_chunk": a.lact_chunk, "doc_len": a.doc_len, "dtype": "float32", "B": 1,
           "time_max_T": a.time_max_T, "repeats": a.repeats, "ops": a.ops}
    old = {}
    if os.path.exists(a.out):  # keep the rows of the ops not run now (with their own run's record)
        with open(a.out) as f:
            old = json.load(f)
    keep = lambda key: [r for r in old.get(key, []) if r["op"] not in a.ops]  # noqa: E731
    out = dict(old) if old else {"config": cfg, "machine": m}
    if a.cotangent == "data":
        out["rows_data_cotangent"] = keep("rows_data_cotangent") + rows
        out["combine_data_cotangent"] = keep("combine_data_cotangent") + combine
        out.setdefault("rows", [])
        out.setdefault("combine", [])
    else:
        out["rows"], out["combine"] = keep("rows") + rows, keep("combine") + combine
    if flop_rec is not None:
        out["delta_flops"] = flop_rec
    out.setdefault("runs_by_ops", [])
    out["runs_by_ops"] = [r for r in out["runs_by_ops"] if r["ops"] != a.ops] + [{"ops": a.ops, "config": cfg, "machine": m}]
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
