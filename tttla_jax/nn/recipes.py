"""Recall recipes: the small input/output tricks that make linear-attention-like layers recall,
as options with the same names in every mixer, and measured recall presets.

Every mixer of :mod:`tttla_jax.nn` accepts the same four recipe options (docs/recipes.md):

* ``short_conv`` (int, ``0`` = off): a causal depthwise convolution of ``short_conv`` taps on
  each of q, k, v right after their projections, followed by SiLU — the short convolution of
  H3 (Fu et al., 2023, "Hungry Hungry Hippos", §3.1 shift SSM), Based (Arora et al., 2024,
  §3), Mamba (Gu & Dao, 2023, §3.4) and DeltaNet (Yang et al., 2024, "Parallelizing Linear
  Transformers with the Delta Rule", §4.4). It lets a token see its predecessors before
  the state is written, which is what associative recall needs (a key is written together
  with the value that follows it). Its taps are carried in the decoding cache
  (``"conv_q"``, ``"conv_k"``, ``"conv_v"``: the last ``short_conv − 1`` pre-conv inputs
  ``[B, short_conv−1, H·D]``) and it accepts packed sequences (``cu_seqlens``, a tap never
  crosses a sequence boundary), both through :class:`tttla_jax.nn.layers.ShortConv`.
* ``feature_map`` (str): applied to q and k per head: ``"identity"``, ``"silu"``,
  ``"elu+1"`` (Katharopoulos et al., 2020, "Transformers are RNNs", eq. 7), ``"relu"``,
  and the composites ``"silu+l2"`` (``l2norm(silu(x))``) and ``"l2"``.
* ``qk_norm`` (bool): L2-normalise q and k over the head dim, after the feature map
  (DeltaNet, Yang et al., 2024, §4.4; Titans, Behrouz et al., 2025, §3.1).
* ``head_norm`` (bool): a per-head RMSNorm of the mixer's output before ``o_proj``
  (GLA, Yang et al., 2024, "Gated Linear Attention Transformers", §4.4; RetNet, Sun et
  al., 2023, GroupNorm per head).

The defaults differ per mixer and are exactly what each mixer did before these options
existed (e.g. DeltaNet keeps its conv and ``silu+l2``, linear attention its ``elu+1`` and
output norm, TTT-Linear has none of them), so existing configurations and checkpoints are
unchanged. Older option names keep working: DeltaNet's ``use_short_conv``/``conv_size``
(``short_conv=conv_size`` when on), LaCT's ``qkv_silu`` (``feature_map="silu"``).

:data:`RECALL_PRESETS` maps a mixer name to the options measured to recall on MQAR
(docs/recipes.md has the table of every configuration tried); use it as
``LMConfig(mixer_options={name: RECALL_PRESETS[name]})`` or :func:`recall_options`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from tttla_jax import _checks
from tttla_jax.nn.layers import RMSNorm, ShortConv, l2_normalize

__all__ = ["FEATURE_MAPS", "RECIPE_OPTIONS", "RECALL_PRESETS", "feature_map", "check_short_conv",
           "check_flag", "RecipeMixin", "recall_options"]

#: Feature maps accepted by every mixer's ``feature_map`` option.
FEATURE_MAPS = ("identity", "silu", "elu+1", "relu", "silu+l2", "l2")

#: The recipe options, with the same names in every mixer.
RECIPE_OPTIONS = ("short_conv", "feature_map", "qk_norm", "head_norm")

#: Conv cache keys (one per convolved input).
CONV_KEYS = ("conv_q", "conv_k", "conv_v")


def feature_map(name: str, x: Array) -> Array:
    """Apply feature map ``name`` (one of :data:`FEATURE_MAPS`) over the last axis.

    ``identity``; ``silu``; ``elu+1`` (Katharopoulos et al., 2020); ``relu``;
    ``silu+l2`` = ``l2norm(silu(x))``; ``l2`` = ``l2norm(x)`` (norms over D).
    """
    if name == "identity":
        return x
    if name == "silu":
        return jax.nn.silu(x)
    if name == "elu+1":
        return jax.nn.elu(x) + 1
    if name == "relu":
        return jax.nn.relu(x)
    if name == "silu+l2":
        return l2_normalize(jax.nn.silu(x))
    if name == "l2":
        return l2_normalize(x)
    raise ValueError(f"feature_map: got {name!r}, expected one of {FEATURE_MAPS}")


def check_short_conv(value) -> int:
    """``short_conv``: taps of the recipe convolution, an int ``>= 0`` (0 = off; 1 is a
    per-channel scale followed by SiLU)."""
    if value == 0 and not isinstance(value, bool) and isinstance(value, int):
        return 0
    try:
        return _checks.check_positive_int("short_conv", value)
    except ValueError:
        raise ValueError(f"short_conv: expected an int >= 0 (conv taps, 0 = off), got {value!r}") from None


def check_flag(name: str, value) -> bool:
    """A recipe on/off option: a Python bool (anything else is a ``ValueError`` naming it)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


