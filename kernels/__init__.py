"""Pallas kernels (GPU via Triton lowering, TPU via Mosaic), installed as ``tttla_jax.kernels``.

``tt.linear_attention(..., impl="pallas")`` calls :func:`linear_attention`;
``impl="auto"`` asks :func:`auto_supported` first.
"""
from tttla_jax.kernels.linear_attention_kernel import (
    BlockSizes,
    auto_supported,
    chunk_costs,
    linear_attention,
    unsupported_reason,
)

__all__ = ["BlockSizes", "auto_supported", "chunk_costs", "linear_attention", "unsupported_reason"]
