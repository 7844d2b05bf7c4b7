"""Reference loop for docs/rules/titans.md, Titans neural memory — read it next to that page.

Per head, the memory is either linear, ``M(x) = x W``, or a 2-layer MLP
``M(x) = act(x W1) W2`` (no biases). The inner loss of token t is
``ℓ_t(W) = mean_d (M(k_t) − v_t)²`` (mean over the value dim), weighted by θ_t.
Chunks n = 1 … N of size c (the last one may be partial):

    u_n = −Σ_{t∈n} θ_t ∇_W ℓ_t(W_ref)
    S_n = η_n S_{n−1} + u_n            (S_0 = 0)
    M_n = (1 − α_n) M_{n−1} + S_n      (M_0 = W_0)
    o_t = M_{⌊(t+1)/c⌋}(q_t)           (t 0-based)

``W_ref`` is the memory at the start of the current TTT batch of ``batch_size`` tokens
(a multiple of c); ``batch_size=None`` uses ``W_0`` throughout. The inner gradient is
taken with ``jax.grad`` of the per-token loss (independent of the closed form in
:mod:`tttla_jax.rules.titans`); the loops are unrolled at trace time, so ``jax.grad``
of this function gives reference outer gradients. Everything runs in float64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

f64 = jnp.float64


def _act(name):
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"activation: got {name!r}, expected one of ('gelu', 'silu')")


def _read(W, x, activation):
    """M(x) for x [B, H, D] and per-(batch, head) weights."""
    if isinstance(W, (tuple, list)):
        W1, W2 = W
        h = _act(activation)(jnp.einsum("bhk,bhkf->bhf", x, W1))
        return jnp.einsum("bhf,bhfv->bhv", h, W2)
    return jnp.einsum("bhk,bhkv->bhv", x, W)


def titans_loop(q, k, v, theta, momentum, decay, *, W0, chunk_size, batch_size=None,
                activation="gelu"):
    """docs/rules/titans.md chunk by chunk, token by token, in float64. Returns ``(o, M_N)``.

    Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; theta ``[B, T, H]``; momentum,
    decay ``[B, H, N]`` with ``N = ceil(T / chunk_size)``; ``W0`` ``[H, K, V]`` (linear)
    or a pair ``([H, K, F], [H, F, V])`` (MLP). ``M_N`` includes the update of a trailing
    partial chunk (whose own tokens read ``M_{N−1}``).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    c = chunk_size
    N = -(-T // c)
    mlp = isinstance(W0, (tuple, list))
    bcast = lambda w: jnp.broadcast_to(jnp.asarray(w, f64), (B,) + w.shape)
    M = tuple(bcast(w) for w in W0) if mlp else bcast(W0)
    S = jax.tree_util.tree_map(jnp.zeros_like, M)
    W_ref = M
    Ms = [M]  # Ms[n] = M_n

    def chunk_loss(W, n):
        # Σ_{t∈n} θ_t ℓ_t(W), summed over (b, h): each (b, h) block of W sees only its terms.
        total = 0.0
        for t in range(n * c, min((n + 1) * c, T)):
            err = _read(W, k[:, t].astype(f64), activation) - v[:, t].astype(f64)
            total = total + jnp.sum(theta[:, t].astype(f64) * jnp.mean(err ** 2, axis=-1))
        return total

    for n in range(N):
        if batch_size is not None and (n * c) % batch_size == 0:
            W_ref = M  # start of a TTT batch
        u = jax.tree_util.tree_map(jnp.negative, jax.grad(chunk_loss)(W_ref, n))
        eta = momentum[:, :, n].astype(f64)[:, :, None, None]
        alpha = decay[:, :, n].astype(f64)[:, :, None, None]
        S = jax.tree_util.tree_map(lambda s, un: eta * s + un, S, u)
        M = jax.tree_util.tree_map(lambda m, s: (1 - alpha) * m + s, M, S)
        Ms.append(M)

    outs = []
    for t in range(T):
        outs.append(_read(Ms[(t + 1) // c], q[:, t].astype(f64), activation))
    return jnp.stack(outs, axis=1), M
