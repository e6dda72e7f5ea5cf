"""Allocator ledger: rounds, leases, exactly-once accounting, receipts, learner progress,
pacing, snapshots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocator.config import AllocatorConfig
from allocator.ledger import NOT_HELD_AFTER_S, RESTORE_ID_GAP, Ledger
from protocol.idset import IdSet
from protocol.messages import NoWork, StatsReport, WorkGrant
from tasks.problems import Problem

PROBLEMS = [Problem(id=f"p{i}", prompt=f"{i}+{i}=", answer=str(2 * i)) for i in range(20)]
CFG = AllocatorConfig(batch_prompts=4, n_mean=8, n_min=4, n_max=16, initial_budget=4,
                      lease_s=10)
B, N_MEAN, LEASE = 4, 8, 10.0


def ledger(problems: list[Problem] = PROBLEMS, cfg: AllocatorConfig = CFG, *,
           max_staleness: int = 100, prompts_per_step: int = 4) -> Ledger:
    return Ledger(problems, cfg, rule="variance", verifier="integer",
                  prompts_per_step=prompts_per_step, max_staleness=max_staleness)


def grants(led: Ledger, want: int, now: float = 0.0, actor: str = "a") -> list[WorkGrant]:
    out = led.request(actor, want, now)
    assert isinstance(out, list), out
    return out


def report_of(g: WorkGrant, k: int = 1, *, lease_id: int | None = None, n: int | None = None,
              problem_id: str | None = None) -> StatsReport:
    return StatsReport(grant_id=g.grant_id, lease_id=g.lease_id if lease_id is None else lease_id,
                       problem_id=problem_id or g.problem_id, actor_id="a", k=k,
                       n=g.n if n is None else n)


def stats_of(led: Ledger, problem_id: str) -> tuple[float, float]:
    i = led.index[problem_id]
    return float(led.stats.k[i]), float(led.stats.g[i])


def test_too_few_problems_for_a_round_is_an_error() -> None:
    with pytest.raises(ValueError, match="batch_prompts = 4"):
        ledger(PROBLEMS[:3])


def test_budgets_of_a_round_sum_to_its_total() -> None:
    led = ledger()
    first = grants(led, B)
    assert sum(g.n for g in first) == B * N_MEAN
    # Later rounds, with statistics that differ per problem, keep the same total.
    for i, g in enumerate(first):
        assert led.report(report_of(g, k=min(i, g.n))) == "accepted"
    for _ in range(5):
        rnd = grants(led, B)
        assert {led.grants[g.grant_id].round for g in rnd} == {led.round - 1}
        assert sum(g.n for g in rnd) == B * N_MEAN
        assert all(CFG.n_min <= g.n <= CFG.n_max for g in rnd)
        for g in rnd:
            led.report(report_of(g, k=g.n // 3))


def test_report_with_current_lease_counts_exactly_once() -> None:
    led = ledger()
    g = grants(led, 1)[0]
    assert led.report(report_of(g, k=3)) == "accepted"
    assert led.report(report_of(g, k=3)) == "duplicate"  # reported, awaiting its group
    assert stats_of(led, g.problem_id) == (3.0, g.n)
    assert led.completed_groups == 0 and g.grant_id not in led.completed
    led.receipts([g.grant_id])
    assert led.report(report_of(g, k=3)) == "duplicate"  # completed
    assert stats_of(led, g.problem_id) == (3.0, g.n)
    assert led.completed_groups == 1 and list(led.completed) == [g.grant_id]
    assert led.counters["report_duplicate"] == 2


def test_a_grant_completes_with_report_and_receipt_in_either_order() -> None:
    led = ledger()
    a, b = grants(led, 2)
    led.receipts([a.grant_id])  # the learner got a's group before the allocator its report
    assert a.grant_id not in led.completed
    assert led.report(report_of(a)) == "accepted"
    assert led.report(report_of(b)) == "accepted"
    assert b.grant_id not in led.completed
    led.receipts([b.grant_id, b.grant_id, 10**9])
    assert list(led.completed) == [a.grant_id, b.grant_id]
    assert led.received_groups == 2
    assert led.counters["receipt_duplicate"] == 1 and led.counters["receipt_unknown"] == 1


def test_a_grant_reported_without_its_group_expires_and_is_reissued() -> None:
    """An actor that reports but never sends the group (it died, or lies): its grant is not
    completed, and once a lease period passes without the learner's receipt it is re-issued;
    heartbeats cannot keep it alive."""
    led = ledger()
    g = grants(led, 1, now=0.0)[0]
    assert led.report(report_of(g), now=1.0) == "accepted"
    led.heartbeat("a", [g.grant_id], now=LEASE)  # no renewal of a reported grant
    assert led.expire(1.0 + LEASE - 0.5) == 0
    assert led.expire(1.0 + LEASE) == 1
    assert led.counters["groups_not_received"] == 1 and led.counters["leases_expired"] == 0
    again = grants(led, 1, now=20.0, actor="b")[0]
    assert (again.grant_id, again.n) == (g.grant_id, g.n) and again.lease_id != g.lease_id
    assert led.report(report_of(again), now=21.0) == "accepted"
    led.receipts([g.grant_id])
    assert list(led.completed) == [g.grant_id] and led.issued_groups == 1


def test_reported_grants_do_not_count_against_the_actors_share() -> None:
    led = ledger(max_staleness=1, prompts_per_step=4)  # window of 4
    first = grants(led, 100)
    assert len(first) == 4
    for g in first:
        led.report(report_of(g))
    led.progress(version=1, consumed_groups=4)
    assert len(grants(led, 100)) == 4  # the reported ones wait for receipts, not for a


def test_report_for_an_expired_lease_is_late_and_changes_nothing() -> None:
    led = ledger()
    g = grants(led, 1)[0]
    assert led.expire(LEASE) == 1
    assert led.report(report_of(g, k=2)) == "late"  # expired, not yet re-issued
    again = grants(led, 1, now=LEASE + 1, actor="b")[0]
    assert again.grant_id == g.grant_id
    assert led.report(report_of(g, k=2)) == "late"  # re-issued under a new lease
    assert stats_of(led, g.problem_id) == (0.0, 0.0)
    assert led.completed_groups == 0
    assert led.report(report_of(again, k=2)) == "accepted"
    assert stats_of(led, g.problem_id) == (2.0, g.n)


def test_unknown_grant_id_is_reported_as_unknown() -> None:
    led = ledger()
    g = grants(led, 1)[0]
    assert led.report(StatsReport(grant_id=999, lease_id=g.lease_id, problem_id=g.problem_id,
                                  actor_id="a", k=0, n=g.n)) == "unknown"


@pytest.mark.parametrize("wrong", [{"problem_id": "p19"}, {"n": 3}])
def test_report_for_another_problem_or_size_is_a_mismatch(wrong: dict) -> None:
    led = ledger()
    g = next(g for g in grants(led, B) if g.problem_id != "p19")
    assert led.report(report_of(g, k=0, **wrong)) == "mismatch"
    assert float(led.stats.g.sum()) == 0.0
    assert led.report(report_of(g, k=1)) == "accepted"  # the grant stays open


def test_expired_grants_are_reissued_first_with_new_leases() -> None:
    led = ledger()
    old = grants(led, 3, now=0.0)
    assert led.expire(LEASE - 1) == 0
    assert led.expire(LEASE) == 3
    assert led.counters["leases_expired"] == 3
    again = grants(led, 4, now=LEASE, actor="b")
    assert [g.grant_id for g in again[:3]] == [g.grant_id for g in old]
    assert [g.n for g in again[:3]] == [g.n for g in old]
    assert len({g.lease_id for g in old + again}) == 7
    assert again[3].grant_id == old[-1].grant_id + 1  # fresh work only after the re-issues
    assert led.issued_groups == 4  # a re-issue is not new work for pacing
    assert led.expire(LEASE) == 0  # new deadlines


def test_leases_an_actor_does_not_hold_are_requeued_from_its_heartbeat() -> None:
    """A chaos run stalled for good: a restored allocator renewed leases its predecessor had
    re-queued, the actors held none of them, and a restore every 40 s kept the 120 s leases
    alive, the pacing window full. The actor's heartbeat lists what it holds: a lease it
    does not list is re-queued, once it is old enough not to be a grant still in transit."""
    led = ledger(max_staleness=0, prompts_per_step=4)
    held = grants(led, 4, now=0.0)
    led.heartbeat("a", [], now=1.0)  # just sent: maybe still on the wire
    assert led.counters["leases_not_held"] == 0
    led.heartbeat("a", [g.grant_id for g in held[:2]], now=NOT_HELD_AFTER_S)
    assert led.counters["leases_not_held"] == 2
    assert [g.grant_id for g in grants(led, 4, now=NOT_HELD_AFTER_S, actor="b")] == \
        [g.grant_id for g in held[2:]]
    restored = ledger(max_staleness=0, prompts_per_step=4)
    restored.load_state_dict(led.state_dict(), now=100.0)
    assert isinstance(restored.request("a", 1, 100.0), NoWork)  # the window is full
    restored.heartbeat("a", [], now=100.5)  # after a restore: at once
    restored.heartbeat("b", [], now=100.5)
    assert restored.counters["leases_not_held"] == 2 + 4  # (2: restored with the counters)
    again = grants(restored, 4, now=100.5, actor="a") + grants(restored, 4, now=100.5,
                                                                 actor="b")
    assert sorted(g.grant_id for g in again) == sorted(g.grant_id for g in held)


def test_heartbeat_renews_only_the_holders_live_leases() -> None:
    led = ledger()
    mine = grants(led, 2, now=0.0, actor="a")
    theirs = grants(led, 1, now=0.0, actor="b")
    led.heartbeat("a", [g.grant_id for g in mine + theirs], now=LEASE - 1)
    assert led.expire(LEASE) == 1  # b's grant: a cannot renew it
    # Past its deadline a lease is not renewed, even before `expire` has run.
    led.heartbeat("a", [g.grant_id for g in mine], now=2 * LEASE - 0.5)
    assert led.expire(2 * LEASE - 0.5) == 2
    led.heartbeat("a", [g.grant_id for g in mine], now=2 * LEASE)  # re-queued: no revival
    assert {led.grants[g.grant_id].actor_id for g in mine + theirs} == {""}


def test_pacing_holds_fresh_work_until_the_learner_consumes() -> None:
    led = ledger(max_staleness=0, prompts_per_step=4)
    first = grants(led, 3)
    assert len(first) == 3
    first += grants(led, 5)
    assert len(first) == 4  # window of 4 groups
    paced = led.request("a", 1, 0.0)
    assert isinstance(paced, NoWork) and "4 groups outstanding" in paced.reason
    for g in first:
        assert led.report(report_of(g)) == "accepted"
    led.progress(version=1, consumed_groups=4)
    more = grants(led, 8, now=1.0)
    assert len(more) == 4
    assert all(g.issued_version == 1 for g in more)


@pytest.mark.parametrize(("max_staleness", "updates", "batches"),
                         [(2, 1, 2), (8, 4, 2), (7, 4, 1), (4, 4, 1), (0, 4, 1)])
def test_the_pacing_window_counts_batches_of_optimizer_updates(max_staleness, updates,
                                                               batches) -> None:
    """A batch of prompts_per_step groups takes `updates` policy versions, so a bound of s
    versions keeps s // updates batches (at least one) of work outstanding."""
    led = Ledger(PROBLEMS, CFG, rule="variance", verifier="integer", prompts_per_step=4,
                 max_staleness=max_staleness, updates_per_batch=updates)
    assert len(grants(led, 100)) == 4 * batches
    assert isinstance(led.request("a", 1, 0.0), NoWork)


