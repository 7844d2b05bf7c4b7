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
from tttla_jax.rules.lact.fastnet import WN_EPS, row_norm
from tttla_jax.rules.lact.muon import newton_schulz5, newton_schulz5_vjp


def supports(rule) -> bool:
    """Whether :func:`scan` computes ``rule``'s recurrent form (the configurations above)."""
    return (rule.fast_net == "swiglu" and rule.update == "all" and rule.weight_norm in ("post", None)
            and rule.order == "apply_then_update" and rule.inner_steps == 1)


def scan_inputs(rule, x):
    """The arguments ``(xs, q_last, state)`` of :func:`scan` / :func:`plain` from the
    :class:`~tttla_jax.rules.lact.rule.LaCTInputs` ``x``, in the token-major chunk layout:
    ``[B, T, H, d]`` zero-padded to whole chunks is ``[B, N, C, H, d]`` by a reshape, and
    the updating chunks are moved to the front, ``[N − 1, B, C, H, d]`` (a copy of
    contiguous chunks, free for B = 1). The heads are swapped next to the batch inside the
    scan, one chunk at a time (in cache), instead of a whole-sequence transpose."""
    C, T = rule.chunk_size, x.k.shape[1]
    N = num_chunks(T, C)

    def chunks(a):
        a = pad_time(a, N * C)
        return a.reshape((a.shape[0], N, C) + a.shape[2:])

    qc = chunks(x.q)
    xs = tuple(jnp.moveaxis(a[:, :N - 1], 1, 0) for a in (qc,) + tuple(chunks(a) for a in (x.k, x.v) + x.lrs))
    return xs + (jnp.moveaxis(x.chunk_momentum[:, :, :N - 1], 2, 0),), qc[:, N - 1], x.state


def outputs(o_upd, o_last, T):
    """``o [B, T, H, dv]`` from :func:`scan`'s ``o_upd [N − 1, B, C, H, dv]`` and
    ``o_last [B, C, H, dv]``."""
    o = jnp.moveaxis(o_upd, 0, 1)
    o = o.reshape((o.shape[0], -1) + o.shape[3:])
    return jnp.concatenate([o, o_last], axis=1)[:, :T]


def _heads(x):
    """``[B, C, H, d]`` ↔ ``[B, H, C, d]``."""
    return jnp.swapaxes(x, 1, 2)


def _silu_parts(a):
    sig = jax.nn.sigmoid(a)
    return sig, a * sig, sig * (1.0 + a * (1.0 - sig))  # σ, silu(a), silu'(a)


def _mm(eq, x, y):
    return jnp.einsum(eq, x, y)


def _red(g, lr):
    """Cotangent of a learning rate ``[.., C, 1]`` (summed over channels) or ``[.., C, D]``."""
    return jnp.sum(g, axis=-1, keepdims=True) if lr.shape[-1] == 1 and g.shape[-1] != 1 else g


def _read(w, q):
    """``f(q)`` for ``q [B, C, H, dk]`` (token-major) → ``[B, C, H, dv]``."""
    W0, W1, W2 = w
    q = _heads(q)
    h = jax.nn.silu(_mm("bhck,bhdk->bhcd", q, W0)) * _mm("bhck,bhdk->bhcd", q, W2)
    return _heads(_mm("bhcd,bhvd->bhcv", h, W1))


def _read_bwd(w, q, go):
    """Cotangents ``(gW0, gW1, gW2), gq`` of :func:`_read` (token-major ``q``, ``go``, ``gq``)."""
    W0, W1, W2 = w
    q, go = _heads(q), _heads(go)
    Aq = _mm("bhck,bhdk->bhcd", q, W0)
    Bq = _mm("bhck,bhdk->bhcd", q, W2)
    _, sq, dsq = _silu_parts(Aq)
    gW1 = _mm("bhcv,bhcd->bhvd", go, sq * Bq)
    gh = _mm("bhcv,bhvd->bhcd", go, W1)
    gA = gh * Bq * dsq
    gB = gh * sq
    gq = _mm("bhcd,bhdk->bhck", gA, W0) + _mm("bhcd,bhdk->bhck", gB, W2)
    return (_mm("bhcd,bhck->bhdk", gA, q), gW1, _mm("bhcd,bhck->bhdk", gB, q)), _heads(gq)


