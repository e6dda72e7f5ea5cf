"""Watching what a real run exposes on the network, from the kernel rather than our code:
the TCP listeners of a run's processes (/proc/PID/net/tcp*), and peers that knock on its
ports with the wrong keys (each kind of refused CURVE handshake). Used by conftest's shared
run (`trained`), checked in test_listeners."""

from __future__ import annotations

import threading
from pathlib import Path

import zmq

from launch.harness import listeners
from protocol.auth import RunKeys
from protocol.sockets import CurveKeys, SocketOptions, open_socket

BAD = ("keyless", "wrong_key", "wrong_server_key")


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def role(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    return args[args.index(b"launch.cli") + 1].decode() if b"launch.cli" in args else "other"


def bad_peers(ctx: zmq.Context, kind: int, endpoint: str, server_public: bytes,
               run_keys: Path, outsider: Path) -> list[zmq.Socket]:
    """One socket per kind of refused handshake; each keeps reconnecting (and being refused)."""
    ours = RunKeys.load(run_keys, "actor").connect(server_public)
    theirs = CurveKeys.load(outsider, server="allocator", client="actor")
    wrong_server = CurveKeys.load(outsider, server="allocator")
    opts = SocketOptions(linger_ms=0)
    return [
        open_socket(ctx, kind, endpoint, bind=False, options=opts),
        open_socket(ctx, kind, endpoint, bind=False, options=opts,
                    keys=CurveKeys(server_public=server_public,
                                   client_public=theirs.client_public,
                                   client_secret=theirs.client_secret)),
        open_socket(ctx, kind, endpoint, bind=False, options=opts,
                    keys=CurveKeys(server_public=wrong_server.server_public,
                                   client_public=ours.client_public,
                                   client_secret=ours.client_secret)),
    ]


class ListenerWatch:
    """Polls the listeners of every child of `pid` (by role) until `stop()`."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid, self.every_s = pid, every_s
        self.seen: dict[str, set[tuple[str, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in children(self.pid):
                try:
                    name, ports = role(pid), listeners(pid)
                except OSError:  # exited between the listing and the read
                    continue
                if name != "gone":
                    self.seen.setdefault(name, set()).update(ports)
            self._stop.wait(self.every_s)

    def stop(self) -> dict[str, set[tuple[str, int]]]:
        self._stop.set()
        self._thread.join(10)
        return self.seen
