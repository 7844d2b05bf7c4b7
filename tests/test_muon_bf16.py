"""Muon's Newton–Schulz with ``dtype="bfloat16"`` (native bfloat16 dots accumulating in
float32) against a NumPy emulation of the reference's roundings: the input and every op's
result rounded to bfloat16, every matmul summed exactly (float64) from the bfloat16
operands, then rounded; the coefficients multiply in float32 (PyTorch's ``scalar * bf16
tensor``), not rounded to bfloat16 first (docs/rules/lact.md step 5). This emulation
reproduces the official LaCT op's bfloat16 ``zeropower_via_newtonschulz5`` bit for bit
(checked against PyTorch 2.13 on CPU when the emulation was written; PyTorch is not a test
dependency). Checked under ``jax.jit``, where XLA used to drop float32 → bfloat16 → float32
round trips."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from tttla_jax.rules.lact.muon import NS5_COEFFS, newton_schulz5

BF = ml_dtypes.bfloat16


def _r(x):
    return np.asarray(x, np.float64).astype(BF).astype(np.float64)


def _ns5_bf16_loop(G):
    """One matrix, the reference's op order: X = bf16(G) / bf16(‖X‖ + 1e-7); five iterations
    A = X Xᵀ, B = b·A + (c·A) A, X = a·X + B X, each result rounded to bfloat16."""
    X = _r(G)
    t = X.shape[0] > X.shape[1]
    if t:
        X = X.T
    nrm = _r(np.sqrt(np.sum(X * X)))
    X = _r(X / _r(nrm + 1e-7))
    for a, b, c in NS5_COEFFS:
        a, b, c = (float(np.float32(z)) for z in (a, b, c))
        A = _r(X @ X.T)
        B = _r(_r(b * A) + _r(_r(c * A) @ A))
        X = _r(_r(a * X) + _r(B @ X))
    return X.T if t else X


def test_bf16_newton_schulz_rounds_like_the_reference():
    rng = np.random.default_rng(5)
    G = rng.normal(size=(3, 24, 40)).astype(np.float32)
    for M in (G, np.swapaxes(G, 1, 2)):
        got = np.asarray(jax.jit(lambda x: newton_schulz5(x, "bfloat16"))(jnp.asarray(M)), np.float64)
        ref = np.stack([_ns5_bf16_loop(m) for m in M])
        f32 = np.asarray(newton_schulz5(jnp.asarray(M)), np.float64)
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        rounding_effect = np.max(np.abs(f32 - ref)) / np.max(np.abs(ref))
        # every entry is a bfloat16 number, and the emulation is matched to a few ulps
        # (summation order inside a dot), far below what the bfloat16 rounding itself moves
        assert np.array_equal(got, _r(got))
        assert err < 2 ** -6, err
        assert rounding_effect > 4 * err, (rounding_effect, err)
        assert np.mean(got == ref) > 0.95


def test_bf16_newton_schulz_gradient_is_finite_and_close_to_float32():
    rng = np.random.default_rng(6)
    G = jnp.asarray(rng.normal(size=(2, 16, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 16, 16)), jnp.float32)
    g16 = jax.grad(lambda x: jnp.sum(newton_schulz5(x, "bfloat16") * w))(G)
    g32 = jax.grad(lambda x: jnp.sum(newton_schulz5(x) * w))(G)
    assert g16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g16)))
    rel = float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32))
    assert 1e-4 < rel < 0.5, rel  # bfloat16 roundings of the cotangents move it by ~20 %


def test_hand_written_newton_schulz_backward():
    """newton_schulz5_vjp: the exact gradient in the input's precision (float64 here, wide and
    tall matrices) and, for bfloat16, finite and as close to the float32 gradient as the
    autodiff of the bfloat16 forward."""
    from tttla_jax.rules.lact.muon import newton_schulz5_vjp
    rng = np.random.default_rng(7)
    for shape in ((2, 5, 8), (2, 8, 5)):
        G = jnp.asarray(rng.normal(size=shape), jnp.float64)
        g = jnp.asarray(rng.normal(size=shape), jnp.float64)
        ref = jax.vjp(newton_schulz5, G)[1](g)[0]
        np.testing.assert_allclose(np.asarray(newton_schulz5_vjp(G, g)), np.asarray(ref), rtol=0, atol=1e-10)
    G = jnp.asarray(rng.normal(size=(2, 16, 16)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 16, 16)), jnp.float32)
    g32 = jax.vjp(newton_schulz5, G)[1](g)[0]
    g16 = jax.jit(newton_schulz5_vjp, static_argnums=2)(G, g, "bfloat16")
    g16_auto = jax.vjp(lambda x: newton_schulz5(x, "bfloat16"), G)[1](g)[0]
    assert g16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g16)))
    rel = lambda x: float(jnp.linalg.norm(x - g32) / jnp.linalg.norm(g32))  # noqa: E731
    assert 1e-4 < rel(g16) < 1.5 * rel(g16_auto) + 1e-3, (rel(g16), rel(g16_auto))
