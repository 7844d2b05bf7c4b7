"""Decoder-only language model built from per-layer token mixers (hybrids are one config line).

``tokens → embed → L × [x + mixer(norm(x)); x + SwiGLU(norm(x))] → norm → tied head``.

Axis names: ``B`` batch, ``T`` tokens, ``W`` width, ``V`` vocabulary (here: logits axis).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Int

from tttla_jax import _checks
from tttla_jax import impl as _impl
from tttla_jax.parallel import context as _sp
from tttla_jax.nn._segments import packed_next_pos, packed_positions
from tttla_jax.nn.layers import RMSNorm, SwiGLU, partitioned, positive_float
from tttla_jax.nn.mixers import MIXERS, mixer_options, resolve_heads, resolve_positions


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_dtype(name: str, dt) -> None:
    if dt is None and name == "dtype":
        return
    try:
        ok = jnp.issubdtype(jnp.dtype(dt), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected a floating dtype{' or None' if name == 'dtype' else ''}, got {dt!r}")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Configuration of :class:`LanguageModel`, validated when it is built.

    Every inconsistency raises a ``ValueError`` naming the field here, before any
    parameter is allocated or anything is compiled.

    Attributes:
      vocab_size: vocabulary size (embedding rows; the head is tied to the embedding).
      width: model width ``W``.
      num_layers: number of blocks ``L``.
      num_heads: heads of every mixer.
      head_dim: per-head dim (default ``width // num_heads``, then ``num_heads`` must
        divide ``width``).
      mixers: a mixer name (every layer) or a tuple of ``num_layers`` names from
        :data:`tttla_jax.nn.mixers.MIXERS`, e.g. ``("delta_net", "swa") * 2`` for a hybrid.
      mixer_options: per mixer name, keyword options of that mixer, e.g.
        ``{"swa": {"window": 128}, "delta_net": {"use_gate": True, "chunk_size": 32}}``;
        ``"impl"`` here overrides :attr:`impl` for that mixer, e.g.
        ``{"ttt_linear": {"impl": "dual"}}``. Stored as a sorted tuple of pairs
        (hashable); read it back with :meth:`options_for`.
      impl: implementation of every mixer (a value of :data:`tttla_jax.impl.Impl`,
        docs/implementations.md; default ``"auto"``, which every mixer supports). A mixer
        that does not support it raises, naming the mixer and its ``impls``; override it
        per mixer with ``mixer_options``.
      mlp_hidden: SwiGLU hidden width (default ``8·W/3`` rounded up to a multiple of 8).
      norm_eps: RMSNorm epsilon.
      dtype: activation dtype (default: ``param_dtype``).
      param_dtype: parameter dtype.
      remat: rematerialise every block in the backward pass (``jax.checkpoint``).
      embed_init_std: std of the normal embedding initialiser.
      state_mixer: the second sublayer of every block: ``"swiglu"`` (default, ``x +
        SwiGLU(norm(x))``), ``"identity"`` (``x + norm(x)``: Zoology's blocks with
        ``torch.nn.Identity`` as state mixer, Arora et al. 2023) or ``"none"`` (no second
        sublayer).
      positions: ``"none"`` (default; position information only inside the mixers, e.g.
        RoPE) or ``"learned"``: a learned absolute position embedding ``[max_positions, W]``
        added to the token embedding (GPT-2 style, as Zoology's attention baselines).
      max_positions: number of learned positions (required with ``positions="learned"``); a
        fresh call with ``T > max_positions`` is a ``ValueError``, and a decoding position
        beyond the table gives NaN outputs for that token (never a silently reused row).
      embed_dropout: dropout rate on the (token + position) embedding, active only when the
        forward is given a dropout key (:meth:`LanguageModel.embed_inputs`; Zoology: 0.1).
    """

    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    head_dim: Optional[int] = None
    mixers: Union[str, tuple] = "linear_attention"
    mixer_options: Any = ()
    impl: str = "auto"
    mlp_hidden: Optional[int] = None
    norm_eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    remat: bool = False
    embed_init_std: float = 0.02
    state_mixer: str = "swiglu"
    positions: str = "none"
    max_positions: Optional[int] = None
    embed_dropout: float = 0.0

    def __post_init__(self):
        # NumPy / JAX integer and float scalars are accepted and stored as Python numbers
        for name in ("vocab_size", "width", "num_layers", "num_heads"):
            object.__setattr__(self, name, _checks.check_positive_int(name, getattr(self, name)))
        if self.head_dim is not None:
            object.__setattr__(self, "head_dim", _checks.check_positive_int("head_dim", self.head_dim))
        try:
            resolve_heads(self.width, self.num_heads, self.head_dim)
        except ValueError as e:
            raise ValueError(f"LMConfig: {e}") from None
        _impl.check_impl("impl", self.impl, _impl.IMPLS, where="LMConfig")
        mixers = (self.mixers,) * self.num_layers if isinstance(self.mixers, str) else self.mixers
        if not isinstance(mixers, (tuple, list)) or len(mixers) != self.num_layers:
            raise ValueError(
                f"mixers: expected a mixer name or a sequence of num_layers={self.num_layers} names, "
                f"got {self.mixers!r}")
        for i, m in enumerate(mixers):
            if m not in MIXERS:
                raise ValueError(f"mixers[{i}]: unknown mixer {m!r}, expected one of {tuple(MIXERS)}")
        object.__setattr__(self, "mixers", tuple(mixers))
        opts = self.mixer_options
        opts = dict(opts) if isinstance(opts, Mapping) else {k: dict(v) for k, v in opts}
        for name, kw in opts.items():
            if name not in MIXERS:
                raise ValueError(f"mixer_options: unknown mixer {name!r}, expected one of {tuple(MIXERS)}")
            if not isinstance(kw, Mapping):
                raise ValueError(f"mixer_options[{name!r}]: expected a dict of options, got {kw!r}")
            allowed = mixer_options(MIXERS[name]) + ("impl",)
            bad = sorted(set(kw) - set(allowed))
            if bad:
                raise ValueError(f"mixer_options[{name!r}]: unknown options {bad}, expected a subset of {allowed}")
        for name in sorted(set(self.mixers)):
            override = "impl" in opts.get(name, {})
            impl = opts[name]["impl"] if override else self.impl
            what = f"mixer_options[{name!r}]['impl']" if override else "impl"
            _impl.check_impl(what, impl, _impl.IMPLS, where=f"mixer {name!r}")
            supported = ("auto",) + tuple(MIXERS[name].impls)
            if impl not in supported:
                cls = MIXERS[name].__name__
                raise ValueError(
                    f"{what}: mixer {name!r} ({cls}) does not support impl={impl!r}; its impls are "
                    f"{supported} (override it for this mixer with "
                    f"mixer_options={{{name!r}: {{'impl': ...}}}})")
        object.__setattr__(self, "mixer_options",
                           tuple(sorted((k, tuple(sorted(dict(v).items()))) for k, v in opts.items())))
        if self.mlp_hidden is not None:
            object.__setattr__(self, "mlp_hidden", _checks.check_positive_int("mlp_hidden", self.mlp_hidden))
        for name in ("norm_eps", "embed_init_std"):
            object.__setattr__(self, name, positive_float(name, getattr(self, name)))
        _checks.check_choice("state_mixer", self.state_mixer, STATE_MIXERS)
        _checks.check_choice("positions", self.positions, POSITIONS)
        if self.positions == "learned":
            if self.max_positions is None:
                raise ValueError("max_positions: positions='learned' needs the table size "
                                 "max_positions (a positive int), got None")
            object.__setattr__(self, "max_positions",
                               _checks.check_positive_int("max_positions", self.max_positions))
        elif self.max_positions is not None:
            raise ValueError(f"max_positions: only used with positions='learned', got "
                             f"{self.max_positions!r} with positions={self.positions!r}")
        try:
            rate = float(self.embed_dropout)
        except (TypeError, ValueError):
            rate = float("nan")
        if isinstance(self.embed_dropout, bool) or not 0.0 <= rate < 1.0:
            raise ValueError(f"embed_dropout: expected a float in [0, 1), got {self.embed_dropout!r}")
        object.__setattr__(self, "embed_dropout", rate)
        _check_dtype("dtype", self.dtype)
        _check_dtype("param_dtype", self.param_dtype)
        # Build every distinct mixer abstractly (shapes only, no allocation, no compile) so
        # a mixer's own validation (e.g. RoPE needs an even head_dim) fails here.
        for name in sorted(set(self.mixers)):
            try:
                nnx.eval_shape(lambda: build_mixer(self, name, rngs=nnx.Rngs(0)))
            except ValueError as e:
                raise ValueError(f"LMConfig: mixer {name!r}: {e}") from None

    @property
    def hidden(self) -> int:
        """SwiGLU hidden width."""
        return self.mlp_hidden if self.mlp_hidden is not None else _round_up(8 * self.width // 3, 8)

    def options_for(self, mixer: str) -> dict:
        """The keyword options given for ``mixer`` (may include ``"impl"``)."""
        return dict(dict(self.mixer_options).get(mixer, ()))


STATE_MIXERS = ("swiglu", "identity", "none")
POSITIONS = ("none", "learned")


def build_mixer(config: LMConfig, name: str, *, rngs: nnx.Rngs):
    """Instantiate mixer ``name`` with the model-wide fields of ``config`` and its options."""
    opts = config.options_for(name)
    impl = opts.pop("impl", config.impl)
    return MIXERS[name](width=config.width, num_heads=config.num_heads, head_dim=config.head_dim,
                        impl=impl, dtype=config.dtype, param_dtype=config.param_dtype,
                        rngs=rngs, **opts)


class Block(nnx.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))`` then the state mixer
    (``config.state_mixer``): ``x + SwiGLU(norm(x))``, ``x + norm(x)`` or nothing."""

    def __init__(self, config: LMConfig, mixer: str, *, rngs: nnx.Rngs):
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.mixer_norm = RMSNorm(config.width, eps=config.norm_eps, **kw)
        self.mixer = build_mixer(config, mixer, rngs=rngs)
        self.state_mixer = config.state_mixer
        self.mlp_norm = (RMSNorm(config.width, eps=config.norm_eps, **kw)
                         if config.state_mixer != "none" else None)
        self.mlp = (SwiGLU(config.width, config.hidden, rngs=rngs, **kw)
                    if config.state_mixer == "swiglu" else None)

    def __call__(self, x, cache=None, positions=None, cu_seqlens=None, dropout_key=None):
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        if dropout_key is not None:  # the mixer's own dropout (e.g. Attention's attn_dropout)
            packed["dropout_key"] = dropout_key
        h, cache = self.mixer(self.mixer_norm(x), cache=cache, positions=positions, **packed)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        elif self.mlp_norm is not None:  # identity state mixer
            x = x + self.mlp_norm(x)
        return x, cache


def _block_apply(block, x, cache, positions, cu_seqlens=None):
    return block(x, cache, positions, cu_seqlens)


def _block_apply_remat(block, x, cache, positions, cu_seqlens=None):
    # jax.checkpoint on the functional (graphdef, state) view of the block: blocks never
    # mutate their variables, so nothing needs writing back (and, unlike nnx.remat, this
    # also works on a model merged inside another transform such as lax.scan).
    graphdef, state = nnx.split(block)

    def f(state, x, cache, positions, cu_seqlens):
        return nnx.merge(graphdef, state)(x, cache, positions, cu_seqlens)

    return jax.checkpoint(f)(state, x, cache, positions, cu_seqlens)


class LanguageModel(nnx.Module):
    """Decoder-only LM: embedding, ``num_layers`` :class:`Block` s, final RMSNorm, tied head.

    ``__call__(tokens, *, cache=None, positions=None) -> (logits, new_cache)``: a full
    forward is ``model(tokens)``; prefill is the same call (the returned cache is the
    state after the prompt); decoding feeds one (or a few) tokens with the cache.
    Logits are float32 (float64 for a float64 model).

    Cache: ``{"pos": [B] int32 next position, "layers": (mixer cache per layer, ...)}``.
    """

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, LMConfig):
            raise ValueError(f"config: expected an LMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nnx.Embed(
            config.vocab_size, config.width, dtype=config.dtype, param_dtype=config.param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(config.embed_init_std), ("vocab", "embed")),
            rngs=rngs)
        self.pos_embed = nnx.Embed(
            config.max_positions, config.width, dtype=config.dtype, param_dtype=config.param_dtype,
            embedding_init=partitioned(nnx.initializers.normal(config.embed_init_std), (None, "embed")),
            rngs=rngs) if config.positions == "learned" else None
        self.blocks = nnx.List([Block(config, m, rngs=rngs) for m in config.mixers])
        self.final_norm = RMSNorm(config.width, eps=config.norm_eps, dtype=config.dtype,
                                  param_dtype=config.param_dtype)

    def embed_inputs(self, tokens, positions, dropout_key=None):
        """The residual stream's input ``[B, T, W]``: token embedding, plus the learned
        position embedding (``positions="learned"``; a position outside ``[0,
        max_positions)`` gives NaN for that token), then embedding dropout when a
        ``dropout_key`` is given (training; ``None`` is the deterministic forward)."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            T, n = tokens.shape[1], self.config.max_positions
            if T > n:
                raise ValueError(f"tokens: expected T <= max_positions = {n} learned positions, "
                                 f"got T = {T}")
            ok = (positions >= 0) & (positions < n)
            pe = self.pos_embed(jnp.clip(positions, 0, n - 1))
            x = jnp.where(ok[..., None], x + pe, jnp.nan)
        rate = self.config.embed_dropout
        if dropout_key is not None and rate > 0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        return x

    def init_cache(self, batch_size: int) -> dict:
        """An empty cache for ``batch_size`` sequences (position 0, zero fast weights)."""
        _checks.check_positive_int("batch_size", batch_size)
        return {"pos": jnp.zeros((batch_size,), jnp.int32),
                "layers": tuple(b.mixer.init_cache(batch_size) for b in self.blocks)}

    def __call__(self, tokens: Int[Array, "b t"], *, cache: Optional[dict] = None,
                 positions: Optional[Int[Array, "b t"]] = None,
                 cu_seqlens: Optional[Int[Array, "n1"]] = None):
        """Returns ``(logits [B, T, V], new_cache)``.

        ``positions`` default to ``cache["pos"] + arange(T)`` (``arange(T)`` without a cache).

        Under :func:`tttla_jax.parallel.sequence_parallel` (inside ``jax.shard_map`` over
        that axis) ``tokens`` is this device's slice of one sequence: positions default to
        its global positions, the logits are the slice's and the cache is the state after
        the last global token (docs/context_parallel.md).

        ``cu_seqlens`` ``[N + 1]``: ``tokens`` ``[1, T]`` holds N packed documents
        (``[0, T_1, T_1 + T_2, …, T]``), each computed as if alone (every mixer gets
        ``cu_seqlens``); the cache in and out is per document (``init_cache(N)``, batch N, so
        decoding continues every document with tokens ``[N, 1]``) and positions restart at
        every document (continue from ``cache["pos"]``) unless given ``[1, T]``.
        """
        _checks.check_rank("tokens", tokens, 2, "[B, T]")
        if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise ValueError(f"tokens: expected an integer dtype, got {jnp.result_type(tokens)}")
        B, T = tokens.shape
        if T == 0:
            raise ValueError("tokens: expected at least one token (T >= 1), got T = 0")
        NB = B if cu_seqlens is None else _checks.check_cu_seqlens(cu_seqlens, B, _sp.global_length(T))
        fresh = cache is None  # mixers then get cache=None (a fresh sequence, known statically)
        if fresh:
            cache = self.init_cache(NB)
        if not (isinstance(cache, dict) and "pos" in cache and "layers" in cache):
            raise ValueError("cache: expected the dict returned by init_cache / a previous call "
                             f"(keys 'pos', 'layers'), got {type(cache).__name__}")
        if len(cache["layers"]) != len(self.blocks):
            raise ValueError(f"cache['layers']: expected {len(self.blocks)} layer caches, "
                             f"got {len(cache['layers'])}")
        if cu_seqlens is None:
            _checks.check_shape("cache['pos']", cache["pos"], (B,), "[B]")
            if positions is None and _sp.sequence_axis() is not None:  # a slice of one sequence
                positions = (cache["pos"][:, None] + _sp.shard_offset(T)
                             + jnp.arange(T, dtype=jnp.int32)[None])
            positions = resolve_positions(positions, cache, B, T)
        else:
            _checks.check_shape("cache['pos']", cache["pos"], (NB,), "[N] (one per packed document)")
            positions = packed_positions(positions, cache["pos"], cu_seqlens, T)

        x = self.embed_inputs(tokens, positions)
        apply = _block_apply_remat if self.config.remat else _block_apply
        new_layers = []
        for block, c in zip(self.blocks, cache["layers"]):
            x, c = apply(block, x, None if fresh else c, positions, cu_seqlens)
            new_layers.append(c)
        x = self.final_norm(x)
        logits = self.embed.attend(x)
        sd = _checks.state_dtype(logits)
        pos = (positions[:, -1] + 1 if cu_seqlens is None
               else packed_next_pos(positions, cache["pos"], cu_seqlens))
        if _sp.sequence_axis() is not None:  # the position after the last global token
            pos = _sp.from_last_shard(pos)
        return logits.astype(sd), {"pos": pos, "layers": tuple(new_layers)}


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param`` leaves) of ``model``."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
