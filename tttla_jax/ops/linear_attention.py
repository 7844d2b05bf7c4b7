"""Linear attention, plain and decayed, in three equivalent forms (SPEC §1).

Axis names used throughout the library (documented once, here):
``B`` batch, ``T`` tokens, ``H`` heads, ``K`` key/query head dim, ``V`` value head dim,
``C`` chunk size, ``N`` number of chunks (``ceil(T / C)``).

The recurrence (update-then-query; token t sees its own write)::

    S_t = exp(g_t) · S_{t-1} + k_tᵀ v_t        g_t = log_decay[t] ≤ 0 (0 if absent)
    o_t = (scale · q_t) S_t                      (mode="causal")

``mode="chunk"`` (block causal, as LaCT's apply-then-update): every query of chunk c
reads the state after chunks < c, ``o_t = (scale·q_t) S_{cC-1}`` (``S_{-1} = S_0``, the
initial state); ``mode="none"`` (bidirectional, as ViT³): every query reads the final
state ``S_{T-1}``.

Forms (all give the same outputs, final state and gradients; ``tests/test_linear_attention.py``
checks each against the float64 loop in :mod:`tttla_jax.reference`):

* ``recurrent`` — ``lax.scan`` over tokens (rematerialised in blocks so the backward pass
  does not store T states).
* ``associative`` — ``lax.associative_scan`` over ``(g, X)`` pairs with
  ``(g1, X1) ∘ (g2, X2) = (g1 + g2, exp(g2)·X1 + X2)`` (the log-space version of SPEC §1 (a)).
  Materialises T states of size K×V: for tests and short sequences.
* ``chunked`` — inside a chunk ``(Q Kᵀ ⊙ D) V`` with the decay mask
  ``D_ij = exp(b_i − b_j)·[j ≤ i]`` (``b`` the in-chunk cumulative log-decay), across
  chunks a scan over chunk states (SPEC §1 (b); Yang et al., 2024, "Gated Linear
  Attention", §3). The fast path on CPU.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from tttla_jax import _checks

MODES = ("causal", "chunk", "none")
IMPLS = ("recurrent", "associative", "chunked", "pallas", "auto")

# Tokens per rematerialised block of the token scan: the backward pass of the
# recurrent form stores one state per block instead of one per token.
_REMAT_BLOCK = 128


def _validate(q, k, v, log_decay, initial_state, mode, chunk_size, impl, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, x, 4, "[B, T, H, D]")
        _checks.check_floating(name, x)
    B, T, H, K = q.shape
    _checks.check_shape("k", k, (B, T, H, K), "[B, T, H, K] (from q)")
    if v.shape[:3] != (B, T, H):
        raise ValueError(
            f"v: expected shape [B, T, H, V] with (B, T, H) = {(B, T, H)} (from q), got {tuple(v.shape)}"
        )
    V = v.shape[3]
    if T == 0:
        raise ValueError("q: expected at least one token (T >= 1), got T = 0")
    if log_decay is not None:
        _checks.check_shape("log_decay", log_decay, (B, T, H), "[B, T, H]")
        _checks.check_floating("log_decay", log_decay)
    if initial_state is not None:
        _checks.check_shape("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
    _checks.check_choice("mode", mode, MODES)
    _checks.check_choice("impl", impl, IMPLS)
    _checks.check_positive_int("chunk_size", chunk_size)
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return B, T, H, K, V


def linear_attention(
    q: Float[Array, "b t h k"],
    k: Float[Array, "b t h k"],
    v: Float[Array, "b t h v"],
    *,
    scale: Optional[float] = None,
    log_decay: Optional[Float[Array, "b t h"]] = None,
    initial_state: Optional[Float[Array, "b h k v"]] = None,
    output_final_state: bool = False,
    mode: str = "causal",
    chunk_size: int = 64,
    impl: str = "auto",
):
    """Causal / block-causal / bidirectional linear attention with optional scalar decay.

    ``S_t = exp(g_t) S_{t-1} + k_tᵀ v_t``, ``o_t = (scale·q_t) S_t`` (SPEC §1; the
    "decayed" row is Mamba-2/RetNet style with one log-decay per token and head).

    Args:
      q, k: ``[B, T, H, K]`` queries and keys. No feature map is applied.
      v: ``[B, T, H, V]`` values.
      scale: query scale, default ``K ** -0.5``.
      log_decay: optional ``[B, T, H]`` log-decay ``g_t`` (≤ 0 for a contraction; not enforced).
      initial_state: optional ``[B, H, K, V]`` state ``S_0`` (zeros if absent).
      output_final_state: also return the state after the last token.
      mode: ``"causal"`` | ``"chunk"`` (block causal with blocks of ``chunk_size``) | ``"none"``.
      chunk_size: chunk length for ``impl="chunked"`` and for ``mode="chunk"``.
      impl: ``"recurrent"`` | ``"associative"`` | ``"chunked"`` | ``"pallas"`` | ``"auto"``
        (the chunked XLA form on CPU).

    Returns:
      ``(o, S)``: ``o`` ``[B, T, H, V]`` in q's dtype; ``S`` ``[B, H, K, V]`` in float32
      (float64 for float64 inputs) or ``None`` unless ``output_final_state``.
    """
    B, T, H, K, V = _validate(q, k, v, log_decay, initial_state, mode, chunk_size, impl, scale)
    if scale is None:
        scale = K ** -0.5
    if impl == "auto":
        impl = _auto_impl(q, mode, K, V)
    if impl == "pallas":
        from tttla_jax import kernels  # deferred: kernels are optional at import time

        fn = getattr(kernels, "linear_attention", None)
        if fn is None:
            raise NotImplementedError("impl='pallas': the Pallas kernel is not available in this build")
        return fn(q, k, v, scale=scale, log_decay=log_decay, initial_state=initial_state,
                  output_final_state=output_final_state, mode=mode, chunk_size=chunk_size)

    sd = _checks.state_dtype(q, k, v)
    qf = q.astype(sd) * jnp.asarray(scale, sd)
    kf, vf = k.astype(sd), v.astype(sd)
    g = jnp.zeros((B, T, H), sd) if log_decay is None else log_decay.astype(sd)
    S0 = jnp.zeros((B, H, K, V), sd) if initial_state is None else initial_state.astype(sd)
    form = {"recurrent": _recurrent, "associative": _associative, "chunked": _chunked}[impl]
    o, S = form(qf, kf, vf, g, S0, mode, chunk_size)
    return o.astype(q.dtype), (S if output_final_state else None)


def _auto_impl(q, mode, K, V) -> str:
    # The kernel dispatch for GPU/TPU is added by tttla_jax.kernels (issue 5); on CPU the
    # chunked XLA form is the fast path.
    try:
        from tttla_jax import kernels

        pick = getattr(kernels, "auto_supported", None)
        if pick is not None and pick(q, mode, K, V):
            return "pallas"
    except ImportError:  # pragma: no cover
        pass
    return "chunked"


# --------------------------------------------------------------------------- recurrent


def _pad_time(x, T_pad, axis=1):
    T = x.shape[axis]
    if T_pad == T:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, T_pad - T)
    return jnp.pad(x, pad)


def _recurrent(q, k, v, g, S0, mode, chunk_size):
    """Token-by-token ``lax.scan``; zero-padded tokens (g=0, k=0) leave the state unchanged."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    blk = min(_REMAT_BLOCK, T)
    Tp = -(-T // blk) * blk
    pos = jnp.arange(Tp)
    # [nb, blk, B, H, ...] time-major blocks
    def tm(x):
        x = _pad_time(x, Tp)
        x = jnp.moveaxis(x, 1, 0)
        return x.reshape((Tp // blk, blk) + x.shape[1:])

    xs = (tm(q), tm(k), tm(v), tm(g), pos.reshape(Tp // blk, blk))

    def step(carry, x):
        S, R = carry
        qt, kt, vt, gt, t = x
        S = jnp.exp(gt)[..., None, None] * S + kt[..., :, None] * vt[..., None, :]
        if mode == "causal":
            o = jnp.einsum("bhk,bhkv->bhv", qt, S)
        elif mode == "chunk":
            o = jnp.einsum("bhk,bhkv->bhv", qt, R)
            R = jnp.where((t + 1) % chunk_size == 0, S, R)
        else:
            o = jnp.zeros(vt.shape, S.dtype)
        return (S, R), o

    @jax.checkpoint
    def block(carry, xb):
        return lax.scan(step, carry, xb)

    (S, _), o = lax.scan(block, (S0, S0), xs)
    o = o.reshape((Tp,) + o.shape[2:])[:T]
    o = jnp.moveaxis(o, 0, 1)
    if mode == "none":
        o = jnp.einsum("bthk,bhkv->bthv", q, S)
    return o, S


# --------------------------------------------------------------------------- associative


def _associative(q, k, v, g, S0, mode, chunk_size):
    """``lax.associative_scan`` over ``(cumulative log-decay, state)`` pairs."""
    B, T, H, K = q.shape
    X = k[..., :, None] * v[..., None, :]  # [B, T, H, K, V]

    def combine(a, b):
        g1, X1 = a
        g2, X2 = b
        return g1 + g2, jnp.exp(g2)[..., None, None] * X1 + X2

    G, S = lax.associative_scan(combine, (g, X), axis=1)
    S = S + jnp.exp(G)[..., None, None] * S0[:, None]  # S_t for every t: [B, T, H, K, V]
    S_final = S[:, -1]
    if mode == "causal":
        o = jnp.einsum("bthk,bthkv->bthv", q, S)
    elif mode == "none":
        o = jnp.einsum("bthk,bhkv->bthv", q, S_final)
    else:
        N = -(-T // chunk_size)
        # state read by chunk c: S_0 for c = 0, else the state after token cC - 1
        ends = jnp.arange(1, N) * chunk_size - 1
        R = jnp.concatenate([S0[:, None], S[:, ends]], axis=1)  # [B, N, H, K, V]
        R = jnp.repeat(R, chunk_size, axis=1)[:, :T]
        o = jnp.einsum("bthk,bthkv->bthv", q, R)
    return o, S_final


# --------------------------------------------------------------------------- chunked


def chunk_layout(x, C):
    """``[B, T, H, ...]`` → ``[B, H, N, C, ...]`` with zero padding of the last chunk."""
    B, T = x.shape[:2]
    N = -(-T // C)
    x = _pad_time(x, N * C)
    x = x.reshape((B, N, C) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)


def unchunk_layout(x, T):
    """Inverse of :func:`chunk_layout`: ``[B, H, N, C, ...]`` → ``[B, T, H, ...]``."""
    B, H, N, C = x.shape[:4]
    x = jnp.moveaxis(x, 1, 3).reshape((B, N * C, H) + x.shape[4:])
    return x[:, :T]


def _chunked(q, k, v, g, S0, mode, chunk_size):
    """Chunk-parallel form: masked matmuls inside chunks, a scan over chunk states."""
    B, T, H, K = q.shape
    C = min(chunk_size, T) if mode != "chunk" else chunk_size
    qc, kc, vc = chunk_layout(q, C), chunk_layout(k, C), chunk_layout(v, C)  # [B,H,N,C,D]
    b = jnp.cumsum(chunk_layout(g, C), axis=-1)  # in-chunk cumulative log decay [B,H,N,C]
    bC = b[..., -1]  # total log decay of each chunk [B,H,N]
    # Contribution of each chunk to the state at its end: Σ_j exp(b_C − b_j) k_jᵀ v_j.
    kd = kc * jnp.exp(bC[..., None] - b)[..., None]
    U = jnp.einsum("bhnck,bhncv->bhnkv", kd, vc)

    def step(S, x):
        Un, gn = x
        return jnp.exp(gn)[..., None, None] * S + Un, S  # emit the state *before* the chunk

    S_final, S_prev = lax.scan(
        step, S0, (jnp.moveaxis(U, 2, 0), jnp.moveaxis(bC, 2, 0))
    )
    S_prev = jnp.moveaxis(S_prev, 0, 2)  # [B,H,N,K,V]

    if mode == "none":
        o = jnp.einsum("bthk,bhkv->bthv", q, S_final)
        return o, S_final
    if mode == "chunk":
        o = jnp.einsum("bhnck,bhnkv->bhncv", qc, S_prev)
        return unchunk_layout(o, T), S_final

    # causal: inter-chunk part plus the masked intra-chunk part
    o = jnp.einsum("bhnck,bhnkv->bhncv", qc * jnp.exp(b)[..., None], S_prev)
    mask = jnp.tril(jnp.ones((C, C), bool))
    diff = jnp.where(mask, b[..., :, None] - b[..., None, :], 0.0)
    D = jnp.where(mask, jnp.exp(diff), 0.0)
    A = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc) * D
    o = o + jnp.einsum("bhnij,bhnjv->bhniv", A, vc)
    return unchunk_layout(o, T), S_final
