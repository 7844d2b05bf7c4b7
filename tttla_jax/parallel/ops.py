"""Sequence (context) parallelism for the linear-attention ops: one long sequence split over
the devices of a mesh axis (docs/context_parallel.md).

Axis names as in :mod:`tttla_jax.ops.linear_attention` (``B T H K V``), plus ``P`` the number
of devices on the sequence axis and ``L = T / P`` the tokens per device.

Two levels:

* **inside** ``jax.shard_map`` (composable, like ``lax.psum``): :func:`linear_attention` and
  :func:`delta_rule` take the local slice ``[B, L, H, ·]`` of device ``p`` (tokens
  ``p·L … (p+1)·L − 1``) and the name of the mesh axis the sequence is split over;
* **outside** (no ``shard_map`` to write): :func:`sharded_linear_attention` and
  :func:`sharded_delta_rule` take the whole ``[B, T, H, ·]`` arrays and a mesh, pad ``T`` to a
  multiple of ``P``, run the inside functions under ``jax.shard_map`` and unpad.

How (state passing; docs/context_parallel.md has the derivation). Both recurrences are affine
in the incoming state: over one device's tokens the state after the device is
``E_p = A_p c_p + B_p`` with ``c_p`` the state entering the device. Every device

1. computes its transform ``(A_p, B_p)`` by a forward-only state pass (never differentiated,
   nothing stored):

   - linear attention: ``A_p = exp(Σ_{t ∈ p} g_t)`` (a scalar per head) and
     ``B_p = Σ_t exp(Σ_{s > t} g_s) k_tᵀ v_t`` (one ``[K, L] × [L, V]`` product per head);
   - (gated) delta rule: ``A_p`` is a ``K × K`` matrix. The state's V columns evolve
     independently, so the state ``[0 | I_K]`` carried through the WY chunk maps
     ``S ↦ M_n S + D_n`` (no outputs; :func:`_delta_state_pass`) ends as ``[B_p | A_p]``
     (packed slices or per-channel log-decays: the single-device op on ``[v | 0_K]``, block by
     block of tokens, so its temporaries are block-sized);
2. all-gathers the P transforms (one small collective) and composes them with a
   ``lax.associative_scan`` (log depth in P): ``c_p = E_{p−1}``, ``c_0 = 0``;
3. runs the single-device chunked op ONCE on its slice from ``c_p`` (``initial_state``).

The (gated) delta rule on unpacked slices (one log-decay per head or none, the chunked form)
folds step 1 into step 3 (:func:`_delta_widened_first`): ONE chunked pass on ``[v | 0_K]`` from
``[h0 | I_K]`` gives the transform (its final state), the outputs from a zero incoming state and
``q̃_t Φ_t``; after the combine the outputs are corrected by ``(q̃_t Φ_t) c_p``.

Linear attention on unpacked slices (one log-decay per head, the chunked form) puts the chunk
states first instead (:func:`_la_states_first`): step 1 is the chunked form's own state scan
from a zero state (its final state is ``B_p``, no separate ``kᵀv`` pass), and step 3 reads the
outputs from the states ``S⁰_n + Φ_n c_p`` — the forward then costs what the op alone costs.

Gradients (a ``jax.custom_vjp``, LASP-2 style): the cotangent of ``c_p`` through the device's
own outputs is a state-sized contraction (linear attention: ``Σ_t e^{G_t} q̃_tᵀ dO_t``; delta
rule: ``Σ_t (q̃_t Φ_t)ᵀ dO_t``, a contraction of the stored ``q̃ Φ`` in the folded form, else a
reverse pass over the chunk maps ``X ← M_nᵀ X + Q̃_nᵀ dO_n``, :func:`_delta_cot_pass`); a reverse scan of
the transposed transforms gives the cotangent of the state leaving each device, which joins
the final-state cotangent of the local op's own backward — one backward pass, exact (``E_p``
is the only way ``A_p`` and ``B_p`` reach the rest), with only the local op's residuals stored.

Packed sequences: ``cu_seqlens`` are the *global* offsets (replicated). A document may span
any number of devices (its state passes across every boundary); a document that starts on a
device (at its first token or inside it) starts from its own initial state and cuts the
incoming state, so ``A_p = 0`` for a device whose last document starts on it. Each device runs
the op on its local segments (the global offsets clipped to its slice; a document with no
token on the device is an empty local segment). A document's final state is computed on the
device that holds its last token and shared with a masked ``lax.psum``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax.ops import delta_rule as _delta_op
from tttla_jax.ops import linear_attention as _la_op

__all__ = ["delta_rule", "linear_attention", "sharded_delta_rule", "sharded_linear_attention"]


# --------------------------------------------------------------------------- helpers


def _check_axis(axis_name):
    """``(P, p)``: the size of the mapped axis and this device's index on it."""
    try:
        P = lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(f"axis_name: {axis_name!r} is not a mapped axis here; call this function inside "
                         f"jax.shard_map over a mesh with that axis (or use the sharded_* wrappers) ({e})") from None
    return P, lax.axis_index(axis_name)


def _check_inputs(q, k, v, gates, initial_state, cu_seqlens, P):
    """The op's input contract on the local slice; ``cu_seqlens`` are global offsets
    (``[N + 1]``, from 0 to ``P · L``). Returns the :class:`tttla_jax._checks.Dims` of the slice
    (``N`` the number of packed sequences with ``cu_seqlens``)."""
    d = _checks.check_qkv(q, k, v, gates=gates, initial_state=None if cu_seqlens is not None else initial_state)
    if cu_seqlens is None:
        return d
    shape = getattr(cu_seqlens, "shape", None)
    if shape is None or len(shape) != 1 or shape[0] < 2:
        raise ValueError("cu_seqlens: expected a 1-D integer array [N + 1] of the global cumulative sequence "
                         f"offsets (N >= 1), got {'shape ' + str(tuple(shape)) if shape is not None else type(cu_seqlens).__name__}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens: expected an integer dtype, got {cu_seqlens.dtype}")
    if d.B != 1:
        raise ValueError(f"cu_seqlens: packed sequences go in a batch of one ([1, T, H, D]), got batch size B = {d.B}")
    if not isinstance(cu_seqlens, jax.core.Tracer):
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != P * d.T:
            raise ValueError(f"cu_seqlens: expected global offsets from 0 to P·L = {P} · {d.T} = {P * d.T} "
                             f"(the whole sequence over the {P} devices), got {cu[0]} … {cu[-1]}")
        if np.any(np.diff(cu) < 0):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {cu.tolist()}")
    N = shape[0] - 1
    if initial_state is not None:
        _checks.check_shape("initial_state", initial_state, (N, d.H, d.K, d.V),
                            "[N, H, K, V] (one state per packed sequence, N from cu_seqlens)")
        _checks.check_floating("initial_state", initial_state)
    return d._replace(N=N)


class _Segments:
    """Where the global documents of ``cu_seqlens [N + 1]`` fall on device ``p`` (slice of ``L``)."""

    def __init__(self, cu_seqlens, p, L):
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        start = p * L
        N = cu.shape[0] - 1
        self.local_cu = jnp.clip(cu - start, 0, L)                     # [N + 1] local offsets
        self.span = (cu[:-1] < start) & (cu[1:] > start)               # [N] entered from the device before
        self.nonempty = cu[1:] > cu[:-1]                               # [N]
        last = cu[1:] - 1
        self.owns = self.nonempty & (last >= start) & (last < start + L)  # [N] final state is computed here
        t = start + jnp.arange(L, dtype=jnp.int32)
        n_t = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), N - 1)
        self.span_tok = self.span[n_t]                                 # [L] token of the spanning document
        self.n_last = n_t[-1]                                          # document of the device's last token
        self.end = jnp.clip(cu[1:] - start - 1, 0, L - 1)              # [N] each document's last local token


