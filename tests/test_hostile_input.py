"""Hostile input against live services: every bad message is rejected with a counter, the
service keeps serving, memory stays bounded; and a bounded coverage-guided fuzz of the codec."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from conftest import REPO, Proc, make_config, wait_for

from launch.config import load_config
from protocol.auth import RunKeys, generate_run_keys
from protocol.codec import encode
from protocol.messages import (
    PROTOCOL_VERSION,
    Heartbeat,
    LearnerProgress,
    NoWork,
    RolloutGroup,
    StatsReport,
    WorkGrant,
    WorkRequest,
)
from protocol.sockets import CurveKeys, SocketOptions, generate_keys, open_socket, recv, send


def group(**over) -> RolloutGroup:
    fields = dict(grant_id=1, lease_id=1, problem_id="p", actor_id="a",
                  prompt_token_ids=np.array([4, 5], np.int32),
                  completion_token_ids=np.array([6, 1, 7], np.int32),
                  completion_lengths=np.array([2, 1], np.int32),
                  behaviour_logprobs=np.array([-0.1, -0.2, -0.3], np.float32),
                  token_versions=np.array([0, 0, 0], np.int32),
                  rewards=np.array([1.0, 0.0], np.float32),
                  finished=np.array([True, True]), gen_seconds=0.1)
    fields.update(over)
    return RolloutGroup(**fields)


def hostile_frames() -> list[list[bytes]]:
    """One of each kind of bad message, as raw frames."""
    good = [bytes(f) for f in encode(group())]
    header = msgpack.unpackb(good[0])
    out = [
        [b"\x00" * 17],  # random bytes
        [np.random.default_rng(0).bytes(300)],
        good[:3],  # truncated: frames missing
        [good[0], good[1][:3], *good[2:]],  # an array frame cut short
        [msgpack.packb({**header, "t": "NoSuchType"}), *good[1:]],  # unknown type
        [msgpack.packb({**header, "v": PROTOCOL_VERSION + 7}), *good[1:]],  # wrong version
        [msgpack.packb({**header, "f": {**header["f"], "grant_id": "seven"}}), *good[1:]],
        [msgpack.packb({**header, "a": [[n, d, [2**40]] for n, d, _ in header["a"]]}),
         *good[1:]],  # huge declared lengths
        [b"\xdb\xff\xff\xff\xff"],  # msgpack str32 claiming 4 GiB
    ]
    nan = [bytes(f) for f in encode(group())]
    nan[4] = np.array([-0.1, np.nan, -0.3], np.float32).tobytes()  # NaN log-probs
    out.append(nan)
    ragged = [bytes(f) for f in encode(group())]
    ragged[4] = ragged[4][:8]  # log-probs shorter than the tokens
    out.append(ragged)
    neg = [bytes(f) for f in encode(WorkRequest(actor_id="a", want=1, policy_version=0))]
    h = msgpack.unpackb(neg[0])
    out.append([msgpack.packb({**h, "f": {**h["f"], "want": -5}})])  # negative budget request
    return out


def test_allocator_rejects_hostile_messages_counts_them_and_keeps_serving(tiny_model, tmp_path):
    cfg_path = make_config(tmp_path, tiny_model, allocator={"snapshot_every_s": 0.2})
    cfg = load_config(cfg_path)
    generate_run_keys(tmp_path / "keys")
    alloc = Proc("allocator", cfg_path)
    ctx = zmq.Context()
    try:
        keys = CurveKeys.load(tmp_path / "keys", server="allocator", client="actor")
        sock = open_socket(ctx, zmq.DEALER, cfg.network.allocator, bind=False, keys=keys,
                           options=SocketOptions(rcvtimeo_ms=5000))
        wait_for(lambda: (tmp_path / "allocator_status.json").is_file(), 60, "the allocator")
        rss0 = _rss(alloc.p.pid)
        bad = hostile_frames()
        for _ in range(300):  # ~3600 bad messages
            for frames in bad:
                sock.send_multipart(frames)
        # inconsistent but well-formed: a report for a grant that was never issued
        send(sock, StatsReport(grant_id=10**9, lease_id=3, problem_id="x", actor_id="a",
                               k=1, n=2))
        send(sock, WorkRequest(actor_id="a", want=2, policy_version=0))
        replies = []
        while len(replies) < 2:  # Error replies to the bad ones, then the grants
            msg = recv(sock)
            if isinstance(msg, WorkGrant):
                replies.append(msg)
        assert len(replies) == 2  # still serving
        wait_for(lambda: _status(tmp_path)["counters"].get("report_unknown", 0) >= 1, 30,
                 "the unknown-grant report to be counted")
        counters = _status(tmp_path)["counters"]
        rejected = sum(v for k, v in counters.items() if k.startswith("rejected_"))
        assert rejected == 300 * len(bad), counters
        for code in ("malformed", "unknown_type", "version_mismatch", "field_type",
                     "invalid_value"):
            assert counters.get(f"rejected_{code}", 0) > 0, (code, counters)
        assert _rss(alloc.p.pid) - rss0 < 50 << 20  # bounded: no growth with garbage
        assert alloc.alive()
        sock.close(linger=0)
    finally:
        alloc.stop()
        ctx.destroy(linger=0)


def test_unauthenticated_peers_reach_nothing(tiny_model, tmp_path):
    cfg_path = make_config(tmp_path, tiny_model, allocator={"snapshot_every_s": 0.2})
    cfg = load_config(cfg_path)
    generate_run_keys(tmp_path / "keys")
    generate_keys(tmp_path / "outsider", ["allocator", "actor"])  # a different run's keys
    alloc = Proc("allocator", cfg_path)
    ctx = zmq.Context()
    try:
        wait_for(lambda: (tmp_path / "allocator_status.json").is_file(), 60, "the allocator")
        plain = open_socket(ctx, zmq.DEALER, cfg.network.allocator, bind=False,
                            options=SocketOptions(sndtimeo_ms=200, rcvtimeo_ms=500))
        theirs = CurveKeys.load(tmp_path / "outsider", server="allocator", client="actor")
        ours = CurveKeys.load(tmp_path / "keys", server="allocator")
        outsider = open_socket(ctx, zmq.DEALER, cfg.network.allocator, bind=False,
                               keys=CurveKeys(server_public=ours.server_public,
                                              client_public=theirs.client_public,
                                              client_secret=theirs.client_secret),
                               options=SocketOptions(sndtimeo_ms=200, rcvtimeo_ms=500))
        for s in (plain, outsider):
            try:
                send(s, WorkRequest(actor_id="evil", want=4, policy_version=0))
            except zmq.Again:
                pass
            with pytest.raises(zmq.Again):
                recv(s)
        time.sleep(1.0)
        c = _status(tmp_path)["counters"]
        assert c.get("grants_issued", 0) == 0 and not any(k.startswith("rejected_") for k in c)
        assert c.get("refused_unauthenticated", 0) >= 1
        for s in (plain, outsider):
            s.close(linger=0)
    finally:
        alloc.stop()
        ctx.destroy(linger=0)


def _allocator_with_role_sockets(cfg_path: Path, run_dir: Path):
    """A real allocator with run keys, and a DEALER to it under the actor's and under the
    learner's key: (allocator process, context, actor socket, learner socket)."""
    cfg = load_config(cfg_path)
    generate_run_keys(run_dir / "keys")
    alloc = Proc("allocator", cfg_path)
    ctx = zmq.Context()
    socks = {}
    for role in ("actor", "learner"):
        k = RunKeys.load(run_dir / "keys", role)
        socks[role] = open_socket(ctx, zmq.DEALER, cfg.network.allocator, bind=False,
                                  keys=k.connect(k.allocator),
                                  options=SocketOptions(rcvtimeo_ms=5000))
    wait_for(lambda: (run_dir / "allocator_status.json").is_file(), 60, "the allocator")
    return alloc, ctx, socks["actor"], socks["learner"]


