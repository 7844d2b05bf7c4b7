"""Shared by the multi-device tests: run a check script in a subprocess with N forced host CPU
devices (XLA_FLAGS), collecting the JSON it prints on its ``RESULT`` line."""
import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_env(devices):
    """This process's environment with ``devices`` forced host devices (the suite's other XLA
    flags kept), the repository on the path, and no multi-process coordination variables."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


#: Defined for every check script: ``diff`` (over two trees with the same leaves, the largest
#: per-leaf float64 ``max |a − b| / max(1, max |b|)``: absolute for leaves of magnitude ≤ 1,
#: relative above, so a 1e-10 bound means 1e-10 of a large gradient's scale, not an absolute
#: 1e-10 on a sum of thousands of terms) and ``weights`` (a deterministic dense array
#: weighting a loss).
CHECK_HELPERS = textwrap.dedent('''
    import jax
    import jax.numpy as jnp
    import numpy as np

    def diff(a, b):
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(la) == len(lb), (len(la), len(lb))
        def one(x, y):
            x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
            if x.size == 0:
                return 0.0
            return float(jnp.max(jnp.abs(x - y)) / jnp.maximum(1.0, jnp.max(jnp.abs(y))))
        return max(one(x, y) for x, y in zip(la, lb))

    def weights(shape, seed=3):
        return jnp.cos(jnp.arange(int(np.prod(shape)), dtype=jnp.float64) * 0.7 + seed).reshape(shape)
''')


def run_checks(script, cases, devices=8, timeout=3000):
    """Run :data:`CHECK_HELPERS` + ``script`` (``python -c``) with the JSON ``cases`` as its
    argument; return the JSON of its last ``RESULT`` line, failing with its stderr if it exits
    non-zero."""
    p = subprocess.run([sys.executable, "-c", CHECK_HELPERS + script, json.dumps(cases)], cwd=REPO,
                       env=device_env(devices),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-6000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])
