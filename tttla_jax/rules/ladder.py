"""The paper's simplification ladder (docs/ladder.md, paper Table 2) as named LaCT presets.

Applied cumulatively to LaCT (docs/rules/lact.md):

==========  ==============================================================
``"v0"``    LaCT baseline: all layers updated, post weight norm, per-token lr,
            momentum, Muon (SwiGLU fast net)
``"v1"``    + update only the last layer W1 (φ static)
``"v2"``    + no weight norm (now associative: parallel form exists)
``"v3"``    + single linear fast layer ``f(x) = W1 x``
``"v4"``    + no per-token lr: a constant lr (``constant_lr``, default 1e-3)
``"v5"``    + no momentum
``"v6"``    + no Muon = plain linear attention ``o = q (W0 + Σ kᵀ v)`` (chunk-causal)
==========  ==============================================================

Anomaly presets (paper Table 1, all on top of V0): ``"ascent"`` flips the sign of the
update (the reference step ``W ← W + lr ∇⟨f(k), v⟩`` is descent on the dot-product loss
``−⟨f(k), v⟩``; the anomaly ascends it, equivalently negates the values); ``"q_is_k"``
reads the keys instead of the queries; ``"inner_steps"`` takes ``n`` gradient steps per
chunk (``ladder("inner_steps", inner_steps=n)``, default 2).

How a preset is applied to inputs: ``ladder(name)`` returns a :class:`LaCTRule` config;
call it like any rule, ``rule(q, k, v, lr, rule.init_state(w0, w1, w2, B), momentum)``.
Inputs a preset does not use are ignored: V3+ have no W0/W2 (pass ``None``), V4+ ignore
the ``lr`` argument and use ``constant_lr`` for every token, V5+ ignore ``momentum``.
Any field can be overridden: ``ladder("v2", chunk_size=64)``.
"""
from __future__ import annotations

import dataclasses

from tttla_jax.rules.lact import LaCTRule

_V0 = dict(fast_net="swiglu", update="all", weight_norm="post", use_momentum=True, muon=True,
           constant_lr=None)

# cumulative changes, in Table 2 order
_STEPS = (
    ("v0", {}),
    ("v1", dict(update="w1")),
    ("v2", dict(weight_norm=None)),
    ("v3", dict(fast_net="linear")),
    ("v4", dict(constant_lr=1e-3)),
    ("v5", dict(use_momentum=False)),
    ("v6", dict(muon=False)),
)

_ANOMALIES = {
    "ascent": dict(ascent=False),
    "q_is_k": dict(q_is_k=True),
    "inner_steps": dict(inner_steps=2),
}

PRESETS = tuple(n for n, _ in _STEPS)
ANOMALIES = tuple(_ANOMALIES)


def ladder(name: str, *, chunk_size: int = 2048, **overrides) -> LaCTRule:
    """The LaCT rule config of ladder step ``name`` ("v0" … "v6") or an anomaly preset.

    Args:
      name: "v0" … "v6" (docs/ladder.md, cumulative) or "ascent", "q_is_k", "inner_steps" (on V0).
      chunk_size: C (the reference uses 2048).
      **overrides: any :class:`LaCTRule` field, applied last (e.g. ``constant_lr=0.01``,
        ``inner_steps=4``).

    Returns:
      A frozen :class:`LaCTRule`. V2–V6 have a parallel form (``rule.parallel``, and
      ``rule(...)`` picks it); V0/V1 raise :class:`NotAssociativeError` from ``parallel``.
    """
    names = PRESETS + ANOMALIES
    if name not in names:
        raise ValueError(f"name: got {name!r}, expected one of {names}")
    cfg = dict(_V0, chunk_size=chunk_size)
    if name in _ANOMALIES:
        cfg.update(_ANOMALIES[name])
    else:
        for step, change in _STEPS:
            cfg.update(change)
            if step == name:
                break
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LaCTRule)}
    if unknown:
        raise ValueError(f"overrides: unknown LaCTRule fields {sorted(unknown)}")
    cfg.update(overrides)
    return LaCTRule(**cfg)


def _register_presets():
    """Every ladder step and anomaly preset joins the rule registry (as ``ladder_<name>``)
    so the registry-driven equivalence test checks each one (small chunk for the tests)."""
    from tttla_jax.rules.base import register
    from tttla_jax.rules.lact.fixtures import example_inputs

    for name in PRESETS + ANOMALIES:
        register(f"ladder_{name}")(lambda name=name: (ladder(name, chunk_size=4), example_inputs))


_register_presets()
