"""Fast-weight update rules, one module per family (docs/ttt_as_linear_attention.md, docs/rules/lact.md, docs/rules/ttt.md, docs/rules/titans.md, docs/rules/vit3.md).

Each rule is a frozen config dataclass implementing the rule protocol of
:mod:`tttla_jax.rules.base` next to its math: ``recurrent(...)`` (the ``lax.scan`` form);
where the math allows, ``parallel(..., impl=...)`` (``breaks_associativity()`` names what
prevents one, ``None`` if there is one); ``impls`` / ``parallel_impls()`` /
``impl_reasons()`` and ``rule(..., impl="auto")`` over the one implementation vocabulary
(:mod:`tttla_jax.impl`, docs/implementations.md); ``reading(...)`` / ``has_reading()``, the
rule's linear-attention reading (:class:`tttla_jax.reduce.Reading`,
docs/ttt_as_linear_attention.md); and ``linear_attention_reason()`` /
``linear_attention_inputs(...)`` for a rule that *is* plain (decayed) linear attention.
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
