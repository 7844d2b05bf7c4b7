"""ViT³ fast weights (Han et al., 2025, "ViT³: Unlocking Test-Time Training in Vision"),
docs/rules/vit3.md: one full-batch inner step on all N tokens, learning rate 1.0, non-causal.

Two parts per layer (their outputs are concatenated and projected by the layer):

* **GLU** (per head, ``W1, W2`` ``[K, V]``): ``f(x) = (x W1) ⊙ silu(x W2)``, inner loss
  ``L = −(s/N) Σ_i ⟨f(k_i), v_i⟩`` with ``s = 9^−1/2``; closed-form gradients with
  ``e_i = −(s/N) v_i``, ``φ = silu(k W2)``:
  ``∇W1 = kᵀ (e ⊙ φ)``, ``∇W2 = kᵀ (e ⊙ (k W1) ⊙ silu'(k W2))``.
* **3×3 depthwise conv** on the ``Hg × Wg`` token grid (per channel, kernel ``W[3, 3]``,
  zero padding, cross-correlation as ``conv2d``): the same loss with ``f = conv(·, W)``,
  ``∇W[δ] = Σ_p k[p+δ] e[p]``.

Gradient normalisation ``g ← g / (‖g‖_in + 1)``: the norm is taken over the **input**
axis of each fast weight — for ``W1, W2`` ``[K, V]`` over K, one norm per output column
(per batch element and head); for the depthwise kernel over its 9 taps, one norm per
channel (a depthwise channel's inputs are its 3×3 window). This is the reference
implementation's choice (``g.norm(dim=-2)`` on ``[.., K, V]``, ``dim=[-2, -1]`` on
``[C, 1, 3, 3]``), and it is what keeps the reduction exact: a per-output-column factor
is a diagonal on the right, ``kᵀ(v̂) diag(c) = kᵀ(v̂ ⊙ c)``, so it folds into the values.

Reduction (docs/rules/vit3.md, theorem 5.1), the ``parallel`` forms below (``impl="chunked"``:
the whole non-causal sequence is one matmul block) and the readings (``reading``):

* GLU: ``o = φ'(q) ⊙ (q (W1 + kᵀ v̂))`` with ``v̂ = lr·c ⊙ (s/N) v ⊙ φ(k)`` — non-causal
  linear attention (``tt.linear_attention(q, k, v̂, scale=1, initial_state=W1,
  masking="none")``), gated by ``φ'(q) = silu(q W2')`` (``W2' = W2`` when W2 is frozen,
  ``update_W2=False``; otherwise the post-update features, still one full-batch step).
* Conv: ``o_p = Σ_δ q_{p+δ} ⊙ (W_δ + Σ_{p'} k_{p'+δ} ⊙ v̂_{p'})``,
  ``v̂ = lr·c ⊙ (s/N) v``: for each of the 9 offsets δ a non-causal linear attention with
  diagonal (per-channel, K = V = 1) state whose query is read from the 3×3
  neighbourhood of p — a sliding-window (3×3) linear attention.

Implementations (``impl``, docs/implementations.md): ``"recurrent"`` (the gradient step,
what ``"auto"`` runs: the same matmuls without a second pass) and ``"chunked"`` (the
linear-attention form above).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from tttla_jax import _checks
from tttla_jax import impl as _impl
from tttla_jax.ops.linear_attention import linear_attention
from tttla_jax.reduce import Reading
from tttla_jax.rules._numerics import sqrt0
from tttla_jax.rules.base import Rule, register

SCALE = 9 ** -0.5
OFFSETS = tuple((a, b) for a in (-1, 0, 1) for b in (-1, 0, 1))


def _silu_grad(z):
    s = jax.nn.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _normalize(g, axis):
    return g / (sqrt0(jnp.sum(g * g, axis=axis, keepdims=True)) + 1.0)


def _normalized(g, axis):
    """``(g / (‖g‖_axis + 1), 1 / (‖g‖_axis + 1))``: ViT³'s gradient normalisation and its factor."""
    c = 1.0 / (sqrt0(jnp.sum(g * g, axis=axis, keepdims=True)) + 1.0)
    return g * c, c