class RecipeMixin:
    """The recipe options' parameters, cache entries and application, shared by the mixers.

    A mixer calls :meth:`_init_recipe` in its constructor (where its projections are made,
    so a default configuration consumes the random keys in the same order as before),
    adds :meth:`_recipe_cache_spec` / :meth:`_recipe_init_cache` to its cache, runs
    :meth:`_recipe_qkv` on the projected q, k, v and :meth:`_recipe_out` on its per-head
    output. Attributes: ``q_conv``, ``k_conv``, ``v_conv`` (:class:`ShortConv` or ``None``)
    and ``out_norm`` (per-head :class:`RMSNorm` or ``None``), unless the mixer keeps its own.
    """

    def _init_recipe(self, *, features: int, short_conv: int, feature_map: str, qk_norm: bool,
                     head_norm: Optional[bool] = None, head_dim: Optional[int] = None,
                     norm_eps: float = 1e-6, conv_v: bool = True, dtype=None,
                     param_dtype=jnp.float32, rngs) -> None:
        """Validate and store the options; build the convs (``features`` channels each,
        ``conv_v=False``: q and k only) and, if ``head_norm`` is True, ``out_norm``
        (``head_norm=None``: the mixer manages its own output norm)."""
        self.short_conv = check_short_conv(short_conv)
        _checks.check_choice("feature_map", feature_map, FEATURE_MAPS)
        self.feature_map = feature_map
        self.qk_norm = check_flag("qk_norm", qk_norm)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if self.short_conv:
            self.q_conv = ShortConv(features, self.short_conv, **kw)
            self.k_conv = ShortConv(features, self.short_conv, **kw)
            self.v_conv = ShortConv(features, self.short_conv, **kw) if conv_v else None
        else:
            self.q_conv = self.k_conv = self.v_conv = None
        if head_norm is not None:
            self.head_norm = check_flag("head_norm", head_norm)
            self.out_norm = (RMSNorm(head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                                     axis_name="head_dim") if head_norm else None)

    def _conv_keys(self) -> tuple:
        if not self.short_conv:
            return ()
        return CONV_KEYS if self.v_conv is not None else CONV_KEYS[:2]

    def _recipe_cache_spec(self, B: int, b: str = "B") -> dict:
        """Cache entries of the conv: ``{key: ((B, K−1, F), layout)}``."""
        K = self.short_conv
        return {key: ((B, K - 1, getattr(self, key[-1] + "_conv").features), f"[{b}, short_conv-1, H*D]")
                for key in self._conv_keys()}

    def _recipe_init_cache(self, B: int, dtype) -> dict:
        return {key: jnp.zeros(shape, dtype) for key, (shape, _) in self._recipe_cache_spec(B).items()}

    def _recipe_conv(self, q, k, v, cache: dict, new_cache: dict,
                     cu_seqlens: Optional[Int[Array, "n1"]] = None):
        """The short conv (+ SiLU) on ``[B, T, F]`` q, k (and v); writes the new taps into
        ``new_cache``. Identity when ``short_conv == 0``."""
        if not self.short_conv:
            return q, k, v
        conv = dict(cu_seqlens=cu_seqlens) if cu_seqlens is not None else {}
        q, new_cache["conv_q"] = self.q_conv(q, cache["conv_q"], **conv)
        k, new_cache["conv_k"] = self.k_conv(k, cache["conv_k"], **conv)
        if self.v_conv is not None:
            v, new_cache["conv_v"] = self.v_conv(v, cache["conv_v"], **conv)
        return q, k, v

    def _recipe_qk(self, q: Float[Array, "b t h d"], k: Float[Array, "b t h d"], fmap: Optional[str] = None):
        """Feature map (``fmap`` overrides ``self.feature_map``) then the optional L2 norm, on
        per-head q and k."""
        fmap = self.feature_map if fmap is None else fmap
        q, k = feature_map(fmap, q), feature_map(fmap, k)
        if self.qk_norm:
            q, k = l2_normalize(q), l2_normalize(k)
        return q, k

    def _recipe_qkv(self, q, k, v, cache: dict, new_cache: dict, B: int, T: int, H: int, D: int,
                    cu_seqlens=None):
        """Conv on ``[B, T, H·D]`` q, k, v, split into heads ``[B, T, H, D]``, feature map and
        L2 norm on q, k. Returns per-head ``(q, k, v)``."""
        q, k, v = self._recipe_conv(q, k, v, cache, new_cache, cu_seqlens)
        q, k, v = (a.reshape(B, T, H, D) for a in (q, k, v))
        q, k = self._recipe_qk(q, k)
        return q, k, v

    def _recipe_out(self, o: Float[Array, "b t h d"]) -> Float[Array, "b t h d"]:
        """The per-head output norm if ``head_norm`` is on (else ``o`` unchanged)."""
        return o if getattr(self, "out_norm", None) is None else self.out_norm(o)


