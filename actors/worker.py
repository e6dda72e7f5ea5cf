"""An actor process: a vLLM engine kept busy with granted work, streaming scored groups.

Four threads; the sockets are all owned by the I/O thread:
- the engine thread (main) only generates: it adds granted prompts (built by
  `tasks.prompts`, as the evaluations build them) to the engine's continuous batch, steps it,
  swaps prepared weight versions in between steps;
- the scoring thread decodes finished groups and scores them in a pool of verifier
  processes (`tasks.scoring`: a check over `task.verifier_timeout_s` is killed, scores 0 and
  is counted in `verifier_timeouts`);
- the I/O thread talks to the allocator (requests work ahead of need, reports stats,
  heartbeats), the learner (pushes scored groups) and the weight publisher;
- the weights thread prepares each complete version (on CPU: packs its kernel handles) while
  the engine goes on generating with the old one. With actor.weight_loader = "vllm_api" the
  engine thread itself loads versions through vLLM's weight-transfer API, and with the
  broadcast backend its workers join the group and receive (`actors/api_member.py`).
So generation never waits on a network round-trip, a verifier or a weight repack, and
heartbeats and weight acknowledgements never wait on a step or a verifier.

Guarantees:
- A group holds exactly the n samples of its grant (groups are atomic); every token carries
  the behaviour log-prob of the distribution it was sampled from and the policy version of the
  weights that produced it.
- A grant issued at learner version v is not started before this actor holds version >= v
  (synchronous mode and actors joining mid-run generate with current weights).
- Results are never dropped on a busy or absent peer: they wait in bounded outboxes, and the
  actor stops asking for work while its outbox to the learner is full (back-pressure). Bounds:
  groups for the learner <= 16 + actor.prefetch_grants (no work is requested beyond 16, and
  at most prefetch_grants are held); messages for the allocator <= one stats report per
  such group + the newest heartbeat (an unsent heartbeat is replaced, not queued behind).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import zmq

from actors import heap
from actors.config import ActorConfig
from actors.engine import Engine, Sample, Update
from launch.runtime import heap_state
from protocol.auth import RunKeys
from protocol.errors import ProtocolError
from protocol.messages import (
    Error,
    Heartbeat,
    Message,
    NoWork,
    RolloutGroup,
    StatsReport,
    WeightAnnounce,
    WeightBroadcast,
    WeightChunk,
    WeightGroupJoin,
    WorkGrant,
    WorkRequest,
)
from protocol.sockets import SocketOptions, open_socket, recv, send
from protocol.weights import BufferPool, WeightReceiver
from tasks.config import TaskConfig
from tasks.prompts import prompt_token_ids, render_prompt, resolved_prompt_format
from tasks.scoring import Verifier
from telemetry.spans import close_trace, now_ns, open_trace, record

if TYPE_CHECKING:
    from actors.api_member import ApiMember
    from protocol.broadcast import BroadcastMember

log = logging.getLogger("dynamo.actor")
PHASE_SPAN_NS = 500_000_000  # engine steps / idle polls coalesce into spans of at most 0.5 s


@dataclass(slots=True)
class _Group:
    grant: WorkGrant
    prompt_ids: list[int]
    started: float
    samples: list[Sample] = field(default_factory=list)


@dataclass(slots=True)
class _IoState:
    """The I/O thread's sockets, outboxes and timers (no other thread touches them)."""

    ctx: zmq.Context
    alloc: zmq.Socket
    push: zmq.Socket  # scored groups to the learner
    wsock: zmq.Socket  # the weight publisher
    receiver: WeightReceiver
    member: BroadcastMember | ApiMember | None
    poller: zmq.Poller
    metrics_f: TextIO | None
    to_learner: deque[RolloutGroup] = field(default_factory=deque)
    to_alloc: deque[Message] = field(default_factory=deque)
    request_sent_at: float = -1e9  # of the unanswered work request (-1e9: none)
    retry_at: float = 0.0  # no work request before this (the allocator had none)
    announced_at: float = field(default_factory=time.perf_counter)  # the arriving version's
    next_beat: float = 0.0
    hello_due: bool = True  # the publisher has not got our latest hello (offer) yet
    next_metrics: float = field(default_factory=lambda: time.monotonic() + 2.0)
    next_trim: float = 0.0  # set to one actor.heap_trim_s after start


