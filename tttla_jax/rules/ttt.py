"""TTT-Linear and TTT-MLP (Sun et al., 2024) as fast-weight rules — docs/rules/ttt.md, exact
reference semantics including the reference implementation's quirks.

Per (batch, head) the fast network is ``f(x) = x W + b`` (TTT-Linear, ``W [D, D]``,
``b [D]``) or ``f(x) = gelu(x W1 + b1) W2 + b2`` (TTT-MLP, ``W1 [D, F]``, ``W2 [F, D]``,
``F = 4D`` in the paper; tanh-approximate GELU). Tokens are processed in mini-batches of
``C = mini_batch_size``; inside a mini-batch every gradient is taken at the mini-batch's
*initial* weights (docs/rules/ttt.md):

    Z_j = f(k_j),  G_j = ∇_Z ½‖LN(Z_j) − (v_j − k_j)‖²              (inner gradient)
    eta[i, j] = token_eta[i] · lr[j]                                 (j ≤ i)
    W_i = W − Σ_{j≤i} eta[i, j] k_jᵀ G_j,   b_i = b − Σ_{j≤i} eta[i, j] G_j
    o_i = q_i + LN(q_i W_i + b_i)

and the next mini-batch starts from the last row's ``(W, b)``. A trailing partial
mini-batch of ``r`` tokens uses ``token_eta[:r]``. ``LN`` is a per-head LayerNorm with
learnable scale/bias and eps 1e-6 (biased variance). TTT-MLP back-propagates ``G2`` (at
``Z2``) to ``G1 = (G2 W2ᵀ) ⊙ gelu'(Z1)`` with the reference's hand-written tanh-GELU
derivative and its rounded constants 0.79788456 / 0.1070322243 (:func:`gelu_tanh_grad`);
the forward GELU uses the exact ``sqrt(2/π)``. Row i's weights follow the same formula
through both layers, with ``x2_j = gelu(Z1_j)`` in place of ``k_j`` for ``W2``.

Two implementations of one mini-batch (``impl``, docs/implementations.md), proven equal in
the tests:

* ``impl="dual"`` (the reference's matmul form, Sun et al. §2.5 "dual form"):
  ``Z̄ = Q W − (eta ⊙ tril(Q Kᵀ)) G + b − tril(eta) G`` — never materialises per-row weights.
* ``impl="primal"``: row by row (a ``lax.scan`` over the mini-batch's rows), the running sum
  ``S_i = S_{i−1} + lr_i k_iᵀ G_i`` of rank-1 gradients gives row i's own weights
  ``W_i = W − token_eta[i] · S_i``, then ``o_i = q_i + LN(q_i W_i + b_i)``.

Inner gradients are in closed form (:func:`ln_l2_grad` back-propagates through the
LayerNorm by hand, as the reference's ``ln_fused_l2_bwd``); the tests check them
against ``jax.grad`` of the inner loss. The outer gradient is one reverse scan over the
mini-batches that rebuilds each mini-batch's initial fast weights from the next one's and
differentiates the mini-batch step there (:meth:`_TTTBase._mini_batches`, docs/rules/ttt.md
"The backward pass"); reverse mode only.

Associativity (docs/rules/ttt.md note, §2): the inner LayerNorm makes ``G`` a nonlinear function of
the state and is applied again on the read, the bias and the ``q`` residual (with the
``v − k`` target) violate ``f(x) = φ(x) W``; TTT-MLP also updates its feature map
(``W1``). There is no parallel scan; ``parallel`` raises :class:`NotAssociativeError`. The rule's
linear-attention reading (``reading``, Theorems 5.1–5.2) is exact but sequential.
Dropping LN, bias and residual (``layer_norm=bias=residual=False``) with
``mini_batch_size=1`` leaves ``W ← W + β kᵀ(v − k W)``, ``o = q W`` with
``β_t = token_eta[0] · lr_t`` — exactly the delta rule (DeltaNet, docs/linear_attention.md); see
:meth:`TTTLinearRule.delta_rule_inputs`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from tttla_jax import _checks
from tttla_jax import impl as _impl
from tttla_jax.reduce import Reading
from tttla_jax.rules.base import Rule, register

LN_EPS = 1e-6

# The reference's hand-written tanh-GELU derivative constants (docs/rules/ttt.md): sqrt(2/π) and
# 3 · 0.044715 · sqrt(2/π), both rounded. Kept exactly to match the reference.
_GELU_C = 0.79788456
_GELU_C3 = 0.1070322243
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


# ----------------------------------------------------------------------------- states


class TTTLinearState(NamedTuple):
    """TTT-Linear fast weights per batch element: ``W [B, H, D, D]``, ``b [B, H, D]``."""

    W: Float[Array, "b h d d"]
    b: Float[Array, "b h d"]


class TTTMLPState(NamedTuple):
    """TTT-MLP fast weights: ``W1 [B, H, D, F]``, ``b1 [B, H, F]``, ``W2 [B, H, F, D]``,
    ``b2 [B, H, D]``."""

    W1: Float[Array, "b h d f"]
    b1: Float[Array, "b h f"]
    W2: Float[Array, "b h f d"]
    b2: Float[Array, "b h d"]


# ----------------------------------------------------------------------------- building blocks


def gelu_tanh(x):
    """Tanh-approximate GELU, ``0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`` (forward)."""
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


def gelu_tanh_grad(x):
    """The reference's hand-written tanh-GELU derivative (docs/rules/ttt.md), rounded constants:
    ``t = tanh(0.79788456 x (1 + 0.044715 x²))``,
    ``0.5 x (1 − t²)(0.79788456 + 0.1070322243 x²) + 0.5 (1 + t)``.

    Differs from the exact derivative of :func:`gelu_tanh` by ~1e-10 (relative).
    """
    t = jnp.tanh(_GELU_C * x * (1.0 + 0.044715 * x * x))
    return 0.5 * x * (1.0 - t * t) * (_GELU_C + _GELU_C3 * x * x) + 0.5 * (1.0 + t)


def layer_norm(x: Float[Array, "... d"], scale, bias, eps: float = LN_EPS) -> Float[Array, "... d"]:
    """``scale · (x − mean) / sqrt(var + eps) + bias`` over the last axis (biased var)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return scale * (xc / jnp.sqrt(var + eps)) + bias


def ln_l2_grad(z: Float[Array, "... d"], target: Float[Array, "... d"], scale, bias,
               eps: float = LN_EPS) -> Float[Array, "... d"]:
    """Closed-form ``∇_z ½‖LN(z) − target‖²`` per row (docs/rules/ttt.md; the reference's
    ``ln_fused_l2_bwd``): with ``x̂ = (z − μ)/σ``, ``g = scale ⊙ (LN(z) − target)``,

        ∇_z = (D g − Σ_d g − x̂ Σ_d (g ⊙ x̂)) / (D σ).
    """
    D = z.shape[-1]
    mu = jnp.mean(z, axis=-1, keepdims=True)
    zc = z - mu
    std = jnp.sqrt(jnp.mean(zc * zc, axis=-1, keepdims=True) + eps)
    xhat = zc / std
    g = (scale * xhat + bias - target) * scale
    return (D * g - jnp.sum(g, axis=-1, keepdims=True)
            - xhat * jnp.sum(g * xhat, axis=-1, keepdims=True)) / (D * std)


