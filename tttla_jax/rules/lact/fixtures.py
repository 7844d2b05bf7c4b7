"""Registry entries of the LaCT rule (:data:`tttla_jax.rules.REGISTRY`) and their example inputs:
the registry-driven equivalence tests (recurrent == every parallel layout == reading) run them."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tttla_jax.rules.base import register
from tttla_jax.rules.lact.rule import LaCTRule


def example_inputs(rule: LaCTRule, seed: int = 0, dtype=jnp.float64, B=1, T=11, H=2, K=4, Dh=6, V=3):
    """``(q, k, v, lr, state, momentum)`` — the positional inputs of ``rule.recurrent`` — with
    O(1)-scaled random values (``Dh = K`` for the linear fast net; momentum only if used)."""
    rng = np.random.default_rng(seed)
    if rule.linear:
        Dh = K
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), dtype)
    lr = jnp.asarray(rng.uniform(0.01, 0.1, size=(B, T, H, 3)), dtype)
    m = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), dtype) if rule.use_momentum else None
    w1 = jnp.asarray(rng.normal(size=(H, V, Dh)) / np.sqrt(Dh), dtype)
    if rule.linear:
        w0 = w2 = None
    else:
        w0 = jnp.asarray(rng.normal(size=(H, Dh, K)) / np.sqrt(K), dtype)
        w2 = jnp.asarray(rng.normal(size=(H, Dh, K)) / np.sqrt(K), dtype)
    return q, k, v, lr, rule.init_state(w0, w1, w2, B), m


@register("lact")
def _registry_entry():
    """(rule, builder): ``builder(rule, seed, dtype)`` -> positional args of ``rule.recurrent``."""
    return LaCTRule(chunk_size=4, use_momentum=True, muon=True), example_inputs


@register("lact_v2")
def _registry_entry_v2():
    """Ladder V2 (only W1, no weight norm, momentum, Muon): has a parallel form."""
    return LaCTRule(chunk_size=4, update="w1", weight_norm=None, use_momentum=True, muon=True), example_inputs
