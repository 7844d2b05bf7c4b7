"""LaCT: large-chunk test-time training with SwiGLU fast weights (docs/rules/lact.md), and its
parallel (linear-attention) forms where the math allows (docs/ttt_as_linear_attention.md, docs/ladder.md).

Fast weights per (batch, head), stored output-major as in the reference:
``W0, W2 ∈ [dh, dk]``, ``W1 ∈ [dv, dh]``; for a column x,
``f(x) = W1 (silu(W0 x) ⊙ (W2 x))``. With ``fast_net="linear"``: ``f(x) = W1 x``,
``W1 ∈ [dv, dk]`` (ladder V3+). In the library's row layout a token ``x [dk]`` gives
``h = silu(x W0ᵀ) ⊙ (x W2ᵀ)`` and ``f = h W1ᵀ``.

Schedule (docs/rules/lact.md, "apply, then update"): chunk c's queries read the weights before
chunk c's update; chunk starts strictly below ``T − C`` update; the last chunk (full or
partial) is apply-only. Per updating chunk: gradient ascent on
``Σ_i lr_x[i] ⟨f(k_i), v_i⟩`` separately per matrix, in closed form
(:func:`inner_grads`):

    dW1 = Σ_i v_i (lr1_i ⊙ h_i)ᵀ,     u_i = W1ᵀ v_i,
    dW0 = Σ_i (u_i ⊙ b_i ⊙ silu'(a_i)) (lr0_i ⊙ k_i)ᵀ,   dW2 = Σ_i (u_i ⊙ silu(a_i)) (lr2_i ⊙ k_i)ᵀ,

with ``a = W0 k``, ``b = W2 k``, ``silu'(a) = σ(a)(1 + a(1 − σ(a)))``; then chunk-mean
momentum ``dW ← dW + mean(m)·dW_prev`` (buffer = post-momentum, pre-Muon dW), Muon NS5,
``W ← W + dW`` and weight norm (post: rows rescaled to their initial norm; pre: an
unnormalised accumulator ``W_main`` and a normalised working copy).

Parallel form (update only W1, no weight norm: φ is static and the update is a sum):
φ(q), φ(k) do not depend on the state, so every chunk's sum
``G_i = Σ_{t∈i} lr1_t v_tᵀ φ(k_t)`` is known up front; what is left are three linear
recurrences — momentum ``M_i = ᾱ_i M_{i−1} + G_i``, per-chunk ``U_i = NS5(M_i)`` (Muon),
exclusive prefix sum ``S_c = W1_0 + Σ_{i<c} U_i`` — and the reads ``o = φ(q) S_cᵀ``
(docs/ladder.md). On XLA:CPU φ, the sums, recurrences and reads run as one fused ``lax.scan``
over chunks (cache-resident; hoisting φ or G over all chunks, or a batched NS over all
chunks, measured slower here); for accelerators the same arithmetic is laid out as an
associative scan, a batched NS and a cumsum (``impl="associative"``).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from tttla_jax import _checks
from tttla_jax.ops.linear_attention import chunk_layout, unchunk_layout
from tttla_jax.rules.base import NotAssociativeError, Rule, register

NS5_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

FAST_NETS = ("swiglu", "linear")
UPDATES = ("all", "w1")
WEIGHT_NORMS = ("post", "pre", None)
ORDERS = ("apply_then_update", "update_then_query")
IMPLS = ("auto", "recurrent", "parallel", "chunked", "associative")
PARALLEL_IMPLS = ("auto", "chunked", "associative")
MUON_DTYPES = (None, "bfloat16", "float32", "float64")

_WN_EPS = 1e-5
_NS_EPS = 1e-7


class LaCTState(NamedTuple):
    """Fast-weight state carried across chunks (and across calls, e.g. when decoding).

    All arrays ``[B, H, rows, cols]`` (``norm``: ``[B, H, rows, 1]``). Entries for W0/W2
    are ``None`` with ``fast_net="linear"``.

    Attributes:
      w: working fast weights ``(w0, w1, w2)`` — the ones applied to queries.
      main: pre-norm accumulators ``W_main`` (``weight_norm="pre"``), else ``None``.
      mom: momentum buffers (post-momentum, pre-Muon dW), else ``None``.
      norm: initial row norms ``‖W^(0)‖_row`` used by weight norm, else ``None``.
    """

    w: Tuple
    main: Optional[Tuple] = None
    mom: Optional[Tuple] = None
    norm: Optional[Tuple] = None


# --------------------------------------------------------------------------- building blocks


def _row_norm(W):
    return jnp.sqrt(jnp.sum(W * W, axis=-1, keepdims=True))


def newton_schulz5(G: Float[Array, "... r c"], dtype=None) -> Float[Array, "... r c"]:
    """Muon orthogonalisation NS5 (docs/rules/lact.md step 5) over the last two axes.

    Transpose if rows > cols; ``X = X / (‖X‖_F + 1e-7)``; five iterations
    ``A = X Xᵀ; B = b·A + (c·A)·A; X = a·X + B X`` with the reference coefficients;
    transpose back. ``dtype=None`` computes in ``G``'s dtype. ``dtype="bfloat16"`` mimics the
    reference: the input is rounded to bfloat16 and every op's result is rounded to
    bfloat16 (matmuls accumulate in float32, then round). Output dtype is ``G``'s.
    """
    out_dtype = G.dtype
    X = G
    transposed = G.shape[-2] > G.shape[-1]
    if transposed:
        X = jnp.swapaxes(X, -1, -2)
    if dtype is None or jnp.dtype(dtype) == out_dtype:
        X = X / (jnp.sqrt(jnp.sum(X * X, axis=(-2, -1), keepdims=True)) + _NS_EPS)

        def it(X, abc):  # one iteration; a lax.scan over the 5 coefficient rows keeps the graph small
            a, b, c = abc[0], abc[1], abc[2]
            A = jnp.einsum("...ij,...kj->...ik", X, X)
            Bm = b * A + jnp.einsum("...ij,...jk->...ik", c * A, A)
            return a * X + jnp.einsum("...ij,...jk->...ik", Bm, X), None

        X, _ = lax.scan(it, X, jnp.asarray(NS5_COEFFS, X.dtype))
    else:
        lo = jnp.dtype(dtype)
        f32 = jnp.float32

        def r(x):  # round to the low precision
            return x.astype(lo)

        def mm(x, y, eq):  # low-precision matmul: f32 accumulation, rounded result
            return r(jnp.einsum(eq, x.astype(f32), y.astype(f32)))

        X = r(X)
        nrm = r(jnp.sqrt(jnp.sum(X.astype(f32) ** 2, axis=(-2, -1), keepdims=True)))
        X = r(X / r(nrm + jnp.asarray(_NS_EPS, lo)))
        for a, b, c in NS5_COEFFS:
            a, b, c = (jnp.asarray(z, lo) for z in (a, b, c))
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
    nrm = jnp.sqrt(jnp.sum(K * gram(P), axis=(-2, -1), keepdims=True))
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


def _low_rank_ns_pays(rows: int, cols: int, n: int) -> bool:
    """Whether :func:`newton_schulz5_factored` does fewer FLOPs than the dense NS5 for a
    ``rows × cols`` matrix of rank ≤ ``n`` (five iterations plus set-up and the final product)."""
    r, c = min(rows, cols), max(rows, cols)
    dense = 5 * (4 * r * r * c + 2 * r ** 3)
    factored = 5 * (4 * r * n * n + 4 * n ** 3) + 2 * n * n * c + 2 * r * n * c
    return factored < dense


def features(Ws, x, fast_net):
    """φ(x): ``h = silu(x W0ᵀ) ⊙ (x W2ᵀ)`` (swiglu) or ``x`` (linear); x ``[B, H, C, dk]``."""
    if fast_net == "linear":
        return x
    W0, _, W2 = Ws
    return jax.nn.silu(jnp.einsum("bhck,bhdk->bhcd", x, W0)) * jnp.einsum("bhck,bhdk->bhcd", x, W2)


def apply_fast(Ws, x, fast_net):
    """``f(x) = φ(x) W1ᵀ`` for a chunk of row vectors ``x [B, H, C, dk]`` → ``[B, H, C, dv]``."""
    return jnp.einsum("bhcd,bhvd->bhcv", features(Ws, x, fast_net), Ws[1])


def inner_grads(Ws, k, v, lrs, fast_net, which):
    """Closed-form ``∂/∂W_x Σ_i lr_x[i] ⟨f(k_i), v_i⟩`` for the matrices in ``which`` (docs/rules/lact.md step 3).

    ``k [B, H, C, dk]``, ``v [B, H, C, dv]``, ``lrs = (lr0, lr1, lr2)`` each ``[B, H, C, 1]``
    (per token) or ``[B, H, C, D]`` (per input channel of that matrix). Returns a tuple
    ``(dW0, dW1, dW2)`` with ``None`` for matrices not in ``which``.
    """
    lr0, lr1, lr2 = lrs
    if fast_net == "linear":
        return (None, jnp.einsum("bhcv,bhck->bhvk", v, lr1 * k), None)
    W0, W1, W2 = Ws
    a = jnp.einsum("bhck,bhdk->bhcd", k, W0)
    b = jnp.einsum("bhck,bhdk->bhcd", k, W2)
    sig = jax.nn.sigmoid(a)
    sa = a * sig
    h = sa * b
    dW1 = jnp.einsum("bhcv,bhcd->bhvd", v, lr1 * h) if 1 in which else None
    dW0 = dW2 = None
    if 0 in which or 2 in which:
        u = jnp.einsum("bhcv,bhvd->bhcd", v, W1)  # W1ᵀ v
        if 0 in which:
            da = u * b * sig * (1.0 + a * (1.0 - sig))
            dW0 = jnp.einsum("bhcd,bhck->bhdk", da, lr0 * k)
        if 2 in which:
            dW2 = jnp.einsum("bhcd,bhck->bhdk", u * sa, lr2 * k)
    return (dW0, dW1, dW2)


# --------------------------------------------------------------------------- the rule config


@dataclasses.dataclass(frozen=True)
class LaCTRule(Rule):
    """LaCT fast-weight rule (docs/rules/lact.md) and the knobs of the paper's ladder (docs/ladder.md).

    Attributes:
      chunk_size: C, tokens per update (the reference uses 2048).
      fast_net: "swiglu" (``f(x) = W1(silu(W0 x) ⊙ W2 x)``) or "linear" (``f(x) = W1 x``).
      update: "all" (W0, W1, W2) or "w1" (only the last layer; W0/W2 are frozen: neither
        updated nor re-normalised, so φ is static).
      weight_norm: "post" (reference), "pre" or None.
      use_momentum: chunk-mean momentum (needs the ``momentum`` input ``[B, T, H]``).
      muon: apply NS5 to each update.
      muon_dtype: None (NS in the computation dtype) or "bfloat16" (reference rounding).
      ascent: True = the reference update ``W ← W + lr ∇⟨f(k), v⟩``; False flips its sign
        (equivalently: the values are negated).
      q_is_k: outputs read the keys (``f(k)``) instead of the queries (paper anomaly).
      inner_steps: gradient steps per chunk; each step recomputes the gradient at the
        current weights and applies momentum, Muon, the update and weight norm.
      order: "apply_then_update" (reference) or "update_then_query" (every chunk, the last
        included, updates; its queries then read the updated weights, as Theorem 5.1).
      constant_lr: if set, the ``lr`` argument is ignored and every token uses this value
        for every matrix (ladder V4+: "no per-token lr").
    """

    chunk_size: int = 2048
    fast_net: str = "swiglu"
    update: str = "all"
    weight_norm: Optional[str] = "post"
    use_momentum: bool = False
    muon: bool = False
    muon_dtype: Optional[str] = None
    ascent: bool = True
    q_is_k: bool = False
    inner_steps: int = 1
    order: str = "apply_then_update"
    constant_lr: Optional[float] = None

    def __post_init__(self):
        _checks.check_positive_int("chunk_size", self.chunk_size)
        _checks.check_choice("fast_net", self.fast_net, FAST_NETS)
        _checks.check_choice("update", self.update, UPDATES)
        _checks.check_choice("weight_norm", self.weight_norm, WEIGHT_NORMS)
        _checks.check_choice("order", self.order, ORDERS)
        _checks.check_positive_int("inner_steps", self.inner_steps)
        md = self.muon_dtype
        if md is not None and not isinstance(md, str):
            try:
                md = jnp.dtype(md).name
            except TypeError:
                pass
            object.__setattr__(self, "muon_dtype", md)
        _checks.check_choice("muon_dtype", self.muon_dtype, MUON_DTYPES)
        if self.constant_lr is not None and not isinstance(self.constant_lr, (int, float)):
            raise ValueError(f"constant_lr: expected a Python float or None, got {self.constant_lr!r}")

    # ----------------------------------------------------------------- properties
    @property
    def linear(self) -> bool:
        return self.fast_net == "linear"

    @property
    def updated(self) -> Tuple[int, ...]:
        """Indices of the matrices that are updated (0, 1, 2 = W0, W1, W2)."""
        return (1,) if (self.linear or self.update == "w1") else (0, 1, 2)

    @property
    def matrices(self) -> Tuple[int, ...]:
        return (1,) if self.linear else (0, 1, 2)

    def breaks_associativity(self) -> Optional[str]:
        if 0 in self.updated:
            return ("update='all' updates W0 and W2, so the feature map φ(x) = silu(x W0ᵀ) ⊙ (x W2ᵀ) "
                    "changes with history (a time-varying feature map): the update is not a "
                    "sum over chunks (docs/ttt_as_linear_attention.md)")
        if self.weight_norm is not None:
            return (f"weight_norm={self.weight_norm!r}: the row renormalisation of W1 is not "
                    "additive, Norm(A + B) ≠ Norm(A) + Norm(B) (docs/ttt_as_linear_attention.md)")
        if self.inner_steps != 1:
            return (f"inner_steps={self.inner_steps}: the parallel form implements one inner "
                    "step per chunk")
        return None

    # ----------------------------------------------------------------- state
    def init_state(self, w0, w1, w2, batch_size: int) -> LaCTState:
        """Initial state from the learned fast weights (``[H, r, c]`` or ``[B, H, r, c]``).

        Working weights start at ``W^(0)`` (also for pre-norm: the first chunk uses the raw
        weights), accumulators at ``W^(0)``, momentum buffers at zero.
        """
        ws = self._broadcast_weights(w0, w1, w2, batch_size)
        dt = _checks.state_dtype(*[w for w in ws if w is not None])
        ws = tuple(None if w is None else w.astype(jnp.promote_types(w.dtype, dt)) for w in ws)
        upd = self.updated
        main = tuple(w if (i in upd) else None for i, w in enumerate(ws)) if self.weight_norm == "pre" else None
        mom = tuple(jnp.zeros_like(w) if (i in upd) else None for i, w in enumerate(ws)) if self.use_momentum else None
        norm = (tuple(_row_norm(w) if (i in upd) else None for i, w in enumerate(ws))
                if self.weight_norm is not None else None)
        return LaCTState(w=ws, main=main, mom=mom, norm=norm)

    def _broadcast_weights(self, w0, w1, w2, B):
        out = []
        for i, (name, w) in enumerate((("w0", w0), ("w1", w1), ("w2", w2))):
            if i not in self.matrices:
                if w is not None:
                    raise ValueError(f"{name}: fast_net='linear' has only w1; expected None, got shape {tuple(jnp.shape(w))}")
                out.append(None)
                continue
            if w is None:
                raise ValueError(f"{name}: required for fast_net={self.fast_net!r}, got None")
            _checks.check_floating(name, w)
            w = jnp.asarray(w)
            if w.ndim == 3:
                w = jnp.broadcast_to(w[None], (B,) + w.shape)
            elif w.ndim != 4:
                raise ValueError(f"{name}: expected a rank-3 [H, rows, cols] or rank-4 [B, H, rows, cols] "
                                 f"array, got shape {tuple(w.shape)}")
            elif w.shape[0] != B:
                raise ValueError(f"{name}: expected batch size B = {B} (from k) on axis 0, got shape {tuple(w.shape)}")
            out.append(w)
        return tuple(out)

    # ----------------------------------------------------------------- validation
    def _prepare(self, q, k, v, lr, momentum, state):
        """Validate and normalise inputs; returns (q, k, v, lrs, m, state, cdt, out_dtype)."""
        if self.q_is_k:
            if q is not None:
                _checks.check_rank("q", q, 4, "[B, T, H, K]")
            q = k
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x is None:
                raise ValueError(f"{name}: required, got None")
            _checks.check_rank(name, x, 4, "[B, T, H, D]")
            _checks.check_floating(name, x)
        B, T, H, K = k.shape
        if T == 0:
            raise ValueError("k: expected at least one token (T >= 1), got T = 0")
        _checks.check_shape("q", q, (B, T, H, K), "[B, T, H, K] (from k)")
        if tuple(v.shape[:3]) != (B, T, H):
            raise ValueError(f"v: expected shape [B, T, H, V] with (B, T, H) = {(B, T, H)} (from k), got {tuple(v.shape)}")
        V = v.shape[3]
        if not isinstance(state, LaCTState):
            raise ValueError(f"state: expected a LaCTState (see LaCTRule.init_state), got {type(state).__name__}")
        ws = state.w
        W1 = ws[1]
        if self.linear:
            _checks.check_shape("w1", W1, (B, H, V, K), "[B, H, dv, dk] (linear fast net; dv from v, dk from k)")
            Dh = K
        else:
            if ws[0] is None or ws[2] is None:
                raise ValueError("w0/w2: required for fast_net='swiglu', got None")
            Dh = ws[0].shape[2]
            _checks.check_shape("w0", ws[0], (B, H, Dh, K), "[B, H, dh, dk] (dk from k)")
            _checks.check_shape("w2", ws[2], (B, H, Dh, K), "[B, H, dh, dk] (dh from w0, dk from k)")
            _checks.check_shape("w1", W1, (B, H, V, Dh), "[B, H, dv, dh] (dv from v, dh from w0)")
        cdt = _checks.state_dtype(q, k, v, *[w for w in ws if w is not None])
        # learning rates -> three arrays [B, T, H, 1 or D_x]
        in_dims = (K, Dh, K)
        if self.constant_lr is not None:
            lrs = tuple(jnp.full((B, T, H, 1), self.constant_lr, cdt) for _ in range(3))
        else:
            lrs = _normalise_lr(lr, B, T, H, in_dims, self.matrices)
            lrs = tuple(None if x is None else x.astype(cdt) for x in lrs)
        if self.use_momentum:
            if momentum is None:
                raise ValueError("momentum: use_momentum=True needs a [B, T, H] momentum input, got None")
            _checks.check_shape("momentum", momentum, (B, T, H), "[B, T, H]")
            _checks.check_floating("momentum", momentum)
            m = jnp.asarray(momentum, cdt)
        else:
            m = None
        cast = lambda t: None if t is None else tuple(None if x is None else x.astype(cdt) for x in t)
        state = LaCTState(w=cast(state.w), main=cast(state.main), mom=cast(state.mom), norm=cast(state.norm))
        return (q.astype(cdt), k.astype(cdt), v.astype(cdt), lrs, m, state, cdt, v.dtype)

    # ----------------------------------------------------------------- one update
    def _update(self, st: LaCTState, k, v, lrs, m_bar):
        """One gradient step on one chunk (docs/rules/lact.md steps 3–7); returns the new state."""
        upd = self.updated
        sign = 1.0 if self.ascent else -1.0
        g = inner_grads(st.w, k, v, lrs, self.fast_net, upd)
        dW = [None if x is None else sign * x for x in g]
        mom = st.mom
        if self.use_momentum:
            new_mom = list(mom)
            for i in upd:
                dW[i] = dW[i] + m_bar[:, :, None, None] * mom[i]
                new_mom[i] = dW[i]
            mom = tuple(new_mom)
        if self.muon:
            md = None if self.muon_dtype is None else jnp.dtype(self.muon_dtype)
            for i in upd:
                dW[i] = newton_schulz5(dW[i], md)
        w = list(st.w)
        main = st.main
        if self.weight_norm == "pre":
            main = list(main)
            for i in upd:
                main[i] = main[i] + dW[i]
                w[i] = main[i] / (_row_norm(main[i]) + _WN_EPS) * st.norm[i]
            main = tuple(main)
        else:
            for i in upd:
                w[i] = w[i] + dW[i]
                if self.weight_norm == "post":
                    w[i] = w[i] / (_row_norm(w[i]) + _WN_EPS) * st.norm[i]
        return LaCTState(w=tuple(w), main=main, mom=mom, norm=st.norm)

    def _steps(self, st, k, v, lrs, m_bar):
        for _ in range(self.inner_steps):
            st = self._update(st, k, v, lrs, m_bar)
        return st

    # ----------------------------------------------------------------- recurrent form
    def recurrent(
        self,
        q: Optional[Float[Array, "b t h k"]],
        k: Float[Array, "b t h k"],
        v: Float[Array, "b t h v"],
        lr,
        state: LaCTState,
        momentum: Optional[Float[Array, "b t h"]] = None,
        output_final_state: bool = False,
    ):
        """The reference schedule as a ``lax.scan`` over chunks (docs/rules/lact.md).

        Args:
          q, k: ``[B, T, H, dk]`` (q may be None with ``q_is_k``); v: ``[B, T, H, dv]``.
          lr: ``[B, T, H, 3]`` (lr0, lr1, lr2 per token), ``[B, T, H, 3, D]`` (per input
            channel; needs dk == dh) or a tuple ``(lr0, lr1, lr2)`` of ``[B, T, H]`` /
            ``[B, T, H, D_x]`` arrays (D_x = dk, dh, dk; lr0/lr2 may be None for the
            linear fast net). Ignored when ``constant_lr`` is set.
          state: :class:`LaCTState` from :meth:`init_state` (or a previous call).
          momentum: ``[B, T, H]`` in (0, 1), required iff ``use_momentum``.
          output_final_state: also return the final state.

        Returns:
          ``(o, state)``: ``o [B, T, H, dv]`` in v's dtype; the final :class:`LaCTState`
          (float32/float64) or ``None``.
        """
        q, k, v, lrs, m, st, cdt, odt = self._prepare(q, k, v, lr, momentum, state)
        B, T, H, _ = k.shape
        C = self.chunk_size
        N = -(-T // C)
        lrs = tuple(jnp.zeros((B, T, H, 1), cdt) if x is None else x for x in lrs)
        qc, kc, vc = (chunk_layout(x, C) for x in (q, k, v))  # [B, H, N, C, d]
        lrc = tuple(chunk_layout(x, C) for x in lrs)
        if m is not None:
            # chunk means over the real tokens of each chunk
            counts = jnp.asarray([min(C, T - i * C) for i in range(N)], cdt)
            mbar = jnp.sum(chunk_layout(m, C), axis=3) / counts  # [B, H, N]
        else:
            mbar = jnp.zeros((B, H, N), cdt)
        tm = lambda x: jnp.moveaxis(x, 2, 0)  # chunk axis first for scan
        net = self.fast_net

        if self.order == "apply_then_update":
            def step(s, x):
                qi, ki, vi, l0, l1, l2, mb = x
                o = apply_fast(s.w, qi, net)
                return self._steps(s, ki, vi, (l0, l1, l2), mb), o

            n_upd = N - 1
            outs = []
            if n_upd > 0:
                xs = tuple(tm(x[:, :, :n_upd]) for x in (qc, kc, vc) + lrc + (mbar,))
                st, o_upd = lax.scan(step, st, xs)
                outs.append(jnp.moveaxis(o_upd, 0, 2))
            outs.append(apply_fast(st.w, qc[:, :, N - 1], net)[:, :, None])
            o = jnp.concatenate(outs, axis=2)
        else:
            def step(s, x):
                qi, ki, vi, l0, l1, l2, mb = x
                s = self._steps(s, ki, vi, (l0, l1, l2), mb)
                return s, apply_fast(s.w, qi, net)

            xs = tuple(tm(x) for x in (qc, kc, vc) + lrc + (mbar,))
            st, o = lax.scan(step, st, xs)
            o = jnp.moveaxis(o, 0, 2)
        o = unchunk_layout(o, T).astype(odt)
        return o, (st if output_final_state else None)

    # ----------------------------------------------------------------- parallel form
    def parallel(
        self,
        q: Optional[Float[Array, "b t h k"]],
        k: Float[Array, "b t h k"],
        v: Float[Array, "b t h v"],
        lr,
        state: LaCTState,
        momentum: Optional[Float[Array, "b t h"]] = None,
        output_final_state: bool = False,
        impl: str = "auto",
    ):
        """Parallel forms (docs/ladder.md) for static φ and no weight norm (ladder V2–V6).

        φ(q), φ(k) with the static W0, W2 (never updated, so no chunk waits on another), the chunk sums
        ``G_i = Σ_{t∈i} lr1_t (±v_t)ᵀ φ(k_t)``, then three linear recurrences over chunks —
        ``M_i = ᾱ_i M_{i−1} + G_i``, ``U_i = NS5(M_i)`` (Muon) or ``M_i``,
        ``S_c = W1_0 + Σ_{i<c} U_i`` (``i ≤ c`` for "update_then_query") — and the reads
        ``o = φ(q) S_cᵀ``. Two layouts of the same arithmetic:

        * ``impl="chunked"``: one fused ``lax.scan`` over chunks computes φ of the chunk, G_i,
          the recurrences and the read of each chunk (cache-resident; the fast form on CPU).
        * ``impl="associative"``: φ for all tokens in one dot per head, every G_i in one
          batched dot, the momentum as a
          ``lax.associative_scan`` over ``(ᾱ_i, G_i)`` pairs, NS5 batched over all chunks, the
          prefix sum as a ``cumsum`` and the reads as one batched dot — log-depth, for
          accelerators with parallelism to fill (the paper's parallel form). Holds one
          ``[dv, dh]`` matrix per chunk and head at once.
        * ``impl="auto"``: ``"chunked"`` on CPU, ``"associative"`` on GPU/TPU.

        Without momentum (ladder V5) each ``U_i = NS5(G_i)`` runs on the rank-C factors of
        ``G_i`` when that needs fewer FLOPs (:func:`newton_schulz5_factored`; chunks shorter
        than about half the head dim), in both layouts.

        Same other arguments and returns as :meth:`recurrent`. Raises
        :class:`NotAssociativeError` naming the breaking component otherwise.
        """
        _checks.check_choice("impl", impl, PARALLEL_IMPLS)
        why = self.breaks_associativity()
        if why is not None:
            raise NotAssociativeError(f"LaCTRule has no parallel form: {why}")
        if impl == "auto":
            impl = "chunked" if jax.default_backend() == "cpu" else "associative"
        q, k, v, lrs, m, st, cdt, odt = self._prepare(q, k, v, lr, momentum, state)
        B, T, H, K = k.shape
        C = self.chunk_size
        N = -(-T // C)
        net = self.fast_net
        W1_0 = st.w[1]
        sign = 1.0 if self.ascent else -1.0
        apply_first = self.order == "apply_then_update"
        n_upd = N - 1 if apply_first else N  # updating chunks (the last one only reads in apply-then-update)
        lay = lambda x: _scan_layout(x, C, N)  # noqa: E731  [B, T, H, ...] -> [N, B, H, C, ...]
        phi = lambda x: features(st.w, x, net)  # noqa: E731  φ with the static W0, W2 (identity if linear)
        qs = lay(q)                                               # [N, B, H, C, dk]
        if n_upd == 0:
            o = jnp.einsum("bhcd,bhvd->bhcv", phi(qs[0]), W1_0)[None]
            new_w1, new_mom = W1_0, (None if st.mom is None else st.mom[1])
        else:
            ks, l1s, sv = lay(k)[:n_upd], lay(lrs[1])[:n_upd], sign * lay(v)[:n_upd]  # lr1 is 0 on padding
            if self.use_momentum:
                counts = jnp.asarray([min(C, T - i * C) for i in range(n_upd)], cdt)
                abar = jnp.sum(lay(m[..., None])[:n_upd, ..., 0], axis=-1) / counts[:, None, None]  # [n, B, H]
                M0 = st.mom[1]
            else:
                abar = jnp.zeros((n_upd, B, H), cdt)
                M0 = jnp.zeros_like(W1_0)
            md = None if self.muon_dtype is None else jnp.dtype(self.muon_dtype)
            use_mom, muon = self.use_momentum, self.muon
            # Without momentum, U_i = NS5(G_i) and G_i = (±V_i)ᵀ (lr1 ⊙ φ(K_i)) has rank ≤ C: NS5
            # runs on the factors when that is cheaper (chunks shorter than about half the head
            # dim; same math, newton_schulz5_factored) — the recurrent form keeps the dense NS5.
            low_rank = (muon and not use_mom and (md is None or md == cdt)
                        and _low_rank_ns_pays(v.shape[-1], W1_0.shape[-1], C))
            sw = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731

            if impl == "chunked":
                # Three linear recurrences over chunks — momentum M_i = ᾱ_i M_{i−1} + G_i with
                # G_i = Σ_{t∈i} (±v_t)ᵀ (lr1_t φ(k_t)), U_i = NS5(M_i) (Muon) or M_i,
                # S_c = W1_0 + Σ_{i<c} U_i — and the reads o_c = φ(q_c) S_cᵀ, fused in one scan
                # with φ of the chunk computed in the step. On XLA:CPU this is the fast layout:
                # every block is cache-resident when it is used. Measured slower here: φ hoisted
                # for all tokens (XLA runs the four large φ dots concurrently on two cores and
                # streams [T, dh] temporaries; 0.95–1.0x of the recurrent form instead of
                # 1.03–1.08x), G for all chunks in one dot, a batched NS over every chunk, or an
                # exclusive cumsum of stacked states — the "associative" layout below, for
                # accelerators (docs/ladder.md).
                def step(carry, x):
                    M, S = carry
                    qc, kc, l1, svc, a = x
                    if apply_first:
                        o = jnp.einsum("bhcd,bhvd->bhcv", phi(qc), S)
                    pkc = l1 * phi(kc)
                    if low_rank:
                        S = S + newton_schulz5_factored(sw(svc), pkc)
                    else:
                        g = jnp.einsum("bhcv,bhcd->bhvd", svc, pkc)
                        M = a[..., None, None] * M + g if use_mom else g
                        S = S + (newton_schulz5(M, md) if muon else M)
                    if not apply_first:
                        o = jnp.einsum("bhcd,bhvd->bhcv", phi(qc), S)
                    return (M, S), o

                (M_last, new_w1), o = lax.scan(step, (M0, W1_0), (qs[:n_upd], ks, l1s, sv, abar))
            else:  # associative: every chunk at once, log-depth momentum scan
                # φ for all tokens at once ([B, H, tokens, d]: one large dot per head), then
                # chunk axis first.
                def phi_all(xs):  # [n, B, H, C, dk] -> [n, B, H, C, dh]
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
                    Ms = A[..., None, None] * M0 + X
                else:
                    Ms = G
                if low_rank:
                    U = newton_schulz5_factored(sw(sv), pk)
                else:
                    U = newton_schulz5(Ms, md) if muon else Ms
                S_incl = W1_0 + jnp.cumsum(U, axis=0)                   # S after chunk i's update
                M_last, new_w1 = (None if Ms is None else Ms[-1]), S_incl[-1]
                S_read = jnp.concatenate([W1_0[None], S_incl[:-1]], axis=0) if apply_first else S_incl
                o = jnp.einsum("nbhcd,nbhvd->nbhcv", phi_all(qs[:n_upd]), S_read)
            if apply_first:  # the last chunk only reads
                o = jnp.concatenate([o, jnp.einsum("bhcd,bhvd->bhcv", phi(qs[N - 1]), new_w1)[None]], axis=0)
            new_mom = M_last if self.use_momentum else (None if st.mom is None else st.mom[1])
        o = _unscan_layout(o, T).astype(odt)
        if not output_final_state:
            return o, None
        w = list(st.w)
        w[1] = new_w1
        mom = st.mom
        if mom is not None:
            mom = (None, new_mom, None)
        return o, LaCTState(w=tuple(w), main=st.main, mom=mom, norm=st.norm)

    def __call__(self, q, k, v, lr, state, momentum=None, output_final_state=False, impl="auto"):
        """Dispatch: ``impl="auto"`` uses :meth:`parallel` when allowed, else :meth:`recurrent`;
        ``"parallel"`` is the parallel form's own auto choice; ``"chunked"``/``"associative"``
        pick one parallel form."""
        _checks.check_choice("impl", impl, IMPLS)
        if impl in ("chunked", "associative"):
            return self.parallel(q, k, v, lr, state, momentum, output_final_state, impl=impl)
        if impl == "parallel" or (impl == "auto" and self.breaks_associativity() is None):
            return self.parallel(q, k, v, lr, state, momentum, output_final_state)
        return self.recurrent(q, k, v, lr, state, momentum, output_final_state)

    def parallel_impls(self) -> Tuple[str, ...]:
        """The parallel forms :func:`tttla_jax.testing.check_rule` compares (none if the
        configuration has no parallel form)."""
        return () if self.breaks_associativity() is not None else ("chunked", "associative")


def _pad_tokens(x, L):
    """Zero-pad axis 1 (tokens) of ``[B, T, ...]`` to length L."""
    T = x.shape[1]
    if T == L:
        return x
    return jnp.pad(x, [(0, 0), (0, L - T)] + [(0, 0)] * (x.ndim - 2))


def _scan_layout(x, C, N):
    """``[B, T, H, ...]`` → ``[N, B, H, C, ...]``, zero-padding the tokens to ``N·C``."""
    B, T, H = x.shape[:3]
    x = _pad_tokens(x, N * C).reshape((B, N, C, H) + x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))


def _unscan_layout(x, T):
    """Inverse of :func:`_scan_layout`: ``[N, B, H, C, ...]`` → ``[B, T, H, ...]``."""
    N, B, H, C = x.shape[:4]
    return jnp.moveaxis(x, (0, 2), (1, 3)).reshape((B, N * C, H) + x.shape[4:])[:, :T]


def _normalise_lr(lr, B, T, H, in_dims, matrices):
    """lr → (lr0, lr1, lr2), each ``[B, T, H, 1]`` or ``[B, T, H, D_x]`` (None if unused)."""
    names = ("lr0", "lr1", "lr2")
    if lr is None:
        raise ValueError("lr: required (shape [B, T, H, 3], [B, T, H, 3, D] or a tuple (lr0, lr1, lr2)), got None")
    if isinstance(lr, (tuple, list)):
        if len(lr) != 3:
            raise ValueError(f"lr: expected a tuple (lr0, lr1, lr2) of 3 arrays, got {len(lr)} entries")
        out = []
        for i, (name, x) in enumerate(zip(names, lr)):
            if i not in matrices:
                out.append(None)
                continue
            if x is None:
                raise ValueError(f"{name}: required, got None")
            _checks.check_floating(name, x)
            x = jnp.asarray(x)
            if x.ndim == 3:
                _checks.check_shape(name, x, (B, T, H), "[B, T, H] (from k)")
                x = x[..., None]
            elif x.ndim == 4:
                _checks.check_shape(name, x, (B, T, H, in_dims[i]),
                                    f"[B, T, H, D] with D = {in_dims[i]} (input dim of W{i}, from k)")
            else:
                raise ValueError(f"{name}: expected shape [B, T, H] = {(B, T, H)} or [B, T, H, D], got {tuple(x.shape)}")
            out.append(x)
        return tuple(out)
    _checks.check_floating("lr", lr)
    lr = jnp.asarray(lr)
    if lr.ndim == 4:
        _checks.check_shape("lr", lr, (B, T, H, 3), "[B, T, H, 3] (lr0, lr1, lr2; B, T, H from k)")
        return tuple(lr[..., i, None] if i in matrices else None for i in range(3))
    if lr.ndim == 5:
        D = lr.shape[-1]
        if lr.shape[:4] != (B, T, H, 3):
            raise ValueError(f"lr: expected shape [B, T, H, 3, D] with (B, T, H) = {(B, T, H)} (from k), got {tuple(lr.shape)}")
        for i in matrices:
            if in_dims[i] != D:
                raise ValueError(f"lr: per-channel shape [B, T, H, 3, D] needs D = {in_dims[i]} (input dim of W{i}), "
                                 f"got {tuple(lr.shape)}; pass a tuple (lr0, lr1, lr2) for different dims")
        return tuple(lr[..., i, :] if i in matrices else None for i in range(3))
    raise ValueError(f"lr: expected shape [B, T, H, 3] = {(B, T, H, 3)}, [B, T, H, 3, D] or a tuple, got {tuple(lr.shape)}")


# --------------------------------------------------------------------------- functional op


def lact_swiglu(
    q: Optional[Float[Array, "b t h k"]],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    lr,
    *,
    w0: Float[Array, "... dh k"],
    w1: Float[Array, "... v dh"],
    w2: Float[Array, "... dh k"],
    chunk_size: int,
    momentum: Optional[Float[Array, "b t h"]] = None,
    muon: bool = False,
    muon_dtype=None,
    weight_norm: Optional[str] = "post",
    update: str = "all",
    ascent: bool = True,
    order: str = "apply_then_update",
    q_is_k: bool = False,
    inner_steps: int = 1,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """LaCT with SwiGLU fast weights (docs/rules/lact.md): ``f(x) = W1 (silu(W0 x) ⊙ (W2 x))``.

    Apply-then-update chunk by chunk; per-matrix per-token learning rates; optional
    chunk-mean momentum (given iff ``momentum`` is not None), Muon NS5 and weight norm.
    ``impl="auto"`` takes the parallel form when it exists (``update="w1"``,
    ``weight_norm=None``, one inner step), else the ``lax.scan`` form.

    Args:
      q, k: ``[B, T, H, dk]``; v: ``[B, T, H, dv]``.
      lr: ``[B, T, H, 3]`` (lr0, lr1, lr2), ``[B, T, H, 3, D]`` per channel, or a tuple.
      w0, w2: ``[H, dh, dk]`` or ``[B, H, dh, dk]``; w1: ``[H, dv, dh]`` or ``[B, H, dv, dh]``.
      momentum: ``[B, T, H]`` or None (no momentum).

    Returns:
      ``(o, state)``: ``o [B, T, H, dv]``; a :class:`LaCTState` if ``output_final_state``
      (``state.w`` = final fast weights, ``state.mom`` = momentum buffers) else None.
    """
    rule = LaCTRule(chunk_size=chunk_size, fast_net="swiglu", update=update, weight_norm=weight_norm,
                    use_momentum=momentum is not None, muon=muon, muon_dtype=muon_dtype, ascent=ascent,
                    q_is_k=q_is_k, inner_steps=inner_steps, order=order)
    _checks.check_rank("k", k, 4, "[B, T, H, K]")
    state = rule.init_state(w0, w1, w2, k.shape[0])
    return rule(q, k, v, lr, state, momentum=momentum, output_final_state=output_final_state, impl=impl)


@register("lact")
def _registry_entry():
    """(rule, builder): ``builder(rule, seed, dtype)`` -> positional args of ``rule.recurrent``."""
    return LaCTRule(chunk_size=4, use_momentum=True, muon=True), _example_inputs


@register("lact_v2")
def _registry_entry_v2():
    """Ladder V2 (only W1, no weight norm, momentum, Muon): has a parallel form."""
    return LaCTRule(chunk_size=4, update="w1", weight_norm=None, use_momentum=True, muon=True), _example_inputs


def _example_inputs(rule: LaCTRule, seed: int = 0, dtype=jnp.float64, B=1, T=11, H=2, K=4, Dh=6, V=3):
    """(q, k, v, lr, state, momentum) with O(1)-scaled random values."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if rule.linear:
        Dh = K
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), dtype)
    lr = jnp.asarray(rng.uniform(0.01, 0.1, size=(B, T, H, 3)), dtype)
    m = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, T, H)), dtype) if rule.use_momentum else None
    w1 = jnp.asarray(rng.normal(size=(H, V, Dh)) / np.sqrt(Dh), dtype)
    if rule.linear:
        w0 = w2 = None
    else:
        w0 = jnp.asarray(rng.normal(size=(H, Dh, K)) / np.sqrt(K), dtype)
        w2 = jnp.asarray(rng.normal(size=(H, Dh, K)) / np.sqrt(K), dtype)
    return q, k, v, lr, rule.init_state(w0, w1, w2, B), m
