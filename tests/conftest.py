"""float64 is enabled for the whole suite: every equivalence is checked there at 1e-10.
Tests always pass explicit dtypes, so float32/bfloat16 checks are unaffected."""
import os

os.environ.setdefault("XLA_FLAGS", "")
import jax

jax.config.update("jax_enable_x64", True)
