"""The Pallas kernels lower for their real targets from a CPU host.

* ``jax.export`` for ``platforms=["cuda"]`` must contain the Triton custom calls (forward,
  dQ sweep, dK/dV sweep) and for ``["tpu"]`` the Mosaic custom calls, for every supported
  head dim and dtype, forward + backward — so the backend is chosen by the *lowering*
  platform, not by the host's default backend.
* Shapes that cannot compile are rejected at trace time with a clear message.
* With libtpu installed (the ``tpu-check`` extra), a full Mosaic compile for a v5e and a
  v6e topology description, in a subprocess (``JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1``);
  this is what catches VMEM overflows and unsupported Mosaic ops. Skips visibly otherwise.

Default suite: the export grid covers every (platform, dtype, head dim) triple with the two
maskings alternating, so every (platform, masking, dtype) and (platform, masking, head dim) pair is
lowered too; the full 2 x 2 x 3 x 3 product runs in the slow suite (``-m slow``).
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax import export

from tttla_jax.kernels import BlockSizes
from tttla_jax.kernels import linear_attention as kernel_la

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def fwd_bwd(masking, chunk_size=64, **kw):
    def loss(q, k, v, g, S0):
        o, S = kernel_la(q, k, v, log_decay=g, initial_state=S0, masking=masking, chunk_size=chunk_size,
                         output_final_state=True, **kw)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def specs(B, T, H, K, V, dtype):
    tok = lambda d: jax.ShapeDtypeStruct((B, T, H, d), dtype)  # noqa: E731
    return (tok(K), tok(K), tok(V), jax.ShapeDtypeStruct((B, T, H), jnp.float32),
            jax.ShapeDtypeStruct((B, H, K, V), jnp.float32))


def export_for(platform, fn, args):
    return export.export(fn, platforms=[platform],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)


PLATFORMS = [("cuda", TRITON_CALL, MOSAIC_CALL), ("tpu", MOSAIC_CALL, TRITON_CALL)]
HEAD_DIMS = [64, 128, 256]


def _export_cases():
    """Every (platform, dtype, head dim); the masking alternates over the dtype x head-dim grid
    (default suite), the other masking of each triple is in the slow suite."""
    cases = []
    for platform, call, other in PLATFORMS:
        for i, dtype in enumerate(DTYPES):
            for j, head_dim in enumerate(HEAD_DIMS):
                for m, masking in enumerate(("causal", "chunk")):
                    marks = [pytest.mark.slow] if (i + j + m) % 2 else []
                    cases.append(pytest.param(platform, call, other, dtype, head_dim, masking, marks=marks,
                                              id=f"{masking}-{head_dim}-{dtype}-{platform}"))
    return cases


@pytest.mark.parametrize("platform,call,other,dtype,head_dim,masking", _export_cases())
def test_export_forward_backward(platform, call, other, dtype, head_dim, masking):
    # T = 150 is not a multiple of the chunk: the padding is inside the wrapper.
    exp = export_for(platform, fwd_bwd(masking), specs(2, 150, 2, head_dim, head_dim, DTYPES[dtype]))
    text = exp.mlir_module()
    assert text.count(call) == 3, f"{platform}: expected forward, dQ and dK/dV kernels"
    assert other not in text
    assert len(exp.serialize()) > 0


# slow (default-suite budget, offsets the per-channel export and compile cases): custom
# BlockSizes stay covered by the default GPU chip-table exports and the v5p chip-table compile
@pytest.mark.slow
@pytest.mark.parametrize("platform,call", [("cuda", TRITON_CALL), ("tpu", MOSAIC_CALL)])
def test_export_mixed_head_dims_and_block_sizes(platform, call):
    fn = fwd_bwd("causal", chunk_size=128,
                 block_sizes=BlockSizes(block_v_gpu=32, block_v_tpu=128, num_warps=4, vmem_limit_bytes=64 << 20))
    text = export_for(platform, fn, specs(1, 300, 3, 64, 256, jnp.bfloat16)).mlir_module()
    assert text.count(call) == 3


def test_cpu_lowering_has_no_accelerator_kernel():
    """On CPU the same call lowers to the interpreted kernel (plain HLO, no custom call)."""
    text = export_for("cpu", fwd_bwd("causal"), specs(1, 20, 1, 64, 64, jnp.float32)).mlir_module()
    assert TRITON_CALL not in text and MOSAIC_CALL not in text


@pytest.mark.parametrize(
    "K,V,dtype,kw,match",
    [
        (512, 64, jnp.bfloat16, {}, r"head dim K = 512 is not supported"),
        (64, 8, jnp.float32, {}, r"head dim V = 8 is not supported"),
        (64, 64, jnp.float32, dict(masking="chunk", chunk_size=100), r"chunk_size = 100 is not supported"),
        (64, 64, jnp.int8, {}, r"q: expected a floating dtype"),
    ],
)
def test_uncompilable_shape_rejected_at_trace_time(K, V, dtype, kw, match):
    def f(q, k, v):
        return kernel_la(q, k, v, **kw)[0]

    args = specs(1, 64, 1, K, V, dtype)[:3]
    for platform in ("cuda", "tpu"):
        with pytest.raises(ValueError, match=match):
            export_for(platform, jax.jit(f), args)


def test_tpu_vmem_guard(monkeypatch):
    """The Mosaic wrapper refuses a call whose VMEM estimate exceeds the cap, before compiling."""
    import tttla_jax.kernels.linear_attention_kernel as mod

    monkeypatch.setattr(mod, "TPU_VMEM_CAP", 1 << 20)
    with pytest.raises(ValueError, match=r"TPU kernel: estimated VMEM .* MiB for K=256, block_v=256, chunk=256"):
        export_for("tpu", fwd_bwd("causal", chunk_size=256), specs(1, 256, 1, 256, 256, jnp.bfloat16))


# --------------------------------------------------------------------------- libtpu compile

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from tttla_jax.kernels import BlockSizes, chip_block_sizes, delta_rule, linear_attention as kla

    devs = {}
    for case in json.loads(sys.argv[1]):
        topo_name, dtype, K, V, kind, C, vmem, grad = case[:8]
        # optional extras: {"chip": a CHIP_TABLES key (its entry is the block sizes),
        # "packed": N (N packed sequences through cu_seqlens), "channel": a [B, T, H, K] log-decay}
        extra = case[8] if len(case) > 8 else {}
        # kind: the masking of the linear-attention kernel, or "delta": the delta-rule kernel
        # (beta rides in the log_decay slot's shape);
        # grad False: the forward only (value_and_grad otherwise)
        if topo_name not in devs:
            devs[topo_name] = topologies.get_topology_desc(topo_name, platform="tpu").devices[0]
        dev = devs[topo_name]
        sh = jax.sharding.SingleDeviceSharding(dev)
        dt = getattr(jnp, dtype)
        bs = BlockSizes(vmem_limit_bytes=vmem) if vmem else None
        if "chip" in extra:
            bs = chip_block_sizes(extra["chip"], K, V)
        Np = extra.get("packed")

        def loss(q, k, v, g, S0, *cu):
            kw = dict(log_decay=g, initial_state=S0, chunk_size=C, output_final_state=True, block_sizes=bs,
                      cu_seqlens=cu[0] if cu else None)
            if kind == "delta":  # beta from the log-decay slot (its first channel when per-channel)
                o, S = delta_rule(q, k, v, jax.nn.sigmoid(g if g.ndim == 3 else g[..., 0]), **kw)
            else:
                o, S = kla(q, k, v, masking=kind, **kw)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)

        B, T, H = (1 if Np else 2), 300, 2
        tok = lambda d, t=dt: jax.ShapeDtypeStruct((B, T, H, d), t, sharding=sh)
        gshape = (B, T, H, K) if extra.get("channel") else (B, T, H)  # "channel": per-channel log-decay
        args = (tok(K), tok(K), tok(V), jax.ShapeDtypeStruct(gshape, jnp.float32, sharding=sh),
                jax.ShapeDtypeStruct((Np or B, H, K, V), jnp.float32, sharding=sh))
        if Np:
            args += (jax.ShapeDtypeStruct((Np + 1,), jnp.int32, sharding=sh),)
        try:
            fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)) if grad else loss
            jax.jit(fn).trace(*args).lower().compile()
            res = dict(ok=True, kind=dev.device_kind)
        except Exception as e:  # reported to the test, which decides
            res = dict(ok=False, error=type(e).__name__ + ": " + str(e)[:400])
        print("RESULT " + json.dumps(dict(case=case, **res)), flush=True)
    """
)

