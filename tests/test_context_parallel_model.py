"""Sequence (context) parallelism at the layer, model and training level
(tttla_jax.parallel.context, nn.Mixer / LanguageModel under sequence_parallel, train --mesh ...,seq=S).

Every sharded run is compared with the single-device run in float64 at 1e-10: outputs,
final caches and gradients w.r.t. the input and every parameter, with T not a multiple of
the number of sequence devices (padded at the end). The multi-device checks run in ONE
subprocess per group with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (it must
be set before jax is imported); compilation dominates, so everything here that runs devices
is ``@slow`` (the language model with an associative layer whose conv halo spans devices and a
pipelined layer on a data x seq mesh, single mixers, every registered mixer at seq = 2, 4, 8
and the training CLI, also with packed documents); the default suite covers the language model
under sequence parallelism with packed documents (tests/test_context_parallel_packed.py, the
same layers on the same mesh) and keeps the error checks here.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from _devices import device_env, run_checks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-10


_env = device_env


CHECKS = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec as P
    from tttla_jax.nn import MIXERS, LanguageModel, LMConfig
    from tttla_jax.parallel import sequence_parallel, sequence_parallel_form, sharded_mixer
    F64 = jnp.float64
    assert jax.device_count() == 8

    def mesh_of(data, seq):
        devs = np.asarray(jax.devices()[: data * seq]).reshape(data, seq)
        return Mesh(devs, ("data", "seq"))

    # diff(a, b), weights(shape, seed): tests/_devices.py CHECK_HELPERS

    def float_leaves(c):
        return [v for v in jax.tree.leaves(c) if jnp.issubdtype(v.dtype, jnp.floating)]

    def check_mixer(name, opts, seq, data, T):
        B, W = 2, 8
        m = MIXERS[name](width=W, num_heads=2, dtype=F64, param_dtype=F64, rngs=nnx.Rngs(0), **opts)
        form = sequence_parallel_form(m)
        gd, st = nnx.split(m)
        x = jax.random.normal(jax.random.key(1), (B, T, W), F64)
        pre = jax.random.normal(jax.random.key(2), (B, 3, W), F64)
        _, c0 = m(pre)                                    # a non-trivial start cache
        mesh = mesh_of(data, seq)
        baxes = "data" if data > 1 else None
        w = weights((B, T, W))
        with_y = lambda f: lambda st, x, c: (lambda y: (jnp.sum(y * w), y))(f(st, x, c))
        ref = with_y(lambda st, x, c: nnx.merge(gd, st)(x, cache=c)[0])
        sp = with_y(lambda st, x, c: sharded_mixer(nnx.merge(gd, st), x, mesh=mesh, cache=c, batch_axes=baxes))
        (l0, y0), g0 = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(st, x, c0)
        (l1, y1), g1 = jax.jit(jax.value_and_grad(sp, argnums=(0, 1), has_aux=True))(st, x, c0)
        # the final cache from inside shard_map (T a multiple of seq: no padding)
        Td = seq * (-(-T // seq))
        xd = jax.random.normal(jax.random.key(4), (B, Td, W), F64)
        spec = P(baxes, "seq")

        def inside(st, x, c):
            with sequence_parallel("seq"):
                return nnx.merge(gd, st)(x, cache=c)

        cspec = jax.tree.map(lambda a: P(baxes), c0)
        yd, cd = jax.jit(jax.shard_map(inside, mesh=mesh, in_specs=(P(), spec, cspec),
                                       out_specs=(spec, cspec)))(st, xd, c0)
        yr, cr = jax.jit(lambda st, x, c: nnx.merge(gd, st)(x, cache=c))(st, xd, c0)
        return {"form": form, "y": diff(y0, y1), "loss": abs(float(l0 - l1)), "grads": diff(g0, g1),
                "y_inside": diff(yr, yd), "cache": diff(cr, cd), "y_scale": float(jnp.max(jnp.abs(y0)))}

    def check_lm(mixers, seq, data, T, options=None):
        B = 2
        cfg = LMConfig(vocab_size=32, width=8, num_layers=len(mixers), num_heads=2, mixers=tuple(mixers),
                       mixer_options=options or ({"swa": {"window": 3}} if "swa" in mixers else ()),
                       dtype=F64, param_dtype=F64)
        model = LanguageModel(cfg, rngs=nnx.Rngs(0))
        gd, st = nnx.split(model)
        mesh = mesh_of(data, seq)
        baxes = "data" if data > 1 else None
        spec = P(baxes, "seq")
        tok = jax.random.randint(jax.random.key(5), (B, T), 0, 32)
        pad = -T % seq
        w = weights((B, T, 32))

        def inside(st, tok):
            with sequence_parallel("seq"):
                logits, cache = nnx.merge(gd, st)(tok)
            return logits, cache

        def sp_logits(st, tok):
            tp = jnp.pad(tok, [(0, 0), (0, pad)])
            cspec = jax.tree.map(lambda _: P(baxes), jax.eval_shape(lambda: nnx.merge(gd, st).init_cache(B)))
            out = jax.shard_map(inside, mesh=mesh, in_specs=(P(), spec), out_specs=(spec, cspec))(st, tp)
            return out[0][:, :T], out[1]

        ref = lambda st, tok: nnx.merge(gd, st)(tok)
        with_y = lambda f: lambda st: (lambda out: (jnp.sum(out[0] * w), out))(f(st, tok))
        (l0, (y0, c0)), g0 = jax.jit(jax.value_and_grad(with_y(ref), has_aux=True))(st)
        (l1, (y1, c1)), g1 = jax.jit(jax.value_and_grad(with_y(sp_logits), has_aux=True))(st)
        out = {"y": diff(y0, y1), "loss": abs(float(l0 - l1)), "grads": diff(g0, g1)}
        if pad == 0:  # the cache is the state after the last token
            out["cache"] = diff(c0, c1)
        return out

    results = {}
    for case in json.loads(sys.argv[1]):
        key = case.pop("id")
        kind = case.pop("kind")
        results[key] = check_mixer(**case) if kind == "mixer" else check_lm(**case)
        print("CASE", key, json.dumps(results[key]), flush=True)
    print("RESULT" + json.dumps(results))
''')


def _run_checks(cases, timeout=3000):
    return run_checks(CHECKS, cases, devices=8, timeout=timeout)


def _assert_equal_runs(res):
    for key, r in res.items():
        for what in ("y", "loss", "grads", "y_inside", "cache"):
            if what in r:
                assert r[what] <= TOL, (key, what, r)


DEFAULT_CASES = [
    # the language model: an associative layer whose short conv's halo (3 taps) spans two
    # devices (8 / 4 = 2 tokens each) and a pipelined one (sliding window 3 > a slice), RoPE
    # at global positions, batch also sharded (data=2); no padding, so the cache is compared
    dict(id="lm_seq4_data2", kind="lm", mixers=["linear_attention", "swa"], seq=4, data=2, T=8,
         options={"linear_attention": {"short_conv": 4, "chunk_size": 2}, "swa": {"window": 3}}),
]
# single mixers (final cache from inside shard_map, padding by sharded_mixer): @slow, with
# the every-mixer sweep (default-suite budget; the LM case covers both forms and the halo)
MIXER_CASES = [
    # pipelined: the sliding window (4) is longer than a device's slice (13 -> 16 / 4 = 4
    # tokens) plus one padded token; batch also sharded (data=2)
    dict(id="swa_seq4_data2", kind="mixer", name="swa", opts={"window": 5}, seq=4, data=2, T=13),
    # associative: the short conv's halo (3 taps) spans devices (16 / 8 = 2 tokens each)
    dict(id="delta_net_seq8", kind="mixer", name="delta_net", opts={"chunk_size": 2}, seq=8, data=1, T=13),
    # the language model at seq=2 with one padded token
    dict(id="lm_seq2_data2", kind="lm", mixers=["linear_attention", "swa"], seq=2, data=2, T=7),
]


@pytest.fixture(scope="module")
def default_results():
    return _run_checks([dict(c) for c in DEFAULT_CASES])


@pytest.mark.slow  # moved from the default suite, offsetting the packed LaCT case of test_context_parallel_combine
def test_sharded_model_equals_one_device(default_results):
    assert set(default_results) == {c["id"] for c in DEFAULT_CASES}
    assert "cache" in default_results["lm_seq4_data2"]
    _assert_equal_runs(default_results)


@pytest.mark.slow
def test_every_mixer_at_seq_2_4_8_equals_one_device():
    """Every registered mixer (its default options) at seq = 2, 4, 8, T = 13 (padded), and
    the single-mixer cases above."""
    from tttla_jax.nn import MIXERS
    cases = [dict(id=f"{name}_seq{s}", kind="mixer", name=name, opts={}, seq=s, data=1, T=13)
             for name in sorted(MIXERS) for s in (2, 4, 8)]
    cases += [dict(c) for c in MIXER_CASES]
    cases += [dict(id="lm_all_seq4", kind="lm", mixers=sorted(MIXERS), seq=4, data=2, T=9),
              dict(id="lm_all_seq8_nopad", kind="lm", mixers=sorted(MIXERS), seq=8, data=1, T=16)]
    res = _run_checks(cases, timeout=6000)
    assert set(res) == {c["id"] for c in cases}
    assert res["swa_seq4_data2"]["form"] == "pipelined" and res["delta_net_seq8"]["form"] == "associative"
    for key, r in res.items():
        assert r.get("y_scale", 1.0) > 1e-3, (key, r)  # outputs are not trivially zero
    _assert_equal_runs(res)


# --------------------------------------------------------------- the training CLI

TINY = dict(steps=6, width=32, num_layers=2, num_heads=2, seq_len=30, batch_size=4,
            mixers=["delta_net", "swa"], window=8, lr=1e-2, warmup_steps=2, log_every=1, eval_every=3,
            eval_batches=1, ckpt_every=2, keep=5, progress=False, plot=False, sample_tokens=0,
            pack_documents="false")
# with this seed a row of the 6 training steps holds a document boundary (~1 row in 100 does)
PACK_SEED = 8
# float32: the sharded runs sum in another order (measured: relative differences <= 6e-7)
RTOL = 2e-5


def _cli(run_dir, mesh, extra=(), **over):
    args = [sys.executable, "-m", "train", "--ckpt-dir", str(run_dir), "--mesh", mesh]
    for k, v in {**TINY, **over}.items():
        flag = "--" + k.replace("_", "-")
        args += [flag, *v] if isinstance(v, list) else [flag, str(v)]
    return args + list(extra)


def _losses(run_dir, key="loss", kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r[key] for r in recs if r["kind"] == kind]


@pytest.mark.slow
def test_train_cli_seq_meshes_match_one_device_and_resume_bitwise(tmp_path):
    """python -m train --mesh data=2,seq=4 and data=2,fsdp=2,seq=2 (8 host devices, T = 30
    not a multiple of the seq axis) give the single-device loss curve, also with
    --pack-documents true (data=2,seq=4; documents span devices); a data=2,seq=4 run
    killed with SIGKILL and resumed ends bitwise equal to the uninterrupted one."""
    from tttla_jax.train.checkpoint import load_final
    runs = {}
    for name, mesh, pack in [("one", "data=1", "false"), ("ds", "data=2,seq=4", "false"),
                             ("dfs", "data=2,fsdp=2,seq=2", "false"), ("one_pack", "data=1", "true"),
                             ("ds_pack", "data=2,seq=4", "true")]:
        over = dict(pack_documents=pack, seed=PACK_SEED) if pack == "true" else {}
        p = subprocess.run(_cli(tmp_path / name, mesh, **over), cwd=REPO, env=_env(8),
                           capture_output=True, text=True, timeout=1800)
        assert p.returncode == 0, p.stderr[-4000:]
        runs[name] = p.stdout
    assert "mesh: data=2, fsdp=1, seq=4 over 8 devices" in runs["ds"]
    assert "mesh: data=2, fsdp=2, seq=2 over 8 devices" in runs["dfs"]
    for ref, names in (("one", ("ds", "dfs")), ("one_pack", ("ds_pack",))):
        one = _losses(tmp_path / ref)
        assert len(one) == TINY["steps"] and one[-1] < one[0]
        for name in names:
            np.testing.assert_allclose(_losses(tmp_path / name), one, rtol=RTOL)
            np.testing.assert_allclose(_losses(tmp_path / name, "eval_loss", "eval"),
                                       _losses(tmp_path / ref, "eval_loss", "eval"), rtol=RTOL)
    # the packed runs are not vacuous: a training row holds two documents (boundary at byte
    # 20 of 30: on seq=4, 8 bytes a device, the first spans devices 0-2, the second 2-3)
    from tttla_jax.train import data as data_lib
    from tttla_jax.train.config import make_config
    cfg = make_config("lm-tiny", **{k: v for k, v in TINY.items() if k in ("steps", "seq_len", "batch_size")},
                      pack_documents=True, seed=PACK_SEED)
    it = iter(data_lib.train_loader(cfg))
    cus = np.concatenate([np.asarray(next(it)["cu_seqlens"]) for _ in range(TINY["steps"])])
    assert np.any((cus > 0) & (cus < TINY["seq_len"])), cus

    # kill -9 mid-run, then --resume: bitwise the uninterrupted data=2,seq=4 run
    d = tmp_path / "killed"
    proc = subprocess.Popen(_cli(d, "data=2,seq=4", ["--throttle", "1"]), cwd=REPO, env=_env(8),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while time.time() - t0 < 1800:
            ck = d / "ckpt"
            if ck.is_dir() and any(s.isdigit() for s in os.listdir(ck)):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before = sorted(int(s) for s in os.listdir(d / "ckpt") if s.isdigit())
    assert before and max(before) < TINY["steps"], before
    p = subprocess.run(_cli(d, "data=2,seq=4", ["--resume"]), cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"resumed from step {max(before)}" in p.stdout + p.stderr
    a, b = load_final(tmp_path / "ds")[1], load_final(d)[1]
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert _losses(d) == _losses(tmp_path / "ds")


# --------------------------------------------------------------- cheap in-process checks

def test_context_and_errors():
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tttla_jax.nn import DeltaNet, LinearAttention, SlidingWindowAttention
    from tttla_jax.parallel import (axis_size, mixer_apply, sequence_axis, sequence_parallel,
                                    sequence_parallel_form)
    assert sequence_axis() is None
    with sequence_parallel("seq"):
        assert sequence_axis() == "seq"
        with sequence_parallel(None):
            assert sequence_axis() is None
        assert sequence_axis() == "seq"
    assert sequence_axis() is None
    for bad in ("", 3, ("seq",)):
        with pytest.raises(ValueError, match="axis_name"):
            with sequence_parallel(bad):
                pass
    m = SlidingWindowAttention(width=8, num_heads=2, window=4, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 4, 8), jnp.float32)
    with pytest.raises(ValueError, match="sequence axis 'seq' is not bound"):
        with sequence_parallel("seq"):
            m(x)
    with pytest.raises(ValueError, match="no sequence axis"):
        mixer_apply(m, x)
    with pytest.raises(ValueError, match="not bound"):
        axis_size("seq")
    assert sequence_parallel_form(m) == "pipelined"
    assert sequence_parallel_form(LinearAttention(width=8, num_heads=2, rngs=nnx.Rngs(0))) == "associative"
    assert sequence_parallel_form(DeltaNet(width=8, num_heads=2, rngs=nnx.Rngs(0))) == "associative"
    # outside the context nothing changes
    y, _ = m(x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    del jax


def test_mesh_spec_with_seq_and_config_errors():
    from tttla_jax.train.config import make_config
    from tttla_jax.train.distributed import parse_mesh
    assert parse_mesh("data=2,seq=4") == {"data": 2, "seq": 4}
    assert parse_mesh("data=2,fsdp=2,seq=2") == {"data": 2, "fsdp": 2, "seq": 2}
    for bad in ("seq=0", "seq=2,seq=2", "sequence=2"):
        with pytest.raises(ValueError, match="mesh"):
            parse_mesh(bad)
    with pytest.raises(ValueError, match="mesh: a seq axis .* vit"):
        make_config("vit", mesh="seq=2")
    assert make_config("lm-tiny", mesh="data=1,seq=2", pack_documents=True).pack_documents  # packing composes
    assert make_config("lm-tiny", mesh="seq=2", pack_documents=False).mesh == "seq=2"
