"""tt.linear_attention: every form against the float64 loop of docs/linear_attention.md.

Tolerances (documented): float64 1e-10 (absolute, on O(1)-scaled inputs); float32
inputs 1e-4 relative to the reference's max magnitude; bfloat16 inputs 3e-2 relative
(the inputs themselves are rounded to 8 bits of mantissa; the state accumulates in
float32 so the error does not grow with T).

Every form, the loop and their gradients run jitted with XLA's cheap CPU pipeline (eager
op-by-op dispatch was most of this file's time); the float64 loop's results are computed
once per (masking, decay) and shared by the three forms. The core equivalence also runs
under ``chex.variants`` (with and without ``jax.jit``) and under ``jax.vmap`` over a
leading axis. Comparisons use ``chex.assert_trees_all_close`` (``|a − b| ≤ atol + rtol·|b|``).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tttla_jax as tt
from tttla_jax.impl import ImplError
from tttla_jax.reference import linear_attention_loop

FORMS = ("recurrent", "associative", "chunked")
MASKINGS = ("causal", "chunk", "none")  # the values of the masking argument


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


def run_form(impl, masking, C):
    def fn(q, k, v, g, S0):
        return tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, masking=masking,
                                   chunk_size=C, impl=impl, output_final_state=True)
    return fn


def run_ref(masking, C):
    def fn(q, k, v, g, S0):
        return linear_attention_loop(q, k, v, log_decay=g, initial_state=S0, masking=masking, chunk_size=C)
    return fn


FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_fast(fn):
    return jax.jit(fn, compiler_options=FAST)


def outputs_and_grads_fn(fn):
    """``(q, k, v, g, S0) -> ((o, S), grads w.r.t. q, k, v, log_decay, S0)`` of ``fn``."""
    def with_aux(*a):
        out = fn(*a)
        return loss_of(lambda *_: out)(*a), out

    vg = jax.value_and_grad(with_aux, argnums=(0, 1, 2, 3, 4), has_aux=True)

    def f(*a):
        (_, out), grads = vg(*a)
        return out, grads
    return f


def outputs_and_grads(fn, args):
    """``((o, S), grads w.r.t. q, k, v, log_decay, S0)`` of ``fn`` from one compiled call."""
    return jit_fast(outputs_and_grads_fn(fn))(*args)


@functools.lru_cache(maxsize=None)
def _reference_f64(masking, decay):
    B, T, H, K, V, C = 2, 21, 2, 5, 3, 8
    q, k, v, g, S0 = make_inputs(0, B, T, H, K, V, decay=decay)
    args = (q, k, v, g if decay else jnp.zeros((B, T, H)), S0)
    return args, outputs_and_grads(run_ref(masking, C), args)


def _f64(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def assert_close_tree(a, b, atol, rtol=0.0, what=""):
    """chex equivalence of two pytrees (same structure and shapes), compared in float64."""
    chex.assert_trees_all_equal_shapes(a, b)
    chex.assert_trees_all_close(_f64(a), _f64(b), atol=atol, rtol=rtol, custom_message=what)


# the recurrent and associative forms without decay run the decayed code with a zero gate
# (covered by the variants below): @slow, offsetting tests/test_cpu_tiles.py and
# tests/test_linear_attention_token_major.py
@pytest.mark.parametrize("impl", [pytest.param(f, marks=pytest.mark.slow) if f in ("recurrent", "associative") else f
                                  for f in FORMS])
@pytest.mark.parametrize("masking", MASKINGS)
def test_forms_match_reference_float64(impl, masking):
    """No decay (the decayed case runs under chex variants below)."""
    args, ((o_r, S_r), grads_r) = _reference_f64(masking, False)
    (o, S), grads = outputs_and_grads(run_form(impl, masking, 8), args)
    assert o.dtype == jnp.float64 and S.dtype == jnp.float64
    assert_close_tree((o, S), (o_r, S_r), 1e-10, what="outputs/state")
    assert_close_tree(grads, grads_r, 1e-10, what="grads dq dk dv dg dS0")


class FormsVariantsTest(chex.TestCase):
    """The core equivalence (with decay): every form, every masking, outputs, final state and
    gradients w.r.t. q, k, v, log_decay and S0 against the float64 loop at 1e-10, with and
    without ``jax.jit`` (``chex.variants``) and under ``jax.vmap`` over a leading axis."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(impl=FORMS, masking=MASKINGS)
    def test_forms_match_reference_float64(self, impl, masking):
        args, ((o_r, S_r), grads_r) = _reference_f64(masking, True)
        (o, S), grads = self.variant(outputs_and_grads_fn(run_form(impl, masking, 8)))(*args)
        chex.assert_trees_all_equal_dtypes((o, S), (o_r, S_r))
        assert_close_tree((o, S), (o_r, S_r), 1e-10, what="outputs/state")
        assert_close_tree(grads, grads_r, 1e-10, what="grads dq dk dv dg dS0")

    @parameterized.product(impl=FORMS, masking=MASKINGS)
    def test_vmap_over_leading_axis(self, impl, masking):
        """Row 0: the reference inputs; row 1: the same with q doubled (o is linear in q, the
        state and ∂L/∂q do not depend on it for this linear loss)."""
        args, ((o_r, S_r), grads_r) = _reference_f64(masking, True)
        q, k, v, g, S0 = args
        stacked = (jnp.stack([q, 2 * q]),) + tuple(jnp.stack([x, x]) for x in (k, v, g, S0))
        (o, S), grads = jit_fast(jax.vmap(outputs_and_grads_fn(run_form(impl, masking, 8))))(*stacked)
        chex.assert_shape(o, (2,) + o_r.shape)
        assert_close_tree((o[0], S[0]), (o_r, S_r), 1e-10, what="vmap row 0 outputs/state")
        assert_close_tree((o[1], S[1]), (2 * o_r, S_r), 1e-10, what="vmap row 1 outputs/state")
        assert_close_tree(tuple(gr[0] for gr in grads), grads_r, 1e-10, what="vmap row 0 grads")
        assert_close_tree(grads[0][1], grads_r[0], 1e-10, what="vmap row 1 dq")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(T=1, K=3, V=4, C=16, masking="causal", seed=0)     # one token
