"""LaCT: large-chunk test-time training with SwiGLU fast weights (docs/rules/lact.md), and its
parallel (linear-attention) forms where the math allows (docs/ttt_as_linear_attention.md,
docs/ladder.md). One rule, one place:

==================  ===========================================================================
:mod:`.fastnet`     the fast network ``f(x) = W1 (silu(W0 x) ⊙ (W2 x))`` (or ``W1 x``), its
                    features φ, closed-form inner gradients, row norms for weight norm
:mod:`.muon`        Newton–Schulz NS5 (dense, bfloat16-mimicking, and on rank-n factors)
:mod:`.rule`        :class:`LaCTRule` (config, validation, :meth:`~LaCTRule.prepare`, the chunk
                    update, the recurrent form, implementation resolution), :class:`LaCTState`,
                    :func:`lact_swiglu`
:mod:`.parallel`    the parallel layouts ``"chunked"`` and ``"associative"`` (ladder V2–V6)
:mod:`.reading`     the rule read as linear attention (Theorems 5.2–5.3), every configuration
:mod:`.fixtures`    registry entries and example inputs
==================  ===========================================================================
"""
from tttla_jax.rules.lact import fixtures  # noqa: F401  (registers "lact", "lact_v2")
from tttla_jax.rules.lact.fastnet import FAST_NETS, apply_fast, features, inner_grads
from tttla_jax.rules.lact.muon import NS5_COEFFS, low_rank_ns_pays, newton_schulz5, newton_schulz5_factored
from tttla_jax.rules.lact.rule import (MUON_DTYPES, ORDERS, PARALLEL_IMPLS, UPDATES, WEIGHT_NORMS, LaCTInputs,
                                       LaCTRule, LaCTState, chunk_means, lact_swiglu)

__all__ = [
    "FAST_NETS", "MUON_DTYPES", "NS5_COEFFS", "ORDERS", "PARALLEL_IMPLS", "UPDATES", "WEIGHT_NORMS",
    "LaCTInputs", "LaCTRule", "LaCTState", "apply_fast", "chunk_means", "features", "inner_grads",
    "lact_swiglu", "low_rank_ns_pays", "newton_schulz5", "newton_schulz5_factored",
]