def test_an_actor_key_cannot_move_the_allocators_view_of_the_learner(tiny_model, tmp_path):
    """Progress from an actor's key (consumed 0 would fake a learner restart, version 10^6
    stalled a run), work requests from the learner's key, and progress from the learner's
    key that cannot be true are all refused and counted; the learner's view stays put."""
    cfg_path = make_config(tmp_path, tiny_model, allocator={"snapshot_every_s": 0.2})
    alloc, ctx, actor, learner = _allocator_with_role_sockets(cfg_path, tmp_path)
    try:
        send(learner, LearnerProgress(version=1, consumed_groups=32, consumed_samples=0,
                                      dropped_stale=0, session=1))
        for msg in (LearnerProgress(version=0, consumed_groups=0, consumed_samples=0,
                                    dropped_stale=0, session=666),
                    LearnerProgress(version=10**6, consumed_groups=10**9, consumed_samples=0,
                                    dropped_stale=0, session=1),
                    Heartbeat(sender="x", role="learner", sent_at=0.0, policy_version=10**6,
                              in_flight=[])):
            send(actor, msg)
        send(learner, WorkRequest(actor_id="l", want=4, policy_version=0))
        send(learner, LearnerProgress(version=10**6, consumed_groups=40, consumed_samples=0,
                                      dropped_stale=0, session=1))
        send(learner, LearnerProgress(version=0, consumed_groups=0, consumed_samples=0,
                                      dropped_stale=0, session=1))  # no restart marker
        for resumed in ([5], [9, 3], [0, 4, 2, 6]):  # odd, empty or overlapping ranges
            send(learner, LearnerProgress(version=0, consumed_groups=0, consumed_samples=0,
                                          dropped_stale=0, session=2, resumed=resumed,
                                          received=[0, 1]))
        send(actor, WorkRequest(actor_id="a", want=2, policy_version=0))
        grants = [recv(actor), recv(actor)]  # the actor is still served, grants signed
        assert all(isinstance(g, WorkGrant) and len(g.mac) == 32 for g in grants)
        want = {"refused_role_LearnerProgress": 2, "refused_role_Heartbeat": 1,
                "refused_role_WorkRequest": 1, "progress_refused_impossible_version": 1,
                "progress_refused_consumed_regression": 1,
                "progress_refused_malformed_resumed": 3, "receipts_ignored": 6}
        wait_for(lambda: all(_status(tmp_path)["counters"].get(k) == v
                             for k, v in want.items()), 30, f"the refusals {want}")
        st = _status(tmp_path)
        assert (st["learner_version"], st["consumed_groups"]) == (1, 32)
        assert st["counters"].get("learner_restarts", 0) == 0
        assert "groups_lost_to_learner_restart" not in st["counters"]
    finally:
        alloc.stop()
        ctx.destroy(linger=0)


