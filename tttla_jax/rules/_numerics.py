"""Numerical helpers shared by the rules."""
from __future__ import annotations

import jax.numpy as jnp


def sqrt0(ss):
    """``sqrt(ss)`` of a sum of squares with the derivative 0 at ``ss = 0``, as the
    reference's autograd gives for a norm of zeros: ``x / (‖x‖ + ε)`` of an all-zero ``x``
    (a chunk of zero keys, padding) then has a finite gradient instead of ``0 · ∞ = NaN``."""
    pos = ss > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, ss, 1.0)), 0.0)


def safe_den(nrm):
    """``nrm`` where it is positive, 1 elsewhere: the divisor of the ``x (g·x) / ‖x‖`` term of a
    normalisation's backward, which is 0 (not 0/0) when ``x = 0``."""
    return jnp.where(nrm > 0, nrm, 1.0)
