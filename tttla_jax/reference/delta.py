"""Reference loop for docs/linear_attention.md delta rule (DeltaNet) and gated delta rule.

Token by token in float64, written with ``jax.numpy`` on a Python loop (unrolled at
trace time) so that ``jax.grad`` through it gives the reference gradients. Every form of
:func:`tttla_jax.ops.delta_rule.delta_rule` is tested against this loop at 1e-10.
"""
from __future__ import annotations

import jax.numpy as jnp


def delta_rule_loop(q, k, v, beta, *, log_decay=None, scale=None, initial_state=None):
    """docs/linear_attention.md, token by token (update-then-query: token t sees its own write).

    For t = 0 … T−1::

        S   ← exp(g_t) · S                      (gated only; g_t = log_decay[:, t])
        u_t = β_t (v_t − k_t S)                 (the delta: value minus current prediction)
        S   ← S + k_tᵀ u_t
        o_t = (scale · q_t) S

    Shapes as :func:`tttla_jax.delta_rule`: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
    beta and log_decay ``[B, T, H]``, state ``[B, H, K, V]``; a per-channel ``log_decay``
    ``[B, T, H, K]`` decays row κ of S by ``exp(g_t[κ])`` first (Kimi Delta Attention:
    ``S ← diag(exp(g_t)) S``, then the delta step). Returns ``(o, S_T)`` in float64.
    ``log_decay`` may be ``-inf`` (``exp(-inf) = 0`` erases the state; the gradient w.r.t. it
    is 0, finite).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    f64 = jnp.float64
    if initial_state is None:
        S = jnp.zeros((B, H, K, V), f64)
    else:
        S = jnp.asarray(initial_state, f64)
    outs = []
    for t in range(T):
        qt = q[:, t].astype(f64) * scale  # [B, H, K]
        kt = k[:, t].astype(f64)  # [B, H, K]
        vt = v[:, t].astype(f64)  # [B, H, V]
        bt = beta[:, t].astype(f64)  # [B, H]
        if log_decay is not None and log_decay.ndim == 4:  # per key channel (KDA)
            S = jnp.exp(log_decay[:, t].astype(f64))[:, :, :, None] * S
        elif log_decay is not None:
            S = jnp.exp(log_decay[:, t].astype(f64))[:, :, None, None] * S
        prediction = jnp.einsum("bhk,bhkv->bhv", kt, S)  # k_t S
        u = bt[:, :, None] * (vt - prediction)
        S = S + kt[:, :, :, None] * u[:, :, None, :]
        outs.append(jnp.einsum("bhk,bhkv->bhv", qt, S))
    return jnp.stack(outs, axis=1), S