# Default (CI) set: each topology, each dtype, each head dim and masking at least once, plus a
# negative control (a 256 KiB scoped-VMEM limit cannot hold a 256x256 float32 state: the
# Mosaic compiler must refuse it, so the check is known to be able to fail).
# The linear-attention cases compile forward + backward (three Mosaic kernels: forward, dQ,
# dK/dV); one delta-rule case compiles forward + backward (forward, states and reverse-sweep
# kernels), the other and the negative control the forward only (the forward's state alone
# overflows the control's VMEM). The slow sweeps compile every case with gradients.
_COMPILE_CASES = [
    ["v5e:2x2", "bfloat16", 128, 128, "causal", 64, None, True],
    ["v5e:2x2", "float16", 64, 64, "chunk", 64, None, True],
    ["v5e:2x2", "float32", 256, 256, "causal", 256, 256 * 1024, False],
    ["v6e:2x2", "bfloat16", 256, 256, "chunk", 128, None, True],
    ["v6e:2x2", "float32", 64, 128, "causal", 64, None, True],
    ["v5e:2x2", "bfloat16", 128, 128, "delta", 64, None, True],
    ["v6e:2x2", "float16", 256, 256, "delta", 64, None, False],
    # a per-chip table entry (v5p: two 128-wide value blocks), head dims between the tiles
    # (zero-padded) and packed sequences (scalar-prefetched chunk tables), forward + backward
    ["v5p:2x2x1", "bfloat16", 96, 200, "causal", 64, None, True, {"chip": "tpu_v5p", "packed": 3}],
    # per-channel log-decay [B, T, H, K] (GLA): forward, dQ and dK/dV kernels, packed
    ["v6e:2x2", "bfloat16", 128, 128, "causal", 64, None, True, {"channel": True, "packed": 2}],
]
# Every TPU entry of the per-chip tables (CHIP_TABLES), compiled on its chip, forward + backward
# of the linear-attention kernel (causal; chunk masking on odd K) and the delta rule forward.
TPU_TOPOLOGY = {"tpu_v5e": "v5e:2x2", "tpu_v5p": "v5p:2x2x1", "tpu_v6e": "v6e:2x2"}
_TABLE_SWEEP = [[topo, "bfloat16", K, K, kind, 64, None, True, {"chip": chip}]
                for chip, topo in TPU_TOPOLOGY.items() for K in (16, 32, 64, 128, 256)
                for kind in (("causal" if K % 64 else "chunk"), "delta")]
