"""TTT-Linear and TTT-MLP layers (Sun et al., 2024, "Learning to (Learn at Test Time)"),
as the official PyTorch TTT implementation's ``TTTLinear`` / ``TTTMLP`` (docs/rules/ttt.md).

Layer (per token ``x ∈ R^W``, heads ``H`` of size ``D``)::

    XQ, XK, XV = x W_q, x W_k, x W_v                     (no bias)
      (share_qk: XQ = conv_q(x W_q), XK = conv_k(x W_q), causal depthwise convs with bias)
    XQ, XK ← RoPE(XQ, XK; position mod C)                (interleaved pairs, base rope_theta)
    lr_j = base_lr · sigmoid(x_j w_lr + b_lr) / D        (per head; Sec. 2.7 "learnable η")
    token_eta_i = max(0, 1/(i+1) + learnable_token_idx_i) (i = position inside the mini-batch)
    o = TTT core (tttla_jax.rules.ttt, docs/rules/ttt.md)          (o_i = XQ_i + LN(XQ_i W_i + b_i))
    y = o_proj( [gelu_tanh(x W_g) ⊙] post_norm(o) )

The core is :class:`tttla_jax.rules.ttt.TTTLinearRule` / :class:`TTTMLPRule`; this module
implements none of its math. ``impl`` (docs/implementations.md) is the rule's: the two
exact forms of a mini-batch, ``"dual"`` (matmuls; what ``"auto"`` runs) and ``"primal"``
(per-row weights ``W_i`` materialised, the per-token view). There is no associative scan
across mini-batches (the inner LayerNorm, bias and residual break it, docs/rules/ttt.md
note), so no other implementation exists.

RoPE: the reference permutes q, k into a rotate-half layout, rotates and permutes back,
which is the *interleaved* rotation of the pairs ``(x_{2i}, x_{2i+1})`` by
``p · θ^{−2i/D}``; it is applied here directly in that form with ``p = position mod C``.

Decoding (mixer protocol, :mod:`tttla_jax.nn`): inside a mini-batch every gradient is
taken at the mini-batch's initial weights, so the cache holds the fast weights at the last
mini-batch boundary and the rotated q, k, v and lr of the partial mini-batch
(:mod:`tttla_jax.nn._segments`); each call re-runs that partial mini-batch with the new
tokens. Any split of a sequence therefore gives the outputs of one call.

Reference-weight import: :meth:`TTTLinear.reference_weight_map` maps the PyTorch names
(``q_proj.weight``, ``W1``, ``b1``, ``ttt_norm_weight``, ``learnable_ttt_lr_weight``,
``learnable_token_idx``, ``post_norm.weight``, ``conv_q.weight``, ``g_proj.weight``, …)
onto this layer; see :func:`tttla_jax.nn.load_reference_weights`.
"""
from __future__ import annotations

from typing import Optional

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax.nn._segments import packed_next_pos, packed_positions, run_segments, run_segments_packed
from tttla_jax.nn.layers import ShortConv, dense, partitioned
from tttla_jax.nn.mixers import (Mixer, _check_cache, check_layer_impl, register_mixer, resolve_heads,
                                 resolve_positions)
from tttla_jax.nn.recipes import RecipeMixin
from tttla_jax.nn.weights import identity, jax_to_torch_linear, torch_linear_to_jax
from tttla_jax.rules.ttt import (
    TTTLinearRule, TTTMLPRule, default_token_eta, gelu_tanh, ttt_lr,
)

__all__ = ["TTTLinear", "TTTMLP", "rope_interleaved"]


def rope_interleaved(x: Float[Array, "b t h d"], positions: Int[Array, "b t"], *,
                     base: float = 10000.0) -> Float[Array, "b t h d"]:
    """Rotary embedding on interleaved pairs ``(x_{2i}, x_{2i+1})`` by ``p · base^{−2i/D}``
    (Su et al., 2021, eq. 34, the GPT-J/EasyLM layout the TTT reference uses)."""
    B, T, H, D = x.shape
    if D % 2:
        raise ValueError(f"x: RoPE needs an even head dim, got D = {D}")
    sd = _checks.state_dtype(x)
    inv = base ** (-jnp.arange(0, D, 2, dtype=sd) / D)
    ang = positions.astype(sd)[..., None] * inv  # [B, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    xf = x.astype(sd)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    y = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    return y.astype(x.dtype)


