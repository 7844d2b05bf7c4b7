"""Plain float64 per-token loops that read like SPEC.md — the first layer of truth.

One module per family; nothing here is fast. They are written with ``jax.numpy`` on
Python loops (unrolled at trace time) so that ``jax.grad`` of a reference gives the
reference gradients. The ``lax.scan`` rules and every parallel form are tested against
these loops at 1e-10 in float64.
"""
from tttla_jax.reference.delta import delta_rule_loop
from tttla_jax.reference.linear import linear_attention_loop

__all__ = ["delta_rule_loop", "linear_attention_loop"]