_TABLE_SWEEP += [[topo, "bfloat16", 48, 200, kind, 64, None, True, {"chip": chip, "packed": 4}]
                 for chip, topo in TPU_TOPOLOGY.items() for kind in ("chunk", "delta")]
# per-channel gates: every topology x dtype x head dim (tile and padded) x masking, forward + backward
_CHANNEL_SWEEP = [[t, d, hd, hd, m, 64, None, True, {"channel": True}] for t in ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")
                  for d in ("bfloat16", "float16", "float32") for hd in (48, 128, 256) for m in ("causal", "chunk")]
_CHANNEL_SWEEP += [[t, "bfloat16", 96, 200, m, 64, None, True, {"channel": True, "packed": 3, "chip": c}]
                   for t, c in (("v5e:2x2", "tpu_v5e"), ("v6e:2x2", "tpu_v6e")) for m in ("causal", "chunk")]
# the largest per-channel blocks: chunk masking with 256-token chunks, K = V = 256 ([C, K] decay columns)
_CHANNEL_SWEEP += [["v5e:2x2", "float32", 256, 256, "chunk", 256, None, True, {"channel": True}],
                   ["v5e:2x2", "bfloat16", 256, 256, "chunk", 256, None, True, {"channel": True, "packed": 2}]]
# the per-channel delta rule (Kimi Delta Attention): every topology x dtype x head dim (tile and
# padded), forward + backward, and packed with chip tables
_KDA_SWEEP = [[t, d, hd, hd, "delta", 64, None, True, {"channel": True}] for t in ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")
              for d in ("bfloat16", "float16", "float32") for hd in (48, 128, 256)]
