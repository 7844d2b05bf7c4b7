"""Pallas delta-rule kernels: forward, and the backward kernels (a states sweep and a reverse sweep;
the log-decay gradient by the identity in the kernel module), tested against the float64 loop
and against the XLA backward they replace (the VJP of the chunked form, ``_dr_bwd_xla``).

Truth: the float64 loop :func:`tttla_jax.reference.delta_rule_loop` (docs/linear_attention.md) and the XLA
chunked form ``tt.delta_rule(impl="chunked")``. Tolerances as ``test_kernels.py``: float64
1e-10 absolute; bfloat16 inputs 3e-2 relative to the truth's max magnitude (the kernel
computes in float32 after reading bf16 inputs). Keys are L2-normalised and β ∈ (0.1, 0.9),
the regime where the delta rule is a contraction.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import tttla_jax as tt
from tttla_jax.kernels import BlockSizes
from tttla_jax.kernels import delta_rule as kernel_dr
from tttla_jax.reference import delta_rule_loop

ARGNUMS = (0, 1, 2, 3, 4, 5)  # q, k, v, beta, log_decay, initial_state


def make_inputs(seed, B, T, H, K, V, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    side = dtype if dtype == jnp.float64 else jnp.float32
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), dtype)
    k = rng.normal(size=(B, T, H, K))
    k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), dtype)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), side)
    g = jnp.asarray(-rng.uniform(0.0, 0.3, size=(B, T, H)), side)
    S0 = jnp.asarray(rng.normal(size=(B, H, K, V)), side)
    return q, k, v, beta, g, S0


def eval_all(fn, args, jit=True):
    def with_aux(*a):
        o, S = fn(*a)
        wo = jnp.sin(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape)).astype(jnp.float64)
        ws = jnp.cos(jnp.arange(S.size, dtype=jnp.float32).reshape(S.shape)).astype(jnp.float64)
        return jnp.sum(o.astype(jnp.float64) * wo) + jnp.sum(S.astype(jnp.float64) * ws), (o, S)

    vg = jax.value_and_grad(with_aux, argnums=ARGNUMS, has_aux=True)
    (_, out), grads = (jax.jit(vg) if jit else vg)(*args)
    to_np = lambda t: tuple(np.asarray(x, np.float64) for x in t)  # noqa: E731
    return to_np(out), to_np(grads)


def kernel(interpret, C=16, **kw):
    def fn(q, k, v, beta, g, S0):
        return kernel_dr(q, k, v, beta, log_decay=g, initial_state=S0, chunk_size=C,
                         output_final_state=True, interpret=interpret, **kw)
    return fn


def chunked(q, k, v, beta, g, S0):
    return tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=S0, chunk_size=16,
                         output_final_state=True, impl="chunked")


def loop(q, k, v, beta, g, S0):
    return delta_rule_loop(q, k, v, beta, log_decay=g, initial_state=S0)


def assert_close(got, want, atol=0.0, rel=None, what=""):
    """chex comparison per leaf: ``|got − want| ≤ tol`` with ``tol = atol`` or, with ``rel``,
    ``rel · max(1, max|want|)``."""
    for i, (x, y) in enumerate(zip(got, want)):
        chex.assert_equal_shape((x, y), custom_message=f"{what}: leaf {i}")
        tol = atol if rel is None else rel * max(1.0, float(np.max(np.abs(y))))
        chex.assert_trees_all_close(x, y, atol=tol, rtol=0, custom_message=f"{what}: leaf {i}")


SHAPE = dict(B=1, T=18, H=2, K=16, V=32)  # two chunks of 16, the second partial


@functools.lru_cache(maxsize=None)
def _loop_truth():
    return eval_all(loop, make_inputs(0, **SHAPE), jit=False)


# slow (default-suite budget, offsets the per-channel case below): the default suite runs the
# per-head kernels against the float64 loop in tests/test_extreme_decay.py (cuts, gradients) and
# two value blocks in test_float64_per_channel_gates (the same partial sums over value blocks)
@pytest.mark.slow
@pytest.mark.parametrize("interpret", ["gpu", "tpu"])
def test_float64_matches_loop(interpret):
    args = make_inputs(0, **SHAPE)
    out, grads = eval_all(kernel(interpret, block_sizes=BlockSizes(block_v_gpu=16)), args)
    out_r, grads_r = _loop_truth()
    assert_close(out, out_r, atol=1e-10, what=f"{interpret} outputs")
    assert_close(grads, grads_r, atol=1e-10, what=f"{interpret} grads (q, k, v, beta, g, S0)")


@pytest.mark.slow
def test_bfloat16_head_dim_64():
    args = make_inputs(1, 1, 20, 1, 64, 64, jnp.bfloat16)
    o, S = jax.eval_shape(kernel("gpu"), *args)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    out, grads = eval_all(kernel("gpu"), args)
    out_r, grads_r = eval_all(chunked, tuple(jnp.asarray(x, jnp.float64) for x in args))
    assert_close(out, out_r, rel=3e-2, what="bf16 outputs")
    assert_close(grads, grads_r, rel=3e-2, what="bf16 grads")


@pytest.mark.parametrize("platform,call", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
# 64 and 128 slow (default-suite budget, offset the per-channel exports)
@pytest.mark.parametrize("head_dim", [pytest.param(hd, marks=pytest.mark.slow) for hd in (64, 128)] + [256])
def test_export(platform, call, head_dim):
    def loss(q, k, v, beta, g, S0):
        o, S = kernel_dr(q, k, v, beta, log_decay=g, initial_state=S0, output_final_state=True)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)

    B, T, H, D = 2, 150, 2, head_dim
    args = ([jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)] * 3
            + [jax.ShapeDtypeStruct((B, T, H), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((B, H, D, D), jnp.float32)])
    exp = export.export(jax.jit(jax.value_and_grad(loss, argnums=ARGNUMS)), platforms=[platform],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert exp.mlir_module().count(call) == 3  # forward, states sweep, reverse sweep


def test_bad_inputs_and_auto():
    q, k, v, beta, g, S0 = make_inputs(2, 1, 4, 1, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"head dim K = 300 is not supported \(expected 16 <= K <= 256"):
        kernel_dr(*make_inputs(2, 1, 4, 1, 300, 16, jnp.float32)[:4])
    with pytest.raises(ValueError, match=r"log_decay: expected shape \[B, T, H\] = \(1, 4, 1\), got \(1, 4, 1, 8\); "
                                         r"or, one value per key channel, \[B, T, H, K\] = \(1, 4, 1, 16\)"):
        kernel_dr(q, k, v, beta, log_decay=jnp.zeros((1, 4, 1, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"beta: expected shape \[B, T, H\] = \(1, 4, 1\), got \(1, 4\)"):
        kernel_dr(q, k, v, beta[..., 0])
    # CPU host: auto keeps the XLA chunked form
    assert "not a GPU/TPU" in tt.ops.delta_rule_impl_reasons(q, k, v)["pallas"]


# --------------------------------------------------------------------------- any head dim, packed sequences

# (interpret, K, V, cu_seqlens): head dims between the tiles (zero-padded in the wrapper: exact,
# β k kᵀ and k S do not see zero key channels) and packed sequences (an empty one, one shorter
# than a chunk, one over several chunks).
ODD_CASES = [
    ("gpu", 48, 96, (0, 5, 5, 21)),
    pytest.param("tpu", 200, 32, (0, 17, 21), marks=pytest.mark.slow),
    pytest.param("gpu", 32, 200, None, marks=pytest.mark.slow),
    pytest.param("tpu", 96, 48, (0, 3, 20, 21, 21), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("interpret,K,V,cu", ODD_CASES)
def test_float64_any_head_dim_and_packed(interpret, K, V, cu):
    """float64, 1e-10 against the recurrent form of tt.delta_rule on the same (packed) call:
    outputs, per-sequence final states, gradients w.r.t. q, k, v, beta, log_decay, h0."""
    N = 1 if cu is None else len(cu) - 1
    q, k, v, beta, g, _ = make_inputs(30 + K + V, 1, 21, 2, K, V)
    S0 = jnp.asarray(np.random.default_rng(K).normal(size=(N, 2, K, V)))
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    kw = dict(initial_state=None, output_final_state=True, chunk_size=16, cu_seqlens=cu)

    def kfn(q, k, v, beta, g, S0):
        return kernel_dr(q, k, v, beta, **dict(kw, initial_state=S0), log_decay=g, interpret=interpret)

    def rfn(q, k, v, beta, g, S0):
        return tt.delta_rule(q, k, v, beta, **dict(kw, initial_state=S0), log_decay=g, impl="recurrent")

    args = (q, k, v, beta, g, S0)
    got, want = eval_all(kfn, args), eval_all(rfn, args)
    assert_close(got[0], want[0], atol=1e-10, what=f"{interpret} K={K} V={V} outputs")
    assert_close(got[1], want[1], atol=1e-10, what=f"{interpret} K={K} V={V} grads")


# Slow: the default suite already runs the backward kernels against the float64 loop
# (test_float64_matches_loop, two value blocks), on a packed call (test_float64_any_head_dim_and_packed)
# and on -inf cuts (tests/test_extreme_decay.py); these compare them with the XLA backward directly.
@pytest.mark.slow
@pytest.mark.parametrize("interpret,cut", [("gpu", True), ("tpu", False)])
def test_backward_kernel_matches_xla_backward(interpret, cut):
    """The backward kernels ≡ the XLA backward (VJP of the chunked form) on the same residuals
    and cotangents, float64 1e-10: T = 37 (three chunks of 16, the last partial), two value
    blocks on the Triton-style kernel (dq, dk, dβ summed over blocks), a hard reset
    (log-decay −inf) in one head."""
    import tttla_jax.kernels.delta_rule_kernel as mod

    q, k, v, beta, g, S0 = make_inputs(40, 1, 37, 2, 16, 32)
    if cut:
        g = g.at[0, 20, 1].set(-jnp.inf)
    cfg = mod._Cfg(C=16, block_sizes=BlockSizes(block_v_gpu=16), interpret=interpret)
    (o, S), res = mod._dr_fwd(q, k, v, beta, g, S0, 0.3, cfg)
    rng = np.random.default_rng(41)
    cts = (jnp.asarray(rng.normal(size=o.shape)), jnp.asarray(rng.normal(size=S.shape)))
    got = jax.jit(lambda r, c: mod._dr_bwd(0.3, cfg, r, c))(res, cts)
    want = jax.jit(lambda r, c: mod._dr_bwd_xla(0.3, cfg, r, c))(res, cts)
    assert_close(got, want, atol=1e-10, what=f"{interpret} backward kernels vs XLA (q, k, v, beta, g, S0)")


@pytest.mark.slow
@pytest.mark.parametrize("interpret", ["gpu", "tpu"])
def test_packed_backward_kernel_matches_xla_backward(interpret):
    """Packed sequences: the backward kernels (states sweep resetting to each sequence's h0,
    reverse sweep resetting to its dS_final, dh0 per sequence; the per-sequence log-decay
    identity) ≡ the VJP of the packed chunked XLA form, float64 1e-10: empty sequences in the
    middle and at the end, one shorter than a chunk, one over two chunks, a −inf cut."""
    import tttla_jax.kernels.delta_rule_kernel as mod

    q, k, v, beta, g, _ = make_inputs(42, 1, 37, 2, 16, 32)
    g = g.at[0, 20, 1].set(-jnp.inf)
    cu = jnp.asarray([0, 5, 5, 30, 37, 37], jnp.int32)
    h0 = jnp.asarray(np.random.default_rng(43).normal(size=(5, 2, 16, 32)))
    cfg = mod._Cfg(C=16, block_sizes=BlockSizes(block_v_gpu=16), interpret=interpret)
    (o, S), res = mod._dr_packed_fwd(q, k, v, beta, g, h0, cu, 0.3, cfg)
    rng = np.random.default_rng(44)
    cts = (jnp.asarray(rng.normal(size=o.shape)), jnp.asarray(rng.normal(size=S.shape)))
    got = jax.jit(lambda r, c: mod._dr_packed_bwd(0.3, cfg, r, c))(res, cts)
    want = jax.jit(lambda r, c: mod._dr_packed_bwd_xla(0.3, cfg, r, c))(res, cts)
    assert got[-1] is None and want[-1] is None  # cu_seqlens
    assert_close(got[:-1], want[:-1], atol=1e-10, what=f"{interpret} packed backward kernels vs XLA")


@pytest.mark.slow
def test_backward_kernel_tpu_two_value_blocks():
    """Mosaic kernels with V = 256 in two 128-wide value blocks (the v5e/v5p table entry):
    dq, dk, dβ summed over the blocks ≡ the XLA backward, float64 1e-10."""
    import tttla_jax.kernels.delta_rule_kernel as mod

    q, k, v, beta, g, S0 = make_inputs(45, 1, 20, 1, 16, 256)
    cfg = mod._Cfg(C=16, block_sizes=BlockSizes(block_v_tpu=128), interpret="tpu")
    (o, S), res = mod._dr_fwd(q, k, v, beta, g, S0, 0.3, cfg)
    rng = np.random.default_rng(46)
    cts = (jnp.asarray(rng.normal(size=o.shape)), jnp.asarray(rng.normal(size=S.shape)))
    got = jax.jit(lambda r, c: mod._dr_bwd(0.3, cfg, r, c))(res, cts)
    want = jax.jit(lambda r, c: mod._dr_bwd_xla(0.3, cfg, r, c))(res, cts)
    assert_close(got, want, atol=1e-10, what="tpu two value blocks: backward kernels vs XLA")


# --------------------------------------------------------------------------- per-channel gates (KDA)


def channel_inputs(seed, T, H, K, V, N, dtype=jnp.float64):
    """Inputs with a per-channel log-decay ``[1, T, H, K]`` (Kimi Delta Attention) holding an
    ``-inf`` entry, a ``-1e30`` entry, a ``-1e6`` entry (cuts of one channel only) and a whole
    ``-inf`` channel over a stretch of tokens; ``N`` initial states (one per packed sequence)."""
    q, k, v, beta, _, _ = make_inputs(seed, 1, T, H, K, V, dtype)
    rng = np.random.default_rng(seed + 7)
    side = jnp.float64 if dtype == jnp.float64 else jnp.float32
    cuts = {(3, 0, 1): -np.inf, (9, H - 1, 2): -1e30, (T - 2, 0, 0): -1e6}
    g = -rng.uniform(0.0, 0.6, size=(T, H, K))
    for (t, h, c), x in cuts.items():
        g[t, h, c] = x
    g[5:12, 0, K - 1] = -np.inf  # a whole channel cut over a stretch of tokens
    S0 = jnp.asarray(rng.normal(size=(N, H, K, V)), side)
    return q, k, v, beta, jnp.asarray(g[None], side), S0


def compare(kfn, xfn, args, what, atol=0.0, rel=None, xargs=None, jit_x=True):
    """Outputs, final states and all gradients of the kernel ``kfn`` against ``xfn`` (on ``xargs``,
    default ``args``); returns the kernel's gradients."""
    got = eval_all(kfn, args)
    want = eval_all(xfn, args if xargs is None else xargs, jit=jit_x)
    assert_close(got[0], want[0], atol=atol, rel=rel, what=what + " outputs")
    assert_close(got[1], want[1], atol=atol, rel=rel, what=what + " grads (q, k, v, beta, log_decay, S0)")
    return got[1]


