"""Linear-attention core (XLA forms): recurrent, associative and chunked; the delta rule.

:func:`linear_attention` and :func:`delta_rule` are the ops (``tt.linear_attention``,
``tt.delta_rule``); :func:`linear_attention_impl_reasons` / :func:`delta_rule_impl_reasons`
list, for a call, each implementation in ``impl="auto"`` order with the reason it cannot
run (``None`` if it can; docs/implementations.md). :mod:`tttla_jax.ops.chunk` is the chunk
toolkit shared with the kernels, :mod:`tttla_jax.ops.varlen` the packed-sequence layout.
"""
from tttla_jax.ops.delta_rule import delta_rule
from tttla_jax.ops.delta_rule import impl_reasons as delta_rule_impl_reasons
from tttla_jax.ops.linear_attention import impl_reasons as linear_attention_impl_reasons
from tttla_jax.ops.linear_attention import linear_attention

__all__ = ["delta_rule", "delta_rule_impl_reasons", "linear_attention", "linear_attention_impl_reasons"]
