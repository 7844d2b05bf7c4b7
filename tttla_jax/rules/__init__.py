"""Fast-weight update rules, one module per family (SPEC §2–§6).

Each rule is a frozen config dataclass with ``recurrent(...)`` (the ``lax.scan`` form) and,
where the math allows, ``parallel(...)``; ``breaks_associativity()`` names what prevents a
parallel form (``None`` if there is one).
"""
from tttla_jax.rules.base import NotAssociativeError, REGISTRY, Rule, register
from tttla_jax.rules.linear import DeltaRule, LinearAttentionRule, LinearFastWeightRule

__all__ = [
    "DeltaRule",
    "LinearAttentionRule",
    "LinearFastWeightRule",
    "NotAssociativeError",
    "REGISTRY",
    "Rule",
    "register",
]