def ttt_linear_inner_grad(W, b, k, v, ln_scale=None, ln_bias=None, *, eps: float = LN_EPS,
                          layer_norm: bool = True, bias: bool = True, residual: bool = True):
    """Closed-form per-token inner gradients of TTT-Linear at fixed ``(W, b)`` (docs/rules/ttt.md).

    ``ℓ_j = ½‖LN(k_j W + b) − (v_j − k_j)‖²``; returns ``(G, gW)`` with ``G_j = ∇_Z ℓ_j``
    ``[..., C, D]`` and ``gW_j = k_jᵀ G_j`` ``[..., C, D, D]`` (``∇_b ℓ_j = G_j``).

    Args:
      W: ``[..., D, D]``; b: ``[..., D]``; k, v: ``[..., C, D]``; ln_scale, ln_bias:
        broadcastable to ``[..., C, D]``.
    """
    Z = jnp.einsum("...cd,...de->...ce", k, W)
    if bias:
        Z = Z + b[..., None, :]
    G = _grad_z(Z, v - k if residual else v, ln_scale, ln_bias, eps, layer_norm)
    return G, jnp.einsum("...cd,...ce->...cde", k, G)


def ttt_mlp_inner_grad(W1, b1, W2, b2, k, v, ln_scale=None, ln_bias=None, *, eps: float = LN_EPS,
                       layer_norm: bool = True, bias: bool = True, residual: bool = True):
    """Closed-form per-token inner gradients of TTT-MLP at fixed weights (docs/rules/ttt.md).

    ``Z1 = k W1 + b1``, ``x2 = gelu(Z1)``, ``Z2 = x2 W2 + b2``; ``G2 = ∇_{Z2} ℓ``,
    ``G1 = (G2 W2ᵀ) ⊙ gelu'(Z1)`` with the reference's rounded derivative. Returns
    ``(G1, G2, x2)``, each ``[..., C, ·]``; the weight gradients are ``k_jᵀ G1_j`` and
    ``x2_jᵀ G2_j``.
    """
    Z1 = jnp.einsum("...cd,...df->...cf", k, W1)
    if bias:
        Z1 = Z1 + b1[..., None, :]
    x2 = gelu_tanh(Z1)
    Z2 = jnp.einsum("...cf,...fd->...cd", x2, W2)
    if bias:
        Z2 = Z2 + b2[..., None, :]
    G2 = _grad_z(Z2, v - k if residual else v, ln_scale, ln_bias, eps, layer_norm)
    G1 = jnp.einsum("...cd,...fd->...cf", G2, W2) * gelu_tanh_grad(Z1)
    return G1, G2, x2


def _grad_z(Z, target, scale, bias, eps, use_ln):
    if use_ln:
        return ln_l2_grad(Z, target, scale, bias, eps)
    return Z - target


def _token_eta_lr(token_eta, lr):
    """``eta[..., i, j] = token_eta[i] · lr[..., j]`` masked to ``j ≤ i``; ``lr [..., C]``."""
    C = lr.shape[-1]
    eta = token_eta[:, None] * lr[..., None, :]
    return jnp.where(jnp.tril(jnp.ones((C, C), bool)), eta, 0.0)


def default_token_eta(mini_batch_size: int, offset=None, dtype=jnp.float32) -> Float[Array, "c"]:
    """``token_eta[i] = max(0, 1/(i+1) + offset_i)`` (docs/rules/ttt.md; offsets are learnable, 0 at init)."""
    base = 1.0 / jnp.arange(1, mini_batch_size + 1, dtype=dtype)
    if offset is not None:
        base = base + offset
    return jnp.maximum(base, 0.0)


def ttt_lr(x, w_lr, b_lr, *, base_lr: float, head_dim: int):
    """``lr[j] = base_lr · sigmoid(x_j w_lr + b_lr) / hd`` per head (docs/rules/ttt.md).

    Args:
      x: ``[B, T, Dm]`` layer input; w_lr: ``[Dm, H]``; b_lr: ``[H]``. Returns ``[B, T, H]``.
    """
    return base_lr * jax.nn.sigmoid(jnp.einsum("btm,mh->bth", x, w_lr) + b_lr) / head_dim


def _mini_batch_mask(te, T, C):
    """``M[i, j] = token_eta[pos(i)]`` for ``j ≤ i`` in i's mini-batch, ``token_eta[C−1]`` for
    keys of earlier mini-batches (the carried last-row weights), else 0. ``[T, T]``."""
    t = jnp.arange(T)
    mb, pos = t // C, t % C
    same = (mb[:, None] == mb[None, :]) & (t[None, :] <= t[:, None])
    earlier = mb[None, :] < mb[:, None]
    return jnp.where(same, te[pos][:, None], 0.0) + jnp.where(earlier, te[C - 1], 0.0)


#: rows of a mini-batch unrolled into straight-line code in the primal form's row loop
_ROW_UNROLL = 16


def _rows(x):  # [B, H, c, ...] -> [c, B, H, ...] (scan over the rows of a mini-batch)
    return jnp.moveaxis(x, 2, 0)


def _primal_rows_scan(W, b, q, a, g, lr, te, bias):
    c = q.shape[2]
    def row(carry, xi):
        S, s = carry
        qi, ai, gi, li, ti = xi
        lg = li[..., None] * gi
        S = S + ai[..., :, None] * lg[..., None, :]
        z = jnp.einsum("bhi,bhio->bho", qi, W - ti * S)  # q_i W_i
        if bias:
            s = s + lg
            z = z + (b - ti * s)
        return (S, s), z
    (S, s), Z = lax.scan(row, (jnp.zeros_like(W), jnp.zeros_like(b)),
                         (_rows(q), _rows(a), _rows(g), _rows(lr), te), unroll=min(c, _ROW_UNROLL))
    return jnp.moveaxis(Z, 0, 2), S, s


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _primal_rows(W, b, q, a, g, lr, te, bias):
    """The primal form of a mini-batch (docs/rules/ttt.md): row ``i``'s own weights
    ``W_i = W − te_i S_i``, ``S_i = S_{i−1} + lr_i a_iᵀ g_i`` (running sum of rank-1
    gradients, one row at a time; ``b_i = b − te_i Σ_{j≤i} lr_j g_j``) and ``z_i = q_i W_i + b_i``.

    Args: W ``[B, H, I, O]``, b ``[B, H, O]``, q, a ``[B, H, c, I]``, g ``[B, H, c, O]``,
    lr ``[B, H, c]``, te ``[c]``. Returns ``(Z [B, H, c, O], W_{c−1}, b_{c−1})``.

    Its VJP (:func:`_primal_rows_bwd`) is row by row as well: one pass rebuilds ``S_i`` for
    ``dq_i = dz_i W_iᵀ`` and ``d te_i``, one reverse pass accumulates
    ``R_j = Σ_{i≥j} ∂L/∂S_i`` for ``d a_j = lr_j R_j g_j``, ``d g_j = lr_j a_j R_j``,
    ``d lr_j = a_j R_j g_jᵀ``. Autodiff of the row scan instead stacks every row's
    ``[I, O]`` residuals and was ~5× slower on CPU.
    """
    Z, S, s = _primal_rows_scan(W, b, q, a, g, lr, te, bias)
    t = te[-1]
    return Z, W - t * S, (b - t * s if bias else b)


def _primal_rows_fwd(W, b, q, a, g, lr, te, bias):
    Z, S, s = _primal_rows_scan(W, b, q, a, g, lr, te, bias)
    t = te[-1]
    return (Z, W - t * S, (b - t * s if bias else b)), (W, b, q, a, g, lr, te, S, s)


