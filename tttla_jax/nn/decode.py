"""Decoding: cache initialisation, prefill, single-token steps and jitted ``generate``.

The cache is explicit (``LanguageModel.init_cache``): prefill is a full forward on the
prompt that returns the state after it (packed prompts with ``cu_seqlens``: one cache per
prompt); each decoding step feeds one token and the
cache and gets the next logits and cache. Because every mixer's cache holds exactly the
state its recurrence needs (fast weights, conv inputs, window keys), prefill + steps
give the same logits as one full forward (``tests/test_nn_decode.py``).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Float, Int

from tttla_jax import _checks


def init_cache(model, batch_size: int) -> dict:
    """An empty cache for ``model`` (a :class:`~tttla_jax.nn.model.LanguageModel` or a mixer)."""
    return model.init_cache(batch_size)


def prefill(model, prompt_tokens: Int[Array, "b t"], cache: Optional[dict] = None, *,
            cu_seqlens: Optional[Int[Array, "n1"]] = None):
    """Full forward over the prompt: ``(logits [B, T, V], cache after the prompt)``.

    ``cu_seqlens`` ``[N + 1]``: ``prompt_tokens`` ``[1, T]`` packs N prompts (each run as if
    alone); the cache is then per prompt (batch N), so :func:`decode_step` continues all N
    with tokens ``[N]``.
    """
    if cu_seqlens is None:
        return model(prompt_tokens, cache=cache)
    return model(prompt_tokens, cache=cache, cu_seqlens=cu_seqlens)


def decode_step(model, token: Int[Array, "b"], cache: dict):
    """One token per sequence: ``(logits [B, V], new_cache)``."""
    _checks.check_rank("token", token, 1, "[B]")
    logits, cache = model(token[:, None], cache=cache)
    return logits[:, 0], cache


def sample_logits(logits: Float[Array, "b v"], key, *, temperature: float = 0.0,
                  top_k: Optional[int] = None) -> Int[Array, "b"]:
    """Greedy (``temperature == 0``: argmax) or temperature / top-k sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, state, prompt, rng, *, max_new_tokens, temperature, top_k):
    model = nnx.merge(graphdef, state)
    logits, cache = model(prompt)
    keys = jax.random.split(rng, max_new_tokens)
    first = sample_logits(logits[:, -1], keys[0], temperature=temperature, top_k=top_k)

    def step(carry, key):
        tok, cache = carry
        m = nnx.merge(graphdef, state)
        logits, cache = m(tok[:, None], cache=cache)
        nxt = sample_logits(logits[:, 0], key, temperature=temperature, top_k=top_k)
        return (nxt, cache), nxt

    _, rest = lax.scan(step, (first, cache), keys[1:])
    return jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)


def generate(model, prompt_tokens: Int[Array, "b t"], max_new_tokens: int, *, rng,
             temperature: float = 0.0, top_k: Optional[int] = None) -> Int[Array, "b n"]:
    """Prefill on ``prompt_tokens`` then sample ``max_new_tokens`` tokens, all in one jit.

    Greedy (argmax) when ``temperature == 0``; otherwise samples from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits if given.
    The model is split into (graphdef, state) and merged inside the jitted function; a
    new compile happens per (model structure, shapes, ``max_new_tokens``, ``temperature``,
    ``top_k``).

    Returns:
      ``[B, max_new_tokens]`` int32: the generated tokens only (not the prompt).
    """
    _checks.check_rank("prompt_tokens", prompt_tokens, 2, "[B, T]")
    if not jnp.issubdtype(jnp.result_type(prompt_tokens), jnp.integer):
        raise ValueError(f"prompt_tokens: expected an integer dtype, got {jnp.result_type(prompt_tokens)}")
    if prompt_tokens.shape[1] == 0:
        raise ValueError("prompt_tokens: expected a non-empty prompt (T >= 1), got T = 0")
    _checks.check_positive_int("max_new_tokens", max_new_tokens)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a float >= 0, got {temperature!r}")
    if top_k is not None:
        _checks.check_positive_int("top_k", top_k)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and top_k > vocab:
            raise ValueError(f"top_k: expected at most vocab_size = {vocab}, got {top_k}")
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(prompt_tokens), rng,
                     max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k)