def test_live_actors_share_the_window_fairly() -> None:
    led = ledger(max_staleness=2, prompts_per_step=4)  # window of 8 groups
    led.heartbeat("b", [], now=0.0)  # two live actors
    assert len(grants(led, 100, actor="a")) == 4  # a greedy request gets its half
    assert len(grants(led, 100, actor="b")) == 4
    assert isinstance(led.request("a", 1, 0.0), NoWork)


def test_a_silent_actors_unreported_work_is_reissued_before_its_lease_ends() -> None:
    """A SIGKILLed actor's replacement (a new id) waited out the dead one's 2-minute leases
    with nothing to do, and the dead id halved its fair share meanwhile."""
    cfg = CFG.model_copy(update={"lease_s": 120.0, "actor_silence_s": 20.0})
    led = ledger(cfg=cfg, max_staleness=2, prompts_per_step=4)  # window of 8 groups
    led.heartbeat("live", [], now=0.0)
    dead = grants(led, 100, now=0.0, actor="dead")
    assert len(dead) == 4  # half the window: two live actors
    assert led.report(report_of(dead[0])) == "accepted"  # reported: waits for the learner
    live = grants(led, 100, now=0.0, actor="live")
    for t in (5.0, 10.0, 15.0, 20.0):  # the live actor beats; the dead one is silent
        led.heartbeat("live", [g.grant_id for g in live], now=t)
        assert led.expire(t) == 0  # silent for 20 s: not yet taken for dead
    led.heartbeat("live", [g.grant_id for g in live], now=20.5)
    assert led.expire(20.5) == 3  # its unreported grants, 100 s before their leases end
    assert led.counters["leases_of_silent_actors"] == 3
    assert led.counters["leases_expired"] == 0
    assert dead[0].grant_id in led.grants and led.grants[dead[0].grant_id].reported
    # the re-issued grants go to the live actor, which now has the whole window to itself
    again = grants(led, 100, now=20.5, actor="live")
    assert [g.grant_id for g in again] == sorted(g.grant_id for g in dead[1:])
    assert all(led.grants[g.grant_id].actor_id == "live" for g in live)  # kept its own
    # a late report of the dead actor's lease is refused (the grant was leased again)
    assert led.report(report_of(dead[1])) == "late"


