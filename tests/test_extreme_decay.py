"""Log-decays in [-inf, 0]: every form of tt.linear_attention and tt.delta_rule against the float64 loop.

``log_decay = -inf`` ("forget everything") and very negative finite log-decays (-1e30, -1e6)
are cuts: ``exp(g_t)`` is exactly 0, the state before token t is erased
(:func:`tttla_jax.ops.chunk.segment_cumsum`, docs/linear_attention.md "chunked form").
Patterns: a whole chunk of -inf, a single -inf / -1e30 / -1e6 token, and a mix (cuts on the
first and last token, a chunk of -1e30 on one head), always with ordinary decays in
[-0.3, 0] elsewhere; T = 20 with chunks of 8 (T not a multiple of the chunk size).

Compared, for every form (recurrent, chunked, associative for linear attention, the Pallas
kernels in interpret mode, and packed ``cu_seqlens`` sequences): outputs, final states and
gradients w.r.t. q, k, v, β, the initial state and the log-decay, all finite.
The gradient w.r.t. a cut's log-decay is exactly 0 (``d/dg exp(g) = exp(g) = 0``), as the
float64 loop (:mod:`tttla_jax.reference`) gives it.

Tolerances (documented): float64 1e-10 absolute (O(1) inputs); float32 inputs 1e-4 relative
to the reference's max magnitude (the reference runs in float64 on the same float32 inputs),
as ``tests/test_delta_rule.py``.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.ops import chunk
from tttla_jax.reference.delta import delta_rule_loop
from tttla_jax.reference.linear import linear_attention_loop

B, T, H, K, V, C = 1, 20, 2, 16, 16, 8
PATTERNS = ("chunk_inf", "one_inf", "one_1e30", "one_1e6", "mixed")
LA_FORMS = ("recurrent", "chunked", "associative", "pallas")
DR_FORMS = ("recurrent", "chunked", "pallas")
CU = (0, 7, 20)  # packed: two sequences, the cuts fall inside both
# Default suite: every form on the whole -inf chunk and on the mix; the chunked form (the one
# the bug was in, and auto's CPU pick) also on a single -1e30 token; the rest of the matrix
# (one -inf token, one -1e6 token: -1e6 in float32, where it broke, stays in the default
# test_float32 below) is @slow.
DEFAULT_PATTERNS = ("chunk_inf", "mixed")
CHUNKED_DEFAULT = DEFAULT_PATTERNS + ("one_1e30",)


def matrix(forms):
    return [pytest.param(impl, pattern, marks=() if (impl == "chunked" and pattern in CHUNKED_DEFAULT)
                         or pattern in DEFAULT_PATTERNS
                         else pytest.mark.slow)
            for impl in forms for pattern in PATTERNS]


def log_decay(pattern, rng):
    g = -rng.uniform(0.0, 0.3, size=(B, T, H))
    if pattern == "chunk_inf":
        g[:, C:2 * C] = -np.inf
    elif pattern == "one_inf":
        g[:, 11] = -np.inf
    elif pattern == "one_1e30":
        g[:, 11] = -1e30
    elif pattern == "one_1e6":
        g[:, 11] = -1e6
    else:  # mixed
        g[:, 0, 0] = -np.inf
        g[:, 5, 1] = -1e6
        g[:, T - 1, 1] = -np.inf
        g[:, C:2 * C, 0] = -1e30
        g[:, 13, 1] = -1e30
    return g


def make_inputs(pattern, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, V))
    beta = rng.uniform(0.05, 0.95, size=(B, T, H))
    g = log_decay(pattern, rng)
    S0 = rng.normal(size=(B, H, K, V))
    h0 = rng.normal(size=(len(CU) - 1, H, K, V))
    W = rng.normal(size=(B, T, H, V))  # loss weights on o
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, beta, g, S0, h0, W))


def value_and_grads(fn, args, W, packed):
    """Outputs, final state and the gradients of ``<o, W> + <S, W2>`` w.r.t. q, k, v, β, g, S0."""
    W2 = jnp.asarray(np.random.default_rng(1).normal(size=(len(CU) - 1 if packed else B, H, K, V)), jnp.float64)

    def loss(*a):
        o, S = fn(*a)
        return jnp.sum(o.astype(jnp.float64) * W) + jnp.sum(S.astype(jnp.float64) * W2)

    (o, S) = fn(*args)
    grads = jax.grad(loss, argnums=tuple(range(6)))(*args)
    return (o, S), grads


def _la_ref(packed):
    def fn(q, k, v, beta, g, S0):
        if not packed:
            return linear_attention_loop(q, k, v, log_decay=g, initial_state=S0)
        outs, states = [], []
        for n in range(len(CU) - 1):
            sl = slice(CU[n], CU[n + 1])
            o, S = linear_attention_loop(q[:, sl], k[:, sl], v[:, sl], log_decay=g[:, sl], initial_state=S0[n:n + 1],
                                         scale=K ** -0.5)
            outs.append(o)
            states.append(S)
        return jnp.concatenate(outs, 1), jnp.concatenate(states, 0)
    return fn


def _dr_ref(packed):
    def fn(q, k, v, beta, g, S0):
        if not packed:
            return delta_rule_loop(q, k, v, beta, log_decay=g, initial_state=S0)
        outs, states = [], []
        for n in range(len(CU) - 1):
            sl = slice(CU[n], CU[n + 1])
            o, S = delta_rule_loop(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], log_decay=g[:, sl],
                                   initial_state=S0[n:n + 1], scale=K ** -0.5)
            outs.append(o)
            states.append(S)
        return jnp.concatenate(outs, 1), jnp.concatenate(states, 0)
    return fn


def _op(op, impl, packed, interpret="gpu"):
    kw = dict(chunk_size=C, impl=impl, output_final_state=True)
    if impl == "pallas":
        kw["interpret"] = interpret
    if packed:
        kw["cu_seqlens"] = jnp.asarray(CU, jnp.int32)

    @jax.jit
    def fn(q, k, v, beta, g, S0):
        if op == "la":
            return tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, **kw)
        return tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=S0, **kw)
    return fn


@functools.lru_cache(maxsize=None)
def reference(op, pattern, packed):
    q, k, v, beta, g, S0, h0, W = make_inputs(pattern)
    ref = (_la_ref if op == "la" else _dr_ref)(packed)
    return value_and_grads(ref, (q, k, v, beta, g, h0 if packed else S0), W, packed)


def run(op, impl, pattern, packed=False, dtype=jnp.float64, interpret="gpu"):
    q, k, v, beta, g, S0, h0, W = make_inputs(pattern, dtype)
    args = (q, k, v, beta, g, h0 if packed else S0)
    return value_and_grads(_op(op, impl, packed, interpret), args, W, packed)


NAMES = ("o", "S", "dq", "dk", "dv", "dbeta", "dlog_decay", "dS0")


def assert_matches(got, ref, what, atol=None, rel=None, op="la"):
    (o, S), grads = got
    (o_r, S_r), grads_r = ref
    for name, a, b in zip(NAMES, (o, S) + tuple(grads), (o_r, S_r) + tuple(grads_r)):
        if name == "dbeta" and op == "la":
            continue  # linear attention has no β
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        assert np.all(np.isfinite(b)), f"{what}: the float64 loop's {name} is not finite"
        assert np.all(np.isfinite(a)), f"{what}: {name} has non-finite entries at {np.argwhere(~np.isfinite(a))[:5]}"
        tol = atol if atol is not None else rel * max(1.0, float(np.max(np.abs(b))))
        err = float(np.max(np.abs(a - b)))
        assert err <= tol, f"{what}: {name} max abs error {err:.3g} > {tol:.3g}"


def cut_mask(pattern):
    g = np.asarray(make_inputs(pattern)[4])
    return g <= -chunk.cut_threshold(jnp.float64)


# --------------------------------------------------------------------------- float64, every form


@pytest.mark.parametrize("impl,pattern", matrix(LA_FORMS))
def test_linear_attention_float64(impl, pattern):
    got = run("la", impl, pattern)
    assert_matches(got, reference("la", pattern, False), f"linear_attention {impl} {pattern}", atol=1e-10)
    # the gradient w.r.t. a cut's log-decay is exactly 0
    assert np.all(np.asarray(got[1][4])[cut_mask(pattern)] == 0.0)


@pytest.mark.parametrize("impl,pattern", matrix(DR_FORMS))
def test_delta_rule_float64(impl, pattern):
    got = run("dr", impl, pattern)
    assert_matches(got, reference("dr", pattern, False), f"delta_rule {impl} {pattern}", atol=1e-10, op="dr")
    assert np.all(np.asarray(got[1][4])[cut_mask(pattern)] == 0.0)


# packed, default suite: one chunked case per op (the -inf chunk for the delta rule, the -1e30
# token for linear attention); every form and pattern in the slow sweep
PACKED_DEFAULT = (("dr", "chunked", "chunk_inf"), ("la", "chunked", "one_1e30"))


@pytest.mark.parametrize("op,impl,pattern", [
    (op, impl, pattern) if (op, impl, pattern) in PACKED_DEFAULT else pytest.param(op, impl, pattern, marks=pytest.mark.slow)
    for op, impl in [("la", "chunked"), ("la", "recurrent"), ("la", "associative"), ("dr", "chunked"),
                     ("dr", "recurrent")]
    for pattern in ("chunk_inf", "one_1e30", "mixed")])
def test_packed_float64(op, impl, pattern):
    got = run(op, impl, pattern, packed=True)
    assert_matches(got, reference(op, pattern, True), f"{op} packed {impl} {pattern}", atol=1e-10, op=op)


@pytest.mark.slow
@pytest.mark.parametrize("op", ("la", "dr"))
def test_pallas_tpu_interpret_float64(op):
    """The Mosaic kernels (TPU interpret mode) on the mixed pattern."""
    got = run(op, "pallas", "mixed", interpret="tpu")
    assert_matches(got, reference(op, "mixed", False), f"{op} pallas(tpu) mixed", atol=1e-10, op=op)


@pytest.mark.parametrize("impl", ("chunked", "pallas"))
def test_linear_attention_chunk_masking(impl):
    """Block-causal masking with cuts (the kernel's log-decay gradient moves per chunk); the
    kernel's block-causal chunk sizes start at 16."""
    q, k, v, beta, g, S0, h0, W = make_inputs("mixed")
    C = 16

    def ref(q, k, v, beta, g, S0):
        return linear_attention_loop(q, k, v, log_decay=g, initial_state=S0, masking="chunk", chunk_size=C)

    def fn(q, k, v, beta, g, S0):
        kw = dict(interpret="gpu") if impl == "pallas" else {}
        return tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, masking="chunk", chunk_size=C,
                                   impl=impl, output_final_state=True, **kw)
    args = (q, k, v, beta, g, S0)
    assert_matches(value_and_grads(jax.jit(fn), args, W, False), value_and_grads(ref, args, W, False),
                   f"linear_attention {impl} masking=chunk", atol=1e-10)