_KDA_SWEEP += [[t, "bfloat16", 96, 200, "delta", 64, None, True, {"channel": True, "packed": 3, "chip": c}]
               for t, c in (("v5e:2x2", "tpu_v5e"), ("v6e:2x2", "tpu_v6e"))]
_FULL_SWEEP = [[t, d, hd, hd, m, 64, None, True] for t in ("v5e:2x2", "v6e:2x2")
               for d in ("bfloat16", "float16", "float32") for hd in (64, 128, 256) for m in ("causal", "chunk", "delta")]


def _run_tpu_compile(cases):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu-check]'): TPU compile check skipped")
    # ALLOW_MULTIPLE_LIBTPU_LOAD: the pytest process itself may hold libtpu's lockfile (jax
    # probes the TPU plugin at backend start-up when libtpu is installed).
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=1800)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(cases), f"compile subprocess failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return results


def _check(results):
    for r in results:
        topo, vmem = r["case"][0], r["case"][6]
        if vmem is None:
            assert r["ok"], f"TPU compile failed: {r}"
            assert topo[:2] in r["kind"].lower().replace(" ", "").replace("tpuv", "v"), r
        else:  # the negative control must be rejected by the Mosaic compiler (VMEM overflow)
            assert not r["ok"], f"expected a VMEM overflow for {r}"
            assert "vmem" in r["error"].lower() or "memory" in r["error"].lower(), r["error"]


def test_tpu_compile_v5e_v6e_with_libtpu():
    _check(_run_tpu_compile(_COMPILE_CASES))


@pytest.mark.slow
def test_tpu_compile_full_sweep_with_libtpu():
    _check(_run_tpu_compile(_FULL_SWEEP))


@pytest.mark.slow
def test_tpu_compile_per_channel_sweep_with_libtpu():
    _check(_run_tpu_compile(_CHANNEL_SWEEP))


@pytest.mark.slow
def test_tpu_compile_per_channel_delta_sweep_with_libtpu():
    _check(_run_tpu_compile(_KDA_SWEEP))


@pytest.mark.slow
def test_tpu_compile_every_chip_table_entry_with_libtpu():
    _check(_run_tpu_compile(_TABLE_SWEEP))


# --------------------------------------------------------------------------- per-chip tables, GPU


def _gpu_table_cases():
    """Every GPU entry of CHIP_TABLES (H100, H200 x padded K), exported for CUDA (Triton):
    one per chip in the default suite, the rest slow."""
    cases = []
    for chip in ("h100", "h200"):
        for K in (16, 32, 64, 128, 256):
            marks = [] if (chip, K) in (("h100", 128), ("h200", 256)) else [pytest.mark.slow]
            cases.append(pytest.param(chip, K, marks=marks, id=f"{chip}-{K}"))
    return cases


@pytest.mark.parametrize("chip,K", _gpu_table_cases())
def test_gpu_table_entry_lowers(chip, K):
    from tttla_jax.kernels import chip_block_sizes

    bs = chip_block_sizes(chip, K, K)
    text = export_for("cuda", fwd_bwd("causal", block_sizes=bs), specs(2, 150, 2, K, K, jnp.bfloat16)).mlir_module()
    assert text.count(TRITON_CALL) == 3


