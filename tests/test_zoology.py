"""Zoology MQAR (train/mqar.py protocol "zoology"), the "attention" mixer, the Zoology model
options of LMConfig (identity state mixer, learned positions, embedding dropout) and the
``python -m train.zoology`` sweep.

float64 checks at 1e-10 (attention: chunked vs recurrent vs a numpy loop, outputs, caches
and gradients).
"""
import dataclasses
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from tttla_jax.nn import MIXERS, LanguageModel, LMConfig
from tttla_jax.nn.attention import Attention
from tttla_jax.train.mqar import mqar_batch, mqar_example

F64 = jnp.float64
TOL = 1e-10
assert_close = functools.partial(chex.assert_trees_all_close, rtol=0.0, atol=TOL)


# --------------------------------------------------------------------------- generator

def check_zoology_example(inputs, targets, mask, *, seq_len, num_kv, vocab_size):
    """Every property of Zoology's multiquery_ar (random_non_queries=False)."""
    half, ctx = vocab_size // 2, 2 * num_kv
    assert inputs.shape == targets.shape == mask.shape == (seq_len,)
    keys, values = inputs[0:ctx:2], inputs[1:ctx:2]
    assert np.all((keys >= 1) & (keys < half)), keys
    assert np.all((values >= half) & (values < vocab_size)), values
    assert len(set(keys.tolist())) == num_kv          # keys without replacement
    assert len(set(values.tolist())) == num_kv        # values without replacement
    assert not mask[:ctx].any()
    region = inputs[ctx:]
    # the query region holds only the query keys and zeros; every key exactly once
    assert sorted(region[region != 0].tolist()) == sorted(keys.tolist())
    # keys sit at even offsets of the region, each followed by 0 (or the end)
    offs = np.flatnonzero(region)
    assert np.all(offs % 2 == 0)
    assert np.all(region[np.minimum(offs + 1, len(region) - 1)][offs + 1 < len(region)] == 0)
    # scored exactly at the query keys; the label is the value paired with that key
    assert mask.sum() == num_kv
    np.testing.assert_array_equal(np.flatnonzero(mask), ctx + offs)
    pair = dict(zip(keys.tolist(), values.tolist()))
    for t in np.flatnonzero(mask):
        assert targets[t] == pair[int(inputs[t])]
    assert np.all(targets[~mask] == 0)


@pytest.mark.parametrize("seq_len,num_kv", [(64, 4), (128, 8), (256, 16), (512, 64)])
def test_zoology_generator_fig2_settings(seq_len, num_kv):
    b = mqar_batch(0, range(8), seq_len=seq_len, num_kv=num_kv, vocab_size=8192, protocol="zoology")
    for i in range(8):
        check_zoology_example(b["inputs"][i], b["targets"][i], b["mask"][i], seq_len=seq_len,
                              num_kv=num_kv, vocab_size=8192)
    # fixed seeds: example i depends only on (seed, i); another seed gives another set
    again = mqar_batch(0, [5, 2], seq_len=seq_len, num_kv=num_kv, vocab_size=8192, protocol="zoology")
    np.testing.assert_array_equal(again["inputs"], b["inputs"][[5, 2]])
    other = mqar_batch(10, range(8), seq_len=seq_len, num_kv=num_kv, vocab_size=8192, protocol="zoology")
    assert not np.array_equal(other["inputs"], b["inputs"])


@settings(max_examples=40, deadline=None)
@given(num_kv=st.integers(1, 12), extra=st.integers(0, 20), half=st.integers(13, 60),
       seed=st.integers(0, 2 ** 31), a=st.sampled_from([0.01, 0.3, 1.0]))
def test_zoology_generator_property(num_kv, extra, half, seed, a):
    seq_len = 4 * num_kv + 2 * extra
    vocab = 2 * half
    ex = mqar_example(np.random.default_rng(seed), seq_len=seq_len, num_kv=num_kv, vocab_size=vocab,
                      power_a=a, protocol="zoology")
    check_zoology_example(*ex, seq_len=seq_len, num_kv=num_kv, vocab_size=vocab)


