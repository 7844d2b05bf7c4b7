"""Linear-attention core (XLA forms): recurrent, associative and chunked."""
from tttla_jax.ops.linear_attention import linear_attention

__all__ = ["linear_attention"]
