"""LaCT read as linear attention on its last layer W1 (Theorems 5.2–5.3 of arXiv 2602.21204;
docs/ttt_as_linear_attention.md, docs/ladder.md): :meth:`LaCTRule.reading
<tttla_jax.rules.lact.LaCTRule.reading>` for every configuration — Muon, weight norm,
``update="all"``, momentum, ``inner_steps``, both orders, so the whole ladder and its anomalies.

Row form ``S = W1ᵀ`` ``[dh, dv]``. The rule performs ``U = n_upd · inner_steps`` update
events (``n_upd`` updating chunks, ``inner_steps`` gradient steps each); event ``u`` on chunk
``j`` writes ``G_u = Σ_{s∈j} k̂_{u,s}ᵀ v̂_s`` with ``k̂_{u,s} = lr1_s ⊙ φ_u(k_s)`` (features
with the weights event u starts from — the pre-update features of Theorem 5.1) and
``v̂_s = ±v_s`` (ascent / descent). Queries of chunk c read ``q̂_t = φ(q_t)`` with the weights
their chunk applies. Then, per event,

    M_u = ᾱ_u M_{u−1} + G_u,   X_u = NS5(M_u) (Muon) or M_u,   W1 ← Norm(W1 + X_u).

* Momentum (Theorem 5.3) re-weights event j's write in state r by
  ``Σ_{i=j..r−1} Π_{s=j+1..i} ᾱ_s`` (without Muon; with Muon it acts inside the values,
  before NS5).
* Weight normalisation rescales rows of W1 (value channels of S) by the data-dependent
  ``n0 / ‖·‖_row``: a per-channel, history-dependent decay of the state, so the mask is
  ``[B, H, T, S, V]`` and the reading is sequential. Post-norm:
  ``W1_r = Π_{l≤r} D_l W1_0 + Σ_{u<r} Π_{l=u+1..r} D_l X_u``; pre-norm:
  ``W1_r = D_r (W_main,0 + Σ_{u<r} X_u)`` for ``r ≥ 1`` and the raw ``W1_0`` for ``r = 0``
  (two initial states).
* Muon (docs/ladder.md, "with Muon: ``S_c = W1_0 + Σ_{i<c} NS5(M_i)``"): ``X_u`` is a full
  ``[dv, dh]`` matrix, not a sum of the chunk's token writes. Any matrix is a sum of ``dh``
  rank-one writes, ``X_uᵀ = Σ_a e_aᵀ X_uᵀ[a]``, so event u contributes ``dh`` *virtual
  tokens* with one-hot keys ``e_a`` and values the rows of ``X_uᵀ``, read block-causally (by
  the queries of later chunks) with the same per-channel weights as above; ``S = U · dh`` key
  positions. (★) then reads ``o_t = φ(q_t)(W1_0 + Σ_{u<r(t)} E[r(t), u] ⊙ NS5(M_u)ᵀ)`` —
  exactly the scan → per-chunk NS → prefix sum of the parallel form. The initial momentum
  buffer enters NS5 (hence the values) nonlinearly and is not a separate initial state.
* ``inner_steps > 1``: every inner step is one more event, with its own pre-update features
  ``φ_u`` (history-dependent for ``update="all"``; with ``update="w1"`` the same keys are
  written ``inner_steps`` times).
* ``update="all"``: φ changes with history (its W0/W2 trajectory is taken from the rule's own
  update steps, :meth:`LaCTRule.inner_step`) — Theorem 5.2's time-varying feature map.

Without Muon the key positions are the tokens of each event (``S = U · C``; padded tokens
have zero keys). Readings are O(T²): for checking and explaining, not for speed.
"""
from __future__ import annotations

import jax.numpy as jnp

from tttla_jax.ops.chunk import chunk_layout, unchunk_layout
from tttla_jax.reduce import Reading, segment_products
from tttla_jax.rules.lact.fastnet import WN_EPS, features, row_norm
from tttla_jax.rules.lact.muon import newton_schulz5


def reading(rule, x) -> Reading:
    """The reading (★) of ``rule`` (a :class:`LaCTRule`) on prepared inputs ``x``
    (:meth:`LaCTRule.prepare`)."""
    q, k, v, st, cdt = x.q, x.k, x.v, x.state, x.dtype
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
    qc, kc, vc = (chunk_layout(a, C) for a in (q, k, v))
    lrc = tuple(chunk_layout(a, C) for a in x.lrs)
    mbar = x.chunk_momentum                                    # [B, H, N]
    chunk_of = [u // n_in for u in range(U)]  # chunk written by event u
    # the rule's own trajectory, one state per event (for φ's history when W0/W2 update)
    states = [st]
    for u in range(U):
        j = chunk_of[u]
        states.append(rule.inner_step(states[-1], kc[:, :, j], vc[:, :, j],
                                      tuple(a[:, :, j] for a in lrc), mbar[:, :, j]))
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
            d = n0 / (row_norm(Wp)[..., 0] + WN_EPS)
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

    def per_query(a):  # [B, H, R, ...] -> [B, H, T, ...]
        return a[:, :, r_of_t]

    tok = lambda a: unchunk_layout(a, T)  # noqa: E731
    positions = lambda a, L: jnp.moveaxis(a.reshape(a.shape[:2] + (U * L,) + a.shape[4:]), 2, 1)  # noqa: E731
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
