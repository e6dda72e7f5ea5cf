"""The weight transport on real ZeroMQ sockets (loopback TCP): per-actor credit windows, per-chunk
checksums, newest-version-wins. The actors' side of it is exercised end to end with vLLM in
test_actors_stack.py; here the receivers are plain threads so timing can be controlled."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from protocol.messages import WeightChunk
from protocol.sockets import SocketOptions, open_socket, recv, send
from protocol.weights import WeightPublisher, WeightReceiver


def tensors(seed: int, mib: float = 2.0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = int(mib * (1 << 20) / 4)
    return [("embed.weight", torch.randn(n // 2, generator=g).reshape(-1, 64)),
            ("norm.weight", torch.randn(64, generator=g)),
            ("head.bias", torch.randn(n - n // 2 - 64, generator=g).to(torch.bfloat16))]


class Actor(threading.Thread):
    """A receiver loop like the actor's I/O thread; optional delay per chunk, optional
    corruption of one chunk (once)."""

    def __init__(self, ctx, endpoint: str, name: str, *, want: int, delay_s: float = 0.0,
                 corrupt_index: int | None = None) -> None:
        super().__init__(daemon=True)
        self.sock = open_socket(ctx, zmq.DEALER, endpoint, bind=False,
                                options=SocketOptions(rcvtimeo_ms=100))
        self.receiver = WeightReceiver(name)
        self.want, self.delay_s, self.corrupt_index = want, delay_s, corrupt_index
        self.applied: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self.done_at: dict[int, float] = {}
        self.max_outstanding = 0  # chunks received ahead of our acks, at most
        self.stop = threading.Event()

    def run(self) -> None:
        send(self.sock, self.receiver.hello())
        acked = 0
        while not self.stop.is_set() and self.want not in self.applied:
            try:
                msg = recv(self.sock)
            except zmq.Again:
                continue
            if isinstance(msg, WeightChunk):
                self.max_outstanding = max(self.max_outstanding, msg.index + 1 - acked)
                if msg.index == self.corrupt_index:
                    self.corrupt_index = None
                    bad = bytearray(msg.data)
                    bad[7] ^= 0xFF
                    msg = WeightChunk(version=msg.version, index=msg.index, data=bytes(bad),
                                      crc32c=msg.crc32c)
                time.sleep(self.delay_s)
            acks, done = self.receiver.handle(msg)
            for a in acks:
                acked = a.next_index
                send(self.sock, a)
            if done is not None:
                version, named, buf = done
                self.applied[version] = [(n, t.clone()) for n, t in named]
                self.done_at[version] = time.monotonic()
                self.receiver.pool.give_back(buf)  # as the engine does after applying
        self.sock.close(linger=0)


@pytest.fixture
def publisher():
    ctx = zmq.Context()
    sock = open_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", bind=True,
                       options=SocketOptions(sndhwm=256))
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub = WeightPublisher(sock, window=4)
    yield ctx, endpoint, pub
    for t in threading.enumerate():  # a failed test leaves no receiver holding the context
        if isinstance(t, Actor):
            t.stop.set()
            t.join(timeout=5)
    pub.close()
    sock.close(linger=0)
    ctx.term()


def wait_peers(pub: WeightPublisher, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(pub.peers) < n:
        assert time.monotonic() < deadline, "receivers never said hello"
        time.sleep(0.01)


def same(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> bool:
    return [n for n, _ in a] == [n for n, _ in b] and all(
        x.dtype == y.dtype and torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))


def test_a_slow_actor_gets_every_chunk_within_its_window_and_does_not_stall_a_fast_one(
        publisher):
    ctx, endpoint, pub = publisher
    fast = Actor(ctx, endpoint, "fast", want=1)
    slow = Actor(ctx, endpoint, "slow", want=1, delay_s=0.05)
    for a in (fast, slow):
        a.start()
    wait_peers(pub, 2)
    weights = tensors(0)
    t0 = time.monotonic()
    ann = pub.publish(1, weights, chunk_bytes=64 << 10)
    assert ann.n_chunks >= 20
    for a in (fast, slow):
        a.join(timeout=30)
    assert same(fast.applied[1], weights) and same(slow.applied[1], weights)
    fast_s, slow_s = fast.done_at[1] - t0, slow.done_at[1] - t0
    assert slow_s > ann.n_chunks * 0.05  # the slow actor really was slow...
    assert fast_s < slow_s / 4  # ...and the fast one did not wait for it
    assert slow.max_outstanding <= 4 and fast.max_outstanding <= 4  # the credit window held
    assert pub.counters["send_failed"] == 0
    deadline = time.monotonic() + 5  # the last acks reach the publisher's thread
    while sorted(pub.peers.values()) != [1, 1]:
        assert time.monotonic() < deadline, pub.peers
        time.sleep(0.01)


def test_a_corrupted_chunk_is_caught_by_its_checksum_and_the_version_resent(publisher):
    ctx, endpoint, pub = publisher
    actor = Actor(ctx, endpoint, "a", want=1, corrupt_index=5)
    actor.start()
    wait_peers(pub, 1)
    weights = tensors(1)
    pub.publish(1, weights, chunk_bytes=64 << 10)
    actor.join(timeout=30)
    assert actor.receiver.counters["checksum_mismatch"] == 1
    assert same(actor.applied[1], weights)  # the retransmission was intact


def test_a_newer_version_replaces_one_in_flight(publisher):
    ctx, endpoint, pub = publisher
    actor = Actor(ctx, endpoint, "a", want=2, delay_s=0.02)
    actor.start()
    wait_peers(pub, 1)
    pub.publish(1, tensors(1), chunk_bytes=64 << 10)
    time.sleep(0.2)  # v1 partly sent
    newest = tensors(2)
    pub.publish(2, newest, chunk_bytes=64 << 10)
    actor.join(timeout=30)
    assert 1 not in actor.applied  # never completed: only the newest version is sent
    assert same(actor.applied[2], newest)


def test_buffers_are_recycled_on_both_sides_without_mixing_versions(publisher):
    ctx, endpoint, pub = publisher
    actor = Actor(ctx, endpoint, "a", want=4)
    actor.start()
    wait_peers(pub, 1)
    versions = {v: tensors(10 + v) for v in range(1, 5)}
    for v, named in versions.items():
        pub.publish(v, named, chunk_bytes=64 << 10)
        deadline = time.monotonic() + 20
        while v not in actor.applied:  # one at a time: each version completes
            assert time.monotonic() < deadline, f"v{v} never arrived"
            time.sleep(0.005)
    actor.join(timeout=10)
    for v, named in versions.items():
        assert same(actor.applied[v], named), f"v{v} arrived altered"
    assert pub.counters["buffers_reused"] >= 1  # v3 packed into v1's blob, v4 into v2's
    assert actor.receiver.pool.reused >= 3
