"""Multi-query associative recall (MQAR), generated in-process with numpy.

Two protocols (``protocol=``), both with keys from ``[1, vocab/2)`` and values from
``[vocab/2, vocab)``, the query distances drawn from the power law ``p(g) ∝ (g+1)^(a-1)``
(Zoology, Arora et al. 2023, §3 "MQAR"; ``a = 0.01`` there) and exactly ``num_kv``
scored positions per example:

``"zoology"`` — the construction of the Zoology benchmark (its ``multiquery_ar`` with
``random_non_queries=False``): ``n = num_kv`` distinct keys and ``n`` distinct values
(both without replacement), context ``k1 v1 ... kn vn``; the query region (the last
``seq_len - 2n`` tokens) holds only the keys, key ``i`` at offset ``2·g_i`` (``g`` drawn
without replacement from ``[0, (seq_len - 2n) / 2)`` with the power law), every other
token 0. The model is scored at the query keys only: ``targets[t]`` is the value paired
with ``inputs[t]`` in the context (0 where ``mask`` is False). ``seq_len`` must be even.

``"ours"`` (the default, the library's earlier generator) — described next.

One example of length ``seq_len`` (inputs) is ``k1 v1 k2 v2 ... kn vn`` (``n = num_kv``
distinct keys from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``) followed by a query
region of ``seq_len - 2n`` slots where every key appears once more, at a distance from the
context drawn from a power law ``p(d) ∝ d^(a-1)`` (Zoology's MQAR, Arora et al. 2023). The
token after a queried key is its value; the model is scored only there: ``targets[t]`` is
the value paired with ``inputs[t]`` in the context and ``mask[t]`` is True exactly at the
query-key positions. Unused slots hold token 0.
"""
from __future__ import annotations

import numpy as np


PROTOCOLS = ("ours", "zoology")


def power_law(space: int, power_a: float) -> np.ndarray:
    """Probabilities of the query gaps ``g = 0 .. space-1``: ``∝ a·(g+1)^(a-1)``, normalised."""
    d = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * d ** (power_a - 1)
    return p / p.sum()


def _check(seq_len, num_kv, vocab_size, power_a, protocol):
    for name, v in (("seq_len", seq_len), ("num_kv", num_kv), ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    if not (isinstance(power_a, (int, float, np.floating)) and np.isfinite(power_a) and power_a > 0):
        raise ValueError(f"power_a: expected a positive finite float, got {power_a!r}")
    if seq_len < 4 * num_kv:
        raise ValueError(f"seq_len: expected >= 4 * num_kv = {4 * num_kv}, got {seq_len}")
    if protocol == "zoology" and seq_len % 2:
        raise ValueError(f"seq_len: the zoology protocol needs an even seq_len, got {seq_len}")
    half = vocab_size // 2
    if half - 1 < num_kv or vocab_size % 2:
        raise ValueError(f"vocab_size: expected an even size with at least num_kv={num_kv} keys "
                         f"in [1, vocab/2), got {vocab_size}")


def _zoology_example(rng, seq_len, num_kv, vocab_size, power_a):
    half = vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=num_kv, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=num_kv, replace=False)
    ctx = 2 * num_kv
    inputs = np.zeros(seq_len, np.int32)
    inputs[0:ctx:2] = keys
    inputs[1:ctx:2] = values
    space = (seq_len - ctx) // 2
    gaps = rng.choice(space, size=num_kv, replace=False, p=power_law(space, power_a))
    qpos = ctx + 2 * gaps
    inputs[qpos] = keys                      # key i at gap i; the rest of the region stays 0
    targets = np.zeros(seq_len, np.int32)
    targets[qpos] = values
    mask = np.zeros(seq_len, bool)
    mask[qpos] = True
    return inputs, targets, mask


def mqar_example(rng: np.random.Generator, *, seq_len: int, num_kv: int, vocab_size: int,
                 power_a: float = 0.01, protocol: str = "ours"):
    """One example: ``(inputs [L] int32, targets [L] int32, mask [L] bool)`` (``protocol``:
    see the module doc)."""
    _check(seq_len, num_kv, vocab_size, power_a, protocol)
    if protocol == "zoology":
        return _zoology_example(rng, seq_len, num_kv, vocab_size, power_a)
    half = vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=num_kv, replace=False)
    values = rng.integers(half, vocab_size, size=num_kv)
    seq = np.zeros(seq_len + 1, np.int64)
    ctx = 2 * num_kv
    seq[0:ctx:2] = keys
    seq[1:ctx:2] = values
    space = (seq_len + 1 - ctx) // 2          # query slots (key, value) after the context
    slots = rng.choice(space, size=num_kv, replace=False, p=power_law(space, power_a))
    order = rng.permutation(num_kv)
    qpos = ctx + 2 * slots
    seq[qpos] = keys[order]
    seq[qpos + 1] = values[order]
    inputs = seq[:-1].astype(np.int32)
    targets = seq[1:].astype(np.int32)
    mask = np.zeros(seq_len, bool)
    mask[qpos] = True
    return inputs, targets, mask


def mqar_batch(seed: int, indices, *, seq_len: int, num_kv: int, vocab_size: int,
               power_a: float = 0.01, protocol: str = "ours") -> dict:
    """Examples ``indices`` of the stream with ``seed``: each one depends only on
    ``(seed, index)``, so any subset, in any order, is reproducible.

    Returns ``{"inputs", "targets": [N, L] int32, "mask": [N, L] bool}``.
    """
    _check(seq_len, num_kv, vocab_size, power_a, protocol)
    ex = [mqar_example(np.random.default_rng([int(seed), int(i)]), seq_len=seq_len,
                       num_kv=num_kv, vocab_size=vocab_size, power_a=power_a, protocol=protocol)
          for i in indices]
    if not ex:
        raise ValueError("indices: expected at least one example index, got none")
    return {"inputs": np.stack([e[0] for e in ex]), "targets": np.stack([e[1] for e in ex]),
            "mask": np.stack([e[2] for e in ex])}
