"""The process's C heap as glibc accounts it, next to the kernel's RSS.

RSS alone cannot tell a leak from memory the allocator freed but kept: glibc returns freed
heap pages to the kernel only from the top of each arena (or on `malloc_trim`), so a burst of
large buffers (a partitioned actor catching up on queued weight versions and grants) leaves
RSS at its high-water mark after everything was freed. `heap_stats` splits the heap into what
is in use and what is free but retained (`mallinfo2`, summed over all arenas); `trim` hands the
retained pages back. Both are no-ops (empty dict, 0) off glibc.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

_MIB = 1 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.mallinfo2.restype = _MallInfo2
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.malloc_trim.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33 (no mallinfo2)
        return None


def rss_bytes() -> int:
    """This process's resident set (the kernel's count) in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def heap_stats() -> dict[str, float]:
    """MiB: `heap_in_use` (allocated chunks, mmapped ones included), `heap_free` (freed but
    kept by the allocator), `rss` (the kernel's view, for the side-by-side reading)."""
    lib = _libc()
    if lib is None:
        return {}
    m = lib.mallinfo2()
    return {"heap_in_use_mib": round((m.uordblks + m.hblkhd) / _MIB, 2),
            "heap_free_mib": round(m.fordblks / _MIB, 2),
            "rss_mib": round(rss_bytes() / _MIB, 2)}


def trim() -> int:
    """Return the heap's free pages to the kernel; the bytes of RSS that went back."""
    lib = _libc()
    if lib is None:
        return 0
    before = rss_bytes()
    lib.malloc_trim(0)
    return max(before - rss_bytes(), 0)
