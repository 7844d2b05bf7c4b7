"""A single linear fast layer ``f(k) = k W`` trained by one gradient step per token:
plain / decayed linear attention (dot-product loss) and (gated) DeltaNet (MSE loss).

These are the end of the paper's ladder (V6, docs/ladder.md) and the clean cases of docs/ttt_as_linear_attention.md:

* dot-product loss ``ℓ_t(W) = −⟨k_t W, v_t⟩``: ``∇_W ℓ = −k_tᵀ v_t`` does not depend on W,
  so one step of size 1 is ``W_t = W_{t−1} + k_tᵀ v_t`` — linear attention (Theorem 5.2
  with ``φ = id``, ``g = v``). A forget gate ``W ← exp(g_t) W`` before the step gives the
  decayed (Mamba-2 / RetNet style) variant; a per-key-channel gate ``W ← diag(exp(g_t)) W``
  (``gate="channel"``) gives GLA.
* MSE loss ``ℓ_t(W) = ½‖k_t W − v_t‖²`` with step ``β_t``: ``W_t = W_{t−1} + k_tᵀ β_t (v_t − k_t W_{t−1})``
  — the delta rule (DeltaNet; gated DeltaNet with the forget gate first; with the
  per-channel gate ``W ← diag(exp(g_t)) W`` first, Kimi Delta Attention).

``recurrent`` runs exactly that inner step in a ``lax.scan`` over tokens (the inner gradient
in closed form, :func:`inner_grad`, tested against ``jax.grad`` of :func:`inner_loss`);
``parallel`` dispatches to the chunked forms of :func:`tttla_jax.linear_attention` and
:func:`tttla_jax.delta_rule` (and ``"associative"`` for linear attention). Reads are
``o_t = (scale·q_t) W_t`` (update-then-query) as in docs/linear_attention.md.
:meth:`LinearFastWeightRule.reading` is the rule's linear-attention reading (★)
(docs/ttt_as_linear_attention.md); with the dot loss the rule *is* (decayed) linear
attention and :meth:`LinearFastWeightRule.linear_attention_inputs` gives the arguments of
:func:`tttla_jax.linear_attention` (so layers reach its Pallas kernel).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, Optional, Tuple

import jax.numpy as jnp
from jax import lax

from tttla_jax import _checks
from tttla_jax import impl as _impl
from tttla_jax.ops.delta_rule import delta_rule
from tttla_jax.ops.linear_attention import decay, linear_attention
from tttla_jax.reduce import Reading, decay_mask
from tttla_jax.rules.base import Rule, register

LOSSES = ("dot", "mse")
#: Values of ``LinearFastWeightRule.gate``: one log-decay per head, or one per key channel.
GATES = ("head", "channel")


def inner_loss(W, k, v, loss: str):
    """Per-token inner loss of the linear fast layer, ``W [K, V]``, ``k [K]``, ``v [V]``."""
    pred = k @ W
    if loss == "dot":
        return -jnp.vdot(pred, v)
    return 0.5 * jnp.sum((pred - v) ** 2)


def inner_grad(W, k, v, loss: str):
    """Closed form of ``∇_W inner_loss``: ``−kᵀv`` (dot) or ``kᵀ(kW − v)`` (MSE). Batched over
    leading axes of ``k [..., K]``, ``v [..., V]``, ``W [..., K, V]``."""
    if loss == "dot":
        return -k[..., :, None] * v[..., None, :]
    r = jnp.einsum("...k,...kv->...v", k, W) - v
    return k[..., :, None] * r[..., None, :]


@dataclasses.dataclass(frozen=True)
class LinearFastWeightRule(Rule):
    """One gradient step per token on a linear fast layer (docs/linear_attention.md, docs/ttt_as_linear_attention.md).

    Attributes:
      loss: ``"dot"`` (linear attention) or ``"mse"`` (delta rule).
      gated: apply the forget gate ``W ← exp(g_t)·W`` before each step (``log_decay`` input).
      gate: ``"head"`` (``log_decay [B, T, H]``, one per head) or ``"channel"``
        (``log_decay [B, T, H, K]``, ``W ← diag(exp(g_t)) W``: GLA with the dot loss, Kimi
        Delta Attention with the MSE loss; no linear-attention reading, see :meth:`has_reading`).
      scale: query scale, default ``K**-0.5``.
      chunk_size: chunk length of the parallel (chunked) form.
    """

    #: implementations in "auto" preference order; "associative" only with the dot loss
    impls: ClassVar[Tuple[str, ...]] = ("chunked", "associative", "recurrent")

    loss: str = "dot"
    gated: bool = False
    scale: Optional[float] = None
    gate: str = "head"
    chunk_size: int = 64

    def __post_init__(self):
        _checks.check_choice("loss", self.loss, LOSSES)
        _checks.check_choice("gate", self.gate, GATES)
        # Python/NumPy/JAX scalars accepted (a traced scale too), stored normalised
        object.__setattr__(self, "chunk_size", _checks.check_positive_int("chunk_size", self.chunk_size))
        object.__setattr__(self, "scale", _checks.check_scale(self.scale))

    def init_state(self, batch: int, heads: int, key_dim: int, value_dim: int, dtype=jnp.float32):
        return jnp.zeros((batch, heads, key_dim, value_dim), dtype)

    def _check(self, q, k, v, lr, log_decay):
        _checks.check_rank("q", q, 4, "[B, T, H, K]")
        B, T, H, K = q.shape
        if self.loss == "mse":
            if lr is None:
                raise ValueError("lr: the MSE (delta) rule needs a per-token step size lr [B, T, H], got None")
            _checks.check_shape("lr", lr, (B, T, H), "[B, T, H]")
        elif lr is not None:
            raise ValueError("lr: the dot-product rule takes no per-token step size (it is 1); got an array")
        if self.gated:
            shape, layout = ((B, T, H), "[B, T, H]") if self.gate == "head" else ((B, T, H, K), "[B, T, H, K]")
            if log_decay is None:
                raise ValueError(f"log_decay: gated=True needs log_decay {layout}, got None")
            _checks.check_shape("log_decay", log_decay, shape, f"{layout} (gate={self.gate!r})")
        elif log_decay is not None:
            raise ValueError("log_decay: gated=False takes no log_decay; got an array")

    def recurrent(self, q, k, v, lr=None, log_decay=None, initial_state=None, output_final_state=True):
        """The TTT view: a ``lax.scan`` over tokens of one inner gradient step each.

        Shapes: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, lr / log_decay ``[B, T, H]``
        (log_decay ``[B, T, H, K]`` with ``gate="channel"``), state ``[B, H, K, V]``.
        Returns ``(o, W_T or None)``.
        """
        self._check(q, k, v, lr, log_decay)
        B, T, H, K = q.shape
        V = v.shape[-1]
        sd = _checks.state_dtype(q, k, v)
        scale = K ** -0.5 if self.scale is None else self.scale
        W0 = jnp.zeros((B, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
        _checks.check_shape("initial_state", W0, (B, H, K, V), "[B, H, K, V]")
        lr_ = jnp.ones((B, T, H), sd) if lr is None else lr.astype(sd)
        g_ = jnp.zeros((B, T, H), sd) if log_decay is None else log_decay.astype(sd)
        xs = tuple(jnp.moveaxis(x.astype(sd), 1, 0) for x in (q, k, v, lr_, g_))

        def step(W, x):
            qt, kt, vt, lt, gt = x
            W = decay(gt, W)  # exp(g_t) W, or diag(exp(g_t)) W per key channel
            W = W - lt[..., None, None] * inner_grad(W, kt, vt, self.loss)
            return W, jnp.einsum("bhk,bhkv->bhv", scale * qt, W)

        W, o = lax.scan(step, W0, xs)
        return jnp.moveaxis(o, 0, 1).astype(q.dtype), (W if output_final_state else None)

    def breaks_associativity(self):
        return None

    def impl_reasons(self) -> Dict[str, Optional[str]]:
        return {"chunked": None,
                "associative": None if self.loss == "dot" else (
                    "the delta rule's transition I − β_t k_tᵀk_t makes the state update depend on "
                    "the state; its parallel form is the chunked (WY) form of tt.delta_rule"),
                "recurrent": None}

    def parallel(self, q, k, v, lr=None, log_decay=None, initial_state=None, output_final_state=True,
                 impl: str = "auto"):
        """Chunked (or, for the dot loss, associative) form via the linear-attention ops.

        ``impl``: ``"chunked"`` | ``"associative"`` (dot loss only) | ``"auto"`` (chunked).
        """
        impl = self.resolve_parallel_impl(impl)
        self._check(q, k, v, lr, log_decay)
        if self.loss == "dot":
            return linear_attention(**self.linear_attention_inputs(
                q, k, v, lr, log_decay, initial_state, output_final_state), impl=impl)
        return delta_rule(q, k, v, lr, log_decay=log_decay, scale=self.scale, initial_state=initial_state,
                          output_final_state=output_final_state, chunk_size=self.chunk_size, impl=impl)

    # ------------------------------------------------------------------ linear attention

    def linear_attention_reason(self) -> Optional[str]:
        if self.loss == "dot":
            return None
        return ("the MSE loss makes the update depend on the state (the delta rule, "
                "W ← W + β kᵀ(v − k W)): it is tt.delta_rule, not plain linear attention")

    def linear_attention_inputs(self, q, k, v, lr=None, log_decay=None, initial_state=None,
                                output_final_state=True) -> dict:
        """``tt.linear_attention(**rule.linear_attention_inputs(*inputs))`` computes this rule
        (dot loss only): causal masking, ``scale``, ``log_decay``, ``chunk_size`` from the rule."""
        why = self.linear_attention_reason()
        if why is not None:
            raise ValueError(f"linear_attention_inputs: {type(self).__name__}(loss={self.loss!r}) {why}")
        self._check(q, k, v, lr, log_decay)
        return dict(q=q, k=k, v=v, scale=self.scale, log_decay=log_decay, initial_state=initial_state,
                    output_final_state=output_final_state, masking="causal", chunk_size=self.chunk_size)

    # ------------------------------------------------------------------ reading

    def has_reading(self) -> bool:
        """No reading with a per-channel gate: the decay sits inside the ``q·k`` contraction
        (``Σ_κ q_κ k_κ exp(b_tκ − b_sκ)``), not a weight ``M[t, s]`` on the pair."""
        return not (self.gated and self.gate == "channel")

    def reading(self, q, k, v, lr=None, log_decay=None, initial_state=None, output_final_state=True) -> Reading:
        """The linear-attention reading (★) (docs/ttt_as_linear_attention.md).

        Dot loss: ``q̂ = scale·q``, ``k̂ = k``, ``v̂ = v`` (Theorem 5.2 with ``φ = id``), the
        decay mask ``M[t, s] = exp(Σ_{r=s+1..t} g_r)`` and ``a_t = exp(Σ_{r≤t} g_r)`` on ``S_0``.

        MSE loss: the same queries, keys and mask with the effective values
        ``v̂_t = β_t (v_t − k_t exp(g_t) S_{t−1})`` — they depend on the state, so this reading
        takes them from the recurrence. The rule nevertheless has a parallel form (the
        delta rule's chunked WY form, :func:`tttla_jax.delta_rule`), so the reading is marked
        ``associative`` with nothing that breaks it.
        """
        if not self.has_reading():
            raise NotImplementedError(
                f"{type(self).__name__}(gate='channel') has no linear-attention reading: a per-channel "
                "decay weighs each key channel separately (inside q·k), not the pair (t, s); use "
                "recurrent() or parallel()")
        self._check(q, k, v, lr, log_decay)
        B, T, H, K = q.shape
        V = v.shape[-1]
        sd = _checks.state_dtype(q, k, v)
        scale = K ** -0.5 if self.scale is None else self.scale
        g = jnp.zeros((B, T, H), sd) if log_decay is None else log_decay.astype(sd)
        S0 = jnp.zeros((B, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
        mask = decay_mask(g)
        a = jnp.exp(jnp.cumsum(jnp.moveaxis(g, 1, -1), axis=-1))
        qh, kh, vh = scale * q.astype(sd), k.astype(sd), v.astype(sd)
        if self.loss == "dot":
            return Reading(qh, kh, vh, mask, a, S0)

        def step(S, x):
            kt, vt, bt, gt = x
            S = jnp.exp(gt)[..., None, None] * S
            vhat = bt[..., None] * (vt - jnp.einsum("bhk,bhkv->bhv", kt, S))
            return S + kt[..., :, None] * vhat[..., None, :], vhat

        xs = tuple(jnp.moveaxis(x, 1, 0) for x in (kh, vh, lr.astype(sd), g))
        _, vhat = lax.scan(step, S0, xs)
        return Reading(qh, kh, jnp.moveaxis(vhat, 0, 1), mask, a, S0)


def LinearAttentionRule(gated: bool = False, **kw) -> LinearFastWeightRule:
    """Linear attention (``gated``: decayed) as a TTT rule: dot-product loss, step 1."""
    return LinearFastWeightRule(loss="dot", gated=gated, **kw)


def DeltaRule(gated: bool = False, **kw) -> LinearFastWeightRule:
    """DeltaNet (``gated``: gated DeltaNet) as a TTT rule: MSE loss, step ``β_t``."""
    return LinearFastWeightRule(loss="mse", gated=gated, **kw)


def _example_inputs(rule: LinearFastWeightRule, seed: int = 0, dtype=jnp.float64, B=1, T=11, H=2, K=4, V=3):
    """(q, k, v, lr, log_decay, initial_state) with O(1)-scaled random values (k unit-norm)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arr = lambda x: jnp.asarray(x, dtype)
    k = rng.normal(size=(B, T, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    lr = arr(rng.uniform(0.05, 0.95, size=(B, T, H))) if rule.loss == "mse" else None
    g = arr(-rng.uniform(0.0, 0.3, size=(B, T, H))) if rule.gated else None
    return (arr(rng.normal(size=(B, T, H, K))), arr(k), arr(rng.normal(size=(B, T, H, V))), lr, g,
            arr(rng.normal(size=(B, H, K, V))))


for _name, _loss, _gated in (("linear_attention", "dot", False), ("decayed_linear_attention", "dot", True),
                             ("delta_net", "mse", False), ("gated_delta_net", "mse", True)):
    register(_name)(lambda _l=_loss, _g=_gated: (LinearFastWeightRule(loss=_l, gated=_g, chunk_size=4),
                                                 _example_inputs))