def test_pacing_still_reissues_expired_work() -> None:
    led = ledger(max_staleness=0, prompts_per_step=4)
    first = grants(led, 4)
    led.expire(LEASE)
    assert [g.grant_id for g in grants(led, 8, now=LEASE)] == [g.grant_id for g in first]
    assert isinstance(led.request("a", 1, LEASE), NoWork)


def completed_step(led: Ledger, now: float = 0.0) -> list[int]:
    """One step of work (4 groups) leased, reported and received; their grant ids."""
    ids = []
    for g in grants(led, 4, now=now):
        led.report(report_of(g), now)
        led.receipts([g.grant_id])
        ids.append(g.grant_id)
    return ids


def test_a_restarted_learner_reopens_the_pacing_window_and_lost_groups_are_counted() -> None:
    led = ledger(max_staleness=0, prompts_per_step=4)
    step1 = completed_step(led)  # one step of work, completed and consumed
    assert led.progress(version=1, consumed_groups=4, session=1) == "accepted"
    step2 = completed_step(led)  # a second step received, then the learner dies unconsumed
    assert isinstance(led.request("a", 1, 0.0), NoWork)
    # resumed from the step-1 checkpoint: the very count the ledger holds, yet the 4 groups
    # the dead learner had received are gone with it
    assert led.progress(version=1, consumed_groups=4, session=2,
                        resumed=IdSet(step1)) == "restart"
    assert led.counters["groups_lost_to_learner_restart"] == 4
    assert list(led.lost) == step2
    assert len(grants(led, 4)) == 4  # the window is open again
    assert led.progress(version=0, consumed_groups=0, session=3) == "restart"  # from scratch
    # from scratch: the 4 groups the step-1 checkpoint had trained on are lost too
    assert led.counters["groups_lost_to_learner_restart"] == 8
    assert list(led.lost) == sorted(step1 + step2)
    assert led.counters["learner_restarts"] == 2
    assert (led.learner_version, led.consumed_groups) == (0, 0)


