"""Input validation shared by every public op.

Every error names the argument, the shape (or value) it got and what was expected,
so a user never has to read a traceback through ``lax.scan`` to find a typo.
Checks run at trace time (on static shapes), so they cost nothing under ``jit``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax.numpy as jnp


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


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_floating(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {jnp.result_type(x)}")


def state_dtype(*xs):
    """Accumulation dtype: float64 if any input is float64, else float32."""
    return jnp.float64 if any(jnp.result_type(x) == jnp.float64 for x in xs if x is not None) else jnp.float32