def _check_scalars(rule):
    """``scale`` and ``lr``: Python/NumPy/JAX real scalars (a traced one too), stored normalised."""
    for name in ("scale", "lr"):
        x = _checks.check_scale(getattr(rule, name), name)
        if x is None:
            raise ValueError(f"{name}: expected a real scalar, got None")
        object.__setattr__(rule, name, x)


@dataclasses.dataclass(frozen=True)
class _ViT3Base(Rule):
    """Shared protocol of the two ViT³ parts: one non-causal step, no scan at all."""

    #: "auto" runs the gradient step (same matmuls as the linear-attention form, one pass)
    impls: ClassVar[Tuple[str, ...]] = ("recurrent", "chunked")

    def breaks_associativity(self):
        return None  # one non-causal step: the parallel (linear-attention) form is exact

    def _chunked(self, impl: str) -> str:
        return _impl.resolve(impl, {"chunked": None}, where=f"{type(self).__name__}.parallel")

    def has_reading(self) -> bool:
        return True


# ----------------------------------------------------------------------------- GLU


@dataclasses.dataclass(frozen=True)
class ViT3GLURule(_ViT3Base):
    """ViT³ GLU fast weight, docs/rules/vit3.md (module docstring has the math).

    Attributes:
      scale: ``s`` in the loss, default ``9^−1/2`` (the reference's choice).
      lr: inner learning rate (1.0 in ViT³).
      normalize: apply ``g / (‖g‖_in + 1)`` (norm over K, per output column).
      update_W2: also step W2 (ViT³ does); False freezes φ (the setting of the reduction in docs/rules/vit3.md).
    """

    scale: float = SCALE
    lr: float = 1.0
    normalize: bool = True
    update_W2: bool = True

    def __post_init__(self):
        _check_scalars(self)

    def linear_attention_reason(self) -> Optional[str]:
        return ("ViT³'s GLU part is non-causal linear attention gated per value channel by "
                "silu(q W2'), a map applied after the attention: not plain linear attention")

    def _validate(self, q, k, v, W1, W2):
        for name, x in (("q", q), ("k", k), ("v", v)):
            _checks.check_rank(name, x, 4, "[B, N, H, D]")
            _checks.check_floating(name, x)
        B, N, H, K = q.shape
        if N == 0:
            raise ValueError("q: expected at least one token (N >= 1), got N = 0")
        _checks.check_shape("k", k, (B, N, H, K), "[B, N, H, K] (from q)")
        if v.shape[:3] != (B, N, H):
            raise ValueError(
                f"v: expected shape [B, N, H, V] with (B, N, H) = {(B, N, H)} (from q), got {tuple(v.shape)}")
        V = v.shape[3]
        _checks.check_shape("W1", W1, (H, K, V), "[H, K, V]")
        _checks.check_shape("W2", W2, (H, K, V), "[H, K, V]")
        return B, N, H, K, V

    def _grads(self, k, v, W1, W2):
        """Closed-form ``(∇W1, ∇W2)`` ``[B, H, K, V]`` of ``−(s/N) Σ ⟨f(k_i), v_i⟩``, normalised."""
        N = k.shape[1]
        z1 = jnp.einsum("bnhk,hkv->bnhv", k, W1)
        z2 = jnp.einsum("bnhk,hkv->bnhv", k, W2)
        e = -(self.scale / N) * v
        g1 = jnp.einsum("bnhk,bnhv->bhkv", k, e * jax.nn.silu(z2))
        g2 = jnp.einsum("bnhk,bnhv->bhkv", k, e * z1 * _silu_grad(z2))
        if self.normalize:
            g1, g2 = _normalize(g1, -2), _normalize(g2, -2)
        return g1, g2

    def _cast(self, q, k, v, W1, W2):
        sd = _checks.state_dtype(q, k, v, W1, W2)
        return sd, tuple(jnp.asarray(x).astype(sd) for x in (q, k, v, W1, W2))

    def recurrent(self, q, k, v, W1, W2):
        """The TTT view: one gradient step on (W1, W2), then ``o = f'(q)``.

        Args: q, k ``[B, N, H, K]``; v ``[B, N, H, V]``; W1, W2 ``[H, K, V]`` (learned,
        shared over the batch). Returns ``(o [B, N, H, V], (W1', W2') [B, H, K, V])``.
        """
        self._validate(q, k, v, W1, W2)
        sd, (qf, kf, vf, W1f, W2f) = self._cast(q, k, v, W1, W2)
        g1, g2 = self._grads(kf, vf, W1f, W2f)
        W1n = W1f[None] - self.lr * g1
        W2n = W2f[None] - self.lr * g2 if self.update_W2 else jnp.broadcast_to(W2f, g2.shape)
        o = jnp.einsum("bnhk,bhkv->bnhv", qf, W1n) * jax.nn.silu(jnp.einsum("bnhk,bhkv->bnhv", qf, W2n))
        return o.astype(q.dtype), (W1n, W2n)

    def parallel(self, q, k, v, W1, W2, impl: str = "auto"):
        """The linear-attention view (docs/rules/vit3.md): ``φ'(q) ⊙ LA_none(q, k, v̂; S0 = W1)``
        (``impl``: ``"chunked"`` or ``"auto"``, the same)."""
        self._chunked(impl)
        B, N, H, K, V = self._validate(q, k, v, W1, W2)
        sd, (qf, kf, vf, W1f, W2f) = self._cast(q, k, v, W1, W2)
        _, g2 = self._grads(kf, vf, W1f, W2f)  # W2's step (W1's comes out of the attention)
        phi_k = jax.nn.silu(jnp.einsum("bnhk,hkv->bnhv", kf, W2f))
        vhat = self.lr * (self.scale / N) * vf * phi_k
        if self.normalize:
            raw = jnp.einsum("bnhk,bnhv->bhkv", kf, -(self.scale / N) * vf * phi_k)
            c = 1.0 / (sqrt0(jnp.sum(raw * raw, axis=-2)) + 1.0)  # [B, H, V]
            vhat = vhat * c[:, None]
        W2n = W2f[None] - self.lr * g2 if self.update_W2 else jnp.broadcast_to(W2f, g2.shape)
        S0 = jnp.broadcast_to(W1f, (B, H, K, V))
        la, W1n = linear_attention(qf, kf, vhat, scale=1.0, initial_state=S0,
                                   output_final_state=True, masking="none")
        o = jax.nn.silu(jnp.einsum("bnhk,bhkv->bnhv", qf, W2n)) * la
        return o.astype(q.dtype), (W1n, W2n)

    def reading(self, q, k, v, W1, W2) -> Reading:
        """ViT³ GLU part (docs/rules/vit3.md) as non-causal linear attention (Theorem 5.1, one full-batch step).

        ``f(x) = (x W1) ⊙ silu(x W2)`` is linear in W1, so after one step on
        ``L = −(s/N) Σ ⟨f(k), v⟩`` with the normalised gradient ``g ← g / (‖g‖_in + 1)``:

            o = silu(q W2') ⊙ q (W1 + Σ_j k_jᵀ v̂_j),   v̂_j = lr · c ⊙ (s/N) v_j ⊙ silu(k_j W2)

        with ``c = 1/(‖∇W1‖_K + 1)`` per output column — a per-column factor is a diagonal on
        the right of ``kᵀv̂``, so it folds into the values. Queries and keys are the raw
        ``q``, ``k``; the mask is all ones (``masking="none"``: every query reads the state after all
        N tokens); ``S_0 = W1``. The gate ``silu(q W2')`` (post-update W2 when ``update_W2``,
        itself one full-batch step that needs no scan) multiplies the read per value channel:
        the reading's ``post`` map. Both gradients come from ``jax.grad`` of the inner loss,
        independently of the rule's closed form. Everything is available up front:
        associative.
        """
        B, N, H, K, V = self._validate(q, k, v, W1, W2)
        sd, (qf, kf, vf, W1f, W2f) = self._cast(q, k, v, W1, W2)
        W1b, W2b = (jnp.broadcast_to(W, (B, H, K, V)) for W in (W1f, W2f))

        def inner_loss(W1_, W2_):  # per batch element the fast weights step separately
            f = jnp.einsum("bnhk,bhkv->bnhv", kf, W1_) * jax.nn.silu(jnp.einsum("bnhk,bhkv->bnhv", kf, W2_))
            return -(self.scale / N) * jnp.sum(f * vf)

        g1, g2 = jax.grad(inner_loss, argnums=(0, 1))(W1b, W2b)
        c = jnp.ones((B, H, 1, V), sd)
        if self.normalize:
            g1, c = _normalized(g1, -2)
            g2, _ = _normalized(g2, -2)
        vhat = self.lr * (self.scale / N) * vf * jax.nn.silu(jnp.einsum("bnhk,bhkv->bnhv", kf, W2b))
        vhat = vhat * jnp.moveaxis(c, 2, 1)  # [B, 1, H, V]
        W2n = W2b - self.lr * g2 if self.update_W2 else W2b
        gate = jax.nn.silu(jnp.einsum("bnhk,bhkv->bnhv", qf, W2n))
        return Reading(qf, kf, vhat, jnp.ones((1, 1, N, N), sd), jnp.ones((1, 1, N), sd), W1b,
                       post=lambda o: gate * o)