def _primal_rows_bwd(bias, res, cot):
    W, b, q, a, g, lr, te, S_c, s_c = res
    dZ, dWn, dbn = cot
    c = q.shape[2]
    t = te[-1]
    # rows forward again: S_i, s_i -> dq_i = dz_i W_iᵀ, dte_i
    def fwd_row(carry, xi):
        S, s = carry
        ai, gi, li, ti, qi, dzi = xi
        lg = li[..., None] * gi
        S = S + ai[..., :, None] * lg[..., None, :]
        u = jnp.einsum("bhio,bho->bhi", S, dzi)
        dq = jnp.einsum("bhio,bho->bhi", W, dzi) - ti * u  # dz_i W_iᵀ
        dt = -jnp.sum(qi * u, axis=-1)
        if bias:
            s = s + lg
            dt = dt - jnp.sum(s * dzi, axis=-1)
        return (S, s), (dq, dt)
    _, (dq, dt) = lax.scan(fwd_row, (jnp.zeros_like(W), jnp.zeros_like(b)),
                           (_rows(a), _rows(g), _rows(lr), te, _rows(q), _rows(dZ)),
                           unroll=min(c, _ROW_UNROLL))
    dt = jnp.moveaxis(dt, 0, 2)  # [B, H, c]
    dte = jnp.sum(dt, axis=(0, 1)).at[c - 1].add(-jnp.sum(S_c * dWn) - (jnp.sum(s_c * dbn) if bias else 0.0))
    # rows in reverse: R_j = Σ_{i≥j} −te_i q_iᵀ dz_i (− te_{c−1} dW_new), r_j likewise for the bias
    def bwd_row(carry, xi):
        R, r = carry
        ai, gi, li, ti, qi, dzi = xi
        R = R - ti * qi[..., :, None] * dzi[..., None, :]
        Rg = jnp.einsum("bhio,bho->bhi", R, gi)
        Ra = jnp.einsum("bhio,bhi->bho", R, ai)
        da = li[..., None] * Rg
        dg = li[..., None] * Ra
        dl = jnp.sum(ai * Rg, axis=-1)
        if bias:
            r = r - ti * dzi
            dg = dg + li[..., None] * r
            dl = dl + jnp.sum(gi * r, axis=-1)
        return (R, r), (da, dg, dl)
    R0 = -t * dWn
    r0 = -t * dbn if bias else jnp.zeros_like(b)
    _, (da, dg, dl) = lax.scan(bwd_row, (R0, r0), (_rows(a), _rows(g), _rows(lr), te, _rows(q), _rows(dZ)),
                               reverse=True, unroll=min(c, _ROW_UNROLL))
    dW = dWn + jnp.einsum("bhci,bhco->bhio", q, dZ)
    db = dbn + jnp.sum(dZ, axis=2) if bias else dbn
    mv = lambda x: jnp.moveaxis(x, 0, 2)
    return dW, db, mv(dq), mv(da), mv(dg), mv(dl), dte


_primal_rows.defvjp(_primal_rows_fwd, _primal_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _primal_rows_replay(W, b, q, a, g, lr, te, bias, Z):
    """:func:`_primal_rows` in the backward pass, with its outputs ``Z`` saved by the forward:
    returns ``Z`` as given and the mini-batch's last-row weights, and differentiates as
    :func:`_primal_rows` (the row passes of :func:`_primal_rows_bwd`), so the backward does
    not run the rows forward a third time. ``Z`` gets no gradient (a saved value)."""
    return _primal_rows_replay_fwd(W, b, q, a, g, lr, te, bias, Z)[0]


def _primal_rows_replay_fwd(W, b, q, a, g, lr, te, bias, Z):
    lg = lr[..., None] * g
    S = jnp.einsum("bhci,bhco->bhio", a, lg)
    s = jnp.sum(lg, axis=2)
    t = te[-1]
    return (Z, W - t * S, (b - t * s if bias else b)), (W, b, q, a, g, lr, te, S, s)


def _primal_rows_replay_bwd(bias, res, cot):
    return _primal_rows_bwd(bias, res, cot) + (jnp.zeros_like(cot[0]),)


_primal_rows_replay.defvjp(_primal_rows_replay_fwd, _primal_rows_replay_bwd)


@jax.custom_vjp
def _mm(x, W):
    """``x W`` per batch and head (``[B, H, C, I] × [B, H, I, O]``). Its VJP forms ``xᵀ ∂y``
    directly as ``[I, O]``: autodiff of the product computes ``∂yᵀ x`` and transposes it, which
    XLA:CPU wrote out as a copy of every weight gradient in the backward scan."""
    return jnp.einsum("bhci,bhio->bhco", x, W)


def _mm_fwd(x, W):
    return _mm(x, W), (x, W)


def _mm_bwd(res, g):
    x, W = res
    return jnp.einsum("bhco,bhio->bhci", g, W), jnp.einsum("bhci,bhco->bhio", x, g)


_mm.defvjp(_mm_fwd, _mm_bwd)


def _last_row_update(te, lr, G):  # eta[c−1, j] G_j: the mini-batch's update is k_jᵀ of this
    return (te[-1] * lr)[..., None] * G


def _with_one(x):  # the bias as an extra key / query dimension
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], -1)


def _stack_bias(W, b):  # [B, H, I, O], [B, H, O] -> [B, H, I + 1, O]
    return jnp.concatenate([W, b[:, :, None, :]], axis=2)


