"""The C heap accounting the actors report (actors/heap.py), checked against the kernel's RSS
in a fresh process: freed buffers show as free heap while RSS stays, and a trim hands them
back."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

_PROBE = r"""
import json
from actors import heap
s0 = heap.heap_stats()
bufs = [bytearray(64 << 10) for _ in range(800)]  # 50 MiB of heap chunks, touched
pin = bytearray(1 << 10)  # allocated above them: the top of the heap is not free
s1 = heap.heap_stats()
del bufs
s2 = heap.heap_stats()
back = heap.trim()
s3 = heap.heap_stats()
print(json.dumps({"s0": s0, "s1": s1, "s2": s2, "back": back, "s3": s3}))
"""


def test_freed_heap_is_told_apart_from_heap_in_use_and_trimmed_back():
    r = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    s0, s1, s2, s3 = d["s0"], d["s1"], d["s2"], d["s3"]
    assert s1["heap_in_use_mib"] - s0["heap_in_use_mib"] > 45  # the buffers are counted
    assert s1["rss_mib"] - s0["rss_mib"] > 45
    # freed: no longer in use, free in the heap, yet still resident
    assert s1["heap_in_use_mib"] - s2["heap_in_use_mib"] > 45
    assert s2["heap_free_mib"] - s1["heap_free_mib"] > 45
    assert s2["rss_mib"] > s1["rss_mib"] - 5
    # the trim returns what the heap held free
    assert d["back"] > 40 << 20
    assert s2["rss_mib"] - s3["rss_mib"] > 40