def test_zoology_gaps_follow_the_power_law():
    """With a = 0.01 short gaps dominate: over 400 examples (L 128, kv 8, 56 gap slots) the
    first gap slot is used far more often than the last (uniform would use both in 1/7)."""
    b = mqar_batch(3, range(400), seq_len=128, num_kv=8, vocab_size=8192, protocol="zoology")
    gaps = (np.stack([np.flatnonzero(m) for m in b["mask"]]) - 16) // 2
    first, last = np.mean(np.any(gaps == 0, 1)), np.mean(np.any(gaps == 55, 1))
    assert first > 0.5 and last < 0.1, (first, last)


@pytest.mark.parametrize("kw,match", [
    (dict(seq_len=63, num_kv=4, protocol="zoology"), r"seq_len: the zoology protocol needs an even"),
    (dict(seq_len=64, num_kv=4, protocol="fig2"), r"protocol: expected one of \('ours', 'zoology'\)"),
    (dict(seq_len=12, num_kv=4, protocol="zoology"), r"seq_len: expected >= 4 \* num_kv = 16"),
    (dict(seq_len=64, num_kv=4, protocol="zoology", power_a=0.0), r"power_a: expected a positive"),
])
def test_generator_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        mqar_batch(0, [0], vocab_size=8192, **kw)


def test_train_config_protocol_and_early_stop():
    from tttla_jax.train.config import make_config
    from tttla_jax.train.data import eval_batches
    cfg = make_config("mqar", mqar_protocol="zoology", mqar_test_examples=4, early_stop_accuracy=0.99)
    b = eval_batches(cfg)[0]
    check_zoology_example(b["inputs"][0], b["targets"][0], b["mask"][0], seq_len=64, num_kv=4,
                          vocab_size=8192)
    with pytest.raises(ValueError, match=r"mqar_protocol: expected one of"):
        make_config("mqar", mqar_protocol="zoo")
    with pytest.raises(ValueError, match=r"early_stop_accuracy: expected a float in \[0, 1\]"):
        make_config("mqar", early_stop_accuracy=1.5)


# --------------------------------------------------------------------------- attention

B, T, W, H, S = 2, 7, 8, 2, 12


def make_attn(impl, **kw):
    return Attention(width=W, num_heads=H, max_len=S, impl=impl, dtype=F64, param_dtype=F64,
                     rngs=nnx.Rngs(0), **kw)


