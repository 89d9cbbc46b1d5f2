"""The host allocator of a training process: large blocks go back to the OS when freed.

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes with its own mmap and unmaps it on
free; smaller ones come from the heap, which rarely shrinks. The threshold starts at 128 KiB but
glibc raises it, up to 32 MiB, each time such a mapped block is freed. A sharded step allocates
and frees thousands of blocks between a few KiB and tens of MiB (per-module parameter gathers,
reduce-scatter buckets, activations), so after the first free most of them land in the heap and
fragment it: the process holds far more than its tensors. On the CPU the model state lives in
that heap too. Measured (docs/benchmarks.md, "Host memory"), the large preset at depth 6 on 2
CPU ranks, peak per rank with glibc's moving threshold and with a fixed 1 MiB one: ZeRO-3 6.4 and
3.9 GiB, FSDP2 3.5 and 2.7 GiB. The price: freed blocks are mapped again, and the step took
0.96x-1.29x as long across runs. Setting the threshold with mallopt also stops glibc from moving it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's own environment variable for the same setting


def fix_mmap_threshold(kib: int) -> str:
    """Fix glibc's mmap threshold at `kib` KiB in this process; returns what was done, for the
    log. Nothing happens for kib == 0, when MALLOC_MMAP_THRESHOLD_ is set (glibc read it at start:
    the user's choice wins) or off glibc (musl, macOS: their allocators differ)."""
    if kib == 0:
        return "left to glibc (parallel.host_mmap_threshold_kib=0)"
    if os.environ.get(ENV):
        return f"left as {ENV}={os.environ[ENV]} set it"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return "left alone (not glibc)"
    if mallopt(M_MMAP_THRESHOLD, kib * 1024) != 1:  # the config allows at most glibc's 32 MiB
        return f"left to glibc (it refused {kib} KiB)"
    return f"fixed at {kib} KiB"