def _md(rule):
    return None if rule.muon_dtype is None else jnp.dtype(rule.muon_dtype)


def _step(rule, s, xs):
    """One updating chunk: ``(state', o, (W̃, P))``, ``W̃ = W + U`` the weights before the
    weight norm, ``P`` Muon's input (None without Muon) — :meth:`LaCTRule.read` and
    :meth:`LaCTRule.inner_step` (:func:`~tttla_jax.rules.lact.fastnet.inner_grads`) for the
    supported configurations, with the products that share an operand done as one:
    ``[a b; Aq Bq] = [k; q] [W0; W2]ᵀ`` and, for per-token rates,
    ``[G0; G2] = [lr0 ⊙ da, lr2 ⊙ (u ⊙ silu(a))]ᵀ k``."""
    qi, k, v, lr0, lr1, lr2, mb = xs
    W0, W1, W2 = s.w
    C, dh = k.shape[1], W0.shape[2]
    cat = jnp.concatenate
    kq = _heads(cat([k, qi], axis=1))
    k, v, lr0, lr1, lr2 = kq[:, :, :C], _heads(v), _heads(lr0), _heads(lr1), _heads(lr2)
    AB = _mm("bhck,bhdk->bhcd", kq, cat([W0, W2], axis=2))
    a, b, Aq, Bq = AB[:, :, :C, :dh], AB[:, :, :C, dh:], AB[:, :, C:, :dh], AB[:, :, C:, dh:]
    o = _heads(_mm("bhcd,bhvd->bhcv", jax.nn.silu(Aq) * Bq, W1))
    sig, sa, ds = _silu_parts(a)
    u = _mm("bhcv,bhvd->bhcd", v, W1)  # W1ᵀ v
    G1 = _mm("bhcv,bhcd->bhvd", v, lr1 * (sa * b))
    da, usa = u * b * ds, u * sa
    if lr0.shape[-1] == 1 and lr2.shape[-1] == 1:
        G02 = _mm("bhcd,bhck->bhdk", cat([lr0 * da, lr2 * usa], axis=-1), k)
        G0, G2 = G02[:, :, :dh], G02[:, :, dh:]
    else:
        G0 = _mm("bhcd,bhck->bhdk", da, lr0 * k)
        G2 = _mm("bhcd,bhck->bhdk", usa, lr2 * k)
    sign = 1.0 if rule.ascent else -1.0
    dW = [sign * x for x in (G0, G1, G2)]
    mom = s.mom
    if rule.use_momentum:
        dW = [d + mb[:, :, None, None] * m for d, m in zip(dW, mom)]
        mom = tuple(dW)
    P = tuple(dW) if rule.muon else None
    if rule.muon:
        dW = [newton_schulz5(d, _md(rule)) for d in dW]
    Wt = tuple(w + d for w, d in zip(s.w, dW))
    if rule.weight_norm == "post":
        w = tuple(x / (row_norm(x) + WN_EPS) * n for x, n in zip(Wt, s.norm))
    else:
        w = Wt
    return s._replace(w=w, mom=mom), o, (Wt, P)


def _forward(rule, xs, q_last, state, keep):
    """The plain scan (differentiable by JAX); with ``keep`` also the weights and momentum
    buffers at every chunk start and the pre-norm weights ``W̃`` of every chunk."""
    def body(s, x):
        s_next, o, WtP = _step(rule, s, x)
        return s_next, (o, (s.w, s.mom, WtP) if keep else None)

    st, (o_upd, starts) = lax.scan(body, state, xs)
    return o_upd, _read(st.w, q_last), st, starts


