"""float64 is enabled for the whole suite: every equivalence is checked there at 1e-10.
Tests always pass explicit dtypes, so float32/bfloat16 checks are unaffected.

XLA's cheap CPU pipeline (``--xla_backend_optimization_level=0
--xla_llvm_disable_expensive_passes=true``) is set for the test process and inherited by its
subprocesses (training runs, notebooks, the libtpu compile check): the suite is dominated by
compiling tiny programs, where LLVM's optimisations cost more than they save (measured: the
``ttt_mlp`` registry check 28 s -> 16 s CPU). Numerics stay IEEE (no fast-math); set
``XLA_FLAGS`` yourself with an ``xla_backend_optimization_level`` to override.
"""
import os

_FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_XLA).strip()
import jax

jax.config.update("jax_enable_x64", True)
