"""Multi-query associative recall (MQAR), generated in-process with numpy.

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


def mqar_example(rng: np.random.Generator, *, seq_len: int, num_kv: int, vocab_size: int,
                 power_a: float = 0.01):
    """One example: ``(inputs [L] int32, targets [L] int32, mask [L] bool)``."""
    if seq_len < 4 * num_kv:
        raise ValueError(f"seq_len: expected >= 4 * num_kv = {4 * num_kv}, got {seq_len}")
    half = vocab_size // 2
    if half - 1 < num_kv or vocab_size % 2:
        raise ValueError(f"vocab_size: expected an even size with at least num_kv={num_kv} keys "
                         f"in [1, vocab/2), got {vocab_size}")
    keys = rng.choice(np.arange(1, half), size=num_kv, replace=False)
    values = rng.integers(half, vocab_size, size=num_kv)
    seq = np.zeros(seq_len + 1, np.int64)
    ctx = 2 * num_kv
    seq[0:ctx:2] = keys
    seq[1:ctx:2] = values
    space = (seq_len + 1 - ctx) // 2          # query slots (key, value) after the context
    d = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * d ** (power_a - 1)
    p /= p.sum()
    slots = rng.choice(space, size=num_kv, replace=False, p=p)
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
               power_a: float = 0.01) -> dict:
    """Examples ``indices`` of the stream with ``seed``: each one depends only on
    ``(seed, index)``, so any subset, in any order, is reproducible.

    Returns ``{"inputs", "targets": [N, L] int32, "mask": [N, L] bool}``.
    """
    ex = [mqar_example(np.random.default_rng([int(seed), int(i)]), seq_len=seq_len,
                       num_kv=num_kv, vocab_size=vocab_size, power_a=power_a) for i in indices]
    return {"inputs": np.stack([e[0] for e in ex]), "targets": np.stack([e[1] for e in ex]),
            "mask": np.stack([e[2] for e in ex])}
