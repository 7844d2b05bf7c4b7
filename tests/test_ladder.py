"""The ladder (docs/ladder.md): presets, parallel forms of V2–V6 against the lax.scan rule, V6 as
tt.linear_attention, and the anomaly presets.

Tolerances (documented): float64 1e-10 absolute (outputs, final W1 and momentum buffer,
gradients w.r.t. q, k, v, lr, momentum and the initial fast weights); float32 1e-4
relative to the float64 output's max magnitude (the parallel form sums the chunk updates
in a different order than the scan).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.rules.base import NotAssociativeError
from tttla_jax.rules.ladder import ANOMALIES, PRESETS, ladder
from tttla_jax.rules.lact import LaCTRule

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_fast(f):
    return jax.jit(f, compiler_options=FAST_COMPILE)


def make(rule, seed=0, B=1, T=11, H=2, K=4, Dh=5, V=3, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    if rule.linear:
        Dh = K
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), dtype)
    lr = jnp.asarray(rng.uniform(0.05, 0.5, size=(B, T, H, 3)), dtype)
    m = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), dtype)
    w1 = jnp.asarray(rng.normal(size=(B, H, V, Dh)) / np.sqrt(Dh), dtype)
    w0 = None if rule.linear else jnp.asarray(rng.normal(size=(B, H, Dh, K)) / np.sqrt(K), dtype)
    w2 = None if rule.linear else jnp.asarray(rng.normal(size=(B, H, Dh, K)) / np.sqrt(K), dtype)
    return q, k, v, lr, m, w0, w1, w2


PARALLEL = ("chunked", "associative")  # the two layouts of LaCTRule.parallel


def form(rule, impl):
    """impl: "recurrent", "parallel" (its auto choice) or one of PARALLEL."""
    method = functools.partial(rule.parallel, impl=impl) if impl in PARALLEL else getattr(rule, impl)

    def fn(q, k, v, lr, m, w0, w1, w2):
        st = rule.init_state(w0, w1, w2, k.shape[0])
        o, S = method(q, k, v, lr, st, m if rule.use_momentum else None, output_final_state=True)
        return o, S.w[1], (S.mom[1] if S.mom is not None else None)
    return fn


def scalar(fn):
    def loss(*args):
        tot = 0.0
        for j, x in enumerate(x for x in jax.tree_util.tree_leaves(fn(*args)) if x is not None):
            w = jnp.cos(jnp.arange(x.size, dtype=jnp.float64).reshape(x.shape) * (0.3 + 0.2 * j))
            tot = tot + jnp.sum(x.astype(jnp.float64) * w)
        return tot
    return loss


def close(a, b, atol, what):
    """chex: the same tree structure and leaf shapes, then ``|a − b| <= atol + 1e-7·|b|`` (float64)."""
    chex.assert_trees_all_equal_shapes(a, b, custom_message=what)
    f64 = lambda t: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    chex.assert_trees_all_close(f64(a), f64(b), atol=atol, rtol=1e-7, custom_message=what)


def both(rule, args, grads):
    """Outputs (and gradients w.r.t. every differentiable input) of the recurrent form and of
    each parallel layout, one compile each: ``[recurrent, chunked, associative]``."""
    nums = tuple(i for i, x in enumerate(args) if x is not None and not (i == 4 and not rule.use_momentum))
    res = []
    for impl in ("recurrent",) + PARALLEL:
        fn = form(rule, impl)
        if grads:
            def wa(*a, fn=fn):
                out = fn(*a)
                return scalar(lambda *_: out)(*a), out
            (_, out), g = jit_fast(jax.value_and_grad(wa, argnums=nums, has_aux=True))(*args)
            res.append((out, g))
        else:
            res.append((jit_fast(fn)(*args), None))
    return res


# --------------------------------------------------------------------------- presets


def test_presets_are_cumulative_table2():
    r = {n: ladder(n, chunk_size=8) for n in PRESETS}
    assert (r["v0"].update, r["v0"].weight_norm, r["v0"].use_momentum, r["v0"].muon, r["v0"].fast_net,
            r["v0"].constant_lr) == ("all", "post", True, True, "swiglu", None)
    assert r["v1"] == LaCTRule(chunk_size=8, update="w1", weight_norm="post", use_momentum=True, muon=True)
    assert r["v2"] == LaCTRule(chunk_size=8, update="w1", weight_norm=None, use_momentum=True, muon=True)
    assert r["v3"] == LaCTRule(chunk_size=8, update="w1", weight_norm=None, use_momentum=True, muon=True,
                               fast_net="linear")
    assert r["v4"].constant_lr == 1e-3 and r["v4"].fast_net == "linear"
    assert not r["v5"].use_momentum and r["v5"].muon and r["v5"].constant_lr == 1e-3
    assert r["v6"] == LaCTRule(chunk_size=8, update="w1", weight_norm=None, use_momentum=False, muon=False,
                               fast_net="linear", constant_lr=1e-3)
    assert [r[n].breaks_associativity() is None for n in PRESETS] == [False, False] + [True] * 5
    assert ladder("ascent").ascent is False and ladder("q_is_k").q_is_k
    assert ladder("inner_steps", inner_steps=5).inner_steps == 5
    assert ladder("v2", chunk_size=16, constant_lr=0.5).constant_lr == 0.5
    with pytest.raises(ValueError, match=r"name: got 'v7', expected one of"):
        ladder("v7")
    with pytest.raises(ValueError, match=r"overrides: unknown LaCTRule fields \['lr'\]"):
        ladder("v1", lr=0.1)


@pytest.mark.parametrize("name,component", [("v0", "update='all'"), ("v1", "weight_norm='post'"),
                                            ("inner_steps", "update='all'")])
def test_parallel_on_v0_v1_raises_naming_component(name, component):
    rule = ladder(name, chunk_size=4)
    assert component in rule.breaks_associativity()
    q, k, v, lr, m, w0, w1, w2 = make(rule)
    with pytest.raises(NotAssociativeError, match=r"LaCTRule has no parallel form: " + component.replace("'", ".")):
        rule.parallel(q, k, v, lr, rule.init_state(w0, w1, w2, 1), m)
    if name == "v1":  # impl="auto" falls back to the recurrent form instead of raising
        o, _ = rule(q, k, v, lr, rule.init_state(w0, w1, w2, 1), m)
        assert o.shape == v.shape
    with pytest.raises(NotAssociativeError, match="inner_steps=3"):
        ladder("v2", inner_steps=3).parallel(q, k, v, lr, rule.init_state(w0, w1, w2, 1), m)
    # the one entry point: auto falls back to the recurrent form, a parallel layout by name
    # raises as parallel() does, an implementation of another family is refused by name
    assert rule.resolve_impl("auto") == "recurrent" and rule.parallel_impls() == ()
    with pytest.raises(NotAssociativeError, match=component.replace("'", ".")):
        rule(q, k, v, lr, rule.init_state(w0, w1, w2, 1), m, impl="associative")
    with pytest.raises(ValueError, match=r"impl: LaCTRule does not support impl='dual'"):
        rule(q, k, v, lr, rule.init_state(w0, w1, w2, 1), m, impl="dual")


# --------------------------------------------------------------------------- recurrent == parallel


GRAD_CASES = [("v2", 11), ("v3", 12), ("v5", 11)]


@pytest.mark.parametrize("name,T", GRAD_CASES)
def test_parallel_equals_recurrent_with_grads_float64(name, T):
    rule = ladder(name, chunk_size=4)
    args = make(rule, T=T)
    (o_r, g_r), *pars = both(rule, args, grads=True)
    for impl, (o_p, g_p) in zip(PARALLEL, pars):
        assert o_p[0].dtype == jnp.float64
        close(o_p, o_r, 1e-10, f"{name} {impl} outputs/final W1/momentum")
        close(g_p, g_r, 1e-10, f"{name} {impl} gradients")
    assert float(jnp.max(jnp.abs(g_r[2]))) > 1e-6  # d/dv is not trivially zero


@pytest.mark.parametrize("name", ["v2", "v3", "v4", "v5", "v6"])
@pytest.mark.parametrize("T", [1, 4, 9, pytest.param(12, marks=pytest.mark.slow)])
def test_parallel_equals_recurrent_shapes_float64(name, T):
    """T = 1, one chunk only (T = C), T not a multiple of C, T a multiple of C."""
    rule = ladder(name, chunk_size=4)
    (o_r, _), *pars = both(rule, make(rule, seed=T, T=T, B=2), grads=False)
    for impl, (o_p, _) in zip(PARALLEL, pars):
        close(o_p, o_r, 1e-10, f"{name} {impl} T={T}")


@pytest.mark.parametrize("rows,n,cols", [(8, 3, 8), (6, 2, 9), (9, 4, 5), (5, 7, 6)])
def test_newton_schulz5_factored_equals_dense(rows, n, cols):
    rng = np.random.default_rng(rows * n)
    P = jnp.asarray(rng.normal(size=(2, rows, n)))
    Q = jnp.asarray(rng.normal(size=(2, n, cols)))
    chex.assert_trees_all_close(np.asarray(tt.rules.lact.newton_schulz5_factored(P, Q)),
                               np.asarray(tt.rules.lact.newton_schulz5(P @ Q)), atol=1e-12, rtol=1e-7)


def test_parallel_low_rank_muon_matches_recurrent(monkeypatch):
    """V5 (Muon, no momentum) with chunks shorter than half the head dim: both parallel
    layouts run NS5 on the rank-C factors of each chunk's gradient — outputs, final state and
    gradients still equal the recurrent form's dense NS5 at 1e-10."""
    from tttla_jax.rules.lact import muon
    calls = []
    real = muon.newton_schulz5_factored
    monkeypatch.setattr(muon, "newton_schulz5_factored", lambda P, Q: calls.append(P.shape) or real(P, Q))
    rule = ladder("v5", chunk_size=2)
    assert muon.low_rank_ns_pays(8, 8, 2) and not muon.low_rank_ns_pays(8, 8, 8)
    args = make(rule, seed=7, T=9, K=8, V=8)
    (o_r, g_r), *pars = both(rule, args, grads=True)
    assert len(calls) == 2, f"the factored NS5 was not used by both layouts: {calls}"
    for impl, (o_p, g_p) in zip(PARALLEL, pars):
        close(o_p, o_r, 1e-10, f"v5 low-rank {impl} outputs/final W1")
        close(g_p, g_r, 1e-10, f"v5 low-rank {impl} gradients")


