"""Benchmark: side by side against the peers' own code, on this CPU.

Three comparisons, each optional (the peers' code is never part of this repository: pass
the path of a checkout):

* ``--lact PATH``: the official LaCT op ``block_causal_lact_swiglu`` (PyTorch,
  ``lact_llm/lact_model/ttt_operation.py`` of the LaCT release) against
  ``tt.rules.lact_swiglu(..., impl="recurrent")``: SwiGLU fast weights, post weight norm,
  chunk ``--lact-chunk``, without Muon, with Muon's Newton–Schulz in float32 (the official
  op with its ``G.bfloat16()`` cast replaced by ``G.float()``, nothing else changed) and
  with the official bfloat16 Newton–Schulz against ``muon_dtype="bfloat16"``.
* ``--ttt PATH``: the official TTT layers in JAX (``ttt/models/ttt_layer.py`` of
  ttt-lm-jax: ``TTTLinear`` / ``TTTMLP`` with their causal convolutions and gate) against
  ``tt.nn.TTTLinear`` / ``tt.nn.TTTMLP`` (``share_qk=True, use_gate=True``, ``impl``
  dual and primal) holding the same weights. Runs in this interpreter (flax.linen); the
  peer's infrastructure module (sharding helpers, logging) is replaced by a two-line stub
  and ``jnp.clip(a_min=...)`` (jax 0.4 spelling) is bridged to current JAX.
* ``--fla PATH``: flash-linear-attention's PyTorch chunked reference code
  (``fla/ops/linear_attn/naive.py::naive_chunk_linear_attn``,
  ``fla/ops/gated_delta_rule/naive.py::naive_chunk_gated_delta_rule``; its Triton kernels
  need a GPU) against ``tt.linear_attention`` / ``tt.delta_rule`` with ``impl="chunked"``.

PyTorch peers run in a worker process of their own interpreter (``--torch-python``, a
separate virtual environment with ``torch`` and ``einops``) with ``--torch-threads``
threads (the JAX side uses XLA:CPU's default, all cores). Both sides get the same inputs
(written to an ``.npz``); before any timing the outputs — and for forward+backward the
gradients w.r.t. every input — are compared and the relative error
``max|ours − peer| / max|peer|`` printed and stored. Timing interleaves the two sides
(``--rounds`` rounds; in each round ours runs once, then the peer once), each side timing
its own call in its own process; the table reports medians and the ratio
``ours throughput / peer throughput`` (> 1: we are faster) with the range of the per-round
ratios. The load average (``uptime``) is recorded with every row: on a shared machine the
numbers are only as good as the load they were measured under.

    python benchmarks/peers.py [--lact PATH] [--ttt PATH] [--fla PATH [--fla-ops la gdn]]
                               [--torch-python /tmp/torchenv/bin/python] [--rounds 7]
                               [--out benchmarks/results/peers.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import describe, machine, setup  # noqa: E402

import tttla_jax as tt  # noqa: E402

# --------------------------------------------------------------------------- torch worker
# Runs in the peer's interpreter. Protocol on stdin/stdout, one line each:
#   "check OUT.npz" -> computes the output (and gradients) and saves them; prints "ok"
#   "fwd" / "fwdbwd" -> one timed call; prints the seconds
#   "quit"
_WORKER = r'''
import importlib.util, json, os, sys, time
import numpy as np
import torch

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])


def load(path, name, patch=None):
    src = open(path).read()
    if patch:
        for a, b in patch:
            if a not in src:
                raise SystemExit(f"patch target {a!r} not in {path}")
            src = src.replace(a, b)
    mod = type(sys)(name)
    mod.__file__ = path
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


data = dict(np.load(spec["inputs"]))
T = {k: torch.from_numpy(v) for k, v in data.items()}
kind = spec["kind"]
if kind == "lact":
    patch = [("X = G.bfloat16()", "X = G.float()")] if spec["ns_dtype"] == "float32" else None
    mod = load(spec["file"], "peer_lact", patch)
    names = ["w0", "w1", "w2", "q", "k", "v", "lr0", "lr1", "lr2"]
    def f(w0, w1, w2, q, k, v, lr0, lr1, lr2):
        return mod.block_causal_lact_swiglu(w0, w1, w2, q, k, v, lr0, lr1, lr2,
                                            chunk_size=spec["chunk"], use_muon=spec["muon"])
elif kind == "fla_la":
    mod = load(spec["file"], "peer_fla_la")
    names = ["q", "k", "v"]
    def f(q, k, v):
        return mod.naive_chunk_linear_attn(q, k, v, scale=spec["scale"])
elif kind == "fla_gdn":
    mod = load(spec["file"], "peer_fla_gdn")
    names = ["q", "k", "v", "g", "beta"]
    def f(q, k, v, g, beta):
        return mod.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=spec["chunk"],
                                                scale=spec["scale"])[0]
else:
    raise SystemExit(f"unknown kind {kind}")
args = [T[n] for n in names]


def fwd():
    with torch.no_grad():
        return f(*args)


def fwdbwd():
    xs = [a.detach().clone().requires_grad_(True) for a in args]
    o = f(*xs)
    loss = (o.float() ** 2).sum()
    return o, torch.autograd.grad(loss, xs)


print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
        break
    if cmd[0] == "check":
        o = fwd()
        o2, gs = fwdbwd()
        out = {"o": o.float().numpy()}
        out.update({"d_" + n: g.float().numpy() for n, g in zip(names, gs)})
        np.savez(cmd[1], **out)
        print("ok", flush=True)
    else:
        fn = fwd if cmd[0] == "fwd" else fwdbwd
        t0 = time.perf_counter()
        fn()
        print(time.perf_counter() - t0, flush=True)
'''


class TorchPeer:
    """A peer op living in a worker process of the torch interpreter."""

    def __init__(self, python, spec, inputs, threads, workdir):
        path = os.path.join(workdir, f"in_{spec['kind']}_{os.getpid()}_{time.time_ns()}.npz")
        np.savez(path, **inputs)
        spec = dict(spec, inputs=path, threads=threads)
        script = os.path.join(workdir, "peer_worker.py")
        with open(script, "w") as fh:
            fh.write(_WORKER)
        self.workdir = workdir
        env = dict(os.environ)
        if not spec.get("compile", False):
            env["TORCHDYNAMO_DISABLE"] = "1"  # the peers' @torch.compile decorators become no-ops: eager PyTorch
        # On a shared CPU, OpenMP threads that spin while waiting lose their time slices and a
        # PyTorch call becomes 5-20x slower than on a quiet machine; passive waiting keeps it fair.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.p = subprocess.Popen([python, script, json.dumps(spec)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        line = self.p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"peer worker failed to start (got {line!r}); see its stderr above")

    def ask(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"peer worker died on {cmd!r}")
        return line

    def check(self):
        path = os.path.join(self.workdir, f"out_{os.getpid()}_{time.time_ns()}.npz")
        self.ask(f"check {path}")
        return dict(np.load(path))

    def call(self, what):
        """A callable for :func:`interleave`: runs once in the worker, returns its seconds."""
        return lambda: float(self.ask(what))

    def close(self):
        try:
            self.ask("quit")
        except Exception:
            pass
        self.p.wait(timeout=30)


def jax_timed(fn, *args):
    def run():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0
    return run


def interleave(ours, peer, rounds):
    """One warm-up call each, then ``rounds`` rounds of (ours, peer); seconds per call."""
    ours(), peer()
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(peer())
    ratios = [y / x for x, y in zip(a, b)]
    return dict(ours_s=statistics.median(a), peer_s=statistics.median(b),
                ours_samples=a, peer_samples=b,
                ratio=statistics.median(b) / statistics.median(a),
                ratio_min=min(ratios), ratio_max=max(ratios))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def load():
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- LaCT


def bench_lact(a, rows, workdir):
    path = os.path.join(a.lact, "lact_llm", "lact_model", "ttt_operation.py")
    if not os.path.exists(path):
        path = a.lact if a.lact.endswith(".py") else path
    B, H, T, D, C = 1, a.lact_heads, a.lact_T, a.lact_dim, a.lact_chunk
    rng = np.random.default_rng(0)
    f32 = np.float32
    k = rng.normal(size=(B, T, H, D)).astype(f32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = rng.normal(size=(B, T, H, D)).astype(f32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, D)).astype(f32)
    lrs = [(0.01 * (1 + rng.uniform(size=(B, T, H)))).astype(f32) for _ in range(3)]
    w0 = (rng.normal(size=(H, D, D)) / np.sqrt(D)).astype(f32)
    w1 = (rng.normal(size=(H, D, D)) / np.sqrt(D)).astype(f32)
    w2 = (rng.normal(size=(H, D, D)) / np.sqrt(D)).astype(f32)
    bh = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(B * H, x.shape[1], -1))  # noqa: E731
    bhw = lambda w: np.ascontiguousarray(np.broadcast_to(w[None], (B,) + w.shape).reshape(B * H, D, D))  # noqa: E731
    inputs = dict(w0=bhw(w0), w1=bhw(w1), w2=bhw(w2), q=bh(q), k=bh(k), v=bh(v),
                  lr0=bh(lrs[0][..., None]), lr1=bh(lrs[1][..., None]), lr2=bh(lrs[2][..., None]))
    J = {n: jnp.asarray(x) for n, x in dict(q=q, k=k, v=v, w0=w0, w1=w1, w2=w2).items()}
    J_lr = tuple(jnp.asarray(x) for x in lrs)
    cases = [("no Muon", False, None, "none"), ("Muon NS float32", True, "float32", "float32"),
             ("Muon NS bfloat16", True, "bfloat16", "bfloat16")]
    for label, muon, ns, key in cases:
        if key not in a.lact_cases:
            continue
        spec = dict(kind="lact", file=path, chunk=C, muon=muon, ns_dtype=ns or "float32", compile=a.torch_compile)
        peer = TorchPeer(a.torch_python, spec, inputs, a.torch_threads, workdir)
        md = "bfloat16" if ns == "bfloat16" else None

        def fwd(q, k, v, lr, w0, w1, w2, muon=muon, md=md):
            return tt.rules.lact_swiglu(q, k, v, lr, w0=w0, w1=w1, w2=w2, chunk_size=C, muon=muon,
                                        muon_dtype=md, impl="recurrent")[0]

        def loss(q, k, v, lr, w0, w1, w2):
            return jnp.sum(fwd(q, k, v, lr, w0, w1, w2) ** 2)

        argv = (J["q"], J["k"], J["v"], J_lr, J["w0"], J["w1"], J["w2"])
        f = jax.jit(fwd)
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6)))

        def errors(peer, n_tok):
            """Relative errors of our outputs and gradients vs the peer's, first n_tok tokens."""
            ref = peer.check()
            cut = lambda x: x[:, :n_tok]  # noqa: E731
            av = (cut(J["q"]), cut(J["k"]), cut(J["v"]), tuple(cut(x) for x in J_lr), J["w0"], J["w1"], J["w2"])
            bhn = lambda x: bh(np.asarray(x))  # noqa: E731
            err = {"o": rel_err(bhn(f(*av)), ref["o"])}
            gq, gk, gv, glr, g0, g1, g2 = g(*av)
            for n, x in (("q", gq), ("k", gk), ("v", gv)):
                err["d_" + n] = rel_err(bhn(x), ref["d_" + n])
            for i, x in enumerate(glr):
                err[f"d_lr{i}"] = rel_err(bhn(np.asarray(x)[..., None]), ref[f"d_lr{i}"])
            for n, x in (("w0", g0), ("w1", g1), ("w2", g2)):
                err["d_" + n] = rel_err(np.asarray(x), ref["d_" + n])
            return err

        # Muon's NS5 multiplies the smallest singular directions of each update by ~500
        # (the product of its five linear coefficients), so rounding differences of two
        # correct implementations grow chunk after chunk: agreement is checked on the first
        # four chunks (three updates), and reported for the whole sequence as well.
        n_chk = min(T, 4 * C)
        short = {n: x[:, :n_chk] if n in ("q", "k", "v", "lr0", "lr1", "lr2") else x for n, x in inputs.items()}
        chk = TorchPeer(a.torch_python, spec, short, a.torch_threads, workdir)
        err = errors(chk, n_chk)
        chk.close()
        err_full = errors(peer, T) if n_chk < T else err
        print(f"LaCT {label}: relative error vs official, first {n_chk} tokens  "
              + "  ".join(f"{n} {e:.1e}" for n, e in err.items())
              + f"\n    whole sequence: o {err_full['o']:.1e}, gradients up to {max(err_full.values()):.1e}",
              flush=True)
        for what, fn in (("fwd", f), ("fwd+bwd", g)):
            l0 = load()
            r = interleave(jax_timed(fn, *argv), peer.call("fwd" if what == "fwd" else "fwdbwd"), a.rounds)
            row = dict(peer="LaCT official op (PyTorch" + (", torch.compile)" if a.torch_compile else ", eager)"), op=f"lact_swiglu recurrent, {label}", pass_=what,
                       shape=f"B·H={B * H}, T={T}, d={D}, chunk {C}", tokens=B * T,
                       rel_err=err["o"] if what == "fwd" else max(err.values()), rel_err_all=err,
                       rel_err_checked_tokens=n_chk, rel_err_whole_sequence=err_full,
                       load_start=l0, load_end=load(), **r)
            rows.append(row)
            _print_row(row)
        peer.close()


