"""The reduction: every fast-weight rule read as (masked) linear attention (SPEC §2).

The paper's Theorems 5.1–5.3 say that a TTT layer whose fast network is
``f(x) = φ(x; Θ) W`` (last layer linear, bias-free) computes

    o_t = q̂_t ( a_t · S_0 + Σ_s M[t, s] · k̂_sᵀ v̂_s )                       (★)

with effective queries ``q̂ = φ_{t+1}(q)`` (post-update features), keys ``k̂ = φ_t(k)``
(pre-update features), values ``v̂ = −η ∂L/∂f`` (the "effective value"), initial state
``S_0 = W_0`` and a structured mask ``M`` (causal / block-causal / non-causal, decay,
momentum's cumulative coefficients ``c_{t,i} = Σ_{j=i..t} Π_{s=i+1..j} α_s``). This
module returns that reading — :class:`Reading` — for each rule, so that (★) evaluated in
its quadratic "attention" form (:meth:`Reading.outputs`) can be checked against the
rule's recurrence, and says when the reading is *sequential* (q̂, k̂ or v̂ depend on the
history, so no associative scan exists) and which component makes it so.

Readings are O(T²) per head: they are for checking and explaining, not for speed; the
fast parallel forms live on each rule (``rule.parallel``) and in :mod:`tttla_jax.ops`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from tttla_jax import _checks
from tttla_jax.rules.linear import LinearFastWeightRule


@dataclasses.dataclass
class Reading:
    """A rule's linear-attention reading (★). Shapes use ``[B, T, H, ·]`` like the ops.

    Attributes:
      q, k: ``[B, T, H, K̂]`` effective queries / keys (scale already folded into q).
      v: ``[B, T, H, V]`` effective values.
      mask: ``[B, H, T, T]`` (or broadcastable) weight of key s for query t.
      state_coef: ``[B, H, T]`` (or broadcastable) coefficient ``a_t`` of the initial state.
      initial_state: ``[B, H, K̂, V]`` ``S_0``.
      associative: whether (★)'s ingredients are available up front (an associative /
        chunked parallel form exists); ``False`` for a sequential reading.
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
        """Evaluate (★) in attention form: ``((Q̂K̂ᵀ) ⊙ M) V̂ + a ⊙ (Q̂ S_0)``."""
        A = jnp.einsum("bthk,bshk->bhts", self.q, self.k) * self.mask
        o = jnp.einsum("bhts,bshv->bthv", A, self.v)
        o = o + jnp.moveaxis(self.state_coef, -1, 1)[..., None] * jnp.einsum(
            "bthk,bhkv->bthv", self.q, self.initial_state)
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

    Supported rules: :class:`~tttla_jax.rules.linear.LinearFastWeightRule` (linear
    attention, decayed, DeltaNet, gated DeltaNet); other families register a reducer with
    :func:`register_reducer`.
    """
    for cls, fn in _REDUCERS.items():
        if isinstance(rule, cls):
            return fn(rule, *args, **kwargs)
    raise NotImplementedError(f"rule: no reduction registered for {type(rule).__name__}; "
                              f"known: {tuple(c.__name__ for c in _REDUCERS)}")


_REDUCERS = {}


def register_reducer(cls):
    def deco(fn):
        _REDUCERS[cls] = fn
        return fn
    return deco


@register_reducer(LinearFastWeightRule)
def _reduce_linear(rule: LinearFastWeightRule, q, k, v, lr=None, log_decay=None, initial_state=None,
                   output_final_state=True):
    """Dot loss: q̂ = scale·q, k̂ = k, v̂ = v (Theorem 5.2 with φ = id, g = v).
    MSE loss: v̂_t = β_t (v_t − k_t exp(g_t) S_{t−1}) — the effective value depends on the
    state (the delta rule), so the reading is sequential: v̂ comes from the recurrence."""
    rule._check(q, k, v, lr, log_decay)
    B, T, H, K = q.shape
    V = v.shape[-1]
    sd = _checks.state_dtype(q, k, v)
    scale = K ** -0.5 if rule.scale is None else rule.scale
    g = jnp.zeros((B, T, H), sd) if log_decay is None else log_decay.astype(sd)
    S0 = jnp.zeros((B, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
    mask = decay_mask(g)
    a = jnp.exp(jnp.cumsum(jnp.moveaxis(g, 1, -1), axis=-1))
    qh, kh, vh = scale * q.astype(sd), k.astype(sd), v.astype(sd)
    if rule.loss == "dot":
        return Reading(qh, kh, vh, mask, a, S0)

    def step(S, x):
        kt, vt, bt, gt = x
        S = jnp.exp(gt)[..., None, None] * S
        vhat = bt[..., None] * (vt - jnp.einsum("bhk,bhkv->bhv", kt, S))
        return S + kt[..., :, None] * vhat[..., None, :], vhat

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (kh, vh, lr.astype(sd), g))
    _, vhat = lax.scan(step, S0, xs)
    return Reading(qh, kh, jnp.moveaxis(vhat, 0, 1), mask, a, S0, associative=True,
                   breaks=None)
