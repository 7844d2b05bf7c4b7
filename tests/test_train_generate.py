"""Reusing a trained run: ``tttla_jax.train.load_run`` and ``python -m train.generate``.

One tiny run (6 steps, checkpoints at 3 and 6, ~15 s on 2 cores) is trained in a tmp
directory; the model rebuilt from its newest checkpoint must hold the trained parameters
bitwise and reproduce the end-of-training sample and greedy generation exactly."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tttla_jax.train as train_pkg
from tttla_jax.nn.decode import generate
from tttla_jax.train import generate as gen_cli
from tttla_jax.train.config import make_config
from tttla_jax.nn import TTTLinear, load_reference_weights
from tttla_jax.train.load import RunNotFoundError, export_run_weights, load_run, read_run_config
from tttla_jax.train.loop import build_model, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(steps=6, width=32, num_layers=2, num_heads=2, seq_len=64, batch_size=8,
            mixers=("ttt_linear", "swa"), window=16, chunk_size=16, lr=1e-2, warmup_steps=2,
            log_every=1, eval_every=3, eval_batches=2, ckpt_every=3, keep=3, sample_tokens=8,
            progress=False, plot=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    cfg = make_config("lm-tiny", **dict(TINY, ckpt_dir=str(d)))
    summary = run(cfg, log=lambda *a: None)
    return str(d), cfg, summary


def _in_memory_model(cfg, params):
    graphdef, _, rest = nnx.split(build_model(cfg), nnx.Param, ...)
    return nnx.merge(graphdef, jax.device_get(params), rest)


def test_load_run_restores_the_trained_parameters_and_config(trained):
    d, cfg, summary = trained
    assert train_pkg.load_run is load_run  # public, exported from tttla_jax.train
    model, loaded_cfg = load_run(d)
    assert loaded_cfg == cfg
    assert model.trained_step == 6
    got = jax.tree.leaves(nnx.state(model, nnx.Param))
    want = jax.tree.leaves(summary["params"])
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh = jax.tree.leaves(nnx.state(build_model(cfg), nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(got, fresh))  # not just the init


def test_generation_from_the_loaded_run_matches_the_trained_model(trained):
    d, cfg, summary = trained
    model, _ = load_run(d)
    prompt = jnp.asarray(np.frombuffer(b"def ", np.uint8).astype(np.int32)[None])
    with jax.enable_x64(False):
        got = generate(model, prompt, 12, rng=jax.random.key(0))  # greedy
        want = generate(_in_memory_model(cfg, summary["params"]), prompt, 12, rng=jax.random.key(0))
        sample = gen_cli.generate_text(model, "The ", 8, key=model.sample_key,
                                       temperature=0.8, top_k=40)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert sample == summary["sample"]  # the end-of-training sample, from the checkpoint


def test_generate_cli_prints_the_training_sample(trained):
    d, _, summary = trained
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "train.generate", "--run", d, "--max-tokens", "8"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.rstrip("\n") == summary["sample"]
    with open(os.path.join(d, "sample.txt")) as fh:  # the run saved the same sample beside its checkpoints
        assert fh.read().rstrip("\n") == summary["sample"]
    assert summary["sample_path"] == os.path.join(d, "sample.txt")


def test_generate_cli_greedy_and_seeded(trained, capsys):
    d, _, _ = trained
    assert gen_cli.main(["--run", d, "--prompt", "ab", "--max-tokens", "5", "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("ab") and len(greedy.rstrip("\n").encode("utf-8", "replace")) >= 2
    assert gen_cli.main(["--run", d, "--max-tokens", "6", "--seed", "3"]) == 0
    a = capsys.readouterr().out
    assert gen_cli.main(["--run", d, "--max-tokens", "6", "--seed", "3"]) == 0
    assert capsys.readouterr().out == a  # a seed makes the sample reproducible


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_generate_cli_errors_are_one_line(tmp_path, capsys, case):
    d = tmp_path / "run"
    if case == "empty":
        (d / "ckpt").mkdir(parents=True)
    assert gen_cli.main(["--run", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: run: ") and str(d) in err
    assert ("no run directory" if case == "missing" else "holds no checkpoint") in err
    with pytest.raises(RunNotFoundError, match="run: "):
        read_run_config(str(d))


@pytest.mark.parametrize("argv,needle", [
    (["--max-tokens", "0"], "--max-tokens"), (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-1"], "--temperature"), (["--top-k", "0"], "--top-k"),
    (["--prompt", ""], "--prompt")])
def test_generate_cli_rejects_bad_flags(trained, capsys, argv, needle):
    d, _, _ = trained
    with pytest.raises(SystemExit) as e:
        gen_cli.main(["--run", d, *argv])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_load_run_skips_a_damaged_newest_checkpoint(trained, tmp_path):
    d, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(d, copy)
    arrays = copy / "ckpt" / "6" / "arrays"
    for root, _, files in os.walk(arrays):
        for name in files:
            if os.path.basename(root) == "d":  # the array data files
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    data = bytearray(f.read())
                    data[len(data) // 2] ^= 0xFF
                    f.seek(0)
                    f.write(data)
    notes = []
    model, _ = load_run(str(copy), log=notes.append)
    assert model.trained_step == 3
    assert any("step 6" in n for n in notes), notes


def test_export_run_weights_to_the_reference_names(trained, tmp_path):
    """The trained TTT-Linear layer, exported by reference name, loads into a fresh
    TTTLinear with exactly the trained parameters."""
    d, cfg, _ = trained
    model, _ = load_run(d)
    exported = export_run_weights(d)
    assert list(exported) == [0]  # layer 0 is TTT-Linear; "swa" has no reference layer
    trained_mixer = model.blocks[0].mixer
    fresh = TTTLinear(width=cfg.width, num_heads=cfg.num_heads, rngs=nnx.Rngs(7))
    load_reference_weights(fresh, exported[0])
    for a, b in zip(jax.tree.leaves(nnx.state(fresh, nnx.Param)),
                    jax.tree.leaves(nnx.state(trained_mixer, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(RunNotFoundError):
        export_run_weights(str(tmp_path / "missing"))


def test_export_cli_writes_an_npz(trained, tmp_path, capsys):
    from tttla_jax.train import export as export_cli
    d, _, _ = trained
    out = tmp_path / "w.npz"
    assert export_cli.main(["--run", d, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with np.load(out) as z:
        got = dict(z)
    want = export_run_weights(d)[0]
    assert sorted(got) == sorted(f"layers.0.{k}" for k in want)
    for k, a in want.items():
        np.testing.assert_array_equal(got[f"layers.0.{k}"], a)
    assert export_cli.main(["--run", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
