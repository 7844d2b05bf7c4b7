"""Shared by the multi-device tests: run a check script in a subprocess with N forced host CPU
devices (XLA_FLAGS), collecting the JSON it prints on its ``RESULT`` line."""
import json
import os
import subprocess
import sys

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


def run_checks(script, cases, devices=8, timeout=3000):
    """Run ``script`` (``python -c``) with the JSON ``cases`` as its argument; return the JSON
    of its last ``RESULT`` line, failing with its stderr if it exits non-zero."""
    p = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=REPO, env=device_env(devices),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-6000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])
