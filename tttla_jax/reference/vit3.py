"""Reference loops for docs/rules/vit3.md, ViT³ (one full-batch TTT step, non-causal), float64.

GLU part, per (batch, head) with ``W1, W2`` ``[K, V]``:
``f(x) = (x W1) ⊙ silu(x W2)``, ``L = −(s/N) Σ_i ⟨f(k_i), v_i⟩``, ``g = ∇L`` (by
``jax.grad``), ``g ← g / (‖g‖_in + 1)`` with the norm over the input (K) axis, one
column per output unit, ``W' = W − lr·g``, ``o_i = f'(q_i)``.

Conv part, per (batch, channel) with a 3×3 kernel on the ``Hg × Wg`` token grid:
``conv(x, W)[i, j] = Σ_{a,b∈{−1,0,1}} x[i+a, j+b] W[a+1, b+1]`` (zero padding, the
cross-correlation of ``torch.nn.functional.conv2d``); same loss, gradient normalised over
the 9 taps, one step, ``o = conv(q, W')``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

f64 = jnp.float64


def vit3_glu_loop(q, k, v, *, W1, W2, scale=9 ** -0.5, lr=1.0, normalize=True, update_W2=True):
    """q, k ``[B, N, H, K]``, v ``[B, N, H, V]``, W1, W2 ``[H, K, V]``.
    Returns ``(o [B, N, H, V], (W1' [B, H, K, V], W2' [B, H, K, V]))``."""
    B, N, H, K = q.shape
    o = []
    new1, new2 = [], []
    for b in range(B):
        ob, n1, n2 = [], [], []
        for h in range(H):
            kb, vb, qb = (x[b, :, h].astype(f64) for x in (k, v, q))  # [N, ·]

            def f(W1_, W2_, x):
                return (x @ W1_) * jax.nn.silu(x @ W2_)

            def loss(W1_, W2_):
                total = 0.0
                for i in range(N):
                    total = total + jnp.dot(f(W1_, W2_, kb[i]), vb[i])
                return -scale / N * total

            w1, w2 = W1[h].astype(f64), W2[h].astype(f64)
            g1, g2 = jax.grad(loss, argnums=(0, 1))(w1, w2)
            if normalize:  # ‖g‖ over the input axis: one norm per output column
                g1 = g1 / (jnp.sqrt(jnp.sum(g1 ** 2, axis=0, keepdims=True)) + 1.0)
                g2 = g2 / (jnp.sqrt(jnp.sum(g2 ** 2, axis=0, keepdims=True)) + 1.0)
            w1 = w1 - lr * g1
            if update_W2:
                w2 = w2 - lr * g2
            ob.append(jnp.stack([f(w1, w2, qb[i]) for i in range(N)]))
            n1.append(w1)
            n2.append(w2)
        o.append(jnp.stack(ob, axis=1))
        new1.append(jnp.stack(n1))
        new2.append(jnp.stack(n2))
    return jnp.stack(o), (jnp.stack(new1), jnp.stack(new2))


def conv3x3_loop(x, W):
    """Depthwise 3×3 conv with zero padding; x ``[Hg, Wg, C]``, W ``[3, 3, C]`` (per channel)."""
    Hg, Wg = x.shape[:2]
    rows = []
    for i in range(Hg):
        row = []
        for j in range(Wg):
            acc = 0.0
            for a in (-1, 0, 1):
                for b in (-1, 0, 1):
                    if 0 <= i + a < Hg and 0 <= j + b < Wg:
                        acc = acc + x[i + a, j + b] * W[a + 1, b + 1]
            row.append(acc)
        rows.append(jnp.stack(row))
    return jnp.stack(rows)


def vit3_conv_loop(q, k, v, *, W, grid, scale=9 ** -0.5, lr=1.0, normalize=True):
    """q, k, v ``[B, N, C]`` with ``N = Hg·Wg`` (row-major), W ``[3, 3, C]``.
    Returns ``(o [B, N, C], W' [B, 3, 3, C])``. Channels are independent (depthwise), so
    they are carried along as a trailing axis; ``jax.grad`` of the loss summed over
    channels gives each channel's own gradient."""
    B, N, C = q.shape
    Hg, Wg = grid
    outs, Ws = [], []
    for b in range(B):
        qg, kg, vg = (x[b].astype(f64).reshape(Hg, Wg, C) for x in (q, k, v))

        def loss(w):  # Σ_c L_c(w[..., c]), L_c = −(s/N) Σ_p conv(k, w)[p, c] v[p, c]
            return -scale / N * jnp.sum(conv3x3_loop(kg, w) * vg)

        w = W.astype(f64)
        g = jax.grad(loss)(w)
        if normalize:  # over the 9 taps of each channel
            g = g / (jnp.sqrt(jnp.sum(g ** 2, axis=(0, 1))) + 1.0)
        w = w - lr * g
        outs.append(conv3x3_loop(qg, w).reshape(N, C))
        Ws.append(w)
    return jnp.stack(outs), jnp.stack(Ws)
