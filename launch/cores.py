"""CPU core lists as the launcher and vLLM write them ("0-3,6"; "|" separates vLLM's
per-worker lists). No torch here: processes pin themselves with it before their imports."""

from __future__ import annotations

import os


def parse_cores(spec: str) -> list[int]:
    """"0-2,5|6" -> [0, 1, 2, 5, 6]."""
    out: list[int] = []
    for part in spec.replace("|", ",").split(","):
        if part.strip():
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def pin_to(spec: str | None) -> bool:
    """Pins this process to the cores of `spec` (a list, not vLLM's "auto" / "nobind");
    returns whether it did."""
    if not spec or spec in ("auto", "nobind"):
        return False
    os.sched_setaffinity(0, parse_cores(spec))
    return True
