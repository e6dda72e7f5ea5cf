"""Free TCP ports for servers that bind later (tests, the learner ranks' rendezvous).

A port the kernel hands out for `bind(0)` lies in its ephemeral range, the same range every
outgoing connection takes its source port from: between choosing it and binding it, any
`connect()` on the machine may take it (seen in CI: "Address already in use" for the
learner's rollout socket). These are chosen below that range, where only explicit binds go.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that `host` can bind right now, below the ephemeral range when it
    leaves room (else wherever the kernel picks)."""
    hi = _ephemeral_low()
    lo = max(1024, hi - 16384)
    found: list[int] = []
    held: list[socket.socket] = []
    try:
        candidates = random.sample(range(lo, hi), min(hi - lo, 64 * n)) if hi - lo > n else []
        for port in candidates:
            if len(found) == n:
                break
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            held.append(s)
            found.append(port)
        while len(found) < n:
            s = socket.socket()
            s.bind((host, 0))
            held.append(s)
            found.append(s.getsockname()[1])
    finally:
        for s in held:
            s.close()
    return found
