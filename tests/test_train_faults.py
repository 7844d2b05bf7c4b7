"""The training job under faults: non-finite steps, bad numeric flags, resume selection,
damaged metrics / metadata, stale temporary checkpoints, a failed write (disk full) and a
multi-process start whose coordinator never answers. Tiny runs (6 steps), ~1-2 min."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tttla_jax.train.__main__ import main
from tttla_jax.train.checkpoint import restore_latest_valid
from tttla_jax.train.config import make_config, parse_args
from tttla_jax.train.loop import WALL_CLOCK_FIELDS, read_metrics, run

# the tiny model of tests/test_train.py, 6 steps, checkpoints at 2, 4, 6
TINY = dict(steps=6, width=32, num_layers=2, num_heads=2, seq_len=64, batch_size=8,
            mixers=("delta_net", "swa"), window=16, chunk_size=16, lr=1e-2, warmup_steps=2,
            log_every=1, eval_every=3, eval_batches=1, ckpt_every=2, keep=3,
            progress=False, plot=False, sample_tokens=0)


def tiny(ckpt_dir=None, **kw):
    kw = dict(TINY, **kw)
    if ckpt_dir is not None:
        kw["ckpt_dir"] = str(ckpt_dir)
    return make_config("lm-tiny", **kw)


def argv(ckpt_dir, **kw):
    out = ["--ckpt-dir", str(ckpt_dir)]
    for k, v in dict(TINY, **kw).items():
        flag = "--" + k.replace("_", "-")
        out += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    return out


def strip_clock(records):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in records]


def all_checkpoints(run_dir):
    """{step: (leaves, meta)} of every checkpoint in run_dir (no verification)."""
    root = os.path.abspath(os.path.join(run_dir, "ckpt"))
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers={"arrays": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})
    out = {}
    for step in mngr.all_steps():
        shapes = mngr.item_metadata(step)["arrays"]
        like = {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}
        r = mngr.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(like),
                                                       meta=ocp.args.JsonRestore()))
        out[step] = ([np.asarray(r["arrays"][k]) for k in sorted(r["arrays"])], r["meta"])
    mngr.close()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    summary = run(tiny(d), log=lambda *a: None)
    assert summary["checkpoints"] == [2, 4, 6]
    return d


def assert_same_as_reference(d, ref):
    a, b = all_checkpoints(d)[6], all_checkpoints(ref)[6]
    assert len(a[0]) == len(b[0]) and all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1]["data_state"] == b[1]["data_state"]


# ------------------------------------------------------------------ 1. non-finite guard

def test_huge_lr_stops_naming_the_step_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    code = main(argv(tmp_path, lr=1e6, ckpt_every=1, steps=30, eval_every=30))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3, err
    assert err[-1].startswith("error: step ") and "non-finite training step" in err[-1]
    assert "--on-nonfinite skip" in err[-1] and "Traceback" not in "\n".join(err)
    bad_step = int(err[-1].split()[2].rstrip(":"))
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in recs if r["kind"] == "nonfinite"] == [bad_step]
    ckpts = all_checkpoints(tmp_path)
    assert ckpts and max(ckpts) == bad_step - 1          # nothing saved at or after the bad step
    for leaves, _ in ckpts.values():
        assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.inexact))


def test_nonfinite_step_leaves_state_unchanged():
    """The jitted step's guard: a NaN parameter gives finite=False and the exact old state."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tttla_jax.train import data as data_lib
    from tttla_jax.train.loop import build_model, make_optimizer, make_steps
    cfg = tiny()
    with jax.enable_x64(False):
        graphdef, params, rest = nnx.split(build_model(cfg), nnx.Param, ...)
        opt = make_optimizer(cfg)[0].init(params)
        step, _ = make_steps(graphdef, cfg)
        batch = {k: jnp.asarray(v) for k, v in next(iter(data_lib.train_loader(cfg, 0, 1))).items()}
        params, opt, _ = step(params, rest, opt, batch)   # step 1 has lr 0 (warm-up)
        p1, o1, m = step(params, rest, opt, batch)
        assert bool(m["finite"]) and not all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
        leaves, tdef = jax.tree.flatten(params)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
        bad = jax.tree.unflatten(tdef, leaves)
        p2, o2, m = step(bad, rest, opt, batch)
        assert not bool(m["finite"])
        for new, old in zip(jax.tree.leaves((p2, o2)), jax.tree.leaves((bad, opt))):
            assert np.array_equal(np.asarray(new), np.asarray(old), equal_nan=True)


