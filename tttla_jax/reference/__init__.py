"""Plain float64 per-token loops that read like the math in docs/ — the first layer of truth.

One module per family; nothing here is fast. They are written with ``jax.numpy`` on
Python loops (unrolled at trace time) so that ``jax.grad`` of a reference gives the
reference gradients. The ``lax.scan`` rules and every parallel form are tested against
these loops at 1e-10 in float64.
"""
from tttla_jax.reference.delta import delta_rule_loop
from tttla_jax.reference.lact import lact_loop, ns5_loop
from tttla_jax.reference.linear import linear_attention_loop
from tttla_jax.reference.titans import titans_loop
from tttla_jax.reference.ttt import ttt_linear_loop, ttt_mlp_loop
from tttla_jax.reference.vit3 import conv3x3_loop, vit3_conv_loop, vit3_glu_loop

__all__ = [
    "conv3x3_loop", "delta_rule_loop", "lact_loop", "linear_attention_loop", "ns5_loop",
    "titans_loop", "ttt_linear_loop", "ttt_mlp_loop", "vit3_conv_loop", "vit3_glu_loop",
]