def vit3_glu(
    q: Float[Array, "b n h k"],
    k: Float[Array, "b n h k"],
    v: Float[Array, "b n h v"],
    *,
    W1: Float[Array, "h k v"],
    W2: Float[Array, "h k v"],
    scale: float = SCALE,
    lr: float = 1.0,
    normalize: bool = True,
    update_W2: bool = True,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """ViT³ GLU part (docs/rules/vit3.md): one step on ``−(s/N) Σ ⟨(k W1) ⊙ silu(k W2), v⟩``, read ``f'(q)``.

    Args:
      q, k: ``[B, N, H, K]``; v: ``[B, N, H, V]`` (N tokens, non-causal).
      W1, W2: ``[H, K, V]`` initial fast weights. scale, lr, normalize, update_W2: see
        :class:`ViT3GLURule`.
      impl: ``"recurrent"`` (gradient step) | ``"chunked"`` (linear attention) | ``"auto"``
        (recurrent: the step costs the same matmuls and avoids the second pass).

    Returns:
      ``(o [B, N, H, V] in q's dtype, (W1', W2') [B, H, K, V] or None)``.
    """
    rule = ViT3GLURule(scale=scale, lr=lr, normalize=normalize, update_W2=update_W2)
    o, W = rule(q, k, v, W1, W2, impl=impl)
    return o, (W if output_final_state else None)


# ----------------------------------------------------------------------------- conv


def _shift(x, a, b):
    """``y[:, i, j] = x[:, i+a, j+b]`` (zero outside) for a grid ``[B, Hg, Wg, C]``."""
    Hg, Wg = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return xp[:, 1 + a:1 + a + Hg, 1 + b:1 + b + Wg]


@dataclasses.dataclass(frozen=True)
class ViT3ConvRule(_ViT3Base):
    """ViT³ 3×3 depthwise-conv fast weight, docs/rules/vit3.md (module docstring has the math).

    Attributes:
      grid: ``(Hg, Wg)`` token grid, tokens row-major (``n = i·Wg + j``).
      scale, lr, normalize: as :class:`ViT3GLURule` (norm over the 9 taps per channel).
    """

    grid: Tuple[int, int] = (14, 14)
    scale: float = SCALE
    lr: float = 1.0
    normalize: bool = True

    def __post_init__(self):
        if not (isinstance(self.grid, tuple) and len(self.grid) == 2):
            raise ValueError(f"grid: expected a pair (Hg, Wg), got {self.grid!r}")
        object.__setattr__(self, "grid", tuple(_checks.check_positive_int("grid", x) for x in self.grid))
        _check_scalars(self)

    def linear_attention_reason(self) -> Optional[str]:
        return ("ViT³'s conv part is a sum over the 9 offsets of a 3×3 window of non-causal "
                "linear attentions with shifted queries and keys (K = V = 1 per channel): "
                "not one plain linear attention")

    def _validate(self, q, k, v, W):
        for name, x in (("q", q), ("k", k), ("v", v)):
            _checks.check_rank(name, x, 3, "[B, N, C]")
            _checks.check_floating(name, x)
        B, N, C = q.shape
        Hg, Wg = self.grid
        if N != Hg * Wg:
            raise ValueError(f"q: expected N = Hg·Wg = {Hg * Wg} tokens for grid {self.grid}, got N = {N}")
        _checks.check_shape("k", k, (B, N, C), "[B, N, C] (from q)")
        _checks.check_shape("v", v, (B, N, C), "[B, N, C] (from q)")
        _checks.check_shape("W", W, (3, 3, C), "[3, 3, C]")
        return B, N, C

    def _prep(self, q, k, v, W):
        B, N, C = self._validate(q, k, v, W)
        sd = _checks.state_dtype(q, k, v, W)
        grid = lambda x: x.astype(sd).reshape((B,) + self.grid + (C,))
        return B, N, C, grid(q), grid(k), grid(v), jnp.asarray(W).astype(sd)

    def _grad(self, kg, vg, N):
        e = -(self.scale / N) * vg
        g = jnp.stack([jnp.sum(_shift(kg, a, b) * e, axis=(1, 2)) for a, b in OFFSETS], 1)  # [B, 9, C]
        return _normalize(g, 1) if self.normalize else g

    def recurrent(self, q, k, v, W):
        """The TTT view: ``W' = W − lr·normalize(∇W)``, ``o = conv(q, W')``.

        Args: q, k, v ``[B, N, C]`` (N = Hg·Wg); W ``[3, 3, C]``.
        Returns ``(o [B, N, C], W' [B, 3, 3, C])``.
        """
        B, N, C, qg, kg, vg, Wf = self._prep(q, k, v, W)
        Wn = Wf.reshape(1, 9, C) - self.lr * self._grad(kg, vg, N)  # [B, 9, C]
        o = sum(_shift(qg, a, b) * Wn[:, i, None, None] for i, (a, b) in enumerate(OFFSETS))
        return o.reshape(B, N, C).astype(q.dtype), Wn.reshape(B, 3, 3, C)

    def parallel(self, q, k, v, W, impl: str = "auto"):
        """The linear-attention view: a sum over the 9 offsets δ of non-causal linear
        attention with channels as heads (K = V = 1), query/key shifted by δ,
        ``v̂ = lr·c ⊙ (s/N) v`` and initial state ``W_δ`` (``impl``: ``"chunked"`` or ``"auto"``)."""
        self._chunked(impl)
        B, N, C, qg, kg, vg, Wf = self._prep(q, k, v, W)
        vhat = self.lr * (self.scale / N) * vg
        if self.normalize:  # c = 1 / (‖g‖_taps + 1) per (batch, channel)
            raw = jnp.stack([jnp.sum(_shift(kg, a, b) * -(self.scale / N) * vg, axis=(1, 2))
                             for a, b in OFFSETS], 1)
            vhat = vhat / (sqrt0(jnp.sum(raw * raw, axis=1)) + 1.0)[:, None, None]
        tok = lambda x: x.reshape(B, N, C, 1)
        o, Wn = 0.0, []
        for i, (a, b) in enumerate(OFFSETS):
            S0 = jnp.broadcast_to(Wf[a + 1, b + 1][None, :, None, None], (B, C, 1, 1))
            oi, Si = linear_attention(tok(_shift(qg, a, b)), tok(_shift(kg, a, b)), tok(vhat),
                                      scale=1.0, initial_state=S0, output_final_state=True, masking="none")
            o = o + oi[..., 0]
            Wn.append(Si[:, :, 0, 0])
        return o.astype(q.dtype), jnp.stack(Wn, 1).reshape(B, 3, 3, C)

    def reading(self, q, k, v, W) -> Reading:
        """ViT³ 3×3 depthwise-conv part (docs/rules/vit3.md) as one non-causal linear attention per channel.

        Channels are the heads; the 3×3 neighbourhood is the key/query feature map
        (im2col): ``q̂_p = [q_{p+δ}]_δ``, ``k̂_p = [k_{p+δ}]_δ`` ``∈ R⁹`` (zero outside the
        grid, δ over the 9 offsets), value dimension 1, ``S_0 = [W_δ]_δ`` ``[9, 1]``. The
        conv is linear in W, ``conv(x, W)_p = x̂_p W``, so one step on
        ``L = −(s/N) Σ_p ⟨conv(k, W)_p, v_p⟩`` with ``g ← g / (‖g‖_taps + 1)`` gives

            o_p = q̂_p (S_0 + Σ_{p'} k̂_{p'}ᵀ v̂_{p'}),   v̂ = lr · c · (s/N) v,  c = 1/(‖∇W‖_taps + 1)

        — a sliding-window (3×3) linear attention, mask all ones (``masking="none"``). ``∇W`` from
        ``jax.grad`` of the inner loss. Associative (one step, everything up front).
        """
        B, N, C, qg, kg, vg, Wf = self._prep(q, k, v, W)
        sd = Wf.dtype
        im2col = lambda x: jnp.stack([_shift(x, a, b) for a, b in OFFSETS], -1).reshape(B, N, C, 9)
        qh, kh = im2col(qg), im2col(kg)
        vf = vg.reshape(B, N, C)
        S0 = jnp.broadcast_to(jnp.moveaxis(Wf.reshape(9, C), 0, 1)[None, :, :, None], (B, C, 9, 1))

        def inner_loss(S):
            return -(self.scale / N) * jnp.sum(jnp.einsum("bnck,bckx->bncx", kh, S)[..., 0] * vf)

        c = jnp.ones((B, C, 1, 1), sd)
        if self.normalize:
            _, c = _normalized(jax.grad(inner_loss)(S0), -2)  # norm over the 9 taps per channel
        vhat = self.lr * (self.scale / N) * vf[..., None] * c.reshape(B, 1, C, 1)
        return Reading(qh, kh, vhat, jnp.ones((1, 1, N, N), sd), jnp.ones((1, 1, N), sd), S0,
                       post=lambda o: o[..., 0])


def vit3_conv(
    q: Float[Array, "b n c"],
    k: Float[Array, "b n c"],
    v: Float[Array, "b n c"],
    *,
    W: Float[Array, "3 3 c"],
    grid: Tuple[int, int],
    scale: float = SCALE,
    lr: float = 1.0,
    normalize: bool = True,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """ViT³ 3×3 depthwise-conv part (docs/rules/vit3.md): one step on ``−(s/N) Σ ⟨conv(k, W), v⟩``,
    read ``conv(q, W')``.

    Args:
      q, k, v: ``[B, N, C]`` tokens of the ``grid = (Hg, Wg)`` grid, row-major.
      W: ``[3, 3, C]`` initial depthwise kernel (``W[a+1, b+1]`` weights offset (a, b)).
      impl: ``"recurrent"`` | ``"chunked"`` (9 shifted linear attentions) | ``"auto"``
        (recurrent).

    Returns:
      ``(o [B, N, C] in q's dtype, W' [B, 3, 3, C] or None)``.
    """
    rule = ViT3ConvRule(grid=tuple(grid), scale=scale, lr=lr, normalize=normalize)
    o, Wn = rule(q, k, v, W, impl=impl)
    return o, (Wn if output_final_state else None)


@register("vit3_glu")
def _registry_glu():
    """(rule, builder): ``builder(rule, seed, dtype)`` -> positional args of ``rule.recurrent``."""
    import numpy as np

    def build(rule, seed=0, dtype=jnp.float64, B=1, N=12, H=2, K=3, V=4):
        r = np.random.default_rng(seed)
        return (jnp.asarray(r.normal(size=(B, N, H, K)), dtype), jnp.asarray(r.normal(size=(B, N, H, K)), dtype),
                jnp.asarray(r.normal(size=(B, N, H, V)), dtype), jnp.asarray(r.normal(size=(H, K, V)), dtype),
                jnp.asarray(r.normal(size=(H, K, V)), dtype))

    return ViT3GLURule(), build


@register("vit3_conv")
def _registry_conv():
    import numpy as np

    def build(rule, seed=0, dtype=jnp.float64, B=1, C=3):
        r = np.random.default_rng(seed)
        N = rule.grid[0] * rule.grid[1]
        x = lambda: jnp.asarray(r.normal(size=(B, N, C)), dtype)
        return x(), x(), x(), jnp.asarray(r.normal(size=(3, 3, C)), dtype)

    return ViT3ConvRule(grid=(3, 4)), build
