"""Fast-weight update rules, one module per family (docs/ttt_as_linear_attention.md, docs/rules/lact.md, docs/rules/ttt.md, docs/rules/titans.md, docs/rules/vit3.md).

Each rule is a frozen config dataclass with ``recurrent(...)`` (the ``lax.scan`` form) and,
where the math allows, ``parallel(...)``; ``breaks_associativity()`` names what prevents a
parallel form (``None`` if there is one).
"""
from tttla_jax.rules.base import NotAssociativeError, REGISTRY, Rule, register
from tttla_jax.rules.lact import LaCTRule, LaCTState, lact_swiglu, newton_schulz5
from tttla_jax.rules.ladder import ANOMALIES as LADDER_ANOMALIES, PRESETS as LADDER_PRESETS, ladder
from tttla_jax.rules.linear import DeltaRule, LinearAttentionRule, LinearFastWeightRule
from tttla_jax.rules.titans import TitansRule, TitansState, titans
from tttla_jax.rules.ttt import TTTLinearRule, TTTLinearState, TTTMLPRule, TTTMLPState, ttt_linear, ttt_mlp
from tttla_jax.rules.vit3 import ViT3ConvRule, ViT3GLURule, vit3_conv, vit3_glu

__all__ = [
    "DeltaRule",
    "LaCTRule",
    "LaCTState",
    "LADDER_ANOMALIES",
    "LADDER_PRESETS",
    "LinearAttentionRule",
    "LinearFastWeightRule",
    "NotAssociativeError",
    "REGISTRY",
    "Rule",
    "TTTLinearRule",
    "TTTLinearState",
    "TTTMLPRule",
    "TTTMLPState",
    "ViT3ConvRule",
    "ViT3GLURule",
    "TitansRule",
    "TitansState",
    "lact_swiglu",
    "ladder",
    "newton_schulz5",
    "register",
    "titans",
    "ttt_linear",
    "ttt_mlp",
    "vit3_conv",
    "vit3_glu",
]
