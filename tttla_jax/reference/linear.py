"""Reference loop for docs/linear_attention.md linear attention (plain and decayed).

Nothing here is fast or differentiable-by-design; it is NumPy-free of tricks so a
reader can check each line against docs/. The ``lax.scan`` rules and every parallel
form are tested against these loops (``tests/``). Gradients of the reference are taken
with ``jax.grad`` through the jnp version of the same loop (:func:`linear_attention_loop`
is written with ``jax.numpy`` operations on Python loops, unrolled at trace time).
"""
from __future__ import annotations

import jax.numpy as jnp


def linear_attention_loop(q, k, v, *, scale=None, log_decay=None, initial_state=None,
                          masking="causal", chunk_size=64):
    """docs/linear_attention.md, token by token. Shapes as :func:`tttla_jax.linear_attention`; returns (o, S_T).

    For t = 0 … T−1:  ``S ← exp(g_t)·S + k_tᵀ v_t``;  ``masking="causal"``: ``o_t = (scale·q_t) S``;
    ``"chunk"``: ``o_t = (scale·q_t) R`` where R is the state after the previous chunk;
    ``"none"``: ``o_t = (scale·q_t) S_T``.

    ``log_decay`` may be ``-inf`` (``exp(-inf) = 0``: the state is erased; the gradient w.r.t.
    that log-decay is ``exp(g)·<S, dS> = 0``, finite). ``log_decay [B, T, H, K]`` is a
    per-channel (GLA) gate: ``S ← diag(exp(g_t))·S + k_tᵀ v_t``.
    """
    if masking not in ("causal", "chunk", "none"):
        raise ValueError(f"masking: got {masking!r}, expected one of ('causal', 'chunk', 'none')")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = jnp.zeros((B, H, K, V), jnp.float64) if initial_state is None else jnp.asarray(initial_state, jnp.float64)
    R = S
    outs = []
    for t in range(T):
        if log_decay is None:
            decay = 1.0
        elif log_decay.ndim == 4:  # per key channel: row kappa of S decays by exp(g_t[kappa])
            decay = jnp.exp(log_decay[:, t].astype(jnp.float64))[:, :, :, None]
        else:
            decay = jnp.exp(log_decay[:, t].astype(jnp.float64))[:, :, None, None]
        kt = k[:, t].astype(jnp.float64)
        vt = v[:, t].astype(jnp.float64)
        qt = q[:, t].astype(jnp.float64) * scale
        S = decay * S + kt[:, :, :, None] * vt[:, :, None, :]
        if masking == "causal":
            outs.append(jnp.einsum("bhk,bhkv->bhv", qt, S))
        elif masking == "chunk":
            outs.append(jnp.einsum("bhk,bhkv->bhv", qt, R))
            if (t + 1) % chunk_size == 0:
                R = S
    if masking == "none":
        o = jnp.einsum("bthk,bhkv->bthv", q.astype(jnp.float64) * scale, S)
    else:
        o = jnp.stack(outs, axis=1)
    return o, S