def test_a_restart_settles_by_id_after_the_allocator_restored_an_older_snapshot() -> None:
    """The interleaving a loaded 15-minute fault run hit (docs/GUARANTEES.md): the allocator
    snapshots, the learner dies holding a step and restarts (settled), trains on, and then the
    allocator is restored from the snapshot taken before the restart. The restored ledger
    sees the restart again, from a learner that has consumed more since: settling by count
    (received - consumed) undercounted the loss; by id it is exact."""
    led = ledger(max_staleness=0, prompts_per_step=4)
    step1 = completed_step(led)
    assert led.progress(version=1, consumed_groups=4, session=1) == "accepted"
    step2 = completed_step(led)
    snapshot = led.state_dict()  # before the restart
    # the learner dies holding step2 and restarts from the step-1 checkpoint, then trains
    # two more steps before the allocator crashes
    assert led.progress(version=1, consumed_groups=4, session=2,
                        resumed=IdSet(step1)) == "restart"
    assert list(led.lost) == step2
    step3 = completed_step(led)
    assert led.progress(version=2, consumed_groups=8, session=2,
                        resumed=IdSet(step1)) == "accepted"
    step4 = completed_step(led)
    assert led.progress(version=3, consumed_groups=12, session=2,
                        resumed=IdSet(step1)) == "accepted"
    restored = ledger(max_staleness=0, prompts_per_step=4)
    restored.load_state_dict(snapshot, now=1.0)
    assert restored.progress(version=3, consumed_groups=12, session=2,
                             resumed=IdSet(step1)) == "restart"
    # by count: received 8 - consumed 12 -> nothing lost; by id the 4 of step2 are lost
    assert list(restored.lost) == step2
    assert restored.counters["groups_lost_to_learner_restart"] == 4
    # step3 and step4 completed after the snapshot: unknown here, re-issued, never "lost"
    assert not set(restored.lost) & set(step3 + step4)


