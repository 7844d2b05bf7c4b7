"""Pallas kernels (GPU via Triton lowering, TPU via Mosaic), installed as ``tttla_jax.kernels``.

``tt.linear_attention(..., impl="pallas")`` calls :func:`linear_attention`;
``impl="auto"`` asks :func:`auto_supported` first. The delta-rule forward kernel
(:func:`delta_rule`, backward in XLA) is reached the same way through
:func:`delta_rule_supported`.
"""
from tttla_jax.kernels.delta_rule_kernel import delta_rule, delta_rule_supported, delta_rule_unsupported_reason
from tttla_jax.kernels.linear_attention_kernel import (
    BlockSizes,
    auto_supported,
    chunk_costs,
    linear_attention,
    unsupported_reason,
)

__all__ = [
    "BlockSizes",
    "auto_supported",
    "chunk_costs",
    "delta_rule",
    "delta_rule_supported",
    "delta_rule_unsupported_reason",
    "linear_attention",
    "unsupported_reason",
]
