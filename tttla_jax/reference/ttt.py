"""Reference loop for docs/rules/ttt.md, TTT-Linear and TTT-MLP (Sun et al.) — read it next to that page.

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
(docs/rules/ttt.md); :func:`gelu_inner` carries exactly that derivative as a ``custom_jvp``
(``gelu_grad="autodiff"`` uses the exact derivative instead). Everything runs in float64
on Python loops unrolled at trace time, so ``jax.grad`` of these functions gives the
reference outer gradients.
"""
from __future__ import annotations

import functools

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
    """Tanh GELU whose derivative is the reference's hand-written one (docs/rules/ttt.md)."""
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


def _f(p, x, act):
    """The fast network per (batch, head): ``x W + b`` (2 leaves) or the GELU MLP (4 leaves);
    a ``None`` bias is dropped."""
    if len(p) == 2:
        W, b = p
        z = jnp.einsum("bhd,bhde->bhe", x, W)
        return z if b is None else z + b
    W1, b1, W2, b2 = p
    h = act(jnp.einsum("bhd,bhdf->bhf", x, W1) + b1)
    return jnp.einsum("bhf,bhfd->bhd", h, W2) + b2


def _maybe_ln(z, ln_scale, ln_bias, eps, layer_norm):
    return _ln(z, ln_scale, ln_bias, eps) if layer_norm else z


# The per-token pieces are jitted (compiled once per shape, reused for every token) so the
# unrolled loop stays cheap to run and to differentiate; the loop structure is unchanged.
_STATIC = ("eps", "layer_norm", "residual", "gelu_grad")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _token_grad(p, kt, vt, ln_scale, ln_bias, *, eps, layer_norm, residual, gelu_grad):
    """g_j = ∇_θ ½‖LN(f(k_j; θ)) − (v_j − k_j)‖², by autodiff (summed over (b, h): every
    (b, h) block of θ only sees its own term)."""
    act = gelu_inner if gelu_grad == "reference" else gelu

    def loss(p):
        target = vt - kt if residual else vt
        return 0.5 * jnp.sum((_maybe_ln(_f(p, kt, act), ln_scale, ln_bias, eps, layer_norm) - target) ** 2)

    return jax.grad(loss)(p)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _read(p, qt, ln_scale, ln_bias, *, eps, layer_norm, residual, gelu_grad):
    """o = q + LN(f(q; θ_i)) (plain GELU on the read)."""
    y = _maybe_ln(_f(p, qt, gelu), ln_scale, ln_bias, eps, layer_norm)
    return qt + y if residual else y


def _ttt_loop(params, q, k, v, lr, token_eta, ln_scale, ln_bias, C, **static):
    T = q.shape[1]
    if static["layer_norm"]:
        ln_scale, ln_bias = jnp.asarray(ln_scale, f64), jnp.asarray(ln_bias, f64)
    else:
        ln_scale = ln_bias = None
    p = params
    outs = []
    for s in range(0, T, C):
        idx = list(range(s, min(s + C, T)))  # a trailing partial mini-batch uses token_eta[:r]
        grads = [_token_grad(p, k[:, t].astype(f64), v[:, t].astype(f64), ln_scale, ln_bias, **static)
                 for t in idx]  # all at the mini-batch's initial weights
        acc = jax.tree_util.tree_map(jnp.zeros_like, p)  # Σ_{j≤i} lr[j] g_j
        for i, t in enumerate(idx):
            lr_i = lr[:, t].astype(f64)  # [B, H]
            acc = jax.tree_util.tree_map(
                lambda a, g: a + lr_i.reshape(lr_i.shape + (1,) * (g.ndim - 2)) * g, acc, grads[i])
            # θ_i = θ − Σ_{j≤i} eta[i, j] g_j with eta[i, j] = token_eta[i] · lr[j]
            p_row = jax.tree_util.tree_map(lambda w, a: w - jnp.asarray(token_eta[i], f64) * a, p, acc)
            outs.append(_read(p_row, q[:, t].astype(f64), ln_scale, ln_bias, **static))
        p = p_row  # the last row's weights start the next mini-batch
    return jnp.stack(outs, axis=1), p


def _per_batch(x, B, rank):
    """[H, ...] -> [B, H, ...] (an array already of ``rank`` dims is per batch element)."""
    x = jnp.asarray(x, f64)
    return x if x.ndim == rank else jnp.broadcast_to(x, (B,) + x.shape)


def ttt_linear_loop(q, k, v, lr, *, W, b, ln_scale, ln_bias, token_eta, mini_batch_size,
                    eps=1e-6, layer_norm=True, bias=True, residual=True):
    """docs/rules/ttt.md TTT-Linear, token by token, in float64. Returns ``(o, (W, b))``.

    Shapes: q, k, v ``[B, T, H, D]``; lr ``[B, T, H]``; token_eta ``[C]``; W ``[H, D, D]``
    or ``[B, H, D, D]``; b ``[H, D]`` or ``[B, H, D]``; ln_scale, ln_bias ``[H, D]``.
    ``bias=False`` drops b (returned unchanged); ``residual=False`` drops the ``q +`` and
    the ``− k`` of the target; ``layer_norm=False`` drops LN.
    """
    B = q.shape[0]
    W, b = _per_batch(W, B, 4), _per_batch(b, B, 3)
    o, (Wf, bf) = _ttt_loop((W, b if bias else None), q, k, v, lr, token_eta, ln_scale, ln_bias,
                            mini_batch_size, eps=eps, layer_norm=layer_norm, residual=residual,
                            gelu_grad="reference")
    return o, (Wf, bf if bias else b)


def ttt_mlp_loop(q, k, v, lr, *, W1, b1, W2, b2, ln_scale, ln_bias, token_eta, mini_batch_size,
                 eps=1e-6, gelu_grad="reference"):
    """docs/rules/ttt.md TTT-MLP, token by token, in float64. Returns ``(o, (W1, b1, W2, b2))``.

    ``gelu_grad="reference"`` back-propagates the inner loss through the GELU with the
    reference's rounded hand-written derivative; ``"autodiff"`` with the exact one.
    The read path ``f(q; θ_i)`` always uses the plain GELU.
    """
    B = q.shape[0]
    params = (_per_batch(W1, B, 4), _per_batch(b1, B, 3), _per_batch(W2, B, 4), _per_batch(b2, B, 3))
    if gelu_grad not in ("reference", "autodiff"):
        raise ValueError(f"gelu_grad: got {gelu_grad!r}, expected one of ('reference', 'autodiff')")
    return _ttt_loop(params, q, k, v, lr, token_eta, ln_scale, ln_bias, mini_batch_size, eps=eps,
                     layer_norm=True, residual=True, gelu_grad=gelu_grad)
