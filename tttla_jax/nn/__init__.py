"""Flax NNX modules: building blocks, token mixers, the language model and decoding.

Mixer protocol (every token mixer follows it; the rule-zoo layers — LaCT, TTT, Titans,
ViT³ — are added the same way and registered with :func:`register_mixer`):

* **Construction** — keyword-only config: ``width``, ``num_heads``, ``head_dim=None``
  (``width // num_heads``), rule fields (``chunk_size``, ``window``, gates, ...), then
  ``impl``, ``dtype``, ``param_dtype``, ``rngs``. Bad values raise ``ValueError`` at
  construction, naming the field. Parameter initialisers carry logical sharding names
  (``"embed"``, ``"heads"``, ``"mlp"``, ``"vocab"``, ``"head_dim"``, ``"conv"``; see
  :mod:`tttla_jax.nn.layers`).
* **Implementation** — ``impl``, one word from the library's vocabulary
  (:data:`tttla_jax.impl.Impl`, docs/implementations.md): ``"recurrent"`` (the
  ``lax.scan`` / memorisation view), ``"chunked"`` / ``"associative"`` (the
  linear-attention view: chunked matmuls / associative scan), ``"pallas"`` (the kernel),
  ``"dual"`` / ``"primal"`` (TTT's two forms), ``"auto"`` (default: the first supported
  form in the layer's preference order). The class attribute ``impls`` lists what the
  layer can run, in that order; any other value raises ``ValueError`` at construction
  naming the layer and its ``impls`` (:func:`check_layer_impl`; a rule without a
  parallel form leaves those out and says why). All supported implementations give the
  same outputs and gradients (checked in float64 at 1e-10).
* **Call** — ``y, new_cache = mixer(x, *, cache=None, positions=None)`` with ``x``
  ``[B, T, W]`` → ``y`` ``[B, T, W]``. The cache is a flat dict of arrays carrying the
  fast-weight state explicitly in and out (plus conv states, sliding-window keys and,
  for chunk-causal rules such as LaCT, the buffer of the current partial chunk and its
  length). ``cache=None`` means ``init_cache(B)``; the returned cache is always the state
  after the last token, so prefill is a plain call. ``positions`` (``[B, T]`` int,
  absolute) are used by layers with positional terms (RoPE, windows) and ignored by
  others; the model always passes them. ``cu_seqlens`` (``[N + 1]`` int, ``x``
  ``[1, T, W]``): N packed documents, each computed exactly as if alone, the cache in and
  out per document (leading dim N), positions restarting per document (README, "Packed
  documents").
* **Cache** — ``init_cache(batch_size)`` returns zeros of the right shapes (fast
  weights in float32, float64 for a float64 layer). Invariant: for any split of a
  sequence into pieces, calling the mixer on the pieces in order, threading the cache,
  gives the same outputs and final cache as one call on the whole sequence (for any T,
  not only multiples of ``chunk_size``).
* **Transforms** — the call is pure (no variable is mutated), so ``jax.jit``,
  ``jax.grad``, ``jax.checkpoint`` and ``jax.vmap`` over ``nnx.split``/``nnx.merge``
  states all work.

Exports:
    RMSNorm, SwiGLU, ShortConv, apply_rope           building blocks
    Mixer, LinearAttention, DeltaNet, SlidingWindowAttention, MIXERS, register_mixer,
    check_layer_impl
    LMConfig, LanguageModel, Block, count_params
    init_cache, prefill, decode_step, generate, sample_logits
    load_reference_weights, export_reference_weights, prefixed_weight_map   (weights.py)
    TTTLinear, TTTMLP (ttt.py), TitansMemory (titans.py)   mixers "ttt_linear", "ttt_mlp", "titans"
    LaCTLayer (lact.py)   mixer "lact" (LaCT-LLM, ladder presets V0-V6 and anomalies)
    Attention (attention.py)   mixer "attention" (full causal softmax attention, KV cache)
    ViT3Block, ViTConfig, ViTClassifier (vit.py)   non-causal ViT³ mixer (not in MIXERS) and
        the image classifier: ``y, state = block(x, grid=None, output_final_state=False)``
"""
from tttla_jax.nn.layers import RMSNorm, ShortConv, SwiGLU, apply_rope
from tttla_jax.nn.mixers import (
    MIXERS,
    DeltaNet,
    LinearAttention,
    Mixer,
    SlidingWindowAttention,
    check_layer_impl,
    register_mixer,
)
from tttla_jax.nn.model import Block, LanguageModel, LMConfig, count_params
from tttla_jax.nn.decode import decode_step, generate, init_cache, prefill, sample_logits
from tttla_jax.nn.weights import export_reference_weights, load_reference_weights, prefixed_weight_map
from tttla_jax.nn.ttt import TTTLinear, TTTMLP  # registers "ttt_linear", "ttt_mlp"
from tttla_jax.nn.titans import TitansMemory  # registers "titans"
from tttla_jax.nn.lact import LaCTLayer  # registers "lact"
from tttla_jax.nn.attention import Attention  # registers "attention"
from tttla_jax.nn.vit import ViT3Block, ViTClassifier, ViTConfig  # non-causal: not a MIXERS entry

__all__ = [
    "RMSNorm", "ShortConv", "SwiGLU", "apply_rope",
    "MIXERS", "DeltaNet", "LinearAttention", "Mixer", "SlidingWindowAttention",
    "check_layer_impl", "register_mixer",
    "Block", "LanguageModel", "LMConfig", "count_params",
    "decode_step", "generate", "init_cache", "prefill", "sample_logits",
    "load_reference_weights", "export_reference_weights", "prefixed_weight_map",
    "TTTLinear", "TTTMLP", "TitansMemory", "LaCTLayer", "Attention",
    "ViT3Block", "ViTClassifier", "ViTConfig",
]
