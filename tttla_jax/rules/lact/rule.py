"""The LaCT rule: its configuration, input validation, state, chunk update and recurrent form
(docs/rules/lact.md); its parallel forms (:mod:`.parallel`), linear-attention reading
(:mod:`.reading`) and plain-linear-attention routing (ladder V6) are methods of the same class.

Schedule (docs/rules/lact.md, "apply, then update"): chunk c's queries read the weights before
chunk c's update; chunk starts strictly below ``T − C`` update; the last chunk (full or
partial) is apply-only. Per updating chunk (:meth:`LaCTRule.inner_step`): the inner gradients
of ``Σ_i lr_x[i] ⟨f(k_i), v_i⟩`` (:func:`~tttla_jax.rules.lact.fastnet.inner_grads`), then
chunk-mean momentum ``dW ← dW + ᾱ·dW_prev`` (buffer = post-momentum, pre-Muon dW; ``ᾱ`` the
mean of the momentum input over the chunk's tokens, :func:`chunk_means`), Muon NS5,
``W ← W + dW`` and weight norm (post: rows rescaled to their initial norm; pre: an
unnormalised accumulator ``W_main`` and a normalised working copy).

Everything a form needs from the raw inputs — validation, casting to the computation dtype,
the three learning rates and the chunk means ``ᾱ`` — is computed once, by
:meth:`LaCTRule.prepare`; the recurrent form, both parallel layouts, the reading and the
layer (:class:`tttla_jax.nn.LaCTLayer`) all start from it.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from tttla_jax import _checks
from tttla_jax import impl as _impl
from tttla_jax.ops.chunk import chunk_layout, unchunk_layout
from tttla_jax.rules.base import NotAssociativeError, Rule
from tttla_jax.rules.lact.fastnet import FAST_NETS, WN_EPS, apply_fast, inner_grads, row_norm
from tttla_jax.rules.lact.muon import newton_schulz5
from tttla_jax.rules.lact.parallel import parallel_form
from tttla_jax.rules.lact.reading import reading as _reading
from tttla_jax.rules.lact import scan_vjp

UPDATES = ("all", "w1")
WEIGHT_NORMS = ("post", "pre", None)
ORDERS = ("apply_then_update", "update_then_query")
MUON_DTYPES = (None, "bfloat16", "float32", "float64")
#: The parallel layouts of :meth:`LaCTRule.parallel` (docs/implementations.md).
PARALLEL_IMPLS = ("chunked", "associative")


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


class LaCTInputs(NamedTuple):
    """Validated inputs of one call, in the computation dtype (:meth:`LaCTRule.prepare`).

    Attributes:
      q: ``[B, T, H, dk]`` queries (the keys with ``q_is_k``).
      k: ``[B, T, H, dk]``; v: ``[B, T, H, dv]``.
      lrs: ``(lr0, lr1, lr2)``, each ``[B, T, H, 1]`` (per token) or ``[B, T, H, D]`` (per
        input channel of that matrix); the constant with ``constant_lr``; zeros for matrices
        the fast net does not have.
      chunk_momentum: ``[B, H, N]`` chunk means ``ᾱ`` of the momentum input over each chunk's
        real tokens (:func:`chunk_means`; zeros without momentum).
      state: the :class:`LaCTState`, cast to ``dtype``.
      dtype: the computation dtype (float32, or float64 if any input is float64).
      out_dtype: the outputs' dtype (v's).
    """

    q: Array
    k: Array
    v: Array
    lrs: Tuple[Array, Array, Array]
    chunk_momentum: Array
    state: LaCTState
    dtype: jnp.dtype
    out_dtype: jnp.dtype


def chunk_means(m: Float[Array, "b t h"], chunk_size: int) -> Float[Array, "b h n"]:
    """``ᾱ[b, h, c]``: the mean of ``m`` over the real tokens of chunk c (the last chunk may be
    partial) — LaCT's chunk-mean momentum coefficient (docs/rules/lact.md step 4)."""
    T, C = m.shape[1], chunk_size
    N = -(-T // C)
    counts = jnp.asarray([min(C, T - i * C) for i in range(N)], m.dtype)
    return jnp.sum(chunk_layout(m, C), axis=3) / counts


def _static_float(name: str, value) -> Optional[float]:
    """``None`` or a Python float from a Python/NumPy/JAX real scalar (a rule is a static,
    hashable configuration: a traced value is refused)."""
    x = _checks.check_scale(value, name)
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{name}: expected a concrete float (a rule is a static configuration), got a traced value")
    return x


@dataclasses.dataclass(frozen=True)
class LaCTRule(Rule):
    """LaCT fast-weight rule (docs/rules/lact.md) and the knobs of the paper's ladder (docs/ladder.md).

    Implementations (:attr:`impls`, docs/implementations.md): ``"chunked"`` and
    ``"associative"`` — the two layouts of :meth:`parallel`, for configurations without
    :meth:`breaks_associativity` (ladder V2–V6) — and ``"recurrent"`` (:meth:`recurrent`,
    every configuration). ``rule(*inputs, impl="auto")`` runs the first that can: on CPU the
    chunked layout, on GPU/TPU the associative one, else the recurrent form.

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

    #: implementations in "auto" preference order (on GPU/TPU "associative" comes first)
    impls: ClassVar[Tuple[str, ...]] = ("chunked", "associative", "recurrent")

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
        object.__setattr__(self, "chunk_size", _checks.check_positive_int("chunk_size", self.chunk_size))
        _checks.check_choice("fast_net", self.fast_net, FAST_NETS)
        _checks.check_choice("update", self.update, UPDATES)
        _checks.check_choice("weight_norm", self.weight_norm, WEIGHT_NORMS)
        _checks.check_choice("order", self.order, ORDERS)
        object.__setattr__(self, "inner_steps", _checks.check_positive_int("inner_steps", self.inner_steps))
        md = self.muon_dtype
        if md is not None and not isinstance(md, str):
            try:
                md = jnp.dtype(md).name
            except TypeError:
                pass
            object.__setattr__(self, "muon_dtype", md)
        _checks.check_choice("muon_dtype", self.muon_dtype, MUON_DTYPES)
        object.__setattr__(self, "constant_lr", _static_float("constant_lr", self.constant_lr))

    # ----------------------------------------------------------------- properties
    @property
    def linear(self) -> bool:
        """Whether the fast net is the single linear layer ``f(x) = W1 x``."""
        return self.fast_net == "linear"

    @property
    def updated(self) -> Tuple[int, ...]:
        """Indices of the matrices that are updated (0, 1, 2 = W0, W1, W2)."""
        return (1,) if (self.linear or self.update == "w1") else (0, 1, 2)

    @property
    def matrices(self) -> Tuple[int, ...]:
        """Indices of the fast net's matrices."""
        return (1,) if self.linear else (0, 1, 2)

    # ----------------------------------------------------------------- implementations
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

    def _preferred(self) -> Tuple[str, ...]:
        """:attr:`impls` in this platform's order: the associative layout first on GPU/TPU."""
        return ("associative", "chunked", "recurrent") if _impl.on_accelerator() else self.impls

    def resolve_impl(self, impl: str = "auto") -> str:
        """The implementation ``rule(*inputs, impl=impl)`` runs (:func:`tttla_jax.impl.resolve`).

        ``"auto"``: the platform's preferred parallel layout (chunked on CPU, associative on
        GPU/TPU) when the configuration has a parallel form, else ``"recurrent"``. An
        explicit parallel layout on a configuration without one raises
        :class:`NotAssociativeError` naming the component (as :meth:`parallel` does).
        """
        reasons = self.impl_reasons()
        why = self.breaks_associativity()
        if impl in PARALLEL_IMPLS and why is not None:
            raise NotAssociativeError(f"LaCTRule has no parallel form: {why} (impl={impl!r}; "
                                      f"use impl='recurrent' or 'auto')")
        return _impl.resolve(impl, {i: reasons[i] for i in self._preferred()}, where="LaCTRule")

    # ----------------------------------------------------------------- state
    def init_state(self, w0, w1, w2, batch_size: int) -> LaCTState:
        """Initial state from the learned fast weights (``[H, r, c]`` or ``[B, H, r, c]``).

        Working weights start at ``W^(0)`` (also for pre-norm: the first chunk uses the raw
        weights), accumulators at ``W^(0)``, momentum buffers at zero.
        """
        batch_size = _checks.check_positive_int("batch_size", batch_size)
        ws = self._broadcast_weights(w0, w1, w2, batch_size)
        dt = _checks.state_dtype(*[w for w in ws if w is not None])
        ws = tuple(None if w is None else w.astype(jnp.promote_types(w.dtype, dt)) for w in ws)
        upd = self.updated
        main = tuple(w if (i in upd) else None for i, w in enumerate(ws)) if self.weight_norm == "pre" else None
        mom = tuple(jnp.zeros_like(w) if (i in upd) else None for i, w in enumerate(ws)) if self.use_momentum else None
        norm = (tuple(row_norm(w) if (i in upd) else None for i, w in enumerate(ws))
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

    # ----------------------------------------------------------------- inputs
    def prepare(self, q, k, v, lr, state: LaCTState, momentum=None) -> LaCTInputs:
        """Validate and normalise the inputs of one call (the arguments of :meth:`recurrent`).

        Every form starts here: shapes are checked (errors name the argument, the shape got
        and the one expected), arrays cast to the computation dtype (float32, or float64 if
        any input is float64), ``q`` replaced by ``k`` with ``q_is_k``, the learning rates
        normalised to three arrays (the constant with ``constant_lr``) and the chunk means
        ``ᾱ`` of the momentum computed (:func:`chunk_means`).

        Returns:
          :class:`LaCTInputs`.
        """
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
        if self.constant_lr is not None:
            lrs = tuple(jnp.full((B, T, H, 1), self.constant_lr, cdt) for _ in range(3))
        else:
            lrs = _normalise_lr(lr, B, T, H, (K, Dh, K), self.matrices)
            lrs = tuple(jnp.zeros((B, T, H, 1), cdt) if x is None else x.astype(cdt) for x in lrs)
        if self.use_momentum:
            if momentum is None:
                raise ValueError("momentum: use_momentum=True needs a [B, T, H] momentum input, got None")
            _checks.check_shape("momentum", momentum, (B, T, H), "[B, T, H]")
            _checks.check_floating("momentum", momentum)
            mbar = chunk_means(jnp.asarray(momentum, cdt), self.chunk_size)
        else:
            mbar = jnp.zeros((B, H, -(-T // self.chunk_size)), cdt)
        cast = lambda t: None if t is None else tuple(None if x is None else x.astype(cdt) for x in t)  # noqa: E731
        state = LaCTState(w=cast(state.w), main=cast(state.main), mom=cast(state.mom), norm=cast(state.norm))
        return LaCTInputs(q.astype(cdt), k.astype(cdt), v.astype(cdt), lrs, mbar, state, cdt, v.dtype)

    # ----------------------------------------------------------------- one chunk
    def read(self, state: LaCTState, q: Float[Array, "b h c k"]) -> Float[Array, "b h c v"]:
        """``f(q)`` with the state's working weights, for a chunk of queries ``[B, H, C, dk]``."""
        return apply_fast(state.w, q, self.fast_net)

    def inner_step(self, state: LaCTState, k, v, lrs, chunk_momentum) -> LaCTState:
        """One gradient step on one chunk (docs/rules/lact.md steps 3–7): inner gradients,
        momentum, Muon, ``W ← W + dW`` and weight norm.

        Args:
          state: the state before the step.
          k: ``[B, H, C, dk]``; v: ``[B, H, C, dv]`` (the chunk's tokens).
          lrs: ``(lr0, lr1, lr2)``, each ``[B, H, C, 1]`` or ``[B, H, C, D]``.
          chunk_momentum: ``[B, H]``: the chunk's ``ᾱ`` (ignored without momentum).
        """
        upd = self.updated
        sign = 1.0 if self.ascent else -1.0
        g = inner_grads(state.w, k, v, lrs, self.fast_net, upd)
        dW = [None if x is None else sign * x for x in g]
        mom = state.mom
        if self.use_momentum:
            new_mom = list(mom)
            for i in upd:
                dW[i] = dW[i] + chunk_momentum[:, :, None, None] * mom[i]
                new_mom[i] = dW[i]
            mom = tuple(new_mom)
        if self.muon:
            md = None if self.muon_dtype is None else jnp.dtype(self.muon_dtype)
            for i in upd:
                dW[i] = newton_schulz5(dW[i], md)
        w = list(state.w)
        main = state.main
        if self.weight_norm == "pre":
            main = list(main)
            for i in upd:
                main[i] = main[i] + dW[i]
                w[i] = main[i] / (row_norm(main[i]) + WN_EPS) * state.norm[i]
            main = tuple(main)
        else:
            for i in upd:
                w[i] = w[i] + dW[i]
                if self.weight_norm == "post":
                    w[i] = w[i] / (row_norm(w[i]) + WN_EPS) * state.norm[i]
        return LaCTState(w=tuple(w), main=main, mom=mom, norm=state.norm)

    def chunk_update(self, state: LaCTState, k, v, lrs, chunk_momentum) -> LaCTState:
        """One updating chunk: :attr:`inner_steps` × :meth:`inner_step` (same arguments)."""
        for _ in range(self.inner_steps):
            state = self.inner_step(state, k, v, lrs, chunk_momentum)
        return state

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
        x = self.prepare(q, k, v, lr, state, momentum)
        st = x.state
        T = x.k.shape[1]
        C = self.chunk_size
        N = -(-T // C)
        if self.order == "apply_then_update" and N > 1 and scan_vjp.supports(self):
            # the same scan in a token-major chunk layout, with a hand-written, rematerialising backward
            o, st = scan_vjp.scan(self, *scan_vjp.scan_inputs(self, x))
            o = scan_vjp.outputs(o, T).astype(x.out_dtype)
            return o, (st if output_final_state else None)
        qc, kc, vc = (chunk_layout(a, C) for a in (x.q, x.k, x.v))  # [B, H, N, C, d]
        lrc = tuple(chunk_layout(a, C) for a in x.lrs)
        tm = lambda a: jnp.moveaxis(a, 2, 0)  # noqa: E731  chunk axis first for scan

        if self.order == "apply_then_update":
            def step(s, xs):
                qi, ki, vi, l0, l1, l2, mb = xs
                return self.chunk_update(s, ki, vi, (l0, l1, l2), mb), self.read(s, qi)

            n_upd = N - 1
            outs = []
            if n_upd > 0:
                xs = tuple(tm(a[:, :, :n_upd]) for a in (qc, kc, vc) + lrc + (x.chunk_momentum,))
                st, o_upd = lax.scan(step, st, xs)
                outs.append(jnp.moveaxis(o_upd, 0, 2))
            outs.append(self.read(st, qc[:, :, N - 1])[:, :, None])
            o = jnp.concatenate(outs, axis=2)
        else:
            def step(s, xs):
                qi, ki, vi, l0, l1, l2, mb = xs
                s = self.chunk_update(s, ki, vi, (l0, l1, l2), mb)
                return s, self.read(s, qi)

            xs = tuple(tm(a) for a in (qc, kc, vc) + lrc + (x.chunk_momentum,))
            st, o = lax.scan(step, st, xs)
            o = jnp.moveaxis(o, 0, 2)
        o = unchunk_layout(o, T).astype(x.out_dtype)
        return o, (st if output_final_state else None)

    # ----------------------------------------------------------------- parallel forms
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

        The chunk sums ``G_i = Σ_{t∈i} lr1_t (±v_t)ᵀ φ(k_t)`` with the static W0, W2, then
        three linear recurrences over chunks — ``M_i = ᾱ_i M_{i−1} + G_i``,
        ``U_i = NS5(M_i)`` (Muon) or ``M_i``, ``S_c = W1_0 + Σ_{i<c} U_i`` (``i ≤ c`` for
        "update_then_query") — and the reads ``o = φ(q) S_cᵀ``
        (:mod:`tttla_jax.rules.lact.parallel`):

        * ``impl="chunked"``: one fused ``lax.scan`` over chunks (cache-resident; the fast
          layout on CPU).
        * ``impl="associative"``: the momentum as a ``lax.associative_scan``, NS5 batched
          over all chunks, the prefix sum as a ``cumsum`` — log-depth, for accelerators.
        * ``impl="auto"``: ``"chunked"`` on CPU, ``"associative"`` on GPU/TPU.

        Same other arguments and returns as :meth:`recurrent`. Raises
        :class:`NotAssociativeError` naming the breaking component otherwise.
        """
        _impl.check_impl("impl", impl, ("auto",) + PARALLEL_IMPLS, where="LaCTRule.parallel")
        why = self.breaks_associativity()
        if why is not None:
            raise NotAssociativeError(f"LaCTRule has no parallel form: {why}")
        if impl == "auto":
            impl = next(i for i in self._preferred() if i in PARALLEL_IMPLS)
        x = self.prepare(q, k, v, lr, state, momentum)
        o, w1, mom1 = parallel_form(self, x, impl)
        o = o.astype(x.out_dtype)
        if not output_final_state:
            return o, None
        st = x.state
        w = (st.w[0], w1, st.w[2])
        mom = st.mom
        if mom is not None:
            mom = (None, mom1 if self.use_momentum else mom[1], None)
        return o, LaCTState(w=w, main=st.main, mom=mom, norm=st.norm)

    # ----------------------------------------------------------------- reading
    def has_reading(self) -> bool:
        """Every configuration has a reading (:meth:`reading`)."""
        return True

    def reading(self, q, k, v, lr, state: LaCTState, momentum=None, output_final_state=False):
        """LaCT read as linear attention on W1 (Theorems 5.2–5.3, docs/ttt_as_linear_attention.md):
        a :class:`tttla_jax.reduce.Reading` of the inputs of :meth:`recurrent`, for every
        configuration (:mod:`tttla_jax.rules.lact.reading`); sequential (``associative=False``)
        exactly when :meth:`breaks_associativity` names a component."""
        return _reading(self, self.prepare(q, k, v, lr, state, momentum))

    # ----------------------------------------------------------------- plain linear attention
    def linear_attention_reason(self) -> Optional[str]:
        """``None`` for plain chunk-masked linear attention (ladder V6, docs/ladder.md:
        ``o = q (W1_0ᵀ + Σ_{earlier chunks} (±lr1 ⊙ k)ᵀ v)``), else the components that are not."""
        bad = []
        if not self.linear:
            bad.append(f"fast_net={self.fast_net!r} (reads the features φ(q), not q)")
        if self.muon:
            bad.append("muon=True (NS5 of each update is not a sum of token writes)")
        if self.use_momentum:
            bad.append("use_momentum=True (re-weights earlier chunks' writes)")
        if self.weight_norm is not None:
            bad.append(f"weight_norm={self.weight_norm!r} (renormalises the state)")
        if self.inner_steps != 1:
            bad.append(f"inner_steps={self.inner_steps}")
        if self.order != "apply_then_update":
            bad.append(f"order={self.order!r} (a chunk reads its own update)")
        if not bad:
            return None
        return "not plain chunk-masked linear attention (ladder V6, docs/ladder.md): " + ", ".join(bad)

    def linear_attention_inputs(self, q, k, v, lr, state: LaCTState, momentum=None,
                                output_final_state: bool = False) -> dict:
        """Keyword arguments of ``tt.linear_attention`` computing this rule (only when
        :meth:`linear_attention_reason` is ``None``; docs/ladder.md, V6).

        ``masking="chunk"`` with the rule's chunk size, ``scale=1``, queries ``q`` (``k`` with
        ``q_is_k``), keys ``±lr1 ⊙ k`` (zero on the last, apply-only chunk, so the final state
        is the rule's), values ``v`` and the initial state ``W1_0ᵀ`` ``[B, H, dk, dv]`` — all in
        the computation dtype (:meth:`prepare`); :meth:`state_from_linear_attention` turns
        the returned state back into a :class:`LaCTState`.
        """
        why = self.linear_attention_reason()
        if why is not None:
            raise ValueError(f"linear_attention_inputs: this LaCTRule is {why}")
        x = self.prepare(q, k, v, lr, state, momentum)
        T = x.k.shape[1]
        C = self.chunk_size
        s = (-(-T // C) - 1) * C  # tokens of the updating chunks
        sign = 1.0 if self.ascent else -1.0
        keep = (jnp.arange(T) < s).astype(x.dtype)[None, :, None, None]
        return dict(q=x.q, k=x.k * (sign * keep * x.lrs[1]), v=x.v, scale=1.0,
                    initial_state=jnp.swapaxes(x.state.w[1], -1, -2),
                    output_final_state=output_final_state, masking="chunk", chunk_size=C)

    @staticmethod
    def state_from_linear_attention(final_state: Float[Array, "b h k v"], state: LaCTState) -> LaCTState:
        """The :class:`LaCTState` after a call through :meth:`linear_attention_inputs`:
        ``state`` with ``W1 = final_stateᵀ``."""
        w = state.w
        return state._replace(w=(w[0], jnp.swapaxes(final_state, -1, -2), w[2]))


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
    ``impl``: ``"recurrent"`` | ``"chunked"`` | ``"associative"`` | ``"auto"`` (a parallel
    layout when the configuration has one — ``update="w1"``, ``weight_norm=None``, one inner
    step — else the ``lax.scan`` form; :meth:`LaCTRule.resolve_impl`).

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
