"""The chunked linear-attention form without a log-decay takes its own path (no decay
terms, no log-decay gradient): on packed sequences (``cu_seqlens``, reset and final-state
bookkeeping inside the chunk scan and its custom backward) it equals the token scan —
outputs, per-sequence final states and gradients w.r.t. q, k, v and the initial states
(float64, the harness' 1e-10). The unpacked no-decay case runs in tests/test_linear_attention.py."""
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt

LENS = (5, 0, 9, 1, 8, 3)  # chunk 4: partial, empty, 2 chunks + 1, one token, exactly 2, partial
H, K, V, C = 2, 3, 4, 4


@pytest.mark.parametrize("masking", ["causal", pytest.param("chunk", marks=pytest.mark.slow),
                                     pytest.param("none", marks=pytest.mark.slow)])
def test_packed_chunked_without_decay_equals_token_scan_float64(masking):
    rng = np.random.default_rng(0)
    T, N = sum(LENS), len(LENS)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(LENS)]), jnp.int32)
    x = {n: jnp.asarray(a, jnp.float64) for n, a in dict(
        q=rng.normal(size=(1, T, H, K)), k=rng.normal(size=(1, T, H, K)) / np.sqrt(K),
        v=rng.normal(size=(1, T, H, V)), h0=rng.normal(size=(N, H, K, V))).items()}

    def form(impl):
        def f(q, k, v, h0):
            return tt.linear_attention(q, k, v, initial_state=h0, output_final_state=True, masking=masking,
                                       chunk_size=C, impl=impl, cu_seqlens=cu)
        return f

    report = tt.testing.check_equivalence({"recurrent": form("recurrent"), "chunked": form("chunked")}, x)
    print(report)
    report.assert_ok()
    assert {e.quantity for e in report.entries} >= {"output", "state", "grad[h0]", "grad[q]", "grad[k]", "grad[v]"}
