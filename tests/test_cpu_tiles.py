"""On a CPU host the chunked forms run chunks of at most 32 tokens where the chunk size is
only a tiling choice (linear attention without decay or with a per-head log-decay, causal or
bidirectional; the delta rule with a per-head or no log-decay): ``chunk_size=64`` then runs
32-token tiles. Those
tiles equal the token scan — outputs, final states and every gradient (float64, the
harness' 1e-10) — with at least 16 tiles, so the unrolled chunk scans run, and with a
``-inf`` log-decay for the delta rule. (Packed sequences run the same chunk scans with
any chunk size: tests/test_varlen_delta.py, tests/test_linear_attention_nodecay.py.)"""
import jax.numpy as jnp
import numpy as np

import tttla_jax as tt

T, H, K, V, C = 520, 2, 4, 3, 64  # 17 tiles of 32 tokens on a CPU host, 9 chunks of 64 elsewhere


def _inputs(seed, B=1):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(B, T, H, K))
    return {n: jnp.asarray(a, jnp.float64) for n, a in dict(
        q=rng.normal(size=(B, T, H, K)), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
        v=rng.normal(size=(B, T, H, V))).items()}


def _check(forms, x):
    report = tt.testing.check_equivalence(forms, x, baseline="recurrent")
    print(report)
    report.assert_ok()
    return report


def test_linear_attention_without_decay_tiles_equal_token_scan_float64():
    x = dict(_inputs(0, B=2), h0=jnp.asarray(np.random.default_rng(1).normal(size=(2, H, K, V))))

    def form(impl):
        return lambda q, k, v, h0: tt.linear_attention(q, k, v, initial_state=h0, output_final_state=True,
                                                       chunk_size=C, impl=impl)

    _check({"recurrent": form("recurrent"), "chunked": form("chunked")}, x)


def test_gated_delta_rule_tiles_equal_token_scan_float64_with_cut():
    rng = np.random.default_rng(2)
    g = -rng.uniform(0.0, 0.3, size=(2, T, H))
    g[1, 250, 0] = -np.inf  # a cut inside a tile
    x = dict(_inputs(3, B=2), beta=jnp.asarray(rng.uniform(0.1, 0.9, size=(2, T, H))), g=jnp.asarray(g),
             h0=jnp.asarray(rng.normal(size=(2, H, K, V))))

    def form(impl):
        return lambda q, k, v, beta, g, h0: tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=h0,
                                                          output_final_state=True, chunk_size=C, impl=impl)

    report = _check({"recurrent": form("recurrent"), "chunked": form("chunked")}, x)
    assert {e.quantity for e in report.entries} >= {"output", "state", "grad[g]", "grad[beta]", "grad[h0]"}


def test_linear_attention_decayed_tiles_equal_token_scan_float64():
    """With a per-head log-decay the chunked form runs 32-token tiles on a CPU host, forward
    alone and differentiated: outputs and final states of the forward alone, then outputs,
    states and every gradient (q, k, v, log-decay, initial state), against the token scan,
    with cuts (``-inf``, ``-1e30``) inside tiles, for ``masking="causal"`` and ``"none"``."""
    rng = np.random.default_rng(4)
    g = -rng.uniform(0.0, 0.3, size=(2, T, H))
    g[0, 100, 1] = -np.inf  # a cut inside a tile
    g[1, 200:240, 0] = -1e30  # a run of cuts across a tile boundary
    g[1, 400, :] = -1e30
    x = dict(_inputs(5, B=2), g=jnp.asarray(g), h0=jnp.asarray(rng.normal(size=(2, H, K, V))))
    for masking in ("causal", "none"):
        def form(impl, masking=masking):
            return lambda q, k, v, g, h0: tt.linear_attention(q, k, v, log_decay=g, initial_state=h0,
                                                              output_final_state=True, masking=masking,
                                                              chunk_size=C, impl=impl)

        for grads in (False, True):
            report = tt.testing.check_equivalence({"recurrent": form("recurrent"), "chunked": form("chunked")}, x,
                                                  baseline="recurrent", check_grads=grads)
            print(report)
            report.assert_ok()
            assert {e.quantity for e in report.entries} >= {"output", "state"} | (
                {"grad[q]", "grad[k]", "grad[v]", "grad[g]", "grad[h0]"} if grads else set())