class _EngineSleep:
    """Colocated placement on GPU: the engine frees its GPU memory for the learner once it
    has had no work for `after_s` (vLLM sleep mode), and wakes before the next weights or
    grant. `after_s = None`: never (the engine has the device to itself, or runs on CPU)."""

    def __init__(self, engine, after_s: float | None, counters) -> None:
        self.engine, self.after_s, self.counters = engine, after_s, counters
        self.idle_since: float | None = None  # monotonic time the engine ran out of work

    def idle(self, t_ns: int) -> None:
        self.idle_since = self.idle_since or time.monotonic()
        if self.after_s is not None and not self.engine.asleep \
                and time.monotonic() - self.idle_since >= self.after_s:
            self.engine.sleep()
            record("sleep", t_ns, now_ns())
            self.counters["engine_sleeps"] += 1

    def wake(self) -> None:
        if self.after_s is not None and self.engine.asleep:
            t = now_ns()
            self.engine.wake_up()
            self.idle_since = None  # idle time counts again from here
            record("wake_up", t, now_ns())
            self.counters["engine_wake_ups"] += 1

    def worked(self) -> None:
        """The engine did work (generated, or loaded weights): idle time counts from here,
        so it does not go back to sleep straight after loading new weights."""
        self.idle_since = None


@dataclass(slots=True)
class Endpoints:
    allocator: str
    rollouts: str
    weights: str
    weights_backend: str = "zmq"  # "broadcast": offer to join the learner's broadcast group