@example(T=16, K=8, V=9, C=16, masking="chunk", seed=1)     # exactly one chunk
@example(T=23, K=17, V=1, C=7, masking="chunk", seed=2)     # T not a multiple of C, odd dims
@example(T=70, K=1, V=4, C=64, masking="none", seed=3)      # > one chunk, no reference loop
@given(
    T=st.integers(1, 300),
    K=st.sampled_from([1, 3, 8, 17]),
    V=st.sampled_from([1, 4, 9]),
    C=st.sampled_from([1, 7, 16, 64]),
    masking=st.sampled_from(MASKINGS),
    seed=st.integers(0, 2**16),
)
def test_chunked_and_recurrent_any_shape(T, K, V, C, masking, seed):
    """Hypothesis over shapes: T in [1, 300], K != V, odd dims, C not dividing T."""
    q, k, v, g, S0 = make_inputs(seed, 1, T, 2, K, V)
    o_r, S_r = jit_fast(run_ref(masking, C))(q, k, v, g, S0) if T <= 64 else (None, None)
    outs = {impl: jit_fast(run_form(impl, masking, C))(q, k, v, g, S0) for impl in ("recurrent", "chunked")}
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
    assert_close_tree(o, o_r, rtol * scale_o, rtol=1e-7, what="outputs")
    assert_close_tree(S, S_r, 1e-5 * float(jnp.abs(S_r).max()), rtol=1e-7, what="state")


def test_defaults_no_decay_no_state_and_final_state_none():
    q, k, v, _, _ = make_inputs(2, 1, 9, 1, 4, 4)
    o, S = tt.linear_attention(q, k, v)
    assert S is None
    o_r, _ = linear_attention_loop(q, k, v)
    assert_close_tree(o, o_r, 1e-12, rtol=1e-7)
    # hand check of the first token: o_0 = (q_0 / 2) k_0ᵀ v_0 with K = 4
    np.testing.assert_allclose(o[0, 0, 0], (q[0, 0, 0] @ k[0, 0, 0]) / 2 * v[0, 0, 0], atol=1e-12)


