"""The reduction: every fast-weight rule read as (masked) linear attention (SPEC §2).

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

    Attributes:
      q, k: ``[B, T, H, K̂]`` effective queries / keys (scale already folded into q).
      v: ``[B, T, H, V]`` effective values.
      mask: ``[B, H, T, T]`` (or broadcastable) weight of key s for query t; or
        ``[B, H, T, T, V]`` for a per-value-channel weight.
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

    Supported rules: :class:`~tttla_jax.rules.linear.LinearFastWeightRule` (linear
    attention, decayed, DeltaNet, gated DeltaNet); other families register a reducer with
    :func:`register_reducer`.
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
        """Titans (SPEC §5). With ``u_n = Σ_{t∈n} k_tᵀ v̂_t``, ``v̂_t = θ_t (2/V)(v_t − k_t W_ref)``,
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
    from tttla_jax.rules.ttt import TTTLinearRule, layer_norm

    @register_reducer(TTTLinearRule)
    def _reduce_ttt_linear(rule: TTTLinearRule, q, k, v, lr, token_eta, ln_scale, ln_bias, state,
                           output_final_state=True):
        """TTT-Linear (SPEC §4) read as masked linear attention followed by ``q + LN(·)``.

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
        t = jnp.arange(T)
        mb, pos = t // C, t % C
        same = (mb[:, None] == mb[None, :]) & (t[None, :] <= t[:, None])
        earlier = mb[None, :] < mb[:, None]
        mask = jnp.where(same, te[pos][:, None], 0.0) + jnp.where(earlier, te[C - 1], 0.0)
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


_register_ttt()


def _register_lact():
    from tttla_jax.ops.linear_attention import chunk_layout, unchunk_layout
    from tttla_jax.rules.lact import LaCTRule, _row_norm, features

    def supports(rule):
        return not rule.muon and rule.inner_steps == 1

    @register_reducer(LaCTRule, supports)
    def _reduce_lact(rule: LaCTRule, q, k, v, lr, state, momentum=None, output_final_state=False):
        """LaCT (SPEC §3) read as linear attention on the last layer W1 (Theorems 5.2–5.3).

        Row form ``S = W1ᵀ`` ``[dh, dv]``. Chunk j's write is ``Σ_{s∈j} k̂_sᵀ v̂_s`` with
        ``k̂_s = lr1_s ⊙ φ_j(k_s)`` (features with the weights chunk j updates from — pre-update),
        ``v̂_s = ±v_s`` (ascent / descent), and queries read ``q̂_t = φ(q_t)`` with the weights
        their chunk applies (post-update features in the sense of Theorem 5.1). Momentum
        re-weights chunk j's write by ``Σ_{i=j..r−1} Π_{s=j+1..i} ᾱ_s`` (Theorem 5.3).
        Weight normalisation rescales rows of W1 (value channels of S) by the data-dependent
        ``n0 / ‖·‖_row`` — a per-channel, history-dependent decay of the state, so the mask is
        ``[B, H, T, T, V]`` and the reading is sequential. With ``update="all"`` φ changes
        with history (its W0/W2 trajectory is taken from the rule's own update steps).

        Not read: ``muon=True`` (NS5 of a chunk's summed update is not a sum of per-token
        writes) and ``inner_steps > 1`` (later steps' gradients depend on W1).
        """
        if not supports(rule):
            why = ("muon=True: NS5 of a chunk's summed update is not a sum of per-token writes "
                   "(the read is still linear in per-chunk states; see LaCTRule.parallel)"
                   if rule.muon else
                   f"inner_steps={rule.inner_steps}: later inner steps' gradients depend on W1")
            raise NoReadingError(f"reduce(LaCTRule): no token-level linear-attention reading: {why}")
        q, k, v, lrs, m, st, cdt, odt = rule._prepare(q, k, v, lr, momentum, state)
        B, T, H, K = k.shape
        V = v.shape[-1]
        C = rule.chunk_size
        N = -(-T // C)
        atu = rule.order == "apply_then_update"
        n_upd = N - 1 if atu else N
        sign = 1.0 if rule.ascent else -1.0
        lrs = tuple(jnp.zeros((B, T, H, 1), cdt) if x is None else x for x in lrs)
        qc, kc, vc = (chunk_layout(x, C) for x in (q, k, v))
        lrc = tuple(chunk_layout(x, C) for x in lrs)
        if m is not None:
            counts = jnp.asarray([min(C, T - i * C) for i in range(N)], cdt)
            mbar = jnp.sum(chunk_layout(m, C), axis=3) / counts
        else:
            mbar = jnp.zeros((B, H, N), cdt)
        # the rule's own trajectory: states at the start of every chunk (for φ's history)
        states = [st]
        for c in range(n_upd):
            states.append(rule._steps(states[-1], kc[:, :, c], vc[:, :, c],
                                      tuple(x[:, :, c] for x in lrc), mbar[:, :, c]))
        readw = [states[c] if atu else states[c + 1] for c in range(N)]
        qhat = jnp.stack([features(readw[c].w, qc[:, :, c], rule.fast_net) for c in range(N)], 2)
        khat = jnp.stack([lrc[1][:, :, c] * features(states[c].w, kc[:, :, c], rule.fast_net)
                          if c < n_upd else jnp.zeros_like(qhat[:, :, c]) for c in range(N)], 2)
        vhat = sign * vc
        # W1 path, recomputed here from the writes: G_j, momentum M_j, per-row norm factors
        W1_0 = st.w[1]
        M0 = st.mom[1] if (rule.use_momentum and st.mom is not None) else jnp.zeros_like(W1_0)
        n0 = st.norm[1] if rule.weight_norm is not None else None
        G = [jnp.einsum("bhcv,bhcd->bhvd", vhat[:, :, j], khat[:, :, j]) for j in range(n_upd)]
        Ms, Mprev, W1, Wm, D = [], M0, W1_0, W1_0, [jnp.ones((B, H, V), cdt)]
        for j in range(n_upd):
            Mj = G[j] + (mbar[:, :, j, None, None] * Mprev if rule.use_momentum else 0.0)
            Ms.append(Mj)
            Mprev = Mj
            if rule.weight_norm == "post":
                X = W1 + Mj
                d = n0[..., 0] / (_row_norm(X)[..., 0] + 1e-5)
                W1 = X * d[..., None]
            elif rule.weight_norm == "pre":
                Wm = Wm + Mj
                d = n0[..., 0] / (_row_norm(Wm)[..., 0] + 1e-5)
            else:
                d = jnp.ones((B, H, V), cdt)
            D.append(d)
        D = jnp.stack(D, 2)  # [B, H, n_upd + 1, V]: factor applied when state r is formed
        R = n_upd + 1  # state indices 0..n_upd
        # E[r, i]: per-channel weight of M_i in state r (i < r); a[r]: weight of W1_0
        if rule.weight_norm == "pre":
            E = jnp.where((jnp.arange(R)[:, None] > jnp.arange(n_upd)[None, :])[None, None, :, :, None],
                          D[:, :, :, None, :], 0.0)
            a = D
        else:
            Pd = segment_products(jnp.moveaxis(D, -1, 2))  # [B, H, V, R, R]: Π_{l=i+1..r} D_l
            Pd = jnp.moveaxis(Pd, 2, -1)  # [B, H, R, R, V]
            a = Pd[:, :, :, 0]
            E = Pd[:, :, :, :n_upd] * (jnp.arange(R)[:, None] > jnp.arange(n_upd)[None, :])[None, None, :, :, None]
        # momentum: M_i = Σ_{j≤i} P[i, j] G_j + Pm[i] M0
        abar = mbar[:, :, :n_upd] if rule.use_momentum else jnp.zeros((B, H, n_upd), cdt)
        Pfull = segment_products(jnp.concatenate([jnp.ones((B, H, 1), cdt), abar], -1))  # index 0 = M0
        P, Pm = Pfull[:, :, 1:, 1:], Pfull[:, :, 1:, 0]
        coefG = jnp.einsum("bhriv,bhij->bhrjv", E, P)  # [B, H, R, n_upd, V]
        coefM = jnp.einsum("bhriv,bhi->bhrv", E, Pm)
        # token level: query t reads state r(t); key s belongs to updating chunk j(s)
        t = jnp.arange(N * C)
        r = t // C if atu else t // C + 1
        j = jnp.minimum(t // C, max(n_upd - 1, 0))
        keep = ((t // C)[None, :] < n_upd) & (j[None, :] < r[:, None])
        if n_upd:
            mask = coefG[:, :, r][:, :, :, j] * keep[None, None, :, :, None]
        else:
            mask = jnp.zeros((B, H, N * C, N * C, V), cdt)
        tok = lambda x: unchunk_layout(x, T)
        mask = mask[:, :, :T, :T]
        return Reading(tok(qhat), tok(khat), tok(vhat), mask,
                       (a[:, :, r[:T]], coefM[:, :, r[:T]]),
                       (jnp.swapaxes(W1_0, -1, -2), jnp.swapaxes(M0, -1, -2)),
                       associative=rule.breaks_associativity() is None,
                       breaks=rule.breaks_associativity())


_register_lact()