def _normal(std):
    def init(key, shape, dtype):
        return std * jax.random.normal(key, shape, dtype)
    return init


def _conv_to_jax(w):  # torch depthwise Conv1d weight [F, 1, K] -> ShortConv kernel [K, F]
    return np.asarray(w)[:, 0, :].T


def _conv_to_torch(k):
    return np.asarray(k).T[:, None, :]


class _TTTLayer(RecipeMixin, Mixer):
    """Shared TTT-Linear / TTT-MLP layer (module docstring)."""

    impls = ("dual", "primal")
    _fast_names: tuple = ()
    _rule_cls: type = TTTLinearRule

    def __init__(self, *, width: int, num_heads: int, head_dim: Optional[int] = None,
                 mini_batch_size: int = 16, base_lr: float = 1.0, rope_theta: float = 10000.0,
                 use_rope: bool = True, share_qk: bool = False, conv_kernel: int = 4,
                 use_gate: bool = False, init_std: float = 0.02, impl: str = "auto",
                 short_conv: int = 0, feature_map: str = "identity", qk_norm: bool = False,
                 head_norm: bool = False, fast_bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.head_dim = resolve_heads(width, num_heads, head_dim)
        if not isinstance(fast_bias, (bool, np.bool_)):
            raise ValueError(f"fast_bias: expected True (the reference's fast network x W + b) or False "
                             f"(bias-free x W), got {fast_bias!r}")
        self.fast_bias = bool(fast_bias)
        if share_qk and short_conv:
            raise ValueError(f"short_conv: the recipe conv (short_conv={short_conv!r}) and share_qk=True "
                             f"(the reference's shared q/k projection with its own convs) are exclusive; "
                             f"pass one of them")
        mini_batch_size = _checks.check_positive_int("mini_batch_size", mini_batch_size)
        conv_kernel = _checks.check_positive_int("conv_kernel", conv_kernel)
        lr = _checks.check_scale(base_lr, "base_lr")
        if lr is None or not lr > 0:
            raise ValueError(f"base_lr: expected a positive float, got {base_lr!r}")
        if use_rope and self.head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head dim, got {self.head_dim} "
                             f"(or pass use_rope=False)")
        check_layer_impl(type(self), impl)
        self.width, self.num_heads = width, num_heads
        self.mini_batch_size, self.base_lr = mini_batch_size, float(base_lr)
        self.rope_theta, self.use_rope = rope_theta, use_rope
        self.share_qk, self.conv_kernel, self.use_gate = share_qk, conv_kernel, use_gate
        self.impl, self.dtype, self.param_dtype = impl, dtype, param_dtype
        H, D, HD = num_heads, self.head_dim, num_heads * self.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        init = nnx.initializers.normal(init_std)
        self.q_proj = dense(width, HD, ("embed", "heads"), init=init, **kw)
        self.k_proj = None if share_qk else dense(width, HD, ("embed", "heads"), init=init, **kw)
        self.v_proj = dense(width, HD, ("embed", "heads"), init=init, **kw)
        self.o_proj = dense(HD, width, ("heads", "embed"), init=init, **kw)
        if share_qk:
            conv_kw = dict(activation=False, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
            self.conv_q = ShortConv(HD, conv_kernel, **conv_kw)
            self.conv_k = ShortConv(HD, conv_kernel, **conv_kw)
            zeros = partitioned(nnx.initializers.zeros_init(), ("heads",))
            self.conv_q_bias = nnx.Param(zeros(rngs.params(), (HD,), param_dtype))
            self.conv_k_bias = nnx.Param(zeros(rngs.params(), (HD,), param_dtype))
        else:
            self.conv_q = self.conv_k = self.conv_q_bias = self.conv_k_bias = None
        self._init_recipe(features=HD, short_conv=short_conv, feature_map=feature_map, qk_norm=qk_norm,
                          head_norm=head_norm, head_dim=D, norm_eps=1e-6, **kw)
        self.g_proj = dense(width, HD, ("embed", "heads"), init=init, **kw) if use_gate else None
        # learnable inner learning rate (Sec. 2.7): lr = base_lr · sigmoid(x w + b) / D
        self.ttt_lr_weight = nnx.Param(partitioned(_normal(0.02), ("embed", None))(
            rngs.params(), (width, H), param_dtype))
        self.ttt_lr_bias = nnx.Param(partitioned(nnx.initializers.zeros_init(), (None,))(
            rngs.params(), (H,), param_dtype))
        self.learnable_token_idx = nnx.Param(partitioned(nnx.initializers.zeros_init(), (None,))(
            rngs.params(), (mini_batch_size,), param_dtype))
        self.ttt_norm_weight = nnx.Param(partitioned(nnx.initializers.ones_init(), (None, "head_dim"))(
            rngs.params(), (H, D), param_dtype))
        self.ttt_norm_bias = nnx.Param(partitioned(nnx.initializers.zeros_init(), (None, "head_dim"))(
            rngs.params(), (H, D), param_dtype))
        self._init_fast_weights(rngs, init_std)
        self.post_norm = nnx.LayerNorm(
            HD, epsilon=1e-6, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
            scale_init=partitioned(nnx.initializers.ones_init(), ("heads",)),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("heads",)), rngs=rngs)

    # ----------------------------------------------------------------- subclass hooks
    def _init_fast_weights(self, rngs, std):  # pragma: no cover - abstract
        raise NotImplementedError

    def _rule(self):
        """The rule running this layer's core, in the layer's resolved ``impl``."""
        rule = self._rule_cls(mini_batch_size=self.mini_batch_size, bias=self.fast_bias)
        return dataclasses.replace(rule, impl=rule.resolve_impl(self.impl))

    @property
    def _cached_fast_names(self) -> tuple:
        """The fast weights the cache carries: all of them, or (``fast_bias=False``) the
        matrices only; the rule's bias leaves are then zeros it never reads or updates."""
        return tuple(n for n in self._fast_names if self.fast_bias or not n.startswith("b"))

    def _rule_state(self, cache: dict, batch: int):
        """The rule's state from the cache's fast weights (zero biases when bias-free)."""
        shapes = jax.eval_shape(lambda: self._fast_weights(batch))  # the state's type and shapes only
        return type(shapes)(*(cache[n] if n in cache else jnp.zeros(a.shape, cache["W1"].dtype)
                              for n, a in zip(self._fast_names, shapes)))

    def _fast_weights(self, batch: int):
        """Learned initial fast weights broadcast to ``[B, ...]`` (the rule's state)."""
        raise NotImplementedError  # pragma: no cover

    # ----------------------------------------------------------------- cache
    def _cache_spec(self, B: int, b: str = "B") -> dict:
        H, D, C = self.num_heads, self.head_dim, self.mini_batch_size
        spec = {name: ((B,) + tuple(getattr(self, name).shape), f"[{b}, {name} shape]")
                for name in self._cached_fast_names}
        for name in ("buf_q", "buf_k", "buf_v"):
            spec[name] = ((B, C - 1, H, D), f"[{b}, mini_batch_size-1, H, D]")
        spec["buf_lr"] = ((B, C - 1, H), f"[{b}, mini_batch_size-1, H]")
        spec["buf_len"] = ((B,), f"[{b}]")
        spec["pos"] = ((B,), f"[{b}]")
        if self.share_qk:
            spec["conv"] = ((B, self.conv_kernel - 1, H * D), f"[{b}, conv_kernel-1, H*D]")
        spec.update(self._recipe_cache_spec(B, b))
        return spec

    def init_cache(self, batch_size: int) -> dict:
        """Fresh decoding state for ``batch_size`` sequences.

        Keys: the fast weights (``"W1"``, ``"b1"`` and, for TTT-MLP, ``"W2"``, ``"b2"``;
        ``[B, H, ...]``, the learned initial weights broadcast, float32/float64) at the last
        mini-batch boundary (``fast_bias=False``: no ``"b1"``, ``"b2"``); ``"buf_q"``, ``"buf_k"``, ``"buf_v"`` ``[B, C−1, H, D]``
        (activation dtype) and ``"buf_lr"`` ``[B, C−1, H]`` (state dtype): the partial
        mini-batch; ``"buf_len"`` ``[B]`` its valid length; ``"pos"`` ``[B]`` the next
        position (RoPE when ``positions`` is not passed); ``"conv"`` ``[B, K−1, H·D]``
        (share_qk) the shared conv input history.
        """
        _checks.check_positive_int("batch_size", batch_size)
        H, D, C = self.num_heads, self.head_dim, self.mini_batch_size
        sd, ad = self._state_dtype(), self._act_dtype()
        cache = {n: x.astype(sd) for n, x in zip(self._fast_names, self._fast_weights(batch_size))
                 if n in self._cached_fast_names}
        for name in ("buf_q", "buf_k", "buf_v"):
            cache[name] = jnp.zeros((batch_size, C - 1, H, D), ad)
        cache["buf_lr"] = jnp.zeros((batch_size, C - 1, H), sd)
        cache["buf_len"] = jnp.zeros((batch_size,), jnp.int32)
        cache["pos"] = jnp.zeros((batch_size,), jnp.int32)
        if self.share_qk:
            cache["conv"] = jnp.zeros((batch_size, self.conv_kernel - 1, H * D), ad)
        cache.update(self._recipe_init_cache(batch_size, ad))
        return cache

    # ----------------------------------------------------------------- forward
    def __call__(self, x: Float[Array, "b t w"], *, cache: Optional[dict] = None,
                 positions: Optional[Int[Array, "b t"]] = None,
                 cu_seqlens: Optional[Int[Array, "n1"]] = None):
        """Returns ``(y [B, T, W], new_cache)``.

        ``positions`` ``[B, T]`` (or ``[T]``) absolute integer positions, default
        ``cache["pos"] + arange(T)``; RoPE uses ``positions mod mini_batch_size``.
        Mini-batches are counted from the first token the cache has seen.

        ``cu_seqlens`` ``[N + 1]``: N packed sequences in ``x`` ``[1, T, W]``, each computed
        as if alone; the cache in and out holds one entry per sequence (leading dim N) and
        positions restart at every sequence (``cache["pos"]``, 0 for a fresh cache). Every
        sequence starts a fresh mini-batch (:func:`tttla_jax.nn._segments.packed_streams`).
        """
        B, T = self._check_x(x)
        NB, nb = self._cache_batch(B, T, cu_seqlens)
        packed = cu_seqlens is not None
        empty = cache is None
        if empty:
            cache = self.init_cache(NB)
        _check_cache(cache, self._cache_spec(NB, nb))
        extra = [n for n in self._fast_names if n in cache and n not in self._cached_fast_names]
        if extra:
            raise ValueError(f"cache: has fast-weight biases {extra}, but this layer has fast_bias=False "
                             f"(its fast network has no bias); build the cache with its init_cache")
        if packed:
            positions = packed_positions(positions, cache["pos"], cu_seqlens, T)
        else:
            positions = resolve_positions(positions, cache, B, T)
        H, D, C = self.num_heads, self.head_dim, self.mini_batch_size
        new_cache = {}
        conv = dict(cu_seqlens=cu_seqlens) if packed else {}
        if self.share_qk:
            xq = self.q_proj(x)
            XQ, _ = self.conv_q(xq, cache["conv"], **conv)
            XK, new_cache["conv"] = self.conv_k(xq, cache["conv"], **conv)
            XQ = XQ + self.conv_q_bias[...].astype(XQ.dtype)
            XK = XK + self.conv_k_bias[...].astype(XK.dtype)
        else:
            XQ, XK = self.q_proj(x), self.k_proj(x)
        # recall recipes (docs/recipes.md): conv on q, k, v, feature map and L2 norm on q, k
        XQ, XK, XV = self._recipe_qkv(XQ, XK, self.v_proj(x), cache, new_cache, B, T, H, D, cu_seqlens)
        if self.use_rope:
            p = positions.astype(jnp.int32) % C
            XQ = rope_interleaved(XQ, p, base=self.rope_theta)
            XK = rope_interleaved(XK, p, base=self.rope_theta)
        sd = self._state_dtype() if x.dtype != jnp.float64 else jnp.float64
        lr = ttt_lr(x.astype(sd), self.ttt_lr_weight[...].astype(sd), self.ttt_lr_bias[...].astype(sd),
                    base_lr=self.base_lr, head_dim=D)
        token_eta = default_token_eta(C, self.learnable_token_idx[...].astype(sd), dtype=sd)
        gamma = self.ttt_norm_weight[...].astype(sd)
        beta = self.ttt_norm_bias[...].astype(sd)
        rule = self._rule()
        state = self._rule_state(cache, NB)

        def step(st, seg):
            q, k, v, l = seg
            o, st2 = rule.recurrent(q, k, v, l, token_eta, gamma, beta, st, output_final_state=True)
            return type(st)(*(a.astype(b.dtype) for a, b in zip(st2, st))), o

        bufs = (cache["buf_q"], cache["buf_k"], cache["buf_v"], cache["buf_lr"])
        xs = (XQ, XK, XV, lr.astype(cache["buf_lr"].dtype))
        if packed:
            o, st, nbufs, nlen = run_segments_packed(step, state, xs, bufs, cache["buf_len"], C,
                                                     cu_seqlens, empty=empty)
            new_cache["pos"] = packed_next_pos(positions, cache["pos"], cu_seqlens)
        else:
            o, st, nbufs, nlen = run_segments(step, state, xs, bufs, cache["buf_len"], C, empty=empty)
            new_cache["pos"] = (positions[:, -1] + 1).astype(jnp.int32)
        new_cache.update((n, a) for n, a in zip(self._fast_names, st) if n in self._cached_fast_names)
        for name, b, old in zip(("buf_q", "buf_k", "buf_v", "buf_lr"), nbufs, bufs):
            new_cache[name] = b.astype(old.dtype)
        new_cache["buf_len"] = nlen
        o = self._recipe_out(o.astype(self._act_dtype()))
        o = self.post_norm(o.reshape(B, T, H * D))
        if self.use_gate:
            o = gelu_tanh(self.g_proj(x)) * o
        return self.o_proj(o), new_cache

    # ----------------------------------------------------------------- weights
    def _common_weight_map(self) -> dict:
        lin = (torch_linear_to_jax, jax_to_torch_linear)
        m = {"q_proj.weight": (("q_proj", "kernel"),) + lin,
             "v_proj.weight": (("v_proj", "kernel"),) + lin,
             "o_proj.weight": (("o_proj", "kernel"),) + lin,
             # [H, 1, W] (a stack of nn.Linear(W, 1) weights) <-> [W, H]
             "learnable_ttt_lr_weight": (("ttt_lr_weight",), lambda a: np.asarray(a)[:, 0, :].T,
                                         lambda w: np.asarray(w).T[:, None, :]),
             "learnable_ttt_lr_bias": (("ttt_lr_bias",), lambda a: np.asarray(a)[:, 0],
                                       lambda b: np.asarray(b)[:, None]),
             "learnable_token_idx": (("learnable_token_idx",), identity, identity),
             "ttt_norm_weight": (("ttt_norm_weight",), identity, identity),
             "ttt_norm_bias": (("ttt_norm_bias",), identity, identity),
             "post_norm.weight": (("post_norm", "scale"), identity, identity),
             "post_norm.bias": (("post_norm", "bias"), identity, identity)}
        if not self.share_qk:
            m["k_proj.weight"] = (("k_proj", "kernel"),) + lin
        else:
            m["conv_q.weight"] = (("conv_q", "kernel"), _conv_to_jax, _conv_to_torch)
            m["conv_k.weight"] = (("conv_k", "kernel"), _conv_to_jax, _conv_to_torch)
            m["conv_q.bias"] = (("conv_q_bias",), identity, identity)
            m["conv_k.bias"] = (("conv_k_bias",), identity, identity)
        if self.use_gate:
            m["g_proj.weight"] = (("g_proj", "kernel"),) + lin
        # fast-weight biases: reference [H, 1, F] <-> [H, F]
        for name in self._cached_fast_names:
            if name.startswith("b"):
                m[name] = ((name,), lambda a: np.asarray(a)[:, 0, :], lambda b: np.asarray(b)[:, None, :])
            else:
                m[name] = ((name,), identity, identity)
        return m

    def reference_weight_map(self) -> dict:
        """Reference (PyTorch ``ttt.py``) parameter names → ``(path, to_jax, to_torch)``.

        ``nn.Linear`` weights are transposed (``[out, in]`` ↔ ``[in, out]``);
        ``learnable_ttt_lr_weight`` ``[H, 1, W]`` ↔ ``[W, H]``; fast-weight biases
        ``[H, 1, F]`` ↔ ``[H, F]``; depthwise ``Conv1d`` weights ``[HD, 1, K]`` ↔ ``[K, HD]``.
        The reference's o_proj and post_norm act on ``width`` features, so porting needs
        ``num_heads · head_dim == width`` (the reference's only configuration).

        A bias-free layer (``fast_bias=False``) has no reference layout: the reference's
        inner loop also updates ``b1`` (and ``b2``), so a reference layer with zero biases is
        a different function, and this layer's weights are not a reference checkpoint.

        Raises:
          ValueError: if ``num_heads · head_dim != width``, or ``fast_bias=False``.
        """
        if not self.fast_bias:
            raise ValueError(
                "fast_bias: the reference layout has fast-weight biases (b1, updated by the inner "
                "loop), which a fast_bias=False layer does not have; a reference checkpoint cannot be "
                "loaded into it (not even one with zero biases: the reference would still update them) "
                "and its weights cannot be exported to one")
        if self.num_heads * self.head_dim != self.width:
            raise ValueError(
                f"head_dim: the reference layout needs num_heads * head_dim == width, got "
                f"{self.num_heads} * {self.head_dim} != {self.width}")
        return self._common_weight_map()