def plain(rule, xs, q_last, state):
    """:func:`scan` without the custom backward (JAX differentiates the scan itself)."""
    return _forward(rule, xs, q_last, state, keep=False)[:3]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan(rule, xs, q_last, state):
    """``(o_upd, o_last, final_state)``: the updating chunks (``xs``, token-major chunks: q,
    k, v, lr0, lr1, lr2 ``[N−1, B, C, H, ·]`` and ᾱ ``[N−1, B, H]``, :func:`scan_inputs`),
    then the apply-only last chunk's read of ``q_last [B, C, H, dk]``, from the
    :class:`LaCTState` ``state``; ``o_upd [N−1, B, C, H, dv]``, ``o_last [B, C, H, dv]``."""
    o_upd, o_last, st, _ = _forward(rule, xs, q_last, state, keep=False)
    return o_upd, o_last, st


def _scan_fwd(rule, xs, q_last, state):
    o_upd, o_last, st, starts = _forward(rule, xs, q_last, state, keep=True)
    return (o_upd, o_last, st), (xs, q_last, starts, st.w, state.norm)


def _post_norm_bwd(g, Wt, n):
    r = row_norm(Wt)
    den = r + WN_EPS
    t = jnp.sum(g * Wt, axis=-1, keepdims=True)
    return g * (n / den) - Wt * (t * n / (den * den * r)), t / den


def _chunk_bwd(rule, w, mom, Wt, P, norm, x, go, gw, gmom):
    """Cotangents through one updating chunk: from those of its outputs ``go`` and of the
    state after it (``gw``, ``gmom``) to those of the state before it and of its inputs.

    Products that share an operand are done as one larger product on concatenated operands
    (keys and queries stacked along the tokens, W0 and W2 along the hidden units): nine
    products per chunk instead of 23, the same FLOPs."""
    qi, k, v, lr0, lr1, lr2, mb = x
    W0, W1, W2 = w
    C, dh = k.shape[1], W0.shape[2]
    cat = jnp.concatenate
    sign = 1.0 if rule.ascent else -1.0
    # token-major chunks → heads next to the batch (in cache, one chunk at a time)
    kq = _heads(cat([k, qi], axis=1))
    vg = _heads(cat([v, go], axis=1))
    k, v, lr0, lr1, lr2 = kq[:, :, :C], vg[:, :, :C], _heads(lr0), _heads(lr1), _heads(lr2)
    # recompute the chunk's activations: [a b; Aq Bq] = [k; q] [W0; W2]ᵀ, [u; ghq] = [v; go] W1
    W02 = cat([W0, W2], axis=2)
    AB = _mm("bhck,bhdk->bhcd", kq, W02)
    a, b, Aq, Bq = AB[:, :, :C, :dh], AB[:, :, :C, dh:], AB[:, :, C:, :dh], AB[:, :, C:, dh:]
    UG = _mm("bhcv,bhvd->bhcd", vg, W1)
    u, ghq = UG[:, :, :C], UG[:, :, C:]
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
        gmom_prev = tuple(mb[:, :, None, None] * gPi for gPi in gP)
        gmb = sum(jnp.sum(gPi * Mi, axis=(-2, -1)) for gPi, Mi in zip(gP, mom))
    else:
        gmom_prev, gmb = gmom, jnp.zeros_like(mb)
    gG0, gG1, gG2 = (sign * gPi for gPi in gP)
    # G1 = vᵀ(lr1 h), G0 = daᵀ(lr0 k), G2 = (u silu(a))ᵀ(lr2 k)
    g_lh = _mm("bhcv,bhvd->bhcd", v, gG1)
    gl1 = _red(g_lh * h, lr1)
    g_h = g_lh * lr1
    gG02 = cat([gG0, gG2], axis=2)
    if lr0.shape[-1] == 1 and lr2.shape[-1] == 1:  # per-token rates scale rows: fold them
        KG = _mm("bhck,bhdk->bhcd", k, gG02)  # [k gG0ᵀ, k gG2ᵀ]
        KG0, KG2 = KG[..., :dh], KG[..., dh:]
        g_da, g_usa = lr0 * KG0, lr2 * KG2
        gl0 = jnp.sum(da * KG0, axis=-1, keepdims=True)
        gl2 = jnp.sum(usa * KG2, axis=-1, keepdims=True)
        gk = _mm("bhcd,bhdk->bhck", cat([lr0 * da, lr2 * usa], axis=-1), gG02)
    else:
        lk0, lk2 = lr0 * k, lr2 * k
        g_da = _mm("bhck,bhdk->bhcd", lk0, gG0)
        g_usa = _mm("bhck,bhdk->bhcd", lk2, gG2)
        g_lk0 = _mm("bhcd,bhdk->bhck", da, gG0)
        g_lk2 = _mm("bhcd,bhdk->bhck", usa, gG2)
        gl0 = _red(g_lk0 * k, lr0)
        gl2 = _red(g_lk2 * k, lr2)
        gk = g_lk0 * lr0 + g_lk2 * lr2
    g_u = g_da * b * ds + g_usa * sa
    g_b = g_h * sa + g_da * u * ds
    dds = sig * (1.0 - sig) * (2.0 + a * (1.0 - 2.0 * sig))  # silu''(a)
    g_a = (g_h * b + g_usa * u) * ds + g_da * u * b * dds
    gv = _mm("bhcd,bhvd->bhcv", cat([lh, g_u], axis=-1), cat([gG1, W1], axis=-1))
    # the read o = hq W1ᵀ, hq = silu(Aq) ⊙ Bq
    _, sq, dsq = _silu_parts(Aq)
    gAB = cat([cat([g_a, g_b], axis=-1), cat([ghq * Bq * dsq, ghq * sq], axis=-1)], axis=2)
    GKQ = _mm("bhcd,bhdk->bhck", gAB, W02)  # [gk; gq] through a, b, Aq, Bq
    gk = gk + GKQ[:, :, :C]
    gq = GKQ[:, :, C:]
    gW02 = _mm("bhcd,bhck->bhdk", gAB, kq)
    gW1 = _mm("bhcv,bhcd->bhvd", vg, cat([g_u, sq * Bq], axis=2))
    gW0 = gW[0] + gW02[:, :, :dh]
    gW1 = gW[1] + gW1
    gW2 = gW[2] + gW02[:, :, dh:]
    gn = tuple(gn) if rule.weight_norm == "post" else None
    gx = tuple(_heads(g) for g in (gq, gk, gv, gl0, gl1, gl2))
    return (gW0, gW1, gW2), gmom_prev, gn, gx + (gmb,)


