"""The learner's rollout intake: a PULL socket drained by one thread into a bounded queue.

Guarantees:
- Nothing malformed reaches the trainer: codec rejections are logged and counted by code.
- Nothing impossible reaches it either (`check_group`): with CURVE, a group is taken only
  from an actor's key and only for a grant the allocator issued (its MAC, protocol/auth.py);
  token ids are within the model's vocabulary, every sample fits max_model_len, log-probs
  are finite and <= 0 (within float32 rounding), token versions are not ahead of the
  learner's. A refused group is counted (`refused_<code>`), never queued and never
  acknowledged. A group refused for versions ahead of the learner (generated with the newer
  weights of a learner that has since restarted) hands its (grant, lease) back to the
  allocator with the next progress (`take_refusals`), which re-issues it at once instead of
  after a lease period (those grants held the pacing window for a lease); other refusals
  would repeat, so they wait for their lease. The run goes on.
- Every group queued is acknowledged to the allocator (`take_receipts`, sent with the
  learner's progress) and listed in `pending()` until consumed.
- A group is trained on at most once (duplicates by grant id are dropped and counted), and
  a group whose oldest token is more than `max_staleness` versions behind is dropped and
  counted with the reason; nothing else is ever dropped. Each batch takes the stalest groups
  received so far, so a group that finished after later ones is not left to go stale.
- Back-pressure: when the trainer falls behind, the queue fills, the thread stops reading,
  ZeroMQ's high-water marks fill, and actors stop sending (and stop asking for work), so the
  memory of every process stays bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np
import zmq

from learner.grant_record import GrantRecord
from protocol.auth import RunKeys, mac_ok, sender_key
from protocol.codec import decode
from protocol.errors import ProtocolError
from protocol.handshakes import HandshakeWatch
from protocol.idset import IdSet
from protocol.messages import LIST_LEN, LOGPROB_EPS, RolloutGroup
from protocol.sockets import SocketOptions, open_socket, start_authenticator

log = logging.getLogger("dynamo.learner.intake")


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a group must satisfy to be trained on."""

    vocab_size: int  # token ids in [0, vocab_size)
    max_model_len: int  # prompt + completion tokens of every sample
    grant_secret: bytes | None = None  # check the grant MAC (None: no CURVE, no check)


def check_group(g: RolloutGroup, b: Bounds, learner_version: int) -> str | None:
    """None if the group may be trained on, else the refusal code."""
    if b.grant_secret is not None and not mac_ok(b.grant_secret, g.grant_mac, g.grant_id,
                                                 g.lease_id, g.problem_id, g.n):
        return "grant_mac"
    if not g.prompt_token_ids.size:
        return "empty_prompt"  # no position to predict the first completion token from
    for ids in (g.prompt_token_ids, g.completion_token_ids):
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= b.vocab_size):
            return "token_id"
    if g.prompt_token_ids.size + int(g.completion_lengths.max()) > b.max_model_len:
        return "length"
    lp = g.behaviour_logprobs
    # max/min propagate NaN, so the comparison is False for NaN as for +-inf and > 0.
    if lp.size and not (lp.max() <= LOGPROB_EPS and lp.min() > -np.inf):
        return "logprob"
    if g.num_tokens and int(g.token_versions.max()) > learner_version:
        return "version_ahead"
    return None