@jax.tree_util.register_pytree_node_class
class _Layout:
    """Which documents enter device ``p`` from the previous device, and the maps between the
    states of the documents (``[B or N, H, K, V]``) and the one state passed on (``[B or 1, …]``).
    Without ``cu_seqlens`` every row enters (on ``p > 0``) and continues to the next device.
    A pytree (its arrays are explicit operands of the custom VJP)."""

    _fields = ("local_cu", "span", "span_tok", "end", "n_last", "owns", "nonempty")

    def __init__(self, packed, L, *arrays):
        self.packed, self.L = packed, L
        for f, x in zip(self._fields, arrays):
            setattr(self, f, x)

    def tree_flatten(self):
        return tuple(getattr(self, f) for f in self._fields), (self.packed, self.L)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux, *children)

    @classmethod
    def build(cls, cu_seqlens, p, P, B, L):
        if cu_seqlens is not None:
            seg = _Segments(cu_seqlens, p, L)
            return cls(True, L, seg.local_cu, seg.span, seg.span_tok, seg.end, seg.n_last, seg.owns, seg.nonempty)
        return cls(False, L, None, jnp.broadcast_to(p > 0, (B,)), jnp.broadcast_to(p > 0, (L,)), None, None,
                   jnp.broadcast_to(p == P - 1, (B,)), None)

    def h0m(self, h0):
        """Initial states of the documents that start on this device (zeros where entering)."""
        return jnp.where(_bcast(self.span, 4), jnp.zeros_like(h0), h0)

    def last(self, X):
        """The device's last document's row (the state passed on)."""
        return X if not self.packed else X[self.n_last][None]

    def last_span(self):
        return self.span if not self.packed else self.span[self.n_last][None]

    def last_doc_tokens(self):
        """``[L]`` mask of the last document's tokens (``None``: every token)."""
        if not self.packed:
            return None
        return jnp.arange(self.L) >= self.local_cu[self.n_last]

    def enter(self, h0m, c):
        """Initial states of the local pass: the incoming state for the entering document."""
        return h0m + jnp.where(_bcast(self.span, 4), c, jnp.zeros_like(c))

    def leave(self, dh0):
        return jnp.where(_bcast(self.span, 4), jnp.zeros_like(dh0), dh0)

    def inject(self, dSF, dE):
        """Adds the cotangent of the state passed on to the last document's final state."""
        if not self.packed:
            return dSF + dE
        n = jnp.arange(dSF.shape[0]) == self.n_last
        return dSF + jnp.where(_bcast(n, 4), dE, jnp.zeros_like(dE))

    def to_carry(self, X):
        """Sums per-document contributions to the incoming state's cotangent."""
        return X if not self.packed else jnp.sum(X, axis=0, keepdims=True)


def _varying_zero(q):
    """``[1, H, K, 1]`` zeros varying over the same mesh axes as ``q`` (the local slices): added
    to a state built from replicated values, the scans carrying it type-check under
    ``shard_map`` (e.g. a batch split over a further mesh axis)."""
    return jnp.zeros_like(q[:1, 0, :, :, None])


def _bcast(mask, ndim):
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


# token blocks of the forward-only passes (delta rule) and of the state-sized contractions:
# block-sized temporaries instead of L-sized ones (module constants so tests can shrink them)
_BLOCK_TOKENS = 512
_CONTRACT_BLOCK = 256
_CONTRACT_MIN_BLOCK = 64
# linear attention on unpacked slices with the chunk states first (_la_states_first); False:
# the transform's separate kᵀv pass, then the op from the incoming state (as packed slices)
_LA_STATES_FIRST = True
# the (gated) delta rule on unpacked slices with one log-decay per head (or none) and the
# chunked local form: the transform folded into the local pass (_delta_widened_first); False:
# the state-only transform pass and the reverse cotangent pass (_delta_state_pass, _delta_cot_pass)
_DELTA_WIDENED = True
# groups of chunks per stored state in _delta_widened_first: the forward keeps the widened state
# [S⁰ | Φ] before every block of this many groups and the backward recomputes a block at a time
# (2: half the stored states of the single-device op's one per group; same products)
_DELTA_STATE_GROUPS = 2


