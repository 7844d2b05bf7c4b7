"""tt.linear_attention: every form against the float64 loop of docs/linear_attention.md.

Tolerances (documented): float64 1e-10 (absolute, on O(1)-scaled inputs); float32
inputs 1e-4 relative to the reference's max magnitude; bfloat16 inputs 3e-2 relative
(the inputs themselves are rounded to 8 bits of mantissa; the state accumulates in
float32 so the error does not grow with T).

Every form, the loop and their gradients run jitted with XLA's cheap CPU pipeline (eager
op-by-op dispatch was most of this file's time); the float64 loop's results are computed
once per (mode, decay) and shared by the three forms.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tttla_jax as tt
from tttla_jax.reference import linear_attention_loop

FORMS = ("recurrent", "associative", "chunked")
MODES = ("causal", "chunk", "none")


def make_inputs(seed, B, T, H, K, V, dtype=jnp.float64, decay=True, state=True):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), dtype)
    g = jnp.asarray(-rng.uniform(0.0, 0.3, size=(B, T, H)), dtype) if decay else None
    S0 = jnp.asarray(rng.normal(size=(B, H, K, V)), dtype) if state else None
    return q, k, v, g, S0


def loss_of(fn):
    """A scalar of outputs and final state with random cotangents (so gradients are generic)."""
    def loss(q, k, v, g, S0):
        o, S = fn(q, k, v, g, S0)
        wo = jnp.sin(jnp.arange(o.size, dtype=jnp.float64).reshape(o.shape))
        ws = jnp.cos(jnp.arange(S.size, dtype=jnp.float64).reshape(S.shape))
        return jnp.sum(o.astype(jnp.float64) * wo) + jnp.sum(S.astype(jnp.float64) * ws)
    return loss


def run_form(impl, mode, C):
    def fn(q, k, v, g, S0):
        return tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, masking=mode,
                                   chunk_size=C, impl=impl, output_final_state=True)
    return fn


def run_ref(mode, C):
    def fn(q, k, v, g, S0):
        return linear_attention_loop(q, k, v, log_decay=g, initial_state=S0, mode=mode, chunk_size=C)
    return fn


FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_fast(fn):
    return jax.jit(fn, compiler_options=FAST)


def outputs_and_grads(fn, args):
    """``((o, S), grads w.r.t. q, k, v, log_decay, S0)`` of ``fn`` from one compiled call."""
    def with_aux(*a):
        out = fn(*a)
        return loss_of(lambda *_: out)(*a), out

    (_, out), grads = jit_fast(jax.value_and_grad(with_aux, argnums=(0, 1, 2, 3, 4), has_aux=True))(*args)
    return out, grads


@functools.lru_cache(maxsize=None)
def _reference_f64(mode, decay):
    B, T, H, K, V, C = 2, 21, 2, 5, 3, 8
    q, k, v, g, S0 = make_inputs(0, B, T, H, K, V, decay=decay)
    args = (q, k, v, g if decay else jnp.zeros((B, T, H)), S0)
    return args, outputs_and_grads(run_ref(mode, C), args)


def assert_close_tree(a, b, atol, rtol=0.0, what=""):
    for i, (x, y) in enumerate(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   atol=atol, rtol=rtol, err_msg=f"{what} leaf {i}")


@pytest.mark.parametrize("impl", FORMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("decay", [False, True])
def test_forms_match_reference_float64(impl, mode, decay):
    args, ((o_r, S_r), grads_r) = _reference_f64(mode, decay)
    (o, S), grads = outputs_and_grads(run_form(impl, mode, 8), args)
    assert o.dtype == jnp.float64 and S.dtype == jnp.float64
    assert_close_tree((o, S), (o_r, S_r), 1e-10, what="outputs/state")
    assert_close_tree(grads, grads_r, 1e-10, what="grads dq dk dv dg dS0")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(T=1, K=3, V=4, C=16, mode="causal", seed=0)     # one token
@example(T=16, K=8, V=9, C=16, mode="chunk", seed=1)     # exactly one chunk
@example(T=23, K=17, V=1, C=7, mode="chunk", seed=2)     # T not a multiple of C, odd dims
@example(T=70, K=1, V=4, C=64, mode="none", seed=3)      # > one chunk, no reference loop
@given(
    T=st.integers(1, 300),
    K=st.sampled_from([1, 3, 8, 17]),
    V=st.sampled_from([1, 4, 9]),
    C=st.sampled_from([1, 7, 16, 64]),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_chunked_and_recurrent_any_shape(T, K, V, C, mode, seed):
    """Hypothesis over shapes: T in [1, 300], K != V, odd dims, C not dividing T."""
    q, k, v, g, S0 = make_inputs(seed, 1, T, 2, K, V)
    o_r, S_r = jit_fast(run_ref(mode, C))(q, k, v, g, S0) if T <= 64 else (None, None)
    outs = {impl: jit_fast(run_form(impl, mode, C))(q, k, v, g, S0) for impl in ("recurrent", "chunked")}
    assert outs["chunked"][0].shape == (1, T, 2, V)
    assert_close_tree(outs["chunked"], outs["recurrent"], 1e-10, what="chunked vs recurrent")
    if o_r is not None:  # the unrolled loop is slow to trace for long T
        assert_close_tree(outs["recurrent"], (o_r, S_r), 1e-10, what="recurrent vs loop")


@pytest.mark.parametrize("impl", FORMS)
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
def test_low_precision_tolerance(impl, dtype, rtol):
    B, T, H, K, V, C = 2, 40, 2, 16, 16, 16
    q, k, v, g, S0 = make_inputs(1, B, T, H, K, V, dtype=dtype)
    o, S = jit_fast(run_form(impl, "causal", C))(q, k, v, g, S0)
    assert o.dtype == dtype, "output dtype must equal the input dtype"
    assert S.dtype == jnp.float32, "state accumulates in float32"
    o_r, S_r = jit_fast(run_ref("causal", C))(q, k, v, g, S0)  # reference on the same rounded inputs
    scale_o = float(jnp.abs(o_r).max())
    np.testing.assert_allclose(np.asarray(o, np.float64), np.asarray(o_r), atol=rtol * scale_o)
    np.testing.assert_allclose(np.asarray(S, np.float64), np.asarray(S_r),
                               atol=1e-5 * float(jnp.abs(S_r).max()))


def test_defaults_no_decay_no_state_and_final_state_none():
    q, k, v, _, _ = make_inputs(2, 1, 9, 1, 4, 4)
    o, S = tt.linear_attention(q, k, v)
    assert S is None
    o_r, _ = linear_attention_loop(q, k, v)
    np.testing.assert_allclose(o, o_r, atol=1e-12)
    # hand check of the first token: o_0 = (q_0 / 2) k_0ᵀ v_0 with K = 4
    np.testing.assert_allclose(o[0, 0, 0], (q[0, 0, 0] @ k[0, 0, 0]) / 2 * v[0, 0, 0], atol=1e-12)


def test_explicit_scale():
    q, k, v, _, _ = make_inputs(3, 1, 5, 1, 4, 2)
    o1, _ = tt.linear_attention(q, k, v, scale=1.0)
    o2, _ = tt.linear_attention(q, k, v, scale=0.5)
    np.testing.assert_allclose(o1, 2 * o2, atol=1e-12)


def test_jit_vmap_grad():
    q, k, v, g, S0 = make_inputs(4, 2, 19, 2, 4, 3, dtype=jnp.float32)
    f = jax.jit(lambda *a: tt.linear_attention(*a[:3], log_decay=a[3], initial_state=a[4],
                                               output_final_state=True, chunk_size=8))
    o, S = f(q, k, v, g, S0)
    # vmap over an extra leading axis equals a Python loop over it
    stack = lambda x: jnp.stack([x, 2 * x])
    ov, Sv = jax.vmap(f)(stack(q), stack(k), stack(v), stack(g), stack(S0))
    o1, S1 = f(2 * q, 2 * k, 2 * v, 2 * g, 2 * S0)
    np.testing.assert_allclose(ov[0], o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ov[1], o1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Sv[1], S1, rtol=1e-5, atol=1e-5)
    dq = jax.jit(jax.grad(lambda q: f(q, k, v, g, S0)[0].sum()))(q)
    assert dq.shape == q.shape and dq.dtype == jnp.float32 and bool(jnp.isfinite(dq).all())
    # jax.checkpoint works around the op
    dq2 = jax.grad(jax.checkpoint(lambda q: f(q, k, v, g, S0)[0].sum()))(q)
    np.testing.assert_allclose(dq, dq2, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=np.zeros((2, 9, 3, 4))), r"k: expected shape \[B, T, H, K\].*\(2, 8, 3, 4\).*got \(2, 9, 3, 4\)"),
        (dict(v=np.zeros((2, 8, 2, 5))), r"v: expected shape \[B, T, H, V\].*\(2, 8, 3\).*got \(2, 8, 2, 5\)"),
        (dict(q=np.zeros((2, 8, 3))), r"q: expected a rank-4 array .*got shape \(2, 8, 3\)"),
        (dict(initial_state=np.zeros((2, 3, 5, 4))), r"initial_state: expected shape \[B, H, K, V\] = \(2, 3, 4, 5\), got \(2, 3, 5, 4\)"),
        (dict(log_decay=np.zeros((2, 8, 3, 1))), r"log_decay: expected shape \[B, T, H\] = \(2, 8, 3\), got \(2, 8, 3, 1\)"),
        (dict(masking="causal2"), r"masking: got 'causal2', expected one of \('causal', 'chunk', 'none'\)"),
        (dict(impl="fast"), r"impl: got 'fast', expected one of"),
        (dict(chunk_size=0), r"chunk_size: expected a positive int, got 0"),
        (dict(chunk_size=-4), r"chunk_size: expected a positive int, got -4"),
    ],
)
def test_bad_input_names_argument_and_shapes(kwargs, match):
    args = dict(q=np.zeros((2, 8, 3, 4)), k=np.zeros((2, 8, 3, 4)), v=np.zeros((2, 8, 3, 5)))
    args.update(kwargs)
    q, k, v = (jnp.asarray(args.pop(n)) for n in ("q", "k", "v"))
    if "initial_state" in args:
        args["initial_state"] = jnp.asarray(args["initial_state"])
    if "log_decay" in args:
        args["log_decay"] = jnp.asarray(args["log_decay"])
    with pytest.raises(ValueError, match=match):
        tt.linear_attention(q, k, v, **args)