def test_skip_mode_counts_skipped_steps(tmp_path):
    """--on-nonfinite skip: every non-finite step is recorded and counted; the run either
    finishes or stops after too many in a row, and never checkpoints non-finite values."""
    from tttla_jax.train.checkpoint import NonFiniteError
    logs = []
    try:
        s = run(tiny(tmp_path, lr=1e6, steps=12, ckpt_every=1, eval_every=12, on_nonfinite="skip"),
                log=logs.append)
        stopped = False
    except NonFiniteError as e:
        stopped = True
        assert "in a row" in str(e)
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    nonfinite = [r for r in recs if r["kind"] == "nonfinite"]
    assert nonfinite, "lr 1e6 is expected to produce non-finite steps"
    assert [r["skipped_steps"] for r in nonfinite] == list(range(1, len(nonfinite) + 1))
    assert sum("skipped (parameters and optimiser state unchanged" in x for x in logs) >= 1
    if not stopped:
        assert s["skipped_steps"] == len(nonfinite)
        assert [r for r in recs if r["kind"] == "train"][-1]["skipped_steps"] == len(nonfinite)
    for leaves, meta in all_checkpoints(tmp_path).values():
        assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.inexact))


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "inf"),
                                        ("--throttle", "inf"), ("--throttle", "1e9"),
                                        ("--grad-clip", "nan"), ("--b1", "nan"),
                                        ("--lact-base-lr", "inf"), ("--init-timeout", "0")])
def test_non_finite_or_out_of_range_flags_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m train: error: " + flag[2:].replace("-", "_")), err


# ------------------------------------------------------------------ 2. resume selection