# --------------------------------------------------------------------------- float32


@pytest.mark.parametrize("op,impl,pattern", [
    (op, impl, pattern) if pattern == "one_1e6" else pytest.param(op, impl, pattern, marks=pytest.mark.slow)
    for op, impl in [("la", "chunked"), ("la", "associative"), ("la", "pallas"), ("dr", "chunked"),
                     ("dr", "pallas")]
    for pattern in ("one_1e6", "mixed")])
def test_float32(op, impl, pattern):
    """float32 inputs: a single -1e6 token used to give silently wrong chunked outputs."""
    got = run(op, impl, pattern, dtype=jnp.float32)
    q, k, v, beta, g, S0, h0, W = make_inputs(pattern, jnp.float32)
    ref = (_la_ref if op == "la" else _dr_ref)(False)
    want = value_and_grads(ref, (q, k, v, beta, g, S0), W.astype(jnp.float64), False)
    assert_matches(got, want, f"{op} {impl} float32 {pattern}", rel=1e-4, op=op)


# --------------------------------------------------------------------------- the cut threshold


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_cut_threshold_is_exact(dtype):
    """exp(x) is exactly 0 in the dtype for every x ≤ −L (so treating such a token as a hard
    reset changes nothing), and the threshold is not far below the underflow point."""
    L = chunk.cut_threshold(dtype)
    assert np.exp(np.asarray(-L, dtype)) == 0.0
    assert np.exp(np.nextafter(np.asarray(-L, dtype), dtype(0))) == 0.0
    assert np.exp(np.asarray(-L + 3.0, dtype)) > 0.0
    assert math.isfinite(L)


def test_segmented_reverse_cumsum():
    x = jnp.arange(1.0, 7.0)
    cut = jnp.asarray([False, False, True, False, False, True])
    # t=0: 1+2 (stops before the cut at 2); t=1: 2; cuts 0; t=3: 4+5; t=4: 5
    np.testing.assert_array_equal(np.asarray(chunk.segmented_reverse_cumsum(x, cut)), [3, 2, 0, 9, 5, 0])