def test_a_group_the_learner_refused_is_reissued_at_once_for_its_current_lease_only() -> None:
    """E.g. generated with the newer weights of a learner that has since restarted: waiting
    for the lease (120 s by default, renewed by every allocator restart) held the pacing
    window shut."""
    led = ledger(max_staleness=0, prompts_per_step=4)
    a, b, c, d = grants(led, 4)
    led.report(report_of(a))
    led.receipts([c.grant_id])
    assert isinstance(led.request("a", 1, 0.0), NoWork)  # the window is full
    assert led.refused([(a.grant_id, a.lease_id), (b.grant_id, b.lease_id + 1),
                        (c.grant_id, c.lease_id), (10**9, 1)]) == 1
    assert led.counters["groups_refused_by_learner"] == 1
    assert led.counters["refused_by_learner_ignored"] == 3  # another lease, received, unknown
    again = grants(led, 4, now=1.0, actor="b")
    assert [g.grant_id for g in again] == [a.grant_id]  # re-issued before the lease ran out
    assert again[0].lease_id != a.lease_id
    assert led.report(report_of(a)) == "late"  # the old lease's report changes nothing
    assert led.report(report_of(again[0])) == "accepted"


def test_late_progress_of_a_settled_session_is_refused() -> None:
    """A message of the old learner handled after the new one's must not settle again (it
    would mark what the new session trained as lost)."""
    led = ledger(max_staleness=0, prompts_per_step=4)
    step1 = completed_step(led)
    assert led.progress(version=1, consumed_groups=4, session=1) == "accepted"
    assert led.progress(version=1, consumed_groups=4, session=2,
                        resumed=IdSet(step1)) == "restart"
    assert led.progress(version=1, consumed_groups=4, session=1) == "stale_session"
    assert led.counters["learner_restarts"] == 1 and len(led.lost) == 0
    restored = ledger(max_staleness=0, prompts_per_step=4)
    restored.load_state_dict(led.state_dict(), now=0.0)
    assert restored.progress(version=1, consumed_groups=4, session=1) == "stale_session"