def test_chip_tables():
    """Every chip has an entry per tile; device kinds map to their table; entries are valid
    BlockSizes for every padded (K, V) (value blocks capped at V)."""
    from tttla_jax.kernels import CHIP_TABLES, chip_block_sizes, chip_name, padded_dim

    assert set(CHIP_TABLES) == {"h100", "h200", "tpu_v5e", "tpu_v5p", "tpu_v6e"}
    assert [chip_name(k) for k in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "TPU v5 lite", "TPU v5", "TPU v5p",
                                   "TPU v6 lite", "TPU v4", "cpu")] == [
        "h100", "h200", "tpu_v5e", "tpu_v5p", "tpu_v5p", "tpu_v6e", None, None]
    for chip, table in CHIP_TABLES.items():
        assert sorted(table) == [16, 32, 64, 128, 256]
        for K in (16, 48, 200, 256):
            for V in (16, 96, 256):
                bs = chip_block_sizes(chip, K, V)
                bs.gpu(padded_dim(K), padded_dim(V))
                bs.tpu(padded_dim(K), padded_dim(V))
    assert chip_block_sizes("tpu_v5e", 64, 256).block_v_tpu == 128
    assert chip_block_sizes("h100", 256, 256).gpu(256, 256) == (32, 8, 1)
    with pytest.raises(ValueError, match=r"chip: expected one of \('h100'"):
        chip_block_sizes("a100", 64, 64)


@pytest.mark.parametrize("platform,call", [("cuda", TRITON_CALL), ("tpu", MOSAIC_CALL)])
def test_export_packed_and_odd_head_dims(platform, call):
    """cu_seqlens and head dims between the tiles lower for both targets (forward + backward:
    three linear-attention kernels, three delta-rule kernels: forward, states, reverse)."""
    from tttla_jax.kernels import delta_rule as kernel_dr

    def loss(q, k, v, g, S0, cu):
        o, S = kernel_la(q, k, v, log_decay=g, initial_state=S0, masking="chunk", cu_seqlens=cu,
                         output_final_state=True)
        o2, S2 = kernel_dr(q, k, v, jax.nn.sigmoid(g), log_decay=g, initial_state=S0, cu_seqlens=cu,
                           output_final_state=True)
        # a per-channel log-decay [B, T, H, K] (GLA): its own forward, dQ and dK/dV kernels
        o3, S3 = kernel_la(q, k, v, log_decay=jnp.broadcast_to(g[..., None], q.shape), initial_state=S0,
                           cu_seqlens=cu, output_final_state=True)
        return (jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S) + jnp.sum(o2.astype(jnp.float32)) + jnp.sum(S2)
                + jnp.sum(o3.astype(jnp.float32)) + jnp.sum(S3))

    args = specs(1, 150, 2, 48, 200, jnp.bfloat16)[:4] + (
        jax.ShapeDtypeStruct((3, 2, 48, 200), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.int32))
    text = export_for(platform, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), args).mlir_module()
    assert text.count(call) == 9
    assert "tttla_linear_attention_packed_dq" in text  # the per-channel dQ sweep


def _channel_export_cases():
    return [pytest.param(p, c, d, hd, m, marks=[pytest.mark.slow], id=f"{m}-{hd}-{d}-{p}")
            for p, c, _ in PLATFORMS for d in DTYPES for hd in (48, 128, 256) for m in ("causal", "chunk")]


@pytest.mark.parametrize("platform,call,dtype,head_dim,masking", _channel_export_cases())
def test_export_per_channel_gates(platform, call, dtype, head_dim, masking):
    """The per-channel kernels (forward, dQ sweep, dK/dV sweep) lower for both targets, every
    dtype, tile and padded head dims, both maskings (the default suite exports one packed case
    in test_export_packed_and_odd_head_dims)."""
    def loss(q, k, v, g, S0):
        o, S = kernel_la(q, k, v, log_decay=g, initial_state=S0, masking=masking, output_final_state=True)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S)

    B, T, H = 2, 150, 2
    args = specs(B, T, H, head_dim, head_dim, DTYPES[dtype])
    args = args[:3] + (jax.ShapeDtypeStruct((B, T, H, head_dim), jnp.float32), args[4])
    text = export_for(platform, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), args).mlir_module()
    assert text.count(call) == 3
