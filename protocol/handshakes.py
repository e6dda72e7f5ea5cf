"""Refused CURVE handshakes, counted per server socket and by kind, from libzmq's own socket
monitor (an independent record: it sees every refused attempt, also those that never reach
the ZAP handler).

Kinds, from the monitor's event and value:
- `keyless`: the peer speaks no CURVE at all: a ZMTP mechanism mismatch, or the peer hung up
  during the greeting (what a keyless libzmq peer does when it notices the mismatch first,
  and what a bare TCP probe does);
- `wrong_server_key`: the peer's CURVE HELLO cannot be decrypted, i.e. it was sealed for
  another server key (ZMTP cryptographic error);
- `wrong_key`: the handshake completed but the ZAP handler refused the client's key (its
  role is not admitted on this socket, or it is no key of the run);
- `other`: any other handshake failure (malformed commands, ...).

A peer that keeps reconnecting is counted at every attempt (libzmq retries every
reconnect interval): the counters measure refused handshakes, not distinct peers.

One thread per watcher polls the monitor sockets; `watch` may be called from the thread that
owns the server socket at any time (the monitor is attached there, then handed over).
"""

from __future__ import annotations

import errno
import itertools
import logging
import queue
import threading
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

KINDS = ("keyless", "wrong_key", "wrong_server_key", "other")
_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_HUNG_UP = (errno.EPIPE, errno.ECONNRESET)
_ids = itertools.count()
log = logging.getLogger("dynamo.handshakes")


def classify(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "wrong_key"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and value in _HUNG_UP:
        return "keyless"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "keyless"
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "wrong_server_key"
    return "other"


class HandshakeWatch:
    """`counts[socket_name][kind]`: refused handshakes on each watched server socket."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        # inproc monitors live in the monitored socket's context; an asyncio context is shadowed
        self.ctx = zmq.Context.shadow(ctx.underlying)
        self.counts: dict[str, dict[str, int]] = {}
        self._new: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._logged: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="handshake-watch", daemon=True)
        self._thread.start()

    def watch(self, sock: zmq.Socket, name: str) -> None:
        addr = f"inproc://handshake-watch-{next(_ids)}"
        sock.monitor(addr, _EVENTS)
        self.counts[name] = dict.fromkeys(KINDS, 0)
        self._new.put((name, addr))

    def flat(self) -> dict[str, int]:
        """`handshake_refused/<socket>/<kind>` for metrics lines."""
        return {f"handshake_refused/{s}/{k}": v for s, kinds in self.counts.items()
                for k, v in kinds.items()}

    def total(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.counts.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        poller = zmq.Poller()
        names: dict[zmq.Socket, str] = {}
        try:
            while not self._stop.is_set():
                while not self._new.empty():
                    name, addr = self._new.get()
                    pair = self.ctx.socket(zmq.PAIR)
                    pair.linger = 0
                    pair.connect(addr)
                    poller.register(pair, zmq.POLLIN)
                    names[pair] = name
                for pair, _ in poller.poll(200):
                    while True:
                        try:
                            frames = pair.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        ev = parse_monitor_message(frames)
                        if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                            poller.unregister(pair)
                            break
                        kind = classify(ev["event"], ev["value"])
                        self.counts[names[pair]][kind] += 1
                        if kind == "other" and (ev["event"], ev["value"]) not in self._logged:
                            self._logged.add((ev["event"], ev["value"]))
                            log.warning("%s: handshake refused (libzmq event %#x, value %#x)",
                                        names[pair], ev["event"], ev["value"])
        except zmq.ContextTerminated:
            pass
        finally:
            for pair in names:
                pair.close(linger=0)