# ----------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class _TTTBase(Rule):
    #: both implementations are sequential (a scan over mini-batches); "auto" runs ``impl``
    impls: ClassVar[Tuple[str, ...]] = ("dual", "primal")

    mini_batch_size: int = 16
    impl: str = "dual"
    eps: float = LN_EPS
    layer_norm: bool = True
    bias: bool = True
    residual: bool = True

    def __post_init__(self):
        object.__setattr__(self, "mini_batch_size",
                           _checks.check_positive_int("mini_batch_size", self.mini_batch_size))
        _impl.check_impl("impl", self.impl, self.impls, where=type(self).__name__)
        eps = _checks.check_scale(self.eps, "eps")
        if eps is None or not eps > 0:
            raise ValueError(f"eps: expected a positive float, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)

    # --------------------------------------------------------------- protocol
    def resolve_impl(self, impl: str = "auto") -> str:
        """``"auto"`` runs the configured :attr:`impl`; ``"dual"``/``"primal"`` run that form."""
        return self.impl if impl == "auto" else _impl.check_impl(
            "impl", impl, ("auto",) + self.impls, where=type(self).__name__)

    def __call__(self, *args, impl: str = "auto", **kwargs):
        """:meth:`recurrent` in the implementation ``impl`` (``"auto"``: the configured one)."""
        chosen = self.resolve_impl(impl)
        rule = self if chosen == self.impl else dataclasses.replace(self, impl=chosen)
        return rule.recurrent(*args, **kwargs)

    def has_reading(self) -> bool:
        return True

    def linear_attention_reason(self) -> Optional[str]:
        return (f"{type(self).__name__} is not plain linear attention: its effective values are "
                "gradients at each mini-batch's initial weights, which the earlier mini-batches "
                "produce (a sequential reading); " + self.breaks_associativity())

    # --------------------------------------------------------------- shared plumbing
    def _validate_tokens(self, q, k, v, lr, token_eta, ln_scale, ln_bias):
        for name, x in (("q", q), ("k", k), ("v", v)):
            _checks.check_rank(name, x, 4, "[B, T, H, D]")
            _checks.check_floating(name, x)
        B, T, H, D = q.shape
        if T == 0:
            raise ValueError("q: expected at least one token (T >= 1), got T = 0")
        _checks.check_shape("k", k, (B, T, H, D), "[B, T, H, D] (from q)")
        _checks.check_shape("v", v, (B, T, H, D),
                            "[B, T, H, D] (from q; the target v − k and the residual need V = D)")
        _checks.check_shape("lr", lr, (B, T, H), "[B, T, H] (from q)")
        _checks.check_floating("lr", lr)
        _checks.check_shape("token_eta", token_eta, (self.mini_batch_size,),
                            f"[mini_batch_size] with mini_batch_size = {self.mini_batch_size}")
        _checks.check_floating("token_eta", token_eta)
        if self.layer_norm:
            for name, x in (("ln_scale", ln_scale), ("ln_bias", ln_bias)):
                if x is None:
                    raise ValueError(f"{name}: required with layer_norm=True (shape [H, D] = {(H, D)})")
                _checks.check_shape(name, x, (H, D), "[H, D] (from q)")
                _checks.check_floating(name, x)
        return B, T, H, D

    def _check_state_leaves(self, state, cls, expected):
        if not isinstance(state, cls):
            if isinstance(state, (tuple, list)) and len(state) == len(cls._fields):
                state = cls(*state)
            else:
                raise ValueError(
                    f"state: expected a {cls.__name__} (see init_state) with fields {cls._fields}, "
                    f"got {type(state).__name__}")
        for name, x, (shape, layout) in zip(cls._fields, state, expected):
            _checks.check_shape(f"state.{name}", x, shape, layout)
            _checks.check_floating(f"state.{name}", x)
        return state

    def _scan(self, xs, token_eta, st, gamma, beta):
        """Scan :meth:`_step` over full mini-batches (:meth:`_mini_batches`), then the
        trailing partial one with ``token_eta[:r]``. ``xs``: tuple of ``[B, T, H, …]``."""
        C = self.mini_batch_size
        T = xs[0].shape[1]
        N, r = divmod(T, C)

        def blocks(x, start, n, c):  # [B, T, H, ...] -> [n, B, H, c, ...]
            x = x[:, start:start + n * c]
            x = x.reshape((x.shape[0], n, c) + x.shape[2:])
            return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

        outs = []
        if N > 0:
            st, o = self._mini_batches(st, tuple(blocks(x, 0, N, C) for x in xs), token_eta, gamma, beta)
            o = jnp.moveaxis(o, 3, 2)  # [N, B, C, H, D]
            outs.append(jnp.moveaxis(o, 0, 1).reshape((o.shape[1], N * C) + o.shape[3:]))
        if r > 0:  # one step: plain autodiff, recomputed in the backward from its initial weights
            step = jax.checkpoint(lambda s, x, te: self._step(s, x, te, gamma, beta)[:2])
            st, o = step(st, tuple(blocks(x, N * C, 1, r)[0] for x in xs), token_eta[:r])
            outs.append(jnp.moveaxis(o, 2, 1))  # [B, r, H, D]
        return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)), st

    def _mini_batches(self, st, xb, token_eta, gamma, beta):
        """``lax.scan`` of :meth:`_step` over ``N`` full mini-batches ``xb`` (``[N, B, H, C, …]``);
        returns ``(final state, o [N, B, H, C, D])``.

        Its VJP (docs/rules/ttt.md, "The backward pass") is one reverse scan that rebuilds each
        mini-batch's initial weights from the next one's, ``W_n = W_{n+1} + Σ_j k_jᵀ (eta[c−1, j]
        G_j)`` (the step's own update undone; TTT-MLP rebuilds ``W1_n`` first, then its hidden
        features ``x2``, then ``W2_n``), and differentiates the step there. The forward keeps
        only the scaled gradients ``eta[c−1, j] G_j`` per mini-batch (``[C, D]``, TTT-MLP
        ``[C, F]`` and ``[C, D]``), not the weights (``[D, D]``; ``[D, F]`` and ``[F, D]``).
        Rebuilt weights differ from the forward's by rounding only (each step adds back the
        stored update). The primal form also keeps its read-outs ``Z̄`` (TTT-MLP ``Z̄1``,
        ``Z̄2``; ``[C, D]``/``[C, F]``), so its backward runs the row loop's VJP passes but not
        the row loop itself again (:func:`_primal_rows_replay`). Reverse mode only
        (``jax.jvp`` is not supported).
        """

        @jax.custom_vjp
        def run(st, xb, te, gamma, beta):
            return lax.scan(lambda s, x: self._step(s, x, te, gamma, beta)[:2], st, xb)

        def run_fwd(st, xb, te, gamma, beta):
            def body(s, x):
                s, o, upd = self._step(s, x, te, gamma, beta)
                return s, (o, upd)
            stN, (o, upd) = lax.scan(body, st, xb)
            return (stN, o), (stN, xb, te, gamma, beta, upd)

        def run_bwd(res, cot):
            stN, xb, te, gamma, beta, upd = res
            dstN, do = cot
            zeros = lambda t: jax.tree.map(jnp.zeros_like, t)

            def body(carry, inp):
                s_next, ds, acc = carry
                x, u, don = inp
                s = self._rebuild(s_next, x, u)
                _, vjp = jax.vjp(lambda s, x, te, g, b: self._step(s, x, te, g, b, replay=u[1])[:2],
                                 s, x, te, gamma, beta)
                ds, dx, *dp = vjp((ds, don))
                return (s, ds, jax.tree.map(jnp.add, acc, tuple(dp))), dx

            init = (stN, dstN, zeros((te, gamma, beta)))
            (_, dst, (dte, dg, db)), dxb = lax.scan(body, init, (xb, upd, do), reverse=True)
            return dst, dxb, dte, dg, db

        run.defvjp(run_fwd, run_bwd)
        return run(st, xb, token_eta, gamma, beta)

    def _read_out(self, q, Zbar, gamma, beta):
        y = layer_norm(Zbar, gamma, beta, self.eps) if self.layer_norm else Zbar
        return q + y if self.residual else y

    def _ln_params(self, ln_scale, ln_bias, sd):
        if not self.layer_norm:
            return None, None
        return (ln_scale.astype(sd)[:, None, :], ln_bias.astype(sd)[:, None, :])  # [H, 1, D]

    def _nonassoc_parts(self):
        parts = []
        if self.layer_norm:
            parts.append("the inner LayerNorm (LN(Z) in the inner loss makes the gradient G a "
                         "nonlinear function of the fast weights, and LN(q W_i + b_i) is applied on the read)")
        if self.bias:
            parts.append("the fast-weight bias b (f(x) = x W + b is not φ(x) W)")
        if self.residual:
            parts.append("the q residual with the v − k target")
        return parts