class TTTLinear(_TTTLayer):
    """TTT-Linear layer (docs/rules/ttt.md; module docstring): fast weights ``W1 [H, D, D]``
    (normal, std ``init_std``) and ``b1 [H, D]`` (zeros).

    Args:
      width: model width ``W``. num_heads: ``H``. head_dim: ``D`` (default ``W // H``).
      mini_batch_size: ``C`` (16 in the paper). base_lr: ``ttt_base_lr`` (1.0).
      rope_theta: RoPE base. use_rope: rotate q, k by ``position mod C``.
      share_qk: one q/k projection, then separate causal depthwise convs (``conv_kernel``
        taps, with bias) for q and k (the reference's Mamba-backbone option).
      use_gate: multiply the post-normed output by ``gelu_tanh(x W_g)`` before ``o_proj``.
      init_std: std of the projection and fast-weight initialisers (reference: 0.02).
      impl: ``"dual"`` (matmul form) | ``"primal"`` (per-row weights) | ``"auto"`` (dual).
      short_conv, feature_map, qk_norm, head_norm: the recall recipes, off by default
        (:mod:`tttla_jax.nn.recipes`, docs/recipes.md): conv taps (+ SiLU) on q, k, v (0 =
        off; exclusive with ``share_qk``), a feature map and an L2 norm on q, k (before
        RoPE), a per-head RMSNorm of the output before ``post_norm``. Cache with
        ``short_conv``: ``"conv_q"``, ``"conv_k"``, ``"conv_v"`` ``[B, short_conv−1, H·D]``.
      fast_bias: ``True`` (the reference): fast network ``x + LN(x W + b)``, both updated by
        the inner loop. ``False``: ``x + LN(x W)`` (the rule's ``bias=False``), a fast
        network ending in a bias-free linear layer (docs/rules/ttt.md); no ``b1`` parameter
        or cache entry (``H·D`` fewer floats of state), and no reference weight layout.

    Parameters (``HD = H·D``): ``4·W·HD`` (q, k, v, o) ``+ W·H + H`` (lr gate) ``+ C``
    (token offsets) ``+ 2·H·D`` (inner LN) ``+ H·D² + H·D`` (W1, b1) ``+ 2·HD`` (post
    LN); share_qk: ``− W·HD + 2·(K·HD + HD)``; use_gate: ``+ W·HD``; fast_bias=False:
    ``− H·D``.
    """

    _fast_names = ("W1", "b1")
    _rule_cls = TTTLinearRule

    def _init_fast_weights(self, rngs, std):
        H, D, pd = self.num_heads, self.head_dim, self.param_dtype
        self.W1 = nnx.Param(partitioned(_normal(std), (None, "head_dim", None))(rngs.params(), (H, D, D), pd))
        self.b1 = nnx.Param(partitioned(nnx.initializers.zeros_init(), (None, "head_dim"))(
            rngs.params(), (H, D), pd)) if self.fast_bias else None

    def _fast_weights(self, batch):
        return TTTLinearRule(mini_batch_size=self.mini_batch_size).init_state(
            self.W1[...], self.b1[...] if self.fast_bias else None, batch)


