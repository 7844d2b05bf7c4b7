"""LaCT's chunk scan with a hand-written backward (a ``jax.custom_vjp``), used by
:meth:`~tttla_jax.rules.lact.LaCTRule.recurrent` for the reference configuration family
(docs/rules/lact.md): SwiGLU fast weights, every matrix updated, weight norm "post" or none,
"apply then update", one inner step; momentum, Muon (any ``muon_dtype``), ``ascent`` and
``q_is_k`` are all covered (:func:`supports`).

The forward is the scan of :meth:`LaCTRule.chunk_update` / :meth:`LaCTRule.read` itself
(same values); when differentiated it keeps only the fast weights (and momentum buffers)
at each chunk start — what the reference keeps per chunk — instead of every intermediate
of every chunk (plus the pre-norm weights ``W̃`` and Muon's input ``P``, three matrices
each). The backward is a reverse ``lax.scan`` that, per chunk, recomputes that chunk's
activations (``a, b, u`` and the read's) from its saved start state and applies the chain
rule by hand:

* read ``o = h_q W1ᵀ``, ``h_q = silu(q W0ᵀ) ⊙ (q W2ᵀ)``: six products;
* the inner gradients ``G1 = vᵀ(lr1 ⊙ h)``, ``G0 = (u ⊙ b ⊙ silu'(a))ᵀ(lr0 ⊙ k)``,
  ``G2 = (u ⊙ silu(a))ᵀ(lr2 ⊙ k)`` with ``a = k W0ᵀ``, ``b = k W2ᵀ``, ``u = v W1``:
  twelve products (``silu''(a) = σ(1 − σ)(2 + a(1 − 2σ))`` enters through ``G0``);
* momentum ``P = ±G + ᾱ·M`` (``M ← P``), Muon
  (:func:`~tttla_jax.rules.lact.muon.newton_schulz5_vjp`), ``W̃ = W + U`` and the post
  weight norm ``W' = W̃ · n / (‖W̃‖_row + ε)``, whose cotangent is
  ``g·s − W̃ · Σ_row(g ⊙ W̃) · n / ((r + ε)² r)`` with ``s = n / (r + ε)``, ``r = ‖W̃‖_row``
  (and ``g_n = Σ_row(g ⊙ W̃) / (r + ε)``: the initial row norms depend on ``W^(0)``).

Checked against the autodiff of the plain scan and the float64 reference loop
(tests/test_rules_lact.py): outputs, final states and every gradient at 1e-10 in float64.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tttla_jax.ops.chunk import num_chunks, pad_time
from tttla_jax.rules.lact.fastnet import WN_EPS
from tttla_jax.rules._numerics import safe_den, sqrt0
from tttla_jax.rules.lact.muon import newton_schulz5, newton_schulz5_vjp


def supports(rule) -> bool:
    """Whether :func:`scan` computes ``rule``'s recurrent form (the configurations above)."""
    return (rule.fast_net == "swiglu" and rule.update == "all" and rule.weight_norm in ("post", None)
            and rule.order == "apply_then_update" and rule.inner_steps == 1)


def scan_inputs(rule, x):
    """The arguments ``(xs, state)`` of :func:`scan` / :func:`plain` from the
    :class:`~tttla_jax.rules.lact.rule.LaCTInputs` ``x``: q, k, v, lr0, lr1, lr2 in the
    token-major chunk layout ``[B, N, C, H, ·]`` — ``[B, T, H, ·]`` zero-padded to whole
    chunks and reshaped, no copy — and ᾱ ``[B, H, N]``. The scan reads chunk ``i`` in place
    and swaps the heads next to the batch one chunk at a time (in cache), instead of
    transposing whole sequences."""
    C, T = rule.chunk_size, x.k.shape[1]
    N = num_chunks(T, C)

    def chunks(a):
        a = pad_time(a, N * C)
        return a.reshape((a.shape[0], N, C) + a.shape[2:])

    return tuple(chunks(a) for a in (x.q, x.k, x.v) + x.lrs) + (x.chunk_momentum,), x.state


def outputs(o, T):
    """``o [B, T, H, dv]`` from :func:`scan`'s ``o [B, N, C, H, dv]``."""
    return o.reshape((o.shape[0], -1) + o.shape[3:])[:, :T]