@pytest.mark.parametrize("extra", [dict(muon=False), dict(use_momentum=False), dict(constant_lr=None),
                                   dict(fast_net="swiglu", order="update_then_query"), dict(q_is_k=True),
                                   dict(ascent=False)])
def test_parallel_equals_recurrent_variants_float64(extra):
    """V2 with and without Muon/momentum, per-token lr, the other order, anomalies."""
    rule = ladder("v3", chunk_size=3, **extra)
    (o_r, _), *pars = both(rule, make(rule, seed=3, T=10), grads=False)
    for impl, (o_p, _) in zip(PARALLEL, pars):
        close(o_p, o_r, 1e-10, f"v3 {impl} {extra}")


def test_parallel_per_channel_lr_and_muon_bf16():
    rule = ladder("v2", chunk_size=3, constant_lr=None)
    q, k, v, lr, m, w0, w1, w2 = make(rule, seed=4, T=10, K=4, Dh=4)
    lr = jnp.broadcast_to(lr[..., None], lr.shape + (4,)) * jnp.linspace(0.5, 1.5, 4)
    (o_r, _), *pars = both(rule, (q, k, v, lr, m, w0, w1, w2), grads=False)
    for impl, (o_p, _) in zip(PARALLEL, pars):
        close(o_p, o_r, 1e-10, f"per-channel lr, {impl}")
    rule16 = ladder("v2", chunk_size=3, muon_dtype="bfloat16")
    a32 = tuple(None if x is None else x.astype(jnp.float32) for x in (q, k, v, lr, m, w0, w1, w2))
    (o_r, _), *pars = both(rule16, a32, grads=False)
    for impl, (o_p, _) in zip(PARALLEL, pars):
        close(o_p, o_r, 1e-5, f"bf16 NS: same rounding in both forms ({impl})")


