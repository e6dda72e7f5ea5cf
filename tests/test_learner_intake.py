"""The learner's intake over real CURVE sockets: only actor keys, only grants the allocator
signed, only values the model can take; every refusal counted by code, never queued, never
acknowledged; accepted groups acknowledged once and tracked until trained."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import zmq
from conftest import wait_for

from learner.intake import Bounds, Intake, check_group
from protocol.auth import RunKeys, generate_run_keys, grant_mac
from protocol.messages import RolloutGroup
from protocol.sockets import SocketOptions, open_socket, send

VOCAB, MAX_LEN = 16, 8
SECRET = b"k" * 32


def group(grant_id: int = 3, secret: bytes | None = SECRET, **over) -> RolloutGroup:
    fields = dict(grant_id=grant_id, lease_id=7, problem_id="p", actor_id="a",
                  prompt_token_ids=np.array([4, 5], np.int32),
                  completion_token_ids=np.array([6, 1, 7], np.int32),
                  completion_lengths=np.array([2, 1], np.int32),
                  behaviour_logprobs=np.array([-0.1, -0.2, -0.3], np.float32),
                  token_versions=np.array([0, 1, 1], np.int32),
                  rewards=np.array([1.0, 0.0], np.float32),
                  finished=np.array([True, True]), gen_seconds=0.1)
    fields.update(over)
    g = RolloutGroup(**fields)
    mac = grant_mac(secret, g.grant_id, g.lease_id, g.problem_id, g.n) if secret else ""
    return RolloutGroup(**{**fields, "grant_mac": mac})


BOUNDS = Bounds(vocab_size=VOCAB, max_model_len=MAX_LEN, grant_secret=SECRET)


@pytest.mark.parametrize(("g", "code"), [
    (group(), None),
    (group(secret=b"x" * 32), "grant_mac"),  # signed with another key: a forged grant
    (group(secret=None), "grant_mac"),
    (group(completion_token_ids=np.array([6, 1, VOCAB], np.int32)), "token_id"),
    (group(prompt_token_ids=np.array([-1, 5], np.int32)), "token_id"),
    (group(prompt_token_ids=np.arange(7, dtype=np.int32)), "length"),  # 7 + 2 > 8
    (group(prompt_token_ids=np.zeros(0, np.int32)), "empty_prompt"),
    (group(token_versions=np.array([0, 1, 2], np.int32)), "version_ahead"),
])
def test_check_group_refuses_what_the_model_cannot_take(g: RolloutGroup, code) -> None:
    assert check_group(g, BOUNDS, learner_version=1) == code


def test_a_mac_covers_lease_problem_and_size() -> None:
    good = group()
    for field, value in (("grant_id", 4), ("lease_id", 8), ("problem_id", "q")):
        bad = RolloutGroup(**{**{n: getattr(good, n) for n, _ in good.SCHEMA}, field: value})
        assert check_group(bad, BOUNDS, 1) == "grant_mac", field


def test_intake_takes_groups_only_from_actor_keys_and_acknowledges_only_those(tmp_path) -> None:
    """Another role's key fails the handshake (counted by the authenticator); an actor's key
    gets in, but a forged grant or an out-of-vocabulary token is refused and counted."""
    key_dir = tmp_path / "keys"
    generate_run_keys(key_dir)
    learner = RunKeys.load(key_dir, "learner")
    actor, alloc = RunKeys.load(key_dir, "actor"), RunKeys.load(key_dir, "allocator")
    intake = Intake("tcp://127.0.0.1:*", capacity=16, keys=learner,
                    bounds=Bounds(VOCAB, MAX_LEN, learner.grant_secret))
    endpoint = intake.sock.getsockopt_string(zmq.LAST_ENDPOINT)
    intake.learner_version = 1
    ctx = zmq.Context()
    try:
        opts = SocketOptions(linger_ms=1000)
        as_actor = open_socket(ctx, zmq.PUSH, endpoint, bind=False, options=opts,
                               keys=actor.connect(actor.learner))
        as_alloc = open_socket(ctx, zmq.PUSH, endpoint, bind=False, options=opts,
                               keys=alloc.connect(alloc.learner))  # known key, wrong role
        s = learner.grant_secret
        with contextlib.suppress(zmq.Again):  # the handshake fails: never connected
            send(as_alloc, group(1, s), zmq.NOBLOCK)
        send(as_actor, group(2, b"forged" * 6))
        send(as_actor, group(3, s, completion_token_ids=np.array([6, 1, 99], np.int32)))
        send(as_actor, group(4, s))
        send(as_actor, group(4, s))  # delivered twice
        send(as_actor, group(6, s, token_versions=np.array([0, 1, 5], np.int32)))
        wait_for(lambda: intake.counters["received"] >= 5, 10, "the groups")
        wait_for(lambda: intake.auth.allow_list.refused >= 1, 10, "the refused handshake")
        time.sleep(0.2)
        assert intake.take_receipts() == [4, 4]  # nothing refused is ever acknowledged
        # the group made with weights ahead of the learner goes back for re-issue, with its
        # lease; a forged grant (untrustworthy ids) or bad tokens (a re-run would repeat
        # them) wait for their lease
        assert intake.take_refusals() == [6, 7] and intake.take_refusals() == []
        assert intake.counters["received"] == 5
        assert {k: v for k, v in intake.counters.items() if k.startswith("refused_")} == {
            "refused_grant_mac": 1, "refused_token_id": 1, "refused_version_ahead": 1}
        assert intake.pending() == [4]
        batch = intake.take(1, version=1, max_staleness=2)
        assert [g.grant_id for g in batch] == [4]
        intake.trained(batch)
        send(as_actor, group(5, s))
        assert [g.grant_id for g in intake.take(1, version=1, max_staleness=2)] == [5]
        assert intake.counters["dropped_duplicate"] == 1  # the second copy of 4
        assert list(intake.record.trained) == [4] and intake.record.repeat_count == 0
    finally:
        intake.close()
        ctx.destroy(linger=0)


def test_each_batch_takes_the_stalest_groups_first(tmp_path) -> None:
    """Queued in the order v2, v2, v0: FIFO would train the v2 groups at version 2 and then
    find the v0 group three versions old; stalest-first trains it in time."""
    intake = Intake("tcp://127.0.0.1:*", capacity=16, bounds=BOUNDS)
    try:
        for gid, v in ((1, 2), (2, 2), (3, 0)):
            intake.queue.put(group(gid, token_versions=np.full(3, v, np.int32)))
        assert sorted(g.grant_id for g in intake.take(2, version=2, max_staleness=2)) == [1, 3]
        assert [g.grant_id for g in intake.take(1, version=3, max_staleness=2)] == [2]
        assert intake.counters["dropped_stale"] == 0 and intake.counters["consumed"] == 3
    finally:
        intake.close()