def _contract_tokens(a, b, w=None):
    """``Σ_t w_t a_tᵀ b_t``: ``a [B, L, H, K]``, ``b [B, L, H, V]``, ``w [B, L, H]`` (or ``None``)
    → ``[B, H, K, V]``, accumulated over blocks of tokens (a ``fori_loop`` of dynamic slices)
    so the transposed operands of the products are block-sized, not ``L``-sized."""
    L = a.shape[1]
    blk = math.gcd(L, _CONTRACT_BLOCK)
    if L <= _CONTRACT_BLOCK or blk < _CONTRACT_MIN_BLOCK:
        aw = a if w is None else a * w[..., None]
        return jnp.einsum("blhk,blhv->bhkv", aw, b)

    def block_product(i):
        sl = lambda x: lax.dynamic_slice_in_dim(x, i * blk, blk, axis=1)  # noqa: E731
        ai = sl(a) if w is None else sl(a) * sl(w)[..., None]
        return jnp.einsum("blhk,blhv->bhkv", ai, sl(b))

    # the first block starts the sum (so the carry has the operands' sharding type)
    return lax.fori_loop(1, L // blk, lambda i, acc: acc + block_product(i), block_product(0))


def _compose(matrix: bool):
    """``second ∘ first`` for the affine maps ``x ↦ A x + B`` (``A`` scalars per head or
    ``K × K`` matrices acting on the state's K axis)."""
    def compose(first, second):
        A1, B1 = first
        A2, B2 = second
        if matrix:
            return jnp.matmul(A2, A1), jnp.matmul(A2, B1) + B2
        return A2 * A1, A2[..., None, None] * B1 + B2
    return compose


def _carry_in(A, Bst, axis_name, p, matrix: bool):
    """All-gather the per-device affine transforms ``E = A c + B`` and compose them (an
    inclusive ``lax.associative_scan`` over the P devices): the state entering device ``p``,
    ``c_p = E_{p−1}`` (zeros on device 0). ``A``: ``[B, H]`` scalars (``matrix=False``) or
    ``[B, H, K, K]`` matrices acting on the state's K axis."""
    Ag, Bg = lax.all_gather((A, Bst), axis_name)  # [P, ...]
    _, E = lax.associative_scan(_compose(matrix), (Ag, Bg), axis=0)
    c = lax.dynamic_index_in_dim(E, jnp.maximum(p - 1, 0), 0, keepdims=False)
    return jnp.where(p > 0, c, jnp.zeros_like(c))


def _carry_back(A, dcl, axis_name, p, P, matrix: bool):
    """The transpose of :func:`_carry_in`: with ``dcl_p`` the cotangent of ``c_p`` through
    device ``p``'s own outputs and final states, the total cotangent of the state entering
    device ``p`` is ``dc_p = dcl_p + A_pᵀ dc_{p+1}`` (a reverse scan of the transposed
    transforms: one all-gather, ``log P`` depth). Returns ``dE_p = dc_{p+1}``, the cotangent
    of the state *leaving* device ``p`` (zeros on the last device)."""
    Ag, Dg = lax.all_gather((A, dcl), axis_name)  # [P, ...]
    if matrix:
        Ag = jnp.swapaxes(Ag, -1, -2)
    _, dc = lax.associative_scan(_compose(matrix), (jnp.flip(Ag, 0), jnp.flip(Dg, 0)), axis=0)
    dc = jnp.flip(dc, 0)  # dc[p] = dc_p
    nxt = lax.dynamic_index_in_dim(dc, jnp.minimum(p + 1, P - 1), 0, keepdims=False)
    return jnp.where(p < P - 1, nxt, jnp.zeros_like(nxt))


def _state_passing(local, transform, local_cot, axis_name, matrix: bool):
    """The per-device computation with a custom VJP (LASP-2 style; docs/context_parallel.md).

    * ``transform(xs, h0m) -> (A, B, aux)``: the device's affine map ``E = A c + B`` of the
      state entering it (forward only, never differentiated) and what ``local_cot`` needs;
    * the maps are all-gathered and composed (:func:`_carry_in`): ``c``;
    * ``local(xs, enter(h0m, c)) -> (o, SF)``: ONE single-device chunked pass from the
      incoming state, whose own VJP is kept (its residuals only).

    Backward: ``local_cot(xs, aux, dO, dSF)`` is the cotangent of ``c`` through the device's
    outputs and final states (a cheap state-sized contraction); :func:`_carry_back` turns
    those into ``dE``, the cotangent of the state leaving the device, which joins the final
    state's cotangent (``inject``) of ONE backward of the local pass. Since ``E = A c + B``
    enters the rest only through ``E``, that single backward gives exactly the gradients of
    ``A`` and ``B`` too: no correction terms are stored. ``leave`` keeps the initial states'
    cotangent of the documents that did not enter from the previous device.
    """
    @jax.custom_vjp
    def core(xs, h0m, lay):
        P, p = _check_axis(axis_name)
        A, Bst, _ = transform(xs, h0m, lay)
        c = _carry_in(A, Bst, axis_name, p, matrix)
        return local(xs, lay.enter(h0m, c), lay)

    def fwd(xs, h0m, lay):
        P, p = _check_axis(axis_name)
        A, Bst, aux = transform(xs, h0m, lay)
        c = _carry_in(A, Bst, axis_name, p, matrix)
        out, vjp = jax.vjp(lambda xs_, h_: local(xs_, h_, lay), xs, lay.enter(h0m, c))
        return out, (vjp, A, aux, xs, lay)

    def bwd(res, cts):
        vjp, A, aux, xs, lay = res
        dO, dSF = cts
        P, p = _check_axis(axis_name)
        dcl = local_cot(xs, aux, dO, dSF, lay)
        dE = _carry_back(A, dcl, axis_name, p, P, matrix)
        dxs, dh0 = vjp((dO, lay.inject(dSF, dE)))
        return dxs, lay.leave(dh0), None

    core.defvjp(fwd, bwd)
    return core


def _stored_run(run, bwd):
    """``run(xs, h0m, lay) -> (outputs, res)`` as a custom-VJP function whose backward is
    ``bwd((res, xs, lay), cotangents)``: the per-device forms that store their own residuals
    (:func:`_la_states_first`, :func:`_delta_widened_first`)."""
    @jax.custom_vjp
    def core(xs, h0m, lay):
        return run(xs, h0m, lay)[0]

    def fwd(xs, h0m, lay):
        out, res = run(xs, h0m, lay)
        return out, (res, xs, lay)

    core.defvjp(fwd, bwd)
    return core


def _final_states(SF, owns, h0, nonempty, axis_name):
    """One final state per document, identical on every device: the device holding the
    document's last token contributes it (a masked ``lax.psum``); an empty document keeps its
    initial state."""
    S = lax.psum(jnp.where(_bcast(owns, SF.ndim), SF, jnp.zeros_like(SF)), axis_name)
    if nonempty is None:
        return S
    return S + jnp.where(_bcast(nonempty, h0.ndim), jnp.zeros_like(h0), h0)


# --------------------------------------------------------------------------- inside shard_map


def linear_attention(
    q: Float[Array, "b l h k"],
    k: Float[Array, "b l h k"],
    v: Float[Array, "b l h v"],
    log_decay: Optional[Float[Array, "b l h"]] = None,
    *,
    axis_name,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """Causal (decayed) linear attention on a sequence split over the mesh axis ``axis_name``;
    call inside ``jax.shard_map`` on the local slice.

    ``S_t = exp(g_t) S_{t−1} + k_tᵀ v_t``, ``o_t = (scale·q_t) S_t`` over the *whole* sequence
    (``tt.linear_attention(..., masking="causal")``), device ``p`` holding tokens
    ``p·L … (p+1)·L − 1``. The state crosses devices by an all-gather of one
    ``(decay, state)`` pair per device and a log-depth scan (docs/context_parallel.md).

    Args:
      q, k: ``[B, L, H, K]`` this device's queries and keys; v: ``[B, L, H, V]``.
      log_decay: optional ``[B, L, H]`` log-decays (``[−inf, 0]``; 0 if absent).
      axis_name: the mesh axis the sequence is split over (as for ``lax.psum``).
      scale: query scale, default ``K ** -0.5`` (may be traced).
      chunk_size: chunk length of the local chunked op.
      cu_seqlens: optional ``[N + 1]`` *global* offsets of N packed documents (``B = 1``;
        the same on every device, may be traced): a document may cross devices; a document
        that starts on a device cuts the state entering it.
      initial_state: optional ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) state
        before the first token (of each document), the same on every device.
      output_final_state: also return the state after the last global token (after each
        document's last token with ``cu_seqlens``), the same on every device.
      impl: the local op's implementation (``tt.linear_attention``'s ``impl``).

    Returns:
      ``(o [B, L, H, V] in q's dtype, S or None)`` as ``tt.linear_attention``.

    Raises:
      ValueError: a wrong shape/dtype/offset (naming the argument), or ``axis_name`` is not a
        mapped axis.
    """
    P, p = _check_axis(axis_name)
    B, L, H, K, V, N = _check_inputs(q, k, v, {"log_decay": log_decay}, initial_state, cu_seqlens, P)
    scale = _checks.check_scale(scale)
    if scale is None:
        scale = K ** -0.5
    sd = _checks.state_dtype(q, k, v, log_decay, initial_state)
    qf, kf, vf, sc = q.astype(sd), k.astype(sd), v.astype(sd), jnp.asarray(scale, sd)  # scale may be traced
    g = None if log_decay is None else log_decay.astype(sd)
    h0 = jnp.zeros((N, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
    lay = _Layout.build(cu_seqlens, p, P, B, L)

    def local(xs, h0l, lay):
        q_, k_, v_, g_, s_ = xs
        return _la_op(q_, k_, v_, scale=s_, log_decay=g_, initial_state=h0l, output_final_state=True,
                      chunk_size=chunk_size, impl=impl, cu_seqlens=lay.local_cu)

    def transform(xs, h0m, lay):
        # the state leaving the device from a zero incoming state, B = Σ_t e^{G_last − G_t} k_tᵀ v_t
        # over the device's last document (+ its decayed initial state if it starts here), and
        # A = e^{G_last − G_start} if that document entered from the previous device
        _, k_, v_, g_, _ = xs
        gm = jnp.zeros((B, L, H), sd) if g_ is None else g_
        tok = lay.last_doc_tokens()  # [L] bool or None
        if tok is not None:
            gm = jnp.where(tok[None, :, None], gm, 0.0)
        incl = jnp.flip(jnp.cumsum(jnp.flip(gm, 1), axis=1), 1)  # Σ_{s ≥ t} g_s
        w = jnp.exp(jnp.concatenate([incl[:, 1:], jnp.zeros_like(incl[:, :1])], axis=1))  # Σ_{s > t}
        if tok is not None:
            w = jnp.where(tok[None, :, None], w, 0.0)
        dec = jnp.exp(incl[:, 0])  # [B, H]
        Bst = _contract_tokens(k_, v_, w) + dec[..., None, None] * lay.last(h0m)
        A = jnp.where(lay.last_span()[:, None], dec, 0.0)
        return A, Bst, None

    def local_cot(xs, aux, dO, dSF, lay):
        # o_t ∋ e^{G_t} q̃_t c on the entering document's tokens, S_n ∋ e^{G_end(n)} c
        q_, _, _, g_, s_ = xs
        G = None if g_ is None else jnp.cumsum(g_, axis=1)  # from the device's first token
        gam = jnp.ones((B, L, H), sd) if G is None else jnp.exp(G)
        gam = jnp.where(lay.span_tok[None, :, None], gam, 0.0)
        dcl = _contract_tokens(q_, dO, s_ * gam)
        if G is None:
            a_end = jnp.ones(dSF.shape[:2], sd)
        else:
            a_end = jnp.exp(G[:, -1]) if cu_seqlens is None else jnp.exp(G[0, lay.end])  # [B or N, H]
        a_end = jnp.where(lay.span[:, None], a_end, 0.0)
        return dcl + lay.to_carry(a_end[..., None, None] * dSF)

    if _la_states_first_applies(q, k, v, log_decay, cu_seqlens, chunk_size, impl):
        import importlib

        from tttla_jax import impl as _impl
        tile = importlib.import_module("tttla_jax.ops.linear_attention")._CPU_TILE
        C = min(chunk_size, tile) if _impl.platform() == "cpu" else chunk_size
        core = _la_states_first(local_cot, axis_name, min(C, L))  # the local op's tiling
    else:
        core = _state_passing(local, transform, local_cot, axis_name, matrix=False)
    o, SF = core((qf, kf, vf, g, sc), lay.h0m(h0 + _varying_zero(qf)), lay)
    S = _final_states(SF, lay.owns, h0, lay.nonempty, axis_name) if output_final_state else None
    return o.astype(q.dtype), S


def _la_states_first_applies(q, k, v, log_decay, cu_seqlens, chunk_size, impl) -> bool:
    """Whether :func:`linear_attention` runs :func:`_la_states_first`: an unpacked slice, one
    log-decay per head (or none), and the local op's implementation the chunked form."""
    from tttla_jax import impl as _impl
    from tttla_jax.ops.linear_attention import impl_reasons
    if not _LA_STATES_FIRST or cu_seqlens is not None or (log_decay is not None and log_decay.ndim != 3):
        return False
    reasons = impl_reasons(q, k, v, chunk_size=chunk_size, impl=impl, log_decay=log_decay)
    return _impl.resolve(impl, reasons, where="tttla_jax.parallel.linear_attention") == "chunked"


def _la_states_first(local_cot, axis_name, C):
    """Linear attention's per-device step with the chunk states first (unpacked slices, one
    log-decay per head; the chunked form's own chunk step and backward,
    :mod:`tttla_jax.ops.linear_attention`):

    * forward: ONE scan over the chunks from a zero state (the state updates only) gives the
      states before every chunk ``S⁰_n`` and the slice's state ``B = S⁰_N`` — the transform,
      with no separate ``kᵀv`` pass; the combine gives the incoming state ``c``; the states
      from it are ``S_n = S⁰_n + Φ_n c`` (``Φ_n`` the decay from the slice start to chunk
      ``n``: ``[K, V]`` per chunk, no token-sized work) and a second scan reads the outputs
      ``(Q Kᵀ ⊙ D) V + (γ Q) S_n`` from them. The two scans together are the chunked form's
      products, split (intra-chunk work in the second, state updates in the first);
    * backward: the cotangent of ``c`` through the slice (``local_cot``, a state-sized
      contraction), the reverse combine, then the chunked form's hand-written backward with
      the final-state cotangent plus the one from the devices after, each step forming its
      state ``S⁰_n + Φ_n c`` from the stored ``S⁰_n`` (``_chunk_tokens_bwd(..., offset=)``: no
      second stack of states, no pass over the stack).

    Both scans, like the chunked form's, take each chunk straight from the ``[B, L, H, d]``
    inputs and write outputs (and, backward, gradients) in place: no copy of the slice in a
    chunk layout is made or kept; the residuals are the state stack ``S⁰_n``, ``Φ``, ``c`` and
    the inputs.
    """
    from tttla_jax.ops import chunk as ck
    from tttla_jax.ops.linear_attention import (_chunk_fwd_step, _chunk_tokens_bwd, _put_chunk,
                                                _scan_unroll, _token_chunk, _tokens_forward)

    def padded(xs):
        q_, k_, v_, g_, _ = xs
        Lp = ck.num_chunks(q_.shape[1], C) * C
        return tuple(None if x is None else ck.pad_time(x, Lp) for x in (q_, k_, v_, g_))

    def run(xs, h0m, lay):
        s_ = xs[4]
        L = xs[0].shape[1]
        P, p = _check_axis(axis_name)
        qp, kp, vp, gp = padded(xs)
        N = qp.shape[1] // C
        S0 = jnp.zeros(h0m.shape, h0m.dtype) + _varying_zero(qp)
        # the chunk step's state updates alone (no outputs): B = S⁰_N and the stack S⁰_n
        _, B0, Sb = _tokens_forward(kp, kp, vp, gp, S0, 1.0, C, False, False, True)
        if gp is None:
            Phi = jnp.ones(Sb.shape[:3], Sb.dtype)
            a = jnp.ones(Sb.shape[1:3], Sb.dtype)
        else:
            Gam = ck.decay_terms(ck.scan_layout(gp, C))[3]            # [N, B, H] chunk decays
            Phi = jnp.cumprod(jnp.concatenate([jnp.ones_like(Gam[:1]), Gam[:-1]]), axis=0)
            a = Phi[-1] * Gam[-1]                                     # the whole slice's decay
        A = jnp.where(lay.last_span()[:, None], a, 0.0)
        c = _carry_in(A, B0 + a[..., None, None] * h0m, axis_name, p, False)
        S_in = lay.enter(h0m, c)
        SF = B0 + a[..., None, None] * S_in

        def outputs(o, x):  # the chunk step's outputs from the state before the chunk (its update unused)
            n, Sn, phi = x
            t0 = n * C
            xn = (_token_chunk(qp, t0, C, s_), _token_chunk(kp, t0, C), _token_chunk(vp, t0, C),
                  _token_chunk(gp, t0, C))
            on = _chunk_fwd_step(Sn + phi[..., None, None] * S_in, xn, True, True)[1]
            return _put_chunk(o, on, t0), None

        o, _ = lax.scan(outputs, jnp.zeros_like(vp, SF.dtype), (jnp.arange(N), Sb, Phi), unroll=_scan_unroll(N))
        return (o[:, :L], SF), (A, Sb, Phi, S_in)

    def bwd(res, cts):
        (A, Sb, Phi, S_in), xs, lay = res

        q_, _, _, g_, s_ = xs
        dO, dSF = cts
        L = q_.shape[1]
        P, p = _check_axis(axis_name)
        dE = _carry_back(A, local_cot(xs, None, dO, dSF, lay), axis_name, p, P, False)
        qp, kp, vp, gp = padded(xs)
        # the states S_n = S⁰_n + Φ_n c formed chunk by chunk inside the backward's step
        dq, dk, dv, dg, dS0, dsl = _chunk_tokens_bwd(s_, C, True, True, (qp, kp, vp, gp, Sb),
                                                     (ck.pad_time(dO, qp.shape[1]), lay.inject(dSF, dE)),
                                                     scale_grad=True, offset=(Phi, S_in))
        # the scale's cotangent: this slice's Σ q ⊙ ∂/∂(scale·q), summed over the devices as
        # the transpose of the scale's broadcast to the slice does
        ds = jax.vjp(lambda s: s * jnp.ones_like(dsl), s_)[1](dsl)[0]
        return (dq[:, :L], dk[:, :L], dv[:, :L], None if dg is None else dg[:, :L], ds), lay.leave(dS0), None

    return _stored_run(run, bwd)


def delta_rule(
    q: Float[Array, "b l h k"],
    k: Float[Array, "b l h k"],
    v: Float[Array, "b l h v"],
    beta: Float[Array, "b l h"],
    log_decay: Optional[Float[Array, "b l h"]] = None,
    *,
    axis_name,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """(Gated) delta rule on a sequence split over the mesh axis ``axis_name``; call inside
    ``jax.shard_map`` on the local slice.

    ``S_t = (I − β_t k_tᵀ k_t) e^{g_t} S_{t−1} + β_t k_tᵀ v_t``, ``o_t = (scale·q_t) S_t`` over
    the whole sequence (``tt.delta_rule``). Over one device the map from the incoming state is
    affine, ``S ↦ A_p S + B_p`` with ``A_p`` ``K × K``: the chunked pass on ``[v | 0_K]`` from
    ``[h0 | I_K]`` gives ``A_p`` and ``B_p`` with the outputs from a zero incoming state (unpacked
    slices with one log-decay per head, the chunked local op; else a forward-only state pass from
    ``[0 | I_K]``, then one chunked pass from the incoming state), an all-gather and a log-depth
    scan of the P transforms the incoming state (docs/context_parallel.md).

    Args:
      q, k: ``[B, L, H, K]``; v: ``[B, L, H, V]``; beta: ``[B, L, H]`` write strengths.
      log_decay: optional ``[B, L, H]`` log-decays (the gated delta rule).
      axis_name, scale, chunk_size, cu_seqlens, initial_state, output_final_state, impl: as in
        :func:`linear_attention` (``impl`` is ``tt.delta_rule``'s).

    Returns:
      ``(o [B, L, H, V] in q's dtype, S or None)`` as ``tt.delta_rule``.

    Raises:
      ValueError: a wrong shape/dtype/offset (naming the argument), or ``axis_name`` is not a
        mapped axis.
    """
    P, p = _check_axis(axis_name)
    B, L, H, K, V, N = _check_inputs(q, k, v, {"beta": beta, "log_decay": log_decay}, initial_state,
                                     cu_seqlens, P)
    scale = _checks.check_scale(scale)
    if scale is None:
        scale = K ** -0.5
    sd = _checks.state_dtype(q, k, v, beta, log_decay, initial_state)
    qf, kf, vf, bf = q.astype(sd), k.astype(sd), v.astype(sd), beta.astype(sd)
    sc = jnp.asarray(scale, sd)  # may be traced
    g = None if log_decay is None else log_decay.astype(sd)
    h0 = jnp.zeros((N, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
    lay = _Layout.build(cu_seqlens, p, P, B, L)

    def local(xs, h0l, lay):
        q_, k_, v_, b_, g_, s_ = xs
        return _delta_op(q_, k_, v_, b_, scale=s_, log_decay=g_, initial_state=h0l, output_final_state=True,
                         chunk_size=chunk_size, impl=impl, cu_seqlens=lay.local_cu)

    def widened(xs, h0m, lay, dO=None):
        # forward-only passes on [v | 0_K] from [0 | I_K] (entering document) / [h0 | 0], block by
        # block of tokens (the state carried between blocks; block-sized temporaries): the last K
        # state columns are Φ, the first V the state from a zero incoming state, the last K output
        # columns q̃_t Φ_t — contracted with dO block by block when dO is given
        # (with dO only the K columns: v = 0_K from I_K / 0, which gives Φ and q̃_t Φ alone)
        q_, k_, v_, b_, g_, s_ = xs
        eye = jnp.broadcast_to(jnp.eye(K, dtype=sd), h0m.shape[:2] + (K, K))
        phi0 = jnp.where(_bcast(lay.span, 4), eye, 0.0) + _varying_zero(q_)
        h0w = jnp.concatenate([h0m, phi0], axis=-1) if dO is None else phi0
        C = chunk_size  # blocks: the largest multiple of C dividing L, at most _BLOCK_TOKENS tokens
        Lb = next((m for m in range(min(_BLOCK_TOKENS, L) // C * C, 0, -C) if L % m == 0), L)
        nb = L // Lb

        def run(i, S):
            sl = lambda x: None if x is None else lax.dynamic_slice_in_dim(x, i * Lb, Lb, axis=1)  # noqa: E731
            cu = None if lay.local_cu is None else jnp.clip(lay.local_cu - i * Lb, 0, Lb)
            vw = _widen(sl(v_), K) if dO is None else jnp.zeros(sl(k_).shape, sd)
            ow, S = _delta_op(sl(q_), sl(k_), vw, sl(b_), scale=s_, log_decay=sl(g_),
                              initial_state=S, output_final_state=True, chunk_size=chunk_size, impl=impl,
                              cu_seqlens=cu)
            acc = None if dO is None else _contract_tokens(ow, sl(dO))
            return S, acc

        S, acc = run(0, h0w)  # the first block starts the carry (its sharding type)
        if nb > 1:
            def body(i, carry):
                S, acc = run(i, carry[0])
                return S, (None if dO is None else carry[1] + acc)
            S, acc = lax.fori_loop(1, nb, body, (S, acc))
        return S, acc

    state_only = cu_seqlens is None and (log_decay is None or log_decay.ndim == 3)

    def transform(xs, h0m, lay):
        # A = Φ and B = the V columns of the state leaving the device (its last document)
        if state_only:  # the chunk maps alone (no outputs, the V columns unwidened)
            _, k_, v_, b_, g_, _ = xs
            eye = jnp.broadcast_to(jnp.eye(K, dtype=sd), h0m.shape[:2] + (K, K))
            phi0 = jnp.where(_bcast(lay.span, 4), eye, 0.0) + _varying_zero(k_)
            SFw = _delta_state_pass(k_, v_, b_, g_, jnp.concatenate([h0m, phi0], axis=-1), chunk_size)
            return SFw[..., V:], SFw[..., :V], h0m
        SFw, _ = widened(xs, h0m, lay)
        last = lay.last(SFw)
        return last[..., V:], last[..., :V], h0m

    def local_cot(xs, h0m, dO, dSF, lay):
        # o_t ∋ (q̃_t Φ_t) c, S_n ∋ Φ_n c (Φ = 0 for documents starting here): the block-wise
        # pass again on the K columns only (nothing token-sized is stored between the passes)
        if state_only:  # one reverse pass over the chunk maps from dSF (Φ_Lᵀ dSF included)
            q_, k_, _, b_, g_, s_ = xs
            X = _delta_cot_pass(q_, k_, b_, g_, dO, dSF, chunk_size, s_)
            return jnp.where(_bcast(lay.span, 4), X, 0.0)
        phi, dcl = widened(xs, h0m, lay, dO)
        return dcl + lay.to_carry(jnp.einsum("nhkj,nhkv->nhjv", phi, dSF))

    if state_only and _delta_widened_applies(q, k, v, log_decay, chunk_size, impl):
        core = _delta_widened_first(axis_name, chunk_size, L)
    else:
        core = _state_passing(local, transform, local_cot, axis_name, matrix=True)
    o, SF = core((qf, kf, vf, bf, g, sc), lay.h0m(h0 + _varying_zero(qf)), lay)
    S = _final_states(SF, lay.owns, h0, lay.nonempty, axis_name) if output_final_state else None
    return o.astype(q.dtype), S


def _delta_widened_applies(q, k, v, log_decay, chunk_size, impl) -> bool:
    """Whether :func:`delta_rule` runs :func:`_delta_widened_first` (the caller has checked an
    unpacked slice with one log-decay per head or none): the local op's implementation is the
    chunked form."""
    from tttla_jax import impl as _impl
    from tttla_jax.ops import delta_rule_impl_reasons
    if not _DELTA_WIDENED:
        return False
    reasons = delta_rule_impl_reasons(q, k, v, chunk_size=chunk_size, impl=impl, log_decay=log_decay)
    return _impl.resolve(impl, reasons, where="tttla_jax.parallel.delta_rule") == "chunked"


def _delta_widened_first(axis_name, chunk_size, L, combine: bool = True):
    """The (gated) delta rule's per-device step with the transform folded into the local
    pass (unpacked slices, one log-decay per head or none; the chunked form's own group step,
    :func:`tttla_jax.ops.chunk.delta_chunked`, with its chunk, group and unroll choices):

    * forward: ONE pass of the chunked form over the slice on the values widened to
      ``[v | 0_K]`` from ``[h0 | I_K]`` (``[h0 | 0]`` on device 0). The state's V columns are
      the states from a zero incoming state ``S⁰``, its K columns ``Φ`` (the state's columns
      evolve independently), the outputs' V columns ``o⁰`` and K columns ``q̃ Φ``. The final
      state is the transform ``(A, B) = (Φ_L, S⁰_L)``; the combine gives the incoming state
      ``c``. The pass keeps ``S⁰_g`` and ``Φ_g`` at the start of every block of
      ``_DELTA_STATE_GROUPS`` groups, as two stacks; one loop over the blocks then forms the
      outputs ``o = o⁰ + (q̃ Φ) c`` in place of ``o⁰`` and the block-start states
      ``S_g = S⁰_g + Φ_g c`` in place of the ``S⁰`` stack (stored, the residuals of a
      rematerialised scan over blocks), and ``q̃ Φ`` ``[B, L, H, K]`` is stored (the size of ``k``);
    * backward: the cotangent of ``c`` through the slice is ``Σ_t (q̃_t Φ_t)ᵀ dO_t + Φ_Lᵀ dS_L``
      (one ``[K, L] × [L, V]`` contraction instead of a reverse pass over the chunk maps), the
      reverse combine gives the cotangent of the state leaving the device, and the chunked
      form's backward runs ONCE from the stored ``S_g``: a reverse loop over the blocks, each
      recomputed and differentiated (its groups' steps: what autodiff of the rematerialised scan
      does). ``q̃ Φ``, dead after the contraction, is the buffer ``dq`` is written into.

    ``combine=False`` (a measurement floor, ``benchmarks/context_parallel.py``): the same loops
    without the ``K`` extra columns and without the combine — the local op alone on the slice
    from its own initial state, in this function's loop layout.
    """
    import importlib

    from tttla_jax import impl as _impl
    from tttla_jax.ops import chunk as ck
    dmod = importlib.import_module("tttla_jax.ops.delta_rule")
    C = chunk_size
    if _impl.platform() == "cpu":
        C = min(C, dmod._CPU_TILE)  # the local op's tiling on a CPU host
    C = min(C, L)
    n = ck.num_chunks(L, C)
    G = min(dmod._GROUP_CHUNKS, n)
    unroll = G <= ck._UNROLL_MAX and n >= ck._UNROLL_MIN_CHUNKS

    # the state is stored before every block of R groups (the backward recomputes a block)
    R = min(_DELTA_STATE_GROUPS, ck.num_chunks(n, G))
    NG = ck.num_chunks(n, G * R)  # blocks
    gl = G * C
    blk, Lp = R * gl, NG * R * gl  # tokens per block, the slice padded to whole blocks

    group_step = ck._token_group_step(C, G, unroll)  # the chunked form's group step on token slices

    def block(S, q_, k_, v_, b_, g_, s_):
        # R groups on [B, blk, H, ·] token slices: (S after them, o [B, blk, H, ·]); the scale is
        # an argument here (differentiated by the backward's vjp)
        os_ = []
        for r in range(R):
            part = lambda x: None if x is None else x[:, r * gl:(r + 1) * gl]  # noqa: E731
            S, o = group_step(S, part(q_) * s_, part(k_), part(v_), part(b_), part(g_))
            os_.append(o)
        return S, os_[0] if R == 1 else jnp.concatenate(os_, axis=1)

    def pad(x):
        return None if x is None else ck.pad_time(x, Lp)

    def sl(x, i):
        return None if x is None else lax.dynamic_slice_in_dim(x, i * blk, blk, axis=1)

    def buffer(x, width):  # zeros [B, Lp, H, width] with x's sharding type (a loop carry)
        return jnp.zeros(x.shape[:1] + (Lp,) + x.shape[2:3] + (width,), x.dtype) + jnp.zeros_like(x[:, :1, :, :1])

    def put(buf, y, i):
        return None if buf is None else lax.dynamic_update_slice_in_dim(buf, y.astype(buf.dtype), i * blk, axis=1)

    def run(xs, h0m, lay):
        q_, k_, v_, b_, g_, s_ = xs
        P, p = _check_axis(axis_name)
        K, V = k_.shape[-1], v_.shape[-1]
        Kw = K if combine else 0  # the extra columns
        eye = jnp.broadcast_to(jnp.eye(K, Kw, dtype=h0m.dtype), h0m.shape[:2] + (K, Kw))
        phi0 = jnp.where(_bcast(lay.span, 4), eye, 0.0) + _varying_zero(q_)
        qp, kp, vp, bp, gp = (pad(x) for x in (q_, k_, v_, b_, g_))

        def stack(x):  # zeros [NG, *x.shape] with x's sharding type (a loop carry)
            return jnp.zeros((NG,) + x.shape, x.dtype) + x[None] * 0.0

        def body(i, carry):  # block i: its start state stored as S⁰ and Φ apart, outputs written in place
            S, o0, qphi, S0s, Phis = carry
            S_next, ow = block(S, sl(qp, i), sl(kp, i), _widen(sl(vp, i), Kw), sl(bp, i), sl(gp, i), s_)
            return (S_next, put(o0, ow[..., :V], i), put(qphi, ow[..., V:], i),
                    lax.dynamic_update_index_in_dim(S0s, S[..., :V], i, 0),
                    lax.dynamic_update_index_in_dim(Phis, S[..., V:], i, 0))

        S0w = jnp.concatenate([h0m, phi0], -1)
        SFw, o0, qphi, S0s, Phis = lax.fori_loop(
            0, NG, body, (S0w, buffer(v_, V), buffer(k_, Kw), stack(h0m), stack(phi0)))
        A, B0 = SFw[..., V:], SFw[..., :V]
        if not combine:
            return (o0[:, :L], B0), (A, qphi, S0s)
        c = _carry_in(A, B0, axis_name, p, True)

        def correct(i, carry):
            # block i: o = o⁰ + (q̃Φ) c and S_g = S⁰_g + Φ_g c, in place of o⁰ and of the S⁰ stack
            # (block by block: no whole-slice product or transposed copy of q̃Φ)
            o, Sg = carry
            Si = lax.dynamic_index_in_dim(Sg, i, 0, keepdims=False)
            Phi = lax.dynamic_index_in_dim(Phis, i, 0, keepdims=False)
            oi = sl(o, i) + jnp.einsum("blhk,bhkv->blhv", sl(qphi, i), c)
            return put(o, oi, i), lax.dynamic_update_index_in_dim(Sg, Si + jnp.matmul(Phi, c), i, 0)

        o, Sg = lax.fori_loop(0, NG, correct, (o0, S0s))                # Sg [NG, B, H, K, V]: true block starts
        return (o[:, :L], B0 + jnp.matmul(A, c)), (A, qphi, Sg)

    def bwd(res, cts):
        (A, qphi, Sg), xs, lay = res
        dO, dSF = cts
        P, p = _check_axis(axis_name)
        # Φ = 0 on a device whose rows do not enter from the previous one: dcl = 0 there
        if combine:
            dcl = _contract_tokens(qphi[:, :L], dO) + jnp.einsum("bhkj,bhkv->bhjv", A, dSF)
            dE = _carry_back(A, dcl, axis_name, p, P, True)
        else:
            dE = jnp.zeros_like(dSF)
        q_, k_, v_, b_, g_, s_ = xs
        qp, kp, vp, bp, gp, dOp = (pad(x) for x in (q_, k_, v_, b_, g_, dO))

        def body(r, carry):  # blocks from the last: recompute, differentiate, write the input cotangents
            i = NG - 1 - r
            dS, dbufs, ds = carry
            S = lax.dynamic_index_in_dim(Sg, i, 0, keepdims=False)
            _, vjp = jax.vjp(block, S, *(sl(x, i) for x in (qp, kp, vp, bp, gp)), s_)
            dS_prev, *dx, dsi = vjp((dS, sl(dOp, i)))
            return dS_prev, tuple(put(bf, d, i) for bf, d in zip(dbufs, dx)), ds + dsi

        dbufs = tuple(None if x is None else buffer(x, x.shape[-1]) if x.ndim == 4 else buffer(x[..., None], 1)[..., 0]
                      for x in (q_, k_, v_, b_, g_))
        if combine:
            # q̃Φ is dead once dcl is formed and has dq's shape [B, Lp, H, K]: it is dq's buffer
            # (every block is overwritten), so XLA can write dq in place of it, not in a new one
            dbufs = (qphi,) + dbufs[1:]
        dS0, dbufs, ds = lax.fori_loop(0, NG, body, (lay.inject(dSF, dE), dbufs, jnp.zeros_like(s_)))
        dxs = tuple(None if d is None else d[:, :L] for d in dbufs) + (ds,)
        return dxs, lay.leave(dS0), None

    return _stored_run(run, bwd)


# state-only passes of the (gated) delta rule (unpacked slices, one log-decay per head): the
# chunk maps S ↦ M_n S + D_n of the WY / UT form (tttla_jax.ops.chunk.delta_chunk_group),
# without the outputs; a fori_loop over blocks of whole chunks (_state_blocks), the chunks of a
# block batched, so the temporaries are block-sized (no copy of a whole [L, ...] input)


def _state_blocks(L, C):
    """``(Lb, nb)``: blocks of ``Lb`` tokens, the largest multiple of ``C`` dividing ``L`` of
    at most ``_BLOCK_TOKENS`` tokens (``L`` itself if none)."""
    Lb = next((m for m in range(min(_BLOCK_TOKENS, L) // C * C, 0, -C) if L % m == 0), L)
    return Lb, L // Lb


def _block_chunks(x, i, Lb, C):
    """Block ``i`` of ``x`` ``[B, L, H, ...]`` in the chunk layout ``[B, H, n, C, ...]``."""
    from tttla_jax.ops import chunk as ck
    return None if x is None else ck.chunk_layout(lax.dynamic_slice_in_dim(x, i * Lb, Lb, axis=1), C)


def _delta_chunk_maps(q, k, v, beta, g, C):
    """One group of chunks ``[B, H, G, C, ·]`` (``q`` scaled or ``None``, ``v`` or ``None``,
    ``g`` ``[B, H, G, C]`` or ``None``): ``(M [B, H, G, K, K], D [B, H, G, K, V] or None,
    Qt [B, H, G, C, K] or None)`` with ``M = e^{b_C} I − K̃ᵀ W_k``, ``D = K̃ᵀ W_v`` and
    ``Qt = e^b Q − P W_k`` (the chunk's outputs are ``Qt S + P W_v``), as in
    :func:`tttla_jax.ops.chunk.delta_chunk_group`."""
    from tttla_jax.ops import chunk as ck
    bc = beta[..., None]
    P, A, rhs_k, Kt, Qt0, state_decay = ck.delta_chunk_terms(q, k, bc, g)
    eye = jnp.eye(k.shape[-1], dtype=k.dtype)
    Tinv = ck.unit_lower_inverse(A)
    Wk = jnp.matmul(Tinv, rhs_k)
    M = (eye if state_decay is None else state_decay * eye) - jnp.einsum("bhnck,bhncj->bhnkj", Kt, Wk)
    D = None if v is None else jnp.einsum("bhnck,bhncv->bhnkv", Kt, jnp.matmul(Tinv, bc * v))
    Qt = None if q is None else Qt0 - jnp.matmul(P, Wk)
    return M, D, Qt


def _delta_state_pass(k, v, beta, g, S0, C):
    """The state after the slice and its map, without outputs: ``S0 = [S | Φ]``
    ``[B, H, K, V + K]`` → ``[M_N ⋯ M_1 S + (offsets) | M_N ⋯ M_1 Φ]`` (the widened state of
    the op's pass on ``[v | 0_K]``, at the cost of the chunk maps alone)."""
    V = v.shape[-1]
    Lb, nb = _state_blocks(k.shape[1], C)

    def block(i, S):
        M, D, _ = _delta_chunk_maps(None, *(_block_chunks(x, i, Lb, C) for x in (k, v, beta, g)), C)
        for j in range(M.shape[2]):  # S ← M_j S, plus D_j on the V columns
            S = jnp.matmul(M[:, :, j], S)
            S = jnp.concatenate([S[..., :V] + D[:, :, j], S[..., V:]], axis=-1)
        return S

    S = block(0, S0)  # the first block starts the carry (its sharding type)
    return S if nb == 1 else lax.fori_loop(1, nb, block, S)


def _delta_cot_pass(q, k, beta, g, dO, X0, C, scale):
    """``Σ_n (M_{n−1} ⋯ M_1)ᵀ Qt_nᵀ dO_n + (M_N ⋯ M_1)ᵀ X0``: the cotangent of the state entering
    the slice through its outputs (queries ``scale · q``, scaled block by block) and, via ``X0``
    ``[B, H, K, V]``, its final state — a reverse pass over the chunks (Horner), no outputs."""
    Lb, nb = _state_blocks(k.shape[1], C)

    def block(r, X):
        i = nb - 1 - r  # blocks from the last
        qb, kb, bb, gb, db = (_block_chunks(x, i, Lb, C) for x in (q, k, beta, g, dO))
        M, _, Qt = _delta_chunk_maps(qb * scale, kb, None, bb, gb, C)
        R = jnp.einsum("bhnck,bhncv->bhnkv", Qt, db)
        for j in reversed(range(M.shape[2])):
            X = jnp.einsum("bhkj,bhkv->bhjv", M[:, :, j], X) + R[:, :, j]
        return X

    X = block(0, X0)
    return X if nb == 1 else lax.fori_loop(1, nb, block, X)


def _widen(v, K):
    """``[v | 0_K]``: K extra value columns (the state's columns evolve independently)."""
    return jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (K,), v.dtype)], axis=-1)


# --------------------------------------------------------------------------- outside shard_map


def _axes_tuple(name, axes, mesh):
    if axes is None:
        return ()
    t = (axes,) if isinstance(axes, str) else tuple(axes)
    for a in t:
        if a not in mesh.axis_names:
            raise ValueError(f"{name}: axis {a!r} is not in the mesh, whose axes are {tuple(mesh.axis_names)}")
    return t


def _sharded(op, name, arrays, gates, *, mesh, seq_axis, batch_axes, scale, chunk_size, cu_seqlens,
             initial_state, output_final_state, impl):
    q, k, v = arrays
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if seq_axis not in mesh.axis_names:
        raise ValueError(f"seq_axis: {seq_axis!r} is not an axis of the mesh, whose axes are "
                         f"{tuple(mesh.axis_names)} (make one, e.g. jax.make_mesh((n,), ('seq',)))")
    bax = _axes_tuple("batch_axes", batch_axes, mesh)
    if seq_axis in bax:
        raise ValueError(f"batch_axes: {bax} contains the sequence axis {seq_axis!r}")
    B, T, H, K, V, N = _checks.check_qkv(q, k, v, gates=gates, initial_state=initial_state, cu_seqlens=cu_seqlens)
    nb = int(np.prod([mesh.shape[a] for a in bax])) if bax else 1
    if bax and cu_seqlens is not None:
        raise ValueError(f"batch_axes: packed sequences (cu_seqlens) are a batch of one, got batch_axes={batch_axes!r}")
    if B % nb:
        raise ValueError(f"batch_axes: the batch size B = {B} is not a multiple of the {nb} devices on {bax}")
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    scale = _checks.check_scale(scale)
    P = mesh.shape[seq_axis]
    Tp = -(-T // P) * P
    # padding after the last token (zero k, v, β and log-decay 0) leaves outputs and states
    # unchanged: the last document just runs on through it
    pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    names = ["q", "k", "v"] + list(gates)
    vals = [pad(x) for x in (q, k, v)] + [pad(x) for x in gates.values()]
    bspec = bax if len(bax) != 1 else bax[0]
    bspec = bspec if bax else None
    tok = PartitionSpec(bspec, seq_axis)
    specs = [tok] * len(vals)
    if cu_seqlens is not None:
        cu = jnp.asarray(cu_seqlens, jnp.int32)
        names.append("cu_seqlens")
        vals.append(cu.at[-1].set(Tp) if Tp != T else cu)
        specs.append(PartitionSpec())
    if initial_state is not None:
        names.append("initial_state")
        vals.append(initial_state)
        specs.append(PartitionSpec() if cu_seqlens is not None else PartitionSpec(bspec))
    if scale is not None and not isinstance(scale, float):  # traced: an operand
        names.append("scale")
        vals.append(jnp.asarray(scale))
        specs.append(PartitionSpec())
    present = [i for i, x in enumerate(vals) if x is not None]
    state_spec = PartitionSpec() if cu_seqlens is not None else PartitionSpec(bspec)

    def body(*xs):
        kw = dict(zip([names[i] for i in present], xs))
        kw.setdefault("scale", scale)
        return op(**kw, axis_name=seq_axis, chunk_size=chunk_size, output_final_state=output_final_state,
                  impl=impl)

    f = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs[i] for i in present),
                      out_specs=(tok, state_spec if output_final_state else None))
    args = [vals[i] for i in present]
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:  # explicit-sharding meshes (jax.make_mesh's default): the operands must carry the specs
        args = [jax.reshard(x, jax.sharding.NamedSharding(mesh, specs[i])) for i, x in zip(present, args)]
    # jit: an eager call would otherwise run the shard_map op by op (18 s instead of 1.3 s for a
    # 100-token delta rule); inside a caller's jit this is inlined
    o, S = jax.jit(f)(*args)
    if Tp == T:
        return o, S
    if explicit:  # T tokens do not split evenly over the axis: the unpadded output is not sequence-sharded
        o = jax.reshard(o, jax.sharding.NamedSharding(mesh, PartitionSpec(bspec)))
    return o[:, :T], S


def sharded_linear_attention(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    log_decay: Optional[Float[Array, "b t h"]] = None,
    *,
    mesh,
    seq_axis: str = "seq",
    batch_axes: Union[None, str, Sequence[str]] = None,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """:func:`linear_attention` on whole ``[B, T, H, ·]`` arrays: the tokens split over the
    mesh axis ``seq_axis`` (and the batch over ``batch_axes``), without writing ``shard_map``.

    ``T`` is zero-padded to a multiple of the axis size (zero k, v and log-decay 0 after the
    last token change neither the outputs nor the state) and the outputs unpadded. Same
    results as ``tt.linear_attention(..., masking="causal")``; works under ``jax.jit``.

    Args:
      q, k, v, log_decay, scale, chunk_size, cu_seqlens, initial_state, output_final_state,
        impl: as ``tt.linear_attention`` (``cu_seqlens`` with ``B = 1``).
      mesh: a ``jax.sharding.Mesh`` with an axis ``seq_axis``.
      seq_axis: the mesh axis the tokens are split over (default ``"seq"``).
      batch_axes: optional mesh axis name(s) the batch is split over (not with ``cu_seqlens``).

    Returns:
      ``(o [B, T, H, V], S or None)``.

    Raises:
      ValueError: an axis not in the mesh, a batch not divisible by ``batch_axes``, or a bad
        input shape (naming the argument and what was expected).
    """
    return _sharded(linear_attention, "sharded_linear_attention", (q, k, v), {"log_decay": log_decay},
                    mesh=mesh, seq_axis=seq_axis, batch_axes=batch_axes, scale=scale, chunk_size=chunk_size,
                    cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
                    impl=impl)


def sharded_delta_rule(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    beta: Float[Array, "b t h"],
    log_decay: Optional[Float[Array, "b t h"]] = None,
    *,
    mesh,
    seq_axis: str = "seq",
    batch_axes: Union[None, str, Sequence[str]] = None,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    cu_seqlens: Optional[Int[Array, "n1"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    impl: str = "auto",
):
    """:func:`delta_rule` on whole ``[B, T, H, ·]`` arrays, as :func:`sharded_linear_attention`
    (padding: β = 0, k = v = 0 and log-decay 0 leave the state unchanged). Same results as
    ``tt.delta_rule``."""
    return _sharded(delta_rule, "sharded_delta_rule", (q, k, v), {"beta": beta, "log_decay": log_decay},
                    mesh=mesh, seq_axis=seq_axis, batch_axes=batch_axes, scale=scale, chunk_size=chunk_size,
                    cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
                    impl=impl)
