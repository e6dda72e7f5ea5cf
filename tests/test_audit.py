"""`dynamo-rl audit` and the records it joins: id sets, the learner's grant record, the
allocator's ledger. Each injected fault (a group trained twice, a group never issued, a
completed group lost) must fail the audit; a clean run must pass it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocator.config import AllocatorConfig
from allocator.ledger import Ledger
from allocator.service import write_snapshot
from launch.audit import audit
from launch.cli import main as cli
from learner.grant_record import ARCHIVE_DIR, RECORD_FILE, GrantRecord
from protocol.idset import IdSet
from protocol.messages import StatsReport
from tasks.problems import Problem

PROBLEMS = [Problem(id=f"p{i}", prompt=f"{i}+{i}=", answer=str(2 * i)) for i in range(20)]
CFG = AllocatorConfig(batch_prompts=4, n_mean=8, n_min=4, n_max=16, initial_budget=4)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 60)), max_size=200))
def test_idset_behaves_like_a_set_and_stores_maximal_ranges(ops) -> None:
    ids, ref = IdSet(), set()
    for add, i in ops:
        assert (ids.add(i) if add else ids.discard(i)) == ((i not in ref) if add else (i in ref))
        (ref.add if add else ref.discard)(i)
    assert list(ids) == sorted(ref) and len(ids) == len(ref)
    runs = sum(1 for i in ref if i - 1 not in ref)
    assert ids.num_ranges == runs  # adjacent ids always merged
    assert IdSet.from_ranges(ids.ranges()) == ids


@pytest.mark.parametrize("bad", [[[0, 5], [3, 8]], [[0, 5], [5, 8]], [[4, 4]], [[6, 9], [0, 2]]])
def test_idset_refuses_overlapping_touching_empty_or_unsorted_ranges(bad) -> None:
    with pytest.raises(ValueError):
        IdSet.from_ranges(bad)


def test_grant_record_counts_every_repeat_and_round_trips() -> None:
    rec = GrantRecord()
    rec.add_trained([0, 1, 2, 3])
    rec.add_dropped("stale", 5)
    rec.add_trained([4, 2])
    rec.add_dropped("stale", 1)
    assert list(rec.trained) == [0, 1, 2, 3, 4] and list(rec.dropped["stale"]) == [5]
    assert (rec.repeat_count, rec.repeats) == (2, [2, 1])
    again = GrantRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert again.to_dict() == rec.to_dict()


def finished_run(run_dir: Path, *, trained: int = 12, stale: int = 1, pending: int = 1
                 ) -> tuple[Ledger, GrantRecord, list[int]]:
    """A ledger that issued 16 grants, all reported and received, and a learner record that
    trained the first `trained`, dropped `stale` as stale, holds `pending` in its queue."""
    led = Ledger(PROBLEMS, CFG, rule="variance", verifier="integer", prompts_per_step=4,
                 max_staleness=100)
    gs = led.request("a", 16, 0.0)
    for g in gs:
        led.report(StatsReport(grant_id=g.grant_id, lease_id=g.lease_id,
                               problem_id=g.problem_id, actor_id="a", k=1, n=g.n))
    led.receipts([g.grant_id for g in gs[:trained + stale + pending]])
    ids = [g.grant_id for g in gs]
    rec = GrantRecord()
    rec.add_trained(ids[:trained])
    for gid in ids[trained:trained + stale]:
        rec.add_dropped("stale", gid)
    save(run_dir, led, rec, ids[trained + stale:trained + stale + pending])
    return led, rec, ids


def save(run_dir: Path, led: Ledger, rec: GrantRecord, pending: list[int]) -> None:
    run_dir.mkdir(exist_ok=True)
    write_snapshot(led, run_dir)
    rec.write(run_dir, pending=pending,
              counters={"dropped_stale": len(rec.dropped.get("stale", IdSet()))})


def test_a_clean_run_passes_the_audit(tmp_path) -> None:
    finished_run(tmp_path)
    out = audit(tmp_path)
    assert out["violations"] == []
    t = out["totals"]
    assert (t["completed"], t["trained"], t["dropped"], t["pending_at_learner"]) == \
        (14, 12, {"stale": 1}, 1)
    assert cli(["audit", str(tmp_path)]) == 0


def test_a_group_trained_twice_fails_the_audit(tmp_path) -> None:
    led, rec, ids = finished_run(tmp_path)
    rec.add_trained([ids[3]])
    save(tmp_path, led, rec, [ids[13]])
    assert [v.split(":")[0] for v in audit(tmp_path)["violations"]] == ["trained twice"]
    assert cli(["audit", str(tmp_path)]) == 1


def test_a_duplicate_written_into_the_stored_record_fails_the_audit(tmp_path) -> None:
    finished_run(tmp_path)
    path = tmp_path / RECORD_FILE
    d = json.loads(path.read_text())
    d["trained"].append([3, 5])  # ids 3 and 4 a second time
    path.write_text(json.dumps(d))
    assert audit(tmp_path)["violations"][0].startswith("learner record malformed")
    assert cli(["audit", str(tmp_path)]) == 1


def test_a_group_never_issued_fails_the_audit(tmp_path) -> None:
    led, rec, ids = finished_run(tmp_path)
    rec.add_trained([10**6])  # a forged grant id
    save(tmp_path, led, rec, [ids[13]])
    assert audit(tmp_path)["violations"] == [
        "never issued: 1 grant ids trained or dropped that the allocator never formed "
        "(1000000)"]
    assert cli(["audit", str(tmp_path)]) == 1


def test_a_lost_group_fails_the_audit_unless_a_learner_that_died_held_it(tmp_path) -> None:
    led, rec, ids = finished_run(tmp_path)
    rec.trained.discard(ids[5])  # received, completed, then vanished
    save(tmp_path, led, rec, [ids[13]])
    assert [v.split(":")[0] for v in audit(tmp_path)["violations"]] == ["lost"]
    assert cli(["audit", str(tmp_path)]) == 1
    # a count no longer excuses it: the allocator must name the grant lost, by id
    led.counters["groups_lost_to_learner_restart"] = 1
    save(tmp_path, led, rec, [ids[13]])
    assert [v.split(":")[0] for v in audit(tmp_path)["violations"]] == ["lost"]
    led.lost.add(ids[5])  # recorded lost at a restart ...
    save(tmp_path, led, rec, [ids[13]])
    # ... but no finished learner session held it: an invented loss
    assert [v.split(":")[0] for v in audit(tmp_path)["violations"]] == ["lost unheld"]
    archive = tmp_path / ARCHIVE_DIR
    archive.mkdir()
    dead = GrantRecord()
    dead.add_trained(ids[:5])
    dead.write(archive.parent, pending=[ids[5]], session=7)  # it died holding ids[5] ...
    (tmp_path / RECORD_FILE).replace(archive / "7.json")
    save(tmp_path, led, rec, [ids[13]])  # ... and the next session wrote its own record
    assert audit(tmp_path)["violations"] == []
    assert audit(tmp_path)["totals"]["recorded_lost"] == 1
    (archive / "unreadable-1.json").write_text("{torn")  # kept aside by the learner
    assert [v.split(":")[0] for v in audit(tmp_path)["violations"]] == [
        "learner record malformed", "lost unheld"]


def test_groups_still_in_flight_are_not_lost(tmp_path) -> None:
    """Reported but not yet received (or received and still queued): nothing is missing."""
    finished_run(tmp_path, trained=8, stale=0, pending=4)
    out = audit(tmp_path)
    assert out["violations"] == []
    assert (out["totals"]["completed"], out["totals"]["in_flight_at_allocator"]) == (12, 4)


def test_audit_of_a_directory_without_records_says_so(tmp_path) -> None:
    assert cli(["audit", str(tmp_path)]) == 2


class _IntakeOf:
    """What the progress reporter reads from the learner's intake: a restored record."""

    def __init__(self, record: GrantRecord) -> None:
        self.record, self.counters = record, {"consumed": len(record.consumed())}

    def take_receipts(self) -> list[int]:
        return [40, 41]

    def give_back_receipts(self, ids: list[int]) -> None:
        assert not ids, f"receipts {ids} not sent"

    def pending(self) -> list[int]:
        return [40, 41]

    def take_refusals(self) -> list[int]:
        return [50, 3]  # grant 50, lease 3


