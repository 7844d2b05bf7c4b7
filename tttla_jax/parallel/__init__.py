"""Sequence (context) parallelism: one long sequence split over the devices of a mesh axis
(docs/context_parallel.md).

Ops inside ``jax.shard_map`` (on the local slice, like ``lax.psum``):
:func:`linear_attention`, :func:`delta_rule`; outside (whole arrays and a mesh):
:func:`sharded_linear_attention`, :func:`sharded_delta_rule`. Layers and models:
:mod:`tttla_jax.parallel.context` (``sequence_parallel``, ``sharded_mixer``, ...); the LaCT
(ladder V2–V6) and Titans (linear memory) layers' associative combine:
:mod:`tttla_jax.parallel.combine` (``combine_reason``, ``combined_apply``).
"""
from tttla_jax.parallel.context import (FORMS, axis_size, from_last_shard, global_length, local_cu_seqlens,
                                        mixer_apply, sequence_axis,
                                        sequence_parallel, sequence_parallel_call, sequence_parallel_form,
                                        shard_offset, sharded_mixer)
from tttla_jax.parallel.combine import combine_reason, combined_apply
from tttla_jax.parallel.ops import delta_rule, linear_attention, sharded_delta_rule, sharded_linear_attention

__all__ = ["FORMS", "axis_size", "combine_reason", "combined_apply", "delta_rule", "from_last_shard", "global_length", "linear_attention",
           "local_cu_seqlens", "mixer_apply",
           "sequence_axis", "sequence_parallel", "sequence_parallel_call", "sequence_parallel_form",
           "shard_offset", "sharded_delta_rule", "sharded_linear_attention", "sharded_mixer"]