def test_parallel_float32_tolerance():
    rule = ladder("v3", chunk_size=4, constant_lr=None)
    a64 = make(rule, seed=5, T=23)
    a32 = tuple(None if x is None else x.astype(jnp.float32) for x in a64)
    o64 = jit_fast(form(rule, "recurrent"))(*a64)[0]
    scale = float(jnp.max(jnp.abs(o64)))
    for impl in ("recurrent",) + PARALLEL:
        o32 = jit_fast(form(rule, impl))(*a32)[0]
        assert o32.dtype == jnp.float32
        chex.assert_trees_all_close(np.asarray(o32, np.float64), np.asarray(o64), atol=1e-4 * scale, rtol=1e-7)


def test_auto_picks_parallel_and_functional_impl():
    rule = ladder("v2", chunk_size=4)
    q, k, v, lr, m, w0, w1, w2 = make(rule, T=9)
    o_a, _ = rule(q, k, v, lr, rule.init_state(w0, w1, w2, 1), m, impl="auto")
    o_p, _ = rule.parallel(q, k, v, lr, rule.init_state(w0, w1, w2, 1), m)
    chex.assert_trees_all_equal(np.asarray(o_a), np.asarray(o_p))
    o_f, _ = tt.rules.lact.lact_swiglu(q, k, v, lr, w0=w0, w1=w1, w2=w2, chunk_size=4, momentum=m, muon=True,
                                       weight_norm=None, update="w1", impl="chunked")
    o_fr, _ = tt.rules.lact.lact_swiglu(q, k, v, lr, w0=w0, w1=w1, w2=w2, chunk_size=4, momentum=m, muon=True,
                                        weight_norm=None, update="w1", impl="recurrent")
    chex.assert_trees_all_close(np.asarray(o_f), np.asarray(o_fr), atol=1e-10, rtol=1e-7)
    with pytest.raises(NotAssociativeError, match="weight_norm='post'"):
        tt.rules.lact.lact_swiglu(q, k, v, lr, w0=w0, w1=w1, w2=w2, chunk_size=4, update="w1", impl="chunked")
    # the parallel form's own choice on this (CPU) backend is the chunked layout; __call__
    # reaches each layout by name; an unknown layout is an error listing the choices
    st = rule.init_state(w0, w1, w2, 1)
    o_c, _ = rule.parallel(q, k, v, lr, st, m, impl="chunked")
    chex.assert_trees_all_equal(np.asarray(o_p), np.asarray(o_c))
    o_as, _ = rule(q, k, v, lr, st, m, impl="associative")
    chex.assert_trees_all_close(np.asarray(o_as), np.asarray(o_c), atol=1e-10, rtol=1e-7)
    with pytest.raises(ValueError, match=r"impl: got 'scan', expected one of \('auto', 'chunked', 'associative'\)"):
        rule.parallel(q, k, v, lr, st, m, impl="scan")


