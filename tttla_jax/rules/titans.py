"""Titans neural memory (Behrouz et al., 2025) as a fast-weight rule (docs/rules/titans.md).

Per head the memory is linear, ``M(x) = x W`` (``W`` ``[K, V]``), or a 2-layer MLP,
``M(x) = act(x W1) W2`` (``W1`` ``[K, F]``, ``W2`` ``[F, V]``, no biases — the
paper's "deep memory" with L_M = 2 as in the public PyTorch reference
``titans-pytorch``'s ``MemoryMLP``: activation between the layers only, exact-erf GELU
by default, no residual, no normalisation). Token t's inner loss is
``ℓ_t(W) = mean_d (M(k_t) − v_t)²`` (mean over the V output dims), weighted by ``θ_t``.
Chunks n = 1 … N of ``c = chunk_size`` tokens (``N = ceil(T / c)``)::

    u_n = −Σ_{t∈n} θ_t ∇_W ℓ_t(W_ref)              (the "surprise")
    S_n = η_n S_{n−1} + u_n,   S_0 = 0               (momentum)
    M_n = (1 − α_n) M_{n−1} + S_n,   M_0 = W_0       (forgetting)
    o_t = M_{⌊(t+1)/c⌋}(q_t)                        (t 0-based)

Index semantics of the read (docs/rules/titans.md, made explicit): the *last* token of every full
chunk reads the memory updated with its own chunk (``t = nc − 1`` reads ``M_n``); all
other tokens of chunk n read ``M_{n−1}``. With ``c = 1`` every token reads its own
write (update-then-query, as docs/linear_attention.md). When ``T`` is not a multiple of ``c`` the
trailing partial chunk is **not** dropped: its tokens read ``M_{N−1}`` (so none of them
reads its own chunk's update) and its update (momentum ``η_N``, decay ``α_N``, surprise
summed over the tokens present) is part of the returned final state ``M_N``.

``W_ref``: the memory at the start of the current TTT batch of ``batch_size`` tokens
(``batch_size`` must be a multiple of ``c``; batches are counted from the start of the
call). ``batch_size=None`` uses the memory at the start of the call (``W_0``)
throughout; ``batch_size = c = 1`` is the fully sequential rule.

Inner gradients are in closed form (:func:`titans_inner_grad`), for the linear memory
``∇_W ℓ_t = (2/V) k_tᵀ (k_t W − v_t)``; the MLP one is the hand-written chain rule.

Implementations (``impl``, docs/implementations.md; ``impls`` in "auto" preference order
``("chunked", "associative", "recurrent")``):

* ``"recurrent"`` — ``lax.scan`` over chunks, faithful to the reference (docs/rules/titans.md).
* ``"associative"`` — within a TTT batch ``W_ref`` is fixed, so every ``u_n`` is known
  up front and ``(S_n, M_n)`` is an affine function of ``(S_{n−1}, M_{n−1})`` with the
  scalar 2×2 matrix ``A_n = [[η_n, 0], [η_n, 1 − α_n]]`` and offset ``(u_n, u_n)``:
  ``lax.associative_scan`` over ``(A, b)`` pairs with
  ``(A1, b1) ∘ (A2, b2) = (A2 A1, A2 b1 + b2)``. Materialises one memory per chunk (tests,
  short sequences). Linear and MLP memory.
* ``"chunked"`` (linear memory only) — blocks of L chunks: with
  ``E[j, i] = Π_{s=i+1..j} η_s``, ``A[j, l] = Π_{s=l+1..j} (1 − α_s)`` and
  ``C = A E`` (both lower triangular, built from in-block segment sums of logs, no
  cumprod-and-divide), ``M_j = A[j, 0] M_in + C[j, 0] S_in + Σ_{i≥1} C[j, i] u_i``, so
  the outputs of a block are the masked linear attention
  ``(Q Kᵀ ⊙ D) Ṽ + a ⊙ (Q M_in) + f ⊙ (Q S_in)`` with ``D[t, s] = C[r(t), chunk(s)]`` and
  effective values ``ṽ_s = (2/V) θ_s (v_s − k_s W_ref)`` (theorem 5.3: momentum only
  re-weights the values); a ``lax.scan`` carries ``(S, M)`` across blocks. The products
  are taken in log space, so this form assumes the gates of docs/rules/titans.md
  (``η_n = sigmoid(·) ≥ 0``, ``α_n = sigmoid(·) ≤ 1``): a factor ``η_n`` or ``1 − α_n``
  below the smallest normal number (including exact zeros) is clamped to it, and a
  *negative* factor would lose its sign — use ``"recurrent"`` or ``"associative"`` for
  gates outside ``[0, 1]``.

Associativity and TTT batches: with ``batch_size`` set, ``W_ref`` of batch b is the
memory produced by batch b−1, so the surprise of batch b depends on the scan itself and
the rule is **not** associative across batches. The parallel forms handle it as a
``lax.scan`` over TTT batches with the parallel form inside each batch (documented
choice; ``batch_size = chunk_size`` leaves nothing to parallelise and ``impl="auto"``
then picks ``"recurrent"``, as it does for the MLP memory). ``batch_size=None`` is one
batch: fully parallel.

Reading (``reading``, docs/rules/titans.md, Theorem 5.3): momentum and forgetting only
re-weight the effective values, so the linear memory with ``batch_size=None`` is an
associative masked linear attention; TTT batches and the MLP memory make it sequential.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from tttla_jax import _checks
from tttla_jax import impl as _impl
from tttla_jax.ops.chunk import chunk_layout, unchunk_layout
from tttla_jax.reduce import Reading, segment_products
from tttla_jax.rules.base import Rule, register

MEMORIES = ("linear", "mlp")
ACTIVATIONS = ("gelu", "silu")
_SQRT2 = float(np.sqrt(2.0))
_SQRT_2PI = float(np.sqrt(2.0 * np.pi))

Memory = Union[Float[Array, "b h k v"], Tuple[Float[Array, "b h k f"], Float[Array, "b h f v"]]]


class TitansState(NamedTuple):
    """Fast-weight state: the memory ``M`` and the momentum (surprise) buffer ``S``.

    Each is a ``[B, H, K, V]`` array (linear memory) or a pair ``([B, H, K, F],
    [B, H, F, V])`` (MLP memory), in float32 (float64 for float64 inputs).
    """

    memory: Any
    momentum: Any


# ----------------------------------------------------------------------------- memory


def _act(name):
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return jax.nn.silu


def _act_grad(name, z):
    """d act / dz in closed form (exact-erf GELU: Φ(z) + z φ(z); SiLU: σ(1 + z(1 − σ)))."""
    if name == "gelu":
        # Python floats (weakly typed): a NumPy float64 scalar would promote float32 inputs
        # to float64 under jax_enable_x64
        cdf = 0.5 * (1.0 + lax.erf(z / _SQRT2))
        pdf = jnp.exp(-0.5 * z * z) / _SQRT_2PI
        return cdf + z * pdf
    s = jax.nn.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _read(W, x, activation="gelu"):
    """``M(x)`` for tokens ``x`` ``[..., c, K]`` and weights with matching leading dims."""
    if isinstance(W, tuple):
        W1, W2 = W
        h = _act(activation)(jnp.einsum("...ck,...kf->...cf", x, W1))
        return jnp.einsum("...cf,...fv->...cv", h, W2)
    return jnp.einsum("...ck,...kv->...cv", x, W)


def titans_inner_grad(W: Memory, k, v, theta, *, activation: str = "gelu") -> Memory:
    """Closed-form ``Σ_t θ_t ∇_W ℓ_t(W)`` with ``ℓ_t = mean_d (M(k_t) − v_t)²`` (docs/rules/titans.md).

    Linear: ``(2/V) Σ_t θ_t k_tᵀ (k_t W − v_t)``. MLP (``z = k W1``, ``h = act(z)``,
    ``e = (2/V) θ (h W2 − v)``): ``∇W2 = hᵀ e``, ``∇W1 = kᵀ ((e W2ᵀ) ⊙ act'(z))``.

    Args:
      W: ``[..., K, V]`` or ``([..., K, F], [..., F, V])``.
      k: ``[..., c, K]``; v: ``[..., c, V]``; theta: ``[..., c]`` (leading dims broadcast).
    """
    Vd = v.shape[-1]
    if isinstance(W, tuple):
        W1, W2 = W
        z = jnp.einsum("...ck,...kf->...cf", k, W1)
        h = _act(activation)(z)
        e = (2.0 / Vd) * theta[..., None] * (jnp.einsum("...cf,...fv->...cv", h, W2) - v)
        g2 = jnp.einsum("...cf,...cv->...fv", h, e)
        dz = jnp.einsum("...cv,...fv->...cf", e, W2) * _act_grad(activation, z)
        g1 = jnp.einsum("...ck,...cf->...kf", k, dz)
        return (g1, g2)
    e = (2.0 / Vd) * theta[..., None] * (jnp.einsum("...ck,...kv->...cv", k, W) - v)
    return jnp.einsum("...ck,...cv->...kv", k, e)


def _tmap(f, *xs):
    return jax.tree_util.tree_map(f, *xs)


def _lead(x, n):
    """Append ``n`` singleton axes so a ``[B, H, …]`` gate broadcasts against a matrix."""
    return x.reshape(x.shape + (1,) * n)


# ----------------------------------------------------------------------------- rule


@dataclasses.dataclass(frozen=True)
class TitansRule(Rule):
    """Titans neural memory, docs/rules/titans.md (module docstring has the math and the index quirks).

    Attributes:
      chunk_size: ``c``, tokens per momentum/decay chunk.
      batch_size: TTT batch in tokens (a multiple of ``c``) after which ``W_ref`` is
        refreshed; ``None`` keeps the initial memory as ``W_ref``.
      memory: ``"linear"`` or ``"mlp"`` (2-layer, see module docstring).
      activation: ``"gelu"`` (exact) or ``"silu"``, MLP memory only.
      block_tokens: target tokens per block of the chunked form (``L = block_tokens // c``
        chunks per block, at least 1, a divisor of the chunks per TTT batch).
    """

    impls: ClassVar[Tuple[str, ...]] = ("chunked", "associative", "recurrent")

    chunk_size: int = 16
    batch_size: Optional[int] = None
    memory: str = "linear"
    activation: str = "gelu"
    block_tokens: int = 64

    def __post_init__(self):
        object.__setattr__(self, "chunk_size", _checks.check_positive_int("chunk_size", self.chunk_size))
        if self.batch_size is not None:
            object.__setattr__(self, "batch_size", _checks.check_positive_int("batch_size", self.batch_size))
            if self.batch_size % self.chunk_size:
                raise ValueError(
                    f"batch_size: expected None or a multiple of chunk_size = {self.chunk_size}, "
                    f"got {self.batch_size}")
        _checks.check_choice("memory", self.memory, MEMORIES)
        _checks.check_choice("activation", self.activation, ACTIVATIONS)
        object.__setattr__(self, "block_tokens", _checks.check_positive_int("block_tokens", self.block_tokens))

    # -------------------------------------------------------------- state and checks

    def init_state(self, W0, batch: int) -> TitansState:
        """``M_0 = W_0`` broadcast over the batch, ``S_0 = 0``.

        Args:
          W0: ``[H, K, V]`` (linear) or ``([H, K, F], [H, F, V])`` (MLP).
          batch: ``B``.
        """
        W0 = self._check_W0(W0)
        sd = _checks.state_dtype(*jax.tree_util.tree_leaves(W0))
        M = _tmap(lambda w: jnp.broadcast_to(w.astype(sd), (batch,) + w.shape), W0)
        return TitansState(M, _tmap(jnp.zeros_like, M))

    def _check_W0(self, W0):
        if self.memory == "mlp":
            if not (isinstance(W0, (tuple, list)) and len(W0) == 2):
                raise ValueError(
                    f"W0: memory='mlp' expects a pair (W1 [H, K, F], W2 [H, F, V]), got {type(W0).__name__}")
            W1, W2 = (jnp.asarray(w) for w in W0)
            _checks.check_rank("W0[0]", W1, 3, "[H, K, F]")
            _checks.check_rank("W0[1]", W2, 3, "[H, F, V]")
            if W2.shape[:2] != (W1.shape[0], W1.shape[2]):
                raise ValueError(
                    f"W0[1]: expected shape [H, F, V] with (H, F) = {(W1.shape[0], W1.shape[2])} "
                    f"(from W0[0]), got {tuple(W2.shape)}")
            _checks.check_floating("W0[0]", W1)
            _checks.check_floating("W0[1]", W2)
            return (W1, W2)
        if isinstance(W0, (tuple, list)):
            raise ValueError("W0: memory='linear' expects one array [H, K, V], got a "
                             f"{type(W0).__name__} of {len(W0)} (use memory='mlp' for a pair)")
        W0 = jnp.asarray(W0)
        _checks.check_rank("W0", W0, 3, "[H, K, V]")
        _checks.check_floating("W0", W0)
        return W0

    def _validate(self, q, k, v, theta, momentum, decay, state):
        for name, x in (("q", q), ("k", k), ("v", v)):
            _checks.check_rank(name, x, 4, "[B, T, H, D]")
            _checks.check_floating(name, x)
        B, T, H, K = q.shape
        if T == 0:
            raise ValueError("q: expected at least one token (T >= 1), got T = 0")
        _checks.check_shape("k", k, (B, T, H, K), "[B, T, H, K] (from q)")
        if v.shape[:3] != (B, T, H):
            raise ValueError(
                f"v: expected shape [B, T, H, V] with (B, T, H) = {(B, T, H)} (from q), got {tuple(v.shape)}")
        V = v.shape[3]
        _checks.check_shape("theta", theta, (B, T, H), "[B, T, H]")
        _checks.check_floating("theta", theta)
        N = -(-T // self.chunk_size)
        for name, x in (("momentum", momentum), ("decay", decay)):
            _checks.check_shape(name, x, (B, H, N),
                                f"[B, H, ceil(T / chunk_size)] with T = {T}, chunk_size = {self.chunk_size}")
            _checks.check_floating(name, x)
        if not isinstance(state, TitansState):
            raise ValueError(f"state: expected a TitansState (see init_state), got {type(state).__name__}")
        if self.memory == "mlp":
            if not (isinstance(state.memory, tuple) and len(state.memory) == 2):
                raise ValueError("state: memory='mlp' expects memory = (W1, W2)")
            F = state.memory[0].shape[-1]
            expect = ((B, H, K, F), (B, H, F, V))
            names = ("state.memory[0]", "state.memory[1]")
            layouts = ("[B, H, K, F]", "[B, H, F, V]")
            for part in ("memory", "momentum"):
                for i, (x, e, l) in enumerate(zip(getattr(state, part), expect, layouts)):
                    _checks.check_shape(f"state.{part}[{i}]", x, e, l)
        else:
            for part in ("memory", "momentum"):
                _checks.check_shape(f"state.{part}", getattr(state, part), (B, H, K, V), "[B, H, K, V]")
        return B, T, H, K, V, N

    def breaks_associativity(self) -> Optional[str]:
        # Within a TTT batch the rule is a two-level linear scan; across batches W_ref
        # depends on the scan and the parallel forms scan over batches (module docstring).
        return None

    # -------------------------------------------------------------- protocol

    def impl_reasons(self) -> Dict[str, Optional[str]]:
        chunked = None
        if self.memory != "linear":
            chunked = ("TitansRule(memory='mlp'): the chunked matmul form needs a linear read "
                       "(M(q) = q M); the MLP memory's read act(q W1) W2 is not linear in the "
                       "memory — use impl='associative' (parallel) or 'recurrent'")
        return {"chunked": chunked, "associative": None, "recurrent": None}

    def resolve_impl(self, impl: str = "auto") -> str:
        """``"auto"`` is :meth:`auto_impl`; an explicit request runs or fails with its reason."""
        if impl == "auto":
            return self.auto_impl()
        return super().resolve_impl(impl)

    def auto_impl(self) -> str:
        """What ``impl="auto"`` runs: chunked for the linear memory unless every TTT batch is
        one chunk (nothing to parallelise), recurrent for the MLP memory."""
        if self.memory == "mlp" or self.batch_size == self.chunk_size:
            return "recurrent"
        return "chunked"

    def linear_attention_reason(self) -> Optional[str]:
        return ("Titans is not plain (decayed) linear attention: its mask combines momentum and "
                "forgetting per chunk (Theorem 5.3's cumulative coefficients, not a product of "
                "per-token decays), its effective values θ (2/V)(v − k W_ref) depend on the "
                "memory, and only a chunk's last token reads the chunk's own update")

    # -------------------------------------------------------------- public forms

    def recurrent(self, q, k, v, theta, momentum, decay, state: TitansState):
        """The ``lax.scan`` form over chunks. Returns ``(o [B, T, H, V], TitansState)``.

        Args:
          q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; theta: ``[B, T, H]`` (θ_t ≥ 0);
          momentum, decay: ``[B, H, N]`` (η_n, α_n), ``N = ceil(T / chunk_size)``;
          state: :class:`TitansState` (e.g. :meth:`init_state`).
        """
        return self._run("recurrent", q, k, v, theta, momentum, decay, state)

    def parallel(self, q, k, v, theta, momentum, decay, state: TitansState, *, impl: str = "auto"):
        """Parallel forms: ``impl="chunked"`` (linear memory) or ``"associative"``
        (``"auto"``: chunked for the linear memory, associative for the MLP memory).

        Same arguments and results as :meth:`recurrent`; with ``batch_size`` set, a
        ``lax.scan`` over TTT batches runs the parallel form inside each batch.
        """
        impl = self.resolve_parallel_impl(impl)
        return self._run(impl, q, k, v, theta, momentum, decay, state)

    # -------------------------------------------------------------- reading

    def has_reading(self) -> bool:
        return True

    def reading(self, q, k, v, theta, momentum, decay, state: TitansState) -> Reading:
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
        Arguments as :meth:`recurrent`.
        """
        B, T, H, K, V, N = self._validate(q, k, v, theta, momentum, decay, state)
        sd = _checks.state_dtype(q, k, v)
        c = self.chunk_size
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
        if self.batch_size is None:
            W_ref = per_token(M0, T)
        else:  # W_ref of each TTT batch = memory after the previous batch (rule run on the prefix)
            refs, st = [], state
            for start in range(0, T, self.batch_size):
                end = min(start + self.batch_size, T)
                refs.append(per_token(cast(st.memory), end - start))
                if end < T:
                    Np = -(-end // c)
                    _, st = self.recurrent(q[:, :end], k[:, :end], v[:, :end], theta[:, :end],
                                           momentum[..., :Np], decay[..., :Np], state)
            W_ref = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=1), *refs)
            breaks.append("W_ref (the memory at the start of each TTT batch) is produced by the "
                          "previous batch, so the effective values depend on the history")
        qf, kf, vf, th = q.astype(sd), k.astype(sd), v.astype(sd), theta.astype(sd)[..., None]
        if self.memory == "linear":
            vhat = th * (2.0 / V) * (vf - jnp.einsum("bthk,bthkv->bthv", kf, W_ref))
            return Reading(qf, kf, vhat, mask, coefs, (M0, S0), associative=not breaks,
                           breaks="; ".join(breaks) or None)
        (W1r, W2r), (W10, W20), (S10, S20) = W_ref, M0, S0
        act = _act(self.activation)
        z = jnp.einsum("bthk,bthkf->bthf", kf, W1r)
        khat = act(z)
        e = th * (2.0 / V) * (jnp.einsum("bthf,bthfv->bthv", khat, W2r) - vf)
        vhat = -e
        d = jnp.einsum("bthv,bthfv->bthf", e, W2r) * _act_grad(self.activation, z)  # ∇_{W1} ℓ = kᵀ d
        zq = Reading(qf, kf, -d, mask, coefs, (W10, S10)).outputs()  # q_t W1_{r(t)}
        breaks.append("the first memory layer W1 is updated, so the query features "
                      "act(q_t W1_{r(t)}) depend on the history (Theorem 5.2, time-varying feature map)")
        return Reading(act(zq), khat, vhat, mask, coefs, (W20, S20), associative=False,
                       breaks="; ".join(breaks))

    # -------------------------------------------------------------- implementation

    def _run(self, impl, q, k, v, theta, momentum, decay, state):
        B, T, H, K, V, N = self._validate(q, k, v, theta, momentum, decay, state)
        sd = _checks.state_dtype(q, k, v, theta, momentum, decay,
                                 *jax.tree_util.tree_leaves(state))
        c = self.chunk_size
        # chunk layout [B, H, N, c, D]; the last chunk is zero-padded (θ = 0 there, so
        # padded tokens add nothing to the surprise; their outputs are dropped).
        qc, kc, vc = (chunk_layout(x.astype(sd), c) for x in (q, k, v))
        thc = chunk_layout(theta.astype(sd), c)
        eta, alpha = momentum.astype(sd), decay.astype(sd)
        st = TitansState(*(_tmap(lambda x: x.astype(sd), s) for s in state))
        if impl == "recurrent":
            o, st = self._recurrent(qc, kc, vc, thc, eta, alpha, st)
        elif impl == "associative":
            o, st = self._segments(self._assoc_segment, qc, kc, vc, thc, eta, alpha, st)
        else:
            o, st = self._chunked(qc, kc, vc, thc, eta, alpha, st)
        return unchunk_layout(o, T).astype(q.dtype), st

    # recurrent ---------------------------------------------------------------

    def _recurrent(self, qc, kc, vc, thc, eta, alpha, st):
        N = qc.shape[2]
        nb = None if self.batch_size is None else self.batch_size // self.chunk_size
        tm = lambda x: jnp.moveaxis(x, 2, 0)  # chunk-major for the scan
        act = self.activation

        def step(carry, x):
            M, S, W_ref = carry
            q_n, k_n, v_n, th_n, e_n, a_n, n = x
            if nb is not None:  # refresh W_ref at the start of each TTT batch
                W_ref = _tmap(lambda m, w: jnp.where(n % nb == 0, m, w), M, W_ref)
            g = titans_inner_grad(W_ref, k_n, v_n, th_n, activation=act)
            S = _tmap(lambda s, gg: _lead(e_n, 2) * s - gg, S, g)
            M_new = _tmap(lambda m, s: _lead(1 - a_n, 2) * m + s, M, S)
            o = _read(M, q_n, act)  # tokens 0 … c−2 read M_{n−1}
            o_last = _read(M_new, q_n[..., -1:, :], act)  # the last token reads M_n
            o = jnp.concatenate([o[..., :-1, :], o_last], axis=-2)
            return (M_new, S, W_ref), o

        xs = (tm(qc), tm(kc), tm(vc), tm(thc), tm(eta), tm(alpha), jnp.arange(N))
        (M, S, _), o = lax.scan(step, (st.memory, st.momentum, st.memory), xs)
        return jnp.moveaxis(o, 0, 2), TitansState(M, S)

    # segments (TTT batches) --------------------------------------------------

    def _segments(self, seg_fn, qc, kc, vc, thc, eta, alpha, st):
        """Scan over TTT batches (one segment if ``batch_size`` is None), padding the chunk
        axis with no-op chunks; the carried state is the one after the last *real* chunk."""
        N = qc.shape[2]
        Ls = N if self.batch_size is None else self.batch_size // self.chunk_size
        Np = -(-N // Ls) * Ls
        pad = lambda x, val=0.0: jnp.pad(x, [(0, 0)] * 2 + [(0, Np - N)] + [(0, 0)] * (x.ndim - 3),
                                         constant_values=val)
        qc, kc, vc, thc = pad(qc), pad(kc), pad(vc), pad(thc)
        eta, alpha = pad(eta, 1.0), pad(alpha, 0.0)
        nseg = Np // Ls
        nvalid = jnp.clip(N - Ls * jnp.arange(nseg), 0, Ls)
        split = lambda x: jnp.moveaxis(x.reshape(x.shape[:2] + (nseg, Ls) + x.shape[3:]), 2, 0)
        xs = tuple(split(x) for x in (qc, kc, vc, thc, eta, alpha)) + (nvalid,)

        def body(carry, x):
            M, S = carry
            *xx, nv = x
            return seg_fn(*xx, M, S, nv)

        if nseg == 1:
            (M, S), o = body((st.memory, st.momentum), tuple(x[0] for x in xs))
            o = o[None]
        else:
            (M, S), o = lax.scan(body, (st.memory, st.momentum), xs)
        o = jnp.moveaxis(o, 0, 2)  # [B, H, nseg, Ls, c, V]
        o = o.reshape(o.shape[:2] + (Np,) + o.shape[4:])[:, :, :N]
        return o, TitansState(M, S)

    def _assoc_segment(self, q, k, v, th, eta, alpha, M_in, S_in, nvalid):
        """One TTT batch by ``lax.associative_scan`` over the chunks' affine maps."""
        act = self.activation
        W_ref = _tmap(lambda m: m[:, :, None], M_in)  # fixed within the batch
        u = _tmap(lambda g: -g, titans_inner_grad(W_ref, k, v, th, activation=act))  # [B,H,L,…]
        zero = jnp.zeros_like(eta)
        A = jnp.stack([jnp.stack([eta, zero], -1), jnp.stack([eta, 1 - alpha], -1)], -2)  # [B,H,L,2,2]
        b = _tmap(lambda x: jnp.stack([x, x], axis=3), u)  # [B,H,L,2,…]

        def combine(x, y):
            A1, b1 = x
            A2, b2 = y
            A12 = jnp.einsum("...ij,...jl->...il", A2, A1)
            b12 = _tmap(lambda p, r: jnp.einsum("...ij,...jpr->...ipr", A2, p) + r, b1, b2)
            return A12, b12

        Ac, bc = lax.associative_scan(combine, (A, b), axis=2)
        X0 = _tmap(lambda s, m: jnp.stack([s, m], axis=2)[:, :, None], S_in, M_in)  # [B,H,1,2,…]
        X = _tmap(lambda x0, bb: jnp.einsum("...ij,...jpr->...ipr", Ac, x0) + bb, X0, bc)
        S_all = _tmap(lambda x: x[:, :, :, 0], X)  # [B,H,L,…]: state after each chunk
        M_all = _tmap(lambda x: x[:, :, :, 1], X)
        M_ext = _tmap(lambda m0, m: jnp.concatenate([m0[:, :, None], m], 2), M_in, M_all)
        S_ext = _tmap(lambda s0, s: jnp.concatenate([s0[:, :, None], s], 2), S_in, S_all)
        o = _read(_tmap(lambda m: m[:, :, :-1], M_ext), q, act)  # chunk n reads M_{n−1} …
        o_last = _read(M_all, q[..., -1:, :], act)  # … except its last token: M_n
        o = jnp.concatenate([o[..., :-1, :], o_last], axis=-2)
        M_out = _tmap(lambda m: lax.dynamic_index_in_dim(m, nvalid, 2, keepdims=False), M_ext)
        S_out = _tmap(lambda s: lax.dynamic_index_in_dim(s, nvalid, 2, keepdims=False), S_ext)
        return (M_out, S_out), o

    # chunked ----------------------------------------------------------------

    def _block_chunks(self, N):
        """Chunks per block ``L``: ``L·c ≤ block_tokens`` (≥ 1), dividing the TTT batch."""
        c = self.chunk_size
        L = max(1, self.block_tokens // c)
        if self.batch_size is None:
            return min(L, N)
        nb = self.batch_size // c
        L = min(L, nb)
        while nb % L:
            L -= 1
        return L

    def _chunked(self, q, k, v, th, eta, alpha, st):
        """One ``lax.scan`` over blocks of L chunks; ``W_ref`` is refreshed at the blocks
        that start a TTT batch (L divides the chunks per batch), else stays ``M_0``."""
        B, H, N, c, K = q.shape
        V = v.shape[-1]
        L = self._block_chunks(N)
        nb = None if self.batch_size is None else self.batch_size // c
        Np = -(-N // L) * L
        nblk = Np // L
        pad = lambda x, val=0.0: jnp.pad(x, [(0, 0)] * 2 + [(0, Np - N)] + [(0, 0)] * (x.ndim - 3),
                                         constant_values=val)
        # padded chunks: no tokens (θ = 0), η = 1, α = 0; they lie after the last real
        # chunk, and the carried state is the one after row nvalid of each block.
        blk = lambda x: jnp.moveaxis(x.reshape((B, H, nblk, L) + x.shape[3:]), 2, 0)
        xs = (blk(pad(q)), blk(pad(k)), blk(pad(v)), blk(pad(th)), blk(pad(eta, 1.0)),
              blk(pad(alpha, 0.0)), jnp.clip(N - L * jnp.arange(nblk), 0, L), jnp.arange(nblk))
        # static token maps inside a block of L·c tokens: chunk of a key (1 … L) and the
        # memory index a query reads (0 … L; 0 = the block's incoming memory)
        pos = np.arange(L * c)
        ch = pos // c + 1
        rd = pos // c + (pos % c == c - 1)
        tiny = jnp.finfo(q.dtype).tiny
        n1 = L + 1
        s_gt_i = np.arange(n1)[:, None] > np.arange(n1)[None, :]  # [s, i]: s > i
        lower = np.tril(np.ones((n1, n1), bool))

        def seg_prod(x):
            """[B,H,L] per-chunk factors -> [B,H,L+1,L+1], P[j, i] = Π_{s=i+1..j} x_s (j ≥ i),
            as exp of an in-block segment sum of logs (no cumprod-and-divide; factors
            below the smallest normal are clamped so exact zeros give no NaN)."""
            lx = jnp.concatenate([jnp.zeros_like(x[..., :1]), jnp.log(jnp.maximum(x, tiny))], -1)
            cum = jnp.cumsum(jnp.where(s_gt_i, lx[..., :, None], 0.0), axis=-2)  # Σ_{i<s≤j}
            return jnp.where(lower, jnp.exp(cum), 0.0)

        def block(carry, x):
            M, S, W_ref = carry
            qb, kb, vb, tb, eb, ab, nv, j = x  # [B,H,L,c,·], [B,H,L], scalars
            if nb is not None:
                W_ref = jnp.where((j * L) % nb == 0, M, W_ref)
            qf = qb.reshape(B, H, L * c, K)
            kf = kb.reshape(B, H, L * c, K)
            # effective values ṽ = (2/V) θ (v − k W_ref), so that u_n = Σ_{s∈n} k_sᵀ ṽ_s
            vf = (2.0 / V) * tb.reshape(B, H, L * c, 1) * (
                vb.reshape(B, H, L * c, V) - jnp.einsum("bhsk,bhkv->bhsv", kf, W_ref))
            E = seg_prod(eb)  # E[j, i] = Π_{s=i+1..j} η_s
            A = seg_prod(1 - ab)  # A[j, l] = Π_{s=l+1..j} (1 − α_s)
            C = jnp.einsum("bhjl,bhli->bhji", A[..., :, 1:], E[..., 1:, :])
            D = C[..., rd[:, None], ch[None, :]]  # [B,H,Lc,Lc], zero where chunk(s) > r(t)
            att = jnp.einsum("bhtk,bhsk->bhts", qf, kf) * D
            o = (jnp.einsum("bhts,bhsv->bhtv", att, vf)
                 + A[..., rd, 0][..., None] * jnp.einsum("bhtk,bhkv->bhtv", qf, M)
                 + C[..., rd, 0][..., None] * jnp.einsum("bhtk,bhkv->bhtv", qf, S))
            # state after the block's last real chunk (row nv; nv = 0 keeps the carry)
            Er = lax.dynamic_index_in_dim(E, nv, 2, keepdims=False)  # [B,H,L+1]
            Cr = lax.dynamic_index_in_dim(C, nv, 2, keepdims=False)
            Ar0 = lax.dynamic_index_in_dim(A[..., 0], nv, 2, keepdims=False)  # [B,H]
            S_new = (Er[..., 0, None, None] * S
                     + jnp.einsum("bhsk,bhsv->bhkv", kf * Er[..., ch][..., None], vf))
            M_new = (Ar0[..., None, None] * M + Cr[..., 0, None, None] * S
                     + jnp.einsum("bhsk,bhsv->bhkv", kf * Cr[..., ch][..., None], vf))
            return (M_new, S_new, W_ref), o.reshape(B, H, L, c, V)

        (M, S, _), o = lax.scan(block, (st.memory, st.momentum, st.memory), xs)
        o = jnp.moveaxis(o, 0, 2).reshape(B, H, Np, c, V)[:, :, :N]
        return o, TitansState(M, S)


# ----------------------------------------------------------------------------- functional


def titans(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    theta: Float[Array, "b t h"],
    momentum: Float[Array, "b h n"],
    decay: Float[Array, "b h n"],
    *,
    W0,
    chunk_size: int,
    batch_size: Optional[int] = None,
    output_final_state: bool = False,
    impl: str = "auto",
    activation: str = "gelu",
):
    """Titans neural memory (docs/rules/titans.md): ``o_t = M_{⌊(t+1)/c⌋}(q_t)``.

    ``u_n = −Σ_{t∈n} θ_t ∇ℓ_t(W_ref)``, ``S_n = η_n S_{n−1} + u_n``,
    ``M_n = (1 − α_n) M_{n−1} + S_n``, ``M_0 = W_0``; see :mod:`tttla_jax.rules.titans`.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      theta: ``[B, T, H]`` per-token inner learning rate θ_t.
      momentum, decay: ``[B, H, ceil(T / chunk_size)]`` per-chunk η_n and α_n.
      W0: ``[H, K, V]`` learned initial linear memory, or ``([H, K, F], [H, F, V])`` for
        the 2-layer MLP memory.
      chunk_size: ``c``. batch_size: TTT batch in tokens (multiple of ``c``) or None.
      output_final_state: also return the final memory ``M_N``.
      impl: ``"recurrent"`` | ``"associative"`` | ``"chunked"`` (linear only) | ``"auto"``.
      activation: ``"gelu"`` | ``"silu"`` between the MLP memory's layers.

    Returns:
      ``(o, M)``: ``o`` ``[B, T, H, V]`` in q's dtype; ``M`` the final memory
      (``[B, H, K, V]`` or a pair) in float32/float64, or None.
    """
    rule = TitansRule(chunk_size=chunk_size, batch_size=batch_size,
                      memory="mlp" if isinstance(W0, (tuple, list)) else "linear",
                      activation=activation)
    _checks.check_rank("q", q, 4, "[B, T, H, K]")
    state = rule.init_state(W0, q.shape[0])
    H, K = q.shape[2], q.shape[3]
    Wl = jax.tree_util.tree_leaves(state.memory)
    if Wl[0].shape[1:3] != (H, K):
        raise ValueError(
            f"W0: expected leading dims [H, K] = {(H, K)} (from q), got {tuple(Wl[0].shape[1:])}")
    if v.ndim == 4 and Wl[-1].shape[-1] != v.shape[-1]:
        raise ValueError(
            f"W0: expected last dim V = {v.shape[-1]} (from v), got shape {tuple(Wl[-1].shape[1:])}")
    o, st = rule(q, k, v, theta, momentum, decay, state, impl=impl)
    return o, (st.memory if output_final_state else None)


@register("titans_linear")
def _registry_linear():
    """(rule, builder): ``builder(seed, dtype)`` -> positional args of ``rule.recurrent``."""
    return TitansRule(chunk_size=4, batch_size=None), _example_inputs


@register("titans_mlp")
def _registry_mlp():
    return TitansRule(chunk_size=4, batch_size=8, memory="mlp"), _example_inputs


def _example_inputs(rule: TitansRule, seed: int = 0, dtype=jnp.float64, B=1, T=11, H=2, K=3, V=4, F=5):
    rng = np.random.default_rng(seed)
    N = -(-T // rule.chunk_size)
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, H, K)) / np.sqrt(K), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), dtype)
    theta = jnp.asarray(rng.uniform(0.05, 0.5, size=(B, T, H)), dtype)
    eta = jnp.asarray(rng.uniform(0.3, 0.95, size=(B, H, N)), dtype)
    alpha = jnp.asarray(rng.uniform(0.0, 0.3, size=(B, H, N)), dtype)
    if rule.memory == "mlp":
        W0 = (jnp.asarray(rng.normal(size=(H, K, F)) / np.sqrt(K), dtype),
              jnp.asarray(rng.normal(size=(H, F, V)) / np.sqrt(F), dtype))
    else:
        W0 = jnp.asarray(rng.normal(size=(H, K, V)) / np.sqrt(K), dtype)
    return q, k, v, theta, eta, alpha, rule.init_state(W0, B)
