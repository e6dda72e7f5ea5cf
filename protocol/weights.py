"""Versioned weight transport over ZeroMQ: learner ROUTER -> actor DEALERs, credit-based.

The whole transport is two objects behind a small interface, so an NCCL broadcast can
replace it on GPU clusters:
- `WeightPublisher.publish(version, named_tensors)` (learner side; a background thread owns
  the socket) and
- `WeightReceiver.handle(msg) -> replies, complete tensors or None` (actor side, socket-free).

Guarantees:
- Only the newest version is ever sent; an actor mid-transfer of an older version is switched
  to the newest (it discards the partial blob).
- Each actor has its own credit window (`window` chunks unacknowledged at most): a slow actor
  neither loses chunks (nothing exceeds the socket's high-water mark) nor stalls the others.
- Every chunk carries its CRC-32C, computed by the publisher's thread as the chunk is first sent
  (so `publish` costs the learner one copy of the weights, no hashing) and checked by the actor
  as it arrives; a mismatch is counted and the version re-requested. An actor applies a
  version only when every chunk arrived intact.
- No shared filesystem: everything travels on the socket.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import zmq
from crc32c import crc32c

from protocol.blob import pack_weights, unpack_weights
from protocol.broadcast import chain_broadcast, chunk_views, open_group
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.listen import listening_store
from protocol.messages import (
    WeightAck,
    WeightAnnounce,
    WeightBroadcast,
    WeightChunk,
    WeightGroupJoin,
    WeightGroupReady,
)

log = logging.getLogger("dynamo.weights")

@dataclass(slots=True)
class _Peer:
    version: int  # version this actor holds (or is being sent)
    sent: int = 0  # chunks sent of `version`
    acked: int = 0  # chunks acknowledged of `version`
    last_seen: float = 0.0
    offered: bool = False  # can join a broadcast group
    ranks: int = 1  # chain ranks its engine's workers take (its tensor-parallel size)
    retry_after: float = 0.0  # left out of broadcast groups until then (failed to join)
    broadcasting: bool = False  # receives the latest version by broadcast: no chunks


@dataclass(slots=True)
class BroadcastSettings:
    """The `broadcast` backend on the learner: the rendezvous actors reach (host:port), the
    timeout of joining and of each transfer, and the chunk size of the pipelined chain. The
    rendezvous listens on `bind_host` only (default: host)."""
    host: str
    port: int
    timeout_s: float = 30.0
    chunk_bytes: int = 4 << 20
    retry_s: float = 60.0
    bind_host: str | None = None


class WeightPublisher:
    """Learner side. Call `publish` after an optimizer step; a thread serves the actors."""

    def __init__(self, sock: zmq.Socket, *, window: int = 4, peer_timeout_s: float = 60.0,
                 broadcast: BroadcastSettings | None = None):
        self.sock = sock
        self.window = window
        self.peer_timeout_s = peer_timeout_s
        self.counters: Counter[str] = Counter()
        self._latest: tuple[WeightAnnounce, memoryview] | None = None
        self._crcs: list[int | None] = []  # per chunk of the latest blob, filled as first sent
        # Zero-copy sends of the latest blob, tracked: a retired blob is reused for a later
        # version only once libzmq has let go of every chunk sent from it.
        self._trackers: list[zmq.MessageTracker] = []
        self._retired: list[tuple[np.ndarray, list[zmq.MessageTracker]]] = []
        self._lock = threading.Lock()
        # publish() wakes the serving thread through a pipe (it polls the socket and the pipe)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._peers: dict[bytes, _Peer] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="weight-publisher", daemon=True)
        self.delivered: dict[int, float] = {}  # version -> time the last known actor finished
        self._outbox: deque[tuple[bytes, object]] = deque()  # other threads' control messages
        self.broadcast = broadcast
        self._bcast_wake = threading.Event()
        self._bcast_blob: np.ndarray | None = None  # being broadcast: not reused meanwhile
        self._bcast_thread = None
        if broadcast is not None:
            self._store = listening_store(broadcast.bind_host or broadcast.host, broadcast.port,
                                          timeout_s=broadcast.timeout_s)
            self._pg, self._members, self._epoch, self._world = None, [], 0, 1
            self._joined: dict[bytes, bool] = {}
            self._bcast_thread = threading.Thread(target=self._broadcast_loop,
                                                  name="weight-broadcast", daemon=True)
            self._bcast_thread.start()
        self._thread.start()

    def publish(self, version: int, named: Iterable[tuple[str, torch.Tensor]],
                chunk_bytes: int = 8 << 20, total_bytes: int | None = None) -> WeightAnnounce:
        """Snapshot `named` and serve it as `version`. With `total_bytes`, `named` may be a
        lazy iterator (consumed once, in order)."""
        if total_bytes is None:
            named = list(named)
            total_bytes = sum(t.numel() * t.element_size() for _, t in named)
        total = total_bytes
        reuse = None
        with self._lock:
            for i, (buf, trackers) in enumerate(self._retired):
                if buf.nbytes == total and all(t.done for t in trackers) \
                        and buf is not self._bcast_blob:
                    reuse = self._retired.pop(i)[0]
                    self.counters["buffers_reused"] += 1
                    break
        ann, buf = pack_weights(named, version, chunk_bytes, out=reuse, total_bytes=total)
        with self._lock:
            if self._latest is not None:  # retire the previous blob (the memoryview's array)
                self._retired = [*self._retired[-1:], (self._latest[1].obj, self._trackers)]
            self._latest = (ann, memoryview(buf))
            self._crcs, self._trackers = [None] * ann.n_chunks, []
            # Broadcast candidates wait for the broadcast thread (it hands a member back to
            # the chunked transfer if the group cannot form or the broadcast fails).
            now = time.monotonic()
            for p in self._peers.values():
                p.broadcasting = self.broadcast is not None and p.offered \
                    and now >= p.retry_after
        self.counters["published"] += 1
        self._bcast_wake.set()
        self._wake()
        return ann

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the thread is awake anyway
            pass

    @property
    def peers(self) -> dict[bytes, int]:
        with self._lock:
            return {k: p.version if p.acked >= self._n_chunks(p) else -1
                    for k, p in self._peers.items()}

    def _n_chunks(self, p: _Peer) -> int:
        latest = self._latest
        return latest[0].n_chunks if latest and latest[0].version == p.version else 0

    def close(self) -> None:
        self._stop.set()
        self._bcast_wake.set()
        self._wake()
        self._thread.join(timeout=5)
        if self._bcast_thread is not None:
            self._bcast_thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _send(self, ident: bytes, msg, track: bool = False) -> None:
        try:
            tracker = self.sock.send_multipart([ident, *encode(msg)], copy=False, track=track)
            if track and tracker is not None:
                self._trackers.append(tracker)
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or full: forget it, it re-asks
            self.counters["send_failed"] += 1
            self._peers.pop(ident, None)
            log.info("weight send to %r failed: %s", ident, e)

    def _pump(self, ident: bytes, p: _Peer) -> None:
        latest = self._latest
        if latest is None or p.broadcasting:
            return
        ann, blob = latest
        if p.version != ann.version:
            p.version, p.sent, p.acked = ann.version, 0, 0
            self._send(ident, ann)
        while p.sent < ann.n_chunks and p.sent - p.acked < self.window:
            i, lo = p.sent, p.sent * ann.chunk_bytes
            data = blob[lo:lo + ann.chunk_bytes]
            crc = self._crcs[i]
            if crc is None:
                crc = self._crcs[i] = crc32c(data)
            self._send(ident, WeightChunk(version=ann.version, index=i, data=data, crc32c=crc),
                       track=True)
            p.sent += 1
            self.counters["chunks_sent"] += 1

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(50))
            if events.get(self._wake_r):
                os.read(self._wake_r, 4096)
            now = time.monotonic()
            with self._lock:
                while self._outbox:
                    ident, msg = self._outbox.popleft()
                    self._send(ident, msg)
                if events.get(self.sock):
                    self._recv(now)
                for ident, p in list(self._peers.items()):
                    if now - p.last_seen > self.peer_timeout_s:
                        del self._peers[ident]
                        self.counters["peers_timed_out"] += 1
                    else:
                        self._pump(ident, p)

    def _recv(self, now: float) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident = frames[0].bytes
            try:
                msg = decode(frames[1:])
                if not isinstance(msg, WeightAck | WeightGroupReady):
                    raise ProtocolError(f"unexpected {type(msg).__name__} on the weights socket")
            except ProtocolError as e:
                self.counters[f"rejected_{e.code}"] += 1
                log.warning("weights socket rejected a message: %s", e)
                continue
            if isinstance(msg, WeightGroupReady):
                p = self._peers.get(ident)
                if p is None or self.broadcast is None:
                    self.counters["group_ready_ignored"] += 1
                elif msg.epoch == 0:
                    p.offered = True  # an offer: it joins at the next group epoch
                    p.ranks = msg.ranks
                else:
                    self._joined[ident] = msg.ok
                continue
            p = self._peers.get(ident)
            if p is None:
                # A new (or restarted) actor: it holds msg.version fully.
                p = self._peers[ident] = _Peer(version=msg.version)
                p.sent = p.acked = 1 << 62
            p.last_seen = now
            if msg.version == p.version:
                p.acked = max(p.acked, min(msg.next_index, p.sent))
                n = self._n_chunks(p)
                if n and msg.next_index >= n and p.version not in self.delivered:
                    self.delivered[p.version] = now
            elif msg.version < p.version and msg.next_index == 0:
                # Explicit re-request (e.g. after a checksum failure): restart from scratch.
                p.version, p.sent, p.acked, p.broadcasting = -1, 0, 0, False

    # ------------------------------------------------------------ the broadcast backend
    def _broadcast_loop(self) -> None:
        """Sends each new version down the chain of group members (forming a new group epoch
        first when the live members changed); on any failure the members fall back to the
        chunked ZeroMQ transfer of that version."""
        assert self.broadcast is not None
        cfg = self.broadcast
        done_version = None
        while not self._stop.is_set():
            self._bcast_wake.wait(timeout=1.0)
            self._bcast_wake.clear()
            with self._lock:
                latest = self._latest
            if latest is None or self._stop.is_set():
                continue
            ann, view = latest
            if ann.version == done_version:
                continue
            done_version = ann.version
            members = self._ensure_group()
            with self._lock:  # candidates outside the group take the chunked transfer
                for ident, p in self._peers.items():
                    if p.broadcasting and ident not in members:
                        p.broadcasting = False
            self._wake()
            if not members:
                continue
            blob = view.obj
            crc = crc32c(view)
            n_chunks = max(1, -(-ann.total_bytes // cfg.chunk_bytes))
            msg = WeightBroadcast(epoch=self._epoch, version=ann.version,
                                  total_bytes=ann.total_bytes, chunk_bytes=cfg.chunk_bytes,
                                  n_chunks=n_chunks, crc32c=crc, tensors=ann.tensors)
            with self._lock:
                self._bcast_blob = blob
                for ident in members:
                    p = self._peers.get(ident)
                    if p is not None:
                        p.version, p.sent, p.acked, p.broadcasting = \
                            ann.version, ann.n_chunks, 0, True
                    self._outbox.append((ident, msg))
            self._wake()
            t = time.monotonic()
            device = torch.device("cuda", torch.cuda.current_device()) \
                if torch.cuda.is_available() else torch.device("cpu")
            try:
                chain_broadcast(self._pg, chunk_views(blob, cfg.chunk_bytes, device), 0,
                                self._world, cfg.timeout_s)
                ok = True
            except Exception as e:  # noqa: BLE001 - a member died or the link broke
                ok = False
                self.counters["broadcast_failures"] += 1
                log.warning("weight broadcast of v%d failed (%s): the group is dropped, its "
                            "members get this version over ZeroMQ", ann.version, e)
            with self._lock:
                self._bcast_blob = None
                for ident in members:
                    p = self._peers.get(ident)
                    if p is None:
                        continue
                    if ok:
                        p.acked = p.sent
                    else:
                        p.version, p.sent, p.acked, p.broadcasting = -1, 0, 0, False
                if ok:
                    self.counters["broadcasts"] += 1
                    self.counters["broadcast_bytes"] += ann.total_bytes
                    self.delivered.setdefault(ann.version, time.monotonic())
                else:
                    self._pg, self._members = None, []
            self._wake()
            log.info("broadcast weights v%d to %d actor(s) in %.3fs%s", ann.version,
                     len(members), time.monotonic() - t, "" if ok else " (failed)")

    def _ensure_group(self) -> list[bytes]:
        """The members of the current group, forming a new epoch if the live broadcast-capable
        actors changed. Returns [] when no group could be formed (ZeroMQ carries the version)."""
        assert self.broadcast is not None
        cfg = self.broadcast
        now = time.monotonic()
        with self._lock:
            live = sorted(i for i, p in self._peers.items() if p.offered and now >= p.retry_after)
        if live == self._members and self._pg is not None:
            return live
        self._pg, self._members = None, []
        if not live:
            return []
        self._epoch += 1
        with self._lock:
            ranks = [self._peers[i].ranks if i in self._peers else 1 for i in live]
            world = 1 + sum(ranks)
            self._joined = {}
            first = 1  # each actor takes consecutive ranks, one per worker of its engine
            for ident, n in zip(live, ranks, strict=True):
                self._outbox.append((ident, WeightGroupJoin(
                    epoch=self._epoch, rank=first, world=world, host=cfg.host, port=cfg.port,
                    timeout_s=cfg.timeout_s, ranks=n)))
                first += n
        self._wake()
        try:
            pg = open_group(self._store, self._epoch, 0, world, cfg.host, cfg.timeout_s)
        except Exception as e:  # noqa: BLE001 - someone did not join in time
            self.counters["group_failures"] += 1
            deadline = time.monotonic() + 5.0  # members that are alive say so meanwhile
            while time.monotonic() < deadline and len(self._joined) < len(live):
                time.sleep(0.05)
            with self._lock:
                silent = [i for i in live if i not in self._joined]
                for ident in silent:
                    p = self._peers.get(ident)
                    if p is not None:
                        p.retry_after = time.monotonic() + cfg.retry_s
            log.warning("weight broadcast group %d did not form (%s); %d silent member(s) left "
                        "out for %.0fs, ZeroMQ carries this version", self._epoch, e,
                        len(silent), cfg.retry_s)
            return []
        self._pg, self._members, self._world = pg, live, world
        self.counters["groups_formed"] += 1
        log.info("weight broadcast group %d formed: learner + %d actor(s)", self._epoch,
                 len(live))
        return live


class BufferPool:
    """Receive buffers handed back after use (thread-safe): the actor's I/O thread fills one,
    its engine thread gives it back once the weights are applied (or superseded). A reused
    buffer skips the zero-fill and page faults of a fresh one."""

    def __init__(self, keep: int = 2) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._lock = threading.Lock()
        self.reused = 0

    def take(self, nbytes: int) -> bytearray:
        with self._lock:
            for i, b in enumerate(self._free):
                if len(b) == nbytes:
                    self.reused += 1
                    return self._free.pop(i)
        return bytearray(nbytes)

    def give_back(self, buf: bytearray) -> None:
        with self._lock:
            self._free = [*self._free[-(self._keep - 1):], buf] if self._keep > 1 else [buf]


class WeightReceiver:
    """Actor side, socket-free: feed it messages, send its replies, apply what it returns.

    A completed version comes back as (version, tensors viewing the buffer, buffer); hand the
    buffer to `pool.give_back` once the tensors are no longer used."""

    def __init__(self, actor_id: str, version: int = 0, pool: BufferPool | None = None) -> None:
        self.pool = pool or BufferPool()
        self.actor_id = actor_id
        self.version = version  # newest version fully received
        self.counters: Counter[str] = Counter()
        self._ann: WeightAnnounce | None = None
        self._blob: bytearray | None = None
        self._got = 0

    def hello(self) -> WeightAck:
        """First message (and the one re-sent after a reconnect): what this actor holds."""
        return WeightAck(actor_id=self.actor_id, version=self.version, next_index=1 << 40)

    def handle(self, msg: WeightAnnounce | WeightChunk
               ) -> tuple[list[WeightAck],
                          tuple[int, list[tuple[str, torch.Tensor]], bytearray] | None]:
        if isinstance(msg, WeightAnnounce):
            if msg.version == self.version:  # any other version is taken: a resumed learner
                self.counters["stale_announce"] += 1  # may legitimately roll versions back
                return [], None
            if self._blob is not None:  # a partial older version: its buffer is free again
                self.pool.give_back(self._blob)
            self._ann, self._blob, self._got = msg, self.pool.take(msg.total_bytes), 0
            return [], None
        ann = self._ann
        if ann is None or msg.version != ann.version or msg.index != self._got:
            self.counters["unexpected_chunk"] += 1
            return [], None
        lo = msg.index * ann.chunk_bytes
        want = min(ann.chunk_bytes, ann.total_bytes - lo)
        data = memoryview(msg.data)
        if data.nbytes != want:
            self.counters["bad_chunk_size"] += 1
            return self._restart(ann)
        if crc32c(data) != msg.crc32c:
            self.counters["checksum_mismatch"] += 1
            log.error("weights v%d chunk %d failed its checksum; re-requesting the version",
                      ann.version, msg.index)
            return self._restart(ann)
        assert self._blob is not None
        self._blob[lo:lo + want] = data
        self._got += 1
        ack = WeightAck(actor_id=self.actor_id, version=ann.version, next_index=self._got)
        if self._got < ann.n_chunks:
            return [ack], None
        self.version = ann.version
        blob, self._ann, self._blob = self._blob, None, None
        self.counters["versions_received"] += 1
        return [ack], (ann.version, unpack_weights(ann, blob), blob)

    def _restart(self, ann: WeightAnnounce) -> tuple[list[WeightAck], None]:
        if self._blob is not None:
            self.pool.give_back(self._blob)
        self._ann, self._blob, self._got = None, None, 0
        return [WeightAck(actor_id=self.actor_id, version=self.version, next_index=0)], None