# --------------------------------------------------------------------------- V6 and anomalies


@pytest.mark.parametrize("T,C", [(11, 4), (7, 16)])
def test_v6_equals_linear_attention(T, C):
    """V6 = chunk-causal linear attention with initial state W1_0ᵀ, v̂ = lr·v, scale 1."""
    lr_c = 0.3
    rule = ladder("v6", chunk_size=C, constant_lr=lr_c)
    q, k, v, lr, m, w0, w1, w2 = make(rule, seed=6, T=T, B=2)

    def ours(q, k, v, w1):
        return rule.parallel(q, k, v, None, rule.init_state(None, w1, None, 2))[0]

    def theirs(q, k, v, w1):
        return tt.linear_attention(q, k, lr_c * v, scale=1.0, masking="chunk", chunk_size=C,
                                   initial_state=jnp.swapaxes(w1, -1, -2))[0]
    def rec(q, k, v, w1):
        return rule.recurrent(q, k, v, None, rule.init_state(None, w1, None, 2))[0]

    def vg(f):
        return jit_fast(jax.value_and_grad(lambda *a: (jnp.sum(jnp.sin(f(*a))), f(*a)), argnums=(0, 1, 2, 3),
                                           has_aux=True))
    (_, o1), g1 = vg(ours)(q, k, v, w1)
    (_, o2), g2 = vg(theirs)(q, k, v, w1)
    close(o1, o2, 1e-10, "V6 outputs")
    close(g1, g2, 1e-10, "V6 gradients")
    close(jit_fast(rec)(q, k, v, w1), o2, 1e-10, "V6 recurrent outputs")


