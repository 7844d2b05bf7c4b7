"""Packed documents through the LanguageModel and the training data: ``model(tokens[1, T],
cu_seqlens=cu)`` equals the documents one by one (logits, loss, gradients; float64, 1e-10),
decoding continues every document from the per-document cache (tokens ``[N, 1]``) exactly
as each document decoding alone, and the training rows (``PackedDocSource``) pack documents
with the first byte of each one masked and nothing crossing a boundary."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.nn import LanguageModel, LMConfig
from tttla_jax.nn.decode import prefill
from tttla_jax.testing import assert_trees_close

TOL = dict(rtol=1e-10, atol=1e-12)
LENS = (6, 1, 0, 3)


def _model(mixers=("ttt_linear", "swa")):
    cfg = LMConfig(vocab_size=17, width=8, num_layers=len(mixers), num_heads=2, mixers=mixers,
                   mixer_options={"swa": {"window": 3}, "lact": {"chunk_size": 4, "window": 3},
                                  "ttt_linear": {"mini_batch_size": 4},
                                  "titans": {"chunk_size": 2, "batch_size": 4, "block_tokens": 2},
                                  "attention": {"max_len": 16}},
                   dtype=jnp.float64, param_dtype=jnp.float64)
    return LanguageModel(cfg, rngs=nnx.Rngs(0))


def _cu(lens):
    return jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)


def _nll(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@pytest.mark.parametrize("mixers", [("ttt_linear", "swa"),
                                    pytest.param(("lact", "titans", "attention"), marks=pytest.mark.slow)])
def test_packed_lm_equals_documents_and_decoding_continues(mixers):
    model = _model(mixers)
    cu = _cu(LENS)
    offs = np.concatenate([[0], np.cumsum(LENS)])
    T = int(offs[-1])
    tokens = jax.random.randint(jax.random.key(0), (1, T), 0, 17)
    graphdef, params = nnx.split(model)
    docs = [tokens[:, offs[i]:offs[i + 1]] for i in range(len(LENS))]

    def packed(params):
        logits, cache = prefill(nnx.merge(graphdef, params), tokens, cu_seqlens=cu)
        loss = sum(_nll(logits[:, offs[i]:offs[i + 1]], d) for i, d in enumerate(docs) if d.shape[1])
        return loss, (logits, cache)

    def alone(params):
        m = nnx.merge(graphdef, params)
        loss, outs = 0.0, []
        for d in docs:
            if d.shape[1]:
                logits, _ = m(d)
                loss = loss + _nll(logits, d)
                outs.append(logits)
        return loss, jnp.concatenate(outs, axis=1)

    (lp, (logits, cache)), gp = jax.jit(jax.value_and_grad(packed, has_aux=True))(params)
    (la, ref), ga = jax.jit(jax.value_and_grad(alone, has_aux=True))(params)
    assert_trees_close(logits, ref, name="packed logits", **TOL)
    assert_trees_close(lp, la, name="loss", **TOL)
    assert_trees_close(gp, ga, name="gradients", **TOL)
    assert cache["pos"].tolist() == list(LENS)

    # decoding after the packed prefill continues every document ([N, 1] tokens)
    nxt = jax.random.randint(jax.random.key(1), (len(LENS), 2), 0, 17)

    @jax.jit
    def decode(params, cache):
        m, steps = nnx.merge(graphdef, params), []
        for s in range(nxt.shape[1]):
            lg, cache = m(nxt[:, s:s + 1], cache=cache)
            steps.append(lg)
        return jnp.concatenate(steps, axis=1)

    @jax.jit
    def decode_alone(params):
        m = nnx.merge(graphdef, params)
        return [m(jnp.concatenate([d, nxt[i:i + 1]], axis=1))[0][:, d.shape[1]:] for i, d in enumerate(docs)]

    dec = decode(params, cache)
    for i, ref_i in enumerate(decode_alone(params)):
        assert_trees_close(dec[i:i + 1], ref_i, name=f"decoding document {i}", **TOL)


def test_packed_lm_validation():
    model = _model(("swa",))
    tok = jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match=r"cache\['pos'\].*\[N\]"):
        model(tok, cu_seqlens=_cu((2, 4)), cache=model.init_cache(1))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(jnp.zeros((2, 6), jnp.int32), cu_seqlens=_cu((2, 4)))


def test_train_rows_pack_documents():
    from tttla_jax.train.data import PackedDocSource, pad_batch
    data = np.arange(40, dtype=np.uint8)
    starts = np.array([0, 3, 4, 17, 30])
    src = PackedDocSource(data, starts, 8)
    assert len(src) == 4 and src.max_docs == 3
    rows = [src[i] for i in range(len(src))]
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(r["inputs"], data[8 * i: 8 * i + 8])
        np.testing.assert_array_equal(r["targets"], data[8 * i + 1: 8 * i + 9])
        assert r["cu_seqlens"][0] == 0 and r["cu_seqlens"][-1] == 8
    # row 0: documents [0, 3), [3, 4), [4, ...): targets 3 and 4 start documents
    assert rows[0]["cu_seqlens"].tolist() == [0, 3, 4, 8]
    assert rows[0]["mask"].tolist() == [True, True, False, False, True, True, True, True]
    assert rows[1]["cu_seqlens"].tolist() == [0, 8, 8, 8]      # a piece of one document, padded
    assert rows[2]["cu_seqlens"].tolist() == [0, 1, 8, 8]      # document 17 starts at offset 1
    assert rows[2]["mask"].tolist() == [False] + [True] * 7
    with pytest.raises(ValueError, match="max_docs"):
        PackedDocSource(data, starts, 8, max_docs=2)
    padded = pad_batch({k: np.stack([r[k] for r in rows[:1]]) for k in rows[0]}, 2)
    assert padded["cu_seqlens"][1].tolist() == [0, 8, 8, 8] and not padded["mask"][1].any()


def test_train_packed_loss_never_crosses_a_document():
    """The train loss on packed rows == the NLL of every document piece run alone, first
    byte of each document skipped (the train loss is accumulated in float32 by design: 1e-6)."""
    from tttla_jax.train.data import PackedDocSource
    from tttla_jax.train.loop import _forward_loss
    model = _model(("swa",))
    data = (np.arange(25) * 7 % 17).astype(np.uint8)
    src = PackedDocSource(data, np.array([0, 5, 18]), 12)   # rows: pieces of 5 + 7, 6 + 6 bytes
    batch = {k: jnp.asarray(np.stack([src[i][k] for i in range(len(src))])) for k in src[0]}
    s, n, _ = _forward_loss(model, batch, 0)
    ref, count = 0.0, 0
    for b in range(len(src)):
        cu = np.asarray(batch["cu_seqlens"][b])
        for a, e in zip(cu[:-1], cu[1:]):
            if e > a:
                logits, _ = model(batch["inputs"][b:b + 1, a:e])
                m = batch["mask"][b, a:e]
                logp = jax.nn.log_softmax(logits[0], axis=-1)
                nll = -jnp.take_along_axis(logp, batch["targets"][b, a:e, None].astype(jnp.int32), axis=-1)[:, 0]
                ref = ref + jnp.sum(jnp.where(m, nll, 0.0))
                count += int(m.sum())
    assert int(n) == count == int(batch["mask"].sum())
    assert_trees_close(s, ref.astype(s.dtype), name="packed train loss", rtol=1e-6)


def test_packed_loader_state_round_trips():
    """The grain iterator over packed rows resumes from its saved state (checkpoint resume)."""
    from tttla_jax.train.config import make_config
    from tttla_jax.train.data import train_loader
    cfg = make_config("lm-tiny", pack_documents=True, batch_size=4, seq_len=32)
    it = iter(train_loader(cfg))
    next(it)
    state = it.get_state()
    want = next(it)
    it2 = iter(train_loader(cfg))
    it2.set_state(state)
    got = next(it2)
    assert sorted(got) == ["cu_seqlens", "inputs", "mask", "targets"]
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