def test_a_snapshot_from_before_ids_were_kept_does_not_count_old_losses_again() -> None:
    """Such a snapshot's restarts were settled by count (issued_groups is already net of
    them): its completed grants are taken as settled, only open receipts can be lost."""
    led = ledger(max_staleness=0, prompts_per_step=4)
    step1 = completed_step(led)
    assert led.progress(version=1, consumed_groups=4, session=1) == "accepted"
    completed_step(led)  # received by a learner that died: settled by count back then
    state = led.state_dict()
    del state["received_ids"], state["lost"], state["past_sessions"]
    state["issued_groups"] -= 4
    state["counters"]["groups_lost_to_learner_restart"] = 4
    old = ledger(max_staleness=0, prompts_per_step=4)
    old.load_state_dict(state, now=0.0)
    assert old.progress(version=1, consumed_groups=4, session=2,
                        resumed=IdSet(step1)) == "restart"
    assert len(old.lost) == 0 and old.outstanding() == 0  # not subtracted twice


def test_a_restart_forgets_receipts_of_outstanding_grants_so_they_are_reissued() -> None:
    """A group received by the dead learner whose actor has not reported yet: the grant is
    not lost, its receipt is forgotten, and it is re-issued after its lease."""
    led = ledger(max_staleness=0, prompts_per_step=4)
    held = grants(led, 4)
    led.receipts([g.grant_id for g in held])  # received, reports still on their way
    assert led.progress(version=0, consumed_groups=0, session=1) == "accepted"
    assert led.progress(version=0, consumed_groups=0, session=2) == "restart"
    assert len(led.lost) == 0 and led.counters["receipts_forgotten_at_restart"] == 4
    for g in held:
        assert led.report(report_of(g), now=1.0) == "accepted"
    assert len(led.completed) == 0  # waits for a receipt that will never come
    assert led.expire(1.0 + LEASE) == 4
    assert [g.grant_id for g in grants(led, 4, now=1.0 + LEASE)] == \
        [g.grant_id for g in held]


def test_learner_progress_that_cannot_be_true_is_refused_and_changes_nothing() -> None:
    """A consumed count going backwards without a new session, a version going backwards, or a
    version beyond the updates its consumed groups allow (2 per batch of 4 groups)."""
    led = Ledger(PROBLEMS, CFG, rule="variance", verifier="integer", prompts_per_step=4,
                 max_staleness=8, updates_per_batch=2)
    assert led.progress(version=4, consumed_groups=9, session=7) == "accepted"
    assert led.progress(version=0, consumed_groups=0, session=7) == "consumed_regression"
    assert led.progress(version=3, consumed_groups=9, session=7) == "version_regression"
    assert led.progress(version=10**6, consumed_groups=12, session=7) == "impossible_version"
    assert led.progress(version=5, consumed_groups=11, session=8) == "impossible_version"
    assert (led.learner_version, led.consumed_groups) == (4, 9)
    assert {k: v for k, v in led.counters.items() if k.startswith("progress_refused_")} == {
        "progress_refused_consumed_regression": 1, "progress_refused_version_regression": 1,
        "progress_refused_impossible_version": 2}
    assert led.progress(version=6, consumed_groups=12, session=7) == "accepted"
    assert led.counters["learner_restarts"] == 0


@settings(max_examples=30, deadline=None)
@given(num_problems=st.integers(4, 30), batch=st.integers(1, 4), seed=st.integers(0, 9))
def test_each_epoch_issues_every_problem_once(num_problems: int, batch: int, seed: int) -> None:
    cfg = AllocatorConfig(batch_prompts=batch, n_mean=8, n_min=4, n_max=16, seed=seed)
    led = ledger([Problem(f"q{i}", "x", "1") for i in range(num_problems)], cfg)
    # Rounds straddle epoch boundaries when B does not divide the problem count.
    order = [g.problem_id for g in grants(led, 3 * num_problems + batch)]
    for start in range(0, 3 * num_problems, num_problems):
        assert sorted(order[start:start + num_problems]) == sorted(led.index)


def test_every_epoch_is_reshuffled() -> None:
    led = ledger()
    order = [g.problem_id for g in grants(led, 2 * len(PROBLEMS))]
    assert order[:20] != order[20:]


