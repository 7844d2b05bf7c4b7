"""Muon's orthogonalisation for LaCT updates: Newton–Schulz, five iterations (docs/rules/lact.md, step 5).

``NS5(G)``: transpose if rows > cols; ``X = G / (‖G‖_F + 1e-7)``; five iterations
``A = X Xᵀ; X = a·X + (b·A + c·A A) X`` with the reference's coefficients (a, b, c) per
iteration (:data:`NS5_COEFFS`); transpose back. :func:`newton_schulz5` is the dense form
(optionally with the reference's bfloat16 rounding); :func:`newton_schulz5_factored` computes
the same matrix from rank-n factors ``G = P Q`` when that needs fewer FLOPs
(:func:`low_rank_ns_pays`), which the parallel forms use for one chunk's rank-C gradient.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from tttla_jax.rules._numerics import safe_den, sqrt0

#: (a, b, c) of the five Newton–Schulz iterations (the reference's coefficients).
NS5_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

_NS_EPS = 1e-7  # X = G / (‖G‖_F + 1e-7)


def newton_schulz5(G: Float[Array, "... r c"], dtype=None) -> Float[Array, "... r c"]:
    """Muon orthogonalisation NS5 (docs/rules/lact.md step 5) over the last two axes.

    Transpose if rows > cols; ``X = X / (‖X‖_F + 1e-7)``; five iterations
    ``A = X Xᵀ; B = b·A + (c·A)·A; X = a·X + B X`` with the reference coefficients;
    transpose back. ``dtype=None`` computes in ``G``'s dtype. ``dtype="bfloat16"`` mimics the
    reference: the input is rounded to bfloat16 and every op's result is rounded to
    bfloat16 (matmuls take bfloat16 operands, accumulate in float32, then round — native
    bfloat16 dots where the CPU has them; the coefficients multiply in float32, as PyTorch's
    ``scalar * tensor`` does, before the one rounding), so it matches the reference's
    bfloat16 NS5 up to the summation order inside a dot. Output dtype is ``G``'s.
    """
    out_dtype = G.dtype
    X = G
    transposed = G.shape[-2] > G.shape[-1]
    if transposed:
        X = jnp.swapaxes(X, -1, -2)
    if dtype is None or jnp.dtype(dtype) == out_dtype:
        X = X / (sqrt0(jnp.sum(X * X, axis=(-2, -1), keepdims=True)) + _NS_EPS)

        def it(X, abc):  # one iteration; a lax.scan over the 5 coefficient rows keeps the graph small
            a, b, c = abc[0], abc[1], abc[2]
            A = jnp.einsum("...ij,...kj->...ik", X, X)
            Bm = b * A + jnp.einsum("...ij,...jk->...ik", c * A, A)
            return a * X + jnp.einsum("...ij,...jk->...ik", Bm, X), None

        X, _ = lax.scan(it, X, jnp.asarray(NS5_COEFFS, X.dtype))
    else:
        lo = jnp.dtype(dtype)
        f32 = jnp.float32
        fi = jnp.finfo(lo)

        def r(x):  # round to the low precision, value kept in float32 (reduce_precision is
            # never simplified away by XLA, unlike a float32 -> bfloat16 -> float32 convert pair)
            return lax.reduce_precision(x.astype(f32), exponent_bits=fi.nexp, mantissa_bits=fi.nmant)

        def mm(x, y, eq):  # low-precision matmul: low-precision operands (exact: x, y are
            # already rounded), float32 accumulation, rounded result; a native bfloat16 dot
            # where the CPU has one (up to twice the float32 rate)
            return r(jnp.einsum(eq, x.astype(lo), y.astype(lo), preferred_element_type=f32))

        X = r(X)
        nrm = r(sqrt0(jnp.sum(X * X, axis=(-2, -1), keepdims=True)))
        X = r(X / r(nrm + _NS_EPS))
        for a, b, c in NS5_COEFFS:
            # the coefficients stay float32 (PyTorch computes `scalar * bf16 tensor` in float32
            # and rounds the product once)
            A = mm(X, X, "...ij,...kj->...ik")
            Bm = r(r(b * A) + mm(r(c * A), A, "...ij,...jk->...ik"))
            X = r(r(a * X) + mm(Bm, X, "...ij,...jk->...ik"))
        X = X.astype(out_dtype)
    if transposed:
        X = jnp.swapaxes(X, -1, -2)
    return X


def newton_schulz5_factored(P: Float[Array, "... r n"], Q: Float[Array, "... n c"]) -> Float[Array, "... r c"]:
    """``newton_schulz5(P @ Q)`` computed through the rank-``n`` factors (same math, fewer FLOPs
    when ``n`` is small, e.g. one chunk's gradient ``G = Vᵀ Φ`` with C tokens < d).

    Every NS5 iterate of ``X = P Q`` keeps the form ``X_j = P_j Q``: with ``K = Q Qᵀ`` and
    ``M_j = P_jᵀ P_j`` (both n×n), ``A = X Xᵀ = P K Pᵀ`` and
    ``(b·A + c·A²) X = P (b·K M + c·(K M)²) Q``, so
    ``P_{j+1} = P_j (a·I + b·K M_j + c·(K M_j)²)``; the Frobenius norm is
    ``‖X‖² = Σ K ⊙ M``. Cost per iteration ``4rn² + 4n³`` instead of ``4r²c + 2r³``
    (r ≤ c after the same transposition rule as :func:`newton_schulz5`). Computes in the
    inputs' dtype (no low-precision mimicry: use :func:`newton_schulz5` for that).
    """
    transposed = P.shape[-2] > Q.shape[-1]
    if transposed:  # Xᵀ = Qᵀ Pᵀ
        P, Q = jnp.swapaxes(Q, -1, -2), jnp.swapaxes(P, -1, -2)
    K = jnp.einsum("...ic,...jc->...ij", Q, Q)
    gram = lambda P: jnp.einsum("...ri,...rj->...ij", P, P)  # noqa: E731
    nrm = sqrt0(jnp.sum(K * gram(P), axis=(-2, -1), keepdims=True))
    P = P / (nrm + _NS_EPS)
    eye = jnp.eye(K.shape[-1], dtype=K.dtype)

    def it(P, abc):
        a, b, c = abc[0], abc[1], abc[2]
        KM = jnp.einsum("...ij,...jk->...ik", K, gram(P))
        poly = a * eye + b * KM + c * jnp.einsum("...ij,...jk->...ik", KM, KM)
        return jnp.einsum("...ri,...ij->...rj", P, poly), None

    P, _ = lax.scan(it, P, jnp.asarray(NS5_COEFFS, P.dtype))
    X = jnp.einsum("...ri,...ic->...rc", P, Q)
    return jnp.swapaxes(X, -1, -2) if transposed else X


def low_rank_ns_pays(rows: int, cols: int, n: int) -> bool:
    """Whether :func:`newton_schulz5_factored` does fewer FLOPs than the dense NS5 for a
    ``rows × cols`` matrix of rank ≤ ``n`` (five iterations plus set-up and the final product)."""
    r, c = min(rows, cols), max(rows, cols)
    dense = 5 * (4 * r * r * c + 2 * r ** 3)
    factored = 5 * (4 * r * n * n + 4 * n ** 3) + 2 * n * n * c + 2 * r * n * c
    return factored < dense


def newton_schulz5_vjp(G: Float[Array, "... r c"], g: Float[Array, "... r c"], dtype=None) -> Float[Array, "... r c"]:
    """The cotangent of ``G`` for the cotangent ``g`` of ``newton_schulz5(G, dtype)``, by hand.

    Recomputes the five iterates (with :func:`newton_schulz5`'s roundings when ``dtype`` is a
    lower precision) and runs the iterations backwards: for ``X' = a·X + B X``,
    ``B = b·A + c·A A``, ``A = X Xᵀ`` (A and B symmetric),

        g_B = g Xᵀ,   M = g_B + g_Bᵀ,   g_X = a·g + B g + (b·M + c·(M A + A M)) X,

    four matrix products per iteration (three to recompute it); then the normalisation
    ``X = G / (‖G‖_F + ε)``. With ``dtype`` in ``G``'s precision this is the exact gradient
    (the same as differentiating :func:`newton_schulz5`). With a lower ``dtype`` (the
    reference's bfloat16) the roundings are treated as the identity (straight through) and
    the backward products take operands in ``dtype`` with float32 accumulation — the
    precision of the forward's products, as the reference's bfloat16 autograd does.
    """
    out_dtype = G.dtype
    transposed = G.shape[-2] > G.shape[-1]
    if transposed:
        G, g = jnp.swapaxes(G, -1, -2), jnp.swapaxes(g, -1, -2)
    exact = dtype is None or jnp.dtype(dtype) == out_dtype
    if exact:
        r = lambda x: x  # noqa: E731

        def mm(x, y, eq):
            return jnp.einsum(eq, x, y)
        bmm = mm
        X = G
    else:
        lo = jnp.dtype(dtype)
        f32 = jnp.promote_types(jnp.float32, out_dtype)
        fi = jnp.finfo(lo)

        def r(x):
            return lax.reduce_precision(x.astype(f32), exponent_bits=fi.nexp, mantissa_bits=fi.nmant)

        def mm(x, y, eq):  # the forward's product: operands exact in lo, rounded result
            return r(jnp.einsum(eq, x.astype(lo), y.astype(lo), preferred_element_type=f32))

        def bmm(x, y, eq):  # backward products: operands in lo, float32 accumulation
            return jnp.einsum(eq, x.astype(lo), y.astype(lo), preferred_element_type=f32)
        X = r(G)
        g = g.astype(f32)
    nrm = r(sqrt0(jnp.sum(X * X, axis=(-2, -1), keepdims=True)))
    den = r(nrm + _NS_EPS)
    X0 = r(X / den)
    trace = []
    Xj = X0
    for a, b, c in NS5_COEFFS:
        A = mm(Xj, Xj, "...ij,...kj->...ik")
        Bm = r(r(b * A) + mm(r(c * A), A, "...ij,...jk->...ik"))
        trace.append((Xj, A, Bm))
        Xj = r(r(a * Xj) + mm(Bm, Xj, "...ij,...jk->...ik"))
    for (Xj, A, Bm), (a, b, c) in zip(reversed(trace), reversed(NS5_COEFFS)):
        gB = bmm(g, Xj, "...ij,...kj->...ik")
        M = gB + jnp.swapaxes(gB, -1, -2)
        MA = bmm(M, A, "...ij,...jk->...ik")
        S = b * M + c * (MA + jnp.swapaxes(MA, -1, -2))
        g = a * g + bmm(Bm, g, "...ji,...jk->...ik") + bmm(S, Xj, "...ij,...jk->...ik")
    # X0 = X / (‖X‖ + ε)
    gX = g / den - X * (jnp.sum(g * X, axis=(-2, -1), keepdims=True) / (den * den * safe_den(nrm)))
    gX = gX.astype(out_dtype)
    return jnp.swapaxes(gX, -1, -2) if transposed else gX
