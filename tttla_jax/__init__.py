"""tttla_jax — test-time training layers with KV binding, and their exact rewriting as
linear attention (Test-Time Training with KV Binding Is Secretly Linear Attention,
arXiv 2602.21204).

Public API (see README "API map"):
    tt.linear_attention(q, k, v, ...)   plain / decayed linear attention, three forms
    tt.delta_rule(q, k, v, beta, ...)   (gated) DeltaNet, recurrent and chunked (WY)
    tt.rules                            fast-weight update rules (LaCT, TTT, Titans, ...)
    tt.reference                        float64 per-token loops that read like the math in docs/
    tt.testing                          the equivalence harness (forms, states, gradients)
    tt.reduce(rule, *inputs)            a rule's linear-attention reading (Theorems 5.1–5.3)
    tt.nn                               Flax NNX layers, the language model, decoding
    tttla_jax.kernels                   Pallas kernels (imported on demand)
    tttla_jax.host.tune_malloc()        keep freed host memory in-process (XLA:CPU speed; opt-in)
"""
from tttla_jax.ops import delta_rule, linear_attention
from tttla_jax import nn, reference, rules, testing
from tttla_jax.reduce import Reading, reduce  # noqa: E402  (tt.reduce is the function)

__version__ = "0.1.0"
__all__ = ["Reading", "delta_rule", "linear_attention", "nn", "reduce", "reference", "rules", "testing"]