@dataclasses.dataclass(frozen=True)
class TTTLinearRule(_TTTBase):
    """TTT-Linear (Sun et al.), docs/rules/ttt.md; the module docstring has the math.

    Attributes:
      mini_batch_size: ``C`` (16 in the paper); gradients inside a mini-batch are taken at
        its initial weights.
      impl: ``"dual"`` (matmul form, default) or ``"primal"`` (per-row weights); both
        give the same outputs, state and gradients (docs/implementations.md).
      eps: inner LayerNorm epsilon (1e-6).
      layer_norm, bias, residual: ablation switches (all on = the reference). ``residual``
        toggles both the ``q +`` in the output and the ``− k`` in the target. All off with
        ``mini_batch_size=1`` is the delta rule (:meth:`delta_rule_inputs`).
    """

    def breaks_associativity(self) -> str:
        parts = self._nonassoc_parts()
        if parts:
            return ("TTT-Linear has no associative scan: " + "; ".join(parts)
                    + " (docs/rules/ttt.md note: dropping LayerNorm, bias and residual gives DeltaNet)")
        return ("without LayerNorm, bias and residual TTT-Linear is the (mini-batch) delta rule, "
                "whose update W ← W + β kᵀ(v − k W) depends on W, so no plain associative scan; "
                "with mini_batch_size=1 use TTTLinearRule.delta_rule_inputs and tt.delta_rule's "
                "chunked (WY) form")

    def init_state(self, W: Float[Array, "h d d"], b: Optional[Float[Array, "h d"]],
                   batch: int) -> TTTLinearState:
        """Broadcast the learned ``W [H, D, D]`` and ``b [H, D]`` (None = zeros) over ``batch``."""
        W = jnp.asarray(W)
        _checks.check_rank("W", W, 3, "[H, D, D]")
        _checks.check_floating("W", W)
        H, D = W.shape[0], W.shape[1]
        _checks.check_shape("W", W, (H, D, D), f"[H, D, D] with (H, D) = {(H, D)}")
        if b is None:
            b = jnp.zeros((H, D), W.dtype)
        b = jnp.asarray(b)
        _checks.check_shape("b", b, (H, D), "[H, D] (from W)")
        _checks.check_floating("b", b)
        sd = _checks.state_dtype(W, b)
        return TTTLinearState(jnp.broadcast_to(W.astype(sd), (batch, H, D, D)),
                              jnp.broadcast_to(b.astype(sd), (batch, H, D)))

    def _step(self, st, x, token_eta, gamma, beta, replay=None):
        """One mini-batch: ``(next state, o, (eta[c−1, j] G_j, kept))``; ``kept`` is the
        primal form's ``Z̄`` (``()`` for the dual), which the backward passes back as
        ``replay`` (:func:`_primal_rows_replay`)."""
        W, b = st
        q, k, v, lr = x  # [B, H, c, D] ×3, [B, H, c]
        c = q.shape[2]
        if self.impl == "dual":  # k W and q W in one matmul
            Zkq = jnp.einsum("bhcd,bhde->bhce", jnp.concatenate([k, q], axis=2), W)
            Z, qW = Zkq[:, :, :c], Zkq[:, :, c:]
        else:
            Z = jnp.einsum("bhcd,bhde->bhce", k, W)
        if self.bias:
            Z = Z + b[:, :, None, :]
        G = _grad_z(Z, v - k if self.residual else v, gamma, beta, self.eps, self.layer_norm)
        if self.impl == "dual":
            eta = _token_eta_lr(token_eta, lr)  # [B, H, c, c], lower triangular
            attn = jnp.einsum("bhid,bhjd->bhij", q, k)
            if self.bias:  # the bias as an extra key/query dimension of value 1
                qW = qW + b[:, :, None, :]
                attn = attn + 1.0
            Zbar = qW - jnp.einsum("bhij,bhje->bhie", eta * attn, G)
            lG = eta[:, :, -1, :, None] * G  # eta[c−1, j] G_j
            W_new = W - jnp.einsum("bhjd,bhje->bhde", k, lG)
            b_new = b - jnp.sum(lG, axis=2) if self.bias else b
        else:
            if replay:
                Zbar, W_new, b_new = _primal_rows_replay(W, b, q, k, G, lr, token_eta, self.bias, replay[0])
            else:
                Zbar, W_new, b_new = _primal_rows(W, b, q, k, G, lr, token_eta, self.bias)
            lG = _last_row_update(token_eta, lr, G)
        kept = (Zbar,) if self.impl == "primal" else ()
        return TTTLinearState(W_new, b_new), self._read_out(q, Zbar, gamma, beta), (lG, kept)

    def _rebuild(self, st, x, upd):
        """The mini-batch's initial state from its final one and the stored ``eta[c−1, j] G_j``."""
        W, b = st
        lG = upd[0]
        k = x[1]
        return TTTLinearState(W + jnp.einsum("bhjd,bhje->bhde", k, lG),
                              b + jnp.sum(lG, axis=2) if self.bias else b)

    def recurrent(
        self,
        q: Float[Array, "b t h d"],
        k: Float[Array, "b t h d"],
        v: Float[Array, "b t h d"],
        lr: Float[Array, "b t h"],
        token_eta: Float[Array, "c"],
        ln_scale: Optional[Float[Array, "h d"]],
        ln_bias: Optional[Float[Array, "h d"]],
        state: TTTLinearState,
        output_final_state: bool = False,
    ):
        """``lax.scan`` over mini-batches (docs/rules/ttt.md), in ``self.impl``.

        Args:
          q, k, v: ``[B, T, H, D]``; lr: ``[B, T, H]`` per-token ``lr[j]`` (base_lr and
            1/D already applied); token_eta: ``[mini_batch_size]``; ln_scale, ln_bias:
            ``[H, D]`` (unused with ``layer_norm=False``); state: :class:`TTTLinearState`.
          output_final_state: return the final fast weights (else ``None``).

        Returns:
          ``(o [B, T, H, D]`` in q's dtype, final :class:`TTTLinearState` (float32/64) or None).
        """
        B, T, H, D = self._validate_tokens(q, k, v, lr, token_eta, ln_scale, ln_bias)
        state = self._check_state_leaves(
            state, TTTLinearState, (((B, H, D, D), "[B, H, D, D] (from q)"), ((B, H, D), "[B, H, D] (from q)")))
        sd = _checks.state_dtype(q, k, v, lr, token_eta, ln_scale, ln_bias, *state)
        gamma, beta = self._ln_params(ln_scale, ln_bias, sd)
        st = TTTLinearState(*(x.astype(sd) for x in state))
        xs = tuple(x.astype(sd) for x in (q, k, v, lr))
        o, st = self._scan(xs, token_eta.astype(sd), st, gamma, beta)
        return o.astype(q.dtype), (st if output_final_state else None)

    def delta_rule_inputs(self, q, k, v, lr, token_eta, state: TTTLinearState):
        """The delta-rule problem this rule *is* when LN, bias and residual are dropped and
        ``mini_batch_size == 1`` (docs/rules/ttt.md note, docs/linear_attention.md delta rule with ``scale = 1``).

        Returns a dict ``(q, k, v, beta, initial_state, scale)`` for ``tt.delta_rule``:
        ``beta = token_eta[0] · lr`` ``[B, T, H]`` and ``initial_state = state.W`` (``[B, H,
        K, V]`` with K = V = D). Raises ``ValueError`` for any other configuration.
        """
        if self.layer_norm or self.bias or self.residual or self.mini_batch_size != 1:
            raise ValueError(
                "delta_rule_inputs: needs layer_norm=bias=residual=False and mini_batch_size=1, got "
                f"layer_norm={self.layer_norm}, bias={self.bias}, residual={self.residual}, "
                f"mini_batch_size={self.mini_batch_size}")
        self._validate_tokens(q, k, v, lr, token_eta, None, None)
        return dict(q=q, k=k, v=v, beta=token_eta[0] * lr, initial_state=state.W, scale=1.0)

    def reading(self, q, k, v, lr, token_eta, ln_scale, ln_bias, state, output_final_state=True) -> Reading:
        """TTT-Linear (docs/rules/ttt.md) read as masked linear attention followed by ``q + LN(·)``.

        With the bias as an extra key/query dimension (``k̂ = [k, 1]``, ``q̂ = [q, 1]``,
        ``S_0 = [W_0; b_0]``) and effective values ``v̂_j = −lr_j G_j``:

            Z̄_i = q̂_i (S_0 + Σ_j M[i, j] k̂_jᵀ v̂_j),   o_i = q_i + LN(Z̄_i)

        with ``M[i, j] = token_eta[pos(i)]`` inside a mini-batch (``j ≤ i``) and
        ``token_eta[C−1]`` for keys of earlier mini-batches (the carried last-row weights).
        ``G_j = ∇_Z ½‖LN(Z_j) − (v_j − k_j)‖²`` is taken at the mini-batch's initial weights,
        which the earlier mini-batches produce — a sequential reading (computed here with
        ``jax.grad``, independently of the rule's closed form). The read-out LayerNorm and
        residual are the reading's ``post`` map: the linear part is exact linear attention.
        Arguments as :meth:`recurrent` (``output_final_state`` is accepted and unused).
        """
        B, T, H, D = self._validate_tokens(q, k, v, lr, token_eta, ln_scale, ln_bias)
        state = self._check_state_leaves(
            state, TTTLinearState, (((B, H, D, D), "[B, H, D, D] (from q)"), ((B, H, D), "[B, H, D] (from q)")))
        sd = _checks.state_dtype(q, k, v)
        C = self.mini_batch_size
        qf, kf, vf, lrf, te = (x.astype(sd) for x in (q, k, v, lr, token_eta))
        gamma = beta = None
        if self.layer_norm:
            gamma, beta = ln_scale.astype(sd), ln_bias.astype(sd)
        target = vf - kf if self.residual else vf
        W, b = state.W.astype(sd), state.b.astype(sd)

        def inner_loss(Z, tgt):
            y = layer_norm(Z, gamma, beta, self.eps) if self.layer_norm else Z
            return 0.5 * jnp.sum((y - tgt) ** 2)

        vhats = []
        for start in range(0, T, C):
            end = min(start + C, T)
            kj, tj = kf[:, start:end], target[:, start:end]
            Z = jnp.einsum("bthd,bhde->bthe", kj, W) + (b[:, None] if self.bias else 0.0)
            vh = -lrf[:, start:end, :, None] * jax.grad(inner_loss)(Z, tj)
            vhats.append(vh)
            last = te[end - start - 1]  # the next mini-batch starts from the last row's weights
            W = W + last * jnp.einsum("bthd,bthe->bhde", kj, vh)
            if self.bias:
                b = b + last * jnp.sum(vh, axis=1)
        vhat = jnp.concatenate(vhats, axis=1)
        mask = _mini_batch_mask(te, T, C)
        W0, b0 = state.W.astype(sd), state.b.astype(sd)
        if self.bias:
            one = jnp.ones((B, T, H, 1), sd)
            qh, kh = jnp.concatenate([qf, one], -1), jnp.concatenate([kf, one], -1)
            S0 = jnp.concatenate([W0, b0[:, :, None, :]], axis=2)
        else:
            qh, kh, S0 = qf, kf, W0

        def post(Zbar):
            y = layer_norm(Zbar, gamma, beta, self.eps) if self.layer_norm else Zbar
            return qf + y if self.residual else y

        return Reading(qh, kh, vhat, mask, jnp.ones((B, H, T), sd), S0, associative=False,
                       breaks=self.breaks_associativity(), post=post)