@pytest.mark.parametrize("extra", [{}, dict(constant_lr=None, q_is_k=True, ascent=False)])
def test_linear_attention_inputs_compute_the_rule(extra):
    """A V6-like rule says it is plain chunk-masked linear attention, and
    ``tt.linear_attention(**rule.linear_attention_inputs(...))`` gives its outputs and final
    state in every op form (per-channel lr, the q_is_k and descent anomalies included);
    the other rungs say why not."""
    rule = ladder("v6", chunk_size=4, **extra)
    assert rule.linear_attention_reason() is None
    q, k, v, lr, m, w0, w1, w2 = make(rule, seed=9, T=11, B=2)
    if rule.constant_lr is None:  # per input channel for W1
        lr = (None, lr[..., 1, None] * jnp.linspace(0.5, 1.5, k.shape[-1]), None)
    st = rule.init_state(None, w1, None, 2)
    o_r, s_r = rule.recurrent(q, k, v, lr, st, output_final_state=True)
    for impl in ("chunked", "associative", "recurrent"):
        o, S = tt.linear_attention(**rule.linear_attention_inputs(q, k, v, lr, st, output_final_state=True),
                                   impl=impl)
        close((o, rule.state_from_linear_attention(S, st).w[1]), (o_r, s_r.w[1]), 1e-10, f"V6 as {impl}")
    for name, what in (("v5", "muon=True"), ("v2", "fast_net='swiglu'"), ("v0", "weight_norm='post'")):
        assert what in ladder(name).linear_attention_reason()
    with pytest.raises(ValueError, match=r"linear_attention_inputs: this LaCTRule is not plain chunk-masked "
                                         r"linear attention .*muon=True"):
        ladder("v5", chunk_size=4).linear_attention_inputs(q, k, v, lr, st)


@pytest.mark.parametrize("name", ["v0", "v2", "v4"])
def test_ascent_equals_descent_with_negated_values(name):
    """Flipping the update sign is the same as negating the values (outputs never read v)."""
    up = ladder(name, chunk_size=4)
    down = ladder(name, chunk_size=4, ascent=False)
    q, k, v, lr, m, w0, w1, w2 = make(up, seed=7, T=11)
    impl = "recurrent" if name == "v0" else "parallel"
    f_up = jit_fast(form(up, impl))
    f_down = jit_fast(form(down, impl))
    a = f_up(q, k, v, lr, m, w0, w1, w2)
    b = f_down(q, k, -v, lr, m, w0, w1, w2)
    close(a[:2], b[:2], 1e-12, "ascent(v) == descent(-v)")
    c = f_down(q, k, v, lr, m, w0, w1, w2)
    assert float(jnp.max(jnp.abs(c[0] - a[0]))) > 1e-3  # and descent on v really differs


def test_q_is_k_and_inner_steps_presets_run():
    """The anomaly presets are the V0 rule with one knob changed; q is ignored with q_is_k."""
    base = ladder("v0", chunk_size=4, muon=False)  # Muon off: compile time
    q, k, v, lr, m, w0, w1, w2 = make(base, seed=8, T=11)
    st = base.init_state(w0, w1, w2, 1)
    qk = ladder("q_is_k", chunk_size=4, muon=False)
    o1, _ = qk(q, k, v, lr, st, m)
    o2, _ = base(k, k, v, lr, st, m)
    chex.assert_trees_all_close(np.asarray(o1), np.asarray(o2), atol=1e-12, rtol=1e-7)
    o_n, _ = ladder("inner_steps", chunk_size=4, inner_steps=3, muon=False)(q, k, v, lr, st, m)
    o_b, _ = base(q, k, v, lr, st, m)
    chex.assert_trees_all_close(np.asarray(o_n[:, :4]), np.asarray(o_b[:, :4]), atol=1e-12, rtol=1e-7)  # first chunk: W^(0)
    assert float(jnp.max(jnp.abs(o_n[:, 4:] - o_b[:, 4:]))) > 1e-4
