"""Packed variable-length sequences (``cu_seqlens``) for ``tt.delta_rule``: every form on N
packed sequences equals running each sequence alone with its own initial state — outputs,
per-sequence final states and gradients w.r.t. q, k, v, β, log-decay and the initial states
(float64, 1e-10) — including empty sequences, sequences shorter than, equal to and longer
than a chunk, gated and ungated, with chunk groups of 1 and of several chunks."""
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
dr = importlib.import_module("tttla_jax.ops.delta_rule")  # the module (tt.ops.delta_rule is the function)

LENS = (5, 0, 9, 1, 8, 3)  # chunk 4: partial, empty, 2 chunks + 1, one token, exactly 2, partial
H, K, V, C = 2, 3, 4, 4


def _cu(lens):
    return jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)


def _packed(lens=LENS, dtype=jnp.float64, seed=0, gated=True):
    rng = np.random.default_rng(seed)
    T, N = sum(lens), len(lens)
    k = rng.normal(size=(1, T, H, K))
    x = dict(q=rng.normal(size=(1, T, H, K)), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
             v=rng.normal(size=(1, T, H, V)), beta=rng.uniform(0.05, 0.95, size=(1, T, H)),
             h0=rng.normal(size=(N, H, K, V)))
    if gated:
        x["g"] = -rng.uniform(0.0, 0.5, size=(1, T, H))
    return _cu(lens), {n: jnp.asarray(a, dtype) for n, a in x.items()}


def _per_sequence(cu):
    """The oracle: each sequence alone through the (already verified) unpacked op."""
    bounds = [(int(a), int(b)) for a, b in zip(np.asarray(cu)[:-1], np.asarray(cu)[1:])]

    def f(q, k, v, beta, h0, g=None):
        outs, states = [], []
        for n, (a, b) in enumerate(bounds):
            if a == b:
                states.append(h0[n])
                continue
            o, S = tt.delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b],
                                 log_decay=None if g is None else g[:, a:b], initial_state=h0[n][None],
                                 output_final_state=True, chunk_size=C, impl="recurrent")
            outs.append(o)
            states.append(S[0])
        return jnp.concatenate(outs, axis=1), jnp.stack(states)
    return f


def _packed_form(cu, impl):
    def f(q, k, v, beta, h0, g=None):
        return tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, output_final_state=True,
                             chunk_size=C, impl=impl, cu_seqlens=cu)
    return f


def _grouped(cu, group):
    """The chunked varlen path with an explicit number of chunks per group."""
    def f(q, k, v, beta, h0, g=None):
        scale = K ** -0.5
        return dr._chunked_varlen(q * scale, k, v, beta, g, h0, C, cu, group=group)
    return f


@pytest.mark.parametrize("gated", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_every_form_equals_each_sequence_alone_float64(gated):
    """chunked: the default (one chunk slot per group); group4 (gated only, to keep the test
    short): groups of 4 of the 12 slots — resets inside a group, groups starting
    mid-sequence."""
    cu, x = _packed(gated=gated)
    forms = {"per_sequence": _per_sequence(cu), "recurrent": _packed_form(cu, "recurrent"),
             "chunked": _packed_form(cu, "chunked")}
    if gated:
        forms["group4"] = _grouped(cu, 4)
    report = tt.testing.check_equivalence(forms, x)
    print(report)
    report.assert_ok()
    want = {"output", "state", "grad[q]", "grad[k]", "grad[v]", "grad[beta]", "grad[h0]"}
    assert {e.quantity for e in report.entries} >= want | ({"grad[g]"} if gated else set())


def test_float32_within_tolerance_and_traced_cu_seqlens():
    """float32 at the documented 1e-4; cu_seqlens traced under jit: one compile serves any
    packing with the same number of sequences and tokens."""
    cu, x = _packed(dtype=jnp.float32)
    f = jax.jit(lambda cu, **kw: _packed_form(cu, "chunked")(**kw))
    lens2 = (1, 3, 10, 4, 0, 8)  # another packing of the same 26 tokens in 6 sequences
    for c in (cu, _cu(lens2)):
        o, S = f(c, **x)
        ref = jax.jit(_per_sequence(c))(**x)
        chex.assert_trees_all_close(o, ref[0], rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref[0]))))
        chex.assert_trees_all_close(S, ref[1], rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref[1]))))
    assert f._cache_size() == 1


def test_one_sequence_equals_unpacked_and_no_state_crosses_a_boundary():
    cu, x = _packed()
    T = x["q"].shape[1]
    run = jax.jit(lambda cu, impl, q, k, v, beta, g, h0: tt.delta_rule(
        q, k, v, beta, log_decay=g, initial_state=h0, output_final_state=True, chunk_size=C, impl=impl,
        cu_seqlens=cu), static_argnames="impl")
    one = dict(x, h0=x["h0"][:1])
    for impl in ("chunked", "recurrent"):
        o1, S1 = run(jnp.asarray([0, T], jnp.int32), impl, **one)
        o, S = run(None, impl, **one)
        chex.assert_trees_all_close(o1, o, atol=1e-12, rtol=1e-7)
        chex.assert_trees_all_close(S1, S, atol=1e-12, rtol=1e-7)
    # changing the first sequence's tokens changes nothing in the others
    o0, S0 = run(cu, "chunked", **x)
    o2, S2 = run(cu, "chunked", **dict(x, v=x["v"].at[:, :5].set(100.0)))
    chex.assert_trees_all_equal(o2[:, 5:], o0[:, 5:])
    chex.assert_trees_all_equal(S2[1:], S0[1:])
    assert not np.allclose(S2[0], S0[0])
    # an empty sequence's final state is its initial state
    chex.assert_trees_all_equal(S0[1], x["h0"][1])
    # impl="auto" with cu_seqlens is the chunked form
    oa, Sa = run(cu, "auto", **x)
    chex.assert_trees_all_equal(oa, o0)
    chex.assert_trees_all_equal(Sa, S0)


def test_initial_state_per_sequence_and_pallas_are_checked():
    cu, x = _packed()
    args = (x["q"], x["k"], x["v"], x["beta"])
    with pytest.raises(ValueError, match=r"initial_state.*\[N, H, K, V\]"):
        tt.delta_rule(*args, initial_state=x["h0"][:2], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_state.*\[N, H, K, V\]"):
        tt.delta_rule(*args, initial_state=x["h0"][:1, None], cu_seqlens=cu)
    # the kernels run packed sequences (tests/test_kernels_delta.py) but not these toy head dims
    with pytest.raises(ValueError, match=r"impl='pallas'.*head dim K = 3 is not supported"):
        tt.delta_rule(*args, cu_seqlens=cu, impl="pallas")


def test_vmap_over_rows_each_with_its_own_packing():
    """A [B, T] batch of packed rows: vmap over rows, each with its own cu_seqlens (same N)."""
    cu1, x = _packed(seed=1)
    cu2 = _cu((1, 3, 10, 4, 0, 8))
    _, y = _packed(seed=2)
    xs = {n: jnp.stack([x[n], y[n]]) for n in x}
    o, S = jax.jit(jax.vmap(lambda cu, **kw: _packed_form(cu, "chunked")(**kw)))(jnp.stack([cu1, cu2]), **xs)
    for i, (cu, inp) in enumerate(((cu1, x), (cu2, y))):
        o_ref, S_ref = jax.jit(_per_sequence(cu))(**inp)
        chex.assert_trees_all_close(o[i], o_ref, atol=1e-10, rtol=1e-7)
        chex.assert_trees_all_close(S[i], S_ref, atol=1e-10, rtol=1e-7)
