"""The reduction: every fast-weight rule read as (masked) linear attention (docs/ttt_as_linear_attention.md).

The paper's Theorems 5.1–5.3 say that a TTT layer whose fast network is
``f(x) = φ(x; Θ) W`` (last layer linear, bias-free) computes

    o_t = q̂_t ( a_t · S_0 + Σ_s M[t, s] · k̂_sᵀ v̂_s )                       (★)

with effective queries ``q̂ = φ_{t+1}(q)`` (post-update features), keys ``k̂ = φ_t(k)``
(pre-update features), values ``v̂ = −η ∂L/∂f`` (the "effective value"), initial state
``S_0 = W_0`` and a structured mask ``M`` (causal / block-causal / non-causal, decay,
momentum's cumulative coefficients ``c_{t,i} = Σ_{j=i..t} Π_{s=i+1..j} α_s``). This
module holds that reading — :class:`Reading` — and the mask helpers readings share;
each rule builds its own reading next to its math (``rule.reading(*inputs)``, the rule
protocol of :mod:`tttla_jax.rules.base`) and :func:`reduce` dispatches to it. (★)
evaluated in its quadratic "attention" form (:meth:`Reading.outputs`) is checked against
the rule's recurrence; a reading says when it is *sequential* (q̂, k̂ or v̂ depend on the
history, so no associative scan exists) and which component makes it so.

The sum in (★) runs over *key positions* s — the tokens for token-level writes. A write
that is a full matrix rather than a sum of per-token ``k̂ᵀv̂`` (LaCT's Muon: NS5 of a
chunk's momentum) is still linear attention: ``X = Σ_a e_aᵀ X[a]``, i.e. ``dh`` virtual
tokens with one-hot keys, read block-causally by later chunks (docs/ladder.md).

Readings are O(T²) per head: they are for checking and explaining, not for speed; the
fast parallel forms live on each rule (``rule.parallel``) and in :mod:`tttla_jax.ops`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass
class Reading:
    """A rule's linear-attention reading (★). Shapes use ``[B, T, H, ·]`` like the ops.

    Queries are the T tokens; keys/values live on ``S`` *key positions*. For token-level
    writes ``S`` is the tokens too (``S = T``); a rule whose writes are not per-token gets
    other positions — LaCT with Muon writes a full matrix per chunk, read as ``dh``
    virtual tokens with one-hot keys (see ``LaCTRule.reading``); ``inner_steps > 1`` writes each
    token once per inner step. The attention form never assumes ``S = T``.

    Attributes:
      q: ``[B, T, H, K̂]`` effective queries (scale already folded in).
      k: ``[B, S, H, K̂]`` effective keys.
      v: ``[B, S, H, V]`` effective values.
      mask: ``[B, H, T, S]`` (or broadcastable) weight of key s for query t; or
        ``[B, H, T, S, V]`` for a per-value-channel weight.
      state_coef: ``[B, H, T]`` (or broadcastable) coefficient ``a_t`` of the initial state;
        or a tuple of them, one per initial state (Titans has a memory and a momentum buffer).
      initial_state: ``[B, H, K̂, V]`` ``S_0``, or a tuple of such states.
      associative: whether the configuration has a parallel (associative or chunked) form;
        ``False`` for a sequential reading. Usually (★)'s ingredients are then available up
        front; the delta rule is the exception — its effective values come from the
        recurrence, yet its chunked (WY) form exists, so its reading is associative.
      breaks: ``None``, or the sentence naming the component that makes it sequential.
      post: optional map applied to the (★) outputs (e.g. TTT's LayerNorm and residual).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    mask: jax.Array
    state_coef: jax.Array
    initial_state: jax.Array
    associative: bool = True
    breaks: Optional[str] = None
    post: Optional[Callable] = None

    def outputs(self):
        """Evaluate (★) in attention form: ``((Q̂K̂ᵀ) ⊙ M) V̂ + a ⊙ (Q̂ S_0)``.

        A mask ``[B, H, T, T, V]`` (and coefficients ``[B, H, T, V]``) weighs each value
        channel separately — the reading of weight normalisation, a data-dependent
        per-channel rescaling of the state.
        """
        A = jnp.einsum("bthk,bshk->bhts", self.q, self.k)
        if jnp.ndim(self.mask) == 5:
            o = jnp.einsum("bhts,bhtsv,bshv->bthv", A, self.mask, self.v)
        else:
            o = jnp.einsum("bhts,bshv->bthv", A * self.mask, self.v)
        states = self.initial_state if isinstance(self.initial_state, tuple) else (self.initial_state,)
        coefs = self.state_coef if isinstance(self.state_coef, tuple) else (self.state_coef,)
        for a, S0 in zip(coefs, states):
            qS = jnp.einsum("bthk,bhkv->bthv", self.q, S0)
            a = jnp.moveaxis(a, 2, 1)  # [B, T, H] or [B, T, H, V]
            o = o + (a if a.ndim == 4 else a[..., None]) * qS
        return o if self.post is None else self.post(o)


def decay_mask(log_decay, *, include_diagonal: bool = True):
    """``M[t, s] = exp(Σ_{r=s+1..t} g_r)`` for ``s ≤ t`` (``s < t`` without the diagonal), else 0.

    ``log_decay`` ``[B, T, H]`` → ``[B, H, T, T]``; masked before the exp so it cannot overflow.
    """
    G = jnp.cumsum(jnp.moveaxis(log_decay, 1, -1), axis=-1)  # [B, H, T]
    T = G.shape[-1]
    keep = jnp.tril(jnp.ones((T, T), bool), 0 if include_diagonal else -1)
    diff = jnp.where(keep, G[..., :, None] - G[..., None, :], 0.0)
    return jnp.where(keep, jnp.exp(diff), 0.0)


def segment_products(x):
    """``P[..., n, l] = Π_{s=l+1..n} x[..., s]`` for ``l ≤ n`` (1 on the diagonal), else 0.

    ``x`` ``[..., N]`` → ``[..., N, N]``; a scan (``P_n = x_n P_{n−1} + e_n``), so zeros in
    ``x`` (full forgetting) are exact and nothing underflows through division.
    """
    N = x.shape[-1]
    onehots = jnp.moveaxis(jnp.broadcast_to(jnp.eye(N, dtype=x.dtype), x.shape[:-1] + (N, N)), -2, 0)

    def step(P, inp):
        x_n, e_n = inp
        P = x_n[..., None] * P + e_n
        return P, P

    _, P = lax.scan(step, jnp.zeros(x.shape, x.dtype), (jnp.moveaxis(x, -1, 0), onehots))
    return jnp.moveaxis(P, 0, -2)


def momentum_coefficients(alpha):
    """Theorem 5.3's cumulative coefficients ``c[t, i] = Σ_{j=i..t} Π_{s=i+1..j} α_s`` (i ≤ t).

    With ``ΔW_t = ∇L_t + α_t ΔW_{t−1}`` and ``W_{t+1} = W_t − η ΔW_t``, the value of step i is
    counted ``c[t, i]`` times in ``W_{t+1}``. ``alpha`` ``[..., T]`` → ``[..., T, T]``.
    Built by a scan over t — ``P_t = α_t P_{t−1} + e_t`` (row of products), ``c_t = c_{t−1} + P_t``
    — not by cumprod-and-divide, which underflows.
    """
    T = alpha.shape[-1]
    eye = jnp.eye(T, dtype=alpha.dtype)

    def step(carry, x):
        P, c = carry  # P[i] = Π_{s=i+1..t} α_s for i ≤ t (0 for i > t)
        a_t, e_t = x
        P = a_t[..., None] * P + e_t
        c = c + P
        return (P, c), c

    zeros = jnp.zeros(alpha.shape, alpha.dtype)
    onehots = jnp.moveaxis(jnp.broadcast_to(eye, alpha.shape[:-1] + (T, T)), -2, 0)  # e_t per step
    _, c = lax.scan(step, (zeros, zeros), (jnp.moveaxis(alpha, -1, 0), onehots))
    return jnp.moveaxis(c, 0, -2)


def reduce(rule, *args, **kwargs) -> Reading:
    """The linear-attention reading of ``rule`` on the inputs of ``rule.recurrent(*args, **kwargs)``.

    A thin dispatcher to ``rule.reading(*args, **kwargs)`` (the rule protocol,
    :mod:`tttla_jax.rules.base`): every rule of :data:`tttla_jax.rules.REGISTRY` has one.

    Raises:
      NotImplementedError: ``rule.has_reading()`` is False (the message names the rule).
    """
    has = getattr(rule, "has_reading", None)
    if has is None:
        raise TypeError(f"rule: expected a rule (tttla_jax.rules.Rule) with has_reading()/reading(), "
                        f"got {type(rule).__name__}")
    if has():
        return rule.reading(*args, **kwargs)
    raise NotImplementedError(
        f"rule: {type(rule).__name__} has no linear-attention reading for this configuration "
        f"({rule!r}): rule.has_reading() is False")