def channel_pair(interpret, cu, impl="chunked", **kw):
    """The kernel (through ``tt.delta_rule(impl="pallas")``, the op's dispatch included) and an
    XLA form of tt.delta_rule on the same (packed) per-channel call."""
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    common = dict(output_final_state=True, chunk_size=16, cu_seqlens=cu)

    def kfn(q, k, v, beta, g, S0):
        return tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=S0, impl="pallas", interpret=interpret,
                             **common, **kw)

    def xfn(q, k, v, beta, g, S0):
        return tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=S0, impl=impl, **common)

    return kfn, xfn


# (interpret, K, V, cu_seqlens, block_v_gpu): padded head dims (48 -> 64), packed with an empty
# sequence, one shorter than a chunk and one spanning chunks, two value blocks; the default suite
# runs the first case, the rest are slow.
KDA_CASES = [
    ("gpu", 48, 32, (0, 5, 5, 21, 37), 16),
    pytest.param("tpu", 32, 48, (0, 17, 37), None, marks=pytest.mark.slow),
    pytest.param("gpu", 32, 32, None, 16, marks=pytest.mark.slow),
    pytest.param("tpu", 48, 48, None, None, marks=pytest.mark.slow),
    pytest.param("gpu", 16, 200, (0, 3, 37, 37), None, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("interpret,K,V,cu,bv", KDA_CASES)
def test_float64_per_channel_gates(interpret, K, V, cu, bv):
    """float64, 1e-10: the per-channel (KDA) kernels — forward, states sweep, reverse sweep with
    the per-channel log-decay identity, per-channel cuts — against the XLA chunked form on the
    same call: outputs, final states and every gradient (q, k, v, β, the [B, T, H, K] log-decay,
    the initial states); the gradient at a cut is exactly 0."""
    N = 1 if cu is None else len(cu) - 1
    args = channel_inputs(80 + K + V, 37, 2, K, V, N)
    kfn, cfn = channel_pair(interpret, cu, block_sizes=BlockSizes(block_v_gpu=bv))
    dg = compare(kfn, cfn, args, f"KDA {interpret} K={K} V={V} cu={cu}", atol=1e-10)[4]
    assert np.all(dg[np.asarray(args[4]) <= -1e6] == 0.0) and np.all(np.isfinite(dg))


@pytest.mark.slow
@pytest.mark.parametrize("interpret", ["gpu", "tpu"])
def test_float64_per_channel_matches_loop(interpret):
    """The per-channel kernels against the float64 token loop (not only the chunked form), T not a
    multiple of the 16-token chunk, two value blocks on the Triton-style kernel, chunk_size=64
    asked (the per-channel kernels run 16-token chunks whatever it is)."""
    args = channel_inputs(90, 21, 2, 32, 32, 1)
    kfn = kernel(interpret, C=64, block_sizes=BlockSizes(block_v_gpu=16))
    compare(kfn, loop, args, f"KDA {interpret} vs loop", atol=1e-10, jit_x=False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,rel", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("interpret", ["gpu", "tpu"])
def test_reduced_precision_per_channel(interpret, dtype, rel):
    """KDA kernels with float32 q, k, v (tolerance 1e-4) and bfloat16 (3e-2, relative to the
    truth's max magnitude, as the per-head kernel) against the float64 chunked form on the same
    rounded inputs; packed (three sequences), two value blocks, per-channel cuts."""
    q, k, v, beta, g, S0 = channel_inputs(95, 40, 1, 64, 64, 3, jnp.float32)
    args = tuple(x.astype(dtype) for x in (q, k, v)) + (beta, g, S0)
    kfn, cfn = channel_pair(interpret, (0, 9, 30, 40), block_sizes=BlockSizes(block_v_gpu=32))
    compare(kfn, cfn, args, f"{dtype.__name__} KDA {interpret}", rel=rel,
            xargs=tuple(jnp.asarray(x, jnp.float64) for x in args))


def _kda_export_cases():
    return [pytest.param(p, c, hd, packed, marks=[] if (hd, packed) == (48, True) else [pytest.mark.slow],
                         id=f"{hd}-{'packed' if packed else 'batch'}-{p}")
            for p, c in (("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call"))
            for hd, packed in ((48, True), (64, False), (128, False), (256, False), (256, True))]


@pytest.mark.parametrize("platform,call,head_dim,packed", _kda_export_cases())
def test_export_per_channel_gates(platform, call, head_dim, packed):
    """The per-channel kernels (forward, states sweep, reverse sweep) lower for Triton and Mosaic,
    bfloat16, tile and padded head dims, batched and packed."""
    def loss(q, k, v, beta, g, S0, *cu):
        o, S = kernel_dr(q, k, v, beta, log_decay=g, initial_state=S0, output_final_state=True,
                         cu_seqlens=cu[0] if cu else None)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)

    B, T, H, D = (1 if packed else 2), 150, 2, head_dim
    args = ([jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)] * 3 + [jax.ShapeDtypeStruct((B, T, H), jnp.float32),
            jax.ShapeDtypeStruct((B, T, H, D), jnp.float32), jax.ShapeDtypeStruct((3 if packed else B, H, D, D),
                                                                                  jnp.float32)])
    args += [jax.ShapeDtypeStruct((4,), jnp.int32)] if packed else []
    exp = export.export(jax.jit(jax.value_and_grad(loss, argnums=ARGNUMS)), platforms=[platform],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert exp.mlir_module().count(call) == 3  # forward, states sweep, reverse sweep