# --------------------------------------------------------------------------- TTT (ttt-lm-jax)


def _import_ttt_lm_jax(path):
    """Import ``ttt.models.ttt_layer`` from a ttt-lm-jax checkout with its infra module
    (sharding constraint, remat policy names; it also imports torch, wandb, transformers)
    replaced by a stub: on one CPU device the sharding constraint is the identity."""
    import types
    sys.path.insert(0, path)
    ju = types.ModuleType("ttt.infra.jax_utils")
    ju.with_sharding_constraint = lambda x, spec: x
    ju.get_gradient_checkpoint_policy = lambda name: {
        "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
        "everything_saveable": jax.checkpoint_policies.everything_saveable}[name]
    sys.modules.setdefault("ttt", types.ModuleType("ttt")).__path__ = [os.path.join(path, "ttt")]
    sys.modules.setdefault("ttt.infra", types.ModuleType("ttt.infra")).__path__ = [os.path.join(path, "ttt", "infra")]
    sys.modules["ttt.infra.jax_utils"] = ju
    import importlib
    mod = importlib.import_module("ttt.models.ttt_layer")
    # written for jax 0.4.14: jnp.clip's a_min/a_max keywords are min/max in current JAX
    compat = types.ModuleType("jnp_compat")
    compat.__dict__.update(jnp.__dict__)
    compat.clip = lambda x, a_min=None, a_max=None: jnp.clip(x, a_min, a_max)
    mod.jnp = compat
    return mod


