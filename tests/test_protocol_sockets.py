"""Socket helper tests over real loopback TCP: each pattern, CURVE admission, rejections."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from protocol import (
    MalformedFrame,
    ProtocolError,
    RolloutGroup,
    WeightAck,
    WorkGrant,
    WorkRequest,
    decode,
)
from protocol.sockets import (
    CurveKeys,
    RejectCounts,
    SocketOptions,
    generate_keys,
    open_socket,
    public_keys,
    recv,
    recv_async,
    recv_routed,
    recv_routed_async,
    send,
    send_async,
    send_routed,
    send_routed_async,
    start_authenticator,
)

ANY_PORT = "tcp://127.0.0.1:*"
FAST = SocketOptions(linger_ms=0, rcvtimeo_ms=2000, sndtimeo_ms=2000)


def group() -> RolloutGroup:
    lengths = np.array([300, 200], np.int32)
    return RolloutGroup(
        grant_id=4, lease_id=1, problem_id="p", actor_id="actor-0",
        prompt_token_ids=np.arange(20, dtype=np.int32),
        completion_token_ids=np.arange(500, dtype=np.int32),
        completion_lengths=lengths, behaviour_logprobs=np.full(500, -0.5, np.float32),
        token_versions=np.zeros(500, np.int32), rewards=np.array([1.0, 0.0], np.float32),
        finished=np.array([True, False]), gen_seconds=0.1)


GRANT = WorkGrant(grant_id=4, lease_id=1, problem_id="p", prompt="2+2?", answer="4",
                  verifier="math", n=2, lease_s=10.0, issued_version=0)


def endpoint(sock: zmq.Socket[Any]) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def received_within(sock: zmq.Socket[Any], timeout_ms: int) -> bool:
    return bool(sock.poll(timeout_ms, zmq.POLLIN))


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


def test_router_dealer_request_and_reply(ctx: zmq.Context[Any]) -> None:
    router = open_socket(ctx, zmq.ROUTER, ANY_PORT, bind=True, options=FAST)
    dealer = open_socket(ctx, zmq.DEALER, endpoint(router), bind=False, options=FAST,
                         identity=b"actor-0")
    send(dealer, WorkRequest(actor_id="actor-0", want=2, policy_version=0))
    identity, req = recv_routed(router)
    assert identity == b"actor-0"
    assert req == WorkRequest(actor_id="actor-0", want=2, policy_version=0)
    send_routed(router, identity, GRANT)
    assert recv(dealer) == GRANT


def test_router_refuses_to_send_to_unknown_peer(ctx: zmq.Context[Any]) -> None:
    router = open_socket(ctx, zmq.ROUTER, ANY_PORT, bind=True, options=FAST)
    with pytest.raises(zmq.ZMQError) as info:
        send_routed(router, b"nobody", GRANT)
    assert info.value.errno == zmq.EHOSTUNREACH


def test_push_pull_carries_a_rollout_group(ctx: zmq.Context[Any]) -> None:
    pull = open_socket(ctx, zmq.PULL, ANY_PORT, bind=True, options=FAST)
    push = open_socket(ctx, zmq.PUSH, endpoint(pull), bind=False, options=FAST)
    g = group()
    send(push, g)
    out = recv(pull)
    assert out == g
    assert isinstance(out, RolloutGroup) and out.samples()[1].token_ids[0] == 300


def test_pub_sub_reaches_subscriber(ctx: zmq.Context[Any]) -> None:
    pub = open_socket(ctx, zmq.PUB, ANY_PORT, bind=True, options=FAST)
    sub = open_socket(ctx, zmq.SUB, endpoint(pub), bind=False, options=FAST)
    ack = WeightAck(actor_id="learner", version=1, next_index=0)
    # PUB drops messages until the subscription has propagated: publish until one lands.
    for _ in range(100):
        send(pub, ack)
        if received_within(sub, 20):
            break
    assert recv(sub) == ack


def test_options_are_applied_before_connecting(ctx: zmq.Context[Any]) -> None:
    opts = SocketOptions(sndhwm=7, rcvhwm=9, max_message_bytes=4096, linger_ms=3,
                         heartbeat_ivl_ms=250, heartbeat_timeout_ms=900)
    router = open_socket(ctx, zmq.ROUTER, ANY_PORT, bind=True, options=opts)
    dealer = open_socket(ctx, zmq.DEALER, endpoint(router), bind=False, options=opts)
    inproc = open_socket(ctx, zmq.PULL, "inproc://no-heartbeat", bind=True, options=opts)
    for sock in (router, dealer):
        assert (sock.sndhwm, sock.rcvhwm, sock.linger) == (7, 9, 3)
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 4096
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 250
        assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 900
    assert dealer.getsockopt(zmq.IMMEDIATE) == 1 and router.getsockopt(zmq.IMMEDIATE) == 0
    assert inproc.getsockopt(zmq.HEARTBEAT_IVL) == 0  # heartbeats only where TCP is used


def test_recv_timeout_raises_again(ctx: zmq.Context[Any]) -> None:
    pull = open_socket(ctx, zmq.PULL, ANY_PORT, bind=True,
                       options=SocketOptions(linger_ms=0, rcvtimeo_ms=50))
    with pytest.raises(zmq.Again):
        recv(pull)


def test_rejections_are_counted_and_name_the_peer(ctx: zmq.Context[Any]) -> None:
    router = open_socket(ctx, zmq.ROUTER, ANY_PORT, bind=True, options=FAST)
    dealer = open_socket(ctx, zmq.DEALER, endpoint(router), bind=False, options=FAST,
                         identity=b"rogue")
    rejects = RejectCounts()
    dealer.send_multipart([b"\xc1garbage"])
    dealer.send_multipart([b"\x80", b"extra"])
    for _ in range(2):
        with pytest.raises(ProtocolError) as info:
            recv_routed(router, rejects=rejects)
        assert info.value.peer == b"rogue"
    assert rejects.by_code == {"malformed": 2} and rejects.total == 2
    # the socket still works after rejections
    send(dealer, WorkRequest(actor_id="a", want=1, policy_version=0))
    assert recv_routed(router)[0] == b"rogue"


def test_frames_over_max_size_are_dropped_by_libzmq(ctx: zmq.Context[Any]) -> None:
    small = SocketOptions(linger_ms=0, rcvtimeo_ms=300, max_message_bytes=1024)
    pull = open_socket(ctx, zmq.PULL, ANY_PORT, bind=True, options=small)
    push = open_socket(ctx, zmq.PUSH, endpoint(pull), bind=False, options=FAST)
    send(push, group())  # frames of 2000 bytes: libzmq disconnects the sender
    assert not received_within(pull, 300)


# ---------------------------------------------------------------- CURVE


def test_generated_key_files_are_owner_only(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    generate_keys(key_dir, ["server", "actor"])
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    files = sorted(p.name for p in key_dir.iterdir())
    assert files == ["actor.key", "actor.key_secret", "server.key", "server.key_secret"]
    assert all(stat.S_IMODE((key_dir / f).stat().st_mode) == 0o600 for f in files)
    keys = CurveKeys.load(key_dir, client="actor")
    assert keys.server_secret is not None and keys.client_secret is not None
    assert public_keys(key_dir) == {keys.client_public}
    with pytest.raises(FileExistsError):
        generate_keys(key_dir, ["actor"])


def test_curve_admits_only_the_runs_clients(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    generate_keys(tmp_path, ["server", "actor", "intruder"])
    server_keys = CurveKeys.load(tmp_path)
    auth = start_authenticator(ctx, public_keys(tmp_path, exclude=("server", "intruder")))
    try:
        pull = open_socket(ctx, zmq.PULL, ANY_PORT, bind=True, options=FAST, keys=server_keys)
        good = open_socket(ctx, zmq.PUSH, endpoint(pull), bind=False, options=FAST,
                           keys=CurveKeys.load(tmp_path, client="actor"))
        bad_keys = CurveKeys.load(tmp_path, client="intruder")
        bad = open_socket(ctx, zmq.PUSH, endpoint(pull), bind=False,
                          options=SocketOptions(linger_ms=0, sndtimeo_ms=300), keys=bad_keys)

        try:  # IMMEDIATE: with the handshake refused there is no pipe, so send times out
            send(bad, WorkRequest(actor_id="intruder", want=1, policy_version=0))
        except zmq.Again:
            pass
        assert not received_within(pull, 300)

        send(good, WorkRequest(actor_id="actor", want=1, policy_version=0))
        assert received_within(pull, 2000)
        assert recv(pull) == WorkRequest(actor_id="actor", want=1, policy_version=0)
        assert not received_within(pull, 100)  # and the intruder's never arrived
        assert auth.allow_list.refused >= 1  # the refusal is counted
    finally:
        auth.stop()


def test_curve_client_needs_the_right_server_key(tmp_path: Path, ctx: zmq.Context[Any]
                                                 ) -> None:
    generate_keys(tmp_path, ["server", "other", "actor"])
    auth = start_authenticator(ctx, public_keys(tmp_path, exclude=("server", "other")))
    try:
        pull = open_socket(ctx, zmq.PULL, ANY_PORT, bind=True, options=FAST,
                           keys=CurveKeys.load(tmp_path))
        wrong_server = CurveKeys.load(tmp_path, server="other", client="actor")
        push = open_socket(ctx, zmq.PUSH, endpoint(pull), bind=False,
                           options=SocketOptions(linger_ms=0, sndtimeo_ms=300),
                           keys=wrong_server)
        try:
            send(push, WorkRequest(actor_id="actor", want=1, policy_version=0))
        except zmq.Again:
            pass
        assert not received_within(pull, 300)
    finally:
        auth.stop()


def test_curve_server_needs_its_secret(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    generate_keys(tmp_path, ["server", "actor"])
    (tmp_path / "server.key_secret").unlink()
    with pytest.raises(ValueError, match="server secret"):
        open_socket(ctx, zmq.PULL, ANY_PORT, bind=True, keys=CurveKeys.load(tmp_path))


# ---------------------------------------------------------------- asyncio


def test_asyncio_router_dealer_with_curve(tmp_path: Path) -> None:
    generate_keys(tmp_path, ["server", "actor"])

    async def main() -> tuple[bytes, Any, Any]:
        actx = zmq.asyncio.Context()
        auth = start_authenticator(actx, public_keys(tmp_path))
        try:
            router = open_socket(actx, zmq.ROUTER, ANY_PORT, bind=True, options=FAST,
                                 keys=CurveKeys.load(tmp_path))
            dealer = open_socket(actx, zmq.DEALER, endpoint(router), bind=False, options=FAST,
                                 identity=b"a0", keys=CurveKeys.load(tmp_path, client="actor"))
            await send_async(dealer, WorkRequest(actor_id="a0", want=3, policy_version=1))
            identity, req = await asyncio.wait_for(recv_routed_async(router), 5)
            await send_routed_async(router, identity, GRANT)
            reply = await asyncio.wait_for(recv_async(dealer), 5)
            return identity, req, reply
        finally:
            auth.stop()
            actx.destroy(linger=0)

    identity, req, reply = asyncio.run(main())
    assert identity == b"a0"
    assert req == WorkRequest(actor_id="a0", want=3, policy_version=1)
    assert reply == GRANT


def test_decode_accepts_received_zmq_frames(ctx: zmq.Context[Any]) -> None:
    pull = open_socket(ctx, zmq.PULL, ANY_PORT, bind=True, options=FAST)
    push = open_socket(ctx, zmq.PUSH, endpoint(pull), bind=False, options=FAST)
    send(push, group())
    frames = pull.recv_multipart(copy=False)
    assert all(isinstance(f, zmq.Frame) for f in frames)
    out = decode(frames)
    assert isinstance(out, RolloutGroup)
    assert np.shares_memory(out.completion_token_ids, np.frombuffer(frames[2].buffer, np.uint8))
    with pytest.raises(MalformedFrame):
        decode(frames[:-1])
