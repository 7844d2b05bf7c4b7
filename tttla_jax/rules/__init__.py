"""Fast-weight update rules, one module per family (SPEC §2–§6)."""
from tttla_jax.rules.base import NotAssociativeError, REGISTRY, Rule, register

__all__ = ["NotAssociativeError", "REGISTRY", "Rule", "register"]
