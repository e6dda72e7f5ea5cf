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
from learner.grant_record import RECORD_FILE, GrantRecord
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


def test_a_lost_group_fails_the_audit_unless_a_learner_restart_counted_it(tmp_path) -> None:
    led, rec, ids = finished_run(tmp_path)
    rec.trained.discard(ids[5])  # received, completed, then vanished
    save(tmp_path, led, rec, [ids[13]])
    assert [v.split(":")[0] for v in audit(tmp_path)["violations"]] == ["lost"]
    assert cli(["audit", str(tmp_path)]) == 1
    led.counters["groups_lost_to_learner_restart"] = 1  # lost with the learner's memory
    save(tmp_path, led, rec, [ids[13]])
    assert audit(tmp_path)["violations"] == []


def test_groups_still_in_flight_are_not_lost(tmp_path) -> None:
    """Reported but not yet received (or received and still queued): nothing is missing."""
    finished_run(tmp_path, trained=8, stale=0, pending=4)
    out = audit(tmp_path)
    assert out["violations"] == []
    assert (out["totals"]["completed"], out["totals"]["in_flight_at_allocator"]) == (12, 4)


def test_audit_of_a_directory_without_records_says_so(tmp_path) -> None:
    assert cli(["audit", str(tmp_path)]) == 2