def _ttt_reference_arrays(p, mlp):
    """ttt-lm-jax parameters → the PyTorch reference names :func:`tt.nn.load_reference_weights` reads."""
    P = lambda x: np.asarray(x)  # noqa: E731
    out = {"q_proj.weight": P(p["wq"]["kernel"]).T, "v_proj.weight": P(p["wv"]["kernel"]).T,
           "o_proj.weight": P(p["wo"]["kernel"]).T, "g_proj.weight": P(p["wg"]["kernel"]).T,
           "conv_q.weight": P(p["conv_q"]["kernel"]).transpose(2, 1, 0), "conv_q.bias": P(p["conv_q"]["bias"]),
           "conv_k.weight": P(p["conv_k"]["kernel"]).transpose(2, 1, 0), "conv_k.bias": P(p["conv_k"]["bias"]),
           "learnable_token_idx": P(p["learnable_token_idx"]),
           "post_norm.weight": P(p["post_norm"]["scale"]), "post_norm.bias": P(p["post_norm"]["bias"])}
    flat = {"/".join(k): v for k, v in _flatten(p).items()}
    lr_w = [v for k, v in flat.items() if k.startswith("learnable_ttt_lr") and k.endswith("kernel")]
    lr_b = [v for k, v in flat.items() if k.startswith("learnable_ttt_lr") and k.endswith("bias")]
    ln_s = [v for k, v in flat.items() if "ttt_norm" in k and k.endswith("scale")]
    ln_b = [v for k, v in flat.items() if "ttt_norm" in k and k.endswith("bias")]
    out["learnable_ttt_lr_weight"] = P(lr_w[0]).transpose(0, 2, 1)  # [H, W, 1] -> [H, 1, W]
    out["learnable_ttt_lr_bias"] = P(lr_b[0])  # [H, 1]
    out["ttt_norm_weight"], out["ttt_norm_bias"] = P(ln_s[0]), P(ln_b[0])
    out["W1"], out["b1"] = P(p["ttt_dense_0"]), P(p["ttt_bias_0"])
    if mlp:
        out["W2"], out["b2"] = P(p["ttt_dense_1"]), P(p["ttt_bias_1"])
    return out