@dataclasses.dataclass(frozen=True)
class TTTMLPRule(_TTTBase):
    """TTT-MLP (Sun et al.), docs/rules/ttt.md: ``f(x) = gelu(x W1 + b1) W2 + b2``; same schedule,
    same attributes as :class:`TTTLinearRule` (the delta-rule reduction does not apply)."""

    def breaks_associativity(self) -> str:
        parts = self._nonassoc_parts()
        parts.append("the GELU hidden layer, whose weights W1 are updated (a time-varying "
                     "feature map φ_t, docs/ttt_as_linear_attention.md)")
        return "TTT-MLP has no associative scan: " + "; ".join(parts)

    def init_state(self, W1, b1, W2, b2, batch: int) -> TTTMLPState:
        """Broadcast ``W1 [H, D, F]``, ``b1 [H, F]``, ``W2 [H, F, D]``, ``b2 [H, D]`` (biases
        may be None = zeros) over ``batch``."""
        W1, W2 = jnp.asarray(W1), jnp.asarray(W2)
        _checks.check_rank("W1", W1, 3, "[H, D, F]")
        _checks.check_floating("W1", W1)
        H, D, F = W1.shape
        _checks.check_shape("W2", W2, (H, F, D), "[H, F, D] (from W1)")
        _checks.check_floating("W2", W2)
        b1 = jnp.zeros((H, F), W1.dtype) if b1 is None else jnp.asarray(b1)
        b2 = jnp.zeros((H, D), W2.dtype) if b2 is None else jnp.asarray(b2)
        _checks.check_shape("b1", b1, (H, F), "[H, F] (from W1)")
        _checks.check_shape("b2", b2, (H, D), "[H, D] (from W1)")
        _checks.check_floating("b1", b1)
        _checks.check_floating("b2", b2)
        sd = _checks.state_dtype(W1, b1, W2, b2)
        bc = lambda x: jnp.broadcast_to(x.astype(sd), (batch,) + x.shape)
        return TTTMLPState(bc(W1), bc(b1), bc(W2), bc(b2))

    def _step(self, st, x, token_eta, gamma, beta, replay=None):
        """As :meth:`TTTLinearRule._step`; the primal form keeps ``(Z̄1, Z̄2)``."""
        W1, b1, W2, b2 = st
        q, k, v, lr = x
        c = q.shape[2]
        if self.impl == "dual":  # k W1 and q W1 in one matmul
            Z1kq = _mm(jnp.concatenate([k, q], axis=2), W1)
            Z1, qW1 = Z1kq[:, :, :c], Z1kq[:, :, c:]
        else:
            Z1 = jnp.einsum("bhcd,bhdf->bhcf", k, W1)
        if self.bias:
            Z1 = Z1 + b1[:, :, None, :]
        x2 = gelu_tanh(Z1)
        Z2 = _mm(x2, W2)
        if self.bias:
            Z2 = Z2 + b2[:, :, None, :]
        G2 = _grad_z(Z2, v - k if self.residual else v, gamma, beta, self.eps, self.layer_norm)
        G1 = jnp.einsum("bhcd,bhfd->bhcf", G2, W2) * gelu_tanh_grad(Z1)
        if self.impl == "dual":
            eta = _token_eta_lr(token_eta, lr)
            a1 = jnp.einsum("bhid,bhjd->bhij", q, k)
            if self.bias:  # the biases as an extra key/query dimension of value 1
                qW1 = qW1 + b1[:, :, None, :]
                a1 = a1 + 1.0
            x2bar = gelu_tanh(qW1 - jnp.einsum("bhij,bhjf->bhif", eta * a1, G1))
            a2 = jnp.einsum("bhif,bhjf->bhij", x2bar, x2)
            if self.bias:
                a2 = a2 + 1.0
            Z2bar = (_mm(x2bar, W2)
                     - jnp.einsum("bhij,bhjd->bhid", eta * a2, G2))
            if self.bias:
                Z2bar = Z2bar + b2[:, :, None, :]
            last = eta[:, :, -1, :, None]  # eta[c−1, j]
            lG1, lG2 = last * G1, last * G2
            W1n = W1 - jnp.einsum("bhjd,bhjf->bhdf", k, lG1)
            W2n = W2 - jnp.einsum("bhjf,bhjd->bhfd", x2, lG2)
            b1n = b1 - jnp.sum(lG1, axis=2) if self.bias else b1
            b2n = b2 - jnp.sum(lG2, axis=2) if self.bias else b2
        else:
            # row i's weights of both layers: W1_i from (k_j, G1_j), W2_i from (x2_j, G2_j);
            # q_i is read through W1_i, its hidden features gelu(·) through W2_i
            if replay:
                Z1bar, W1n, b1n = _primal_rows_replay(W1, b1, q, k, G1, lr, token_eta, self.bias, replay[0])
                Z2bar, W2n, b2n = _primal_rows_replay(W2, b2, gelu_tanh(Z1bar), x2, G2, lr, token_eta,
                                                      self.bias, replay[1])
            else:
                Z1bar, W1n, b1n = _primal_rows(W1, b1, q, k, G1, lr, token_eta, self.bias)
                Z2bar, W2n, b2n = _primal_rows(W2, b2, gelu_tanh(Z1bar), x2, G2, lr, token_eta, self.bias)
            lG1, lG2 = _last_row_update(token_eta, lr, G1), _last_row_update(token_eta, lr, G2)
        kept = (Z1bar, Z2bar) if self.impl == "primal" else ()
        return TTTMLPState(W1n, b1n, W2n, b2n), self._read_out(q, Z2bar, gamma, beta), ((lG1, lG2), kept)

    def _rebuild(self, st, x, upd):
        """The mini-batch's initial state from its final one and the stored ``eta[c−1, j] G1_j``,
        ``eta[c−1, j] G2_j``: ``W1`` first, then the hidden features ``x2`` at it, then ``W2``."""
        W1, b1, W2, b2 = st
        lG1, lG2 = upd[0]
        k = x[1]
        W1 = W1 + jnp.einsum("bhjd,bhjf->bhdf", k, lG1)
        Z1 = jnp.einsum("bhcd,bhdf->bhcf", k, W1)
        if self.bias:
            b1 = b1 + jnp.sum(lG1, axis=2)
            Z1 = Z1 + b1[:, :, None, :]
            b2 = b2 + jnp.sum(lG2, axis=2)
        W2 = W2 + jnp.einsum("bhjf,bhjd->bhfd", gelu_tanh(Z1), lG2)
        return TTTMLPState(W1, b1, W2, b2)

    def _check_state(self, state, B: int, H: int, D: int) -> TTTMLPState:
        """A :class:`TTTMLPState` ``(W1, b1, W2, b2)`` with shapes matching q (named errors)."""
        if not isinstance(state, (tuple, list)) or len(state) != 4:
            raise ValueError(f"state: expected a TTTMLPState (W1, b1, W2, b2), got {type(state).__name__}")
        W1 = jnp.asarray(state[0])
        _checks.check_rank("state.W1", W1, 4, "[B, H, D, F]")
        F = W1.shape[-1]
        return self._check_state_leaves(state, TTTMLPState, (
            ((B, H, D, F), "[B, H, D, F] (from q)"), ((B, H, F), "[B, H, F] (from q, W1)"),
            ((B, H, F, D), "[B, H, F, D] (from q, W1)"), ((B, H, D), "[B, H, D] (from q)")))

    def recurrent(
        self,
        q: Float[Array, "b t h d"],
        k: Float[Array, "b t h d"],
        v: Float[Array, "b t h d"],
        lr: Float[Array, "b t h"],
        token_eta: Float[Array, "c"],
        ln_scale: Optional[Float[Array, "h d"]],
        ln_bias: Optional[Float[Array, "h d"]],
        state: TTTMLPState,
        output_final_state: bool = False,
    ):
        """``lax.scan`` over mini-batches (docs/rules/ttt.md); arguments as
        :meth:`TTTLinearRule.recurrent` with a :class:`TTTMLPState`."""
        B, T, H, D = self._validate_tokens(q, k, v, lr, token_eta, ln_scale, ln_bias)
        state = self._check_state(state, B, H, D)
        sd = _checks.state_dtype(q, k, v, lr, token_eta, ln_scale, ln_bias, *state)
        gamma, beta = self._ln_params(ln_scale, ln_bias, sd)
        st = TTTMLPState(*(x.astype(sd) for x in state))
        xs = tuple(x.astype(sd) for x in (q, k, v, lr))
        o, st = self._scan(xs, token_eta.astype(sd), st, gamma, beta)
        return o.astype(q.dtype), (st if output_final_state else None)

    def reading(self, q, k, v, lr, token_eta, ln_scale, ln_bias, state, output_final_state=True) -> Reading:
        """TTT-MLP (docs/rules/ttt.md) read as Theorem 5.1/5.2 for an MLP fast weight with **all** layers
        updated: the last layer is linear, so

            Z̄2_i = q̂_i (S_0 + Σ_j M[i, j] k̂_jᵀ v̂_j),   o_i = q_i + LN(Z̄2_i)

        with ``S_0 = [W2_0; b2_0]``, effective values ``v̂_j = −lr_j G2_j``
        (``G2 = ∇_{Z2} ½‖LN(Z2) − (v − k)‖²`` at the mini-batch's initial weights), keys the
        pre-update hidden features ``k̂_j = [gelu(k_j W1_m + b1_m), 1]`` (``m`` = j's
        mini-batch) and queries the *post-update* features ``q̂_i = [gelu(Z̄1_i), 1]``, where the
        first layer's pre-activation is itself a masked linear attention of its per-token
        gradients, ``Z̄1_i = [q_i, 1]([W1_0; b1_0] + Σ_j M[i, j] [k_j, 1]ᵀ(−lr_j G1_j))``,
        ``G1 = (G2 W2_mᵀ) ⊙ gelu'(Z1)`` (the reference's rounded tanh-GELU derivative, part of
        the rule's definition). ``M`` is TTT-Linear's mini-batch mask. The feature map φ_t
        (the trajectory of W1, b1) depends on the history: exact but sequential
        (Theorem 5.2 with a time-varying feature map); the LayerNorm and residual are
        the reading's ``post`` map, the biases extra key/query dimensions. ``G2`` comes from
        ``jax.grad`` of the inner loss, independently of the rule's closed form.
        """
        B, T, H, D = self._validate_tokens(q, k, v, lr, token_eta, ln_scale, ln_bias)
        state = self._check_state(state, B, H, D)
        sd = _checks.state_dtype(q, k, v, lr, token_eta, ln_scale, ln_bias, *state)
        C = self.mini_batch_size
        qf, kf, vf, lrf, te = (x.astype(sd) for x in (q, k, v, lr, token_eta))
        gamma = beta = None
        if self.layer_norm:
            gamma, beta = ln_scale.astype(sd), ln_bias.astype(sd)
        target = vf - kf if self.residual else vf
        W1, b1, W2, b2 = (x.astype(sd) for x in state)
        W10, b10, W20, b20 = W1, b1, W2, b2
        use_b = 1.0 if self.bias else 0.0

        def inner_loss(Z, tgt):
            y = layer_norm(Z, gamma, beta, self.eps) if self.layer_norm else Z
            return 0.5 * jnp.sum((y - tgt) ** 2)

        v1s, v2s, x2s = [], [], []
        for start in range(0, T, C):
            end = min(start + C, T)
            kj, tj, lj = kf[:, start:end], target[:, start:end], lrf[:, start:end, :, None]
            Z1 = jnp.einsum("bthd,bhdf->bthf", kj, W1) + use_b * b1[:, None]
            x2 = gelu_tanh(Z1)
            Z2 = jnp.einsum("bthf,bhfd->bthd", x2, W2) + use_b * b2[:, None]
            G2 = jax.grad(inner_loss)(Z2, tj)
            G1 = jnp.einsum("bthd,bhfd->bthf", G2, W2) * gelu_tanh_grad(Z1)
            v1, v2 = -lj * G1, -lj * G2
            v1s.append(v1), v2s.append(v2), x2s.append(x2)
            last = te[end - start - 1]  # the next mini-batch starts from the last row's weights
            W1 = W1 + last * jnp.einsum("bthd,bthf->bhdf", kj, v1)
            W2 = W2 + last * jnp.einsum("bthf,bthd->bhfd", x2, v2)
            if self.bias:
                b1 = b1 + last * jnp.sum(v1, axis=1)
                b2 = b2 + last * jnp.sum(v2, axis=1)
        v1, v2, x2 = (jnp.concatenate(x, axis=1) for x in (v1s, v2s, x2s))
        mask = _mini_batch_mask(te, T, C)
        ones = jnp.ones((B, H, T), sd)
        if self.bias:
            layer1 = Reading(_with_one(qf), _with_one(kf), v1, mask, ones, _stack_bias(W10, b10))
        else:
            layer1 = Reading(qf, kf, v1, mask, ones, W10)
        z1bar = layer1.outputs()  # q_i's first-layer pre-activation after the update (history-dependent)
        qh, kh = gelu_tanh(z1bar), x2
        S0 = W20
        if self.bias:
            qh, kh, S0 = _with_one(qh), _with_one(kh), _stack_bias(W20, b20)

        def post(Zbar):
            y = layer_norm(Zbar, gamma, beta, self.eps) if self.layer_norm else Zbar
            return qf + y if self.residual else y

        return Reading(qh, kh, v2, mask, ones, S0, associative=False,
                       breaks=self.breaks_associativity(), post=post)


