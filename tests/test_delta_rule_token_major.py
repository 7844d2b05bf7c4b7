"""The chunked (gated) delta rule's forward reads each group of chunks straight from the
``[B, T, H, d]`` inputs and writes outputs in place (``chunk.delta_chunked_tokens``); its
derivatives (forward and reverse mode) are those of the group-layout form.

Checked against the token scan in float64 at the harness' 1e-10: outputs and final state of
the forward-only call (which must run the token-major scan), with a per-head log-decay
holding ``-inf`` (hard resets) and without one, at a length that is not a multiple of the
chunk, over several groups and at least 16 chunks (the unrolled group scan); gradients with
respect to a subset (keys, log-decay: the other tangents are symbolic zeros). The rest of
the delta-rule suite differentiates through the same call (``test_delta_rule.py``: every
gradient, and the JVP); the token-major and group-layout scans agree bitwise."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.ops import chunk

dr = importlib.import_module("tttla_jax.ops.delta_rule")

B, T, H, K, V, C = 2, 67, 2, 4, 3, 4  # 17 chunks (the last one padded), 5 groups of 4


def _inputs(decayed):
    rng = np.random.default_rng(1)
    k = rng.normal(size=(B, T, H, K))
    x = dict(q=rng.normal(size=(B, T, H, K)), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
             v=rng.normal(size=(B, T, H, V)), beta=rng.uniform(0.1, 1.5, size=(B, T, H)),
             h0=rng.normal(size=(B, H, K, V)))
    if decayed:
        g = -rng.uniform(0, 0.5, size=(B, T, H))
        g[0, 50, 1] = g[1, 5, 0] = -np.inf
        x["g"] = g
    return {n: jnp.asarray(a, jnp.float64) for n, a in x.items()}


def _form(impl):
    def run(q, k, v, beta, h0, g=None):
        return tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, output_final_state=True,
                             chunk_size=C, impl=impl)
    return run


@pytest.mark.parametrize("decayed", [True, False], ids=["gated", "no_decay"])
def test_token_major_forward_equals_token_scan_float64(decayed, monkeypatch):
    calls = []
    tokens = chunk.delta_chunked_tokens
    monkeypatch.setattr(chunk, "delta_chunked_tokens", lambda *a, **kw: calls.append(1) or tokens(*a, **kw))
    x = _inputs(decayed)
    forms = {"recurrent": _form("recurrent"), "chunked": _form("chunked")}
    # forward only (outputs and final state): the token-major scan
    report = tt.testing.check_equivalence(forms, x, baseline="recurrent", check_grads=False)
    print(report)
    report.assert_ok()
    assert calls, "the chunked forward did not run the token-major scan"
    if not decayed:
        return
    # reverse mode w.r.t. a subset (the other tangents are symbolic zeros), on a shorter
    # sequence (two groups; the unrolled scan's gradient compiles slowly)
    short = {n: a if n == "h0" else a[:, :13] for n, a in x.items()}
    report = tt.testing.check_equivalence(forms, short, baseline="recurrent", grad_wrt=["k", "g"])
    print(report)
    report.assert_ok()


@pytest.mark.slow
def test_token_major_scan_equals_group_layout_exactly():
    """The token-major scan and the group-layout scan run the same group step: bitwise equal
    outputs and states (groups of 3: the last group padded with whole chunks; also a
    per-channel log-decay, which the scan supports though the dispatch does not use it)."""
    x = _inputs(True)
    g_channel = jnp.asarray(-np.random.default_rng(2).uniform(0, 0.5, size=(B, T, H, K))).at[0, 9, 1, 2].set(-jnp.inf)
    for c, G, g in ((C, 3, x["g"]), (C, 4, g_channel)):
        args = (x["q"], x["k"], x["v"], x["beta"], g, x["h0"])
        ref = jax.jit(lambda *a: chunk.delta_chunked(*a, c, group=G))(*args)
        got = jax.jit(lambda *a: chunk.delta_chunked_tokens(*a, c, G))(*args)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
