"""The main training job (``python -m train``) at a tiny size: end to end, kill + resume
bitwise, corrupted checkpoints, unwritable directories, CLI errors, MQAR generator."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tttla_jax.train.checkpoint import CheckpointDirError, load_final
from tttla_jax.train.config import PRESETS, TrainConfig, make_config, parse_args
from tttla_jax.train.loop import WALL_CLOCK_FIELDS, read_metrics, run
from tttla_jax.train.mqar import mqar_batch, mqar_example

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 2 layers, width 32, seq 64, batch 8, 30 steps: a few seconds of compute.
TINY = dict(steps=30, width=32, num_layers=2, num_heads=2, seq_len=64, batch_size=8,
            mixers=("delta_net", "swa"), window=16, chunk_size=16, lr=1e-2, warmup_steps=5,
            log_every=1, eval_every=15, eval_batches=2, ckpt_every=10, keep=3,
            progress=False, plot=False)


def tiny(ckpt_dir, **kw):
    return make_config("lm-tiny", **dict(TINY, ckpt_dir=str(ckpt_dir), **kw))


def strip_clock(records):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run: the bitwise reference of the resume tests."""
    d = tmp_path_factory.mktemp("ref")
    logs = []
    summary = run(tiny(d, sample_tokens=8), log=logs.append)
    return d, summary, logs


def test_end_to_end_tiny_run(reference):
    d, summary, logs = reference
    recs = read_metrics(os.path.join(d, "metrics.jsonl"))
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert [r["step"] for r in evals] == [15, 30]
    first, last = np.mean([r["loss"] for r in train[:3]]), np.mean([r["loss"] for r in train[-3:]])
    assert last < first - 0.5, (first, last)          # ~5.5 nats at init (uniform over 256 bytes)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(np.isfinite(r["grad_norm"]) for r in train)
    assert train[0]["lr"] == 0.0 and all(r["lr"] > 0 for r in train[1:])  # linear warm-up from 0
    assert summary["checkpoints"] == [10, 20, 30]
    step, leaves, meta = load_final(d)
    assert step == 30 and meta["step"] == 30 and meta["config"]["width"] == 32
    assert json.loads(meta["data_state"])  # grain iterator state is in the checkpoint
    assert isinstance(summary["sample"], str) and len(summary["sample"]) > len("The ")
    assert any("perplexity" in line for line in logs)


