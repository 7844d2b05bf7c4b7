"""Pallas linear-attention kernels, run in interpret mode on CPU.

Layers of truth: the float64 loop of docs/linear_attention.md (:func:`tttla_jax.reference.linear_attention_loop`)
and the XLA chunked form (``tt.linear_attention(impl="chunked")``, itself checked against the
loop in ``test_linear_attention.py``). Both backends' kernels are interpreted: the Triton-style
kernel (``interpret="gpu"``) and the Mosaic kernel (``interpret="tpu"``, i.e.
``pltpu.InterpretParams(uninitialized_memory="nan")`` so a read of uninitialised VMEM or
output memory poisons the result).

Tolerances (documented): float64 1e-10 absolute (O(1) inputs); float32 inputs 1e-4 relative to
the truth's max magnitude; bfloat16 inputs 3e-2 relative (operands are bf16, accumulation f32),
against the float64 chunked form evaluated on the same bf16-rounded inputs.

Shapes are tiny (interpret mode is slow); lowering for real backends is in
``test_kernels_lowering.py``.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.kernels import BlockSizes
from tttla_jax.kernels import delta_rule as kernel_dr
from tttla_jax.kernels import linear_attention as kernel_la
from tttla_jax.kernels import unsupported_reason
from tttla_jax.reference import linear_attention_loop

ARGNUMS = (0, 1, 2, 3, 4)  # q, k, v, log_decay, initial_state


def make_inputs(seed, B, T, H, K, V, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), dtype)
    g = jnp.asarray(-rng.uniform(0.0, 0.3, size=(B, T, H)), jnp.float32 if dtype != jnp.float64 else dtype)
    S0 = jnp.asarray(rng.normal(size=(B, H, K, V)), jnp.float32 if dtype != jnp.float64 else dtype)
    return q, k, v, g, S0


def loss_of(fn):
    """Scalar of outputs and final state with fixed generic cotangents."""
    def loss(q, k, v, g, S0):
        o, S = fn(q, k, v, g, S0)
        wo = jnp.sin(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape)).astype(jnp.float64)
        ws = jnp.cos(jnp.arange(S.size, dtype=jnp.float32).reshape(S.shape)).astype(jnp.float64)
        return jnp.sum(o.astype(jnp.float64) * wo) + jnp.sum(S.astype(jnp.float64) * ws)
    return loss


def eval_all(fn, args, jit=True):
    """``((o, S), (dq, dk, dv, dg, dS0))`` as float64 NumPy arrays (one compile for both)."""
    def with_aux(*a):
        out = fn(*a)
        return loss_of(lambda *_: out)(*a), out

    vg = jax.value_and_grad(with_aux, argnums=ARGNUMS, has_aux=True)
    if jit:
        vg = jax.jit(vg)
    (_, out), grads = vg(*args)
    to_np = lambda t: tuple(np.asarray(x, np.float64) for x in t)  # noqa: E731
    return to_np(out), to_np(grads)


def kernel(masking, C, interpret, **kw):
    def fn(q, k, v, g, S0):
        return kernel_la(q, k, v, log_decay=g, initial_state=S0, masking=masking, chunk_size=C,
                         output_final_state=True, interpret=interpret, **kw)
    return fn


def chunked(masking, C):
    def fn(q, k, v, g, S0):
        return tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, masking=masking, chunk_size=C,
                                   output_final_state=True, impl="chunked")
    return fn


def loop(masking, C):
    def fn(q, k, v, g, S0):
        return linear_attention_loop(q, k, v, log_decay=g, initial_state=S0, masking=masking, chunk_size=C)
    return fn


def assert_close(got, want, atol=0.0, rel=None, what=""):
    """chex comparison per named leaf: ``|got − want| ≤ tol`` with ``tol = atol`` or, with
    ``rel``, ``rel · max(1, max|want|)``."""
    names = ("o", "S") if len(got) == 2 else ("dq", "dk", "dv", "dg", "dS0")
    for name, x, y in zip(names, got, want):
        chex.assert_equal_shape((x, y), custom_message=f"{what}: {name}")
        tol = atol if rel is None else rel * max(1.0, float(np.max(np.abs(y))))
        chex.assert_trees_all_close(x, y, atol=tol, rtol=0, custom_message=f"{what}: {name}")


def assert_trees_close(a, b, atol, what=""):
    chex.assert_trees_all_equal_shapes(a, b)
    to64 = functools.partial(jax.tree_util.tree_map, lambda x: np.asarray(x, np.float64))
    chex.assert_trees_all_close(to64(a), to64(b), atol=atol, rtol=0, custom_message=what)


def to_f64(args):
    return tuple(jnp.asarray(x, jnp.float64) for x in args)


# float64 inputs against the loop: T = 21 with C = 16 (T not a multiple of the chunk), K != V,
# two value blocks on the Triton-style kernel (block_v_gpu = 16 < V = 32).
F64_SHAPE = dict(B=1, T=21, H=2, K=16, V=32)
F64_C = 16


@functools.lru_cache(maxsize=None)
def _loop_truth(masking):
    # jitted: eager op-by-op differentiation of the per-token loop cost more than compiling it
    args = make_inputs(0, **F64_SHAPE)
    return eval_all(loop(masking, F64_C), args)


@pytest.mark.parametrize("interpret", ["gpu", "tpu"])
@pytest.mark.parametrize("masking", ["causal", "chunk"])
def test_float64_matches_loop(masking, interpret):
    args = make_inputs(0, **F64_SHAPE)
    bs = BlockSizes(block_v_gpu=16)
    out, grads = eval_all(kernel(masking, F64_C if masking == "chunk" else 16, interpret, block_sizes=bs), args)
    out_r, grads_r = _loop_truth(masking)
    assert_close(out, out_r, atol=1e-10, what=f"{interpret} {masking} outputs")
    assert_close(grads, grads_r, atol=1e-10, what=f"{interpret} {masking} grads")


@pytest.mark.parametrize("T", [1, pytest.param(16, marks=pytest.mark.slow), pytest.param(17, marks=pytest.mark.slow)])
def test_float64_short_and_boundary_T(T):
    """T = 1, exactly one chunk, one chunk + 1 token; causal masking against the chunked form."""
    args = make_inputs(1, 1, T, 1, 16, 16)
    got = eval_all(kernel("causal", 16, "gpu"), args)
    want = eval_all(chunked("causal", 16), args)
    assert_close(got[0], want[0], atol=1e-10, what=f"T={T} outputs")
    assert_close(got[1], want[1], atol=1e-10, what=f"T={T} grads")


@pytest.mark.parametrize("interpret,masking", [
    ("gpu", "causal"), ("tpu", "chunk"),
    pytest.param("gpu", "chunk", marks=pytest.mark.slow), pytest.param("tpu", "causal", marks=pytest.mark.slow)])
def test_float32_head_dim_64(interpret, masking):
    """float32 inputs, K = V = 64, T = 45 (C = 16): against the float64 chunked form."""
    args = make_inputs(2, 1, 45, 2, 64, 64, jnp.float32)
    out, grads = eval_all(kernel(masking, 16, interpret), args)
    o, S = jax.eval_shape(kernel(masking, 16, interpret), *args)
    assert o.dtype == jnp.float32 and S.dtype == jnp.float32
    out_r, grads_r = eval_all(chunked(masking, 16), to_f64(args))
    assert_close(out, out_r, rel=1e-4, what=f"f32 {interpret} {masking} outputs")
    assert_close(grads, grads_r, rel=1e-4, what=f"f32 {interpret} {masking} grads")


@pytest.mark.slow
def test_float32_tpu_two_value_blocks():
    """Mosaic kernel with V = 256 split into two 128-wide value blocks (dK summed over blocks)."""
    args = make_inputs(3, 1, 20, 1, 16, 256, jnp.float32)
    fn = kernel("chunk", 16, "tpu", block_sizes=BlockSizes(block_v_tpu=128))
    out, grads = eval_all(fn, args)
    out_r, grads_r = eval_all(chunked("chunk", 16), to_f64(args))
    assert_close(out, out_r, rel=1e-4, what="tpu 2 value blocks outputs")
    assert_close(grads, grads_r, rel=1e-4, what="tpu 2 value blocks grads")


@pytest.mark.parametrize("interpret,masking", [
    ("gpu", "chunk"), ("tpu", "causal"),
    pytest.param("gpu", "causal", marks=pytest.mark.slow), pytest.param("tpu", "chunk", marks=pytest.mark.slow)])
def test_bfloat16(interpret, masking):
    args = make_inputs(4, 1, 40, 2, 64, 64, jnp.bfloat16)
    o, S = jax.eval_shape(kernel(masking, 16, interpret), *args)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    out, grads = eval_all(kernel(masking, 16, interpret), args)
    out_r, grads_r = eval_all(chunked(masking, 16), to_f64(args))
    assert_close(out, out_r, rel=3e-2, what=f"bf16 {interpret} {masking} outputs")
    assert_close(grads, grads_r, rel=3e-2, what=f"bf16 {interpret} {masking} grads")


def test_no_decay_no_initial_state():
    """Optional arguments absent: gradients w.r.t. q, k, v only; S_T still returned."""
    q, k, v, _, _ = make_inputs(5, 1, 19, 2, 16, 16)

    def kfn(q, k, v):
        return kernel_la(q, k, v, masking="causal", chunk_size=16, output_final_state=True, interpret="gpu")

    def cfn(q, k, v):
        return tt.linear_attention(q, k, v, masking="causal", chunk_size=16, output_final_state=True, impl="chunked")

    def val_grad(fn):
        def loss(q, k, v):
            o, S = fn(q, k, v)
            return jnp.sum(jnp.sin(o)) + jnp.sum(S ** 2), (o, S)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    (_, out_k), g_k = val_grad(kfn)(q, k, v)
    (_, out_c), g_c = val_grad(cfn)(q, k, v)
    assert_trees_close(out_k + g_k, out_c + g_c, 1e-10, what="kernel vs chunked")
    o, S = jax.eval_shape(lambda q, k, v: kernel_la(q, k, v, chunk_size=16, interpret="gpu"), q, k, v)
    assert S is None and o.shape == (1, 19, 2, 16)


def test_vmap_and_checkpoint():
    """vmap over an extra leading axis, and jax.checkpoint around the kernel under grad."""
    args = make_inputs(6, 1, 12, 1, 16, 16)
    stacked = tuple(jnp.stack([x, 0.5 * x]) for x in args)
    o_v, S_v = jax.jit(jax.vmap(kernel("causal", 16, "gpu")))(*stacked)
    o_c, S_c = jax.jit(jax.vmap(chunked("causal", 16)))(*stacked)
    assert_trees_close((o_v, S_v), (o_c, S_c), 1e-10, what="vmap")
    g_ckpt = jax.jit(jax.grad(loss_of(jax.checkpoint(kernel("causal", 16, "gpu"))), argnums=ARGNUMS))(*args)
    g_ref = jax.jit(jax.grad(loss_of(chunked("causal", 16)), argnums=ARGNUMS))(*args)
    assert_trees_close(g_ckpt, g_ref, 1e-10, what="checkpoint grads")


def test_public_dispatch_impl_pallas_and_auto():
    """tt.linear_attention(impl="pallas") reaches the kernel (platform-chosen: interpret on CPU)."""
    q, k, v, g, S0 = make_inputs(7, 1, 10, 1, 16, 16, jnp.float32)
    o, S = tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, output_final_state=True,
                               chunk_size=16, impl="pallas")
    o_c, S_c = tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, output_final_state=True,
                                   chunk_size=16, impl="chunked")
    assert_trees_close((o, S), (o_c, S_c), 1e-4, what="pallas vs chunked float32")
    # float64 without an explicit interpret flag: the platform-chosen (CPU: interpreted) kernel.
    q64, k64, v64, g64, S64 = make_inputs(7, 1, 5, 1, 16, 16)
    o64, S64_T = tt.linear_attention(q64, k64, v64, log_decay=g64, initial_state=S64, output_final_state=True,
                                     impl="pallas")
    o64_c, S64_c = tt.linear_attention(q64, k64, v64, log_decay=g64, initial_state=S64, output_final_state=True,
                                       impl="chunked")
    assert_trees_close((o64, S64_T), (o64_c, S64_c), 1e-12, what="pallas vs chunked float64")
    # CPU host: auto never picks the kernel (the XLA chunked form is the fast path here).
    assert not tt.impl.on_accelerator()
    for masking in ("causal", "none"):
        reasons = tt.ops.linear_attention_impl_reasons(q, k, v, masking=masking)
        assert "not a GPU/TPU" in reasons["pallas"] and reasons["chunked"] is None


def test_unsupported_reason_table():
    assert unsupported_reason(jnp.bfloat16, "causal", 64, 128) is None
    assert unsupported_reason(jnp.float32, "chunk", 256, 256, 64) is None
    assert "masking='none'" in unsupported_reason(jnp.float32, "none", 64, 64)
    assert unsupported_reason(jnp.float32, "causal", 96, 64) is None  # zero-padded to 128
    assert "K = 512" in unsupported_reason(jnp.float32, "causal", 512, 64)
    assert "V = 512" in unsupported_reason(jnp.float32, "causal", 64, 512)
    assert "float64" in unsupported_reason(jnp.float64, "causal", 64, 64)
    assert unsupported_reason(jnp.float64, "causal", 64, 64, interpret=True) is None
    assert "chunk_size = 48" in unsupported_reason(jnp.float32, "chunk", 64, 64, 48)


@pytest.mark.parametrize(
    "kwargs,shapes,match",
    [
        (dict(masking="none"), (16, 16), r"impl='pallas': masking='none' is not supported"),
        (dict(), (300, 16), r"head dim K = 300 is not supported"),
        (dict(), (16, 512), r"head dim V = 512 is not supported"),
        (dict(masking="chunk", chunk_size=24), (16, 16), r"chunk_size = 24 is not supported"),
        (dict(block_sizes=BlockSizes(block_v_tpu=96)), (16, 256), r"block_v_tpu: expected V = 256"),
        (dict(interpret="cuda"), (16, 16), r"interpret: expected None, True"),
    ],
)
def test_bad_inputs_fail_loudly(kwargs, shapes, match):
    K, V = shapes
    q, k, v, _, _ = make_inputs(8, 1, 4, 1, K, V, jnp.float32)
    with pytest.raises(ValueError, match=match):
        kernel_la(q, k, v, **kwargs)


def test_bad_shapes_and_block_sizes():
    q, k, v, g, S0 = make_inputs(9, 1, 4, 2, 16, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"log_decay: expected shape \[B, T, H\] = \(1, 4, 2\), got \(1, 4\)"):
        kernel_la(q, k, v, log_decay=g[..., 0])
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[B, H, K, V\]"):
        kernel_la(q, k, v, initial_state=S0[0])
    with pytest.raises(ValueError, match=r"k: expected shape"):
        kernel_la(q, k[:, :3], v)
    with pytest.raises(ValueError, match=r"q, k, v: expected one dtype"):
        kernel_la(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match=r"BlockSizes.block_v_gpu: expected a power of two, got 48"):
        BlockSizes(block_v_gpu=48)
    with pytest.raises(ValueError, match=r"BlockSizes.num_warps: expected a positive int, got 0"):
        BlockSizes(num_warps=0)
    with pytest.raises(ValueError, match=r"BlockSizes.block_v_gpu: 32 does not divide V = 48"):
        BlockSizes(block_v_gpu=32).gpu(64, 48)
    with pytest.raises(dataclasses_frozen_error()):
        BlockSizes().num_warps = 2  # frozen


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_float64_needs_interpret_off_cpu(monkeypatch):
    """float64 has no compiled kernel: on a GPU/TPU host an explicit impl='pallas' refuses it."""
    import tttla_jax.impl
    import tttla_jax.kernels.linear_attention_kernel as mod

    q, k, v, _, _ = make_inputs(10, 1, 4, 1, 16, 16)
    monkeypatch.setattr(tttla_jax.impl, "platform", lambda: "gpu")
    with pytest.raises(ValueError, match=r"dtype float64 is not supported"):
        mod.linear_attention(q, k, v)


# --------------------------------------------------------------------------- from the public ops


def test_block_sizes_and_interpret_reach_the_kernel_from_the_ops():
    """tt.linear_attention / tt.delta_rule(impl="pallas", block_sizes=..., interpret=...) run the
    kernel with exactly those settings (same numbers as calling it directly; the kernel's own
    validation of both arguments fires from the op); with impl="auto", interpret= lets auto
    pick the kernel on a CPU host."""
    q, k, v, g, S0 = make_inputs(11, 1, 12, 1, 16, 32, jnp.float32)
    beta = jnp.full(g.shape, 0.5, jnp.float32)
    bs = BlockSizes(block_v_gpu=16)
    kw = dict(log_decay=g, initial_state=S0, output_final_state=True, chunk_size=16)
    for op, kern, extra in ((tt.linear_attention, kernel_la, ()), (tt.delta_rule, kernel_dr, (beta,))):
        direct = kern(q, k, v, *extra, block_sizes=bs, interpret="gpu", **kw)
        for impl in ("pallas", "auto"):
            via_op = op(q, k, v, *extra, impl=impl, block_sizes=bs, interpret="gpu", **kw)
            assert_trees_close(via_op, direct, 0.0, what=f"{op.__name__} impl={impl}")
        with pytest.raises(ValueError, match=r"BlockSizes.block_v_tpu: expected V = 32 or a multiple of 128"):
            op(q, k, v, *extra, impl="pallas", block_sizes=BlockSizes(block_v_tpu=48), **kw)
        with pytest.raises(ValueError, match=r"interpret: expected None, True, 'gpu', 'tpu'"):
            op(q, k, v, *extra, impl="pallas", interpret="cuda", **kw)
        with pytest.raises(ValueError, match=r"block_sizes: expected a tttla_jax.kernels.BlockSizes or None"):
            op(q, k, v, *extra, impl="pallas", block_sizes=dict(block_v_gpu=16), **kw)


def test_block_sizes_accept_numpy_ints():
    assert BlockSizes(block_v_gpu=np.int64(32), num_warps=jnp.int32(4)) == BlockSizes(block_v_gpu=32, num_warps=4)
    with pytest.raises(ValueError, match=r"BlockSizes.num_warps: expected a positive int, got 4.0"):
        BlockSizes(num_warps=4.0)


@pytest.mark.parametrize("op", ["tt.linear_attention", "kernels.linear_attention", "tt.delta_rule",
                                "kernels.delta_rule"])
@pytest.mark.parametrize("change,match", [
    (dict(k=(1, 5, 1, 16)), r"k: expected shape \[B, T, H, K\] \(from q\) = \(1, 4, 1, 16\), got \(1, 5, 1, 16\)"),
    (dict(v=(1, 4, 2, 16)), r"v: expected shape \[B, T, H, V\] with \(B, T, H\) = \(1, 4, 1\) \(from q\), got \(1, 4, 2, 16\)"),
    (dict(q=(1, 4, 16)), r"q: expected a rank-4 array with layout \[B, T, H, D\], got shape \(1, 4, 16\)"),
    (dict(log_decay=(1, 4)), r"log_decay: expected shape \[B, T, H\] = \(1, 4, 1\).*got \(1, 4\)"),
    (dict(initial_state=(1, 16, 16)), r"initial_state: expected shape \[B, H, K, V\] = \(1, 1, 16, 16\), got \(1, 16, 16\)"),
    (dict(chunk_size=0), r"chunk_size: expected a positive int, got 0"),
    (dict(scale="1"), r"scale: expected a real scalar"),
])
def test_one_input_contract_for_ops_and_kernels(op, change, match):
    """The ops and the kernel wrappers validate the token tensors and scalars with the same
    checks (tttla_jax._checks.check_qkv and friends), so they fail with the same message."""
    shapes = dict(q=(1, 4, 1, 16), k=(1, 4, 1, 16), v=(1, 4, 1, 16))
    kw = {}
    for name, val in change.items():
        if name in shapes:
            shapes[name] = val
        elif name in ("log_decay", "initial_state"):
            kw[name] = jnp.zeros(val, jnp.float32)
        else:
            kw[name] = val
    q, k, v = (jnp.zeros(shapes[n], jnp.float32) for n in ("q", "k", "v"))
    fn = {"tt.linear_attention": tt.linear_attention, "kernels.linear_attention": kernel_la,
          "tt.delta_rule": tt.delta_rule, "kernels.delta_rule": kernel_dr}[op]
    extra = (jnp.zeros((1, 4, 1), jnp.float32),) if "delta" in op else ()
    if "tt." in op:
        kw["impl"] = "pallas"
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, *extra, **kw)


def test_traced_scale_is_folded_into_the_queries():
    """A scale traced under jit (not a static kernel parameter) gives the concrete scale's
    outputs, for both kernels, and its gradient (o is linear in the scale)."""
    q, k, v, g, S0 = make_inputs(12, 1, 10, 1, 16, 16)
    beta = jnp.full(g.shape, 0.5)
    for fn in (lambda s: kernel_la(q, k, v, scale=s, log_decay=g, interpret="gpu")[0],
               lambda s: kernel_dr(q, k, v, beta, scale=s, log_decay=g, interpret="gpu")[0]):
        total = lambda s, fn=fn: jnp.sum(fn(s))  # noqa: E731
        val, d = jax.jit(jax.value_and_grad(total))(jnp.float64(0.3))
        assert_trees_close((val, d), (total(0.3), total(0.3) / 0.3), 1e-10, what="traced scale")


# --------------------------------------------------------------------------- any head dim, packed sequences


def packed_inputs(seed, T, H, K, V, N, dtype=jnp.float64):
    q, k, v, g, _ = make_inputs(seed, 1, T, H, K, V, dtype)
    S0 = jnp.asarray(np.random.default_rng(seed + 100).normal(size=(N, H, K, V)), g.dtype)
    return q, k, v, g, S0


def packed_pair(masking, C, interpret, cu, **kw):
    """(kernel, chunked form) on the same packed call."""
    cu = jnp.asarray(cu, jnp.int32)
    common = dict(masking=masking, chunk_size=C, output_final_state=True, cu_seqlens=cu)

    def kfn(q, k, v, g, S0):
        return kernel_la(q, k, v, log_decay=g, initial_state=S0, interpret=interpret, **common, **kw)

    def cfn(q, k, v, g, S0):
        return tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, impl="chunked", **common)

    return kfn, cfn


# (interpret, masking, K, V, cu_seqlens): head dims between the tiles (zero-padded inside the
# wrapper) and packed sequences with an empty one, one shorter than a chunk, one spanning chunks.
ODD_CASES = [
    # slow since the per-channel default case (gpu, causal, K = 48 padded, packed with an empty
    # sequence) covers the same Triton packed path; the Mosaic packed + padded case stays default
    pytest.param("gpu", "causal", 48, 96, (0, 5, 5, 21), marks=pytest.mark.slow),
    ("tpu", "chunk", 200, 32, (0, 17, 21)),
    pytest.param("gpu", "chunk", 32, 200, (0, 3, 20, 21, 21), marks=pytest.mark.slow),
    pytest.param("tpu", "causal", 96, 48, (0, 21), marks=pytest.mark.slow),
    pytest.param("gpu", "causal", 200, 200, None, marks=pytest.mark.slow),
    pytest.param("tpu", "chunk", 48, 32, None, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("interpret,masking,K,V,cu", ODD_CASES)
def test_float64_any_head_dim_and_packed(interpret, masking, K, V, cu):
    """float64, 1e-10: the kernel (padded head dims; re-chunked packed sequences with resets
    in the kernel, forward and backward) against the XLA chunked form on the same call;
    outputs, per-sequence final states and every gradient (incl. log_decay, h0)."""
    N = 1 if cu is None else len(cu) - 1
    args = packed_inputs(20 + K + V, 21, 2, K, V, N)
    if cu is None:
        kfn, cfn = kernel(masking, 16, interpret), chunked(masking, 16)
    else:
        kfn, cfn = packed_pair(masking, 16, interpret, cu)
    got, want = eval_all(kfn, args), eval_all(cfn, args)
    assert_close(got[0], want[0], atol=1e-10, what=f"{interpret} {masking} K={K} V={V} cu={cu} outputs")
    assert_close(got[1], want[1], atol=1e-10, what=f"{interpret} {masking} K={K} V={V} cu={cu} grads")


@pytest.mark.slow
def test_float32_packed_two_value_blocks_and_cuts():
    """float32 (1e-4 relative), packed, two value blocks on the Triton-style kernel, and a
    hard reset (log-decay −inf) inside a sequence: the cut and the sequence starts compose."""
    cu = (0, 9, 30, 40)
    q, k, v, g, S0 = packed_inputs(31, 40, 1, 64, 64, 3, jnp.float32)
    g = g.at[0, 14, 0].set(-jnp.inf)
    kfn, cfn = packed_pair("causal", 16, "gpu", cu, block_sizes=BlockSizes(block_v_gpu=32))
    out, grads = eval_all(kfn, (q, k, v, g, S0))
    out_r, grads_r = eval_all(cfn, to_f64((q, k, v, g, S0)))
    assert_close(out, out_r, rel=1e-4, what="f32 packed outputs")
    assert_close(grads, grads_r, rel=1e-4, what="f32 packed grads")


def test_packed_and_padded_contract():
    """Packed: one state per sequence in and out, named errors; head dims out of range get the
    kernels' reasons; a per-channel log-decay is taken by both kernels."""
    q, k, v, g, S0 = packed_inputs(40, 6, 1, 16, 16, 2, jnp.float32)
    cu = jnp.asarray([0, 2, 6], jnp.int32)
    o, S = jax.eval_shape(lambda *a: kernel_la(*a[:3], log_decay=a[3], initial_state=a[4], cu_seqlens=cu,
                                               output_final_state=True, interpret="gpu"), q, k, v, g, S0)
    assert o.shape == (1, 6, 1, 16) and S.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[N, H, K, V\] \(one state per packed sequence.*\(2, 1, 16, 16\)"):
        kernel_la(q, k, v, initial_state=S0[:1], cu_seqlens=cu, interpret="gpu")
    with pytest.raises(ValueError, match=r"cu_seqlens: expected to start at 0 and end at T = 6"):
        kernel_la(q, k, v, cu_seqlens=jnp.asarray([0, 2, 5], jnp.int32), interpret="gpu")
    o, S = jax.eval_shape(lambda *a: kernel_dr(*a[:3], jax.nn.sigmoid(g), log_decay=a[3], initial_state=a[4],
                                               cu_seqlens=cu, output_final_state=True, interpret="gpu"),
                          q, k, v, jnp.zeros(q.shape, jnp.float32), S0)  # per-channel (KDA) taken
    assert o.shape == (1, 6, 1, 16) and S.shape == (2, 1, 16, 16)
    from tttla_jax.kernels import PER_CHANNEL_GATES, delta_rule_unsupported_reason
    assert PER_CHANNEL_GATES == ("linear_attention", "delta_rule")
    assert unsupported_reason(jnp.float32, "causal", 64, 64, per_channel_decay=True) is None
    assert delta_rule_unsupported_reason(jnp.float32, 64, 64, per_channel_decay=True) is None
    with pytest.raises(ValueError, match=r"log_decay: expected shape \[B, T, H\] = \(1, 6, 1\), got \(1, 6, 1, 8\); "
                                         r"or, one value per key channel, \[B, T, H, K\] = \(1, 6, 1, 16\)"):
        kernel_la(q, k, v, log_decay=jnp.zeros((1, 6, 1, 8), jnp.float32), interpret="gpu")
    assert unsupported_reason(jnp.float32, "causal", 48, 200) is None
    assert "K = 8 is not supported (expected 16 <= K <= 256" in unsupported_reason(jnp.float32, "causal", 8, 64)
    assert "V = 257" in unsupported_reason(jnp.float32, "causal", 64, 257)
    from tttla_jax.kernels import padded_dim
    assert [padded_dim(d) for d in (16, 17, 48, 96, 129, 200, 256)] == [16, 32, 64, 128, 256, 256, 256]


# --------------------------------------------------------------------------- per-channel gates (GLA)


def channel_inputs(seed, T, H, K, V, N, dtype=jnp.float64):
    """Packed-ready inputs with a per-channel log-decay ``[1, T, H, K]`` holding an ``-inf``
    channel entry, a ``-1e30`` entry, a ``-1e6`` entry (cuts of one channel only) and a whole
    ``-inf`` channel over a stretch of tokens."""
    q, k, v, _, S0 = packed_inputs(seed, T, H, K, V, N, dtype)
    rng = np.random.default_rng(seed + 7)
    g = -rng.uniform(0.0, 0.6, size=(1, T, H, K))
    g[0, 3, 0, 1] = -np.inf
    g[0, 9, H - 1, 2] = -1e30
    g[0, T - 2, 0, 0] = -1e6
    g[0, 5:12, 0, K - 1] = -np.inf
    return q, k, v, jnp.asarray(g, S0.dtype), S0


# (interpret, masking, K, V, cu_seqlens): K, V in {32, 48} (48 is zero-padded to 64), packed
# with an empty sequence, one shorter than a chunk and one spanning chunks; the default suite
# runs the first, the rest are slow.
CHANNEL_CASES = [
    ("gpu", "causal", 48, 32, (0, 5, 5, 21, 37)),
    pytest.param("tpu", "causal", 32, 48, (0, 5, 5, 21, 37), marks=pytest.mark.slow),
    pytest.param("tpu", "chunk", 48, 32, (0, 17, 37), marks=pytest.mark.slow),
    pytest.param("gpu", "chunk", 32, 48, (0, 3, 37, 37), marks=pytest.mark.slow),
    pytest.param("gpu", "causal", 32, 32, None, marks=pytest.mark.slow),
    pytest.param("tpu", "causal", 48, 48, None, marks=pytest.mark.slow),
    pytest.param("tpu", "chunk", 32, 32, None, marks=pytest.mark.slow),
    pytest.param("gpu", "chunk", 48, 48, None, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("interpret,masking,K,V,cu", CHANNEL_CASES)
def test_float64_per_channel_gates(interpret, masking, K, V, cu):
    """float64, 1e-10: the per-channel kernel (GLA: forward, dQ sweep, dK/dV sweep; per-channel
    cuts) against the XLA chunked form on the same call — outputs, final states and every
    gradient (q, k, v, the [B, T, H, K] log-decay, the initial states); the gradient at a cut
    is exactly 0."""
    N = 1 if cu is None else len(cu) - 1
    args = channel_inputs(50 + K + V, 37, 2, K, V, N)
    if cu is None:
        kfn, cfn = kernel(masking, 16, interpret), chunked(masking, 16)
    else:
        kfn, cfn = packed_pair(masking, 16, interpret, cu)
    got, want = eval_all(kfn, args), eval_all(cfn, args)
    what = f"per-channel {interpret} {masking} K={K} V={V} cu={cu}"
    assert_close(got[0], want[0], atol=1e-10, what=what + " outputs")
    assert_close(got[1], want[1], atol=1e-10, what=what + " grads")
    dg = got[1][3]
    assert np.all(dg[np.asarray(args[3]) <= -1e6] == 0.0) and np.all(np.isfinite(dg))


@pytest.mark.slow
@pytest.mark.parametrize("interpret", ["gpu", "tpu"])
def test_float64_per_channel_matches_loop(interpret):
    """The per-channel kernel against the float64 token loop (not only the chunked form), T not a
    multiple of the 16-token chunk, two value blocks on the Triton-style kernel."""
    args = channel_inputs(60, 21, 2, 32, 32, 1)
    bs = BlockSizes(block_v_gpu=16)
    got = eval_all(kernel("causal", 64, interpret, block_sizes=bs), args)
    want = eval_all(loop("causal", 64), args)
    assert_close(got[0], want[0], atol=1e-10, what=f"{interpret} per-channel vs loop outputs")
    assert_close(got[1], want[1], atol=1e-10, what=f"{interpret} per-channel vs loop grads")


@pytest.mark.slow
@pytest.mark.parametrize("interpret", ["gpu", "tpu"])
def test_float32_and_bfloat16_per_channel(interpret):
    """float32 inputs at 1e-4 and bfloat16 at 3e-2 relative (as the per-head kernel) against the
    float64 chunked form on the same (rounded) inputs, packed, two value blocks, per-channel cuts."""
    cu = (0, 9, 30, 40)
    for dtype, rel in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
        q, k, v, g, S0 = channel_inputs(70, 40, 1, 64, 64, 3, jnp.float32)
        q, k, v = (x.astype(dtype) for x in (q, k, v))
        bs = BlockSizes(block_v_gpu=32)
        kfn, cfn = packed_pair("causal", 16, interpret, cu, block_sizes=bs)
        out, grads = eval_all(kfn, (q, k, v, g, S0))
        out_r, grads_r = eval_all(cfn, to_f64((q, k, v, g, S0)))
        assert_close(out, out_r, rel=rel, what=f"{dtype.__name__} per-channel outputs")
        assert_close(grads, grads_r, rel=rel, what=f"{dtype.__name__} per-channel grads")