def test_resume_picks_newest_run_with_a_checkpoint_and_never_extends_silently(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(tiny(steps=4, eval_every=4, keep=1), log=lambda *a: None)        # runs/lm-tiny, finished
    os.makedirs("runs/lm-tiny-2")                                         # killed before a checkpoint
    with open("runs/lm-tiny-2/metrics.jsonl", "w") as f:
        f.write('{"kind": "train", "step": 1, "loss": 5.0}\n')
    before = sorted(os.listdir("runs/lm-tiny/ckpt"))
    metrics_before = open("runs/lm-tiny/metrics.jsonl").read()
    logs = []
    t = time.perf_counter()
    s = run(tiny(steps=4, eval_every=4, keep=1, resume=True), log=logs.append)
    took = time.perf_counter() - t
    text = "\n".join(logs)
    assert "--resume: resuming runs/lm-tiny (the newest run directory that holds a checkpoint; " \
           "newer runs/lm-tiny-2 holds none" in text, text
    assert "is finished" in text and "--resume --steps N with N > 4" in text, text
    assert s["finished"] and s["step"] == 4 and s["final_eval"]["step"] == 4
    assert "held-out" not in text and took < 30
    assert sorted(os.listdir("runs/lm-tiny/ckpt")) == before            # nothing written or deleted
    assert open("runs/lm-tiny/metrics.jsonl").read() == metrics_before
    assert os.listdir("runs/lm-tiny-2") == ["metrics.jsonl"]
    # --steps extends it, and says so; only this run's own old checkpoint is pruned (keep=1)
    logs = []
    s = run(tiny(steps=6, eval_every=4, keep=1, resume=True), log=logs.append)
    assert "extending the finished run from 4 to 6 steps" in "\n".join(logs)
    assert s["step"] == 6 and s["start_step"] == 4 and not s["finished"]
    assert sorted(os.listdir("runs/lm-tiny/ckpt")) == ["6"]
    assert os.listdir("runs/lm-tiny-2") == ["metrics.jsonl"]


def test_resume_choice_without_training(tmp_path, monkeypatch):
    from tttla_jax.train.loop import resolve_run_dir
    monkeypatch.chdir(tmp_path)
    cfg = make_config("lm-tiny", resume=True)
    notes = []
    assert resolve_run_dir(cfg, notes.append) == "runs/lm-tiny" and "no run directory" in notes[-1]
    for d in ("runs/lm-tiny/ckpt/250", "runs/lm-tiny-2/ckpt", "runs/lm-tiny-3/ckpt/100", "runs/lm-tiny-5"):
        os.makedirs(d)
    assert resolve_run_dir(cfg, notes.append) == "runs/lm-tiny-3"
    assert "newer runs/lm-tiny-5 holds none" in notes[-1]


# ------------------------------------------------------------------ 3. metrics and metadata

def _copy_without_last(ref, d):
    shutil.copytree(ref, d)
    shutil.rmtree(d / "ckpt" / "6")


def test_damaged_metrics_line_is_skipped_with_a_warning(reference, tmp_path):
    d = tmp_path / "run"
    _copy_without_last(reference, d)
    lines = open(d / "metrics.jsonl").read().splitlines()
    damaged = lines[1]
    lines[1] = damaged[: len(damaged) // 2] + "\x00garbage"
    open(d / "metrics.jsonl", "w").write("\n".join(lines) + "\n")
    logs = []
    run(tiny(d, resume=True), log=logs.append)
    assert any("skipped 1 damaged line(s) (line 2)" in x for x in logs), logs
    got = strip_clock(read_metrics(str(d / "metrics.jsonl")))
    want = strip_clock(read_metrics(str(reference / "metrics.jsonl")))
    assert got == want[:1] + want[2:]          # only the damaged record is lost
    assert_same_as_reference(d, reference)


@pytest.mark.parametrize("field", ["data_state", "config"])
def test_edited_metadata_is_detected_and_the_previous_checkpoint_used(reference, tmp_path, field):
    d = tmp_path / "run"
    _copy_without_last(reference, d)
    path = d / "ckpt" / "4" / "meta" / "metadata"
    meta = json.load(open(path))
    if field == "data_state":
        ds = json.loads(meta["data_state"])
        meta["data_state"] = json.dumps(ds).replace("0", "1", 1)
        assert meta["data_state"] != json.dumps(ds)
    else:
        meta["config"]["steps"] = 7
    json.dump(meta, open(path, "w"))
    notes = []
    assert restore_latest_valid(str(d), log=notes.append)[0] == 2        # read-only check
    assert "metadata" in notes[0] and os.path.isdir(d / "ckpt" / "4")
    if field == "data_state":                                            # resume: bitwise anyway
        logs = []
        s = run(tiny(d, resume=True), log=logs.append)
        assert s["start_step"] == 2
        assert any("CORRUPTED CHECKPOINT: step 4" in x and "metadata" in x for x in logs), logs
        assert_same_as_reference(d, reference)


def test_stale_tmp_checkpoint_is_removed_on_start(reference, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(reference, d)
    os.makedirs(d / "ckpt" / "8.orbax-checkpoint-tmp-1234" / "arrays")
    logs = []
    s = run(tiny(d, resume=True, steps=6), log=logs.append)
    assert any("removed 1 incomplete checkpoint(s)" in x and "8.orbax-checkpoint-tmp" in x for x in logs)
    assert s["finished"] and sorted(os.listdir(d / "ckpt")) == ["2", "4", "6"]


def test_failed_checkpoint_write_is_one_line_and_resume_is_bitwise(reference, tmp_path, capsys,
                                                                   monkeypatch):
    real = ocp.CheckpointManager.save

    def disk_full(self, step, *a, **k):
        if step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    code = main(argv(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("error: writing checkpoint step 4 to ")
    assert "No space left on device (errno 28)" in err[-1] and "(steps [2]) are intact" in err[-1]
    assert "Traceback" not in "\n".join(err)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2"]
    run(tiny(tmp_path, resume=True), log=lambda *a: None)
    assert_same_as_reference(tmp_path, reference)


# ------------------------------------------------------------------ multi-process start

def test_unreachable_coordinator_fails_within_the_timeout():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "tttla_jax.train", "--coordinator", f"127.0.0.1:{port}",
                        "--num-processes", "2", "--process-id", "1", "--init-timeout", "2"],
                       capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert err[-1].startswith("error: multi-process start failed") and f"127.0.0.1:{port}" in err[-1]
    assert "--init-timeout 2 s" in err[-1] and took < 60


# ------------------------------------------------------------------ 4. named checkpoints

def test_checkpoints_name_arrays_by_path(reference):
    from tttla_jax.train.checkpoint import load_final
    step, leaves, meta = load_final(str(reference))
    names = meta["names"]
    assert len(names) == len(leaves) and len(set(names)) == len(names)
    assert "params.embed.embedding" in names and "rng" == names[-1]
    assert any(n.startswith("params.blocks.0.mixer.") for n in names)
    assert any(n.startswith("opt_state.") and ".mu.embed.embedding" in n for n in names)
    emb = leaves[names.index("params.embed.embedding")]
    assert emb.shape == (TINY.get("vocab_size", 256), TINY["width"])


def test_checkpoint_of_the_unnamed_format_still_resumes_bitwise(reference, tmp_path):
    """Checkpoints written before the names (keys a0000, ... in leaf order, no meta
    digest) resume by position, with a note, and the run ends bitwise."""
    from tttla_jax.train.checkpoint import Checkpointer, load_final
    d = tmp_path / "run"
    _copy_without_last(reference, d)
    old = {}
    for s in (2, 4):  # rewrite both checkpoints in the earlier format
        keep = tmp_path / f"keep{s}"
        os.makedirs(keep / "ckpt")
        shutil.copytree(d / "ckpt" / str(s), keep / "ckpt" / str(s))
        old[s] = load_final(str(keep))
    shutil.rmtree(d / "ckpt")
    ck = Checkpointer(str(d), keep=3)
    for s, (_, leaves, meta) in old.items():
        legacy = {k: v for k, v in meta.items() if k not in ("names", "digest", "meta_digest", "step")}
        ck.save(s, leaves, legacy)
        mpath = d / "ckpt" / str(s) / "meta" / "metadata"
        m = json.load(open(mpath))
        del m["meta_digest"]
        json.dump(m, open(mpath, "w"))
    ck.close()
    assert "names" not in load_final(str(d))[2]
    logs = []
    s = run(tiny(d, resume=True), log=logs.append)
    assert s["start_step"] == 4 and any("predates metadata checksums" in x for x in logs), logs
    assert_same_as_reference(d, reference)
    assert load_final(str(d))[2]["names"] == load_final(str(reference))[2]["names"]
