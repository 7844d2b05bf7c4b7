"""tttla_jax.host.tune_malloc: glibc keeps large freed blocks in the process (no mmap)."""
import platform
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, sys
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "tuned":
        from tttla_jax.host import tune_malloc
        rec = tune_malloc()
        assert rec["tuned"], rec
        assert tune_malloc() == rec  # idempotent
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(64 << 20)
    print(libc.mallinfo2().hblkhd - before)  # bytes of this block that were mmap-ed
    libc.free(p)
""")


def _mmapped_bytes(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                    reason="mallopt tuning is glibc-only")
def test_tune_malloc_keeps_large_blocks_on_the_heap():
    assert _mmapped_bytes("default") >= 64 << 20   # glibc's default: a 64 MiB block is mmap-ed
    assert _mmapped_bytes("tuned") == 0            # tuned: served from the heap, kept on free


def test_tune_malloc_record():
    from tttla_jax.host import tune_malloc
    rec = tune_malloc()
    assert set(rec) == {"tuned", "reason", "settings"} and rec["reason"]
    if platform.system() != "Linux":
        assert not rec["tuned"]
