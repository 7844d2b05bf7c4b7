"""Shared timing and machine record for the benchmark scripts.

Every script times with :func:`timeit` (one call to compile and warm up, then ``repeats``
timed calls; the best and the median are returned) or, to compare forms of one computation,
:func:`interleaved` (the forms take turns in every round) and stores :func:`machine` in its JSON,
so every number carries the load average it was measured at and whether the host's
malloc was tuned (:func:`tttla_jax.host.tune_malloc`, called by :func:`setup`).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import jax

from tttla_jax.host import tune_malloc
from tttla_jax.impl import platform as tt_platform


def setup(tune: bool = True) -> dict:
    """Call first in a benchmark's ``main``: tunes malloc (unless ``tune=False``) and returns
    the start record (load average, malloc) to pass to :func:`machine`."""
    rec = tune_malloc() if tune else {"tuned": False, "reason": "--no-tune-malloc", "settings": {}}
    return {"loadavg_start": os.getloadavg(), "malloc": rec, "t0": time.time()}


def timeit(fn, *args, repeats: int = 5) -> dict:
    """``{"best": s, "median": s, "compile": s}`` for ``fn(*args)`` (jax arrays blocked on)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return {"best": min(ts), "median": statistics.median(ts), "compile": compile_s}


def interleaved(fns: dict, *args, rounds: int = 7) -> dict:
    """Time several functions of the same arguments against each other: one call each to
    compile and warm up, then ``rounds`` rounds in which every function runs once, in turn.

    A slow spell of the machine then hits every function in the same round instead of one
    function's whole series, so the ratio of medians is far steadier than two separate
    :func:`timeit` series. Returns ``{name: {"best", "median", "compile", "samples"}}``.
    """
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out[name] = {"compile": time.perf_counter() - t0, "samples": []}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out[name]["samples"].append(time.perf_counter() - t0)
    for rec in out.values():
        rec["best"], rec["median"] = min(rec["samples"]), statistics.median(rec["samples"])
    return out


def machine(start: dict) -> dict:
    """The machine record for a result JSON: CPU, cores, jax, backend, load average at the
    start and end, malloc tuning, wall time."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": tt_platform(),
        "devices": jax.device_count(),
        "loadavg_start": list(start["loadavg_start"]),
        "loadavg_end": list(os.getloadavg()),
        "malloc": start["malloc"],
        "wall_s": time.time() - start["t0"],
    }


def describe(m: dict) -> str:
    """One line for the printed table's caption."""
    tuned = "malloc tuned" if m["malloc"]["tuned"] else f"malloc default ({m['malloc']['reason']})"
    return (f"CPU {m['cpu']}, {m['cpu_count']} cores, jax {m['jax']} ({m['backend']}), {tuned}, "
            f"load average {m['loadavg_start'][0]:.1f} → {m['loadavg_end'][0]:.1f}")


def memory(compiled) -> "dict | None":
    """Bytes of a compiled executable per device from ``compiled.memory_analysis()``:
    arguments, outputs, temporaries, aliased, and ``peak_bytes`` = arguments + outputs +
    temporaries − aliased (``None`` where the backend reports nothing)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    rec = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "temp_size_in_bytes", "alias_size_in_bytes")}
    rec["peak_bytes"] = (rec["argument_size_in_bytes"] + rec["output_size_in_bytes"]
                         + rec["temp_size_in_bytes"] - rec["alias_size_in_bytes"])
    return rec
