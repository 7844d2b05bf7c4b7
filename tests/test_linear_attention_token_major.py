"""The chunked linear attention reads each chunk straight from the ``[B, T, H, d]`` inputs and
writes outputs and gradients back in place, forward and backward (the backward's step
key-major, ``_chunk_bwd_step_kmajor``). Checked against the token scan: outputs, final state
and every gradient (q, k, v, log-decay, initial state) in float64 at the harness' 1e-10, for
causal, block causal and bidirectional masking, with a ``-inf`` log-decay (a hard reset), a
length that is not a multiple of the chunk and at least 16 chunks (the unrolled scan); and
with the (B, H) pairs split into groups, forward and backward."""
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt

B, T, H, K, V, C = 2, 139, 2, 4, 3, 8  # 18 chunks, the last one padded


def _chunked_equals_token_scan(x, masking):
    """The chunked form against the token scan on the inputs ``x`` (q, k, v, h0 and optionally
    g), outputs, final state and every gradient; returns the report."""
    def form(impl):
        return lambda q, k, v, h0, g=None: tt.linear_attention(
            q, k, v, log_decay=g, initial_state=h0, output_final_state=True, masking=masking,
            chunk_size=C, impl=impl)

    report = tt.testing.check_equivalence({"recurrent": form("recurrent"), "chunked": form("chunked")}, x,
                                          baseline="recurrent")
    print(masking, report)
    report.assert_ok()
    return report


def test_decayed_chunk_by_chunk_backward_equals_token_scan_float64():
    rng = np.random.default_rng(0)
    g = -rng.uniform(0, 0.5, size=(B, T, H))
    g[0, 50, 1] = -np.inf
    x = {n: jnp.asarray(a, jnp.float64) for n, a in dict(
        q=rng.normal(size=(B, T, H, K)), k=rng.normal(size=(B, T, H, K)) / 2, v=rng.normal(size=(B, T, H, V)),
        g=g, h0=rng.normal(size=(B, H, K, V))).items()}
    for masking in ("causal", "chunk", "none"):
        _chunked_equals_token_scan(x, masking)


@pytest.mark.parametrize("shape", [(4, 2, 2, T), (1, 4, 2, 70), (2, 2, 4, 70)],
                         ids=["batch-split", "head-split", "row-head-split"])
def test_pair_groups_equal_token_scan_float64(monkeypatch, shape):
    """The forward chunk scan without decay runs the (B, H) pairs as independent groups
    (``_PAIR_GROUPS``, at least ``_MIN_GROUP_PAIRS`` pairs each), and the backward can
    (``_BWD_PAIR_GROUPS``, one by default): forced on small shapes here, both, split over the
    batch, over the heads of one row, and over rows and heads; outputs, final state and
    gradients (the forward of the backward pass keeps every state) against the token scan,
    float64, causal (and bidirectional on the batch split, with 18 chunks: the unrolled
    scan)."""
    Bg, Hg, G, Tg = shape
    la = sys.modules["tttla_jax.ops.linear_attention"]
    monkeypatch.setattr(la, "_PAIR_GROUPS", G)
    monkeypatch.setattr(la, "_BWD_PAIR_GROUPS", G)
    monkeypatch.setattr(la, "_MIN_GROUP_PAIRS", 1)
    assert len(la._pair_groups(Bg, Hg, G)) == G
    rng = np.random.default_rng(1)
    x = {n: jnp.asarray(a, jnp.float64) for n, a in dict(
        q=rng.normal(size=(Bg, Tg, Hg, K)), k=rng.normal(size=(Bg, Tg, Hg, K)) / 2, v=rng.normal(size=(Bg, Tg, Hg, V)),
        h0=rng.normal(size=(Bg, Hg, K, V))).items()}
    for masking in ("causal", "none") if Bg == 4 else ("causal",):
        def form(impl, masking=masking):
            return lambda q, k, v, h0: tt.linear_attention(q, k, v, initial_state=h0, output_final_state=True,
                                                           masking=masking, chunk_size=C, impl=impl)

        forms = {"recurrent": form("recurrent"), "chunked": form("chunked")}
        for grads in (False, True):  # the forward alone (the custom VJP's primal) and with the backward
            report = tt.testing.check_equivalence(forms, x, baseline="recurrent", check_grads=grads)
            print(masking, grads, report)
            report.assert_ok()


@pytest.mark.parametrize("decayed", [False, True], ids=["no-decay", "log-decay"])
def test_backward_pair_groups_equal_token_scan_float64(monkeypatch, decayed):
    """The backward scan with the (B, H) pairs in two groups (``_BWD_PAIR_GROUPS``; the forward
    with a log-decay keeps one group): gradients of q, k, v, the log-decay (a ``-inf`` cut) and
    the initial state against the token scan, float64, causal and block causal."""
    la = sys.modules["tttla_jax.ops.linear_attention"]
    monkeypatch.setattr(la, "_BWD_PAIR_GROUPS", 2)
    monkeypatch.setattr(la, "_MIN_GROUP_PAIRS", 1)
    rng = np.random.default_rng(2)
    g = -rng.uniform(0, 0.5, size=(4, T, 2))
    g[3, 77, 0] = -np.inf
    x = dict(q=rng.normal(size=(4, T, 2, K)), k=rng.normal(size=(4, T, 2, K)) / 2, v=rng.normal(size=(4, T, 2, V)),
             h0=rng.normal(size=(4, 2, K, V)))
    if decayed:
        x["g"] = g
    x = {n: jnp.asarray(a, jnp.float64) for n, a in x.items()}
    for masking in ("causal", "chunk"):
        report = _chunked_equals_token_scan(x, masking)
        assert {e.quantity for e in report.entries} >= {"grad[q]", "grad[k]", "grad[v]", "grad[h0]"} | (
            {"grad[g]"} if decayed else set())