# ----------------------------------------------------------------------------- functional ops


def _initial(rule, initial_state, weights, names, B, H, D):
    if initial_state is not None:
        return initial_state
    for name, w in zip(names[::2], weights[::2]):
        if w is None:
            raise ValueError(f"{name}: required when initial_state is None")
    W = jnp.asarray(weights[0])
    if W.shape[:2] != (H, D):
        raise ValueError(
            f"{names[0]}: expected leading dims [H, D] = {(H, D)} (from q), got shape {tuple(W.shape)}")
    return rule.init_state(*weights, B)


def ttt_linear(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t h d"],
    v: Float[Array, "b t h d"],
    lr: Float[Array, "b t h"],
    *,
    W: Optional[Float[Array, "h d d"]] = None,
    b: Optional[Float[Array, "h d"]] = None,
    ln_scale: Optional[Float[Array, "h d"]],
    ln_bias: Optional[Float[Array, "h d"]],
    token_eta: Float[Array, "c"],
    mini_batch_size: int = 16,
    initial_state: Optional[TTTLinearState] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """TTT-Linear core op (docs/rules/ttt.md): ``o_i = q_i + LN(q_i W_i + b_i)`` with mini-batch
    gradient steps on ``½‖LN(k W + b) − (v − k)‖²``.

    Args:
      q, k, v: ``[B, T, H, D]``. lr: ``[B, T, H]`` per-token rates (``base_lr ·
        sigmoid(·) / D`` already applied, see :func:`ttt_lr`). W: ``[H, D, D]``, b:
        ``[H, D]`` learned initial fast weights; ``initial_state``
        (:class:`TTTLinearState`, ``[B, H, D, D]`` / ``[B, H, D]``) overrides them.
      ln_scale, ln_bias: ``[H, D]`` inner LayerNorm. token_eta: ``[mini_batch_size]``
        (see :func:`default_token_eta`). impl: ``"dual"`` | ``"primal"`` | ``"auto"`` (dual).

    Returns:
      ``(o, state)``; ``state`` is the final :class:`TTTLinearState` or ``None``.
    """
    rule = TTTLinearRule(mini_batch_size=mini_batch_size, impl="dual" if impl == "auto" else impl)
    _checks.check_rank("q", q, 4, "[B, T, H, D]")
    B, _, H, D = q.shape
    st = _initial(rule, initial_state, (W, b), ("W", "b"), B, H, D)
    return rule.recurrent(q, k, v, lr, token_eta, ln_scale, ln_bias, st, output_final_state)


def ttt_mlp(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t h d"],
    v: Float[Array, "b t h d"],
    lr: Float[Array, "b t h"],
    *,
    W1: Optional[Float[Array, "h d f"]] = None,
    b1: Optional[Float[Array, "h f"]] = None,
    W2: Optional[Float[Array, "h f d"]] = None,
    b2: Optional[Float[Array, "h d"]] = None,
    ln_scale: Optional[Float[Array, "h d"]],
    ln_bias: Optional[Float[Array, "h d"]],
    token_eta: Float[Array, "c"],
    mini_batch_size: int = 16,
    initial_state: Optional[TTTMLPState] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """TTT-MLP core op (docs/rules/ttt.md): ``f(x) = gelu(x W1 + b1) W2 + b2``, ``o = q + LN(f̄(q))``.

    Arguments as :func:`ttt_linear` with ``W1 [H, D, F]``, ``b1 [H, F]``, ``W2 [H, F, D]``,
    ``b2 [H, D]`` (``F = 4D`` in the paper) or an ``initial_state`` :class:`TTTMLPState`.
    """
    rule = TTTMLPRule(mini_batch_size=mini_batch_size, impl="dual" if impl == "auto" else impl)
    _checks.check_rank("q", q, 4, "[B, T, H, D]")
    B, _, H, D = q.shape
    st = _initial(rule, initial_state, (W1, b1, W2, b2), ("W1", "b1", "W2", "b2"), B, H, D)
    return rule.recurrent(q, k, v, lr, token_eta, ln_scale, ln_bias, st, output_final_state)


# ----------------------------------------------------------------------------- registry


@register("ttt_linear")
def _registry_linear():
    """(rule, builder): ``builder(rule, seed, dtype)`` -> positional args of ``rule.recurrent``."""
    return TTTLinearRule(mini_batch_size=4), _example_inputs


@register("ttt_mlp")
def _registry_mlp():
    return TTTMLPRule(mini_batch_size=4), _example_inputs


def _example_inputs(rule, seed: int = 0, dtype=jnp.float64, B=1, T=11, H=2, D=4, F=None):
    """(q, k, v, lr, token_eta, ln_scale, ln_bias, state) with O(1)-scaled random values;
    lr of the reference's size (``base_lr · sigmoid / D`` with base_lr = 1)."""
    rng = np.random.default_rng(seed)
    C = rule.mini_batch_size
    F = 4 * D if F is None else F
    arr = lambda x: jnp.asarray(x, dtype)
    q = arr(rng.normal(size=(B, T, H, D)))
    k = arr(rng.normal(size=(B, T, H, D)))
    v = arr(rng.normal(size=(B, T, H, D)))
    lr = arr(rng.uniform(0.2, 1.0, size=(B, T, H)) / D)
    token_eta = arr(1.0 / np.arange(1, C + 1) + rng.uniform(-0.05, 0.05, size=C))
    ln_scale = arr(1.0 + 0.2 * rng.normal(size=(H, D)))
    ln_bias = arr(0.1 * rng.normal(size=(H, D)))
    if isinstance(rule, TTTMLPRule):
        st = rule.init_state(arr(rng.normal(size=(H, D, F)) / np.sqrt(D)), arr(0.1 * rng.normal(size=(H, F))),
                             arr(rng.normal(size=(H, F, D)) / np.sqrt(F)), arr(0.1 * rng.normal(size=(H, D))), B)
    else:
        st = rule.init_state(arr(rng.normal(size=(H, D, D)) / np.sqrt(D)), arr(0.1 * rng.normal(size=(H, D))), B)
    return q, k, v, lr, token_eta, ln_scale, ln_bias, st
