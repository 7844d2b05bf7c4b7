"""The reduction: every fast-weight rule read as (masked) linear attention (docs/ttt_as_linear_attention.md).

The paper's Theorems 5.1–5.3 say that a TTT layer whose fast network is
``f(x) = φ(x; Θ) W`` (last layer linear, bias-free) computes

    o_t = q̂_t ( a_t · S_0 + Σ_s M[t, s] · k̂_sᵀ v̂_s )                       (★)

with effective queries ``q̂ = φ_{t+1}(q)`` (post-update features), keys ``k̂ = φ_t(k)``
(pre-update features), values ``v̂ = −η ∂L/∂f`` (the "effective value"), initial state
``S_0 = W_0`` and a structured mask ``M`` (causal / block-causal / non-causal, decay,
momentum's cumulative coefficients ``c_{t,i} = Σ_{j=i..t} Π_{s=i+1..j} α_s``). This
module returns that reading — :class:`Reading` — for each rule, so that (★) evaluated in
its quadratic "attention" form (:meth:`Reading.outputs`) can be checked against the
rule's recurrence, and says when the reading is *sequential* (q̂, k̂ or v̂ depend on the
history, so no associative scan exists) and which component makes it so.

The sum in (★) runs over *key positions* s — the tokens for token-level writes. A write
that is a full matrix rather than a sum of per-token ``k̂ᵀv̂`` (LaCT's Muon: NS5 of a
chunk's momentum) is still linear attention: ``X = Σ_a e_aᵀ X[a]``, i.e. ``dh`` virtual
tokens with one-hot keys, read block-causally by later chunks (docs/ladder.md).

Readings are O(T²) per head: they are for checking and explaining, not for speed; the
fast parallel forms live on each rule (``rule.parallel``) and in :mod:`tttla_jax.ops`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from tttla_jax import _checks
from tttla_jax.rules.linear import LinearFastWeightRule


@dataclasses.dataclass
class Reading:
    """A rule's linear-attention reading (★). Shapes use ``[B, T, H, ·]`` like the ops.

    Queries are the T tokens; keys/values live on ``S`` *key positions*. For token-level
    writes ``S`` is the tokens too (``S = T``); a rule whose writes are not per-token gets
    other positions — LaCT with Muon writes a full matrix per chunk, read as ``dh``
    virtual tokens with one-hot keys (see the LaCT reader); ``inner_steps > 1`` writes each
    token once per inner step. The attention form never assumes ``S = T``.

    Attributes:
      q: ``[B, T, H, K̂]`` effective queries (scale already folded in).
      k: ``[B, S, H, K̂]`` effective keys.
      v: ``[B, S, H, V]`` effective values.
      mask: ``[B, H, T, S]`` (or broadcastable) weight of key s for query t; or
        ``[B, H, T, S, V]`` for a per-value-channel weight.
      state_coef: ``[B, H, T]`` (or broadcastable) coefficient ``a_t`` of the initial state;
        or a tuple of them, one per initial state (Titans has a memory and a momentum buffer).
      initial_state: ``[B, H, K̂, V]`` ``S_0``, or a tuple of such states.
      associative: whether (★)'s ingredients are available up front (an associative /
        chunked parallel form exists); ``False`` for a sequential reading.
      breaks: ``None``, or the sentence naming the component that makes it sequential.
      post: optional map applied to the (★) outputs (e.g. TTT's LayerNorm and residual).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    mask: jax.Array
    state_coef: jax.Array
    initial_state: jax.Array
    associative: bool = True
    breaks: Optional[str] = None
    post: Optional[Callable] = None

    def outputs(self):
        """Evaluate (★) in attention form: ``((Q̂K̂ᵀ) ⊙ M) V̂ + a ⊙ (Q̂ S_0)``.

        A mask ``[B, H, T, T, V]`` (and coefficients ``[B, H, T, V]``) weighs each value
        channel separately — the reading of weight normalisation, a data-dependent
        per-channel rescaling of the state.
        """
        A = jnp.einsum("bthk,bshk->bhts", self.q, self.k)
        if jnp.ndim(self.mask) == 5:
            o = jnp.einsum("bhts,bhtsv,bshv->bthv", A, self.mask, self.v)
        else:
            o = jnp.einsum("bhts,bshv->bthv", A * self.mask, self.v)
        states = self.initial_state if isinstance(self.initial_state, tuple) else (self.initial_state,)
        coefs = self.state_coef if isinstance(self.state_coef, tuple) else (self.state_coef,)
        for a, S0 in zip(coefs, states):
            qS = jnp.einsum("bthk,bhkv->bthv", self.q, S0)
            a = jnp.moveaxis(a, 2, 1)  # [B, T, H] or [B, T, H, V]
            o = o + (a if a.ndim == 4 else a[..., None]) * qS
        return o if self.post is None else self.post(o)


def decay_mask(log_decay, *, include_diagonal: bool = True):
    """``M[t, s] = exp(Σ_{r=s+1..t} g_r)`` for ``s ≤ t`` (``s < t`` without the diagonal), else 0.

    ``log_decay`` ``[B, T, H]`` → ``[B, H, T, T]``; masked before the exp so it cannot overflow.
    """
    G = jnp.cumsum(jnp.moveaxis(log_decay, 1, -1), axis=-1)  # [B, H, T]
    T = G.shape[-1]
    keep = jnp.tril(jnp.ones((T, T), bool), 0 if include_diagonal else -1)
    diff = jnp.where(keep, G[..., :, None] - G[..., None, :], 0.0)
    return jnp.where(keep, jnp.exp(diff), 0.0)


def segment_products(x):
    """``P[..., n, l] = Π_{s=l+1..n} x[..., s]`` for ``l ≤ n`` (1 on the diagonal), else 0.

    ``x`` ``[..., N]`` → ``[..., N, N]``; a scan (``P_n = x_n P_{n−1} + e_n``), so zeros in
    ``x`` (full forgetting) are exact and nothing underflows through division.
    """
    N = x.shape[-1]
    onehots = jnp.moveaxis(jnp.broadcast_to(jnp.eye(N, dtype=x.dtype), x.shape[:-1] + (N, N)), -2, 0)

    def step(P, inp):
        x_n, e_n = inp
        P = x_n[..., None] * P + e_n
        return P, P

    _, P = lax.scan(step, jnp.zeros(x.shape, x.dtype), (jnp.moveaxis(x, -1, 0), onehots))
    return jnp.moveaxis(P, 0, -2)


def momentum_coefficients(alpha):
    """Theorem 5.3's cumulative coefficients ``c[t, i] = Σ_{j=i..t} Π_{s=i+1..j} α_s`` (i ≤ t).

    With ``ΔW_t = ∇L_t + α_t ΔW_{t−1}`` and ``W_{t+1} = W_t − η ΔW_t``, the value of step i is
    counted ``c[t, i]`` times in ``W_{t+1}``. ``alpha`` ``[..., T]`` → ``[..., T, T]``.
    Built by a scan over t — ``P_t = α_t P_{t−1} + e_t`` (row of products), ``c_t = c_{t−1} + P_t``
    — not by cumprod-and-divide, which underflows.
    """
    T = alpha.shape[-1]
    eye = jnp.eye(T, dtype=alpha.dtype)

    def step(carry, x):
        P, c = carry  # P[i] = Π_{s=i+1..t} α_s for i ≤ t (0 for i > t)
        a_t, e_t = x
        P = a_t[..., None] * P + e_t
        c = c + P
        return (P, c), c

    zeros = jnp.zeros(alpha.shape, alpha.dtype)
    onehots = jnp.moveaxis(jnp.broadcast_to(eye, alpha.shape[:-1] + (T, T)), -2, 0)  # e_t per step
    _, c = lax.scan(step, (zeros, zeros), (jnp.moveaxis(alpha, -1, 0), onehots))
    return jnp.moveaxis(c, 0, -2)


def reduce(rule, *args, **kwargs) -> Reading:
    """The linear-attention reading of ``rule`` on the inputs of ``rule.recurrent(*args, **kwargs)``.

    Supported rules (every rule of :data:`tttla_jax.rules.REGISTRY`):
    :class:`~tttla_jax.rules.linear.LinearFastWeightRule` (linear attention, decayed,
    DeltaNet, gated DeltaNet), :class:`~tttla_jax.rules.titans.TitansRule`,
    :class:`~tttla_jax.rules.ttt.TTTLinearRule`, :class:`~tttla_jax.rules.ttt.TTTMLPRule`,
    :class:`~tttla_jax.rules.lact.LaCTRule` (every configuration: Muon, weight norm,
    ``update="all"``, momentum, ``inner_steps``, both orders — so the whole ladder and its
    anomalies), :class:`~tttla_jax.rules.vit3.ViT3GLURule` and
    :class:`~tttla_jax.rules.vit3.ViT3ConvRule`. Other families register a reducer with
    :func:`register_reducer`; a configuration without a reading raises
    :class:`NoReadingError` saying why.
    """
    for cls, (fn, supports) in _REDUCERS.items():
        if isinstance(rule, cls):
            return fn(rule, *args, **kwargs)
    raise NotImplementedError(f"rule: no reduction registered for {type(rule).__name__}; "
                              f"known: {tuple(c.__name__ for c in _REDUCERS)}")


_REDUCERS = {}


def has_reducer(rule) -> bool:
    """Whether :func:`reduce` has a reading for this rule (family and configuration)."""
    return any(isinstance(rule, cls) and supports(rule) for cls, (_, supports) in _REDUCERS.items())


class NoReadingError(ValueError):
    """The configuration has no token-level linear-attention reading; the message says why."""


def register_reducer(cls, supports: Callable = lambda rule: True):
    """Register ``fn(rule, *inputs) -> Reading`` for rules of ``cls`` (``supports(rule)``: the
    configurations it reads; others raise :class:`NoReadingError` from ``fn``)."""
    def deco(fn):
        _REDUCERS[cls] = (fn, supports)
        return fn
    return deco


@register_reducer(LinearFastWeightRule)
def _reduce_linear(rule: LinearFastWeightRule, q, k, v, lr=None, log_decay=None, initial_state=None,
                   output_final_state=True):
    """Dot loss: q̂ = scale·q, k̂ = k, v̂ = v (Theorem 5.2 with φ = id, g = v).
    MSE loss: v̂_t = β_t (v_t − k_t exp(g_t) S_{t−1}) — the effective value depends on the
    state (the delta rule), so the reading is sequential: v̂ comes from the recurrence."""
    rule._check(q, k, v, lr, log_decay)
    B, T, H, K = q.shape
    V = v.shape[-1]
    sd = _checks.state_dtype(q, k, v)
    scale = K ** -0.5 if rule.scale is None else rule.scale
    g = jnp.zeros((B, T, H), sd) if log_decay is None else log_decay.astype(sd)
    S0 = jnp.zeros((B, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
    mask = decay_mask(g)
    a = jnp.exp(jnp.cumsum(jnp.moveaxis(g, 1, -1), axis=-1))
    qh, kh, vh = scale * q.astype(sd), k.astype(sd), v.astype(sd)
    if rule.loss == "dot":
        return Reading(qh, kh, vh, mask, a, S0)

    def step(S, x):
        kt, vt, bt, gt = x
        S = jnp.exp(gt)[..., None, None] * S
        vhat = bt[..., None] * (vt - jnp.einsum("bhk,bhkv->bhv", kt, S))
        return S + kt[..., :, None] * vhat[..., None, :], vhat

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (kh, vh, lr.astype(sd), g))
    _, vhat = lax.scan(step, S0, xs)
    return Reading(qh, kh, jnp.moveaxis(vhat, 0, 1), mask, a, S0, associative=True,
                   breaks=None)


def _register_titans():
    from tttla_jax.rules.titans import TitansRule, _act, _act_grad

    @register_reducer(TitansRule)
    def _reduce_titans(rule: TitansRule, q, k, v, theta, momentum, decay, state):
        """Titans (docs/rules/titans.md). With ``u_n = Σ_{t∈n} k_tᵀ v̂_t``, ``v̂_t = θ_t (2/V)(v_t − k_t W_ref)``,
        ``E[j,i] = Π_{s=i+1..j} η_s``, ``A[n,l] = Π_{s=l+1..n}(1 − α_s)`` and ``C = A E``
        (chunk indices 0…N, 0 = start):

            M_n = A[n,0] M_0 + (Σ_{j≥1} A[n,j] E[j,0]) S_0 + Σ_{1≤i≤n} C[n,i] u_i

        so token t reads (★) with ``M[t,s] = C[r(t), n(s)]·[n(s) ≤ r(t)]``, ``r(t) = ⌊(t+1)/c⌋``,
        ``n(s) = ⌊s/c⌋ + 1`` — momentum and decay only re-weight the values (Theorem 5.3).

        MLP memory ``M(x) = act(x W1) W2``: the same coefficients apply to both layers, so the
        query features ``q̂_t = act(q_t W1_{r(t)})`` are themselves a masked linear attention
        of the first layer's per-token gradients — a history-dependent feature map (Theorem
        5.2), hence a sequential reading; ``k̂_s = act(k_s W1_ref)``,
        ``v̂_s = θ_s (2/V)(v_s − k̂_s W2_ref)``.

        With ``batch_size`` set, ``W_ref`` of each TTT batch is the memory after the previous
        one, obtained here by running the rule on the prefix: a sequential reading.
        """
        B, T, H, K, V, N = rule._validate(q, k, v, theta, momentum, decay, state)
        sd = _checks.state_dtype(q, k, v)
        c = rule.chunk_size
        cast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(sd), tree)
        M0, S0 = cast(state.memory), cast(state.momentum)
        ones = jnp.ones((B, H, 1), sd)
        E = segment_products(jnp.concatenate([ones, momentum.astype(sd)], -1))  # [B,H,N+1,N+1]
        A = segment_products(jnp.concatenate([ones, 1 - decay.astype(sd)], -1))
        Cm = jnp.einsum("bhnj,bhji->bhni", A, E)
        t = jnp.arange(T)
        r = (t + 1) // c  # memory index read by token t
        n = t // c + 1  # chunk (1-based) written by token s
        mask = Cm[:, :, r][:, :, :, n] * (n[None, :] <= r[:, None])
        coefs = (A[:, :, r, 0], jnp.einsum("bhnj,bhj->bhn", A[..., 1:], E[..., 1:, 0])[:, :, r])

        def per_token(M, length):  # [B, H, ...] -> [B, length, H, ...]
            return jax.tree_util.tree_map(
                lambda x: jnp.broadcast_to(x[:, None], (B, length) + x.shape[1:]), M)

        breaks = []
        if rule.batch_size is None:
            W_ref = per_token(M0, T)
        else:  # W_ref of each TTT batch = memory after the previous batch (rule run on the prefix)
            refs, st = [], state
            for start in range(0, T, rule.batch_size):
                end = min(start + rule.batch_size, T)
                refs.append(per_token(cast(st.memory), end - start))
                if end < T:
                    Np = -(-end // c)
                    _, st = rule.recurrent(q[:, :end], k[:, :end], v[:, :end], theta[:, :end],
                                           momentum[..., :Np], decay[..., :Np], state)
            W_ref = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=1), *refs)
            breaks.append("W_ref (the memory at the start of each TTT batch) is produced by the "
                          "previous batch, so the effective values depend on the history")
        qf, kf, vf, th = q.astype(sd), k.astype(sd), v.astype(sd), theta.astype(sd)[..., None]
        if rule.memory == "linear":
            vhat = th * (2.0 / V) * (vf - jnp.einsum("bthk,bthkv->bthv", kf, W_ref))
            return Reading(qf, kf, vhat, mask, coefs, (M0, S0), associative=not breaks,
                           breaks="; ".join(breaks) or None)
        (W1r, W2r), (W10, W20), (S10, S20) = W_ref, M0, S0
        act = _act(rule.activation)
        z = jnp.einsum("bthk,bthkf->bthf", kf, W1r)
        khat = act(z)
        e = th * (2.0 / V) * (jnp.einsum("bthf,bthfv->bthv", khat, W2r) - vf)
        vhat = -e
        d = jnp.einsum("bthv,bthfv->bthf", e, W2r) * _act_grad(rule.activation, z)  # ∇_{W1} ℓ = kᵀ d
        zq = Reading(qf, kf, -d, mask, coefs, (W10, S10)).outputs()  # q_t W1_{r(t)}
        breaks.append("the first memory layer W1 is updated, so the query features "
                      "act(q_t W1_{r(t)}) depend on the history (Theorem 5.2, time-varying feature map)")
        return Reading(act(zq), khat, vhat, mask, coefs, (W20, S20), associative=False,
                       breaks="; ".join(breaks))