def _flatten(d, prefix=()):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def bench_ttt(a, rows):
    import types
    from flax import nnx
    mod = _import_ttt_lm_jax(a.ttt)
    W, H, C, T, B = a.ttt_width, a.ttt_heads, 16, a.ttt_T, a.ttt_batch
    cfg = types.SimpleNamespace(hidden_size=W, num_attention_heads=H, mini_batch_size=C, max_sequence_length=T,
                                rope_theta=10000.0, ttt_base_lr=1.0, initializer_range=0.02,
                                remat_mini_batch_group_size=a.ttt_remat_group, conv_width=4, remat_conv="",
                                output_ttt_stats=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, W), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    for name, peer_cls, our_cls in (("TTT-Linear", mod.TTTLinear, tt.nn.TTTLinear),
                                    ("TTT-MLP", mod.TTTMLP, tt.nn.TTTMLP)):
        peer = peer_cls(config=cfg)
        params = peer.init(jax.random.PRNGKey(0), x, position_ids=pos)["params"]
        # perturb the zero-initialised parameters so every path is exercised
        params = jax.tree_util.tree_map_with_path(
            lambda path, p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(hash(str(path)) % 2**31), p.shape, p.dtype),
            params)
        arrays = _ttt_reference_arrays(params, name == "TTT-MLP")

        def peer_fwd(params, x):
            return peer.apply({"params": params}, x, position_ids=pos)[0]

        def peer_loss(params, x):
            return jnp.sum(peer_fwd(params, x) ** 2)

        pf = jax.jit(peer_fwd)
        pg = jax.jit(jax.grad(peer_loss, argnums=(0, 1)))
        ref_o = np.asarray(pf(params, x))
        ref_dx = np.asarray(pg(params, x)[1])
        for impl in a.ttt_impls:
            layer = our_cls(width=W, num_heads=H, mini_batch_size=C, share_qk=True, use_gate=True, impl=impl,
                            rngs=nnx.Rngs(0))
            tt.nn.load_reference_weights(layer, arrays)
            gdef, state = nnx.split(layer)

            def our_fwd(state, x, gdef=gdef):
                return nnx.merge(gdef, state)(x)[0]

            def our_loss(state, x):
                return jnp.sum(our_fwd(state, x) ** 2)

            of = jax.jit(our_fwd)
            og = jax.jit(jax.grad(our_loss, argnums=(0, 1)))
            err = {"o": rel_err(of(state, x), ref_o), "d_x": rel_err(og(state, x)[1], ref_dx)}
            print(f"{name} {impl}: relative error vs ttt-lm-jax  o {err['o']:.1e}  d_x {err['d_x']:.1e}", flush=True)
            for what, fo, fp, ao, ap in (("fwd", of, pf, (state, x), (params, x)),
                                         ("fwd+bwd", og, pg, (state, x), (params, x))):
                l0 = load()
                r = interleave(jax_timed(fo, *ao), jax_timed(fp, *ap), a.rounds)
                row = dict(peer="ttt-lm-jax layer (JAX)", op=f"tt.nn.{our_cls.__name__} {impl}", pass_=what,
                           shape=f"B={B}, T={T}, width {W}, {H} heads, mini-batch {C}", tokens=B * T,
                           rel_err=err["o"] if what == "fwd" else max(err.values()), rel_err_all=err,
                           load_start=l0, load_end=load(), **r)
                rows.append(row)
                _print_row(row)


