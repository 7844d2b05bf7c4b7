"""An independent check of the attention baseline of ``python -m train.zoology``: a minimal
pure-jax 2-layer model written from Zoology's description (Arora et al. 2023), NOT using
``tttla_jax.nn``: token + learned position embeddings (std 0.02), per block
``x + attn(LN(x))`` (1 head, Wqkv and Wo with biases, init std 0.02, Wo / sqrt(2 n_layers))
then the identity state mixer ``x + LN(x)``, final LayerNorm, tied head; embedding dropout
0.1, AdamW (weight decay 0.1), cosine to 0, on the same Zoology MQAR examples (train seed 0,
test seed 10). It separates a bug in the library's model from the recipe/budget: both
follow the same accuracy curve (benchmarks/results/zoology_attention_check.md).

    python benchmarks/zoology_reference_attention.py --lr 3e-3 --steps 1500
"""
import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train.mqar import mqar_batch  # noqa: E402

CACHE = os.environ.get("ZOOLOGY_CHECK_CACHE", "/tmp")

def data(L, kv, n, seed, V=8192):
    f = os.path.join(CACHE, f"zoology_mqar_{L}_{kv}_{n}_{seed}.npz")
    if os.path.exists(f):
        d = np.load(f); return {k: d[k] for k in d}
    d = mqar_batch(seed, range(n), seq_len=L, num_kv=kv, vocab_size=V, protocol="zoology")
    np.savez(f, **d); return d

def init(key, V, L, W, nl=2, init="zoology"):
    ks = iter(jax.random.split(key, 32))
    std = lambda shape, fan: (0.02 if init == "zoology" else fan ** -0.5)
    nrm = lambda shape, s: s * jax.random.normal(next(ks), shape)
    p = {"tok": nrm((V, W), 0.02), "pos": nrm((L, W), 0.02), "lnf": (jnp.ones(W), jnp.zeros(W)), "layers": []}
    for _ in range(nl):
        p["layers"].append({"ln1": (jnp.ones(W), jnp.zeros(W)), "ln2": (jnp.ones(W), jnp.zeros(W)),
            "wqkv": nrm((W, 3 * W), std(0, W)), "bqkv": jnp.zeros(3 * W),
            "wo": nrm((W, W), std(0, W) / (math.sqrt(2 * nl) if init == "zoology" else 1)), "bo": jnp.zeros(W)})
    return p

def norm(x, sb, kind):
    s, b = sb
    if kind == "ln":
        m = x.mean(-1, keepdims=True); v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + 1e-5) * s + b
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * s

def fwd(p, tok, idx, key, nk, drop=0.1):
    B, T = tok.shape
    x = p["tok"][tok] + p["pos"][:T][None]
    if key is not None:
        keep = jax.random.bernoulli(key, 1 - drop, x.shape); x = jnp.where(keep, x / (1 - drop), 0)
    mask = jnp.tril(jnp.ones((T, T), bool))
    for l in p["layers"]:
        h = norm(x, l["ln1"], nk)
        q, k, v = jnp.split(h @ l["wqkv"] + l["bqkv"], 3, -1)
        s = jnp.einsum("btd,bsd->bts", q, k) / math.sqrt(q.shape[-1])
        s = jnp.where(mask, s, -1e30)
        o = jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, -1), v) @ l["wo"] + l["bo"]
        x = x + o
        x = x + norm(x, l["ln2"], nk)
    x = jnp.take_along_axis(x, idx[..., None], 1)
    return norm(x, p["lnf"], nk) @ p["tok"].T

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=64); ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--W", type=int, default=64); ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=1000); ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--norm", default="ln"); ap.add_argument("--init", default="zoology")
    ap.add_argument("--wd", type=float, default=0.1); ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--ntrain", type=int, default=50000); ap.add_argument("--every", type=int, default=100)
    a = ap.parse_args()
    tr = data(a.L, a.kv, a.ntrain, 0); te = data(a.L, a.kv, 1000, 10)
    qi = lambda d: np.argsort(~d["mask"], 1, kind="stable")[:, :a.kv].astype(np.int32)
    tri, tei = qi(tr), qi(te)
    trt, tet = np.take_along_axis(tr["targets"], tri, 1), np.take_along_axis(te["targets"], tei, 1)
    p = init(jax.random.key(0), 8192, a.L, a.W, init=a.init)
    sched = optax.cosine_decay_schedule(a.lr, a.steps)
    tx = optax.adamw(sched, weight_decay=a.wd); st = tx.init(p)
    def loss(p, tok, idx, tgt, key):
        lg = fwd(p, tok, idx, key, a.norm, a.drop)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tgt[..., None], -1))
    @jax.jit
    def step(p, st, tok, idx, tgt, key):
        l, g = jax.value_and_grad(loss)(p, tok, idx, tgt, key)
        u, st = tx.update(g, st, p); return optax.apply_updates(p, u), st, l
    @jax.jit
    def acc(p, tok, idx, tgt):
        return jnp.mean(jnp.argmax(fwd(p, tok, idx, None, a.norm), -1) == tgt)
    rng = np.random.default_rng(0); perm = rng.permutation(len(trt)); pos = 0; t0 = time.time()
    for s in range(1, a.steps + 1):
        if pos + a.bs > len(perm): perm, pos = rng.permutation(len(trt)), 0
        b = perm[pos:pos + a.bs]; pos += a.bs
        p, st, l = step(p, st, tr["inputs"][b], tri[b], trt[b], jax.random.key(s))
        if s % a.every == 0 or s == a.steps:
            ev = float(acc(p, te["inputs"], tei, tet))
            print(f"step {s} loss {float(l):.3f} test {ev:.3f} ({time.time()-t0:.0f}s)", flush=True)
            if ev >= 0.99: break
if __name__ == "__main__":
    main()
