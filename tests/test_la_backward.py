"""The chunked linear attention's hand-written backward (key-major step,
``_chunk_bwd_step_kmajor``, in a token-major reverse scan) against the float64 loop of
docs/linear_attention.md: outputs, final state and the gradients w.r.t. q, k, v, the
log-decay and the initial state at 1e-10 (chex), with ``chunk_size=64`` — on a CPU host the
differentiated call then runs 32-token tiles, with or without a per-head log-decay (checked
by a spy on the backward's tile) — over 3 tiles (the last one padded), with cuts (``-inf``
and ``-1e30`` log-decays) inside a tile and across a tile boundary, for every masking. (The
loop is unrolled per token, so it stays short here; tests/test_cpu_tiles.py checks 17 tiles,
the unrolled scan, against the token scan.)"""
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.impl import platform
from tttla_jax.reference import linear_attention_loop

# slow: 20-40 s per case on a loaded 2-core host (the loop's compile); the default suite covers
# the same backward against the token scan (tests/test_cpu_tiles.py,
# tests/test_linear_attention_token_major.py) and against this loop on 3 chunks of 8
# (tests/test_linear_attention.py)
pytestmark = pytest.mark.slow

B, T, H, K, V, CHUNK = 2, 70, 2, 4, 3, 64
# XLA's cheap CPU pipeline (as tests/test_linear_attention.py): the per-token loop compiles slowly
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _inputs(decay):
    rng = np.random.default_rng(7)
    g = -rng.uniform(0.0, 0.3, size=(B, T, H))
    g[0, 50, 1] = -np.inf  # a cut inside a tile
    g[1, 28:36, 0] = -1e30  # a run of cuts across a tile boundary (32)
    return (jnp.asarray(rng.normal(size=(B, T, H, K))), jnp.asarray(rng.normal(size=(B, T, H, K)) / 2),
            jnp.asarray(rng.normal(size=(B, T, H, V))), jnp.asarray(g) if decay else None,
            jnp.asarray(rng.normal(size=(B, H, K, V))))


def _outputs_and_grads(fn, args):
    def loss(q, k, v, g, S0):
        o, S = fn(q, k, v, g, S0)
        wo = jnp.sin(jnp.arange(o.size, dtype=jnp.float64).reshape(o.shape))
        ws = jnp.cos(jnp.arange(S.size, dtype=jnp.float64).reshape(S.shape))
        return jnp.sum(o * wo) + jnp.sum(S * ws), (o, S)

    argnums = (0, 1, 2, 4) if args[3] is None else (0, 1, 2, 3, 4)
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True), compiler_options=FAST)(*args)
    return out, grads


@pytest.mark.parametrize("decay", [True, False], ids=["log-decay", "no-decay"])
@pytest.mark.parametrize("masking", ["causal", "chunk", "none"])
def test_backward_matches_float64_loop(monkeypatch, decay, masking):
    la = sys.modules["tttla_jax.ops.linear_attention"]
    tiles = []
    backward = la._tokens_backward

    def spy(*a, **kw):
        tiles.append(a[8])  # C
        return backward(*a, **kw)

    monkeypatch.setattr(la, "_tokens_backward", spy)
    args = _inputs(decay)

    def form(q, k, v, g, S0):
        return tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, output_final_state=True,
                                   masking=masking, chunk_size=CHUNK, impl="chunked")

    def ref(q, k, v, g, S0):
        return linear_attention_loop(q, k, v, log_decay=g, initial_state=S0, masking=masking, chunk_size=CHUNK)

    out, grads = _outputs_and_grads(form, args)
    out_r, grads_r = _outputs_and_grads(ref, args)
    assert tiles, "the chunked form's backward did not run"
    if platform() == "cpu":
        assert tiles == [CHUNK if masking == "chunk" else la._CPU_TILE]
    chex.assert_trees_all_equal_shapes(grads, grads_r)
    chex.assert_trees_all_close(out, out_r, atol=1e-10, rtol=0.0, custom_message="outputs/state")
    chex.assert_trees_all_close(grads, grads_r, atol=1e-10, rtol=0.0,
                                custom_message="grads dq dk dv (dg) dS0")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grads))