def test_codec_survives_coverage_guided_fuzzing(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tests/fuzz/fuzz_codec.py"),
                        "--seed-corpus", str(tmp_path / "corpus"), "-max_total_time=8",
                        "-rss_limit_mb=2048", str(tmp_path / "corpus")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done" in r.stderr  # libFuzzer ran to its time limit without a finding


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "allocator_status.json").read_text())


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_learners_heartbeat_does_not_take_a_share_of_the_window(tiny_model, tmp_path):
    """The pacing window is split over the live actors only: the learner's heartbeats (which
    the allocator also receives) once counted as a second actor, so one actor held half the
    window and generated each batch in two waves while the learner waited."""
    cfg_path = make_config(tmp_path, tiny_model, allocator={"batch_prompts": 4,
                                                            "max_staleness": 1},
                           learner={"prompts_per_step": 4})
    alloc, ctx, actor, learner = _allocator_with_role_sockets(cfg_path, tmp_path)
    try:
        send(learner, Heartbeat(sender="learner-0", role="learner", sent_at=time.time(),
                            policy_version=0, in_flight=[]))
        send(learner, LearnerProgress(version=0, consumed_groups=0, consumed_samples=0,
                                      dropped_stale=0, session=1))
        time.sleep(0.2)  # both handled before the request
        send(actor, WorkRequest(actor_id="a", want=100, policy_version=0))
        got = [recv(actor) for _ in range(4)]  # the whole window: one step of 4 groups
        assert all(isinstance(g, WorkGrant) for g in got), got
    finally:
        alloc.stop()
        ctx.destroy(linger=0)


@pytest.mark.slow  # a latency property (22 s); its effect: docs/BENCHMARKS.md, "parked"
def test_a_paced_work_request_is_answered_the_moment_the_learner_takes_a_batch(tiny_model,
                                                                               tmp_path):
    """The pacing window turns a request down with NoWork (ask again in a second); the
    request is parked, and its grants are pushed as soon as the learner's progress opens
    the window, without the actor asking again."""
    cfg_path = make_config(tmp_path, tiny_model, allocator={"batch_prompts": 4,
                                                            "max_staleness": 1},
                           learner={"prompts_per_step": 4})
    alloc, ctx, actor, learner = _allocator_with_role_sockets(cfg_path, tmp_path)
    try:
        send(learner, LearnerProgress(version=0, consumed_groups=0, consumed_samples=0,
                                      dropped_stale=0, session=1))
        send(actor, WorkRequest(actor_id="a", want=100, policy_version=0))
        first = [recv(actor) for _ in range(4)]  # the window: one step of 4 groups
        assert all(isinstance(g, WorkGrant) for g in first)
        send(actor, WorkRequest(actor_id="a", want=100, policy_version=0))
        paced = recv(actor)
        assert isinstance(paced, NoWork) and paced.retry_after_s >= 1.0
        for g in first:  # the actor reports its groups (they go to the learner) ...
            send(actor, StatsReport(grant_id=g.grant_id, lease_id=g.lease_id,
                                    problem_id=g.problem_id, actor_id="a", k=1, n=g.n))
        time.sleep(0.3)
        t = time.monotonic()  # ... and the learner takes them
        send(learner, LearnerProgress(version=0, consumed_groups=4, consumed_samples=0,
                                      dropped_stale=0, session=1))  # it took the batch
        pushed = [recv(actor) for _ in range(4)]  # no new request sent
        waited = time.monotonic() - t
        assert all(isinstance(g, WorkGrant) for g in pushed), pushed
        assert {g.grant_id for g in pushed}.isdisjoint(g.grant_id for g in first)
        assert waited < paced.retry_after_s  # before the actor would have asked again
        wait_for(lambda: _status(tmp_path)["counters"].get("grants_pushed") == 4, 10,
                 "the pushed grants counted")
    finally:
        alloc.stop()
        ctx.destroy(linger=0)
