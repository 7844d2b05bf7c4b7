"""Input validation shared by every public op, kernel wrapper and rule.

Every error names the argument, the shape (or value) it got and what was expected,
so a user never has to read a traceback through ``lax.scan`` to find a typo.
Checks run at trace time (on static shapes), so they cost nothing under ``jit``.

The token-tensor contract (docs/linear_attention.md) is checked in one place,
:func:`check_qkv`: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, per-token gates
(``beta``, ``log_decay``, ...) ``[B, T, H]`` (a log-decay may also be per key channel,
``[B, T, H, K]``), the state ``[B, H, K, V]`` (or one state per
packed sequence, ``[N, H, K, V]``, with ``cu_seqlens``). Scalars: :func:`check_positive_int`
(``chunk_size``, block sizes) and :func:`check_scale` accept Python, NumPy and JAX scalars.
"""
from __future__ import annotations

import operator
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_rank(name: str, x, rank: int, layout: str) -> None:
    """Raise if ``x`` does not have ``rank`` dimensions (``layout`` e.g. "[B, T, H, K]")."""
    shape = jnp.shape(x)
    if len(shape) != rank:
        raise ValueError(
            f"{name}: expected a rank-{rank} array with layout {layout}, got shape {tuple(shape)}"
        )


def check_shape(name: str, x, expected: Sequence[int], layout: str) -> None:
    """Raise if ``x.shape != expected``; ``layout`` names the axes, e.g. "[B, T, H]"."""
    shape = tuple(jnp.shape(x))
    if shape != tuple(expected):
        raise ValueError(
            f"{name}: expected shape {layout} = {tuple(expected)}, got {shape}"
        )


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: got {value!r}, expected one of {choices}")


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_)) or (
        hasattr(value, "dtype") and jnp.issubdtype(getattr(value, "dtype"), jnp.bool_))


