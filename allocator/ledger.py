"""Rounds, leases and exactly-once accounting of work grants (no sockets, no clocks).

A grant's life: queued -> leased to an actor -> reported (the actor's StatsReport: statistics
updated) and received (the learner's receipt: its group reached the learner) -> completed.
Reports and receipts may come in either order; a grant is completed when it has both.

Invariants:
- Every grant is completed at most once: the first StatsReport carrying the grant's current
  lease is accepted; a report for an expired lease ("late"), for a grant already reported or
  completed ("duplicate") is ignored and counted, and never touches the statistics.
- A grant whose lease expires, or that was reported but whose group has not reached the
  learner within a lease period (`groups_not_received`: an actor that reports without
  sending, or dies in between), goes back to the front of the queue with a new lease id, so
  the work of a dead, stopped or lying actor is re-issued, never lost.
- `formed` holds every grant id this ledger (and the snapshots it was restored from) ever
  created, `completed` every grant id completed: the allocator's side of `dynamo-rl audit`.
  The service snapshots a newly formed round before sending any of its grants (service.py),
  so a restored ledger's `formed` covers every id an actor may hold.
- Learner progress: the learner's consumed count never goes backwards and its version never
  exceeds what its consumed count allows (updates_per_batch per prompts_per_step groups),
  except that a new learner `session` (a restarted learner) may restart from a smaller count;
  anything else is refused and counted (`progress_refused_*`) and changes nothing. A new
  session settles the old one's account by grant id, not by count: the new learner sends the
  ids its checkpoint holds (`resumed`), and every id a learner received (`received_ids`) that
  is not among them went with the old process. Completed ones are recorded lost (`lost`,
  counted in `groups_lost_to_learner_restart`) and leave the pacing window; ones still
  outstanding forget their receipt and are re-issued after a lease period. By id, the
  settlement is right whatever the counts say: after a learner killed between its receipts
  and its next progress, after a restart from scratch, and after an allocator restored from a
  snapshot older than the restart (which detects the restart again, from the snapshot's
  session, and settles only what it knows was received).
- Pacing: groups issued but not yet consumed by the learner never exceed a window of
  W = max(max_staleness // U, 1) batches of prompts_per_step groups, where U =
  updates_per_batch is the number of optimizer updates (policy versions) one batch can take.
  With W = 1 (max_staleness < 2U: the paper configs) the learner's next batch is
  exactly the work outstanding, generated with weights at most U versions old, so in steady
  state nothing is dropped. With W >= 2 (the embedded default: 2) a group that finishes
  after groups issued a batch later can arrive more than max_staleness versions old; the
  learner drops and counts it.
- Budgets of a round are computed from the statistics at the moment the round is formed.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from allocator.budget import dynamo_budgets
from allocator.config import AllocatorConfig
from allocator.stats import ProblemStats
from protocol.idset import IdSet
from protocol.messages import NoWork, StatsReport, WorkGrant
from tasks.problems import Problem

log = logging.getLogger("dynamo.allocator")

RESTORE_ID_GAP = 1 << 24  # more grants than any snapshot period issues
# A lease older than this that the actor's heartbeat does not list is not held: re-queued.
# Longer than a grant's trip to the actor plus one heartbeat period (2 s by default).
NOT_HELD_AFTER_S = 10.0
PAST_SESSIONS = 64  # settled learner sessions remembered: their late progress is refused


@dataclass(slots=True)
class Grant:
    grant_id: int
    problem: int  # index into the problem list
    n: int
    round: int
    lease_id: int = 0
    actor_id: str = ""
    deadline: float = 0.0
    issued_version: int = 0
    reported: bool = False  # stats applied; the learner's receipt still to come
    leased_at: float = 0.0  # when the current lease was issued (this process's clock)
    received: bool = False  # the learner has the group; the report still to come


class Ledger:
    """The allocator's state: statistics, epoch position, rounds, leases, counters."""

    def __init__(self, problems: list[Problem], cfg: AllocatorConfig, *, rule: str,
                 verifier: str, prompts_per_step: int, max_staleness: int,
                 updates_per_batch: int = 1) -> None:
        if len(problems) < cfg.batch_prompts:
            raise ValueError(f"{len(problems)} problems cannot fill a round of "
                             f"allocator.batch_prompts = {cfg.batch_prompts}")
        self.problems = problems
        self.index = {p.id: i for i, p in enumerate(problems)}
        self.cfg = cfg
        self.rule = rule
        self.verifier = verifier
        # At most max_staleness versions of work outstanding, counted in batches: a batch
        # moves the learner up to U versions. An actor may hold weights one batch behind the
        # learner when it starts a grant, so a window of w batches keeps the tokens of a group
        # at most w·U versions old when trained; synchronous mode (s = 0) issues one batch at
        # a time and actors wait for that batch's weights.
        self.window = max(max_staleness // max(updates_per_batch, 1), 1) * prompts_per_step
        self.prompts_per_step = prompts_per_step
        self.updates_per_batch = max(updates_per_batch, 1)
        self.stats = ProblemStats(len(problems), half_life=cfg.stats_half_life)
        self.epoch = 0
        self.cursor = 0  # position in the current epoch's permutation
        self.round = 0
        self.next_grant_id = 0
        self.next_lease_id = 0
        self.grants: dict[int, Grant] = {}  # outstanding (not completed) grants
        self.queue: deque[int] = deque()  # grant ids waiting for an actor
        self.issued_groups = 0  # distinct grants ever issued
        self.completed_groups = 0
        self.received_ids = IdSet()  # every grant id whose group a learner received (receipts)
        self.lost = IdSet()  # completed grants whose group went with a restarted learner
        self.formed = IdSet()  # every grant id ever created
        self.completed = IdSet()  # every grant id completed (reported and received)
        self.learner_version = 0
        self.consumed_groups = 0
        self.learner_session: int | None = None  # of the learner process last heard from
        self.past_sessions: list[int] = []  # settled sessions (the last PAST_SESSIONS)
        self.counters: Counter[str] = Counter()
        self.last_seen: dict[str, float] = {}  # actor id -> last request or heartbeat

    # ------------------------------------------------------------------ rounds
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.problems))

    def _form_round(self) -> None:
        """Next B problems of the shuffled epoch, budgets from the statistics right now."""
        b = self.cfg.batch_prompts
        picked: list[int] = []
        while len(picked) < b:
            perm = self._permutation(self.epoch)
            take = perm[self.cursor:self.cursor + b - len(picked)]
            picked.extend(take.tolist())
            self.cursor += len(take)
            if self.cursor >= len(perm):
                self.epoch, self.cursor = self.epoch + 1, 0
        idx = np.asarray(picked)
        budgets = dynamo_budgets(
            self.stats.k[idx], self.stats.g[idx], total=self.cfg.round_total,
            n_min=self.cfg.n_min, n_max=self.cfg.n_max, rule=self.rule,  # type: ignore[arg-type]
            initial_budget=self.cfg.initial_budget,
            mastery_threshold=self.cfg.mastery_threshold, min_priority=self.cfg.min_priority)
        for p, n in zip(idx.tolist(), budgets.tolist(), strict=True):
            g = Grant(grant_id=self.next_grant_id, problem=p, n=int(n), round=self.round)
            self.next_grant_id += 1
            self.grants[g.grant_id] = g
            self.formed.add(g.grant_id)
            self.queue.append(g.grant_id)
        self.round += 1
        self.counters["rounds"] += 1

    @property
    def received_groups(self) -> int:
        """Distinct grants received by a learner and not lost with one."""
        return len(self.received_ids) - len(self.lost)

    # ------------------------------------------------------------------ messages
    def outstanding(self) -> int:
        """Groups issued that the learner has not consumed yet."""
        return self.issued_groups - self.consumed_groups

    def fair_share(self, actor_id: str, now: float, seen: bool = True) -> int:
        """Most grants one actor may hold: the pacing window split over the live actors, so
        one greedy actor cannot take all the work while another idles (and a stopped one
        holds little that must wait for its lease to expire). `seen`: the actor is asking
        now (not a parked request served later)."""
        if seen:
            self.last_seen[actor_id] = now
        live = max(1, sum(1 for t in self.last_seen.values()
                          if now - t <= self.cfg.actor_silence_s))
        held = sum(1 for g in self.grants.values() if g.actor_id == actor_id and not g.reported)
        return max(1, -(-self.window // live)) - held

    def request(self, actor_id: str, want: int, now: float, mac=None, parked: bool = False
                ) -> list[WorkGrant] | NoWork:
        """Up to `want` grants for the actor; `mac(grant_id, lease_id, problem_id, n)` signs
        each one (protocol.auth.grant_mac) when given. `parked`: a request the service holds
        until work can be issued, tried again (neither a sign of life nor counted as paced)."""
        out: list[WorkGrant] = []
        want = min(want, self.fair_share(actor_id, now, seen=not parked))
        while len(out) < want:
            if not self.queue:
                # Only fresh work is paced; re-issued grants were counted when first issued.
                if self.outstanding() >= self.window:
                    break
                self._form_round()
            gid = self.queue[0]
            g = self.grants[gid]
            fresh = g.lease_id == 0
            if fresh and self.outstanding() >= self.window:
                break
            self.queue.popleft()
            if fresh:
                self.issued_groups += 1
            self.next_lease_id += 1
            g.lease_id, g.actor_id = self.next_lease_id, actor_id
            g.deadline, g.issued_version = now + self.cfg.lease_s, self.learner_version
            g.leased_at = now
            p = self.problems[g.problem]
            out.append(WorkGrant(grant_id=gid, lease_id=g.lease_id, problem_id=p.id,
                                 prompt=p.prompt, answer=p.answer, verifier=self.verifier,
                                 n=g.n, lease_s=self.cfg.lease_s,
                                 issued_version=self.learner_version,
                                 mac=mac(gid, g.lease_id, p.id, g.n) if mac else ""))
        if out:
            self.counters["grants_issued"] += len(out)
            return out
        if not parked:
            self.counters["requests_paced"] += 1
        return NoWork(retry_after_s=0.05,
                      reason=f"pacing: {self.outstanding()} groups outstanding, window "
                             f"{self.window} (learner version {self.learner_version})")

    def report(self, r: StatsReport, now: float = 0.0) -> str:
        """Apply a stats report once; returns 'accepted', 'late', 'duplicate', 'mismatch' or
        'unknown'. An accepted report waits for the learner's receipt for one lease period."""
        g = self.grants.get(r.grant_id)
        if g is None or g.reported:
            status = "duplicate" if r.grant_id < self.next_grant_id else "unknown"
        elif r.lease_id != g.lease_id or not g.actor_id:  # no actor_id: expired, re-queued
            status = "late"
        elif self.problems[g.problem].id != r.problem_id or r.n != g.n:
            status = "mismatch"
        else:
            status = "accepted"
            self.stats.update_one(g.problem, r.k, r.n)
            g.reported = True
            g.deadline = now + self.cfg.lease_s
            if g.received:
                self._complete(g)
        self.counters[f"report_{status}"] += 1
        return status

    def receipts(self, grant_ids: list[int]) -> None:
        """The learner received the groups of these grants."""
        for gid in grant_ids:
            g = self.grants.get(gid)
            if g is None or g.received:
                self.counters["receipt_duplicate" if gid in self.formed else
                              "receipt_unknown"] += 1
                continue
            g.received = True
            self.received_ids.add(gid)
            if g.reported:
                self._complete(g)

    def refused(self, leases: list[tuple[int, int]], why: str = "refused_by_learner") -> int:
        """These (grant, lease)s will never bring a group: the learner refused it (generated
        with weights newer than a restarted learner's) or the grant never left this service
        (`why` = "unsent"). Re-queue each at the front now, if that lease is still the
        grant's current one and its group was not received; returns how many."""
        out = 0
        for gid, lease in sorted(leases, reverse=True):
            g = self.grants.get(gid)
            if g is None or g.lease_id != lease or not g.actor_id or g.received:
                self.counters[f"{why}_ignored"] += 1
                continue
            g.actor_id, g.reported = "", False
            self.queue.appendleft(gid)
            out += 1
        self.counters[f"groups_{why}"] += out
        return out

    def _complete(self, g: Grant) -> None:
        del self.grants[g.grant_id]
        self.completed.add(g.grant_id)
        self.completed_groups += 1

    def heartbeat(self, actor_id: str, in_flight: list[int], now: float) -> None:
        """Renew the leases an alive actor still holds, and re-queue the ones it does not:
        leased to it at least NOT_HELD_AFTER_S ago, not reported, and not in its list (it
        never got them, or dropped them: e.g. a restored allocator renewed leases that its
        predecessor had re-queued, and restores every lease period kept them alive)."""
        self.last_seen[actor_id] = now
        held = set(in_flight)
        for gid in in_flight:
            g = self.grants.get(gid)
            # A reported grant waits for its group, not for its actor: no renewal.
            if g is not None and g.actor_id == actor_id and g.deadline > now \
                    and not g.reported:
                g.deadline = now + self.cfg.lease_s
        gone = [g for g in self.grants.values() if g.actor_id == actor_id and not g.reported
                and g.grant_id not in held and now - g.leased_at >= NOT_HELD_AFTER_S]
        for g in sorted(gone, key=lambda g: -g.grant_id):
            g.actor_id = ""
            self.queue.appendleft(g.grant_id)
        self.counters["leases_not_held"] += len(gone)

    def progress(self, version: int, consumed_groups: int, session: int = 0,
                 resumed: IdSet | None = None) -> str:
        """The learner's position; returns 'accepted', 'restart' or the refusal code.
        `resumed`: the grant ids (trained or dropped) of the checkpoint the learner's session
        started from (none: it started from scratch)."""
        if version > self.updates_per_batch * (consumed_groups // self.prompts_per_step):
            return self._refuse("impossible_version")  # no learner gets there on that data
        if session in self.past_sessions:
            return self._refuse("stale_session")  # a late message of a settled session
        restart = self.learner_session is not None and session != self.learner_session
        old_session = self.learner_session
        if not restart:
            if consumed_groups < self.consumed_groups:
                return self._refuse("consumed_regression")  # no restart marker
            if version < self.learner_version:
                return self._refuse("version_regression")
        self.learner_session = session
        if restart:
            self.past_sessions = [*self.past_sessions[-(PAST_SESSIONS - 1):], old_session]
            self._settle_restart(resumed if resumed is not None else IdSet(),
                                 consumed_groups, version)
            self.learner_version = version
            self.consumed_groups = consumed_groups
            return "restart"
        self.learner_version = max(self.learner_version, version)
        self.consumed_groups = consumed_groups
        return "accepted"

    def _settle_restart(self, held: IdSet, consumed_groups: int, version: int) -> None:
        """A new learner session holds exactly `held`: every other id a learner received is
        gone with the old process. Completed grants are lost (they leave the pacing window,
        which would otherwise stay full for ever); outstanding ones forget their receipt and
        are re-issued once their lease runs out."""
        gone = self.received_ids.difference(held).difference(self.lost)
        lost = reissued = 0
        for gid in gone:
            if gid in self.completed:
                self.lost.add(gid)
                lost += 1
            else:
                g = self.grants.get(gid)
                if g is not None:
                    g.received = False
                self.received_ids.discard(gid)
                reissued += 1
        # the per-restart figures the audit's totals are the sum of (docs/GUARANTEES.md)
        log.info("learner restart: it resumes from %d consumed groups (version %d) holding "
                 "%d grant ids; %d received here, %d completed; %d lost, %d receipts "
                 "forgotten (re-issued)", consumed_groups, version, len(held),
                 len(self.received_ids) + reissued, self.completed_groups, lost, reissued)
        self.counters["groups_lost_to_learner_restart"] += lost
        self.counters["receipts_forgotten_at_restart"] += reissued
        self.counters["learner_restarts"] += 1
        self.issued_groups -= lost

    def _refuse(self, code: str) -> str:
        self.counters[f"progress_refused_{code}"] += 1
        return code

    def _forget_previous_launch(self) -> None:
        """A resumed run (`--resume`): every actor and learner of the previous launch is gone.
        Leased grants, and grants reported or received but not completed, are re-queued now
        rather than after a lease period (their groups went with the old processes).
        Completed groups that the checkpointed learner does not hold are settled, by id, at
        the resumed learner's first progress: its session is new (`_settle_restart`)."""
        for g in sorted(self.grants.values(), key=lambda g: -g.grant_id):
            if g.received:
                self.received_ids.discard(g.grant_id)
            g.reported = g.received = False
            if g.actor_id:
                g.actor_id = ""
                self.queue.appendleft(g.grant_id)

    def expire(self, now: float) -> int:
        """Re-queue (at the front) every grant whose lease ran out, whose group did not reach
        the learner within a lease period of its report, or held unreported by an actor silent
        for actor_silence_s (dead: a SIGKILLed actor's work would otherwise wait out its
        lease, 2 minutes by default, while its replacement idles); returns how many."""
        silent = {a for a, t in self.last_seen.items() if now - t > self.cfg.actor_silence_s}
        expired = [g for g in self.grants.values() if g.actor_id and (
            g.deadline <= now or (g.actor_id in silent and not g.reported))]
        for g in sorted(expired, key=lambda g: -g.grant_id):
            why = ("groups_not_received" if g.reported else "leases_expired") \
                if g.deadline <= now else "leases_of_silent_actors"
            self.counters[why] += 1
            g.actor_id, g.reported = "", False
            self.queue.appendleft(g.grant_id)
        for a in silent:  # forgotten: a dead actor's id never comes back (it holds the pid)
            if not any(g.actor_id == a for g in self.grants.values()):
                del self.last_seen[a]
        return len(expired)

    # ------------------------------------------------------------------ snapshots
    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": self.stats.state_dict(),
            "epoch": self.epoch, "cursor": self.cursor, "round": self.round,
            "next_grant_id": self.next_grant_id, "next_lease_id": self.next_lease_id,
            "grants": [asdict(g) for g in self.grants.values()],
            "queue": list(self.queue),
            "issued_groups": self.issued_groups, "completed_groups": self.completed_groups,
            "received_groups": self.received_groups,
            "formed": self.formed.ranges(), "completed": self.completed.ranges(),
            "received_ids": self.received_ids.ranges(), "lost": self.lost.ranges(),
            "learner_version": self.learner_version, "consumed_groups": self.consumed_groups,
            "learner_session": self.learner_session, "past_sessions": self.past_sessions,
            "counters": dict(self.counters),
            "num_problems": len(self.problems),
        }

    def load_state_dict(self, s: dict[str, Any], now: float) -> None:
        if s["num_problems"] != len(self.problems):
            raise ValueError(f"snapshot is of {s['num_problems']} problems, the task has "
                             f"{len(self.problems)}")
        self.stats.load_state_dict(s["stats"])
        for key in ("epoch", "cursor", "round", "next_grant_id", "next_lease_id",
                    "issued_groups", "completed_groups", "learner_version",
                    "consumed_groups"):
            setattr(self, key, int(s[key]))
        self.formed = IdSet.from_ranges(s["formed"])
        self.completed = IdSet.from_ranges(s["completed"])
        self.lost = IdSet.from_ranges(s.get("lost", []))
        if "received_ids" in s:
            self.received_ids = IdSet.from_ranges(s["received_ids"])
        else:  # a snapshot from before ids were kept: its restarts were settled by count
            # (issued_groups already net of them), so its completed grants count as settled;
            # only receipts of grants still outstanding are open
            self.received_ids = IdSet(sorted(g["grant_id"] for g in s["grants"]
                                             if g["received"]))
        self.learner_session = s["learner_session"]
        self.past_sessions = list(s.get("past_sessions", []))
        self.grants = {g["grant_id"]: Grant(**g) for g in s["grants"]}
        # Leases held before the restart stay valid for one more lease period: their actors
        # may still report (they reconnect), otherwise the grants are re-issued; an actor's
        # first heartbeat re-queues at once those it does not hold (`heartbeat`).
        for g in self.grants.values():
            if g.actor_id:
                g.deadline = now + self.cfg.lease_s
                g.leased_at = now - NOT_HELD_AFTER_S
        self.queue = deque(s["queue"])
        self.counters = Counter(s["counters"])
        self.counters["restored"] += 1
        if s.get("resume"):
            self._forget_previous_launch()
        # Grants and leases issued after the snapshot and before the crash are unknown here;
        # skip far past them so no id is ever reused (the learner de-duplicates by grant id,
        # and a stale report must never match a new lease). Their reports count as unknown.
        self.next_grant_id += RESTORE_ID_GAP
        self.next_lease_id += RESTORE_ID_GAP
