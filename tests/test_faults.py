"""Faults a long run must survive, with the real stack run component by component:
allocator, DeepSpeed learner and vLLM actors as separate processes on loopback (CURVE on).

Each test kills, stops or restarts a process and checks that the run goes on; then it stops
the stack and `dynamo-rl audit` (launch/audit.py) checks, from the learner's grant record and
the allocator's ledger, that no group was trained twice or without being issued and that
every completed group was trained, dropped with a reason, or recorded lost (by grant id).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import Proc, make_config, wait_for

from launch.audit import audit
from launch.harness import rss
from launch.runtime import ensure_run_keys


def metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.endswith("}")]


def last_step(run_dir: Path) -> int:
    return max([r["step"] for r in metrics(run_dir)] or [0])


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "allocator_status.json").read_text())


class Stack:
    def __init__(self, run_dir: Path, model: Path, actors: int = 1, **sections) -> None:
        base = {"allocator": {"batch_prompts": 16, "n_mean": 8, "n_min": 4, "n_max": 16,
                              "lease_s": 8.0, "snapshot_every_s": 0.5},
                "actor": {"heartbeat_s": 1.0},
                "learner": {"total_steps": 10_000, "prompts_per_step": 16, "eval_every": 0,
                            "checkpoint_every": 3}}
        for k, v in sections.items():
            base.setdefault(k, {}).update(v)
        self.run_dir = run_dir
        self.cfg = make_config(run_dir, model, **base)
        ensure_run_keys(run_dir)
        self.alloc = Proc("allocator", self.cfg)
        self.learner = Proc("learner", self.cfg)
        self.actors = [Proc("actor", self.cfg, "--index", str(i)) for i in range(actors)]

    def procs(self) -> list[Proc]:
        return [self.alloc, self.learner, *self.actors]

    def stop(self) -> None:
        for p in self.procs():
            if p.alive():
                os.kill(p.p.pid, signal.SIGCONT)
        for p in [self.learner, *self.actors, self.alloc]:
            p.stop(timeout=60)

    def audit(self) -> dict:
        """Stop everything (learner first, allocator last), then audit the run."""
        self.stop()
        out = audit(self.run_dir)
        assert out["violations"] == [], out
        return out["totals"]


@pytest.fixture
def stack_factory(tiny_model, tmp_path):
    made: list[Stack] = []

    def make(**kw) -> Stack:
        s = Stack(tmp_path / f"run{len(made)}", tiny_model, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def test_restarted_allocator_restores_its_state_and_everyone_reconnects(stack_factory):
    s = stack_factory()
    wait_for(lambda: last_step(s.run_dir) >= 3, 300, "three learner steps")
    s.alloc.p.send_signal(signal.SIGKILL)
    s.alloc.p.wait()
    before = status(s.run_dir)  # the last snapshot before the kill
    step = last_step(s.run_dir)
    s.alloc = Proc("allocator", s.cfg)
    wait_for(lambda: last_step(s.run_dir) >= step + 3, 300, "training to resume")
    # The learner may train on work the actor already held before the new allocator has
    # written its first status: wait for the restarted process's own status file.
    wait_for(lambda: status(s.run_dir)["counters"].get("restored", 0) >= 1, 60,
             "the restarted allocator's status")
    wait_for(lambda: status(s.run_dir)["stats"]["samples"] > before["stats"]["samples"], 60,
             "reports reaching the restarted allocator")
    after = status(s.run_dir)
    assert after["counters"]["restored"] >= 1
    assert after["stats"]["samples"] > before["stats"]["samples"]
    assert (after["epoch"], after["round"]) >= (before["epoch"], before["round"])
    assert all(r["staleness/max"] <= 2 for r in metrics(s.run_dir) if r["step"] > 0)
    totals = s.audit()
    assert totals["trained"] == 16 * last_step(s.run_dir)  # every step's groups, once each


# opt-in (-m slow, 55 s): resuming from a checkpoint runs in the default suite in
# test_colocated (allocator state restored) and test_learner_ranks (two ranks)
@pytest.mark.slow
def test_resumed_learner_continues_from_its_checkpoint_and_the_run_goes_on(stack_factory):
    s = stack_factory()
    wait_for(lambda: (s.run_dir / "checkpoints" / "LATEST").is_file()
             and last_step(s.run_dir) >= 4, 300, "a checkpoint")
    s.learner.p.send_signal(signal.SIGKILL)
    s.learner.p.wait()
    tag = (s.run_dir / "checkpoints" / "LATEST").read_text().strip()
    ckpt = json.loads((s.run_dir / "checkpoints" / tag / "learner_state.json").read_text())
    n_before = len(metrics(s.run_dir))
    s.learner = Proc("learner", s.cfg)
    wait_for(lambda: len(metrics(s.run_dir)) >= n_before + 3, 300, "steps after the resume")
    resumed = [r for r in metrics(s.run_dir)[n_before:] if r["step"] > 0]
    assert resumed[0]["step"] == ckpt["step"] + 1  # same step ...
    assert resumed[0]["version"] == ckpt["version"] + 1  # ... and version
    st = status(s.run_dir)
    assert st["counters"].get("learner_restarts", 0) >= 1  # the allocator saw it and
    assert st["learner_version"] >= ckpt["version"]  # reopened its pacing window
    totals = s.audit()  # what the killed learner received beyond its checkpoint: lost
    # the killed session's last record, moved aside by the new one: the audit checked every
    # group recorded lost against it (held by a learner that died)
    assert len(list((s.run_dir / "learner_grants.d").glob("*.json"))) == 1
    assert totals["recorded_lost"] == status(s.run_dir)["counters"].get(
        "groups_lost_to_learner_restart", 0)


def last_record(path: Path) -> dict:
    lines = [x for x in path.read_text().splitlines() if x.endswith("}")] \
        if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


@pytest.mark.slow  # 66 s; the catch-up itself: test_weights_broadcast.py
def test_actor_joining_mid_run_generates_only_with_current_weights(stack_factory):
    s = stack_factory()
    wait_for(lambda: last_step(s.run_dir) >= 4, 300, "four learner steps")
    joined_at = last_step(s.run_dir)
    s.actors.append(Proc("actor", s.cfg, "--index", "1"))
    f = s.run_dir / "metrics_actor1.jsonl"
    wait_for(lambda: last_record(f).get("groups_sent", 0) >= 4, 300,
             "the new actor's first groups")
    log = s.actors[1].text()
    version = int(log[log.index("applied weights v"):].split("v", 1)[1].split()[0])
    assert version >= joined_at  # it caught up to the learner's weights first:
    step = last_step(s.run_dir)
    wait_for(lambda: last_step(s.run_dir) >= step + 2, 300, "steps with the new actor")
    # Work the newcomer generated with its initial (v0) weights would reach the learner
    # >= 4 versions old and be dropped, logged with its actor id and token version. None
    # older than the weights it caught up to was. (On 2 shared cores a slow newcomer can
    # still fall behind later; such groups are dropped and counted, never trained on.)
    newcomer = json.loads(f.read_text().splitlines()[-1])["actor"]
    old = [int(m) for m in re.findall(rf"from {newcomer}: oldest token v(\d+)",
                                      s.learner.text())]
    assert all(v >= version for v in old), (version, old)
    assert all(r["staleness/max"] <= 2 for r in metrics(s.run_dir) if r["step"] > 0)
    s.audit()


def test_stopped_actor_is_partitioned_its_work_reissued_and_late_results_ignored(
        stack_factory):
    s = stack_factory(actors=2, allocator={"lease_s": 4.0})
    wait_for(lambda: last_step(s.run_dir) >= 2, 300, "two learner steps")
    victim = s.actors[0].p.pid
    # its first metrics line comes 2 s after it starts: the learner may be faster
    wait_for(lambda: "actor" in last_record(s.run_dir / "metrics_actor0.jsonl"), 60,
             "the victim's first metrics line")
    victim_id = last_record(s.run_dir / "metrics_actor0.jsonl")["actor"]

    def victim_holds_work(stopped_at: float) -> bool:  # the allocator's snapshot (0.5 s)
        # Work still to report: a grant it reported already waits only for the learner's
        # receipt, and would bring no late result when the victim comes back. And work in
        # its own hands: leased at least 1 s before the stop (allocator and test share
        # CLOCK_MONOTONIC). A grant pushed just before the stop can still sit in the socket
        # when the victim's own ZeroMQ heartbeat timer (5 s) fires on waking and drops
        # the connection with it: never received, it brings no late result either (the
        # allocator re-issues it all the same).
        with (s.run_dir / "allocator_state.pkl").open("rb") as f:
            return any(g["actor_id"] == victim_id and not g["reported"]
                       and g["leased_at"] <= stopped_at - 1.0
                       for g in pickle.load(f)["grants"])

    for _ in range(20):  # stop it while it holds leases (a partition longer than the lease)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(1.2)
        if victim_holds_work(stopped_at):
            break
        os.kill(victim, signal.SIGCONT)
        time.sleep(0.5)
    assert victim_holds_work(stopped_at)
    wait_for(lambda: status(s.run_dir)["counters"].get("leases_expired", 0) >= 1, 60,
             "its leases to expire")
    step = last_step(s.run_dir)
    wait_for(lambda: last_step(s.run_dir) >= step + 2, 300, "the others to carry on")
    os.kill(victim, signal.SIGCONT)
    # Its results for re-issued grants are refused: "late" if the re-issue is still out,
    # "duplicate" if the re-issue already completed.
    wait_for(lambda: sum(status(s.run_dir)["counters"].get(k, 0)
                         for k in ("report_late", "report_duplicate")) >= 1, 60,
             "its late results to be refused")
    wait_for(lambda: last_step(s.run_dir) >= step + 4, 300, "training to go on")
    totals = s.audit()  # its late groups were dropped as duplicates or trained once
    assert totals["allocator_counters"]["leases_expired"] >= 1


@pytest.mark.slow  # 53 s
def test_stopped_learner_back_pressures_actors_with_bounded_memory(stack_factory):
    s = stack_factory(actors=1)
    wait_for(lambda: last_step(s.run_dir) >= 2, 300, "two learner steps")
    os.kill(s.learner.p.pid, signal.SIGSTOP)  # the slowest learner there is
    peak = {p.p.pid: rss(p.p.pid) for p in s.procs()}
    t_end = time.monotonic() + 20
    while time.monotonic() < t_end:
        for p in s.procs():
            peak[p.p.pid] = max(peak[p.p.pid], rss(p.p.pid))
        time.sleep(0.5)
    f = s.run_dir / "metrics_actor0.jsonl"
    a1 = json.loads(f.read_text().splitlines()[-1])
    time.sleep(5)
    a2 = json.loads(f.read_text().splitlines()[-1])
    assert a2["groups_sent"] == a1["groups_sent"]  # actors stopped sending (back-pressure)
    held = a2["held_grants"] + a2.get("outbox", 0)
    assert held <= 64 + 16  # bounded by prefetch and outbox limits, nothing piled up
    os.kill(s.learner.p.pid, signal.SIGCONT)
    step = last_step(s.run_dir)
    wait_for(lambda: last_step(s.run_dir) >= step + 3, 300, "training to resume")
    recs = [r for r in metrics(s.run_dir) if r["step"] > 0]
    # Versions do not move while the learner is stopped and pacing held the actors: the
    # work that waited is not stale when the learner comes back.
    assert recs[-1]["dropped/stale"] == 0 and all(r["staleness/max"] <= 2 for r in recs)
    for p in s.procs():  # peak RSS during the stall, per process (bounded, see README)
        assert peak[p.p.pid] < 6 << 30
    s.audit()