class TTTMLP(_TTTLayer):
    """TTT-MLP layer (docs/rules/ttt.md): fast network ``gelu_tanh(x W1 + b1) W2 + b2`` with
    ``W1 [H, D, F]``, ``W2 [H, F, D]`` (``F = mlp_expansion · D``, 4 in the reference;
    normal std ``init_std``), ``b1 [H, F]``, ``b2 [H, D]`` (zeros).

    Args: as :class:`TTTLinear`, plus ``mlp_expansion``. ``fast_bias=False`` drops both
    ``b1`` and ``b2`` (``gelu_tanh(x W1) W2``).

    Parameters: as :class:`TTTLinear` with ``H·(2·D·F + F + D)`` fast weights in place of
    ``H·D² + H·D`` (``fast_bias=False``: ``H·2·D·F``).
    """

    _fast_names = ("W1", "b1", "W2", "b2")
    _rule_cls = TTTMLPRule

    def __init__(self, *, width: int, num_heads: int, head_dim: Optional[int] = None,
                 mini_batch_size: int = 16, base_lr: float = 1.0, rope_theta: float = 10000.0,
                 use_rope: bool = True, share_qk: bool = False, conv_kernel: int = 4,
                 use_gate: bool = False, init_std: float = 0.02, mlp_expansion: int = 4,
                 impl: str = "auto", short_conv: int = 0, feature_map: str = "identity",
                 qk_norm: bool = False, head_norm: bool = False, fast_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        _checks.check_positive_int("mlp_expansion", mlp_expansion)
        self.mlp_expansion = mlp_expansion
        super().__init__(width=width, num_heads=num_heads, head_dim=head_dim,
                         mini_batch_size=mini_batch_size, base_lr=base_lr, rope_theta=rope_theta,
                         use_rope=use_rope, share_qk=share_qk, conv_kernel=conv_kernel,
                         use_gate=use_gate, init_std=init_std, impl=impl, short_conv=short_conv,
                         feature_map=feature_map, qk_norm=qk_norm, head_norm=head_norm,
                         fast_bias=fast_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _init_fast_weights(self, rngs, std):
        H, D, pd = self.num_heads, self.head_dim, self.param_dtype
        F = self.mlp_expansion * D
        z = nnx.initializers.zeros_init()
        fb = self.fast_bias
        self.W1 = nnx.Param(partitioned(_normal(std), (None, "head_dim", None))(rngs.params(), (H, D, F), pd))
        self.b1 = nnx.Param(partitioned(z, (None, None))(rngs.params(), (H, F), pd)) if fb else None
        self.W2 = nnx.Param(partitioned(_normal(std), (None, None, "head_dim"))(rngs.params(), (H, F, D), pd))
        self.b2 = nnx.Param(partitioned(z, (None, "head_dim"))(rngs.params(), (H, D), pd)) if fb else None

    def _fast_weights(self, batch):
        b = (lambda p: p[...]) if self.fast_bias else (lambda p: None)
        return TTTMLPRule(mini_batch_size=self.mini_batch_size).init_state(
            self.W1[...], b(self.b1), self.W2[...], b(self.b2), batch)


register_mixer("ttt_linear", TTTLinear)
register_mixer("ttt_mlp", TTTMLP)
