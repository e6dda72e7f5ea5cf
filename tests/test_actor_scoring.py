"""An actor scores off its I/O thread: while a slow verifier works and a stuck one is killed,
heartbeats keep arriving at the allocator and a new weight version is acknowledged; the stuck
checks score 0, their processes are gone, the timeouts are counted, and each group still
arrives whole. Its prompts are built by tasks.prompts from the task config and the first one
is logged.

Real: the actor's threads, the verifier process pool, ZeroMQ over loopback, the weight
publisher. Stand-ins: the allocator and the learner (sockets driven by this test, which
records when each heartbeat arrives) and the vLLM engine (it returns fixed completions at
once: generation is not what this test is about).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import torch
import zmq

from actors import worker
from actors.config import ActorConfig
from actors.engine import Sample, Update
from launch.harness import wait_for
from launch.ports import free_ports
from protocol.messages import (
    Heartbeat,
    NoWork,
    RolloutGroup,
    StatsReport,
    WorkGrant,
    WorkRequest,
)
from protocol.sockets import SocketOptions, open_socket, recv, recv_routed, send_routed
from protocol.weights import WeightPublisher
from tasks import verifiers
from tasks.config import TaskConfig
from tasks.prompts import render_prompt, resolved_prompt_format

TIMEOUT_S = 1.5


def sleepy(completion: str, answer: str) -> bool:
    """Answer "SECONDS|PIDFILE": record the checking process, sleep, say yes."""
    seconds, _, pidfile = answer.partition("|")
    Path(pidfile).write_text(str(os.getpid()))
    time.sleep(float(seconds))
    return True


class ByteTokenizer:
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode()


class InstantEngine:
    """The slice of actors.engine.Engine an actor uses; every request finishes in one step."""

    weight_loader = "packed"

    def __init__(self, model_path: str, **_: object) -> None:
        self.tokenizer = ByteTokenizer()
        self.version = 0
        self.packing_failures = self.cached_prompt_tokens = 0
        self.pending: dict[str, int] = {}

    def add(self, key: str, prompt_ids: list[int], n: int) -> None:
        self.pending[key] = n

    def busy(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[tuple[str, list[Sample]]]:
        done, self.pending = self.pending, {}
        tokens = list(b"done")
        return [(k, [Sample(tokens, [-0.5] * 4, [self.version] * 4) for _ in range(n)])
                for k, n in done.items()]

    def prepare_weights(self, tensors: list) -> Update:
        return Update(tensors, None)

    def apply_weights(self, update: Update, version: int) -> None:
        self.version = version

    def holds_memory_of(self, buf: bytearray) -> bool:
        return False


def test_heartbeats_and_weight_acks_continue_while_verifiers_are_slow_or_stuck(
        tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="dynamo.actor")
    monkeypatch.setitem(verifiers.CHECKERS, "sleepy", sleepy)
    monkeypatch.setattr(worker, "Engine", InstantEngine)
    ports = free_ports(3)
    ctx = zmq.Context()
    alloc = open_socket(ctx, zmq.ROUTER, f"tcp://127.0.0.1:{ports[0]}", bind=True)
    pull = open_socket(ctx, zmq.PULL, f"tcp://127.0.0.1:{ports[1]}", bind=True)
    wsock = open_socket(ctx, zmq.ROUTER, f"tcp://127.0.0.1:{ports[2]}", bind=True,
                        options=SocketOptions(sndhwm=256))
    publisher = WeightPublisher(wsock)
    endpoints = worker.Endpoints(*(f"tcp://127.0.0.1:{p}" for p in ports))
    metrics = tmp_path / "metrics.jsonl"
    task = TaskConfig(verifier_timeout_s=TIMEOUT_S, prompt_template="Q: {problem}\nA:",
                      system_prompt="Be brief.")
    actor = worker.Actor(ActorConfig(heartbeat_s=0.1, prefetch_grants=2, verifier_workers=2),
                         "no-model", endpoints, metrics_path=metrics, task=task)
    runner = threading.Thread(target=actor.run)
    runner.start()
    # Two groups: 4 answers taking 1 s each (2 workers: ~2 s), 2 answers that never finish.
    grants = [WorkGrant(grant_id=0, lease_id=0, problem_id="slow", prompt="p0",
                        answer=f"1.0|{tmp_path / 'slow'}", verifier="sleepy", n=4, lease_s=60,
                        issued_version=0),
              WorkGrant(grant_id=1, lease_id=0, problem_id="stuck", prompt="p1",
                        answer=f"600|{tmp_path / 'stuck'}", verifier="sleepy", n=2, lease_s=60,
                        issued_version=0)]
    beats: list[float] = []
    stats: list[StatsReport] = []
    groups: dict[str, tuple[float, RolloutGroup]] = {}
    granted_at = published_at = None
    try:
        deadline = time.monotonic() + 60
        while len(groups) < 2 and time.monotonic() < deadline:
            if alloc.poll(10):
                ident, msg = recv_routed(alloc)
                if isinstance(msg, Heartbeat):
                    beats.append(time.monotonic())
                elif isinstance(msg, WorkRequest):
                    if granted_at is None:
                        for g in grants:
                            send_routed(alloc, ident, g)
                        granted_at = time.monotonic()
                    else:
                        send_routed(alloc, ident, NoWork(retry_after_s=60, reason="test"))
                elif isinstance(msg, StatsReport):
                    stats.append(msg)
            if pull.poll(0):
                g = recv(pull)
                groups[g.problem_id] = (time.monotonic(), g)
            if granted_at is not None and published_at is None \
                    and time.monotonic() > granted_at + 0.5:
                publisher.publish(1, [("w", torch.arange(1000, dtype=torch.float32))])
                published_at = time.monotonic()
        scored_at = max(t for t, _ in groups.values())
        # The acks of version 1 arrived while the stuck answers were still being checked.
        assert 1 in publisher.delivered and publisher.delivered[1] < scored_at
    finally:
        actor.stop.set()
        runner.join(30)
        publisher.close()
        for s in (alloc, pull, wsock):
            s.close(linger=0)
        ctx.term()
    assert not runner.is_alive() and actor.failure is None

    # Scoring took seconds; the allocator heard a heartbeat every ~0.1 s all along (the I/O
    # thread scoring itself would have gone silent for the whole of it).
    assert scored_at - granted_at > 2 * TIMEOUT_S
    during = [t for t in beats if granted_at <= t <= scored_at]
    gaps = [b - a for a, b in zip([granted_at, *during], [*during, scored_at], strict=True)]
    assert max(gaps) < 1.0, gaps
    assert len(during) >= (scored_at - granted_at) / 0.1 / 3

    slow, stuck = groups["slow"][1], groups["stuck"][1]
    assert (slow.n, stuck.n) == (4, 2)  # whole groups
    assert slow.rewards.tolist() == [1.0] * 4 and stuck.rewards.tolist() == [0.0, 0.0]
    assert {(s.problem_id, s.k, s.n) for s in stats} == {("slow", 4, 4), ("stuck", 0, 2)}
    stuck_pid = int((tmp_path / "stuck").read_text())
    assert stuck_pid != os.getpid()
    try:
        os.kill(stuck_pid, 0)
        raise AssertionError(f"the stuck verifier process {stuck_pid} is still alive")
    except ProcessLookupError:
        pass
    # The prompt sent is the task's format, as the evaluations build it; logged once.
    sent = "Be brief.\n\nQ: p0\nA:"
    assert render_prompt(ByteTokenizer(), "p0", resolved_prompt_format(task)) == sent
    assert bytes(slow.prompt_token_ids.tolist()).decode() == sent
    logged = [r.getMessage() for r in caplog.records if "first prompt as sent" in r.getMessage()]
    assert len(logged) == 1 and repr(sent) in logged[0]
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["verifier_timeouts"] == 2 and last["groups_sent"] == 2


def test_a_pushed_grant_lets_the_actor_ask_again_at_once(tmp_path: Path, monkeypatch) -> None:
    """A NoWork parks the actor's request and tells it to ask again only after a while; a grant
    the allocator then pushes may serve that parked request in full. The actor must ask again
    at once, so the allocator always holds a request to push the next batch's work to (it
    once waited out the NoWork's retry with nothing parked, idle while work was free)."""
    monkeypatch.setattr(worker, "Engine", InstantEngine)
    ports = free_ports(3)
    ctx = zmq.Context()
    alloc = open_socket(ctx, zmq.ROUTER, f"tcp://127.0.0.1:{ports[0]}", bind=True)
    pull = open_socket(ctx, zmq.PULL, f"tcp://127.0.0.1:{ports[1]}", bind=True)
    wsock = open_socket(ctx, zmq.ROUTER, f"tcp://127.0.0.1:{ports[2]}", bind=True)
    endpoints = worker.Endpoints(*(f"tcp://127.0.0.1:{p}" for p in ports))
    actor = worker.Actor(ActorConfig(heartbeat_s=0.1, prefetch_grants=4), "no-model", endpoints,
                         metrics_path=tmp_path / "metrics.jsonl", task=TaskConfig())
    runner = threading.Thread(target=actor.run)
    runner.start()
    requests: list[float] = []
    pushed_at = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (pushed_at is None or len(requests) < 2):
            if not alloc.poll(10):
                continue
            ident, msg = recv_routed(alloc)
            if not isinstance(msg, WorkRequest):
                continue
            requests.append(time.monotonic())
            if len(requests) == 1:  # parked: "ask again in 60 s" ...
                send_routed(alloc, ident, NoWork(retry_after_s=60, reason="test"))
                time.sleep(0.3)
                # ... then the window opens and the parked request is served in full
                for i in range(msg.want):
                    send_routed(alloc, ident, WorkGrant(
                        grant_id=i, lease_id=1, problem_id=f"p{i}", prompt="1+1=", answer="2",
                        verifier="exact", n=2, lease_s=60, issued_version=0))
                pushed_at = time.monotonic()
    finally:
        actor.stop.set()
        runner.join(30)
        for s in (alloc, pull, wsock):
            s.close(linger=0)
        ctx.term()
    assert not runner.is_alive() and actor.failure is None
    assert pushed_at is not None and len(requests) >= 2, requests
    assert requests[1] - pushed_at < 5.0  # not the 60 s the NoWork said