def prefilled_cache(m, n=3, seed=2):
    """A cache holding n random earlier tokens (positions 0..n-1)."""
    c = m.init_cache(B)
    k1, k2 = jax.random.split(jax.random.key(seed))
    c["k"] = c["k"].at[:, :n].set(jax.random.normal(k1, (B, n, H, W // H), F64))
    c["v"] = c["v"].at[:, :n].set(jax.random.normal(k2, (B, n, H, W // H), F64))
    c["kpos"] = c["kpos"].at[:, :n].set(jnp.arange(n, dtype=jnp.int32))
    c["len"] = jnp.full((B,), n, jnp.int32)
    c["pos"] = jnp.full((B,), n, jnp.int32)
    return c


@functools.lru_cache(maxsize=None)
def attn_run(impl, rope):
    m = make_attn(impl, use_rope=rope, use_bias=True)
    gd, params = nnx.split(m)
    cache = prefilled_cache(m)
    x = jax.random.normal(jax.random.key(1), (B, T, W), F64)

    def loss(params, x, k, v):
        y, c = nnx.merge(gd, params)(x, cache={**cache, "k": k, "v": v})
        w = jnp.cos(jnp.arange(y.size, dtype=F64)).reshape(y.shape)
        return jnp.sum(y * w) + jnp.sum(jnp.sin(c["k"])) + jnp.sum(jnp.cos(c["v"])), (y, c)

    @jax.jit
    def f(params, x):
        (_, (y, c)), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
            params, x, cache["k"], cache["v"])
        mm = nnx.merge(gd, params)
        y_full, c_full = mm(x)
        c2, ys = mm.init_cache(B), []
        for a, b in ((0, 5), (5, 6), (6, T)):
            yp, c2 = mm(x[:, a:b], cache=c2)
            ys.append(yp)
        return dict(y=y, c=c, g=g, y_full=y_full, c_full=c_full, y_pieces=jnp.concatenate(ys, 1),
                    c_pieces=c2)

    return m, x, cache, f(params, x)


@pytest.mark.parametrize("rope", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_attention_chunked_equals_recurrent_f64(rope):
    """Outputs, caches and gradients (parameters, inputs, cached keys and values) from a
    non-empty cache; prefill + decoding in pieces equals the full call."""
    r0, r1 = attn_run("recurrent", rope)[3], attn_run("chunked", rope)[3]
    for key in ("y", "c", "g", "y_full", "c_full"):
        assert_close(r0[key], r1[key])
    assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(r0["g"]))
    for r in (r0, r1):
        assert_close(r["y_pieces"], r["y_full"])
        assert_close(r["c_pieces"], r["c_full"])
    assert float(jnp.max(jnp.abs(r0["y"] - r0["y_full"]))) > 1e-6  # the cache matters


def test_attention_matches_numpy_loop():
    """Against a float64 per-query loop: softmax over the cached tokens and every new token
    up to the query."""
    m, x, cache, r = attn_run("chunked", False)
    D, n = W // H, 3
    q = np.asarray(m.q_proj(x)).reshape(B, T, H, D)
    k = np.concatenate([np.asarray(cache["k"][:, :n]), np.asarray(m.k_proj(x)).reshape(B, T, H, D)], 1)
    v = np.concatenate([np.asarray(cache["v"][:, :n]), np.asarray(m.v_proj(x)).reshape(B, T, H, D)], 1)
    o = np.zeros((B, T, H, D))
    for t in range(T):
        s = np.einsum("bhd,bshd->bhs", q[:, t], k[:, :n + t + 1]) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o[:, t] = np.einsum("bhs,bshd->bhd", p, v[:, :n + t + 1])
    assert_close(r["y"], m.o_proj(jnp.asarray(o).reshape(B, T, H * D)))
    assert_close(r["c"]["k"][:, :n + T], jnp.asarray(k))
    np.testing.assert_array_equal(r["c"]["len"], n + T)
    np.testing.assert_array_equal(r["c"]["kpos"][:, n + T:], -1)


def test_attention_capacity_errors_and_registry():
    assert MIXERS["attention"] is Attention
    m = make_attn("chunked")
    with pytest.raises(ValueError, match=r"x: expected at most max_len = 12 tokens"):
        m(jnp.zeros((B, S + 1, W), F64))
    # a decoding call past the capacity gives NaN outputs for that row, never reused slots
    c = prefilled_cache(m, n=S - 1)
    c["len"] = c["len"].at[1].set(2)
    y, _ = m(jnp.ones((B, 2, W), F64), cache=c)
    assert bool(jnp.all(jnp.isnan(y[0]))) and bool(jnp.all(jnp.isfinite(y[1])))
    with pytest.raises(ValueError, match=r"max_len: expected a positive int"):
        Attention(width=W, num_heads=H, max_len=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"impl: Attention does not support impl='pallas'"):
        Attention(width=W, num_heads=H, impl="pallas", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cached,grads", [(True, False), pytest.param(True, True, marks=pytest.mark.slow),
                                          pytest.param(False, True, marks=pytest.mark.slow)])
def test_attention_dropout(cached, grads):
    """attn_dropout (Zoology's MHA: 0.1): inert without a key (the dropout-free attention);
    with a key, outputs and gradients (parameters, x, cached k/v) equal a float64 reference
    ``(softmax(QKᵀ/√D + mask) · keep / (1 − rate)) V`` with the same keep mask — from a cache
    (fresh: slow), and packed (cu_seqlens); gradients and the packed form in the slow cases; a
    recurrent impl with a key and bad rates raise."""
    from tttla_jax.impl import ImplError
    rate, key = 0.3, jax.random.key(5)
    m = make_attn("chunked", attn_dropout=rate, use_bias=True)
    x = jax.random.normal(jax.random.key(1), (B, T, W), F64)
    cache = prefilled_cache(m)
    gd, params = nnx.split(m)
    D, n = W // H, 3
    cu = jnp.asarray([0, 4, T], jnp.int32)                  # packed: two documents in row 0
    seg = (jnp.arange(T) >= 4).astype(jnp.int32)

    def ref(params, x, kc, vc, cached, keep, r, seg=None):
        mm, b = nnx.merge(gd, params), x.shape[0]
        q, k, v = (f(x).reshape(b, T, H, D) for f in (mm.q_proj, mm.k_proj, mm.v_proj))
        vis = jnp.tril(jnp.ones((T, T), bool))
        if seg is not None:
            vis = vis & (seg[:, None] == seg[None, :])
        if cached:
            k, v = jnp.concatenate([kc[:, :n], k], 1), jnp.concatenate([vc[:, :n], v], 1)
            vis = jnp.concatenate([jnp.ones((T, n), bool), vis], 1)
        sc = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(D)
        p = jax.nn.softmax(jnp.where(vis, sc, -jnp.inf), -1) * keep / (1 - r)
        return mm.o_proj(jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, T, H * D))

    def layer(params, x, kc, vc, cached, k=key):
        c = {**cache, "k": kc, "v": vc} if cached else None
        return nnx.merge(gd, params)(x, cache=c, dropout_key=k)[0]

    w = jnp.cos(jnp.arange(B * T * W, dtype=F64)).reshape(B, T, W)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(cached, grads, keep, *args):
        fl = lambda *a: jnp.sum(layer(*a, cached) * w)                                 # noqa: E731
        fr = lambda *a: jnp.sum(ref(*a, cached, keep, rate) * w)                       # noqa: E731
        g = [jax.grad(f, argnums=(0, 1, 2, 3))(*args) for f in (fl, fr)] if grads else [0, 0]
        ones = jnp.ones(keep.shape, bool)
        packed = (nnx.merge(gd, args[0])(x[:1], cu_seqlens=cu, dropout_key=key)[0],
                  ref(args[0], x[:1], None, None, False,
                      jax.random.bernoulli(key, 1 - rate, (1, H, T, T)), rate, seg)) if grads else (0, 0)
        return (layer(*args, cached), ref(*args, cached, keep, rate), *g,
                layer(*args, cached, k=None), ref(*args, cached, ones, 0.0), *packed)

    args = (params, x, cache["k"], cache["v"])
    keep = jax.random.bernoulli(key, 1 - rate, (B, H, T, S + T if cached else T))
    assert 0.6 < float(jnp.mean(keep)) < 0.8
    keep = jnp.concatenate([keep[..., :n], keep[..., S:]], -1) if cached else keep
    yl, yr, gl, gr, y0, y0r, yp, ypr = run(cached, grads, keep, *args)
    assert_close(yl, yr)
    assert_close(gl, gr)
    assert_close(y0, y0r)                                    # no key: no dropout
    assert_close(yp, ypr)
    assert float(jnp.max(jnp.abs(yl - y0))) > 1e-3
    with pytest.raises(ImplError, match=r"attention dropout .* parallel form only; got impl='recurrent'"):
        make_attn("recurrent", attn_dropout=rate)(x, dropout_key=key)
    for bad in (1.0, -0.1, True, "x"):
        with pytest.raises(ValueError, match=r"attn_dropout: expected a float in \[0, 1\)"):
            make_attn("chunked", attn_dropout=bad)


# --------------------------------------------------------------------------- model options

def zoo_lm(**kw):
    base = dict(vocab_size=32, width=8, num_layers=2, num_heads=1, mixers="attention",
                mixer_options={"attention": {"max_len": 12}}, state_mixer="identity",
                positions="learned", max_positions=12, embed_dropout=0.1, dtype=F64, param_dtype=F64)
    return LMConfig(**{**base, **kw})


def test_zoology_model_options():
    model = LanguageModel(zoo_lm(), rngs=nnx.Rngs(0))
    assert model.blocks[0].mlp is None and model.pos_embed.embedding.shape == (12, 8)
    tok = jax.random.randint(jax.random.key(0), (2, 10), 0, 32)
    logits, _ = model(tok)
    # prefill 6 + decode 1 + 3 equals the full forward (learned positions from the cache)
    c = model.init_cache(2)
    parts = []
    for a, b in ((0, 6), (6, 7), (7, 10)):
        lp, c = model(tok[:, a:b], cache=c)
        parts.append(lp)
    assert_close(jnp.concatenate(parts, 1), logits)
    # by hand: embedding + position, blocks x + mixer(norm x) then x + norm(x), final norm
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    x = model.embed(tok) + model.pos_embed(pos)
    for blk in model.blocks:
        x = x + blk.mixer(blk.mixer_norm(x), positions=pos)[0]
        x = x + blk.mlp_norm(x)
    assert_close(logits, model.embed.attend(model.final_norm(x)))
    # dropout acts only with a key, and then as inverted dropout with rate 0.1
    e0 = model.embed_inputs(tok, pos)
    e1 = model.embed_inputs(tok, pos, dropout_key=jax.random.key(3))
    kept = e1 != 0
    assert 0.7 < float(jnp.mean(kept)) < 0.99
    assert_close(jnp.where(kept, e1, 0), jnp.where(kept, e0 / 0.9, 0))
    # the learned table has 12 rows: longer inputs are an error, a later position is NaN
    with pytest.raises(ValueError, match=r"tokens: expected T <= max_positions = 12"):
        model(jnp.zeros((1, 13), jnp.int32))
    y, _ = model(tok[:1, :1], positions=jnp.asarray([[12]]), cache=model.init_cache(1))
    assert bool(jnp.all(jnp.isnan(y)))
    none = LanguageModel(zoo_lm(state_mixer="none", positions="none", max_positions=None),
                         rngs=nnx.Rngs(0))
    assert none.blocks[0].mlp_norm is None and none.pos_embed is None


@pytest.mark.parametrize("kw,match", [
    (dict(max_positions=None), r"max_positions: positions='learned' needs the table size"),
    (dict(positions="none"), r"max_positions: only used with positions='learned'"),
    (dict(positions="rope"), r"positions: got 'rope', expected one of \('none', 'learned'\)"),
    (dict(state_mixer="mlp"), r"state_mixer: got 'mlp', expected one of"),
    (dict(embed_dropout=1.0), r"embed_dropout: expected a float in \[0, 1\)"),
    (dict(max_positions=0), r"max_positions: expected a positive int"),
])
def test_zoology_model_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        zoo_lm(**kw)


# --------------------------------------------------------------------------- the sweep

@pytest.mark.slow   # (the tiny sweep of test_sweep_command_end_to_end builds two presets by default)
def test_every_preset_builds_a_zoology_model():
    """Every mixer preset of the sweep gives a valid 2-block identity-state-mixer model at
    every Fig. 2 setting; attention has learned positions and a cache of the sequence."""
    from tttla_jax.train.zoology import MIXER_PRESETS, SETTINGS, lm_config, state_size
    for name, preset in MIXER_PRESETS.items():
        for L, _ in SETTINGS[:2]:
            cfg = lm_config(preset, seq_len=L, width=64)
            assert cfg.state_mixer == "identity" and cfg.num_layers == 2 and cfg.vocab_size == 8192
            assert (cfg.positions == "learned") == (preset.mixer == "attention")
    model = nnx.eval_shape(lambda: LanguageModel(lm_config(MIXER_PRESETS["attention"], seq_len=64,
                                                           width=64), rngs=nnx.Rngs(0)))
    assert state_size(model) == 2 * 64 * 64  # K and V of 64 tokens, one head of 64


def test_sweep_command_end_to_end(tmp_path, capsys, monkeypatch):
    """python -m train.zoology --sweep tiny (in-process): trains attention (learned
    positions, no MLP) and linear attention a few steps, writes results.json, results.md and the
    plot; ``--steps-for attention=6`` gives attention its own budget (the training loop runs 6
    steps and the cosine spans 6) while linear attention keeps the sweep's 4; a second call with
    --resume trains nothing; a bad preset is a usage error."""
    from tttla_jax.train import zoology
    schedule = []
    lr_at = zoology._lr_at
    monkeypatch.setattr(zoology, "_lr_at", lambda *a: schedule.append(a) or lr_at(*a))
    out = str(tmp_path / "z")
    assert zoology.main(["--sweep", "tiny", "--out", out, "--no-progress", "--steps-for", "attention=6"]) == 0
    # the schedule the loop asked for, per step: attention's 6 steps over a 6-step cosine, then 4 of 4
    assert [a[1:3] for a in schedule] == [(s, 6) for s in range(1, 7)] + [(s, 4) for s in range(1, 5)]
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["mixer"] for r in res["runs"]] == ["attention", "linear_attention"]
    assert [r["lr"] for r in res["runs"]] == [3e-3, 1e-2]  # the tiny sweep's per-preset lr
    assert res["config"]["preset_steps"] == [["attention", 6]]
    for r, steps in zip(res["runs"], (6, 4)):
        assert r["steps"] == r["max_steps"] == steps and 0.0 <= r["accuracy"] <= 1.0
        assert [c["step"] for c in r["curve"]] == list(range(2, steps + 1, 2))
        assert r["state_size"] > 0 and np.isfinite(r["curve"][-1]["train_loss"])
        assert 0 < r["curve"][0]["cpu_seconds"] <= r["curve"][-1]["cpu_seconds"]
    md = open(os.path.join(out, "results.md")).read()
    assert "attention: at most 6 steps." in md
    assert "| 16 | 2 | attention | 16 | 512 |" in md  # 2 * L * width floats
    assert os.path.getsize(os.path.join(out, "accuracy.png")) > 1000
    assert zoology.main(["--sweep", "tiny", "--out", out, "--resume", "--no-progress"]) == 0
    assert len(json.load(open(os.path.join(out, "results.json")))["runs"]) == 2
    assert "--resume: 2 runs already" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        zoology.main(["--sweep", "tiny", "--out", out, "--preset", "x=nope"])
    assert "unknown mixer 'nope'" in capsys.readouterr().err


def test_per_preset_learning_rates(capsys):
    """``preset_lrs`` replaces ``lrs`` for the presets it names (the table header lists
    them); ``--lrs`` on the command line applies to every preset."""
    from tttla_jax.train import zoology
    cfg = zoology.SweepConfig(lrs=(1e-2,), preset_lrs=(("attention", (3e-3, 1e-3)),))
    assert cfg.lrs_for("attention") == (3e-3, 1e-3) and cfg.lrs_for("delta_net") == (1e-2,)
    assert zoology.DEFAULT.lrs_for("attention") != zoology.DEFAULT.lrs_for("delta_net")
    md = zoology.markdown_table({"config": json.loads(json.dumps(__import__("dataclasses").asdict(cfg))),
                                 "runs": []})
    assert "learning rates [0.01]; attention: [0.003, 0.001]." in md
    cfg = zoology.parse(["--sweep", "tiny", "--lrs", "5e-3"])[2]
    assert cfg.lrs_for("linear_attention") == cfg.lrs_for("attention") == (5e-3,)
    # (--preset: the JSON key "num_heads" is the preset's head count, not a mixer option)
    argv = ["--sweep", "tiny", "--preset", 'h2=ttt_linear:{"num_heads": 2, "short_conv": 4}']
    assert zoology.parse(argv)[2].lrs_for("linear_attention") == (1e-2,)
    assert zoology.MIXER_PRESETS["h2"].num_heads == 2
    assert dict(zoology.MIXER_PRESETS["h2"].options) == {"short_conv": 4}
    # every preset the default sweep names is registered once the command line is parsed,
    # including the library's measured recall presets (``<mixer>+recall``)
    from tttla_jax.nn.recipes import RECALL_PRESETS
    assert zoology.parse([])[2] == zoology.DEFAULT
    assert all(name in zoology.MIXER_PRESETS for name in zoology.DEFAULT.mixers)
    for mixer, opts in RECALL_PRESETS.items():
        preset = zoology.MIXER_PRESETS[f"{mixer}+recall"]
        assert preset.mixer == mixer and set(opts.items()) <= set(preset.options), (mixer, preset)
    assert {"lact+recall-dh16", "ttt_linear+recall", "ttt_linear+recall-h4"} <= set(zoology.DEFAULT.mixers)
    # the schedule: Zoology's cosine to 0 over the run, or a linear warm-up then the cosine
    assert zoology._lr_at(1.0, 1, 10) == 1.0 and abs(zoology._lr_at(1.0, 6, 10) - 0.5) < 1e-12
    assert [zoology._lr_at(1.0, s, 10, 4) for s in (1, 4, 5)] == [0.25, 1.0, 1.0]
    assert abs(zoology._lr_at(1.0, 8, 10, 4) - 0.5) < 1e-12
    assert zoology.parse(["--sweep", "tiny", "--warmup", "2"])[2].warmup == 2
    with pytest.raises(SystemExit):
        zoology.parse(["--sweep", "tiny", "--warmup", "4"])   # not below the tiny sweep's 4 steps
    # per-preset step budgets: --steps-for, and the attention-long sweep (attention only, a
    # 15 000-step cosine, the default sweep's data and optimiser)
    cfg = zoology.parse(["--steps-for", "attention=15000", "--steps-for", "delta_net=900"])[2]
    assert cfg.steps_for("attention") == 15000 and cfg.steps_for("delta_net") == 900
    assert cfg.steps_for("linear_attention") == zoology.DEFAULT.steps == 600
    long = zoology.parse(["--sweep", "attention-long", "--settings", "128x8"])[2]
    assert long.mixers == ("attention",) and long.steps_for("attention") == 15000
    assert long.settings == ((128, 8),) and long.widths == (64, 128) and long.lrs_for("attention") == (3e-3,)
    assert dataclasses.replace(long, mixers=(), settings=(), widths=(), lrs=(), steps=0, eval_every=0) == \
        dataclasses.replace(zoology.DEFAULT, mixers=(), settings=(), widths=(), lrs=(), preset_lrs=(),
                            steps=0, eval_every=0)
    for argv, msg in ((["--steps-for", "nope=5"], "unknown preset 'nope'"),
                      (["--steps-for", "attention=0"], "N a positive integer, got '0'"),
                      (["--steps-for", "attention"], "N a positive integer, got ''"),
                      (["--sweep", "tiny", "--warmup", "3", "--steps-for", "attention=3"],
                       "steps = 3 (the budget of attention), got 3")):
        with pytest.raises(SystemExit):
            zoology.parse(argv)
        assert msg in capsys.readouterr().err, argv


@pytest.mark.slow   # the presets' registration stays in the default suite (test_per_preset_learning_rates)
def test_recall_size_variants_and_preset_heads(capsys):
    """The smaller-state recall presets are ``"<mixer>+recall"`` with only the named options
    and head count changed, and the two equal-state ones (``lact+recall-dh8``,
    ``ttt_linear+recall-h4``) are within 1.5 % of DeltaNet's state at width 64; a bad
    ``num_heads`` in ``--preset`` is a usage error."""
    from types import SimpleNamespace
    from tttla_jax.train import zoology
    zoology.add_recall_presets()
    P = zoology.MIXER_PRESETS
    for name, (mixer, change, heads) in zoology.RECALL_SIZE_VARIANTS.items():
        full = P[f"{mixer}+recall"]
        assert P[name].mixer == mixer and P[name].num_heads == heads
        assert dict(P[name].options) == {**dict(full.options), **change}, name

    def state(name):  # one layer of the width-64 model (state_size averages the blocks), traced
        p, out = P[name], []

        def build():
            mixer = MIXERS[p.mixer](width=64, num_heads=p.num_heads, rngs=nnx.Rngs(0), **p.options_for(64))
            out.append(zoology.state_size(SimpleNamespace(blocks=[SimpleNamespace(mixer=mixer)])))
            return jnp.zeros(())
        jax.eval_shape(build)
        return out[0]
    ref = state("delta_net")
    assert ref == 64 * 64 + 3 * 3 * 64  # its D x D state and the conv taps of q, k, v
    for name in ("lact+recall-dh8", "ttt_linear+recall-h4", "ttt_linear+recall-mb1"):
        assert abs(state(name) - ref) <= 0.015 * ref, (name, state(name), ref)
    # without the fast bias b, TTT-Linear at mini-batch 1 holds exactly DeltaNet's state
    assert state("ttt_linear+recall-mb1-nobias") == ref
    assert state("ttt_linear+recall-mb1") == ref + 64  # the bias b [1, 64]

    with pytest.raises(SystemExit):
        zoology.parse(["--sweep", "tiny", "--preset", 'h=ttt_linear:{"num_heads": 0}'])
    assert "num_heads: expected a positive int, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_every_preset_trains_a_few_steps(tmp_path):
    """Every preset of the sweep trains 4 steps at the tiny size (finite losses)."""
    from tttla_jax.train import zoology
    out = str(tmp_path / "all")
    argv = ["--sweep", "tiny", "--out", out, "--no-progress", "--settings", "32x2",
            "--mixers", *zoology.MIXER_PRESETS]
    assert zoology.main(argv) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert sorted(r["mixer"] for r in res["runs"]) == sorted(zoology.MIXER_PRESETS)
    assert all(np.isfinite(r["curve"][-1]["train_loss"]) for r in res["runs"])


@pytest.mark.slow
def test_train_loop_early_stop(tmp_path, monkeypatch):
    """python -m train's --early-stop-accuracy: the run ends at the first evaluation that
    reaches the threshold (here forced to accuracy 1.0), checkpointed there; the zoology
    protocol flows through the training pipeline."""
    from tttla_jax.train import loop
    from tttla_jax.train.config import make_config
    monkeypatch.setattr(loop, "evaluate", lambda *a: {"eval_loss": 0.1, "eval_ppl": 1.1,
                                                      "eval_accuracy": 1.0})
    cfg = make_config("mqar", vocab_size=64, seq_len=16, mqar_kv=2, width=16, num_heads=2,
                      batch_size=4, steps=8, mqar_test_examples=8, log_every=1, eval_every=2,
                      ckpt_every=100, progress=False, plot=False, ckpt_dir=str(tmp_path),
                      mqar_protocol="zoology", early_stop_accuracy=0.99)
    logs = []
    summary = loop.run(cfg, log=logs.append)
    assert summary["step"] == 2 and summary["checkpoints"] == [2]
    assert any("early stop at step 2" in line for line in logs)
