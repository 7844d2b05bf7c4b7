"""Packed variable-length sequences: what ``cu_seqlens`` costs and what it saves.

T tokens in N sequences of random lengths (seeded; log-normal around T / N), B=1, H=4,
K=V=64, float32, causal with log-decay, chunk 64. Three ways to run them through
``tt.linear_attention`` and ``tt.delta_rule`` (gated; L2-normalised keys, β in (0, 1)), both
``impl="chunked"``, forward and forward+backward (gradient of a sum of the outputs and
final states w.r.t. q, k, v, log-decay and the initial states):

* ``packed``: one call with ``cu_seqlens`` (re-chunked: ``T // C + N`` chunk slots);
* ``padded batch``: the N sequences zero-padded to the longest one, as a batch of N —
  what one does without ``cu_seqlens``;
* ``one stream``: the T tokens as one sequence, ignoring the boundaries (wrong answer: the
  speed floor of the packed call).

Times are medians of interleaved rounds (``_timing.interleaved``). Prints a Markdown table
and writes ``benchmarks/results/varlen.json``.

    python benchmarks/varlen.py [--T 8192] [--N 1 8 64] [--ops linear_attention delta_rule] [--rounds 7]
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

import tttla_jax as tt  # noqa: E402


def lengths(T, N, rng):
    """N positive lengths summing to T (log-normal shares)."""
    w = rng.lognormal(0.0, 0.75, size=N)
    L = np.maximum(1, np.floor(w / w.sum() * T)).astype(int)
    L[np.argmax(L)] += T - L.sum()
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--N", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ops", nargs="+", default=["linear_attention", "delta_rule"],
                    choices=["linear_attention", "delta_rule"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "varlen.json"))
    ap.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    a = ap.parse_args()
    start = setup(tune=not a.no_tune_malloc)
    T, H, D, C = a.T, a.H, a.D, a.chunk
    rng = np.random.default_rng(0)
    f32 = jnp.float32
    q, k = (jnp.asarray(rng.normal(size=(1, T, H, D)) / np.sqrt(D), f32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(1, T, H, D)), f32)
    g = jnp.asarray(-rng.uniform(0.0, 0.1, size=(1, T, H)), f32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, size=(1, T, H)), f32)
    kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    rows = []
    print("| op | N | longest | form | fwd ms | fwd+bwd ms | tokens computed |")
    print("|---|---|---|---|---|---|---|")
    for op_name, N in [(o, n) for o in a.ops for n in a.N]:
        if op_name == "linear_attention":
            def op(q, k, v, g, **kw):
                return tt.linear_attention(q, k, v, log_decay=g, **kw)
        else:
            def op(q, k, v, g, **kw):
                return tt.delta_rule(q, k, v, beta_of(k), log_decay=g, **kw)
        # β is a fixed input, laid out like the keys it goes with (padded for the padded batch)
        beta_of = (lambda k: beta if k.shape[0] == 1 else pad(beta, idx, msk))  # noqa: E731
        kk = k if op_name == "linear_attention" else kn
        r = np.random.default_rng(1000 + N)  # the same packing for every op
        L = lengths(T, N, r)
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(L)]), jnp.int32)
        h0 = jnp.asarray(r.normal(size=(N, H, D, D)) * 0.1, f32)
        Lmax = int(L.max())
        idx = np.zeros((N, Lmax), int)
        msk = np.zeros((N, Lmax), bool)
        for n in range(N):
            idx[n, :L[n]] = np.arange(int(cu[n]), int(cu[n + 1]))
            msk[n, :L[n]] = True
        n_t = np.repeat(np.arange(N), L)                        # the padded position of every token
        pos_t = np.arange(T) - np.repeat(np.asarray(cu[:-1]), L)
        idx, msk, back = jnp.asarray(idx), jnp.asarray(msk), (jnp.asarray(n_t), jnp.asarray(pos_t))

        def pad(x, idx, msk):  # [1, T, ...] -> [N, Lmax, ...], zeros past each sequence's end
            y = jnp.take(x[0], idx, axis=0)
            return jnp.where(msk.reshape(msk.shape + (1,) * (y.ndim - 2)), y, 0)

        # the packing is an argument (traced), as in training where it comes with the batch
        def packed(q, k, v, g, h0, cu, idx, msk, back):
            return op(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=C, impl="chunked",
                      cu_seqlens=cu)

        def padded(q, k, v, g, h0, cu, idx, msk, back):
            P = lambda x: pad(x, idx, msk)  # noqa: E731
            o, S = op(P(q), P(k), P(v), P(g), initial_state=h0, output_final_state=True, chunk_size=C,
                      impl="chunked")
            return o[back[0], back[1]][None], S

        def stream(q, k, v, g, h0, cu, idx, msk, back):
            return op(q, k, v, g, initial_state=h0[:1], output_final_state=True, chunk_size=C, impl="chunked")

        def loss(f):
            return lambda *x: sum(jnp.sum(y) for y in f(*x))

        forms = {"packed": packed, "padded batch": padded, "one stream": stream}
        args = (q, kk, v, g, h0, cu, idx, msk, back)
        fwd = interleaved({n: jax.jit(f) for n, f in forms.items()}, *args, rounds=a.rounds)
        bwd = interleaved({n: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2, 3, 4))) for n, f in forms.items()},
                          *args, rounds=a.rounds)
        o_pk, S_pk = jax.jit(packed)(*args)
        o_pd, S_pd = jax.jit(padded)(*args)
        agree = float(max(jnp.max(jnp.abs(o_pk - o_pd)), jnp.max(jnp.abs(S_pk - S_pd))))
        computed = {"packed": (T // C + N) * C, "padded batch": N * Lmax, "one stream": T}
        for name in forms:
            row = dict(op=op_name, N=N, longest=Lmax, form=name, fwd_s=fwd[name]["median"], fwdbwd_s=bwd[name]["median"],
                       token_slots=computed[name], packed_vs_padded_max_abs_diff=agree)
            rows.append(row)
            print(f"| {op_name} | {N} | {Lmax} | {name} | {row['fwd_s'] * 1e3:.1f} | {row['fwdbwd_s'] * 1e3:.1f} "
                  f"| {computed[name]:,} |", flush=True)
    m = machine(start)
    print(f"\n{describe(m)}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(dict(config=dict(T=T, H=H, K=D, V=D, chunk=C, dtype="float32", rounds=a.rounds,
                                   timing="median of interleaved rounds after one compile/warm-up call"),
                       machine=m, rows=rows), fh, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