class Intake:
    def __init__(self, endpoint: str, *, capacity: int, bounds: Bounds,
                 keys: RunKeys | None = None, max_message_bytes: int = 512 << 20,
                 ctx: zmq.Context | None = None, handshakes: HandshakeWatch | None = None):
        # With the process's context, its authenticator (actor keys) guards this socket too.
        self._own_ctx = ctx is None
        self.ctx = zmq.Context() if ctx is None else ctx
        self.keys = keys
        self.auth = start_authenticator(self.ctx, keys.actors) \
            if keys is not None and self._own_ctx else None
        self.sock = open_socket(self.ctx, zmq.PULL, endpoint, bind=True,
                                keys=keys.serve() if keys is not None else None,
                                options=SocketOptions(rcvhwm=64,
                                                      max_message_bytes=max_message_bytes))
        if handshakes is not None:  # before the intake thread owns the socket
            handshakes.watch(self.sock, "rollouts")
        self.max_message_bytes = max_message_bytes
        self.bounds = bounds
        self.learner_version = 0  # set by the training loop after each step
        self.queue: queue.Queue[RolloutGroup] = queue.Queue(maxsize=capacity)
        self.counters: Counter[str] = Counter()
        self.seen = IdSet()  # grant ids consumed (trained or dropped): de-duplication
        self.record = GrantRecord()
        self._lock = threading.Lock()  # receipts and pending, shared with the intake thread
        self._receipts: list[int] = []
        self._refusals: list[int] = []  # flat (grant_id, lease_id) pairs
        self._pending: Counter[int] = Counter()
        self._partial: list[RolloutGroup] = []  # taken before a stop, for the next take
        self._backlog: list[RolloutGroup] = []  # queued, not yet taken
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-intake", daemon=True)
        self._thread.start()

    def restore(self, record: GrantRecord) -> None:
        """Resume: the checkpoint's record; its ids are never trained again."""
        self.record = record
        self.seen = record.consumed()

    def _refuse(self, code: str, what: str) -> None:
        self.counters[f"refused_{code}"] += 1
        log.warning("refused %s (%s)", what, code)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(100):
                continue
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            try:
                msg = decode(frames, max_message_bytes=self.max_message_bytes)
            except ProtocolError as e:
                self.counters[f"rejected_{e.code}"] += 1
                log.warning("rejected a message on the rollout socket: %s", e)
                continue
            if not isinstance(msg, RolloutGroup):
                self.counters["rejected_unexpected_type"] += 1
                log.warning("rejected a %s on the rollout socket", type(msg).__name__)
                continue
            self.counters["received"] += 1
            if self.keys is not None and self.keys.role_of(sender_key(frames[0])) != "actor":
                self._refuse("role", f"group {msg.grant_id}: not from an actor's key")
                continue
            code = check_group(msg, self.bounds, self.learner_version)
            if code is not None:
                self._refuse(code, f"group {msg.grant_id} from {msg.actor_id}")
                if code == "version_ahead":  # authentic (MAC checked), and a re-run fixes it
                    with self._lock:
                        if len(self._refusals) < LIST_LEN:
                            self._refusals += [msg.grant_id, msg.lease_id]
                continue
            while not self._stop.is_set():
                try:
                    self.queue.put(msg, timeout=0.1)
                    break
                except queue.Full:
                    continue
            else:
                return
            with self._lock:
                self._receipts.append(msg.grant_id)
                self._pending[msg.grant_id] += 1

    def take_receipts(self) -> list[int]:
        """Grant ids queued since the last call (give them back if they could not be sent)."""
        with self._lock:
            out, self._receipts = self._receipts, []
        return out

    def give_back_receipts(self, ids: list[int]) -> None:
        with self._lock:
            self._receipts[:0] = ids

    def take_refusals(self) -> list[int]:
        """(grant_id, lease_id) pairs, flat, of authentic groups refused since the last
        call (not given back if unsent: the grant's lease expires anyway)."""
        with self._lock:
            out, self._refusals = self._refusals, []
        return out

    def pending(self) -> list[int]:
        """Grant ids queued and not yet consumed."""
        with self._lock:
            return list(self._pending)

    def _consumed(self, gid: int) -> None:
        with self._lock:
            self._pending[gid] -= 1
            if self._pending[gid] <= 0:
                del self._pending[gid]

    def take(self, n: int, version: int, max_staleness: int, on_wait=None,
             stop: threading.Event | None = None) -> list[RolloutGroup] | None:
        """The next n usable groups (blocking), the stalest first, dropping duplicates and
        over-stale groups.

        Every group queued so far is a candidate, not just the earliest arrivals: groups
        finish out of order (an actor batches several), and one overtaken by later groups
        would otherwise wait in the queue until it is stale. Returns None if `stop` is set
        first (the groups taken so far are kept for the next call)."""
        out = self._partial
        while len(out) < n:
            if stop is not None and stop.is_set():
                return None
            if not self._backlog:
                try:
                    self._backlog.append(self.queue.get(timeout=1.0))
                except queue.Empty:
                    if on_wait is not None:
                        on_wait()
                    continue
            while True:  # everything queued by now (bounded by the allocator's window)
                try:
                    self._backlog.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            fresh = self._usable(self._backlog, version, max_staleness)
            fresh.sort(key=lambda g: g.oldest_version if g.num_tokens else version)  # stable
            taken, self._backlog = fresh[:n - len(out)], fresh[n - len(out):]
            for g in taken:
                self.seen.add(g.grant_id)
            self.counters["consumed"] += len(taken)
            out.extend(taken)
        self._partial = []
        return out

    def _usable(self, groups: list[RolloutGroup], version: int, max_staleness: int
                ) -> list[RolloutGroup]:
        """The groups that are neither duplicates nor over-stale (those are dropped and
        counted here)."""
        out, ids = [], set()
        for g in groups:
            if g.grant_id in self.seen or g.grant_id in ids:
                self.counters["dropped_duplicate"] += 1
                self._consumed(g.grant_id)
                continue
            oldest = g.oldest_version
            if oldest is not None and version - oldest > max_staleness:
                self.seen.add(g.grant_id)
                self.counters["consumed"] += 1
                self.counters["dropped_stale"] += 1
                self.record.add_dropped("stale", g.grant_id)
                self._consumed(g.grant_id)
                log.info("dropped group %d from %s: oldest token v%d, learner v%d, bound %d",
                         g.grant_id, g.actor_id, oldest, version, max_staleness)
                continue
            ids.add(g.grant_id)
            out.append(g)
        return out

    def trained(self, groups: list[RolloutGroup]) -> None:
        """The training loop trained on these groups (taken by `take`)."""
        self.record.add_trained(g.grant_id for g in groups)
        for g in groups:
            self._consumed(g.grant_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        if self._own_ctx:
            self.ctx.term()
