"""LaCT rule (docs/rules/lact.md): the lax.scan form against the float64 chunk loop of the reference.

Tolerances (documented): float64 1e-10 absolute on O(1)-scaled inputs (outputs, final
fast weights and momentum buffers, outer gradients w.r.t. q, k, v, learning rates,
momentum and the initial fast weights); float32 inputs 1e-4 relative to the float64
result's max magnitude. The bfloat16 Newton–Schulz option is only checked for plausibility
(docs/rules/lact.md: it moves outputs by ~10 %).
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttla_jax.reference.lact import lact_loop, ns5_loop
from tttla_jax.rules.lact import (LaCTRule, LaCTState, apply_fast, inner_grads, lact_swiglu,
                                  newton_schulz5)


# --------------------------------------------------------------------------- helpers


def make(seed, *, B=1, T=11, H=2, K=4, Dh=6, V=3, per_channel=False, linear=False, dtype=jnp.float64,
         lr_scale=0.1):
    rng = np.random.default_rng(seed)
    if linear:
        Dh = K
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), dtype)
    dims = (K, Dh, K)
    if per_channel:
        lr = tuple(jnp.asarray(rng.uniform(0.1, 1.0, size=(B, T, H, d)) * lr_scale, dtype) for d in dims)
    else:
        lr = tuple(jnp.asarray(rng.uniform(0.1, 1.0, size=(B, T, H)) * lr_scale, dtype) for _ in dims)
    m = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), dtype)
    w1 = jnp.asarray(rng.normal(size=(B, H, V, Dh)) / np.sqrt(Dh), dtype)
    if linear:
        w0 = w2 = None
    else:
        w0 = jnp.asarray(rng.normal(size=(B, H, Dh, K)) / np.sqrt(K), dtype)
        w2 = jnp.asarray(rng.normal(size=(B, H, Dh, K)) / np.sqrt(K), dtype)
    return dict(q=q, k=k, v=v, lr=lr, m=m, w0=w0, w1=w1, w2=w2)


def rule_fn(rule):
    """(q, k, v, lr, m, w0, w1, w2) -> (o, (w0, w1, w2), (m0, m1, m2)) via rule.recurrent."""
    def fn(q, k, v, lr, m, w0, w1, w2):
        st = rule.init_state(w0, w1, w2, k.shape[0])
        o, S = rule.recurrent(q, k, v, lr, st, momentum=m if rule.use_momentum else None,
                              output_final_state=True)
        mom = S.mom if S.mom is not None else (None, None, None)
        return o, S.w, mom
    return fn


def ref_fn(rule):
    def fn(q, k, v, lr, m, w0, w1, w2):
        o, F = lact_loop(q, k, v, lr, w0=w0, w1=w1, w2=w2, chunk_size=rule.chunk_size,
                         momentum=m if rule.use_momentum else None, muon=rule.muon,
                         weight_norm=rule.weight_norm, update=rule.update, ascent=rule.ascent,
                         order=rule.order, q_is_k=rule.q_is_k, inner_steps=rule.inner_steps,
                         fast_net=rule.fast_net)
        upd = rule.updated
        mom = tuple(F[f"m{i}"] if (rule.use_momentum and i in upd) else None for i in range(3))
        return o, (F["w0"], F["w1"], F["w2"]), mom
    return fn


def scalar_loss(fn):
    """Sum of all outputs with fixed generic cotangents (sin/cos patterns)."""
    def loss(*args):
        leaves = [x for x in jax.tree_util.tree_leaves(fn(*args)) if x is not None]
        tot = 0.0
        for j, x in enumerate(leaves):
            w = jnp.sin(jnp.arange(x.size, dtype=jnp.float64).reshape(x.shape) * (0.7 + 0.1 * j) + j)
            tot = tot + jnp.sum(x.astype(jnp.float64) * w)
        return tot
    return loss


def assert_close_tree(a, b, atol, rtol=0.0, what=""):
    """chex: the same tree structure and leaf shapes, then ``|a − b| <= atol + rtol·|b|`` (float64)."""
    chex.assert_trees_all_equal_shapes(a, b, custom_message=what)
    f64 = lambda t: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    chex.assert_trees_all_close(f64(a), f64(b), atol=atol, rtol=rtol, custom_message=what)


ARGS = ("q", "k", "v", "lr", "m", "w0", "w1", "w2")


# Compile-time-bound tests: XLA's backend optimisations buy nothing on these tiny shapes
# and double the compile time, so the equivalence checks compile at level 0.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_fast(f):
    return jax.jit(f, compiler_options=FAST_COMPILE)


def value_and_grads(fn, argnums):
    """One compiled function returning (outputs, gradients of a generic scalar of them)."""
    def with_aux(*args):
        out = fn(*args)
        return scalar_loss(lambda *a: out)(*args), out
    return jit_fast(jax.value_and_grad(with_aux, argnums=argnums, has_aux=True))


def check_against_reference(rule, inp, grads=True):
    args = tuple(inp[a] for a in ARGS)
    if not grads:
        out = jit_fast(rule_fn(rule))(*args)
        out_r = jit_fast(ref_fn(rule))(*args)
        assert out[0].dtype == jnp.float64
        assert_close_tree(out, out_r, 1e-10, what="outputs / final weights / momentum")
        return out
    argnums = tuple(i for i, a in enumerate(ARGS)
                    if inp[a] is not None and not (a == "m" and not rule.use_momentum))
    (_, out), g = value_and_grads(rule_fn(rule), argnums)(*args)
    (_, out_r), g_r = value_and_grads(ref_fn(rule), argnums)(*args)
    assert out[0].dtype == jnp.float64
    assert_close_tree(out, out_r, 1e-10, what="outputs / final weights / momentum")
    assert_close_tree(g, g_r, 1e-10, what=f"grads w.r.t. {[ARGS[i] for i in argnums]}")
    # gradients w.r.t. q, k, v and w1 are never trivially zero here; with q_is_k the keys
    # are the queries, so q is unused and its gradient must be exactly zero
    for i, gi in zip(argnums, g):
        if ARGS[i] == "q" and rule.q_is_k:
            assert float(jnp.max(jnp.abs(gi))) == 0.0, "q is unused with q_is_k"
        elif ARGS[i] in ("q", "k", "v", "w1"):
            assert float(jnp.max(jnp.abs(gi))) > 1e-6, ARGS[i]
        if ARGS[i] == "lr":
            for x in (gi[j] for j in rule.updated):
                assert float(jnp.max(jnp.abs(x))) > 1e-6, "lr of an updated matrix"
    return out


# --------------------------------------------------------------------------- scan == loop


CONFIGS = [
    # (weight_norm, momentum, muon, update, extra); all get output/state checks, and outer
    # gradients are checked for the configs listed in GRAD_CONFIGS (compile time budget)
    ("post", True, True, "all", {}),             # V0 (reference LaCT)
    ("post", False, False, "all", {}),
    ("pre", True, False, "all", {}),
    ("pre", False, True, "all", {}),
    (None, True, True, "all", {}),
    (None, False, False, "all", {}),
    ("post", True, True, "w1", {}),              # V1
    ("pre", False, False, "w1", {}),
    (None, True, True, "w1", {}),                # V2
    ("post", True, True, "all", {"ascent": False}),
    ("post", True, False, "all", {"order": "update_then_query"}),
    ("post", False, True, "all", {"q_is_k": True}),
    ("pre", True, True, "all", {"inner_steps": 2}),
    (None, True, True, "all", {"fast_net": "linear"}),
]

# indices into CONFIGS whose outer gradients are checked in the default suite (V0, through
# the hand-written backward; pre-norm with Muon, through autodiff of the scan). Every
# config's gradients are checked by the slow test below.
GRAD_CONFIGS = (0, 3)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}-mom{int(c[1])}-muon{int(c[2])}-{c[3]}-{'-'.join(f'{k}={v}' for k, v in c[4].items())}")
def test_scan_matches_reference_float64(cfg):
    wn, mom, mu, up, extra = cfg
    rule = LaCTRule(chunk_size=4, weight_norm=wn, use_momentum=mom, muon=mu, update=up, **extra)
    check_against_reference(rule, make(1, T=11, linear=rule.linear), grads=CONFIGS.index(cfg) in GRAD_CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [c for i, c in enumerate(CONFIGS) if i not in GRAD_CONFIGS],
                         ids=lambda c: f"{c[0]}-mom{int(c[1])}-muon{int(c[2])}-{c[3]}-{'-'.join(f'{k}={v}' for k, v in c[4].items())}")
def test_scan_matches_reference_float64_grads_all_configs(cfg):
    wn, mom, mu, up, extra = cfg
    rule = LaCTRule(chunk_size=4, weight_norm=wn, use_momentum=mom, muon=mu, update=up, **extra)
    check_against_reference(rule, make(1, T=11, linear=rule.linear), grads=True)


@pytest.mark.parametrize("T", [1, 4, 8, 12])
def test_scan_matches_reference_lengths(T):
    """T = 1, T = C (apply-only), T = 2C (one update), T a multiple of C."""
    rule = LaCTRule(chunk_size=4, weight_norm="post", use_momentum=True, muon=True)
    check_against_reference(rule, make(2, T=T), grads=False)


@pytest.mark.parametrize("wn", ["post", "pre", None])
def test_scan_matches_reference_per_channel_lr(wn):
    rule = LaCTRule(chunk_size=3, weight_norm=wn, use_momentum=True, muon=False)
    check_against_reference(rule, make(3, T=10, B=2, per_channel=True), grads=wn == "post")


def test_stacked_lr_layouts_equal_tuple():
    """lr [B,T,H,3] and [B,T,H,3,D] (dk == dh) give the same as the tuple form."""
    rule = LaCTRule(chunk_size=3, weight_norm="post", use_momentum=True)
    for per_channel in (False, True):
        inp = make(4, T=8, K=5, Dh=5, per_channel=per_channel)
        st = rule.init_state(inp["w0"], inp["w1"], inp["w2"], 1)
        stacked = jnp.stack(inp["lr"], axis=3)
        o1, _ = rule.recurrent(inp["q"], inp["k"], inp["v"], inp["lr"], st, inp["m"])
        o2, _ = rule.recurrent(inp["q"], inp["k"], inp["v"], stacked, st, inp["m"])
        chex.assert_trees_all_equal(np.asarray(o1), np.asarray(o2))


def test_float32_close_to_float64():
    """float32 inputs: within 1e-4 of the float64 result relative to its max magnitude."""
    rule = LaCTRule(chunk_size=4, weight_norm="post", use_momentum=True, muon=True)
    inp64 = make(5, T=13)
    inp32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), inp64)
    o64 = jit_fast(rule_fn(rule))(*(inp64[a] for a in ARGS))[0]
    o32 = jit_fast(rule_fn(rule))(*(inp32[a] for a in ARGS))[0]
    assert o32.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(o64)))
    chex.assert_trees_all_close(np.asarray(o32, np.float64), np.asarray(o64), atol=1e-4 * scale, rtol=1e-7)


# --------------------------------------------------------------------------- hand-checkable


def _f_np(w0, w1, w2, x):
    a = w0 @ x
    return w1 @ ((a / (1 + np.exp(-a))) * (w2 @ x))


def test_one_token_is_apply_only():
    inp = make(6, T=1)
    rule = LaCTRule(chunk_size=4, use_momentum=True, muon=True)
    o, W, mom = rule_fn(rule)(*(inp[a] for a in ARGS))
    w0, w1, w2 = (np.asarray(inp[n]) for n in ("w0", "w1", "w2"))
    for h in range(2):
        expect = _f_np(w0[0, h], w1[0, h], w2[0, h], np.asarray(inp["q"])[0, 0, h])
        chex.assert_trees_all_close(np.asarray(o)[0, 0, h], expect, atol=1e-12, rtol=1e-7)
    # no update happened: final weights are the initial ones, momentum buffers zero
    for i, n in enumerate(("w0", "w1", "w2")):
        chex.assert_trees_all_equal(np.asarray(W[i]), np.asarray(inp[n]))
        np.testing.assert_array_equal(np.asarray(mom[i]), 0.0)


def test_chunk_covering_sequence_is_apply_only():
    """C >= T: a single (last) chunk, never updated."""
    inp = make(7, T=6)
    for C in (6, 10):
        rule = LaCTRule(chunk_size=C, use_momentum=True, muon=True)
        o, W, _ = rule_fn(rule)(*(inp[a] for a in ARGS))
        w0, w1, w2 = (np.asarray(inp[n]) for n in ("w0", "w1", "w2"))
        q = np.asarray(inp["q"])
        expect = np.stack([np.stack([_f_np(w0[0, h], w1[0, h], w2[0, h], q[0, t, h]) for h in range(2)])
                           for t in range(6)])[None]
        chex.assert_trees_all_close(np.asarray(o), expect, atol=1e-12, rtol=1e-7)
        chex.assert_trees_all_equal(np.asarray(W[1]), np.asarray(inp["w1"]))


def test_zero_learning_rate_changes_nothing():
    """lr = 0 and no weight norm: every chunk reads W^(0). With post-norm, a zero update still
    rescales rows by ‖W‖/(‖W‖ + 1e-5) (a reference quirk), which we check explicitly."""
    inp = make(8, T=11)
    inp["lr"] = tuple(jnp.zeros_like(x) for x in inp["lr"])
    args = tuple(inp[a] for a in ARGS)
    o0, W0_, _ = rule_fn(LaCTRule(chunk_size=4, weight_norm=None))(*args)
    st = LaCTRule(chunk_size=4).init_state(inp["w0"], inp["w1"], inp["w2"], 1)
    base = apply_fast(st.w, jnp.moveaxis(inp["q"], 2, 1), "swiglu")
    chex.assert_trees_all_close(np.asarray(o0), np.asarray(jnp.moveaxis(base, 1, 2)), atol=1e-13, rtol=1e-7)
    chex.assert_trees_all_equal(np.asarray(W0_[1]), np.asarray(inp["w1"]))
    _, Wp, _ = rule_fn(LaCTRule(chunk_size=4, weight_norm="post"))(*args)
    w1 = np.asarray(inp["w1"])
    n = np.linalg.norm(w1, axis=-1, keepdims=True)
    twice = w1 / (n + 1e-5) * n  # two updating chunks (starts 0 and 4 < 11 - 4)
    twice = twice / (np.linalg.norm(twice, axis=-1, keepdims=True) + 1e-5) * n
    chex.assert_trees_all_close(np.asarray(Wp[1]), twice, atol=1e-14, rtol=1e-7)


def test_two_chunks_linear_by_hand():
    """Linear fast net, T = 2C, no momentum/Muon/norm: chunk 1 reads W1 + Σ lr1 v kᵀ."""
    inp = make(9, T=8, linear=True)
    rule = LaCTRule(chunk_size=4, fast_net="linear", weight_norm=None)
    o, W, _ = rule_fn(rule)(*(inp[a] for a in ARGS))
    q, k, v, lr1, w1 = (np.asarray(x) for x in (inp["q"], inp["k"], inp["v"], inp["lr"][1], inp["w1"]))
    for h in range(2):
        W1 = w1[0, h] + sum(lr1[0, t, h] * np.outer(v[0, t, h], k[0, t, h]) for t in range(4))
        chex.assert_trees_all_close(np.asarray(o)[0, :4, h], q[0, :4, h] @ w1[0, h].T, atol=1e-12, rtol=1e-7)
        chex.assert_trees_all_close(np.asarray(o)[0, 4:, h], q[0, 4:, h] @ W1.T, atol=1e-12, rtol=1e-7)
        chex.assert_trees_all_close(np.asarray(W[1])[0, h], W1, atol=1e-12, rtol=1e-7)


# --------------------------------------------------------------------------- closed form / NS


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("net", ["swiglu", "linear"])
def test_closed_form_inner_grads_equal_autodiff(per_channel, net):
    inp = make(10, T=5, per_channel=per_channel, linear=net == "linear")
    rule = LaCTRule(chunk_size=5, fast_net=net)
    st = rule.init_state(inp["w0"], inp["w1"], inp["w2"], 1)
    tb = lambda x: jnp.moveaxis(x, 2, 1)  # [B, H, T, ...]
    k, v = tb(inp["k"]), tb(inp["v"])
    lrs = tuple(tb(x if per_channel else x[..., None]) for x in inp["lr"])
    got = inner_grads(st.w, k, v, lrs, net, (0, 1, 2))

    for i in rule.matrices:
        def partial(Wi, i=i):
            Ws = list(st.w)
            Ws[i] = Wi
            return Ws

        # per-token gradient via autodiff, then lr-weighted over columns and summed
        def tok_loss(Wi, kk, vv, i=i):
            return jnp.sum(apply_fast(tuple(partial(Wi)), kk[:, :, None], net)[:, :, 0] * vv)
        per_tok = jax.vmap(jax.grad(tok_loss), in_axes=(None, 2, 2), out_axes=2)(st.w[i], k, v)  # [B,H,T,r,c]
        expect = jnp.sum(per_tok * lrs[i][:, :, :, None, :], axis=2)
        chex.assert_trees_all_close(np.asarray(got[i]), np.asarray(expect), atol=1e-12, rtol=1e-12)
        assert float(jnp.max(jnp.abs(expect))) > 1e-3


def test_newton_schulz_matches_reference_and_bf16_is_plausible():
    rng = np.random.default_rng(11)
    G = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float64)
    Gt = jnp.swapaxes(G, 1, 2)  # rows > cols: transposed internally
    for M in (G, Gt):
        X = newton_schulz5(M)
        for j in range(3):
            chex.assert_trees_all_close(np.asarray(X[j]), np.asarray(ns5_loop(M[j])), atol=1e-13, rtol=1e-7)
    # NS5 pushes singular values towards ~1 (into roughly [0.7, 1.2])
    s = np.linalg.svd(np.asarray(newton_schulz5(G)), compute_uv=False)
    assert s.min() > 0.5 and s.max() < 1.3
    Xb = newton_schulz5(G.astype(jnp.float32), "bfloat16")
    assert Xb.dtype == jnp.float32
    rel = float(jnp.linalg.norm(Xb - newton_schulz5(G.astype(jnp.float32))) / jnp.linalg.norm(Xb))
    assert 1e-4 < rel < 0.2, rel


def test_bf16_muon_option_runs_and_differs_plausibly():
    inp = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), make(12, T=13, lr_scale=1.0))
    args = tuple(inp[a] for a in ARGS)
    o32 = jit_fast(rule_fn(LaCTRule(chunk_size=4, use_momentum=True, muon=True)))(*args)[0]
    fbf = rule_fn(LaCTRule(chunk_size=4, use_momentum=True, muon=True, muon_dtype=jnp.bfloat16))
    # also under grad: one compiled value_and_grad gives the outputs and d/dv
    (_, out), (g,) = value_and_grads(fbf, (2,))(*args)
    obf = out[0]
    assert obf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(obf)))
    rel = float(jnp.linalg.norm(obf - o32) / jnp.linalg.norm(o32))
    assert 1e-5 < rel < 0.3, rel
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


# --------------------------------------------------------------------------- transformations / API


def test_vmap_jit_checkpoint():
    rule = LaCTRule(chunk_size=4, weight_norm="pre", use_momentum=True)
    inps = [make(s, T=9) for s in (13, 14)]
    fn = rule_fn(rule)
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *inps)
    o_v = jit_fast(jax.vmap(fn))(*(stacked[a] for a in ARGS))[0]
    o_1 = jit_fast(fn)(*(inps[1][a] for a in ARGS))[0]
    chex.assert_trees_all_close(np.asarray(o_v[1]), np.asarray(o_1), atol=1e-12, rtol=1e-7)
    args = tuple(inps[0][a] for a in ARGS)
    g1 = jit_fast(jax.grad(scalar_loss(fn), argnums=(2, 6)))(*args)
    g2 = jit_fast(jax.grad(scalar_loss(jax.checkpoint(fn)), argnums=(2, 6)))(*args)
    assert_close_tree(g1, g2, 1e-12, what="checkpoint grads")


def test_functional_op_matches_rule_and_state_resume():
    inp = make(15, T=11)
    o, S = lact_swiglu(inp["q"], inp["k"], inp["v"], inp["lr"], w0=inp["w0"][0], w1=inp["w1"][0],
                       w2=inp["w2"][0], chunk_size=4, momentum=inp["m"], output_final_state=True)
    rule = LaCTRule(chunk_size=4, use_momentum=True)
    o_r, W_r, m_r = rule_fn(rule)(*(inp[a] for a in ARGS))  # [B, H, ...] weights (B = 1): same values
    chex.assert_trees_all_close(np.asarray(o), np.asarray(o_r), atol=1e-13, rtol=1e-7)
    assert isinstance(S, LaCTState)
    assert_close_tree(S.w, W_r, 1e-13, what="final weights")
    # resuming from the state after 8 tokens (two full updated chunks) continues the sequence:
    # chunk starts 0, 4 update when T = 12; split the work as [0, 8) + [8, 12).
    inp12 = make(16, T=12)
    st = rule.init_state(inp12["w0"], inp12["w1"], inp12["w2"], 1)
    sl = lambda x, a, b: x[:, a:b]
    lr_a = tuple(sl(x, 0, 8) for x in inp12["lr"])
    rule_ut = LaCTRule(chunk_size=4, use_momentum=True, order="update_then_query")
    oa, Sa = rule_ut.recurrent(sl(inp12["q"], 0, 8), sl(inp12["k"], 0, 8), sl(inp12["v"], 0, 8), lr_a, st,
                               sl(inp12["m"], 0, 8), output_final_state=True)
    lr_b = tuple(sl(x, 8, 12) for x in inp12["lr"])
    ob, _ = rule_ut.recurrent(sl(inp12["q"], 8, 12), sl(inp12["k"], 8, 12), sl(inp12["v"], 8, 12), lr_b, Sa,
                              sl(inp12["m"], 8, 12))
    o_full, _ = rule_ut.recurrent(inp12["q"], inp12["k"], inp12["v"], inp12["lr"], st, inp12["m"])
    chex.assert_trees_all_close(np.asarray(jnp.concatenate([oa, ob], 1)), np.asarray(o_full), atol=1e-12, rtol=1e-7)


# --------------------------------------------------------------------------- bad inputs


def _call(**over):
    inp = make(17, T=7)
    kw = dict(q=inp["q"], k=inp["k"], v=inp["v"], lr=jnp.stack(inp["lr"], 3), w0=inp["w0"][0], w1=inp["w1"][0],
              w2=inp["w2"][0], chunk_size=4)
    kw.update(over)
    q, k, v, lr = kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("lr")
    return lact_swiglu(q, k, v, lr, **kw)


def test_bad_inputs_raise_named_errors():
    inp = make(17, T=7)
    with pytest.raises(ValueError, match=r"lr: expected shape \[B, T, H, 3\].*\(1, 7, 2, 3\), got \(1, 6, 2, 3\)"):
        _call(lr=jnp.ones((1, 6, 2, 3)))
    with pytest.raises(ValueError, match=r"lr1: expected shape \[B, T, H\].*\(1, 7, 2\), got \(1, 5, 2\)"):
        _call(lr=(inp["lr"][0], inp["lr"][1][:, :5], inp["lr"][2]))
    with pytest.raises(ValueError, match=r"lr: per-channel shape \[B, T, H, 3, D\] needs D = 6"):
        _call(lr=jnp.ones((1, 7, 2, 3, 4)))
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=r"chunk_size: expected a positive int, got"):
            _call(chunk_size=bad)
    with pytest.raises(ValueError, match=r"w0: expected shape \[B, H, dh, dk\].*\(1, 2, 6, 4\), got \(1, 2, 6, 5\)"):
        _call(w0=jnp.ones((2, 6, 5)))
    with pytest.raises(ValueError, match=r"w2: expected shape \[B, H, dh, dk\].*\(1, 2, 6, 4\), got \(1, 2, 5, 4\)"):
        _call(w2=jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=r"w1: expected shape \[B, H, dv, dh\].*\(1, 2, 3, 6\), got \(1, 2, 4, 6\)"):
        _call(w1=jnp.ones((2, 4, 6)))
    with pytest.raises(ValueError, match=r"v: expected shape \[B, T, H, V\]"):
        _call(v=jnp.ones((1, 7, 3, 3)))
    with pytest.raises(ValueError, match=r"q: expected shape \[B, T, H, K\].*got \(1, 7, 2, 5\)"):
        _call(q=jnp.ones((1, 7, 2, 5)))
    with pytest.raises(ValueError, match=r"momentum: expected shape \[B, T, H\] = \(1, 7, 2\), got \(1, 7\)"):
        _call(momentum=jnp.ones((1, 7)))
    with pytest.raises(ValueError, match=r"weight_norm: got 'mid', expected one of"):
        _call(weight_norm="mid")
    with pytest.raises(ValueError, match=r"impl: got 'fast'"):
        _call(impl="fast")
    with pytest.raises(ValueError, match=r"muon_dtype: got 'float16'"):
        LaCTRule(muon_dtype="float16")
    with pytest.raises(ValueError, match=r"chunk_size: expected a positive int, got True"):
        LaCTRule(chunk_size=True)
    with pytest.raises(ValueError, match=r"constant_lr: expected a real scalar .* got str"):
        LaCTRule(constant_lr="fast")
    with pytest.raises(ValueError, match=r"momentum: use_momentum=True needs"):
        rule = LaCTRule(chunk_size=4, use_momentum=True)
        rule.recurrent(inp["q"], inp["k"], inp["v"], inp["lr"], rule.init_state(inp["w0"], inp["w1"], inp["w2"], 1))


def test_numpy_and_jax_scalars_are_accepted():
    """Integer and float fields take NumPy / JAX scalars and store Python numbers (the rule
    stays hashable and equal to the one built from Python numbers)."""
    r = LaCTRule(chunk_size=np.int64(4), inner_steps=jnp.int32(2), constant_lr=np.float32(0.5))
    assert r == LaCTRule(chunk_size=4, inner_steps=2, constant_lr=float(np.float32(0.5)))
    assert type(r.chunk_size) is int and type(r.inner_steps) is int and type(r.constant_lr) is float
    assert hash(r) == hash(LaCTRule(chunk_size=4, inner_steps=2, constant_lr=float(np.float32(0.5))))
    assert LaCTRule(constant_lr=jnp.float32(0.25)).constant_lr == 0.25


# --------------------------------------------------------------------------- hand-written backward


def _scan_inputs(rule, q, k, v, lr, m, w0, w1, w2):
    """The arguments of ``scan_vjp.scan`` / ``scan_vjp.plain`` (as LaCTRule.recurrent builds them)."""
    from tttla_jax.rules.lact import scan_vjp
    x = rule.prepare(q, k, v, lr, rule.init_state(w0, w1, w2, k.shape[0]), m if rule.use_momentum else None)
    return scan_vjp.scan_inputs(rule, x)


# slow: the default suite's V0 gradient check against the float64 loop (GRAD_CONFIGS) already
# runs through the hand-written backward
@pytest.mark.slow
@pytest.mark.parametrize("kw,per_channel", [
    (dict(use_momentum=True, muon=True), True),
    pytest.param(dict(weight_norm=None, use_momentum=True, ascent=False, q_is_k=True), False,
                 marks=pytest.mark.slow),
])
def test_custom_vjp_scan_equals_autodiff_of_the_scan(kw, per_channel):
    """The hand-written backward (scan_vjp.scan) against JAX's autodiff of the same scan
    (scan_vjp.plain): outputs, final state and gradients w.r.t. every input at 1e-10 (float64)."""
    from tttla_jax.rules.lact import scan_vjp
    rule = LaCTRule(chunk_size=4, **kw)
    assert scan_vjp.supports(rule)
    inp = make(21, T=14, per_channel=per_channel)
    args = tuple(inp[a] for a in ARGS)
    outs = []
    for f in (scan_vjp.scan, scan_vjp.plain):
        fn = lambda *a, f=f: f(rule, *_scan_inputs(rule, *a))  # noqa: E731
        outs.append(value_and_grads(fn, tuple(range(len(ARGS))))(*args))
    (_, o1), g1 = outs[0]
    (_, o2), g2 = outs[1]
    assert_close_tree(o1, o2, 1e-10, what="outputs / final state")
    assert_close_tree(g1, g2, 1e-10, what="gradients")
    assert float(jnp.max(jnp.abs(g1[5]))) > 1e-6  # w0's gradient (through the norms as well)


@pytest.mark.slow
def test_custom_vjp_scan_bf16_muon_gradient_close_to_autodiff():
    """``muon_dtype="bfloat16"``: the same forward; the backward treats the roundings as the
    identity and takes bfloat16 operands in the Newton–Schulz products (float32 accumulation),
    so its gradient differs from autodiff's (which rounds every cotangent); both are as far
    from the gradient with float32 Newton–Schulz."""
    from tttla_jax.rules.lact import scan_vjp
    from tttla_jax.rules.lact import scan_vjp
    rule = LaCTRule(chunk_size=8, use_momentum=True, muon=True, muon_dtype="bfloat16")
    inp = make(22, T=28, K=16, Dh=16, V=16, dtype=jnp.float32)
    args = tuple(inp[a] for a in ARGS)
    res = []
    for r, f in ((rule, scan_vjp.scan), (rule, scan_vjp.plain), (dataclasses.replace(rule, muon_dtype=None), scan_vjp.scan)):
        fn = lambda *a, f=f, r=r: f(r, *_scan_inputs(r, *a))  # noqa: E731
        res.append(value_and_grads(fn, (0, 1, 2, 5, 6, 7))(*args))
    (_, o1), g1 = res[0]
    (_, o2), g2 = res[1]
    g32 = res[2][1]
    assert_close_tree(o1, o2, 0.0, what="bfloat16 Muon: same forward")
    # both bfloat16 backwards are as far from the float32-Newton–Schulz gradient as each other
    for a, b, c in zip(g1, g2, g32):
        assert bool(jnp.all(jnp.isfinite(a)))
        rel = lambda x: float(jnp.linalg.norm(x - c) / jnp.linalg.norm(c))  # noqa: E731
        assert rel(a) < 1.5 * rel(b) + 1e-3, (rel(a), rel(b))
