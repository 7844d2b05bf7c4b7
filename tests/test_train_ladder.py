"""``python -m train.ladder`` at a tiny size (2 variants, a few steps) and the inner-loss
measurement of its inner-steps sweep."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttla_jax.rules.lact import apply_fast
from tttla_jax.rules.ladder import ladder
from tttla_jax.train.ladder import VARIANTS, main, operator_throughput


@pytest.mark.slow  # ~1 min of compiles on 2 idle cores; the ladder's pieces are tested below
def test_ladder_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "ladder"
    rep = main(["--variants", "v5", "v6", "--sweep-variant", "v6", "--steps", "3", "--width", "16",
                "--num-heads", "2", "--chunk-size", "8", "--seq-len", "16", "--batch-size", "4",
                "--eval-batches", "1", "--inner-steps", "2", "--throughput-tokens", "32",
                "--throughput-reps", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert [r["variant"] for r in rep["rows"]] == ["v5", "v6"]
    for r in rep["rows"]:
        assert np.isfinite(r["eval_loss"]) and r["eval_ppl"] > 1
        assert r["recurrent_tok_s"] > 0 and r["parallel_tok_s"] > 0   # both associative
        assert os.path.isdir(out / r["variant"] / "ckpt")
    sweep = rep["inner_steps_sweep"]
    assert [r["inner_steps"] for r in sweep] == [2]
    assert all(np.isfinite([r["inner_loss_before"], r["inner_loss_after"], r["eval_loss"]]).all()
               for r in sweep)
    md = (out / "ladder.md").read_text()
    assert "| v5 |" in md and "| v6 |" in md and "| 2 |" in md and md in text
    assert json.loads((out / "ladder.json").read_text())["rows"][1]["variant"] == "v6"
    # a second invocation reuses the finished runs (resumed at their last step)
    rep2 = main(["--variants", "v6", "--steps", "3", "--width", "16", "--num-heads", "2",
                 "--chunk-size", "8", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1",
                 "--inner-steps", "--throughput-tokens", "32", "--throughput-reps", "1",
                 "--out", str(out)])
    assert rep2["rows"][0]["eval_loss"] == rep["rows"][1]["eval_loss"]
    assert set(VARIANTS) >= {"v0", "v6", "ascent", "q_is_k"}


def test_operator_throughput_reports_no_parallel_form_for_v0():
    with jax.enable_x64(False):
        r = operator_throughput("v0", tokens=16, heads=1, head_dim=4, chunk_size=8, reps=1)
    assert r["recurrent_tok_s"] > 0 and r["parallel_tok_s"] is None and r["no_parallel_form"]


def test_shifted_keys_read_the_weights_after_the_chunk_update():
    """The sweep's 'after' inner loss reads f_{W after chunk c}(k_c) as the outputs of
    chunk c+1 with queries = keys of chunk c; check against the state returned after two
    chunks (chunk 0 updates, chunk 1 is apply-only) and apply_fast, in float64."""
    with jax.enable_x64(True):
        rule = ladder("v0", chunk_size=4, inner_steps=2)
        rng = np.random.default_rng(0)
        B, T, H, D = 1, 8, 1, 4
        f = lambda *s: jnp.asarray(rng.normal(size=s) / 2, jnp.float64)  # noqa: E731
        k, v = f(B, T, H, D), f(B, T, H, D)
        lr = jnp.asarray(rng.uniform(0.01, 0.1, size=(B, T, H, 3)))
        m = jnp.asarray(rng.uniform(0.5, 0.9, size=(B, T, H)))
        st0 = rule.init_state(f(H, D, D), f(H, D, D), f(H, D, D), B)
        q_shift = jnp.concatenate([k[:, :4], k[:, :-4]], axis=1)
        o, st = rule.recurrent(q_shift, k, v, lr, st0, m, output_final_state=True)
        want = apply_fast(st.w, jnp.swapaxes(k[:, :4], 1, 2), rule.fast_net)   # [B, H, C, D]
        np.testing.assert_allclose(np.asarray(o[:, 4:]), np.asarray(jnp.swapaxes(want, 1, 2)),
                                   rtol=1e-10, atol=1e-12)
