"""The `broadcast` weights backend on real sockets and real gloo process groups: actor-side
receivers are processes (launch/weights_probe.py: the actor's weights socket, ZeroMQ
receiver and broadcast member, without an engine), each recording what it received and how.
The vLLM actor path is exercised in test_actors_stack.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
from conftest import REPO

from launch.ports import free_ports
from launch.weights_probe import tensors_crc
from protocol.sockets import SocketOptions, open_socket
from protocol.weights import BroadcastSettings, WeightPublisher


@pytest.fixture
def learner(tmp_path):
    ctx = zmq.Context()
    sock = open_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", bind=True,
                       options=SocketOptions(sndhwm=256))
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub = WeightPublisher(sock, broadcast=BroadcastSettings(
        host="127.0.0.1", port=free_ports(1)[0], timeout_s=5.0, chunk_bytes=256 << 10,
        retry_s=60.0))
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *extra: str) -> None:
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "launch.weights_probe", endpoint, name,
             str(tmp_path / f"{name}.jsonl"), *extra], cwd=REPO)

    yield pub, start, procs, tmp_path
    for p in procs.values():
        p.kill()
        p.wait()
    pub.close()
    sock.close(linger=0)
    ctx.term()


def records(tmp_path: Path, name: str) -> list[dict]:
    f = tmp_path / f"{name}.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def wait_offers(pub: WeightPublisher, n: int) -> None:
    deadline = time.monotonic() + 30
    while sum(p.offered for p in list(pub._peers.values())) < n:
        assert time.monotonic() < deadline, "actors never offered to join"
        time.sleep(0.05)


def wait_version(tmp_path: Path, names: list[str], version: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = {n: next((r for r in records(tmp_path, n) if r["version"] == version), None)
               for n in names}
        if all(got.values()):
            return got
        assert time.monotonic() < deadline, f"v{version} never reached {got}"
        time.sleep(0.02)


def weights(seed: int, mib: float) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = int(mib * (1 << 20) / 4)
    return [("a.weight", torch.randn(n - 64, generator=g)),
            ("b.bias", torch.randn(64, generator=g).to(torch.bfloat16))]


def test_every_actor_gets_each_version_by_one_broadcast_bit_identical(learner):
    pub, start, _, tmp = learner
    names = ["a0", "a1", "a2"]
    for n in names:
        start(n)
    wait_offers(pub, 3)
    for v in (1, 2):
        w = weights(v, 4.0)
        pub.publish(v, w, chunk_bytes=1 << 20)
        got = wait_version(tmp, names, v)
        assert {r["via"] for r in got.values()} == {"broadcast"}
        assert {r["crc"] for r in got.values()} == {tensors_crc(w)}
    # one copy left the learner per version, whatever the number of actors
    assert pub.counters["broadcasts"] == 2 and pub.counters["groups_formed"] == 1
    assert pub.counters["chunks_sent"] == 0  # nothing went over the per-actor ZeroMQ path


def test_an_actor_killed_mid_broadcast_hangs_nothing_and_the_group_reforms_without_it(learner):
    pub, start, procs, tmp = learner
    names = ["a0", "a1", "a2"]
    for n in names:
        start(n)
    wait_offers(pub, 3)
    pub.publish(1, weights(1, 1.0), chunk_bytes=1 << 20)
    wait_version(tmp, names, 1)
    # A large version, and the middle of the chain SIGSTOPped then killed while it flows.
    w2 = weights(2, 400.0)
    pub.publish(2, w2, chunk_bytes=8 << 20)
    time.sleep(0.3)
    procs["a1"].send_signal(signal.SIGKILL)
    t = time.monotonic()
    got = wait_version(tmp, ["a0", "a2"], 2, timeout=60)
    assert time.monotonic() - t < 40  # no hang: the learner gave up within its timeout
    assert {r["crc"] for r in got.values()} == {tensors_crc(w2)}  # nothing corrupted
    assert pub.counters["broadcast_failures"] >= 1
    # The survivors keep working: the next version forms a new epoch without the dead actor
    # (it never answers the join, so it is left out) and reaches both by broadcast.
    w3 = weights(3, 2.0)
    pub.publish(3, w3, chunk_bytes=1 << 20)
    got = wait_version(tmp, ["a0", "a2"], 3, timeout=60)
    assert {r["crc"] for r in got.values()} == {tensors_crc(w3)}
    pub.publish(4, weights(4, 2.0), chunk_bytes=1 << 20)
    got = wait_version(tmp, ["a0", "a2"], 4, timeout=60)
    assert {r["via"] for r in got.values()} == {"broadcast"}


def test_an_actor_joining_later_catches_up_over_zeromq_then_enters_the_next_epoch(learner):
    pub, start, _, tmp = learner
    start("a0")
    wait_offers(pub, 1)
    pub.publish(1, weights(1, 1.0), chunk_bytes=1 << 20)
    wait_version(tmp, ["a0"], 1)
    start("late")
    wait_offers(pub, 2)
    got = wait_version(tmp, ["late"], 1)
    assert got["late"]["via"] == "zmq"  # catch-up: the version it missed
    pub.publish(2, weights(2, 1.0), chunk_bytes=1 << 20)
    got = wait_version(tmp, ["a0", "late"], 2)
    assert {r["via"] for r in got.values()} == {"broadcast"}
    assert pub.counters["groups_formed"] == 2  # epoch 1 (a0), epoch 2 (a0 + late)
