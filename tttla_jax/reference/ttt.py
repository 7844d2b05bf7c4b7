"""Reference loop for SPEC §4, TTT-Linear and TTT-MLP (Sun et al.) — read it next to the SPEC.

Per (batch, head) fast network ``f(x; θ)``: ``x W + b`` (linear) or
``gelu(x W1 + b1) W2 + b2`` (MLP, tanh GELU). Mini-batches of C tokens; for a mini-batch
starting from weights θ:

    ℓ_j(θ) = ½‖LN(f(k_j; θ)) − (v_j − k_j)‖²                 (gradient g_j = ∇_θ ℓ_j at θ)
    θ_i = θ − Σ_{j≤i} token_eta[i] · lr[j] · g_j              (row i of the mini-batch)
    o_i = q_i + LN(f(q_i; θ_i))

and the next mini-batch starts from θ of its last row; a trailing partial mini-batch of
r tokens uses ``token_eta[:r]``. The inner gradient is ``jax.grad`` of ℓ_j (autodiff
through the LayerNorm — independent of the closed form in :mod:`tttla_jax.rules.ttt`).
The one place where the reference implementation is not plain autodiff is the GELU's
backward: it uses a hand-written tanh-GELU derivative with rounded constants
(SPEC §4); :func:`gelu_inner` carries exactly that derivative as a ``custom_jvp``
(``gelu_grad="autodiff"`` uses the exact derivative instead). Everything runs in float64
on Python loops unrolled at trace time, so ``jax.grad`` of these functions gives the
reference outer gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

f64 = jnp.float64
_S2P = float(np.sqrt(2.0 / np.pi))


def gelu(x):
    """Tanh GELU forward: ``0.5 x (1 + tanh(sqrt(2/π)(x + 0.044715 x³)))``."""
    return 0.5 * x * (1.0 + jnp.tanh(_S2P * (x + 0.044715 * x ** 3)))


@jax.custom_jvp
def gelu_inner(x):
    """Tanh GELU whose derivative is the reference's hand-written one (SPEC §4)."""
    return gelu(x)


@gelu_inner.defjvp
def _gelu_inner_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    t = jnp.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x))
    d = 0.5 * x * (1.0 - t * t) * (0.79788456 + 0.1070322243 * x * x) + 0.5 * (1.0 + t)
    return gelu(x), d * dx


def _ln(z, scale, bias, eps):
    mu = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean((z - mu) ** 2, axis=-1, keepdims=True)
    return scale * (z - mu) / jnp.sqrt(var + eps) + bias


def _ttt_loop(f_read, f_inner, params, q, k, v, lr, token_eta, ln_scale, ln_bias, C, eps,
              layer_norm, residual):
    B, T, H, D = q.shape
    ln = (lambda z: _ln(z, jnp.asarray(ln_scale, f64), jnp.asarray(ln_bias, f64), eps)) if layer_norm \
        else (lambda z: z)

    def loss(p, kt, vt):
        # Σ_{b,h} ℓ_j: every (b, h) block of θ only sees its own term.
        target = vt - kt if residual else vt
        return 0.5 * jnp.sum((ln(f_inner(p, kt)) - target) ** 2)

    p = params
    outs = []
    for s in range(0, T, C):
        idx = list(range(s, min(s + C, T)))
        grads = [jax.grad(loss)(p, k[:, t].astype(f64), v[:, t].astype(f64)) for t in idx]
        for i, t in enumerate(idx):
            p_row = p
            for j in range(i + 1):
                eta_ij = jnp.asarray(token_eta[i], f64) * lr[:, idx[j]].astype(f64)  # [B, H]
                p_row = jax.tree_util.tree_map(
                    lambda w, g: w - eta_ij.reshape(eta_ij.shape + (1,) * (w.ndim - 2)) * g,
                    p_row, grads[j])
            qt = q[:, t].astype(f64)
            y = ln(f_read(p_row, qt))
            outs.append(qt + y if residual else y)
        p = p_row  # the last row's weights start the next mini-batch
    return jnp.stack(outs, axis=1), p


def _per_batch(x, B, rank):
    """[H, ...] -> [B, H, ...] (an array already of ``rank`` dims is per batch element)."""
    x = jnp.asarray(x, f64)
    return x if x.ndim == rank else jnp.broadcast_to(x, (B,) + x.shape)


def ttt_linear_loop(q, k, v, lr, *, W, b, ln_scale, ln_bias, token_eta, mini_batch_size,
                    eps=1e-6, layer_norm=True, bias=True, residual=True):
    """SPEC §4 TTT-Linear, token by token, in float64. Returns ``(o, (W, b))``.

    Shapes: q, k, v ``[B, T, H, D]``; lr ``[B, T, H]``; token_eta ``[C]``; W ``[H, D, D]``
    or ``[B, H, D, D]``; b ``[H, D]`` or ``[B, H, D]``; ln_scale, ln_bias ``[H, D]``.
    ``bias=False`` drops b (returned unchanged); ``residual=False`` drops the ``q +`` and
    the ``− k`` of the target; ``layer_norm=False`` drops LN.
    """
    B = q.shape[0]
    W, b = _per_batch(W, B, 4), _per_batch(b, B, 3)

    def f(p, x):
        Wp, bp = p
        z = jnp.einsum("bhd,bhde->bhe", x, Wp)
        return z + bp if bias else z

    o, (Wf, bf) = _ttt_loop(f, f, (W, b), q, k, v, lr, token_eta, ln_scale, ln_bias,
                            mini_batch_size, eps, layer_norm, residual)
    return o, (Wf, bf if bias else b)


def ttt_mlp_loop(q, k, v, lr, *, W1, b1, W2, b2, ln_scale, ln_bias, token_eta, mini_batch_size,
                 eps=1e-6, gelu_grad="reference"):
    """SPEC §4 TTT-MLP, token by token, in float64. Returns ``(o, (W1, b1, W2, b2))``.

    ``gelu_grad="reference"`` back-propagates the inner loss through the GELU with the
    reference's rounded hand-written derivative; ``"autodiff"`` with the exact one.
    The read path ``f(q; θ_i)`` always uses the plain GELU.
    """
    B = q.shape[0]
    params = (_per_batch(W1, B, 4), _per_batch(b1, B, 3), _per_batch(W2, B, 4), _per_batch(b2, B, 3))
    act_inner = {"reference": gelu_inner, "autodiff": gelu}[gelu_grad]

    def make(act):
        def f(p, x):
            W1p, b1p, W2p, b2p = p
            h = act(jnp.einsum("bhd,bhdf->bhf", x, W1p) + b1p)
            return jnp.einsum("bhf,bhfd->bhd", h, W2p) + b2p
        return f

    return _ttt_loop(make(gelu), make(act_inner), params, q, k, v, lr, token_eta, ln_scale,
                     ln_bias, mini_batch_size, eps, True, True)
