"""Reference loop for docs/rules/lact.md LaCT (SwiGLU fast weights), chunk by chunk, in float64.

Written to be read next to docs/, not to be fast: Python loops over batch, head and
chunk; the inner gradient of each token's ``⟨f(k_i), v_i⟩`` is taken with ``jax.grad``
(so it is independent of the closed form in :mod:`tttla_jax.rules.lact`), then weighted
by the per-token (or per-input-channel) learning rate and summed over the chunk.
Everything is ``jax.numpy``, so ``jax.grad`` through this loop gives reference outer
gradients.

Notation (column vectors, as docs/rules/lact.md): ``W0, W2 ∈ [dh, dk]``, ``W1 ∈ [dv, dh]``,
``f(x) = W1 (silu(W0 x) ⊙ (W2 x))``; with ``fast_net="linear"``: ``f(x) = W1 x``,
``W1 ∈ [dv, dk]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NS5_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


def ns5_loop(G):
    """docs/rules/lact.md step 5 on one matrix, float64: transpose if rows > cols, Frobenius-normalise
    with 1e-7, five Newton–Schulz iterations ``A = X Xᵀ; X = a X + (b A + c A A) X``."""
    X = G
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    X = X / (jnp.sqrt(jnp.sum(X * X)) + 1e-7)
    for a, b, c in NS5_COEFFS:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


def _f(Ws, x, fast_net):
    if fast_net == "linear":
        (W1,) = Ws
        return W1 @ x
    W0, W1, W2 = Ws
    return W1 @ (jax.nn.silu(W0 @ x) * (W2 @ x))


def _row_norm(W):
    return jnp.sqrt(jnp.sum(W * W, axis=1, keepdims=True))


def lact_loop(q, k, v, lr, *, w0, w1, w2, chunk_size, momentum=None, muon=False,
              weight_norm="post", update="all", ascent=True, order="apply_then_update",
              q_is_k=False, inner_steps=1, fast_net="swiglu"):
    """docs/rules/lact.md LaCT, one (batch, head) at a time (vmapped), one chunk at a time (Python loop).

    Args:
      q, k: ``[B, T, H, dk]``; v: ``[B, T, H, dv]``.
      lr: tuple ``(lr0, lr1, lr2)``, each ``[B, T, H]`` (per token) or ``[B, T, H, D]``
        (per input channel of that matrix: dk for W0/W2, dh for W1). lr0/lr2 unused for
        ``fast_net="linear"`` (may be None).
      w0, w2: ``[B, H, dh, dk]`` (None for linear); w1: ``[B, H, dv, dh]``.
      momentum: ``[B, T, H]`` or None.
      order: "apply_then_update" (reference: chunk starts strictly below T − C update,
        the last chunk is apply-only) or "update_then_query" (every chunk updates, then
        its queries read the updated weights).

    Returns:
      ``(o, final)`` with ``o [B, T, H, dv]`` float64 and ``final`` a dict of
      ``[B, H, ...]`` arrays: ``w0, w1, w2`` (working weights), ``m0, m1, m2`` (momentum
      buffers, zeros without momentum); W0/W2 entries None for the linear fast net.
    """
    f64 = jnp.float64
    linear = fast_net == "linear"
    q = jnp.asarray(k if q_is_k else q, f64)
    k, v = jnp.asarray(k, f64), jnp.asarray(v, f64)
    B, T, H, _ = k.shape
    lr = tuple(jnp.zeros((B, T, H), f64) if x is None else jnp.asarray(x, f64) for x in lr)
    m = jnp.zeros((B, T, H), f64) if momentum is None else jnp.asarray(momentum, f64)
    if linear:
        w0 = w2 = jnp.zeros((B, H, 1, 1), f64)  # placeholders, never used
    Ws0 = tuple(jnp.asarray(w, f64) for w in (w0, w1, w2))

    def one_head(q, k, v, lr0, lr1, lr2, m, W0, W1, W2):
        # q, k [T, dk]; v [T, dv]; lr_x [T] or [T, D]; m [T]; weights 2-D
        return _lact_one_head(q, k, v, (lr0, lr1, lr2), m, (W0, W1, W2), chunk_size=chunk_size,
                              use_momentum=momentum is not None, muon=muon, weight_norm=weight_norm,
                              update=update, ascent=ascent, order=order, inner_steps=inner_steps,
                              fast_net=fast_net)

    over_h = jax.vmap(one_head, in_axes=(1,) * 7 + (0,) * 3, out_axes=(1, 0))
    over_b = jax.vmap(over_h, in_axes=(0,) * 10, out_axes=(0, 0))
    o, final = over_b(q, k, v, *lr, m, *Ws0)
    if linear:
        final = {key: (None if key in ("w0", "w2", "m0", "m2") else val) for key, val in final.items()}
    return o, final


def _lact_one_head(q, k, v, lr, m, Ws, *, chunk_size, use_momentum, muon, weight_norm, update,
                   ascent, order, inner_steps, fast_net):
    f64 = jnp.float64
    T = k.shape[0]
    C = chunk_size
    linear = fast_net == "linear"
    names = (1,) if linear else (0, 1, 2)
    upd = (1,) if (update == "w1" or linear) else (0, 1, 2)
    sign = 1.0 if ascent else -1.0
    if order == "apply_then_update":
        starts_upd = list(range(0, T - C, C))   # strictly below T − C; the last chunk never updates
    else:
        starts_upd = list(range(0, T, C))
    init = dict(enumerate(Ws))
    W = dict(init)                                   # working weights (applied, differentiated)
    W_main = dict(init)                              # pre-norm accumulator, starts at W^(0)
    norm0 = {n: _row_norm(init[n]) for n in names}   # ‖W^(0)‖_row
    buf = {n: jnp.zeros_like(init[n]) for n in names}

    def Ws_of(Wd):
        return (Wd[1],) if linear else (Wd[0], Wd[1], Wd[2])

    def f_rows(Wd, X):  # f applied to each row of X
        return jax.vmap(lambda x: _f(Ws_of(Wd), x, fast_net))(X)

    def token_grads(Wd, kt, vt):
        # gradient of <f(k_t), v_t> w.r.t. every fast weight (autodiff, not the closed form)
        g = jax.grad(lambda Wt: jnp.dot(_f(Wt, kt, fast_net), vt))(Ws_of(Wd))
        return {1: g[0]} if linear else {0: g[0], 1: g[1], 2: g[2]}

    outs = []
    for s in range(0, T, C):
        e = min(s + C, T)
        if order == "apply_then_update":
            outs.append(f_rows(W, q[s:e]))
        if s in starts_upd:
            for _ in range(inner_steps):
                g = jax.vmap(token_grads, in_axes=(None, 0, 0))(W, k[s:e], v[s:e])  # per token
                dW = {}
                for n in upd:
                    lr_n = lr[n][s:e]
                    lr_n = lr_n[:, None, None] if lr_n.ndim == 1 else lr_n[:, None, :]  # scalar or per column
                    dW[n] = sign * jnp.sum(g[n] * lr_n, axis=0)                        # summed, not averaged
                if use_momentum:
                    m_bar = jnp.mean(m[s:e])
                    for n in upd:
                        dW[n] = dW[n] + m_bar * buf[n]
                        buf[n] = dW[n]                      # post-momentum, pre-Muon
                if muon:
                    dW = {n: ns5_loop(dW[n]) for n in upd}
                for n in upd:
                    if weight_norm == "pre":
                        W_main[n] = W_main[n] + dW[n]
                        W[n] = W_main[n] / (_row_norm(W_main[n]) + 1e-5) * norm0[n]
                    else:
                        W[n] = W[n] + dW[n]
                        if weight_norm == "post":
                            W[n] = W[n] / (_row_norm(W[n]) + 1e-5) * norm0[n]
        if order == "update_then_query":
            outs.append(f_rows(W, q[s:e]))
    final = {f"w{n}": W.get(n, Ws[n]) for n in (0, 1, 2)}
    final.update({f"m{n}": buf.get(n, jnp.zeros_like(Ws[n])) for n in (0, 1, 2)})
    return jnp.concatenate(outs, axis=0), final
