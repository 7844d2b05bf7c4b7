"""Packed variable-length sequences (``cu_seqlens``): every form of ``tt.linear_attention``
on N packed sequences equals running each sequence alone with its own initial state —
outputs, per-sequence final states and gradients w.r.t. every input (float64, 1e-10) —
including empty sequences, sequences shorter than, equal to and longer than a chunk."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.ops import varlen

LENS = (5, 0, 9, 1, 8, 3)  # chunk 4: partial, empty, 2 chunks + 1, one token, exactly 2, partial
H, K, V, C = 2, 3, 4, 4


def _packed(lens=LENS, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    T, N = sum(lens), len(lens)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    x = dict(q=rng.normal(size=(1, T, H, K)), k=rng.normal(size=(1, T, H, K)) / np.sqrt(K),
             v=rng.normal(size=(1, T, H, V)), g=-rng.uniform(0.0, 0.5, size=(1, T, H)),
             h0=rng.normal(size=(N, H, K, V)))
    return cu, {n: jnp.asarray(a, dtype) for n, a in x.items()}


def _per_sequence(cu, masking):
    """The oracle: each sequence alone through the (already verified) unpacked op."""
    bounds = [(int(a), int(b)) for a, b in zip(np.asarray(cu)[:-1], np.asarray(cu)[1:])]

    def f(q, k, v, g, h0):
        outs, states = [], []
        for n, (a, b) in enumerate(bounds):
            if a == b:
                states.append(h0[n])
                continue
            o, S = tt.linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], log_decay=g[:, a:b],
                                       initial_state=h0[n][None], output_final_state=True, masking=masking,
                                       chunk_size=C, impl="recurrent")
            outs.append(o)
            states.append(S[0])
        return jnp.concatenate(outs, axis=1), jnp.stack(states)
    return f


def _packed_form(cu, masking, impl):
    def f(q, k, v, g, h0):
        return tt.linear_attention(q, k, v, log_decay=g, initial_state=h0, output_final_state=True, masking=masking,
                                   chunk_size=C, impl=impl, cu_seqlens=cu)
    return f


@pytest.mark.parametrize("masking", ["causal", "chunk", pytest.param("none", marks=pytest.mark.slow)])
def test_every_form_equals_each_sequence_alone_float64(masking):
    cu, x = _packed()
    forms = {"per_sequence": _per_sequence(cu, masking)}
    for impl in ("recurrent", "chunked", "associative"):
        forms[impl] = _packed_form(cu, masking, impl)
    report = tt.testing.check_equivalence(forms, x)
    print(report)
    report.assert_ok()
    assert {e.quantity for e in report.entries} >= {"output", "state", "grad[h0]", "grad[g]", "grad[q]"}


def test_float32_within_tolerance_and_traced_cu_seqlens():
    """float32 at the documented 1e-4; cu_seqlens traced under jit: one compile serves any
    packing with the same number of sequences and tokens."""
    cu, x = _packed(dtype=jnp.float32)
    ref = _per_sequence(cu, "causal")(**x)
    f = jax.jit(lambda cu, **kw: _packed_form(cu, "causal", "chunked")(**kw))
    o, S = f(cu, **x)
    chex.assert_trees_all_close(o, ref[0], rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref[0]))))
    chex.assert_trees_all_close(S, ref[1], rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref[1]))))
    lens2 = (1, 3, 10, 4, 0, 8)  # another packing of the same 26 tokens in 6 sequences
    cu2 = jnp.asarray(np.concatenate([[0], np.cumsum(lens2)]), jnp.int32)
    o2, S2 = f(cu2, **x)
    ref2 = _per_sequence(cu2, "causal")(**x)
    chex.assert_trees_all_close(o2, ref2[0], rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref2[0]))))
    chex.assert_trees_all_close(S2, ref2[1], rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref2[1]))))
    assert f._cache_size() == 1


def test_one_sequence_equals_unpacked_and_no_state_crosses_a_boundary():
    cu, x = _packed()
    T = x["q"].shape[1]
    one = jnp.asarray([0, T], jnp.int32)
    o1, S1 = tt.linear_attention(x["q"], x["k"], x["v"], log_decay=x["g"], initial_state=x["h0"][:1],
                                 output_final_state=True, cu_seqlens=one)
    o, S = tt.linear_attention(x["q"], x["k"], x["v"], log_decay=x["g"], initial_state=x["h0"][:1],
                               output_final_state=True)
    chex.assert_trees_all_close(o1, o, atol=1e-12, rtol=1e-7)
    chex.assert_trees_all_close(S1, S, atol=1e-12, rtol=1e-7)
    # changing the first sequence's tokens changes nothing in the others
    x2 = dict(x, v=x["v"].at[:, :5].set(100.0))
    o2, S2 = _packed_form(cu, "causal", "chunked")(**x2)
    o0, S0 = _packed_form(cu, "causal", "chunked")(**x)
    chex.assert_trees_all_equal(o2[:, 5:], o0[:, 5:])
    chex.assert_trees_all_equal(S2[1:], S0[1:])
    assert not np.allclose(S2[0], S0[0])


def test_layout_covers_every_token_once():
    cu, x = _packed()
    T = x["q"].shape[1]
    lay = varlen.layout(cu, T, C)
    toks = np.asarray(lay.tok)[np.asarray(lay.valid)]
    assert sorted(toks.tolist()) == list(range(T))
    assert int(np.asarray(lay.first).sum()) == sum(1 for n in LENS if n)  # one reset per non-empty sequence
    y = varlen.from_chunks(varlen.to_chunks(x["q"], lay), lay)
    chex.assert_trees_all_equal(y, x["q"])


@pytest.mark.parametrize("cu, B, match", [
    (np.asarray([0, 3, 26]), 2, "batch of one"),
    (np.asarray([1, 3, 26]), 1, "start at 0 and end at T = 26"),
    (np.asarray([0, 3, 25]), 1, "start at 0 and end at T = 26"),
    (np.asarray([0, 9, 3, 26]), 1, "non-decreasing"),
    (np.asarray([0.0, 26.0]), 1, "integer dtype"),
    (np.asarray([[0, 26]]), 1, r"1-D integer array \[N \+ 1\]"),
    (np.asarray([0]), 1, r"1-D integer array \[N \+ 1\]"),
])
@pytest.mark.parametrize("op", ["linear_attention", "delta_rule"])
def test_bad_cu_seqlens_is_named(cu, B, match, op):
    """Both packed ops validate cu_seqlens through tttla_jax.ops.varlen.check_cu_seqlens."""
    q = jnp.ones((B, 26, H, K))
    v = jnp.ones((B, 26, H, V))
    with pytest.raises(ValueError, match=match):
        if op == "linear_attention":
            tt.linear_attention(q, q, v, cu_seqlens=jnp.asarray(cu))
        else:
            tt.delta_rule(q, q, v, jnp.ones((B, 26, H)), cu_seqlens=jnp.asarray(cu))


def test_initial_state_per_sequence_and_pallas_are_checked():
    cu, x = _packed()
    with pytest.raises(ValueError, match=r"initial_state.*\[N, H, K, V\]"):
        tt.linear_attention(x["q"], x["k"], x["v"], initial_state=x["h0"][:2], cu_seqlens=cu)
    # the kernel runs packed sequences (tests/test_kernels.py) but not these toy head dims
    with pytest.raises(ValueError, match=r"impl='pallas'.*head dim K = 3 is not supported"):
        tt.linear_attention(x["q"], x["k"], x["v"], cu_seqlens=cu, impl="pallas")


@pytest.mark.slow  # 14 s; packed rows under vmap are also trained in tests/test_packed_model.py
def test_vmap_over_rows_each_with_its_own_packing():
    """A [B, T] batch of packed rows: vmap over rows, each with its own cu_seqlens (same N)."""
    cu1, x = _packed(seed=1)
    lens2 = (1, 3, 10, 4, 0, 8)
    cu2 = jnp.asarray(np.concatenate([[0], np.cumsum(lens2)]), jnp.int32)
    _, y = _packed(seed=2)
    stack = lambda a, b: jnp.stack([a, b])  # noqa: E731
    xs = {n: stack(x[n], y[n]) for n in x}

    def row(cu, q, k, v, g, h0):
        return _packed_form(cu, "causal", "chunked")(q, k, v, g, h0)

    o, S = jax.vmap(row)(stack(cu1, cu2), **xs)
    for i, (cu, inp) in enumerate(((cu1, x), (cu2, y))):
        o_ref, S_ref = _per_sequence(cu, "causal")(**inp)
        chex.assert_trees_all_close(o[i], o_ref, atol=1e-10, rtol=1e-7)
        chex.assert_trees_all_close(S[i], S_ref, atol=1e-10, rtol=1e-7)