def check_positive_int(name: str, value) -> int:
    """A positive integer from a Python, NumPy or (concrete) JAX integer scalar.

    Uses ``operator.index`` (so floats, even integral ones like ``2.0``, are refused) and
    refuses booleans. Returns the value as a Python ``int``.
    """
    if _is_bool(value):
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        if isinstance(value, jax.core.Tracer):
            raise ValueError(f"{name}: expected a positive int known at trace time (a Python, NumPy or "
                             f"concrete JAX integer), got a traced value") from None
        raise ValueError(f"{name}: expected a positive int, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"{name}: expected a positive int, got {n!r}")
    return n


def check_scale(value, name: str = "scale"):
    """``None`` or a real scalar: a Python, NumPy or JAX int/float, possibly traced.

    Returns ``None``, a Python ``float`` (concrete values) or the 0-d traced array itself
    (a scale computed under ``jit``), which the ops use as an array operand.
    """
    if value is None:
        return None
    if _is_bool(value):
        raise ValueError(f"{name}: expected a real scalar (Python, NumPy or JAX float) or None, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)):
        shape = tuple(value.shape)
        if shape != () or not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
            raise ValueError(f"{name}: expected a real scalar (Python, NumPy or JAX float) or None, "
                             f"got {type(value).__name__} of shape {shape} and dtype {value.dtype}")
        if isinstance(value, jax.core.Tracer):
            return value
        return float(value)
    raise ValueError(f"{name}: expected a real scalar (Python, NumPy or JAX float) or None, "
                     f"got {type(value).__name__}")


def check_floating(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {jnp.result_type(x)}")


def state_dtype(*xs):
    """Accumulation dtype: float64 if any input is float64, else float32."""
    return jnp.float64 if any(jnp.result_type(x) == jnp.float64 for x in xs if x is not None) else jnp.float32


# ----------------------------------------------------------------------------- token tensors


class Dims(NamedTuple):
    """Sizes of a checked call: batch, tokens, heads, key dim, value dim, and the number of
    states (``B``, or ``N`` packed sequences with ``cu_seqlens``)."""

    B: int
    T: int
    H: int
    K: int
    V: int
    N: int


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> int:
    """Validate ``cu_seqlens`` for inputs ``[B, T, ...]``; returns N, the number of sequences.

    Shape and dtype are always checked; the values (start 0, end T, non-decreasing) only
    when ``cu_seqlens`` is concrete (not traced under ``jax.jit``).
    """
    shape = getattr(cu_seqlens, "shape", None)
    if shape is None or len(shape) != 1 or shape[0] < 2:
        raise ValueError("cu_seqlens: expected a 1-D integer array [N + 1] of cumulative sequence offsets "
                         f"(N >= 1), got {'shape ' + str(tuple(shape)) if shape is not None else type(cu_seqlens).__name__}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens: expected an integer dtype, got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"cu_seqlens: packed sequences go in a batch of one ([1, T, H, D]), got batch size B = {B}")
    if not isinstance(cu_seqlens, jax.core.Tracer):
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != T:
            raise ValueError(f"cu_seqlens: expected to start at 0 and end at T = {T}, got {cu[0]} … {cu[-1]}")
        if np.any(np.diff(cu) < 0):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {cu.tolist()}")
    return shape[0] - 1


def check_qkv(q, k, v, *, gates: Optional[Mapping[str, object]] = None, initial_state=None,
              cu_seqlens=None, same_dtype: bool = False, channel_gates: Iterable[str] = ()) -> Dims:
    """The one input contract of the linear-attention ops and kernels (docs/linear_attention.md).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` — floating, ``T >= 1``.
      gates: per-token gates by argument name (e.g. ``{"beta": beta, "log_decay": g}``),
        each ``[B, T, H]`` and floating; ``None`` entries are skipped.
      channel_gates: names among ``gates`` that may also be per key channel, ``[B, T, H, K]``
        (GLA / Kimi Delta Attention style log-decays; docs/linear_attention.md).
      initial_state: optional state ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``),
        floating.
      cu_seqlens: optional ``[N + 1]`` offsets of packed sequences (:func:`check_cu_seqlens`).
      same_dtype: also require q, k and v to share one dtype (the kernels' operands).

    Returns:
      :class:`Dims` ``(B, T, H, K, V, N)``.

    Raises:
      ValueError: naming the argument, the shape or dtype it got and the expected layout.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4, "[B, T, H, D]")
        check_floating(name, x)
    B, T, H, K = jnp.shape(q)
    check_shape("k", k, (B, T, H, K), "[B, T, H, K] (from q)")
    vs = tuple(jnp.shape(v))
    if vs[:3] != (B, T, H):
        raise ValueError(f"v: expected shape [B, T, H, V] with (B, T, H) = {(B, T, H)} (from q), got {vs}")
    V = vs[3]
    if T == 0:
        raise ValueError("q: expected at least one token (T >= 1), got T = 0")
    if same_dtype and not (jnp.result_type(q) == jnp.result_type(k) == jnp.result_type(v)):
        raise ValueError(f"q, k, v: expected one dtype, got {jnp.result_type(q)}, {jnp.result_type(k)}, "
                         f"{jnp.result_type(v)}")
    channel_gates = tuple(channel_gates)
    for name, x in (gates or {}).items():
        if x is None:
            continue
        if name in channel_gates:
            shape = tuple(jnp.shape(x))
            if shape not in ((B, T, H), (B, T, H, K)):
                raise ValueError(f"{name}: expected shape [B, T, H] = {(B, T, H)}, got {shape}; or, one "
                                 f"value per key channel, [B, T, H, K] = {(B, T, H, K)}")
        else:
            check_shape(name, x, (B, T, H), "[B, T, H]")
        check_floating(name, x)
    if cu_seqlens is None:
        N, shape, layout = B, (B, H, K, V), "[B, H, K, V]"
    else:
        N = check_cu_seqlens(cu_seqlens, B, T)
        shape, layout = (N, H, K, V), "[N, H, K, V] (one state per packed sequence, N from cu_seqlens)"
    if initial_state is not None:
        check_shape("initial_state", initial_state, shape, layout)
        check_floating("initial_state", initial_state)
    return Dims(B, T, H, K, V, N)