# --------------------------------------------------------------------------- fla


def bench_fla(a, rows, workdir):
    B, T, H, D, C = a.fla_B, a.fla_T, a.fla_H, a.fla_D, 64
    rng = np.random.default_rng(2)
    f32 = np.float32
    q = rng.normal(size=(B, T, H, D)).astype(f32)
    k = rng.normal(size=(B, T, H, D)).astype(f32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, D)).astype(f32)
    g = (-rng.uniform(0.0, 0.1, size=(B, T, H))).astype(f32)
    beta = rng.uniform(0.2, 0.9, size=(B, T, H)).astype(f32)
    scale = D ** -0.5
    J = {n: jnp.asarray(x) for n, x in dict(q=q, k=k, v=v, g=g, beta=beta).items()}
    ops = (("linear attention", "fla_la", os.path.join(a.fla, "fla", "ops", "linear_attn", "naive.py"),
            ("q", "k", "v"),
            lambda q, k, v: tt.linear_attention(q, k, v, scale=scale, impl="chunked", chunk_size=C)[0]),
           ("gated delta rule", "fla_gdn", os.path.join(a.fla, "fla", "ops", "gated_delta_rule", "naive.py"),
            ("q", "k", "v", "g", "beta"),
            lambda q, k, v, g, beta: tt.delta_rule(q, k, v, beta, log_decay=g, scale=scale, impl="chunked",
                                                   chunk_size=C)[0]))
    for label, kind, path, names, fn in ops:
        if {"fla_la": "la", "fla_gdn": "gdn"}[kind] not in a.fla_ops:
            continue
        peer = TorchPeer(a.torch_python, dict(kind=kind, file=path, chunk=C, scale=scale),
                         {n: dict(q=q, k=k, v=v, g=g, beta=beta)[n] for n in names}, a.torch_threads, workdir)
        argv = tuple(J[n] for n in names)
        f = jax.jit(fn)
        gr = jax.jit(jax.grad(lambda *xs: jnp.sum(fn(*xs) ** 2), argnums=tuple(range(len(names)))))
        ref = peer.check()
        err = {"o": rel_err(f(*argv), ref["o"])}
        err.update({"d_" + n: rel_err(x, ref["d_" + n]) for n, x in zip(names, gr(*argv))})
        print(f"fla {label}: relative error vs fla chunked reference  "
              + "  ".join(f"{n} {e:.1e}" for n, e in err.items()), flush=True)
        for what, fo in (("fwd", f), ("fwd+bwd", gr)):
            l0 = load()
            r = interleave(jax_timed(fo, *argv), peer.call("fwd" if what == "fwd" else "fwdbwd"), a.rounds)
            row = dict(peer="fla PyTorch chunked reference", op=f"{label}, impl='chunked'", pass_=what,
                       shape=f"B={B}, T={T}, H={H}, d={D}, chunk {C}", tokens=B * T,
                       rel_err=err["o"] if what == "fwd" else max(err.values()), rel_err_all=err,
                       load_start=l0, load_end=load(), **r)
            rows.append(row)
            _print_row(row)
        peer.close()