def _zeros_like_tree(t):
    return jax.tree_util.tree_map(jnp.zeros_like, t)


def _scan_bwd(rule, res, cts):
    xs, q_last, starts, w_final, norm = res
    go_upd, go_last, gst = cts
    (rW0, rW1, rW2), gq_last = _read_bwd(w_final, q_last, go_last)
    gw = (gst.w[0] + rW0, gst.w[1] + rW1, gst.w[2] + rW2)
    gmom = gst.mom if rule.use_momentum else None
    gn0 = _zeros_like_tree(norm) if norm is not None else None

    def body(carry, inp):
        gw, gmom, gn = carry
        x, (w, mom, (Wt, P)), go = inp
        gw, gmom, gnc, gx = _chunk_bwd(rule, w, mom, Wt, P, norm, x, go, gw, gmom)
        if gn is not None:
            gn = tuple(a + b for a, b in zip(gn, gnc))
        return (gw, gmom, gn), gx

    (gw, gmom, gn), gxs = lax.scan(body, (gw, gmom, gn0), (xs, starts, go_upd), reverse=True)
    if gn is not None:  # the cotangent of the (unchanging) norms also reaches the final state
        gn = tuple(a + b for a, b in zip(gn, gst.norm))
    gstate = type(gst)(w=gw, main=None, mom=gmom, norm=gn)
    return gxs, gq_last, gstate


scan.defvjp(_scan_fwd, _scan_bwd)