#: Mixer options measured to recall on MQAR (docs/recipes.md: the table of every
#: configuration tried, the budget and the machine load): mixer name -> options.
RECALL_PRESETS: dict = {
    # TTT-Linear: the short conv on q, k, v and a 4x larger inner learning rate (mini-batch 16):
    # 0.86 MQAR accuracy vs 0.02 with the defaults; its fast weight is DeltaNet's size, its
    # state with the mini-batch write buffer 7 631 floats per layer against DeltaNet's 4 672
    # at width 64 (docs/recipes.md, "Recall against state size"). Writing every token
    # (mini_batch_size=1, base_lr=8: no buffer, 4 736 floats) recalled better there with less
    # state (0.994 / 0.988 at L 64 / 128 on Zoology MQAR, one seed); this preset stays the
    # 16-token mini-batch it was measured with, which is cheaper on long sequences
    "ttt_linear": {"short_conv": 4, "base_lr": 4.0},
    # LaCT (V0: SwiGLU fast weights, Muon, momentum, weight norm): chunks of 8 so the context
    # is written before the first query, the short conv, no RoPE on the fast q/k (it makes a
    # query's match with a stored key depend on their distance) and no window branch: 0.997
    # on Zoology MQAR at L=64/kv4 by step 300 and 0.995 at L=128/kv8 by step 400, where
    # LaCT's defaults stayed at chance
    "lact": {"preset": "v0", "chunk_size": 8, "short_conv": 4, "ttt_rope": False, "window": None},
}


def recall_options(*names: str) -> dict:
    """``{name: RECALL_PRESETS[name]}`` for ``LMConfig(mixer_options=...)`` (copies)."""
    out = {}
    for name in names:
        if name not in RECALL_PRESETS:
            raise ValueError(f"names: no recall preset for mixer {name!r}, expected one of "
                             f"{tuple(RECALL_PRESETS)}")
        out[name] = dict(RECALL_PRESETS[name])
    return out