def _chunk(xs, i):
    """Chunk ``i`` of the inputs ``xs`` (:func:`scan_inputs`): ``[B, C, H, ·]`` and ᾱ ``[B, H]``."""
    return (tuple(lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False) for a in xs[:6])
            + (lax.dynamic_index_in_dim(xs[6], i, axis=2, keepdims=False),))


def _heads(x):
    """A token-major chunk ``[B, C, H, d]`` → ``[B·H, C, d]`` (batch and heads as one axis:
    one batched product per matrix, and no extent-1 axes for B = 1)."""
    B, C, H = x.shape[:3]
    return jnp.swapaxes(x, 1, 2).reshape((B * H, C) + x.shape[3:])


def _tokens(x, B):
    """Inverse of :func:`_heads`: ``[B·H, C, d]`` → ``[B, C, H, d]``."""
    n, C = x.shape[:2]
    return jnp.swapaxes(x.reshape((B, n // B, C) + x.shape[2:]), 1, 2)


def _flat(t):
    """A pytree of ``[B, H, ...]`` arrays → ``[B·H, ...]``."""
    return jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), t)


def _unflat(t, B):
    """Inverse of :func:`_flat`."""
    return jax.tree_util.tree_map(lambda a: a.reshape((B, -1) + a.shape[1:]), t)


def _rowsum(x):
    """``Σ`` over the last axis, kept as a trailing axis of size 1."""
    return jnp.sum(x, axis=-1)[..., None]


def _row_norm(W):
    return sqrt0(_rowsum(W * W))


def _silu_parts(a):
    sig = jax.nn.sigmoid(a)
    return sig, a * sig, sig * (1.0 + a * (1.0 - sig))  # σ, silu(a), silu'(a)


def _mm(eq, x, y):
    return jnp.einsum(eq, x, y)


def _red(g, lr):
    """Cotangent of a learning rate ``[.., C, 1]`` (summed over channels) or ``[.., C, D]``."""
    return _rowsum(g) if lr.shape[-1] == 1 and g.shape[-1] != 1 else g


def _read(w, q):
    """``f(q)`` for ``q [B, C, H, dk]`` (token-major; ``w`` flat ``[B·H, r, c]``) → ``[B, C, H, dv]``."""
    W0, W1, W2 = w
    B = q.shape[0]
    q = _heads(q)
    h = jax.nn.silu(_mm("nck,ndk->ncd", q, W0)) * _mm("nck,ndk->ncd", q, W2)
    return _tokens(_mm("ncd,nvd->ncv", h, W1), B)


def _read_bwd(w, q, go):
    """Cotangents ``(gW0, gW1, gW2), gq`` of :func:`_read` (token-major ``q``, ``go``, ``gq``)."""
    W0, W1, W2 = w
    B = q.shape[0]
    q, go = _heads(q), _heads(go)
    Aq = _mm("nck,ndk->ncd", q, W0)
    Bq = _mm("nck,ndk->ncd", q, W2)
    _, sq, dsq = _silu_parts(Aq)
    gW1 = _mm("ncv,ncd->nvd", go, sq * Bq)
    gh = _mm("ncv,nvd->ncd", go, W1)
    gA = gh * Bq * dsq
    gB = gh * sq
    gq = _mm("ncd,ndk->nck", gA, W0) + _mm("ncd,ndk->nck", gB, W2)
    return (_mm("ncd,nck->ndk", gA, q), gW1, _mm("ncd,nck->ndk", gB, q)), _tokens(gq, B)


def _md(rule):
    return None if rule.muon_dtype is None else jnp.dtype(rule.muon_dtype)


def _step(rule, s, xs):
    """One updating chunk: ``(state', o, (W̃, P))``, ``W̃ = W + U`` the weights before the
    weight norm, ``P`` Muon's input (None without Muon) — :meth:`LaCTRule.read` and
    :meth:`LaCTRule.inner_step` (:func:`~tttla_jax.rules.lact.fastnet.inner_grads`) for the
    supported configurations, with the products that share an operand done as one:
    ``[a b] = k [W0; W2]ᵀ`` and ``[Aq Bq] = q [W0; W2]ᵀ``. The state is flat
    (``[B·H, ·, ·]``), the chunk token-major (:func:`_chunk`)."""
    qi, k, v, lr0, lr1, lr2, mb = xs
    W0, W1, W2 = s.w
    B, C, dh = k.shape[0], k.shape[1], W0.shape[1]
    cat = jnp.concatenate
    qi, k, v, lr0, lr1, lr2 = (_heads(x) for x in (qi, k, v, lr0, lr1, lr2))
    W02 = cat([W0, W2], axis=1)
    ABq = _mm("nck,ndk->ncd", qi, W02)  # [Aq Bq] = q [W0; W2]ᵀ
    o = _tokens(_mm("ncd,nvd->ncv", jax.nn.silu(ABq[..., :dh]) * ABq[..., dh:], W1), B)
    AB = _mm("nck,ndk->ncd", k, W02)  # [a b]
    a, b = AB[..., :dh], AB[..., dh:]
    sig, sa, ds = _silu_parts(a)
    u = _mm("ncv,nvd->ncd", v, W1)  # W1ᵀ v
    G1 = _mm("ncv,ncd->nvd", v, lr1 * (sa * b))
    da, usa = u * b * ds, u * sa
    if lr0.shape[-1] == 1 and lr2.shape[-1] == 1:
        G0 = _mm("ncd,nck->ndk", lr0 * da, k)
        G2 = _mm("ncd,nck->ndk", lr2 * usa, k)
    else:
        G0 = _mm("ncd,nck->ndk", da, lr0 * k)
        G2 = _mm("ncd,nck->ndk", usa, lr2 * k)
    sign = 1.0 if rule.ascent else -1.0
    dW = [sign * x for x in (G0, G1, G2)]
    mom = s.mom
    if rule.use_momentum:
        mb = mb.reshape(-1)[:, None, None]
        dW = [d + mb * m for d, m in zip(dW, mom)]
        mom = tuple(dW)
    P = tuple(dW) if rule.muon else None
    if rule.muon:
        dW = [newton_schulz5(d, _md(rule)) for d in dW]
    Wt = tuple(w + d for w, d in zip(s.w, dW))
    if rule.weight_norm == "post":
        w = tuple(x / (_row_norm(x) + WN_EPS) * n for x, n in zip(Wt, s.norm))
    else:
        w = Wt
    return s._replace(w=w, mom=mom), o, (Wt, P)


def _flat_state(state):
    return state._replace(w=_flat(state.w), mom=_flat(state.mom), norm=_flat(state.norm))


def _unflat_state(state, B):
    return state._replace(w=_unflat(state.w, B), mom=_unflat(state.mom, B), norm=_unflat(state.norm, B))


def _forward(rule, xs, state, keep):
    """The plain scan (differentiable by JAX); with ``keep`` also the (flat) weights and
    momentum buffers at every chunk start and the pre-norm weights ``W̃`` of every chunk.
    The outputs are written in place, chunk by chunk, into one ``[B, N, C, H, dv]`` buffer."""
    q = xs[0]
    B, N = q.shape[:2]
    o = jnp.zeros(q.shape[:-1] + (state.w[1].shape[2],), q.dtype)

    def body(carry, i):
        s, o = carry
        s_next, oi, WtP = _step(rule, s, _chunk(xs, i))
        o = lax.dynamic_update_index_in_dim(o, oi, i, axis=1)
        return (s_next, o), ((s.w, s.mom, WtP) if keep else None)

    (st, o), starts = lax.scan(body, (_flat_state(state), o), jnp.arange(N - 1))
    o = o.at[:, N - 1].set(_read(st.w, q[:, N - 1]))
    return o, st, starts


def plain(rule, xs, state):
    """:func:`scan` without the custom backward (JAX differentiates the scan itself)."""
    o, st, _ = _forward(rule, xs, state, keep=False)
    return o, _unflat_state(st, o.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan(rule, xs, state):
    """``(o, final_state)`` from the inputs ``xs`` of :func:`scan_inputs` (``N ≥ 2`` chunks)
    and the :class:`LaCTState` ``state``: chunks ``0 … N−2`` update, the last one is
    apply-only; ``o [B, N, C, H, dv]`` (:func:`outputs`)."""
    return plain(rule, xs, state)


def _scan_fwd(rule, xs, state):
    o, st, starts = _forward(rule, xs, state, keep=True)
    return (o, _unflat_state(st, o.shape[0])), (xs, starts, st.w, _flat(state.norm))


def _post_norm_bwd(g, Wt, n):
    r = _row_norm(Wt)
    den = r + WN_EPS
    t = _rowsum(g * Wt)
    return g * (n / den) - Wt * (t * n / (den * den * safe_den(r))), t / den


def _chunk_bwd(rule, w, mom, Wt, P, norm, x, go, gw, gmom):
    """Cotangents through one updating chunk: from those of its outputs ``go`` and of the
    state after it (``gw``, ``gmom``) to those of the state before it and of its inputs.

    Products that share a weight operand are done as one on the stacked weights
    (``[W0; W2]``, ``[gG0; gG2]``): 14 products per chunk instead of 23, the same FLOPs.
    Activations are not concatenated (a copy per chunk costs more than the larger product
    gains on XLA:CPU)."""
    qi, k, v, lr0, lr1, lr2, mb = x
    W0, W1, W2 = w
    B, C, dh = k.shape[0], k.shape[1], W0.shape[1]
    cat = jnp.concatenate
    sign = 1.0 if rule.ascent else -1.0
    # token-major chunks → [B·H, C, ·] (in cache, one chunk at a time)
    qi, k, v, go, lr0, lr1, lr2 = (_heads(x) for x in (qi, k, v, go, lr0, lr1, lr2))
    # recompute the chunk's activations: [a b] = k [W0; W2]ᵀ, [Aq Bq] = q [W0; W2]ᵀ, u = v W1
    W02 = cat([W0, W2], axis=1)
    AB = _mm("nck,ndk->ncd", k, W02)
    ABq = _mm("nck,ndk->ncd", qi, W02)
    a, b, Aq, Bq = AB[..., :dh], AB[..., dh:], ABq[..., :dh], ABq[..., dh:]
    u = _mm("ncv,nvd->ncd", v, W1)
    ghq = _mm("ncv,nvd->ncd", go, W1)
    sig, sa, ds = _silu_parts(a)
    h = sa * b
    da = u * b * ds
    usa = u * sa
    lh = lr1 * h
    md = _md(rule)
    gW, gP, gn = [], [], []
    for i in range(3):
        if rule.weight_norm == "post":
            g, gni = _post_norm_bwd(gw[i], Wt[i], norm[i])
            gn.append(gni)
        else:
            g = gw[i]
        gW.append(g)
        gPi = newton_schulz5_vjp(P[i], g, md) if rule.muon else g
        if rule.use_momentum:
            gPi = gPi + gmom[i]
        gP.append(gPi)
    if rule.use_momentum:
        mbf = mb.reshape(-1)[:, None, None]
        gmom_prev = tuple(mbf * gPi for gPi in gP)
        gmb = sum(jnp.sum(gPi * Mi, axis=(-2, -1)) for gPi, Mi in zip(gP, mom)).reshape(mb.shape)
    else:
        gmom_prev, gmb = gmom, jnp.zeros_like(mb)
    gG0, gG1, gG2 = (sign * gPi for gPi in gP)
    # G1 = vᵀ(lr1 h), G0 = daᵀ(lr0 k), G2 = (u silu(a))ᵀ(lr2 k)
    g_lh = _mm("ncv,nvd->ncd", v, gG1)
    gl1 = _red(g_lh * h, lr1)
    g_h = g_lh * lr1
    gG02 = cat([gG0, gG2], axis=1)
    if lr0.shape[-1] == 1 and lr2.shape[-1] == 1:  # per-token rates scale rows: fold them
        KG = _mm("nck,ndk->ncd", k, gG02)  # [k gG0ᵀ, k gG2ᵀ]
        KG0, KG2 = KG[..., :dh], KG[..., dh:]
        g_da, g_usa = lr0 * KG0, lr2 * KG2
        gl0 = _rowsum(da * KG0)
        gl2 = _rowsum(usa * KG2)
        gk = _mm("ncd,ndk->nck", cat([lr0 * da, lr2 * usa], axis=-1), gG02)
    else:
        lk0, lk2 = lr0 * k, lr2 * k
        g_da = _mm("nck,ndk->ncd", lk0, gG0)
        g_usa = _mm("nck,ndk->ncd", lk2, gG2)
        g_lk0 = _mm("ncd,ndk->nck", da, gG0)
        g_lk2 = _mm("ncd,ndk->nck", usa, gG2)
        gl0 = _red(g_lk0 * k, lr0)
        gl2 = _red(g_lk2 * k, lr2)
        gk = g_lk0 * lr0 + g_lk2 * lr2
    g_u = g_da * b * ds + g_usa * sa
    g_b = g_h * sa + g_da * u * ds
    dds = sig * (1.0 - sig) * (2.0 + a * (1.0 - 2.0 * sig))  # silu''(a)
    g_a = (g_h * b + g_usa * u) * ds + g_da * u * b * dds
    gv = _mm("ncd,nvd->ncv", cat([lh, g_u], axis=-1), cat([gG1, W1], axis=-1))
    # the read o = hq W1ᵀ, hq = silu(Aq) ⊙ Bq
    _, sq, dsq = _silu_parts(Aq)
    gAB = cat([g_a, g_b], axis=-1)
    gABq = cat([ghq * Bq * dsq, ghq * sq], axis=-1)
    gk = gk + _mm("ncd,ndk->nck", gAB, W02)  # through a, b
    gq = _mm("ncd,ndk->nck", gABq, W02)  # through Aq, Bq
    gW02 = _mm("ncd,nck->ndk", gAB, k) + _mm("ncd,nck->ndk", gABq, qi)
    gW1 = _mm("ncv,ncd->nvd", v, g_u) + _mm("ncv,ncd->nvd", go, sq * Bq)
    gW0 = gW[0] + gW02[:, :dh]
    gW1 = gW[1] + gW1
    gW2 = gW[2] + gW02[:, dh:]
    gn = tuple(gn) if rule.weight_norm == "post" else None
    gx = tuple(_tokens(g, B) for g in (gq, gk, gv, gl0, gl1, gl2))
    return (gW0, gW1, gW2), gmom_prev, gn, gx + (gmb,)


def _zeros_like_tree(t):
    return jax.tree_util.tree_map(jnp.zeros_like, t)


def _scan_bwd(rule, res, cts):
    xs, starts, w_final, norm = res
    go, gst = cts
    B, N = go.shape[:2]
    gst = _flat_state(gst)
    (rW0, rW1, rW2), gq_last = _read_bwd(w_final, xs[0][:, N - 1], go[:, N - 1])
    gw = (gst.w[0] + rW0, gst.w[1] + rW1, gst.w[2] + rW2)
    gmom = gst.mom if rule.use_momentum else None
    gn0 = _zeros_like_tree(norm) if norm is not None else None
    # the inputs' cotangents, written in place chunk by chunk (the last chunk's k, v, lrs: 0)
    gxs = _zeros_like_tree(xs)
    gxs = (gxs[0].at[:, N - 1].set(gq_last),) + gxs[1:]

    def body(carry, inp):
        gw, gmom, gn, gxs = carry
        i, (w, mom, (Wt, P)) = inp
        goi = lax.dynamic_index_in_dim(go, i, axis=1, keepdims=False)
        gw, gmom, gnc, gx = _chunk_bwd(rule, w, mom, Wt, P, norm, _chunk(xs, i), goi, gw, gmom)
        if gn is not None:
            gn = tuple(a + b for a, b in zip(gn, gnc))
        gxs = tuple(lax.dynamic_update_index_in_dim(a, g, i, axis=1 if j < 6 else 2)
                    for j, (a, g) in enumerate(zip(gxs, gx)))
        return (gw, gmom, gn, gxs), None

    (gw, gmom, gn, gxs), _ = lax.scan(body, (gw, gmom, gn0, gxs), (jnp.arange(N - 1), starts), reverse=True)
    if gn is not None:  # the cotangent of the (unchanging) norms also reaches the final state
        gn = tuple(a + b for a, b in zip(gn, gst.norm))
    gstate = _unflat_state(type(gst)(w=gw, main=None, mom=gmom, norm=gn), B)
    return gxs, gstate


scan.defvjp(_scan_fwd, _scan_bwd)