def _poll_metrics(path, min_step, proc, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = [r["step"] for r in read_metrics(path) if r.get("kind") == "train"]
        if steps and steps[-1] >= min_step:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"training subprocess ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("training subprocess made no progress in time")


def test_sigkill_mid_training_then_resume_is_bitwise_identical(reference, tmp_path):
    ref_dir, _, _ = reference
    d = tmp_path / "killed"
    args = [sys.executable, "-m", "train"]
    for k, v in TINY.items():
        flag = "--" + k.replace("_", "-")
        args += [flag, *v] if isinstance(v, tuple) else [flag, str(v)]
    args += ["--ckpt-dir", str(d), "--sample-tokens", "0", "--throttle", "0.2"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        killed_at = _poll_metrics(os.path.join(d, "metrics.jsonl"), 13, proc, timeout=600)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < 30
    before = sorted(int(s) for s in os.listdir(d / "ckpt") if s.isdigit())
    assert before and max(before) < 30, before

    logs = []
    summary = run(tiny(d, resume=True, sample_tokens=0), log=logs.append)
    assert summary["start_step"] == max(before)
    assert any(f"resumed from step {max(before)}" in line for line in logs)
    _, ref_leaves, _ = load_final(ref_dir)
    _, leaves, _ = load_final(d)
    assert len(leaves) == len(ref_leaves)
    for a, b in zip(leaves, ref_leaves):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)  # bitwise: same parameters, optimiser state, RNG
    assert strip_clock(read_metrics(d / "metrics.jsonl")) == strip_clock(
        read_metrics(ref_dir / "metrics.jsonl"))


@pytest.mark.parametrize("how", ["overwrite_array_bytes", "truncate_array_file"])
def test_corrupted_latest_checkpoint_resumes_from_previous(reference, tmp_path, how):
    ref_dir, _, _ = reference
    d = tmp_path / "run"
    shutil.copytree(ref_dir, d)
    files = [os.path.join(r, f) for r, _, fs in os.walk(d / "ckpt" / "30" / "arrays") for f in fs]
    target = max(files, key=os.path.getsize)  # the array data
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        if how == "overwrite_array_bytes":
            f.seek(size // 2)
            f.write(bytes(range(256))[: min(64, size - size // 2)])
        else:
            f.truncate(size // 3)
    logs = []
    summary = run(tiny(d, resume=True, sample_tokens=0), log=logs.append)
    bad = [line for line in logs if "CORRUPTED CHECKPOINT" in line]
    assert len(bad) == 1 and "step 30" in bad[0], logs
    assert summary["start_step"] == 20
    assert os.listdir(d / "ckpt_corrupt")  # kept for inspection, not deleted
    _, ref_leaves, _ = load_final(ref_dir)
    _, leaves, _ = load_final(d)
    assert all(np.array_equal(a, b) for a, b in zip(leaves, ref_leaves))
    assert strip_clock(read_metrics(d / "metrics.jsonl")) == strip_clock(
        read_metrics(ref_dir / "metrics.jsonl"))


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = blocker / "run"
    t0 = time.time()
    with pytest.raises(CheckpointDirError, match="not writable.*--ckpt-dir"):
        run(tiny(bad))
    from tttla_jax.train.__main__ import main
    assert main(["--ckpt-dir", str(bad), "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and str(bad) in err
    assert time.time() - t0 < 60


def test_existing_checkpoints_without_resume_is_an_error(reference):
    d, _, _ = reference
    with pytest.raises(SystemExit, match="already holds checkpoints.*--resume"):
        run(tiny(d))


def test_repeated_default_runs_get_fresh_directories(tmp_path, monkeypatch):
    """Without --ckpt-dir, running the README command twice just works: the second run
    goes to runs/<preset>-2; --resume continues the most recent one."""
    from tttla_jax.train.loop import resolve_run_dir
    monkeypatch.chdir(tmp_path)
    cfg = make_config("lm-tiny")
    notes = []
    assert resolve_run_dir(cfg, notes.append) == "runs/lm-tiny" and not notes
    os.makedirs("runs/lm-tiny/ckpt/400")
    assert resolve_run_dir(cfg, notes.append) == "runs/lm-tiny-2"
    assert "runs/lm-tiny holds an earlier run" in notes[0] and "runs/lm-tiny-2" in notes[0]
    os.makedirs("runs/lm-tiny-2/ckpt/100")
    assert resolve_run_dir(cfg, notes.append) == "runs/lm-tiny-3"
    assert resolve_run_dir(make_config("lm-tiny", resume=True)) == "runs/lm-tiny-2"
    explicit = make_config("lm-tiny", ckpt_dir="runs/lm-tiny")
    assert resolve_run_dir(explicit) == "runs/lm-tiny"   # explicit: --resume or an error


def test_cli_overrides_and_errors(capsys):
    cfg = parse_args(["--steps", "200", "--lr", "3e-3", "--mixers", "delta_net"])
    assert cfg.steps == 200 and cfg.lr == 3e-3 and cfg.mixers == ("delta_net",) * cfg.num_layers
    assert parse_args(["--preset", "mqar"]).vocab_size == 8192
    assert parse_args(["--plot", "false"]).plot is False
    for argv, expect in [(["--bogus"], "valid flags: .*--steps"),
                         (["--mixers", "bogus"], "choose from .*delta_net"),
                         (["--lact-preset", "v9"], "choose from .*v6"),
                         (["--mesh", "data=0"], "mesh: axis 'data' needs a positive integer"),
                         (["--preset", "bogus"], "choose from .*lm-tiny.*vit"),
                         (["--steps", "zero"], "invalid int value"),
                         (["--steps", "-1"], "steps: expected a positive integer"),
                         (["--mixers", "swa", "swa", "swa"], "mixers: expected 1 or num_layers=2")]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert __import__("re").search(expect, capsys.readouterr().err), argv
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for f in TrainConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in out


def test_config_validation():
    with pytest.raises(ValueError, match="seq_len: MQAR needs seq_len >= 4 \\* mqar_kv"):
        make_config("mqar", seq_len=32, mqar_kv=16)
    with pytest.raises(ValueError, match="unknown config fields"):
        make_config("lm-tiny", stepz=3)
    assert set(PRESETS) == {"lm-tiny", "mqar", "vit"}


@pytest.mark.parametrize("L,kv", [(64, 4), (128, 8), (256, 16), (512, 64)])
def test_mqar_labels_shapes_ranges(L, kv):
    V = 8192
    b = mqar_batch(3, range(6), seq_len=L, num_kv=kv, vocab_size=V)
    x, y, m = b["inputs"], b["targets"], b["mask"]
    assert x.shape == y.shape == m.shape == (6, L)
    assert x.dtype == y.dtype == np.int32 and m.dtype == bool
    assert (m.sum(1) == kv).all()
    for i in range(6):
        keys, vals = x[i, 0:2 * kv:2], x[i, 1:2 * kv:2]
        assert ((keys >= 1) & (keys < V // 2)).all() and len(set(keys.tolist())) == kv
        assert ((vals >= V // 2) & (vals < V)).all()
        np.testing.assert_array_equal(y[i, :2 * kv - 1], x[i, 1:2 * kv])  # next-token shift
        pair = dict(zip(keys.tolist(), vals.tolist()))
        qpos = np.nonzero(m[i])[0]
        assert (qpos >= 2 * kv).all()
        assert sorted(x[i, qpos].tolist()) == sorted(keys.tolist())  # every key queried once
        for t in qpos:  # label = the value paired with the queried key in the context
            assert y[i, t] == pair[int(x[i, t])]
            if t + 1 < L:
                assert x[i, t + 1] == y[i, t]


def test_mqar_seeded_and_power_law():
    kw = dict(seq_len=256, num_kv=16, vocab_size=8192)
    a, b = mqar_batch(7, range(8), **kw), mqar_batch(7, range(8), **kw)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = mqar_batch(8, range(8), **kw)
    assert not np.array_equal(a["inputs"], c["inputs"])
    # example i depends only on (seed, i): a subset in another order gives the same rows
    d = mqar_batch(7, [5, 2], **kw)
    np.testing.assert_array_equal(d["inputs"], a["inputs"][[5, 2]])
    # power law: queries cluster near the context (median slot well below the middle)
    big = mqar_batch(0, range(200), **kw)
    slots = (np.nonzero(big["mask"])[1] - 32) // 2
    assert np.median(slots) < (256 - 32) // 2 / 4
    with pytest.raises(ValueError, match="seq_len"):
        mqar_example(np.random.default_rng(0), seq_len=8, num_kv=4, vocab_size=64)


def test_mqar_preset_path_tiny(tmp_path):
    """The MQAR task through the same loop: grain MQAR source, loss only at queries,
    test accuracy reported (tiny vocabulary, a handful of steps)."""
    cfg = make_config("mqar", vocab_size=64, seq_len=16, mqar_kv=2, width=16, num_heads=2,
                      batch_size=4, steps=4, mqar_test_examples=8, log_every=1, eval_every=4,
                      ckpt_every=4, progress=False, plot=False, ckpt_dir=str(tmp_path))
    logs = []
    summary = run(cfg, log=logs.append)
    ev = summary["final_eval"]
    assert ev["step"] == 4 and 0.0 <= ev["eval_accuracy"] <= 1.0 and np.isfinite(ev["eval_loss"])
    assert any("MQAR test accuracy" in line for line in logs)
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 4 and all(0.0 <= r["accuracy"] <= 1.0 for r in train)


def test_sparse_logits_match_full_forward():
    """The MQAR loss's gathered head equals the model's full forward at those positions."""
    import jax
    import jax.numpy as jnp
    from tttla_jax.train.loop import build_model, sparse_logits
    with jax.enable_x64(False):
        cfg = make_config("mqar", vocab_size=64, seq_len=16, mqar_kv=2, width=16, num_heads=2)
        model = build_model(cfg)
        b = mqar_batch(0, range(3), seq_len=16, num_kv=2, vocab_size=64)
        full, _ = model(jnp.asarray(b["inputs"]))
        index = jnp.asarray(np.stack([np.nonzero(m)[0] for m in b["mask"]]).astype(np.int32))
        got = sparse_logits(model, jnp.asarray(b["inputs"]), index)
        want = jnp.take_along_axis(full, index[..., None], axis=1)
        assert got.shape == (3, 2, 64)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


PACKAGING_CHECK = """
import importlib.util, runpy, sys
import tttla_jax.train.config
assert importlib.util.find_spec("train") is None, "a top-level `train` package is installed"
print("tttla_jax.train at", tttla_jax.train.__path__[0])
"""

ONE_COPY_CHECK = """
import runpy, sys
sys.argv = ["train", "--help"]
try:
    runpy.run_module("train", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code == 0, e.code
bare = sorted(m for m in sys.modules if m.split(".")[0] == "train")
assert bare == ["train"], bare     # only the launcher package itself
assert "tttla_jax.train.config" in sys.modules
print("one copy")
"""


def test_packaging_train_inside_the_package(tmp_path):
    """The training code is installed as ``tttla_jax.train`` (no top-level ``train`` that a
    user's own train.py could shadow); ``python -m train`` from the repository root runs the
    same modules (imported as ``tttla_jax.train.*``, one copy), ``python -m tttla_jax.train``
    works from anywhere."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = subprocess.run([sys.executable, "-c", PACKAGING_CHECK], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert outside.returncode == 0, outside.stderr
    helped = subprocess.run([sys.executable, "-m", "tttla_jax.train", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--preset" in helped.stdout, helped.stderr
    root = subprocess.run([sys.executable, "-c", ONE_COPY_CHECK], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert root.returncode == 0 and "one copy" in root.stdout, root.stdout + root.stderr
