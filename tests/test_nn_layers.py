"""Building blocks (tttla_jax.nn.layers) against their one-line definitions, float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.nn.layers import Dense, RMSNorm, ShortConv, SwiGLU, dense

F64 = jnp.float64


def test_rmsnorm_matches_definition():
    n = RMSNorm(6, eps=1e-5, param_dtype=F64)
    n.scale[...] = jnp.arange(1.0, 7.0, dtype=F64)
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 6), F64))
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * np.arange(1.0, 7.0)
    np.testing.assert_allclose(n(jnp.asarray(x)), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"x: expected last axis of size 6"):
        n(jnp.zeros((3, 5), F64))


def test_short_conv_matches_loop_and_streams():
    K, F, T = 3, 4, 6
    conv = ShortConv(F, K, activation=False, param_dtype=F64, rngs=nnx.Rngs(0))
    w = np.asarray(conv.kernel[...])
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, T, F), F64))
    y, state = conv(jnp.asarray(x))
    xp = np.concatenate([np.zeros((2, K - 1, F)), x], axis=1)  # zeros before the start
    ref = np.stack([sum(w[j] * xp[:, t + j] for j in range(K)) for t in range(T)], axis=1)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(state, x[:, T - K + 1:])  # the last K-1 inputs
    # token by token with the state == whole sequence
    s, ys = conv.init_state(2, F64), []
    for t in range(T):
        yt, s = conv(jnp.asarray(x[:, t:t + 1]), s)
        ys.append(yt)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"state: expected shape \[B, kernel_size-1, F\]"):
        conv(jnp.asarray(x), jnp.zeros((2, K, F), F64))


def test_swiglu_matches_definition_and_count():
    m = SwiGLU(4, 6, param_dtype=F64, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (5, 4), F64)
    g, u, d = (np.asarray(p.kernel[...]) for p in (m.gate, m.up, m.down))
    xn = np.asarray(x)
    a = xn @ g
    ref = ((a / (1 + np.exp(-a))) * (xn @ u)) @ d
    np.testing.assert_allclose(m(x), ref, rtol=1e-12, atol=1e-12)
    assert sum(int(p.size) for p in jax.tree.leaves(nnx.state(m, nnx.Param))) == 3 * 4 * 6


def test_numpy_and_jax_scalars_are_accepted():
    """Integer sizes and float constants may be NumPy or JAX scalars (stored as Python
    numbers); booleans, non-integral sizes and non-positive floats are refused by name."""
    n = RMSNorm(np.int64(6), eps=jnp.float32(1e-5), param_dtype=F64)
    assert n.features == 6 and type(n.features) is int
    assert type(n.eps) is float and abs(n.eps - 1e-5) < 1e-12
    conv = ShortConv(jnp.int32(4), np.int64(3), param_dtype=F64, rngs=nnx.Rngs(0))
    assert (conv.features, conv.kernel_size) == (4, 3) and type(conv.kernel_size) is int
    assert conv.kernel.shape == (3, 4)
    assert SwiGLU(np.int32(4), np.int64(6), param_dtype=F64, rngs=nnx.Rngs(0)).up.kernel.shape == (4, 6)
    with pytest.raises(ValueError, match=r"features: expected a positive int, got True"):
        RMSNorm(True)
    with pytest.raises(ValueError, match=r"kernel_size: expected a positive int, got 3.0"):
        ShortConv(4, 3.0, rngs=nnx.Rngs(0))
    for bad in (0.0, -1e-6, True, None, np.ones(2)):
        with pytest.raises(ValueError, match=r"eps: expected a positive float"):
            RMSNorm(6, eps=bad)


@pytest.mark.parametrize("use_bias", [False, True])
def test_dense_equals_nnx_linear_with_gradients(use_bias):
    """``Dense`` (one 2-D product over the flattened leading axes) is ``nnx.Linear``: outputs and
    gradients w.r.t. x, kernel and bias (float64, 1e-10), for 1-, 2-, 3- and 4-D inputs."""
    layer = dense(5, 3, ("embed", "heads"), rngs=nnx.Rngs(0), param_dtype=jnp.float64, use_bias=use_bias)
    assert isinstance(layer, Dense) and isinstance(layer, nnx.Linear)
    if use_bias:
        layer.bias[...] = jnp.arange(3.0, dtype=jnp.float64)
    gd, st = nnx.split(layer)
    rng = np.random.default_rng(0)
    for shape in [(5,), (4, 5), (2, 7, 5), (2, 3, 4, 5)]:
        x = jnp.asarray(rng.normal(size=shape))
        w = jnp.asarray(rng.normal(size=shape[:-1] + (3,)))

        def loss(st, x, call):
            return jnp.sum(jnp.sin(call(nnx.merge(gd, st), x)) * w)

        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(st, x, Dense.__call__)
        want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(st, x, nnx.Linear.__call__)
        assert got[0].shape == () and abs(float(got[0] - want[0])) < 1e-10, shape
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
            assert a.shape == b.shape and float(jnp.max(jnp.abs(a - b))) < 1e-10, shape
        assert float(jnp.max(jnp.abs(got[1][1]))) > 1e-3  # a non-trivial gradient
