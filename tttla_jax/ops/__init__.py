"""Linear-attention core (XLA forms): recurrent, associative and chunked; the delta rule."""
from tttla_jax.ops.delta_rule import delta_rule
from tttla_jax.ops.linear_attention import linear_attention

__all__ = ["delta_rule", "linear_attention"]
