"""The chunked linear attention reads each chunk straight from the ``[B, T, H, d]`` inputs and
writes outputs and gradients back in place. With a log-decay and small tensors its
forward+backward lays the whole sequence out at once instead (the rest of the suite runs
that, its shapes are small); here the chunk-by-chunk backward is forced (the byte threshold
set to 0) and checked against the token scan: outputs, final state and every gradient
(q, k, v, log-decay, initial state) in float64 at the harness' 1e-10, for causal, block
causal and bidirectional masking, with a ``-inf`` log-decay (a hard reset), a length that is
not a multiple of the chunk and at least 16 chunks (the unrolled scan)."""
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt

B, T, H, K, V, C = 2, 139, 2, 4, 3, 8  # 18 chunks, the last one padded


@pytest.fixture
def chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(sys.modules["tttla_jax.ops.linear_attention"], "_BULK_LAYOUT_BYTES", 0)


def test_decayed_chunk_by_chunk_backward_equals_token_scan_float64(chunk_by_chunk):
    rng = np.random.default_rng(0)
    g = -rng.uniform(0, 0.5, size=(B, T, H))
    g[0, 50, 1] = -np.inf
    x = {n: jnp.asarray(a, jnp.float64) for n, a in dict(
        q=rng.normal(size=(B, T, H, K)), k=rng.normal(size=(B, T, H, K)) / 2, v=rng.normal(size=(B, T, H, V)),
        g=g, h0=rng.normal(size=(B, H, K, V))).items()}
    for masking in ("causal", "chunk", "none"):
        def form(impl, masking=masking):
            return lambda q, k, v, g, h0: tt.linear_attention(
                q, k, v, log_decay=g, initial_state=h0, output_final_state=True, masking=masking,
                chunk_size=C, impl=impl)

        report = tt.testing.check_equivalence({"recurrent": form("recurrent"), "chunked": form("chunked")}, x,
                                              baseline="recurrent")
        print(masking, report)
        report.assert_ok()


@pytest.mark.parametrize("shape", [(4, 2, 2, T), (1, 4, 2, 70), (2, 2, 4, 70)],
                         ids=["batch-split", "head-split", "row-head-split"])
def test_pair_groups_equal_token_scan_float64(monkeypatch, shape):
    """The forward chunk scan without decay runs the (B, H) pairs as independent groups
    (``_PAIR_GROUPS``, at least ``_MIN_GROUP_PAIRS`` pairs each): forced on small shapes here,
    split over the batch, over the heads of one row, and over rows and heads; outputs, final
    state and gradients (the forward of the backward pass keeps every state) against the token
    scan, float64, causal (and bidirectional on the batch split, with 18 chunks: the unrolled
    scan)."""
    Bg, Hg, G, Tg = shape
    la = sys.modules["tttla_jax.ops.linear_attention"]
    monkeypatch.setattr(la, "_PAIR_GROUPS", G)
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
