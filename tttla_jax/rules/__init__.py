"""Fast-weight update rules, one module per family (SPEC §2–§6).

Each rule is a frozen config dataclass with ``recurrent(...)`` (the ``lax.scan`` form) and,
where the math allows, ``parallel(...)``; ``breaks_associativity()`` names what prevents a
parallel form (``None`` if there is one).
"""
from tttla_jax.rules.base import NotAssociativeError, REGISTRY, Rule, register
from tttla_jax.rules.lact import LaCTRule, LaCTState, lact_swiglu, newton_schulz5
from tttla_jax.rules.linear import DeltaRule, LinearAttentionRule, LinearFastWeightRule
from tttla_jax.rules.titans import TitansRule, TitansState, titans
from tttla_jax.rules.ttt import TTTLinearRule, TTTMLPRule, ttt_linear, ttt_mlp

__all__ = [
    "DeltaRule",
    "LaCTRule",
    "LaCTState",
    "LinearAttentionRule",
    "LinearFastWeightRule",
    "NotAssociativeError",
    "REGISTRY",
    "Rule",
    "TTTLinearRule",
    "TTTMLPRule",
    "TitansRule",
    "TitansState",
    "lact_swiglu",
    "newton_schulz5",
    "register",
    "titans",
    "ttt_linear",
    "ttt_mlp",
]
