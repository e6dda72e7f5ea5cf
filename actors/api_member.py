"""Actor side of the `broadcast` weights backend through vLLM's weight-transfer API
(`actor.weight_loader = "vllm_api"`): the same control messages and replies as
`protocol.broadcast.BroadcastMember`, but the group join and each receive are carried out by
the engine's own workers (`actors/transfer_engine.py`), called with `collective_rpc`.

Threads: the I/O thread hands it the learner's `WeightGroupJoin` / `WeightBroadcast`
(`submit`) and sends what comes out of `outbox`; the engine thread carries the messages out
between two steps (`serve`), since the engine is not thread-safe.

Guarantees (as BroadcastMember's):
- A broadcast version is applied only when every chunk arrived and its CRC-32C matched (the
  workers check it before touching the model); on any failure the engine keeps its weights
  and the version is re-requested over ZeroMQ (`WeightAck` with next_index 0), which then
  loads it through the same API (inline).
- A failed join answers `WeightGroupReady(ok=False)`: the actor stays on ZeroMQ until the
  learner's next epoch.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter

from protocol.broadcast import answer_join, local_address_towards
from protocol.messages import WeightAck, WeightBroadcast, WeightGroupJoin, WeightGroupReady

log = logging.getLogger("dynamo.actor")


def init_info(msg: WeightGroupJoin, local_host: str) -> dict:
    """The `ChainInitInfo` of a join, as the dict `init_weight_transfer_engine` takes."""
    return {"host": msg.host, "port": msg.port, "epoch": msg.epoch, "rank": msg.rank,
            "world": msg.world, "timeout_s": msg.timeout_s, "local_host": local_host,
            "ranks": msg.ranks}


def update_info(msg: WeightBroadcast) -> dict:
    """The `ChainUpdateInfo` of a broadcast version, as the dict `update_weights` takes."""
    return {"version": msg.version, "epoch": msg.epoch, "total_bytes": msg.total_bytes,
            "chunk_bytes": msg.chunk_bytes, "n_chunks": msg.n_chunks, "crc32c": msg.crc32c,
            "tensors": [tuple(t) for t in msg.tensors]}


class ApiMember:
    """Joins broadcast groups and receives versions through the engine's workers."""

    def __init__(self, receiver, engine, learner_host: str, learner_port: int) -> None:
        self.receiver = receiver  # the actor's WeightReceiver: its version
        self.engine = engine
        self.local_host = local_address_towards(learner_host, learner_port)
        self.outbox: queue.Queue = queue.Queue()
        self.counters: Counter[str] = Counter()
        self._in: queue.Queue = queue.Queue()
        self._closed = False

    def offer(self) -> WeightGroupReady:
        """Each worker of the engine takes a chain rank of its own."""
        return WeightGroupReady(actor_id=self.receiver.actor_id, epoch=0, ok=True,
                                ranks=self.engine.tensor_parallel_size)

    def submit(self, msg: WeightGroupJoin | WeightBroadcast) -> None:
        self._in.put(msg)

    def close(self) -> None:
        self._closed = True

    def serve(self, before=lambda: None) -> list[tuple[int, float]]:
        """Engine thread, between steps: carries out every message waiting, each after
        `before()` (the colocated engine wakes up there: a message that arrives while this
        runs must not reach a sleeping engine). Returns the versions applied, each with the
        seconds it took (receive and load)."""
        applied = []
        while not self._closed:
            try:
                msg = self._in.get_nowait()
            except queue.Empty:
                break
            before()
            if isinstance(msg, WeightGroupJoin):
                self._join(msg)
            else:
                t = time.perf_counter()
                if self._receive(msg):
                    applied.append((msg.version, time.perf_counter() - t))
        return applied

    def _join(self, msg: WeightGroupJoin) -> None:
        answer_join(self, msg,
                    lambda: self.engine.join_weight_group(init_info(msg, self.local_host)))

    def _receive(self, msg: WeightBroadcast) -> bool:
        try:
            self.engine.receive_weights(update_info(msg), msg.version)
        except Exception as e:  # noqa: BLE001 - the engine kept its weights: ZeroMQ fallback
            self.counters["broadcast_failures"] += 1
            log.warning("weight broadcast of v%d failed (%s): re-requesting over ZeroMQ",
                        msg.version, e)
            self.outbox.put(WeightAck(actor_id=self.receiver.actor_id,
                                      version=self.receiver.version, next_index=0))
            return False
        self.receiver.version = msg.version
        self.counters["versions_received"] += 1
        self.outbox.put(WeightAck(actor_id=self.receiver.actor_id, version=msg.version,
                                  next_index=msg.n_chunks))
        return True