def test_a_new_learner_session_archives_the_last_one_and_reports_what_it_resumed_from(
        tmp_path) -> None:
    """The learner side of settling a restart by id: the previous session's last record is
    moved aside (the audit's proof that a lost group was held by a learner that died), and
    every progress report carries the ids the resumed checkpoint holds."""
    import zmq

    from learner.progress import ProgressReporter
    from protocol.sockets import recv

    dead = GrantRecord()
    dead.add_trained(range(0, 30))
    dead.write(tmp_path, pending=[30, 31], session=99)
    resumed = GrantRecord()  # the checkpoint it resumes from: 0-19, 22, one stale drop
    resumed.add_trained([*range(0, 20), 22])
    resumed.add_dropped("stale", 25)
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://progress")
    b.connect("inproc://progress")
    try:
        reporter = ProgressReporter(a, _IntakeOf(resumed), tmp_path, "learner-0")
        archived = json.loads((tmp_path / ARCHIVE_DIR / "99.json").read_text())
        assert archived["pending"] == [[30, 32]] and archived["trained"] == [[0, 30]]
        # and the new session's own record is there at once (a kill before its first
        # report must not leave the audit reading the checkpoint, without pending ids)
        fresh = json.loads((tmp_path / RECORD_FILE).read_text())
        assert fresh["session"] == reporter.session and fresh["pending"] == [[40, 42]]
        reporter.send(version=3, step=1)
        msg = recv(b)
        assert msg.resumed == [0, 20, 22, 23, 25, 26]
        assert msg.received == [40, 41] and msg.session == reporter.session
        assert msg.refused == [50, 3]
        assert json.loads((tmp_path / RECORD_FILE).read_text())["session"] == reporter.session
        # the allocator's settlement from that message: what the dead session received
        # beyond the checkpoint is lost, by id
        led = Ledger(PROBLEMS, CFG, rule="variance", verifier="integer", prompts_per_step=4,
                     max_staleness=100)
        gs = led.request("a", 16, 0.0)
        assert led.progress(version=0, consumed_groups=0, session=99) == "accepted"
        for g in gs:
            led.report(StatsReport(grant_id=g.grant_id, lease_id=g.lease_id,
                                   problem_id=g.problem_id, actor_id="a", k=1, n=g.n))
        led.receipts([g.grant_id for g in gs])
        held = IdSet.from_ranges(zip(msg.resumed[::2], msg.resumed[1::2], strict=True))
        assert led.progress(version=msg.version, consumed_groups=msg.consumed_groups,
                            session=msg.session, resumed=held) == "restart"
        assert list(led.lost) == [g.grant_id for g in gs if g.grant_id not in held]
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()