def test_explicit_scale():
    q, k, v, _, _ = make_inputs(3, 1, 5, 1, 4, 2)
    o1, _ = tt.linear_attention(q, k, v, scale=1.0)
    o2, _ = tt.linear_attention(q, k, v, scale=0.5)
    assert_close_tree(o1, 2 * o2, 1e-12, rtol=1e-7)


def test_jit_vmap_grad():
    q, k, v, g, S0 = make_inputs(4, 2, 19, 2, 4, 3, dtype=jnp.float32)
    f = jax.jit(lambda *a: tt.linear_attention(*a[:3], log_decay=a[3], initial_state=a[4],
                                               output_final_state=True, chunk_size=8))
    o, S = f(q, k, v, g, S0)
    # vmap over an extra leading axis equals a Python loop over it
    stack = lambda x: jnp.stack([x, 2 * x])
    ov, Sv = jax.vmap(f)(stack(q), stack(k), stack(v), stack(g), stack(S0))
    o1, S1 = f(2 * q, 2 * k, 2 * v, 2 * g, 2 * S0)
    assert_close_tree((ov[0], ov[1], Sv[1]), (o, o1, S1), 1e-5, rtol=1e-5, what="vmap rows vs calls")
    dq = jax.jit(jax.grad(lambda q: f(q, k, v, g, S0)[0].sum()))(q)
    assert dq.shape == q.shape and dq.dtype == jnp.float32 and bool(jnp.isfinite(dq).all())
    # jax.checkpoint works around the op
    dq2 = jax.grad(jax.checkpoint(lambda q: f(q, k, v, g, S0)[0].sum()))(q)
    assert_close_tree(dq, dq2, 1e-6, rtol=1e-5, what="checkpoint")


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


# ----------------------------------------------------------------------------- scalars


@pytest.mark.parametrize("chunk_size", [8, np.int64(8), np.int32(8), jnp.int32(8), np.asarray(8)])
def test_chunk_size_accepts_python_numpy_and_jax_ints(chunk_size):
    q, k, v, g, S0 = make_inputs(3, 1, 19, 2, 4, 3)
    kw = dict(log_decay=g, initial_state=S0, masking="chunk", output_final_state=True)
    ref = tt.linear_attention(q, k, v, chunk_size=8, **kw)
    assert_close_tree(tt.linear_attention(q, k, v, chunk_size=chunk_size, **kw), ref, 0.0)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 8.0, np.float32(8.0), "8", None])
def test_chunk_size_rejects_bool_float_and_others(bad):
    q, k, v, _, _ = make_inputs(3, 1, 5, 1, 4, 3)
    with pytest.raises(ValueError, match=r"chunk_size: expected a positive int.*got"):
        tt.linear_attention(q, k, v, chunk_size=bad)


@pytest.mark.parametrize("scale", [0.3, 1, np.float32(0.3), np.float64(0.3), np.int64(2),
                                   jnp.float32(0.3), jnp.asarray(0.3), np.asarray(0.3)])
def test_scale_accepts_python_numpy_and_jax_scalars(scale):
    q, k, v, _, _ = make_inputs(3, 1, 5, 1, 4, 2)
    o, _ = tt.linear_attention(q, k, v, scale=scale)
    o1, _ = tt.linear_attention(q, k, v, scale=1.0)
    assert_close_tree(o, float(scale) * o1, 1e-12, rtol=1e-12)


@pytest.mark.parametrize("bad", [True, np.ones(3), jnp.ones((1,)), "0.3", 1j, np.asarray(True)])
def test_scale_rejects_bool_arrays_and_others(bad):
    q, k, v, _, _ = make_inputs(3, 1, 5, 1, 4, 2)
    with pytest.raises(ValueError, match=r"scale: expected a real scalar"):
        tt.linear_attention(q, k, v, scale=bad)


@pytest.mark.parametrize("impl", FORMS)
def test_traced_scale_under_jit_and_its_gradient(impl):
    """A scale computed under jit works, equals the concrete one, and is differentiable
    (o is linear in the scale: d Σo / d scale = Σo / scale)."""
    q, k, v, g, S0 = make_inputs(3, 1, 9, 2, 4, 3)

    def total(s):
        return jnp.sum(tt.linear_attention(q, k, v, scale=s, log_decay=g, initial_state=S0, impl=impl,
                                           chunk_size=4)[0])

    val, d = jax.jit(jax.value_and_grad(total))(jnp.float64(0.3))
    assert_close_tree(val, total(0.3), 1e-12, rtol=1e-12, what="traced vs concrete scale")
    assert_close_tree(d, val / 0.3, 1e-10, rtol=1e-10, what="d/dscale")