def test_a_hello_dropped_before_the_publisher_is_up_is_sent_again_at_once(tmp_path: Path,
                                                                         monkeypatch) -> None:
    """The weights socket queues nothing for a publisher it is not connected to yet, so a
    hello sent before the connection is dropped. The actor sends it again at every pass until
    the socket takes it, not at the next heartbeat (60 s here): a version published after the
    publisher comes up reaches the actor within seconds."""
    monkeypatch.setattr(worker, "Engine", InstantEngine)
    ports = free_ports(3)
    ctx = zmq.Context()
    alloc = open_socket(ctx, zmq.ROUTER, f"tcp://127.0.0.1:{ports[0]}", bind=True)
    pull = open_socket(ctx, zmq.PULL, f"tcp://127.0.0.1:{ports[1]}", bind=True)
    endpoints = worker.Endpoints(*(f"tcp://127.0.0.1:{p}" for p in ports))
    actor = worker.Actor(ActorConfig(heartbeat_s=60), "no-model", endpoints,
                         metrics_path=tmp_path / "metrics.jsonl", task=TaskConfig())
    runner = threading.Thread(target=actor.run)
    runner.start()
    wsock = publisher = None
    try:
        wait_for(lambda: alloc.poll(10) and recv_routed(alloc), 30, "the actor's first message")
        time.sleep(0.5)  # its first heartbeat (and hello) went out with no publisher there
        wsock = open_socket(ctx, zmq.ROUTER, f"tcp://127.0.0.1:{ports[2]}", bind=True)
        publisher = WeightPublisher(wsock)
        time.sleep(0.5)
        publisher.publish(1, [("w", torch.arange(1000, dtype=torch.float32))])
        wait_for(lambda: 1 in publisher.delivered, 10, "version 1 delivered")
    finally:
        actor.stop.set()
        runner.join(30)
        if publisher is not None:
            publisher.close()
        for s in (alloc, pull, wsock):
            if s is not None:
                s.close(linger=0)
        ctx.term()
    assert not runner.is_alive() and actor.failure is None
