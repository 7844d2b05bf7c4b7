"""Host (CPU) tuning that XLA:CPU throughput depends on.

XLA:CPU allocates every large temporary buffer of a jitted function (layout changes,
scan outputs, activations) with the C library's ``malloc`` on each call. With glibc's
defaults, blocks above a dynamic threshold (128 KiB … 32 MiB) are ``mmap``-ed and
returned to the kernel on ``free``, and the heap top is trimmed above 128 KiB of free
space, so every call page-faults its temporaries back in (4 KiB at a time, each page
zeroed by the kernel). Measured on this project's 2-core machine (jax 0.10.2): the LaCT
ladder's V6 operator (T = 8192, 4 heads of dim 128, chunk 64) spent ~40% of its time in
those faults; :func:`tune_malloc` removed it (71K → 125K tokens/s), see
``benchmarks/ladder.py`` and the README's performance notes.

:func:`tune_malloc` asks glibc to keep freed memory in the process instead (``mallopt``:
no ``mmap`` below 1 GiB, no trimming, 256 MiB top pad). The cost is that the process's
resident memory stays at its peak; that is what a training job or a benchmark wants, not
necessarily what an interactive session shared with other programs wants, so the library
never calls it on import: ``python -m train`` and the benchmarks call it (and record that
they did), users opt in. The same effect without code: the environment variables
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647
MALLOC_TOP_PAD_=268435456`` set before Python starts, or a different allocator
(tcmalloc/jemalloc via ``LD_PRELOAD``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {"M_MMAP_THRESHOLD": 1 << 30, "M_TRIM_THRESHOLD": (1 << 31) - 1, "M_TOP_PAD": 256 << 20}
_tuned: dict | None = None


def tune_malloc() -> dict:
    """Keep freed heap memory in the process (glibc ``mallopt``); idempotent.

    Returns a record for logs and benchmark JSON: ``{"tuned": bool, "reason": str,
    "settings": {...}}``. A no-op (``tuned=False`` with the reason) on non-Linux hosts, on a
    C library other than glibc, or if glibc rejects a setting.
    """
    global _tuned
    if _tuned is not None:
        return dict(_tuned)
    rec = {"tuned": False, "reason": "", "settings": {}}
    if platform.system() != "Linux":
        rec["reason"] = f"not Linux ({platform.system()}): malloc left as is"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version.restype = ctypes.c_char_p
            version = libc.gnu_get_libc_version().decode()
        except (OSError, AttributeError):
            rec["reason"] = "the C library is not glibc: malloc left as is"
        else:
            codes = {"M_MMAP_THRESHOLD": _M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD,
                     "M_TOP_PAD": _M_TOP_PAD}
            rejected = [name for name, value in SETTINGS.items() if libc.mallopt(codes[name], value) != 1]
            if rejected:
                rec["reason"] = f"glibc {version} rejected mallopt({', '.join(rejected)})"
            else:
                rec.update(tuned=True, reason=f"glibc {version} mallopt", settings=dict(SETTINGS))
    _tuned = rec
    return dict(rec)