# ----------------------------------------------------------------------------- implementation choice


def test_impl_candidates_in_auto_order_and_auto_is_chunked_on_cpu():
    q, k, v, _, _ = make_inputs(3, 1, 5, 1, 16, 16, dtype=jnp.float32)
    reasons = tt.ops.linear_attention_impl_reasons(q, k, v)
    assert list(reasons) == ["pallas", "chunked", "recurrent", "associative"]
    assert "not a GPU/TPU" in reasons["pallas"] and "interpret mode" in reasons["pallas"]
    assert all(reasons[c] is None for c in ("chunked", "recurrent", "associative"))
    assert tt.impl.resolve("auto", reasons) == "chunked"
    # interpret= asks for the kernel in interpret mode: then auto may pick it on a CPU host
    assert tt.ops.linear_attention_impl_reasons(q, k, v, interpret="gpu")["pallas"] is None


def test_auto_on_an_accelerator_picks_the_kernel_only_where_it_runs(monkeypatch):
    """On GPU/TPU, auto takes the kernel when it supports the call, else the next candidate
    (each reason named); nothing is run here, only resolved."""
    import tttla_jax.impl

    monkeypatch.setattr(tttla_jax.impl, "platform", lambda: "gpu")
    q, k, v, _, _ = make_inputs(3, 1, 5, 1, 16, 16, dtype=jnp.float32)
    reasons = tt.ops.linear_attention_impl_reasons(q, k, v)
    assert reasons["pallas"] is None and tt.impl.resolve("auto", reasons) == "pallas"
    cu = jnp.asarray([0, 2, 5], jnp.int32)
    for kw, why in [(dict(masking="none"), "masking='none' is not supported"),
                    (dict(masking="chunk", chunk_size=24), "chunk_size = 24 is not supported")]:
        reasons = tt.ops.linear_attention_impl_reasons(q, k, v, **kw)
        assert why in reasons["pallas"], (kw, reasons)
        assert tt.impl.resolve("auto", reasons) == "chunked"
    packed = tt.ops.linear_attention_impl_reasons(q, k, v, cu_seqlens=cu)  # the kernel runs packed sequences
    assert packed["pallas"] is None and tt.impl.resolve("auto", packed) == "pallas"
    q5 = q[..., :5]
    assert "head dim K = 5" in tt.ops.linear_attention_impl_reasons(q5, q5, v)["pallas"]
    f64 = tt.ops.linear_attention_impl_reasons(*(x.astype(jnp.float64) for x in (q, k, v)))
    assert "float64" in f64["pallas"]


def test_explicit_pallas_on_an_unsupported_call_raises_its_reason():
    q, k, v, _, _ = make_inputs(3, 1, 5, 1, 5, 16, dtype=jnp.float32)
    with pytest.raises(ImplError, match=r"tt.linear_attention: impl='pallas' cannot run this call: head dim K = 5"):
        tt.linear_attention(q, k, v, impl="pallas")
    with pytest.raises(ImplError, match=r"impl='pallas' cannot run this call: masking='none' is not supported"):
        tt.linear_attention(*make_inputs(3, 1, 5, 1, 16, 16, dtype=jnp.float32)[:3], impl="pallas", masking="none")


@pytest.mark.parametrize("impl", FORMS)
@pytest.mark.parametrize("name", ["block_sizes", "interpret"])
def test_kernel_arguments_with_a_non_kernel_impl_are_refused(impl, name):
    from tttla_jax.kernels import BlockSizes

    q, k, v, _, _ = make_inputs(3, 1, 5, 1, 4, 2)
    val = BlockSizes() if name == "block_sizes" else "gpu"
    with pytest.raises(ValueError, match=rf"{name}: configures the Pallas kernel \(impl='pallas'\), got impl='{impl}'"):
        tt.linear_attention(q, k, v, impl=impl, **{name: val})