_register_titans()


def _register_ttt():
    from tttla_jax.rules.ttt import (TTTLinearRule, TTTMLPRule, TTTMLPState, gelu_tanh, gelu_tanh_grad,
                                     layer_norm)

    @register_reducer(TTTLinearRule)
    def _reduce_ttt_linear(rule: TTTLinearRule, q, k, v, lr, token_eta, ln_scale, ln_bias, state,
                           output_final_state=True):
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
        """
        B, T, H, D = rule._validate_tokens(q, k, v, lr, token_eta, ln_scale, ln_bias)
        sd = _checks.state_dtype(q, k, v)
        C = rule.mini_batch_size
        qf, kf, vf, lrf, te = (x.astype(sd) for x in (q, k, v, lr, token_eta))
        gamma = beta = None
        if rule.layer_norm:
            gamma, beta = ln_scale.astype(sd), ln_bias.astype(sd)
        target = vf - kf if rule.residual else vf
        W, b = state.W.astype(sd), state.b.astype(sd)

        def inner_loss(Z, tgt):
            y = layer_norm(Z, gamma, beta, rule.eps) if rule.layer_norm else Z
            return 0.5 * jnp.sum((y - tgt) ** 2)

        vhats = []
        for start in range(0, T, C):
            end = min(start + C, T)
            kj, tj = kf[:, start:end], target[:, start:end]
            Z = jnp.einsum("bthd,bhde->bthe", kj, W) + (b[:, None] if rule.bias else 0.0)
            vh = -lrf[:, start:end, :, None] * jax.grad(inner_loss)(Z, tj)
            vhats.append(vh)
            last = te[end - start - 1]  # the next mini-batch starts from the last row's weights
            W = W + last * jnp.einsum("bthd,bthe->bhde", kj, vh)
            if rule.bias:
                b = b + last * jnp.sum(vh, axis=1)
        vhat = jnp.concatenate(vhats, axis=1)
        mask = mini_batch_mask(te, T, C)
        W0, b0 = state.W.astype(sd), state.b.astype(sd)
        if rule.bias:
            one = jnp.ones((B, T, H, 1), sd)
            qh, kh = jnp.concatenate([qf, one], -1), jnp.concatenate([kf, one], -1)
            S0 = jnp.concatenate([W0, b0[:, :, None, :]], axis=2)
        else:
            qh, kh, S0 = qf, kf, W0

        def post(Zbar):
            y = layer_norm(Zbar, gamma, beta, rule.eps) if rule.layer_norm else Zbar
            return qf + y if rule.residual else y

        return Reading(qh, kh, vhat, mask, jnp.ones((B, H, T), sd), S0, associative=False,
                       breaks=rule.breaks_associativity(), post=post)


    def mini_batch_mask(te, T, C):
        """``M[i, j] = token_eta[pos(i)]`` for ``j ≤ i`` in i's mini-batch, ``token_eta[C−1]`` for
        keys of earlier mini-batches (the carried last-row weights), else 0. ``[T, T]``."""
        t = jnp.arange(T)
        mb, pos = t // C, t % C
        same = (mb[:, None] == mb[None, :]) & (t[None, :] <= t[:, None])
        earlier = mb[None, :] < mb[:, None]
        return jnp.where(same, te[pos][:, None], 0.0) + jnp.where(earlier, te[C - 1], 0.0)

    def with_one(x):  # the bias as an extra key / query dimension
        return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], -1)

    def stack_bias(W, b):  # [B, H, I, O], [B, H, O] -> [B, H, I + 1, O]
        return jnp.concatenate([W, b[:, :, None, :]], axis=2)

    @register_reducer(TTTMLPRule)
    def _reduce_ttt_mlp(rule: TTTMLPRule, q, k, v, lr, token_eta, ln_scale, ln_bias, state,
                        output_final_state=True):
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
        B, T, H, D = rule._validate_tokens(q, k, v, lr, token_eta, ln_scale, ln_bias)
        if not isinstance(state, (tuple, list)) or len(state) != 4:
            raise ValueError(f"state: expected a TTTMLPState (W1, b1, W2, b2), got {type(state).__name__}")
        W1 = jnp.asarray(state[0])
        _checks.check_rank("state.W1", W1, 4, "[B, H, D, F]")
        F = W1.shape[-1]
        state = rule._check_state_leaves(state, TTTMLPState, (
            ((B, H, D, F), "[B, H, D, F] (from q)"), ((B, H, F), "[B, H, F] (from q, W1)"),
            ((B, H, F, D), "[B, H, F, D] (from q, W1)"), ((B, H, D), "[B, H, D] (from q)")))
        sd = _checks.state_dtype(q, k, v, lr, token_eta, ln_scale, ln_bias, *state)
        C = rule.mini_batch_size
        qf, kf, vf, lrf, te = (x.astype(sd) for x in (q, k, v, lr, token_eta))
        gamma = beta = None
        if rule.layer_norm:
            gamma, beta = ln_scale.astype(sd), ln_bias.astype(sd)
        target = vf - kf if rule.residual else vf
        W1, b1, W2, b2 = (x.astype(sd) for x in state)
        W10, b10, W20, b20 = W1, b1, W2, b2
        use_b = 1.0 if rule.bias else 0.0

        def inner_loss(Z, tgt):
            y = layer_norm(Z, gamma, beta, rule.eps) if rule.layer_norm else Z
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
            if rule.bias:
                b1 = b1 + last * jnp.sum(v1, axis=1)
                b2 = b2 + last * jnp.sum(v2, axis=1)
        v1, v2, x2 = (jnp.concatenate(x, axis=1) for x in (v1s, v2s, x2s))
        mask = mini_batch_mask(te, T, C)
        ones = jnp.ones((B, H, T), sd)
        if rule.bias:
            layer1 = Reading(with_one(qf), with_one(kf), v1, mask, ones, stack_bias(W10, b10))
        else:
            layer1 = Reading(qf, kf, v1, mask, ones, W10)
        z1bar = layer1.outputs()  # q_i's first-layer pre-activation after the update (history-dependent)
        qh, kh = gelu_tanh(z1bar), x2
        S0 = W20
        if rule.bias:
            qh, kh, S0 = with_one(qh), with_one(kh), stack_bias(W20, b20)

        def post(Zbar):
            y = layer_norm(Zbar, gamma, beta, rule.eps) if rule.layer_norm else Zbar
            return qf + y if rule.residual else y

        return Reading(qh, kh, v2, mask, ones, S0, associative=False,
                       breaks=rule.breaks_associativity(), post=post)


_register_ttt()


def _register_lact():
    from tttla_jax.ops.linear_attention import chunk_layout, unchunk_layout
    from tttla_jax.rules.lact import _WN_EPS, LaCTRule, _row_norm, features, newton_schulz5

    @register_reducer(LaCTRule)
    def _reduce_lact(rule: LaCTRule, q, k, v, lr, state, momentum=None, output_final_state=False):
        """LaCT (docs/rules/lact.md) read as linear attention on the last layer W1 (Theorems 5.2–5.3, docs/ladder.md).

        Row form ``S = W1ᵀ`` ``[dh, dv]``. The rule performs ``U = n_upd · inner_steps``
        update events (``n_upd`` updating chunks, ``inner_steps`` gradient steps each); event
        ``u`` on chunk ``j`` writes ``G_u = Σ_{s∈j} k̂_{u,s}ᵀ v̂_s`` with
        ``k̂_{u,s} = lr1_s ⊙ φ_u(k_s)`` (features with the weights event u starts from — the
        pre-update features of Theorem 5.1) and ``v̂_s = ±v_s`` (ascent / descent). Queries of
        chunk c read ``q̂_t = φ(q_t)`` with the weights their chunk applies. Then, per event,

            M_u = ᾱ_u M_{u−1} + G_u,   X_u = NS5(M_u) (Muon) or M_u,   W1 ← Norm(W1 + X_u).

        * Momentum (Theorem 5.3) re-weights event j's write in state r by
          ``Σ_{i=j..r−1} Π_{s=j+1..i} ᾱ_s`` (without Muon; with Muon it acts inside the
          values, before NS5).
        * Weight normalisation rescales rows of W1 (value channels of S) by the data-dependent
          ``n0 / ‖·‖_row``: a per-channel, history-dependent decay of the state, so the mask is
          ``[B, H, T, S, V]`` and the reading is sequential. Post-norm:
          ``W1_r = Π_{l≤r} D_l W1_0 + Σ_{u<r} Π_{l=u+1..r} D_l X_u``; pre-norm:
          ``W1_r = D_r (W_main,0 + Σ_{u<r} X_u)`` for ``r ≥ 1`` and the raw ``W1_0`` for ``r = 0``
          (two initial states).
        * Muon (docs/ttt_as_linear_attention.md, docs/ladder.md "with Muon: ``S_c = W1_0 + Σ_{i<c} NS5(M_i)``"): ``X_u`` is a full
          ``[dv, dh]`` matrix, not a sum of the chunk's token writes. Any matrix is a sum of
          ``dh`` rank-one writes, ``X_uᵀ = Σ_a e_aᵀ X_uᵀ[a]``, so event u contributes ``dh``
          *virtual tokens* with one-hot keys ``e_a`` and values the rows of ``X_uᵀ``, read
          block-causally (by the queries of later chunks) with the same per-channel weights
          as above; ``S = U · dh`` key positions. (★) then reads
          ``o_t = φ(q_t)(W1_0 + Σ_{u<r(t)} E[r(t), u] ⊙ NS5(M_u)ᵀ)`` — exactly docs/ladder.md's
          scan → per-chunk NS → prefix sum. The initial momentum buffer enters NS5 (hence
          the values) nonlinearly and is not a separate initial state.
        * ``inner_steps > 1``: every inner step is one more event, with its own pre-update
          features ``φ_u`` (history-dependent for ``update="all"``; with ``update="w1"`` the
          same keys are written ``inner_steps`` times).
        * ``update="all"``: φ changes with history (its W0/W2 trajectory is taken from the
          rule's own update steps) — Theorem 5.2's time-varying feature map.

        Without Muon the key positions are the tokens of each event (``S = U · C``; padded
        tokens have zero keys).
        """
        q, k, v, lrs, m, st, cdt, odt = rule._prepare(q, k, v, lr, momentum, state)
        B, T, H, K = k.shape
        V = v.shape[-1]
        C = rule.chunk_size
        N = -(-T // C)
        n_in = rule.inner_steps
        atu = rule.order == "apply_then_update"
        n_upd = N - 1 if atu else N
        U = n_upd * n_in
        net = rule.fast_net
        sign = 1.0 if rule.ascent else -1.0
        lrs = tuple(jnp.zeros((B, T, H, 1), cdt) if x is None else x for x in lrs)
        qc, kc, vc = (chunk_layout(x, C) for x in (q, k, v))
        lrc = tuple(chunk_layout(x, C) for x in lrs)
        if m is not None:
            counts = jnp.asarray([min(C, T - i * C) for i in range(N)], cdt)
            mbar = jnp.sum(chunk_layout(m, C), axis=3) / counts
        else:
            mbar = jnp.zeros((B, H, N), cdt)
        chunk_of = [u // n_in for u in range(U)]  # chunk written by event u
        # the rule's own trajectory, one state per event (for φ's history when W0/W2 update)
        states = [st]
        for u in range(U):
            j = chunk_of[u]
            states.append(rule._update(states[-1], kc[:, :, j], vc[:, :, j],
                                       tuple(x[:, :, j] for x in lrc), mbar[:, :, j]))
        read = [c * n_in if atu else (c + 1) * n_in for c in range(N)]  # state read by chunk c
        qhat = jnp.stack([features(states[read[c]].w, qc[:, :, c], net) for c in range(N)], 2)
        Dh = qhat.shape[-1]
        W1_0 = st.w[1]  # [B, H, V, Dh]
        use_mom = rule.use_momentum
        M0 = st.mom[1] if (use_mom and st.mom is not None) else jnp.zeros_like(W1_0)
        # the writes, recomputed here: G_u, momentum M_u, increments X_u, norm factors D_r
        if U:
            khat = jnp.stack([lrc[1][:, :, j] * features(states[u].w, kc[:, :, j], net)
                              for u, j in enumerate(chunk_of)], 2)  # [B, H, U, C, Dh]
            vhat = jnp.stack([sign * vc[:, :, j] for j in chunk_of], 2)  # [B, H, U, C, V]
            G = jnp.einsum("bhucv,bhucd->bhuvd", vhat, khat)
        abar = (jnp.stack([mbar[:, :, j] for j in chunk_of], -1) if (use_mom and U)
                else jnp.zeros((B, H, U), cdt))
        md = None if rule.muon_dtype is None else jnp.dtype(rule.muon_dtype)
        X, Mprev = [], M0
        for u in range(U):
            Mu = G[:, :, u] + (abar[..., u, None, None] * Mprev if use_mom else 0.0)
            Mprev = Mu
            X.append(newton_schulz5(Mu, md) if rule.muon else Mu)
        wn = rule.weight_norm
        R = U + 1  # state indices 0..U
        earlier = (jnp.arange(R)[:, None] > jnp.arange(U)[None, :])  # event u is in state r
        if wn is None:
            E = earlier.astype(cdt)[None, None]  # [1, 1, R, U]
            coefs, inits = [jnp.ones((1, 1, R), cdt)], [W1_0]
        else:
            n0 = st.norm[1][..., 0]  # [B, H, V]
            D = [jnp.ones((B, H, V), cdt)]
            Wp = W1_0 if wn == "post" else st.main[1]
            for u in range(U):
                Wp = Wp + X[u]
                d = n0 / (_row_norm(Wp)[..., 0] + _WN_EPS)
                if wn == "post":
                    Wp = Wp * d[..., None]
                D.append(d)
            D = jnp.stack(D, 2)  # [B, H, R, V]
            if wn == "post":
                Pd = jnp.moveaxis(segment_products(jnp.moveaxis(D, -1, 2)), 2, -1)  # [B,H,R,R,V]
                E = Pd[:, :, :, :U] * earlier[None, None, :, :, None]
                coefs, inits = [Pd[:, :, :, 0]], [W1_0]
            else:
                E = jnp.where(earlier[None, None, :, :, None], D[:, :, :, None, :], 0.0)
                first = (jnp.arange(R) == 0).astype(cdt)
                coefs = [jnp.broadcast_to(first[None, None, :, None], (B, H, R, V)),
                         D * (1.0 - first)[None, None, :, None]]
                inits = [W1_0, st.main[1]]
        t = jnp.arange(T)
        r_of_t = jnp.asarray(read)[t // C]  # state index read by query t

        def per_query(x):  # [B, H, R, ...] -> [B, H, T, ...]
            return x[:, :, r_of_t]

        tok = lambda x: unchunk_layout(x, T)
        positions = lambda x, L: jnp.moveaxis(x.reshape(x.shape[:2] + (U * L,) + x.shape[4:]), 2, 1)
        if rule.muon:
            # virtual tokens: event u writes X_uᵀ = Σ_a e_aᵀ X_uᵀ[a]
            keys = jnp.broadcast_to(jnp.eye(Dh, dtype=cdt), (B, H, U, Dh, Dh))
            vals = jnp.swapaxes(jnp.stack(X, 2), -1, -2) if U else jnp.zeros((B, H, 0, Dh, V), cdt)
            ev = jnp.repeat(jnp.arange(U), Dh)
            mask = per_query(E)[:, :, :, ev]
            L = Dh
        else:
            keys, vals = (khat, vhat) if U else (jnp.zeros((B, H, 0, C, Dh), cdt), jnp.zeros((B, H, 0, C, V), cdt))
            # momentum: X_u = Σ_{u'≤u} P[u, u'] G_{u'} + Pm[u] M0
            Pfull = segment_products(jnp.concatenate([jnp.ones((B, H, 1), cdt), abar], -1))
            P, Pm = Pfull[:, :, 1:, 1:], Pfull[:, :, 1:, 0]
            Eb = E if E.ndim == 5 else E[..., None]
            Eb = jnp.broadcast_to(Eb, (B, H, R, U, Eb.shape[-1]))
            coefG = jnp.einsum("bhruv,bhuw->bhrwv", Eb, P)  # [B, H, R, U, V|1]
            if use_mom:
                coefs.append(jnp.einsum("bhruv,bhu->bhrv", Eb, Pm))
                inits.append(M0)
            ev = jnp.repeat(jnp.arange(U), C)
            mask = per_query(coefG)[:, :, :, ev]
            if E.ndim == 4:
                mask = mask[..., 0]
            L = C
        coefs = tuple(per_query(a) for a in coefs)
        breaks = rule.breaks_associativity()
        return Reading(tok(qhat), positions(keys, L), positions(vals, L), mask, tuple(coefs),
                       tuple(jnp.swapaxes(S, -1, -2) for S in inits),
                       associative=breaks is None, breaks=breaks)


_register_lact()


def _register_vit3():
    from tttla_jax.rules.vit3 import OFFSETS, ViT3ConvRule, ViT3GLURule, _shift

    def normalized(g, axis):
        """``(g / (‖g‖_axis + 1), 1 / (‖g‖_axis + 1))``: ViT³'s gradient normalisation and its factor."""
        c = 1.0 / (jnp.sqrt(jnp.sum(g * g, axis=axis, keepdims=True)) + 1.0)
        return g * c, c

    @register_reducer(ViT3GLURule)
    def _reduce_vit3_glu(rule: ViT3GLURule, q, k, v, W1, W2):
        """ViT³ GLU part (docs/rules/vit3.md) as non-causal linear attention (Theorem 5.1, one full-batch step).

        ``f(x) = (x W1) ⊙ silu(x W2)`` is linear in W1, so after one step on
        ``L = −(s/N) Σ ⟨f(k), v⟩`` with the normalised gradient ``g ← g / (‖g‖_in + 1)``:

            o = silu(q W2') ⊙ q (W1 + Σ_j k_jᵀ v̂_j),   v̂_j = lr · c ⊙ (s/N) v_j ⊙ silu(k_j W2)

        with ``c = 1/(‖∇W1‖_K + 1)`` per output column — a per-column factor is a diagonal on
        the right of ``kᵀv̂``, so it folds into the values. Queries and keys are the raw
        ``q``, ``k``; the mask is all ones ("none" mode: every query reads the state after all
        N tokens); ``S_0 = W1``. The gate ``silu(q W2')`` (post-update W2 when ``update_W2``,
        itself one full-batch step that needs no scan) multiplies the read per value channel:
        the reading's ``post`` map. Both gradients come from ``jax.grad`` of the inner loss,
        independently of the rule's closed form. Everything is available up front:
        associative.
        """
        B, N, H, K, V = rule._validate(q, k, v, W1, W2)
        sd, (qf, kf, vf, W1f, W2f) = rule._cast(q, k, v, W1, W2)
        W1b, W2b = (jnp.broadcast_to(W, (B, H, K, V)) for W in (W1f, W2f))

        def inner_loss(W1_, W2_):  # per batch element the fast weights step separately
            f = jnp.einsum("bnhk,bhkv->bnhv", kf, W1_) * jax.nn.silu(jnp.einsum("bnhk,bhkv->bnhv", kf, W2_))
            return -(rule.scale / N) * jnp.sum(f * vf)

        g1, g2 = jax.grad(inner_loss, argnums=(0, 1))(W1b, W2b)
        c = jnp.ones((B, H, 1, V), sd)
        if rule.normalize:
            g1, c = normalized(g1, -2)
            g2, _ = normalized(g2, -2)
        vhat = rule.lr * (rule.scale / N) * vf * jax.nn.silu(jnp.einsum("bnhk,bhkv->bnhv", kf, W2b))
        vhat = vhat * jnp.moveaxis(c, 2, 1)  # [B, 1, H, V]
        W2n = W2b - rule.lr * g2 if rule.update_W2 else W2b
        gate = jax.nn.silu(jnp.einsum("bnhk,bhkv->bnhv", qf, W2n))
        return Reading(qf, kf, vhat, jnp.ones((1, 1, N, N), sd), jnp.ones((1, 1, N), sd), W1b,
                       post=lambda o: gate * o)

    @register_reducer(ViT3ConvRule)
    def _reduce_vit3_conv(rule: ViT3ConvRule, q, k, v, W):
        """ViT³ 3×3 depthwise-conv part (docs/rules/vit3.md) as one non-causal linear attention per channel.

        Channels are the heads; the 3×3 neighbourhood is the key/query feature map
        (im2col): ``q̂_p = [q_{p+δ}]_δ``, ``k̂_p = [k_{p+δ}]_δ`` ``∈ R⁹`` (zero outside the
        grid, δ over the 9 offsets), value dimension 1, ``S_0 = [W_δ]_δ`` ``[9, 1]``. The
        conv is linear in W, ``conv(x, W)_p = x̂_p W``, so one step on
        ``L = −(s/N) Σ_p ⟨conv(k, W)_p, v_p⟩`` with ``g ← g / (‖g‖_taps + 1)`` gives

            o_p = q̂_p (S_0 + Σ_{p'} k̂_{p'}ᵀ v̂_{p'}),   v̂ = lr · c · (s/N) v,  c = 1/(‖∇W‖_taps + 1)

        — a sliding-window (3×3) linear attention, mask all ones ("none" mode). ``∇W`` from
        ``jax.grad`` of the inner loss. Associative (one step, everything up front).
        """
        B, N, C, qg, kg, vg, Wf = rule._prep(q, k, v, W)
        sd = Wf.dtype
        im2col = lambda x: jnp.stack([_shift(x, a, b) for a, b in OFFSETS], -1).reshape(B, N, C, 9)
        qh, kh = im2col(qg), im2col(kg)
        vf = vg.reshape(B, N, C)
        S0 = jnp.broadcast_to(jnp.moveaxis(Wf.reshape(9, C), 0, 1)[None, :, :, None], (B, C, 9, 1))

        def inner_loss(S):
            return -(rule.scale / N) * jnp.sum(jnp.einsum("bnck,bckx->bncx", kh, S)[..., 0] * vf)

        c = jnp.ones((B, C, 1, 1), sd)
        if rule.normalize:
            _, c = normalized(jax.grad(inner_loss)(S0), -2)  # norm over the 9 taps per channel
        vhat = rule.lr * (rule.scale / N) * vf[..., None] * c.reshape(B, 1, C, 1)
        return Reading(qh, kh, vhat, jnp.ones((1, 1, N, N), sd), jnp.ones((1, 1, N), sd), S0,
                       post=lambda o: o[..., 0])


_register_vit3()
