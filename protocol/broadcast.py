"""The `broadcast` weights backend: weights flow once down a pipelined chain through every
actor, in a torch process group of the learner (rank 0) and the actors (gloo on CPU, NCCL on
GPU, the same code). The learner sends one copy whatever the number of actors; each actor
receives chunk k from the rank before it and forwards it to the next while chunk k+1
arrives, so N actors take about (chunks + N - 1) chunk times instead of N full transfers.

Control stays on the weights socket (CURVE): `WeightGroupJoin` (learner -> actor: enter group
epoch e as rank r), `WeightGroupReady` (actor -> learner: an offer, or joined / failed),
`WeightBroadcast` (learner -> member: this version follows as n_chunks broadcasts).

Guarantees:
- Membership is by group epoch. An actor that joins or restarts catches up over ZeroMQ and
  enters the group at the next epoch, which the learner forms before its next publish
  whenever the set of live broadcast-capable actors changed.
- A dead or stopped member cannot hang the learner: forming a group and every broadcast have
  a timeout; on failure the group is dropped (counted), its members fall back to the ZeroMQ
  transfer of that version, and the next publish forms a new group of the members that are
  still alive (an actor that failed to join is left out for `retry_s`).
- An actor applies a broadcast version only when every chunk arrived and the blob's CRC-32C
  matches the learner's; otherwise it re-requests the version over ZeroMQ.
- The process group is not authenticated or encrypted (as NCCL is not, in every RL framework
  that broadcasts weights): use it on a trusted cluster network. Control messages, rollouts
  and the ZeroMQ fallback stay CURVE-protected.
"""

from __future__ import annotations

import datetime
import logging
import queue
import socket
import threading
import time
from collections import Counter, deque

import numpy as np
import torch
from crc32c import crc32c

from protocol.blob import unpack_weights
from protocol.messages import (
    WeightAck,
    WeightBroadcast,
    WeightGroupJoin,
    WeightGroupReady,
)

log = logging.getLogger("dynamo.weights")


