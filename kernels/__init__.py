"""Pallas kernels (GPU via Triton lowering, TPU via Mosaic), installed as ``tttla_jax.kernels``.

``tt.linear_attention(..., impl="pallas")`` calls :func:`linear_attention` and
``tt.delta_rule(..., impl="pallas")`` :func:`delta_rule` (forward and backward kernels, any
head dims 16..256, packed sequences); both ops pass ``block_sizes=`` (:class:`BlockSizes`) and ``interpret=``
through. ``impl="auto"`` picks a kernel only on GPU/TPU and when :func:`unsupported_reason` /
:func:`delta_rule_unsupported_reason` return ``None`` for the call (the ops resolve this
with :func:`tttla_jax.impl.resolve`; docs/implementations.md).
"""
from tttla_jax.kernels.delta_rule_kernel import delta_rule, delta_rule_unsupported_reason
from tttla_jax.kernels.linear_attention_kernel import (
    CHIP_TABLES,
    BlockSizes,
    chip_block_sizes,
    chip_name,
    chunk_costs,
    linear_attention,
    padded_dim,
    unsupported_reason,
)

# The kernels that take a per-channel log-decay [B, T, H, K] (read by the ops' impl resolution):
# linear attention (GLA) and the delta rule (Kimi Delta Attention).
PER_CHANNEL_GATES: tuple = ("linear_attention", "delta_rule")

__all__ = [
    "CHIP_TABLES",
    "BlockSizes",
    "chip_block_sizes",
    "chip_name",
    "chunk_costs",
    "delta_rule",
    "delta_rule_unsupported_reason",
    "linear_attention",
    "padded_dim",
    "unsupported_reason",
]
