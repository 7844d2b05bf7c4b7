"""LaCT's fast network, its inner gradients in closed form and weight normalisation (docs/rules/lact.md).

Fast weights per (batch, head), stored output-major as in the reference:
``W0, W2 ∈ [dh, dk]``, ``W1 ∈ [dv, dh]``; for a column x,
``f(x) = W1 (silu(W0 x) ⊙ (W2 x))``. With ``fast_net="linear"``: ``f(x) = W1 x``,
``W1 ∈ [dv, dk]`` (ladder V3+, docs/ladder.md). In the library's row layout a token
``x [dk]`` gives the features ``φ(x) = h = silu(x W0ᵀ) ⊙ (x W2ᵀ)`` and ``f = h W1ᵀ``.

Per updating chunk, gradient ascent on ``Σ_i lr_x[i] ⟨f(k_i), v_i⟩`` separately per matrix,
in closed form (:func:`inner_grads`, step 3):

    dW1 = Σ_i v_i (lr1_i ⊙ h_i)ᵀ,     u_i = W1ᵀ v_i,
    dW0 = Σ_i (u_i ⊙ b_i ⊙ silu'(a_i)) (lr0_i ⊙ k_i)ᵀ,   dW2 = Σ_i (u_i ⊙ silu(a_i)) (lr2_i ⊙ k_i)ᵀ,

with ``a = W0 k``, ``b = W2 k``, ``silu'(a) = σ(a)(1 + a(1 − σ(a)))``.

Axis names: ``B`` batch, ``H`` heads, ``C`` tokens of a chunk, ``dk``/``dh``/``dv`` key,
hidden and value dims.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tttla_jax.rules._numerics import sqrt0

#: The fast networks: ``f(x) = W1(silu(W0 x) ⊙ W2 x)`` or ``f(x) = W1 x``.
FAST_NETS = ("swiglu", "linear")

WN_EPS = 1e-5  # weight norm: W / (‖W‖_row + 1e-5) · ‖W^(0)‖_row


def row_norm(W):
    """``‖W‖_row`` over the last axis (the input dim), kept as a trailing axis of size 1."""
    return sqrt0(jnp.sum(W * W, axis=-1, keepdims=True))


def features(Ws, x, fast_net):
    """φ(x): ``h = silu(x W0ᵀ) ⊙ (x W2ᵀ)`` (swiglu) or ``x`` (linear); x ``[B, H, C, dk]``."""
    if fast_net == "linear":
        return x
    W0, _, W2 = Ws
    return jax.nn.silu(jnp.einsum("bhck,bhdk->bhcd", x, W0)) * jnp.einsum("bhck,bhdk->bhcd", x, W2)


def apply_fast(Ws, x, fast_net):
    """``f(x) = φ(x) W1ᵀ`` for a chunk of row vectors ``x [B, H, C, dk]`` → ``[B, H, C, dv]``."""
    return jnp.einsum("bhcd,bhvd->bhcv", features(Ws, x, fast_net), Ws[1])


def inner_grads(Ws, k, v, lrs, fast_net, which):
    """Closed-form ``∂/∂W_x Σ_i lr_x[i] ⟨f(k_i), v_i⟩`` for the matrices in ``which`` (docs/rules/lact.md step 3).

    ``k [B, H, C, dk]``, ``v [B, H, C, dv]``, ``lrs = (lr0, lr1, lr2)`` each ``[B, H, C, 1]``
    (per token) or ``[B, H, C, D]`` (per input channel of that matrix). Returns a tuple
    ``(dW0, dW1, dW2)`` with ``None`` for matrices not in ``which``.
    """
    lr0, lr1, lr2 = lrs
    if fast_net == "linear":
        return (None, jnp.einsum("bhcv,bhck->bhvk", v, lr1 * k), None)
    W0, W1, W2 = Ws
    a = jnp.einsum("bhck,bhdk->bhcd", k, W0)
    b = jnp.einsum("bhck,bhdk->bhcd", k, W2)
    sig = jax.nn.sigmoid(a)
    sa = a * sig
    h = sa * b
    dW1 = jnp.einsum("bhcv,bhcd->bhvd", v, lr1 * h) if 1 in which else None
    dW0 = dW2 = None
    if 0 in which or 2 in which:
        u = jnp.einsum("bhcv,bhvd->bhcd", v, W1)  # W1ᵀ v
        if 0 in which:
            da = u * b * sig * (1.0 + a * (1.0 - sig))
            dW0 = jnp.einsum("bhcd,bhck->bhdk", da, lr0 * k)
        if 2 in which:
            dW2 = jnp.einsum("bhcd,bhck->bhdk", u * sa, lr2 * k)
    return (dW0, dW1, dW2)