def local_address_towards(host: str, port: int) -> str:
    """The address of this machine's interface that routes to host:port (no packet sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def open_group(store: torch.distributed.Store, epoch: int, rank: int, world: int,
               local_host: str, timeout_s: float) -> torch.distributed.ProcessGroup:
    """A process group of its own (not the default group: the learner's ranks have theirs)
    for broadcast epoch `epoch`; blocks until every rank joined or timeout_s passed."""
    from torch.distributed import PrefixStore, ProcessGroupGloo

    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = PrefixStore(f"weights-epoch-{epoch}", store)
    if torch.cuda.is_available():
        from torch.distributed import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return ProcessGroupNCCL(prefixed, rank, world, opts)
    opts = ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [ProcessGroupGloo.create_device(hostname=local_host)]
    return ProcessGroupGloo(prefixed, rank, world, opts)


def chunk_views(blob: np.ndarray | bytearray, chunk_bytes: int, device: torch.device
                ) -> list[torch.Tensor]:
    """The blob as uint8 tensors of chunk_bytes (CPU: views, no copy)."""
    flat = torch.frombuffer(blob, dtype=torch.uint8) if len(blob) else torch.zeros(0, torch.uint8)
    return [c.to(device) for c in flat.split(chunk_bytes)] if device.type != "cpu" \
        else list(flat.split(chunk_bytes))


def chain_broadcast(pg, chunks: list[torch.Tensor], rank: int, world: int, timeout_s: float,
                    window: int = 8) -> None:
    """Rank 0 sends every chunk to rank 1; rank r receives each from r-1 and forwards it to
    r+1 (at most `window` sends in flight). Raises on a broken link or after timeout_s."""
    timeout = datetime.timedelta(seconds=timeout_s)
    sends: deque = deque()
    for k, c in enumerate(chunks):
        if rank > 0:
            pg.recv([c], rank - 1, k).wait(timeout)
        if rank + 1 < world:
            sends.append(pg.send([c], rank + 1, k))
            if len(sends) >= window:
                sends.popleft().wait(timeout)
    while sends:
        sends.popleft().wait(timeout)


def answer_join(member, msg: WeightGroupJoin, join) -> None:
    """Run `join()` for group `msg.epoch` and queue the member's `WeightGroupReady`; any
    failure is counted and logged, and the member stays on the ZeroMQ path."""
    try:
        join()
        member.counters["groups_joined"] += 1
        ok = True
    except Exception as e:  # noqa: BLE001 - any failure: stay on the ZeroMQ path
        member.counters["group_join_failures"] += 1
        log.warning("could not join weight broadcast group %d: %s", msg.epoch, e)
        ok = False
    member.outbox.put(WeightGroupReady(actor_id=member.receiver.actor_id, epoch=msg.epoch,
                                       ok=ok))


class BroadcastMember:
    """Actor side: a thread that joins groups and receives broadcast versions.

    `submit` takes `WeightGroupJoin` / `WeightBroadcast` from the actor's I/O thread; replies
    for the weights socket come out of `outbox` (the I/O thread sends them); complete
    versions are put on `deliver` as (version, tensors viewing the blob, blob), exactly like
    the ZeroMQ receiver's, so the same weights thread prepares and applies them.
    """

    def __init__(self, receiver, deliver: queue.Queue, learner_host: str, learner_port: int
                 ) -> None:
        self.receiver = receiver  # the actor's WeightReceiver: its version and buffer pool
        self.deliver = deliver
        self.local_host = local_address_towards(learner_host, learner_port)
        self.outbox: queue.Queue = queue.Queue()
        self.counters: Counter[str] = Counter()
        self._in: queue.Queue = queue.Queue()
        self._pg = None
        self._epoch = self._rank = self._world = 0
        self._timeout_s = 30.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weights-broadcast", daemon=True)
        self._thread.start()

    def offer(self) -> WeightGroupReady:
        return WeightGroupReady(actor_id=self.receiver.actor_id, epoch=0, ok=True)

    def submit(self, msg: WeightGroupJoin | WeightBroadcast) -> None:
        self._in.put(msg)

    def close(self) -> None:
        self._stop.set()
        self._in.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._in.get()
            if msg is None:
                return
            if isinstance(msg, WeightGroupJoin):
                self._join(msg)
            else:
                self._receive(msg)

    def _join(self, msg: WeightGroupJoin) -> None:
        self._pg = None

        def join() -> None:
            store = torch.distributed.TCPStore(
                msg.host, msg.port, msg.world, is_master=False,
                timeout=datetime.timedelta(seconds=msg.timeout_s))
            self._pg = open_group(store, msg.epoch, msg.rank, msg.world, self.local_host,
                                  msg.timeout_s)
            self._epoch, self._rank, self._world = msg.epoch, msg.rank, msg.world
            self._timeout_s = msg.timeout_s

        answer_join(self, msg, join)

    def _receive(self, msg: WeightBroadcast) -> None:
        pg = self._pg
        if pg is None or msg.epoch != self._epoch:
            self.counters["broadcast_wrong_epoch"] += 1
            return  # the learner's broadcast fails at its timeout; we get it over ZeroMQ
        blob = self.receiver.pool.take(msg.total_bytes)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        t = time.perf_counter()
        try:
            chunks = chunk_views(blob, msg.chunk_bytes, device)
            chain_broadcast(pg, chunks, self._rank, self._world, self._timeout_s)
            if device.type != "cpu":  # received on the device: copy into the host blob
                np.frombuffer(blob, np.uint8)[:] = torch.cat(chunks).cpu().numpy()
        except Exception as e:  # noqa: BLE001 - group broken: fall back to ZeroMQ
            self._pg = None
            self.receiver.pool.give_back(blob)
            self.counters["broadcast_failures"] += 1
            log.warning("weight broadcast of v%d failed (%s): re-requesting over ZeroMQ",
                        msg.version, e)
            self.outbox.put(WeightAck(actor_id=self.receiver.actor_id,
                                      version=self.receiver.version, next_index=0))
            return
        if crc32c(blob) != msg.crc32c:
            self.receiver.pool.give_back(blob)
            self.counters["checksum_mismatch"] += 1
            log.error("weights v%d from the broadcast failed its checksum; re-requesting",
                      msg.version)
            self.outbox.put(WeightAck(actor_id=self.receiver.actor_id,
                                      version=self.receiver.version, next_index=0))
            return
        self.receiver.version = msg.version
        self.counters["versions_received"] += 1
        log.info("received weights v%d by broadcast in %.3fs", msg.version,
                 time.perf_counter() - t)
        self.deliver.put((msg.version, unpack_weights(msg.announce(), blob), blob))
        self.outbox.put(WeightAck(actor_id=self.receiver.actor_id, version=msg.version,
                                  next_index=msg.n_chunks))