class Actor:
    def __init__(self, cfg: ActorConfig, model_path: str, endpoints: Endpoints, *,
                 index: int = 0, keys: RunKeys | None = None,
                 max_message_bytes: int = 512 << 20, metrics_path: Path | None = None,
                 run_dir: Path | None = None, task: TaskConfig | None = None,
                 sleep_when_idle_s: float | None = None) -> None:
        self.cfg = cfg
        # colocated placement on GPU: the engine frees its memory for the learner after this
        # long without work (vLLM sleep mode) and wakes up for the next weights or grant
        self.sleep_when_idle_s = sleep_when_idle_s
        task = task or TaskConfig()
        self.index = index
        self.actor_id = f"{socket.gethostname()}-a{index}-{os.getpid()}"
        self.endpoints = endpoints
        self.keys = keys
        self.max_message_bytes = max_message_bytes
        self.engine = Engine(model_path, max_model_len=cfg.max_model_len,
                             max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, seed=cfg.seed + index, kv_cache_gib=cfg.kv_cache_gib,
                             dtype=cfg.dtype,
                             gpu_memory_utilization=cfg.gpu_memory_utilization,
                             tensor_parallel_size=cfg.tensor_parallel_size,
                             enforce_eager=cfg.enforce_eager, weight_loader=cfg.weight_loader,
                             sleep_mode=sleep_when_idle_s is not None)
        self.tokenizer = self.engine.tokenizer
        self.prompt_format = resolved_prompt_format(task)
        # Fails here, not at the first grant, when the format cannot be built (chat template).
        log.info("prompt format %s, e.g. %r", self.prompt_format,
                 render_prompt(self.tokenizer, "<problem>", self.prompt_format))
        self.prompt_logged = False
        self.verifier = Verifier(task.verifier_timeout_s, workers=cfg.verifier_workers,
                                 answer_extraction=task.answer_extraction)
        self.grants: queue.Queue[WorkGrant] = queue.Queue()
        # engine thread -> scoring thread -> I/O thread
        self.finished: queue.Queue[tuple[_Group, float]] = queue.Queue()
        self.scored: queue.Queue[tuple[RolloutGroup, StatsReport]] = queue.Queue()
        self.failure: BaseException | None = None  # of the scoring thread, re-raised by run()
        # complete versions (version, tensors, buffer): I/O thread -> weights thread, which
        # prepares them (packs new kernel handles while the engine generates) -> engine thread
        self.received: queue.Queue[tuple[int, list, bytearray] | None] = queue.Queue()
        self.weights: queue.Queue[tuple[int, Update, bytearray]] = queue.Queue()
        self.prepare_s = 0.0  # preparing weights off the engine thread
        self.weight_buffers = BufferPool()
        self.stop = threading.Event()
        self.counters: Counter[str] = Counter()
        self.member = None  # the broadcast backend's member thread (broadcast backend only)
        self.held = 0  # grants received and not yet sent back (I/O thread's view)
        self.held_ids: set[int] = set()
        self.engine_busy_s = 0.0
        self.engine_idle_s = 0.0
        self.weights_s = 0.0  # applying weights between engine steps
        self.gen_tokens = 0  # completion tokens of finished groups (engine thread)
        self.metrics_path = metrics_path
        self.started_at = time.time()
        self.run_dir = run_dir  # spans go to run_dir/trace when given

    # ================================================================ engine thread
    def run(self) -> None:
        if self.run_dir is not None:
            open_trace(self.run_dir, f"actor{self.index}", "actor", clock_id=self.actor_id)
        self.started_at = time.time()  # the cumulative engine counters start here
        io = threading.Thread(target=self._io_loop, name="actor-io", daemon=True)
        io.start()
        prep = threading.Thread(target=self._weights_loop, name="actor-weights", daemon=True)
        prep.start()
        score = threading.Thread(target=self._score_loop, name="actor-score", daemon=True)
        score.start()
        try:
            self._engine_loop()
        finally:
            self.stop.set()
            self.received.put(None)
            io.join(timeout=10)
            prep.join(timeout=10)
            score.join(timeout=10)
            close_trace()
        if self.failure is not None:
            raise RuntimeError("the actor's scoring thread failed") from self.failure

    def _engine_loop(self) -> None:
        eng = self.engine
        waiting: deque[WorkGrant] = deque()  # granted, waiting for weights or capacity
        max_applied = 0  # newest weights version this engine ever held
        active: dict[str, _Group] = {}  # "grant.lease" -> group being generated
        # The loop is hot (one engine step per iteration): consecutive iterations in the same
        # state (generate / wait_grant / wait_weights) are recorded as one span.
        phase: list = [None, 0, 0]  # span name, start (ns), iterations

        def enter(name: str | None, t: int) -> None:
            if phase[0] != name or t - phase[1] > PHASE_SPAN_NS:
                if phase[0] is not None:
                    record(phase[0], phase[1], t, steps=phase[2])
                phase[:] = [name, t, 0]
            phase[2] += 1

        sleeper = _EngineSleep(eng, self.sleep_when_idle_s, self.counters)
        wake = sleeper.wake

        while not self.stop.is_set():
            # joins and broadcast versions go straight into the workers: awake first
            served = self._serve_api_member(before=wake)
            if served:
                sleeper.worked()
            max_applied = max(max_applied, served)
            latest = None
            while True:
                try:
                    newer = self.weights.get_nowait()
                except queue.Empty:
                    break
                if latest is not None:  # superseded before it was applied
                    self.weight_buffers.give_back(latest[2])
                latest = newer
            if latest is not None:
                wake()
                t = now_ns()
                enter(None, t)
                eng.apply_weights(latest[1], latest[0])  # prepared by the weights thread
                sleeper.worked()
                if eng.holds_memory_of(latest[2]):
                    self.counters["weight_buffer_kept"] += 1  # the engine uses it: never reuse
                else:
                    self.weight_buffers.give_back(latest[2])
                max_applied = max(max_applied, latest[0])
                t_end = now_ns()
                record("apply_weights", t, t_end, version=latest[0])
                self.weights_s += (t_end - t) / 1e9
                self.counters["weight_updates"] += 1
                log.info("applied weights v%d in %.3fs at %.6f", latest[0], (t_end - t) / 1e9,
                         time.time())
            while True:
                try:
                    waiting.append(self.grants.get_nowait())
                except queue.Empty:
                    break
            while waiting and len(active) < self.cfg.max_batch_grants:
                g = waiting[0]
                # A resumed learner may roll versions back: then work issued for a version we
                # already held must not wait for it again (it would wait forever).
                if g.issued_version > eng.version and eng.version >= max_applied:
                    break  # in order: wait for the weights this work was issued for
                waiting.popleft()
                wake()
                key = f"{g.grant_id}.{g.lease_id}"
                ids = prompt_token_ids(self.tokenizer, g.prompt, self.prompt_format)
                if not self.prompt_logged:
                    log.info("first prompt as sent (problem %s): %r", g.problem_id,
                             self.tokenizer.decode(ids))
                    self.prompt_logged = True
                active[key] = _Group(g, ids, time.perf_counter())
                eng.add(key, ids, g.n)
            if eng.busy():
                sleeper.worked()
                t = now_ns()
                enter("generate", t)
                for key, samples in eng.step():
                    grp = active.pop(key)
                    grp.samples = samples
                    self.gen_tokens += sum(len(s.tokens) for s in samples)
                    self.finished.put((grp, time.perf_counter() - grp.started))
                self.engine_busy_s += (now_ns() - t) / 1e9
            else:
                t = now_ns()
                enter("wait_weights" if waiting else "wait_grant", t)
                sleeper.idle(t)
                try:
                    waiting.append(self.grants.get(timeout=0.002))
                except queue.Empty:
                    pass
                self.engine_idle_s += (now_ns() - t) / 1e9
        enter(None, now_ns())

    def _serve_api_member(self, before=lambda: None) -> int:
        """With actor.weight_loader = "vllm_api" and the broadcast backend: group joins and
        broadcast versions, carried out by the engine's workers between two steps, each after
        `before()`. Returns the newest version applied (0: none)."""
        member = self.member
        if member is None or not hasattr(member, "serve"):
            return 0
        t = now_ns()
        applied = member.serve(before)
        for version, seconds in applied:
            record("apply_weights", t, now_ns(), version=version, via="vllm_api")
            self.weights_s += seconds
            self.counters["weight_updates"] += 1
            self.counters["weights_vllm_api"] += 1
            log.info("received and applied weights v%d by broadcast through vLLM's API in "
                     "%.3fs at %.6f", version, seconds, time.time())
        return max((v for v, _ in applied), default=0)

    # ================================================================ weights thread
    def _weights_loop(self) -> None:
        """Prepares each complete version (the newest, when several arrived meanwhile) for the
        engine thread, which then only swaps it in between two steps. (Packing layer by layer
        while chunks still arrive was tried: with one core per actor it slowed the transfer
        as much as it saved.)"""
        while True:
            item = self.received.get()
            while item is not None:
                try:
                    newer = self.received.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    return
                self.weight_buffers.give_back(item[2])  # superseded before it was prepared
                self.counters["weight_versions_skipped"] += 1
                item = newer
            if item is None:
                return
            version, tensors, blob = item
            t = now_ns()
            update = self.engine.prepare_weights(tensors)
            self.counters["weights_packed" if update.prepared is not None
                          else "weights_vllm_api" if self.engine.weight_loader == "vllm_api"
                          else "weights_vllm_reload"] += 1
            t_end = now_ns()
            record("prepare_weights", t, t_end, version=version)
            self.prepare_s += (t_end - t) / 1e9
            log.info("prepared weights v%d in %.3fs", version, (t_end - t) / 1e9)
            self.weights.put((version, update, blob))

    # ================================================================ scoring thread
    def _score_loop(self) -> None:
        """Scores finished groups in the verifier pool, several in flight, and hands each to
        the I/O thread whole, once all its samples are scored."""
        verifier = self.verifier
        # job -> group, gen_s, submit ns, trace slot
        pending: dict[int, tuple[_Group, float, int, int]] = {}
        jobs = 0
        try:
            while not self.stop.is_set():
                arrived: list[tuple[_Group, float]] = []
                if not verifier.in_flight():
                    try:  # idle: wait for the engine
                        arrived.append(self.finished.get(timeout=0.05))
                    except queue.Empty:
                        continue
                while True:
                    try:
                        arrived.append(self.finished.get_nowait())
                    except queue.Empty:
                        break
                for grp, gen_s in arrived:
                    jobs += 1
                    # a trace track per job slot: jobs overlap, each slot's spans do not
                    slot = min(set(range(len(pending) + 1)) - {p[3] for p in pending.values()})
                    pending[jobs] = (grp, gen_s, now_ns(), slot)
                    g = grp.grant
                    verifier.submit(jobs, [
                        (g.verifier, self.tokenizer.decode(s.tokens, skip_special_tokens=True),
                         g.answer) for s in grp.samples])
                for key, scores in verifier.collect(0.01):
                    grp, gen_s, t, slot = pending.pop(key)
                    record("score", t, now_ns(), track=f"score-{slot}",
                           grant=grp.grant.grant_id, n=grp.grant.n)
                    self.scored.put(self._messages(grp, gen_s, np.array(scores, np.float32)))
        except BaseException as e:
            log.exception("scoring failed")
            self.failure = e
            self.stop.set()
        finally:
            verifier.close()

    # ================================================================ I/O thread
    def _io_loop(self) -> None:
        io = self._open_io()
        try:
            while not self.stop.is_set():
                self._io_step(io)
        finally:
            self._close_io(io)

    def _open_io(self) -> _IoState:
        """Connects to the allocator, the learner's rollout sink and the weight publisher."""
        ctx = zmq.Context()
        opts = SocketOptions(max_message_bytes=self.max_message_bytes, linger_ms=2000)
        k = self.keys
        alloc = open_socket(ctx, zmq.DEALER, self.endpoints.allocator, bind=False,
                            keys=k.connect(k.allocator) if k else None, options=opts)
        learner_keys = k.connect(k.learner) if k else None
        push = open_socket(
            ctx, zmq.PUSH, self.endpoints.rollouts, bind=False, keys=learner_keys,
            options=SocketOptions(sndhwm=64, max_message_bytes=self.max_message_bytes))
        wsock = open_socket(ctx, zmq.DEALER, self.endpoints.weights, bind=False,
                            keys=learner_keys, options=opts)
        receiver = WeightReceiver(self.actor_id, version=self.engine.version,
                                  pool=self.weight_buffers)
        self.member = self._broadcast_member(receiver)
        poller = zmq.Poller()
        poller.register(alloc, zmq.POLLIN)
        poller.register(wsock, zmq.POLLIN)
        io = _IoState(ctx, alloc, push, wsock, receiver, self.member, poller,
                      self.metrics_path.open("a") if self.metrics_path else None)
        io.next_trim = time.monotonic() + self.cfg.heap_trim_s
        return io

    def _io_step(self, io: _IoState) -> None:
        """One pass: what is due (heartbeat, metrics line, work request), every message
        waiting, then the results the scoring thread finished, out to learner and allocator."""
        now = time.monotonic()
        if now >= io.next_beat:
            self._send_heartbeat(io)
            io.next_beat = now + self.cfg.heartbeat_s
        if self.cfg.heap_trim_s and now >= io.next_trim:
            t = time.monotonic()
            self.counters["heap_trims"] += 1
            self.counters["heap_trimmed_bytes"] += heap.trim()
            self.counters["heap_trim_ms"] += int((time.monotonic() - t) * 1000)
            io.next_trim = time.monotonic() + self.cfg.heap_trim_s
        if io.metrics_f is not None and now >= io.next_metrics:
            self._write_metrics(io)
            io.next_metrics = now + 2.0
        if io.hello_due:
            self._send_hello(io)
        self._request_work(io, now)
        for sock, _ in io.poller.poll(5):
            self._receive_all(io, sock)
        while io.member is not None and not io.member.outbox.empty():
            self._try_send(io.wsock, io.member.outbox.get())
        self._take_scored(io)
        self._send_results(io)

    def _close_io(self, io: _IoState) -> None:
        if io.metrics_f is not None:
            self._write_metrics(io)  # the final counters
            io.metrics_f.close()
        if io.member is not None:
            io.member.close()
        for s in (io.alloc, io.push, io.wsock):
            s.close()
        io.ctx.term()

    def _send_heartbeat(self, io: _IoState) -> None:
        """A heartbeat to the allocator; a hello (and a broadcast offer) to the publisher is
        made due (`_send_hello`)."""
        # Sent at once when possible: the allocator reads (receive - sent_at) as delay + clock
        # offset, so time in our queue would bias the estimate.
        beat = Heartbeat(sender=self.actor_id, role="actor", sent_at=time.time(),
                         policy_version=io.receiver.version, in_flight=sorted(self.held_ids))
        if not self._try_send(io.alloc, beat):
            # only the newest heartbeat waits: an allocator away for hours costs one message
            io.to_alloc = deque(m for m in io.to_alloc if not isinstance(m, Heartbeat))
            io.to_alloc.append(beat)
        io.hello_due = True  # (re)subscribes after restarts: sent by _send_hello

    def _send_hello(self, io: _IoState) -> None:
        """The hello (and broadcast offer) to the publisher, retried at every pass until the
        socket takes it: the weights socket queues nothing for a peer it is not connected to
        yet (IMMEDIATE), so a hello sent before the handshake was dropped, and the publisher
        heard of us only at the next heartbeat (2 s without weights, early in every run)."""
        if self._try_send(io.wsock, io.receiver.hello()):
            io.hello_due = False
            if io.member is not None:
                self._try_send(io.wsock, io.member.offer())  # joins at the next epoch

    def _write_metrics(self, io: _IoState) -> None:
        io.metrics_f.write(json.dumps(self._metrics(len(io.to_learner))) + "\n")
        io.metrics_f.flush()

    def _request_work(self, io: _IoState, now: float) -> None:
        """Asks ahead: keeps `prefetch_grants` in hand, one request in flight at a time
        (re-sent if unanswered: the allocator may have restarted), none while the learner's
        outbox is backed up."""
        want = self.cfg.prefetch_grants - self.held
        if (want > 0 and now >= io.retry_at and now - io.request_sent_at > 1.0
                and len(io.to_learner) < 16):
            if self._try_send(io.alloc, WorkRequest(actor_id=self.actor_id, want=want,
                                                    policy_version=io.receiver.version)):
                io.request_sent_at = now

    def _receive_all(self, io: _IoState, sock: zmq.Socket) -> None:
        """Handles every message waiting on `sock`; a malformed one is counted and skipped."""
        while True:
            try:
                msg = recv(sock, zmq.NOBLOCK, max_message_bytes=self.max_message_bytes)
            except zmq.Again:
                return
            except ProtocolError as e:
                self.counters[f"rejected_{e.code}"] += 1
                log.warning("rejected a message: %s", e)
                continue
            self._handle(io, msg)

    def _handle(self, io: _IoState, msg: Message) -> None:
        if isinstance(msg, WorkGrant):
            self.held += 1
            self.held_ids.add(msg.grant_id)
            # answered (a pushed grant may have served the parked request in full): the next
            # request may go at once, so the allocator always holds one to push work to
            io.request_sent_at, io.retry_at = -1e9, 0.0
            self.grants.put(msg)
        elif isinstance(msg, NoWork):
            io.request_sent_at = -1e9
            io.retry_at = time.monotonic() + msg.retry_after_s
        elif isinstance(msg, WeightAnnounce | WeightChunk):
            self._handle_weights(io, msg)
        elif isinstance(msg, WeightGroupJoin | WeightBroadcast) and io.member is not None:
            io.member.submit(msg)  # its thread joins the group / receives
        elif isinstance(msg, Error):
            log.warning("peer error %s: %s", msg.code, msg.message)
        else:
            self.counters["unexpected_message"] += 1

    def _handle_weights(self, io: _IoState, msg: WeightAnnounce | WeightChunk) -> None:
        """Acknowledges chunks; a complete version goes to the weights thread."""
        if isinstance(msg, WeightAnnounce):
            io.announced_at = time.perf_counter()
        acks, done = io.receiver.handle(msg)
        for a in acks:
            self._try_send(io.wsock, a)
        if done is not None:
            self.received.put(done)
            log.info("received weights v%d (%.1f MB) in %.3fs at %.6f", done[0],
                     len(done[2]) / 1e6, time.perf_counter() - io.announced_at, time.time())

    def _take_scored(self, io: _IoState) -> None:
        """Moves scored groups to the outboxes: the group for the learner, its stats for the
        allocator; the grant is no longer held."""
        while True:
            try:
                group, stats = self.scored.get_nowait()
            except queue.Empty:
                return
            io.to_learner.append(group)
            io.to_alloc.append(stats)
            self.held -= 1
            self.held_ids.discard(group.grant_id)

    def _send_results(self, io: _IoState) -> None:
        """Sends from the outboxes in order, as far as each peer takes them now."""
        t_send, sent = now_ns(), 0
        while io.to_learner and self._try_send(io.push, io.to_learner[0]):
            g = io.to_learner.popleft()
            sent += 1
            self.counters["groups_sent"] += 1
            self.counters["samples_sent"] += g.n
            self.counters["tokens_sent"] += g.num_tokens
        if sent:
            record("send", t_send, now_ns(), groups=sent, outbox=len(io.to_learner))
        while io.to_alloc and self._try_send(io.alloc, io.to_alloc[0]):
            io.to_alloc.popleft()

    def _broadcast_member(self, receiver: WeightReceiver):
        """The broadcast backend's member thread, or None (ZeroMQ only) with the reason
        logged when the broadcast cannot run here."""
        if self.endpoints.weights_backend != "broadcast":
            return None
        from protocol.broadcast import BroadcastMember

        host, port = self.endpoints.weights.removeprefix("tcp://").rsplit(":", 1)
        try:
            if self.cfg.weight_loader == "vllm_api":  # the engine's workers join and receive
                from actors.api_member import ApiMember

                return ApiMember(receiver, self.engine, host, int(port))
            return BroadcastMember(receiver, self.received, host, int(port))
        except Exception as e:  # noqa: BLE001 - e.g. no route: ZeroMQ still carries weights
            log.warning("weights broadcast unavailable here (%s): weights come over ZeroMQ", e)
            return None

    def _metrics(self, outbox: int) -> dict[str, Any]:
        """Cumulative counters of this actor (one JSON line every 2 s)."""
        return {"time": time.time(), "actor": self.actor_id, "index": self.index,
                "started_at": self.started_at, "version": self.engine.version,
                "engine_busy_s": round(self.engine_busy_s, 4),
                "engine_idle_s": round(self.engine_idle_s, 4),
                "weights_s": round(self.weights_s, 4),
                "prepare_weights_s": round(self.prepare_s, 4), "gen_tokens": self.gen_tokens,
                "weight_packing_failures": self.engine.packing_failures,
                "cached_prompt_tokens": self.engine.cached_prompt_tokens,
                "native_version_stamps": getattr(self.engine, "native_stamps", 0),
                "version_stamp_disagreements": getattr(self.engine, "stamp_disagreements", 0),
                "held_grants": self.held,
                # start-up ran without the cyclic collector (launch.runtime): it is back on,
                # with what start-up created frozen out of its generations
                **heap_state(),
                "outbox": outbox, **self.counters, **heap.heap_stats(),
                **({f"broadcast_{k}": v for k, v in self.member.counters.items()}
                   if self.member is not None else {}),
                **{f"verifier_{k}": self.verifier.counters.get(k, 0)
                   for k in ("timeouts", "errors", "crashes", "unknown")}}

    def _try_send(self, sock: zmq.Socket, msg: Message) -> bool:
        try:
            send(sock, msg, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _messages(self, grp: _Group, gen_s: float, rewards: np.ndarray
                  ) -> tuple[RolloutGroup, StatsReport]:
        """The scored group for the learner and its (k, n) for the allocator."""
        g = grp.grant
        samples = grp.samples

        def cat(attr: str, dtype: Any) -> np.ndarray:
            parts = [np.asarray(getattr(s, attr), dtype=dtype) for s in samples]
            return np.concatenate(parts) if parts else np.zeros(0, dtype)
        group = RolloutGroup(
            grant_id=g.grant_id, lease_id=g.lease_id, problem_id=g.problem_id,
            actor_id=self.actor_id, prompt_token_ids=np.asarray(grp.prompt_ids, np.int32),
            completion_token_ids=cat("tokens", np.int32),
            completion_lengths=np.array([len(s.tokens) for s in samples], np.int32),
            behaviour_logprobs=cat("logprobs", np.float32),
            token_versions=cat("versions", np.int32), rewards=rewards,
            finished=np.array([not s.truncated for s in samples], bool), gen_seconds=gen_s,
            grant_mac=g.mac)
        stats = StatsReport(grant_id=g.grant_id, lease_id=g.lease_id, problem_id=g.problem_id,
                            actor_id=self.actor_id, k=int((rewards > 0).sum()), n=g.n)
        return group, stats