# --------------------------------------------------------------------------- table


def _print_row(r):
    print(f"  {r['op']:44s} {r['pass_']:8s} ours {r['ours_s'] * 1e3:9.1f} ms  peer {r['peer_s'] * 1e3:9.1f} ms  "
          f"ratio {r['ratio']:5.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})  "
          f"load {r['load_start']:.1f}→{r['load_end']:.1f}", flush=True)


def table(rows):
    lines = ["| peer | ours | shape | pass | ours ms | peer ms | ours/peer throughput (range) | rel. err | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['peer']} | {r['op']} | {r['shape']} | {r['pass_']} | {r['ours_s'] * 1e3:,.1f} | "
                     f"{r['peer_s'] * 1e3:,.1f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | "
                     f"{r['rel_err']:.0e} | {r['load_start']:.1f}→{r['load_end']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lact", help="checkout of the LaCT release (or its ttt_operation.py)")
    p.add_argument("--ttt", help="checkout of ttt-lm-jax")
    p.add_argument("--fla", help="checkout of flash-linear-attention")
    p.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", "/tmp/torchenv/bin/python"),
                   help="interpreter with torch and einops for the PyTorch peers")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--torch-compile", action="store_true",
                   help="keep the LaCT op's @torch.compile (inductor; compiles for minutes on a loaded CPU); "
                        "default: eager PyTorch (TORCHDYNAMO_DISABLE=1)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--lact-T", type=int, default=8192)
    p.add_argument("--lact-heads", type=int, default=4)
    p.add_argument("--lact-dim", type=int, default=128)
    p.add_argument("--lact-chunk", type=int, default=512)
    p.add_argument("--lact-cases", nargs="+", default=["none", "float32", "bfloat16"],
                   choices=["none", "float32", "bfloat16"], help="Muon cases: none, NS in float32, NS in bfloat16")
    p.add_argument("--ttt-width", type=int, default=768)
    p.add_argument("--ttt-heads", type=int, default=12)
    p.add_argument("--ttt-T", type=int, default=2048)
    p.add_argument("--ttt-batch", type=int, default=1)
    p.add_argument("--ttt-remat-group", type=int, default=4,
                   help="ttt-lm-jax's remat_mini_batch_group_size (its configs use 4)")
    p.add_argument("--ttt-impls", nargs="+", default=["dual", "primal"])
    p.add_argument("--fla-B", type=int, default=4)
    p.add_argument("--fla-T", type=int, default=2048)
    p.add_argument("--fla-H", type=int, default=4)
    p.add_argument("--fla-D", type=int, default=64)
    p.add_argument("--fla-ops", nargs="+", default=["la", "gdn"], choices=["la", "gdn"],
                   help="which fla ops to compare: la (linear attention), gdn (gated delta rule)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "peers.json"))
    p.add_argument("--no-tune-malloc", action="store_true")
    a = p.parse_args(argv)
    if not (a.lact or a.ttt or a.fla):
        p.error("nothing to compare: pass at least one of --lact, --ttt, --fla")
    start = setup(tune=not a.no_tune_malloc)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        if a.fla:
            bench_fla(a, rows, workdir)
        if a.lact:
            bench_lact(a, rows, workdir)
        if a.ttt:
            bench_ttt(a, rows)
    m = machine(start)
    print()
    print(table(rows))
    print(describe(m))
    old = {}
    if os.path.exists(a.out):  # keep the rows of peers not run this time
        with open(a.out) as fh:
            old = json.load(fh)
    run = {r["peer"] for r in rows}
    keep = [r for r in old.get("rows", []) if r["peer"] not in run]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(dict(config=dict(rounds=a.rounds, torch_threads=a.torch_threads,
                                   statistic="median of interleaved rounds (ours, peer) after one warm-up call each; "
                                             "ratio = peer time / our time"),
                       machine=m, rows=keep + [dict(r, machine=m) for r in rows]), fh, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