def test_snapshot_restores_position_leases_and_statistics() -> None:
    led = ledger()
    for g in grants(led, 7):
        led.report(report_of(g, k=1))
        led.receipts([g.grant_id])
    grants(led, 2, now=5.0)  # two leases outstanding at snapshot time
    led.progress(version=1, consumed_groups=6, session=3)
    state = led.state_dict()

    restored = ledger()
    restored.load_state_dict(state, now=100.0)
    for key in ("epoch", "cursor", "round", "issued_groups", "completed_groups",
                "received_groups", "learner_version", "consumed_groups", "learner_session",
                "formed", "completed", "received_ids", "lost"):
        assert getattr(restored, key) == getattr(led, key), key
    assert len(restored.completed) == 7 and len(restored.formed) == 3 * B
    # ids skip past anything issued between the snapshot and a crash: never reused
    assert restored.next_grant_id == led.next_grant_id + RESTORE_ID_GAP
    assert restored.next_lease_id == led.next_lease_id + RESTORE_ID_GAP
    assert (restored.stats.k == led.stats.k).all() and (restored.stats.g == led.stats.g).all()
    assert restored.counters["restored"] == 1
    # Both continue identically into the next epoch: same queue, permutation, budgets, leases.
    a, b = grants(led, 20, now=200.0), grants(restored, 20, now=200.0)
    assert [(g.problem_id, g.n) for g in a] == [(g.problem_id, g.n) for g in b]
    assert {g.lease_id for g in a}.isdisjoint({g.lease_id for g in b})
    assert restored.epoch == 1


def test_leases_held_at_a_snapshot_stay_valid_for_a_lease_period() -> None:
    led = ledger()
    held = grants(led, 2, now=0.0)
    restored = ledger()
    restored.load_state_dict(led.state_dict(), now=100.0)
    assert restored.expire(100.0 + LEASE - 1) == 0
    assert restored.report(report_of(held[0], k=2)) == "accepted"
    restored.receipts([held[0].grant_id])
    assert stats_of(restored, held[0].problem_id) == (2.0, held[0].n)
    assert restored.expire(100.0 + LEASE) == 1
    assert restored.report(report_of(held[1])) == "late"


def test_snapshot_of_another_problem_count_is_refused() -> None:
    state = ledger().state_dict()
    with pytest.raises(ValueError, match="snapshot is of 20 problems"):
        ledger(PROBLEMS[:10]).load_state_dict(state, now=0.0)


def test_a_resumed_run_forgets_the_previous_launchs_work_in_flight() -> None:
    """`--resume` restores the checkpoint's snapshot. Work issued but not consumed then is
    either leased (re-queued at once: its actor is gone) or completed and lost with the old
    learner (it must not keep the pacing window full): the resumed learner's first progress
    comes from a new session and settles those by id against its checkpoint."""
    led = ledger(max_staleness=2, prompts_per_step=4)
    assert led.progress(version=0, consumed_groups=0, session=1) == "accepted"
    done = grants(led, 4)
    for g in done:  # completed, then the learner that received them died unconsumed
        led.report(report_of(g))
        led.receipts([g.grant_id])
    held = grants(led, 4)  # leased to an actor of the old launch
    assert isinstance(led.request("a", 1, 0.0), NoWork)  # the window (8 groups) is full
    state = led.state_dict()
    state["resume"] = True
    new = ledger(max_staleness=2, prompts_per_step=4)
    new.load_state_dict(state, now=0.0)
    # the resumed learner (a new session, from a checkpoint holding none of them) settles
    assert new.progress(version=0, consumed_groups=0, session=2, resumed=IdSet()) == "restart"
    assert new.counters["groups_lost_to_learner_restart"] == 4
    assert list(new.lost) == sorted(g.grant_id for g in done)
    assert new.outstanding() == 4  # the re-queued leases, nothing else
    again = grants(new, 8, actor="b")
    assert [g.grant_id for g in again[:4]] == sorted(g.grant_id for g in held)  # first
    assert len(again) == 8  # and fresh work flows: the window is open
