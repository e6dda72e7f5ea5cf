"""The learner's rollout intake: a PULL socket drained by one thread into a bounded queue.

Guarantees:
- Nothing malformed reaches the trainer: codec rejections are logged and counted by code.
- A group is trained on at most once (duplicates by grant id are dropped and counted), and
  a group whose oldest token is more than `max_staleness` versions behind is dropped and
  counted with the reason; nothing else is ever dropped.
- Back-pressure: when the trainer falls behind, the queue fills, the thread stops reading,
  ZeroMQ's high-water marks fill, and actors stop sending (and stop asking for work), so the
  memory of every process stays bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter

import zmq

from protocol.errors import ProtocolError
from protocol.messages import RolloutGroup
from protocol.sockets import CurveKeys, SocketOptions, open_socket, recv

log = logging.getLogger("dynamo.learner.intake")


class Intake:
    def __init__(self, endpoint: str, *, capacity: int, keys: CurveKeys | None = None,
                 client_keys: set[bytes] | None = None, max_message_bytes: int = 512 << 20):
        self.ctx = zmq.Context()
        self.auth = None
        if keys is not None:
            from protocol.sockets import start_authenticator

            self.auth = start_authenticator(self.ctx, client_keys or set())
        self.sock = open_socket(self.ctx, zmq.PULL, endpoint, bind=True, keys=keys,
                                options=SocketOptions(rcvhwm=64,
                                                      max_message_bytes=max_message_bytes))
        self.max_message_bytes = max_message_bytes
        self.queue: queue.Queue[RolloutGroup] = queue.Queue(maxsize=capacity)
        self.counters: Counter[str] = Counter()
        self.seen: set[int] = set()
        self._partial: list[RolloutGroup] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-intake", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(100):
                continue
            try:
                msg = recv(self.sock, zmq.NOBLOCK, max_message_bytes=self.max_message_bytes)
            except zmq.Again:
                continue
            except ProtocolError as e:
                self.counters[f"rejected_{e.code}"] += 1
                log.warning("rejected a message on the rollout socket: %s", e)
                continue
            if not isinstance(msg, RolloutGroup):
                self.counters["rejected_unexpected_type"] += 1
                log.warning("rejected a %s on the rollout socket", type(msg).__name__)
                continue
            self.counters["received"] += 1
            while not self._stop.is_set():
                try:
                    self.queue.put(msg, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def take(self, n: int, version: int, max_staleness: int, on_wait=None,
             stop: threading.Event | None = None) -> list[RolloutGroup] | None:
        """The next n usable groups (blocking), dropping duplicates and over-stale groups.

        Returns None if `stop` is set first (the groups taken so far go back to the queue
        front is not possible with a FIFO, so they are kept for the next call)."""
        out = self._partial
        while len(out) < n:
            if stop is not None and stop.is_set():
                return None
            try:
                g = self.queue.get(timeout=1.0)
            except queue.Empty:
                if on_wait is not None:
                    on_wait()
                continue
            if g.grant_id in self.seen:
                self.counters["dropped_duplicate"] += 1
                continue
            oldest = g.oldest_version
            if oldest is not None and version - oldest > max_staleness:
                self.counters["dropped_stale"] += 1
                self.counters["consumed"] += 1
                self.seen.add(g.grant_id)
                log.info("dropped group %d from %s: oldest token v%d, learner v%d, bound %d",
                         g.grant_id, g.actor_id, oldest, version, max_staleness)
                continue
            self.seen.add(g.grant_id)
            self.counters["consumed"] += 1
            out.append(g)
        self._partial = []
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
