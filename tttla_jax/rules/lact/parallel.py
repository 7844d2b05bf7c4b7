"""LaCT's parallel forms for static φ and no weight norm (ladder V2–V6; docs/ladder.md,
docs/ttt_as_linear_attention.md).

When only W1 updates and nothing renormalises it, φ(q), φ(k) do not depend on the state, so
every chunk's sum ``G_i = Σ_{t∈i} lr1_t (±v_t)ᵀ φ(k_t)`` is known up front; what is left are
three linear recurrences over chunks — momentum ``M_i = ᾱ_i M_{i−1} + G_i``, per-chunk
``U_i = NS5(M_i)`` (Muon) or ``M_i``, the exclusive prefix sum ``S_c = W1_0 + Σ_{i<c} U_i``
(``i ≤ c`` for ``order="update_then_query"``) — and the reads ``o = φ(q) S_cᵀ``. Two layouts
of the same arithmetic (:meth:`LaCTRule.parallel <tttla_jax.rules.lact.LaCTRule.parallel>`):

* :func:`chunked` — one fused ``lax.scan`` over chunks computes φ of the chunk, G_i, the
  recurrences and the read of each chunk. On XLA:CPU this is the fast layout: every block is
  cache-resident when it is used. Measured slower here: φ hoisted for all tokens (XLA runs
  the four large φ dots concurrently on two cores and streams ``[T, dh]`` temporaries;
  0.95–1.0x of the recurrent form instead of 1.03–1.08x), G for all chunks in one dot, a
  batched NS over every chunk, or an exclusive cumsum of stacked states.
* :func:`associative` — φ for all tokens in one dot per head, every G_i in one batched dot,
  the momentum as a ``lax.associative_scan`` over ``(ᾱ_i, G_i)`` pairs, NS5 batched over all
  chunks, the prefix sum as a ``cumsum`` and the reads as one batched dot — log-depth, for
  accelerators with parallelism to fill (the paper's parallel form). Holds one ``[dv, dh]``
  matrix per chunk and head at once.

Without momentum (ladder V5) each ``U_i = NS5(G_i)`` runs on the rank-C factors of ``G_i``
when that needs fewer FLOPs (:func:`~tttla_jax.rules.lact.muon.newton_schulz5_factored`;
chunks shorter than about half the head dim), in both layouts; the recurrent form keeps
the dense NS5.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from tttla_jax.rules.lact import muon
from tttla_jax.rules.lact.fastnet import features


def scan_layout(x, C, N):
    """``[B, T, H, ...]`` → ``[N, B, H, C, ...]``, zero-padding the tokens to ``N·C``."""
    B, T, H = x.shape[:3]
    if T != N * C:
        x = jnp.pad(x, [(0, 0), (0, N * C - T)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((B, N, C, H) + x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))


def unscan_layout(x, T):
    """Inverse of :func:`scan_layout`: ``[N, B, H, C, ...]`` → ``[B, T, H, ...]``."""
    N, B, H, C = x.shape[:4]
    return jnp.moveaxis(x, (0, 2), (1, 3)).reshape((B, N * C, H) + x.shape[4:])[:, :T]


def parallel_form(rule, x, impl: str, carry=None):
    """The parallel form of ``rule`` (an associative :class:`LaCTRule`) on prepared inputs
    ``x`` (:meth:`LaCTRule.prepare`) in layout ``impl`` (``"chunked"`` | ``"associative"``).

    ``carry`` (sequence parallelism, :mod:`tttla_jax.parallel.combine`; apply-then-update,
    ``impl="associative"``, ``T`` a multiple of the chunk): a pair of functions
    ``(momentum_in, w1_in)``. This slice is then a middle piece of a longer sequence: its last
    chunk updates too (for the pieces after it), the momentum entering it is
    ``momentum_in(A, X)`` with ``(A, X)`` the slice's momentum transform from zero
    (``M ↦ A M + X`` over all its chunks) and the W1 entering it is ``w1_in(Σ_i U_i)`` with
    the slice's own chunk updates — so every chunk's ``NS5`` runs once. The returned W1 and
    momentum are still those before the last chunk.

    Returns ``(o, w1, mom1)``: ``o [B, T, H, dv]`` in the computation dtype, the final W1
    ``[B, H, dv, dh]`` and the final W1 momentum buffer (``None`` without momentum).
    """
    q, k, v, lrs, st = x.q, x.k, x.v, x.lrs, x.state
    B, T, H, K = k.shape
    C = rule.chunk_size
    N = -(-T // C)
    net = rule.fast_net
    W1_0 = st.w[1]
    sign = 1.0 if rule.ascent else -1.0
    apply_first = rule.order == "apply_then_update"
    n_upd = N - 1 if apply_first else N  # updating chunks (the last one only reads in apply-then-update)
    if carry is not None:
        if not (apply_first and impl == "associative" and T == N * C):
            raise ValueError("carry: needs order='apply_then_update', impl='associative' and T a multiple of "
                             f"chunk_size, got order={rule.order!r}, impl={impl!r}, T={T}, chunk_size={C}")
        n_upd = N  # the slice's last chunk updates the state handed to the next slice
    lay = lambda a: scan_layout(a, C, N)  # noqa: E731  [B, T, H, ...] -> [N, B, H, C, ...]
    phi = lambda a: features(st.w, a, net)  # noqa: E731  φ with the static W0, W2 (identity if linear)
    read = lambda a, S: jnp.einsum("bhcd,bhvd->bhcv", phi(a), S)  # noqa: E731
    use_mom = rule.use_momentum
    M0 = st.mom[1] if use_mom else None
    qs = lay(q)                                               # [N, B, H, C, dk]
    if n_upd == 0 and carry is None:
        return unscan_layout(read(qs[0], W1_0)[None], T), W1_0, M0
    ks, l1s, sv = lay(k)[:n_upd], lay(lrs[1])[:n_upd], sign * lay(v)[:n_upd]  # lr1 is 0 on padding
    abar = jnp.moveaxis(x.chunk_momentum, 2, 0)[:n_upd]      # [n, B, H] chunk means ᾱ_i
    md = None if rule.muon_dtype is None else jnp.dtype(rule.muon_dtype)
    ns = rule.muon
    # Without momentum, U_i = NS5(G_i) and G_i = (±V_i)ᵀ (lr1 ⊙ φ(K_i)) has rank ≤ C: NS5 runs on
    # the factors when that is cheaper (same math).
    low_rank = (ns and not use_mom and (md is None or md == x.dtype)
                and muon.low_rank_ns_pays(v.shape[-1], W1_0.shape[-1], C))
    sw = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731

    if impl == "chunked":
        def step(carry, xs):
            M, S = carry
            qc, kc, l1, svc, a = xs
            if apply_first:
                o = read(qc, S)
            pkc = l1 * phi(kc)
            if low_rank:
                S = S + muon.newton_schulz5_factored(sw(svc), pkc)
            else:
                g = jnp.einsum("bhcv,bhcd->bhvd", svc, pkc)
                M = a[..., None, None] * M + g if use_mom else g
                S = S + (muon.newton_schulz5(M, md) if ns else M)
            if not apply_first:
                o = read(qc, S)
            return (M, S), o

        M_init = M0 if use_mom else jnp.zeros_like(W1_0)
        (M_last, new_w1), o = lax.scan(step, (M_init, W1_0), (qs[:n_upd], ks, l1s, sv, abar))
    elif impl == "associative":
        def phi_all(xs):  # [n, B, H, C, dk] -> [n, B, H, C, dh]: one large dot per head
            n = xs.shape[0]
            xb = jnp.moveaxis(xs, 0, 2).reshape(B, H, n * C, K)
            return jnp.moveaxis(phi(xb).reshape(B, H, n, C, -1), 2, 0)

        pk = l1s * phi_all(ks)
        G = None if low_rank else jnp.einsum("nbhcv,nbhcd->nbhvd", sv, pk)  # [n, B, H, dv, dh]
        if use_mom:
            # M_i = ᾱ_i M_{i−1} + G_i  ⇔  (A_i, X_i) = (ᾱ_i, G_i) ∘ … with
            # (a1, X1) ∘ (a2, X2) = (a1·a2, a2·X1 + X2); then M_i = A_i M_0 + X_i.
            def combine(x1, x2):
                (a1, X1), (a2, X2) = x1, x2
                return a1 * a2, a2[..., None, None] * X1 + X2

            A, X = lax.associative_scan(combine, (abar, G))
            if carry is not None:
                M0 = carry[0](A[-1], X[-1])
            Ms = A[..., None, None] * M0 + X
        else:
            Ms = G
        if low_rank:
            U = muon.newton_schulz5_factored(sw(sv), pk)
        else:
            U = muon.newton_schulz5(Ms, md) if ns else Ms
        if carry is not None:
            W1_0 = carry[1](jnp.sum(U, axis=0))
        S_incl = W1_0 + jnp.cumsum(U, axis=0)                   # S after chunk i's update
        M_last, new_w1 = (None if Ms is None else Ms[-1]), S_incl[-1]
        S_read = jnp.concatenate([W1_0[None], S_incl[:-1]], axis=0) if apply_first else S_incl
        o = jnp.einsum("nbhcd,nbhvd->nbhcv", phi_all(qs[:n_upd]), S_read)
        if carry is not None:  # the state before the last chunk, as without carry
            M_last = None if Ms is None else (Ms[-2] if N > 1 else M0)
            return unscan_layout(o, T), S_read[-1], (M_last if use_mom else None)
    else:  # pragma: no cover - LaCTRule.parallel validates impl
        raise ValueError(f"impl: got {impl!r}, expected 'chunked' or 'associative'")
    if apply_first:  # the last chunk only reads
        o = jnp.concatenate([o, read(qs[N - 1], new_w1)[None]], axis=0)
    return unscan_layout(o, T), new_w1, (M_last if use_mom else None)
