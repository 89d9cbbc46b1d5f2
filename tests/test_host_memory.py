"""glibc's mmap threshold fixed by the trainer (tgdp/parallel/host_memory.py), observed through
glibc's own accounting (mallinfo2) in fresh processes. Linux with glibc, like the rest of the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# After a 16 MiB block is freed, glibc has raised its mmap threshold to 16 MiB; is a following
# 2 MiB block then served by its own mapping (`hblkhd` grows) or from the heap?
PROBE = textwrap.dedent("""
    import ctypes, sys
    from tgdp.parallel.host_memory import fix_mmap_threshold

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    print(fix_mmap_threshold(int(sys.argv[1])))
    libc.free(libc.malloc(16 << 20))
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(2 << 20)
    print("mapped" if libc.mallinfo2().hblkhd - before >= 2 << 20 else "heap")
    libc.free(block)
""")


def probe(kib: int, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(kib)], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    return out.stdout.splitlines()



def test_a_fixed_threshold_keeps_large_blocks_mapped_after_glibc_would_have_raised_it():
    assert probe(1024) == ["fixed at 1024 KiB", "mapped"]


def test_zero_leaves_glibc_its_moving_threshold():
    assert probe(0) == ["left to glibc (parallel.host_mmap_threshold_kib=0)", "heap"]


def test_the_environment_variable_wins():
    assert probe(1024, MALLOC_MMAP_THRESHOLD_="33554432") == ["left as MALLOC_MMAP_THRESHOLD_=33554432 set it",
                                                              "heap"]
