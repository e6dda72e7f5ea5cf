"""Rounds, leases and exactly-once accounting of work grants (no sockets, no clocks).

Invariants:
- Every grant is completed at most once: the first StatsReport carrying the grant's current
  lease completes it; a report for an expired lease ("late") or for a completed grant
  ("duplicate") is ignored and counted, and never touches the statistics.
- A grant whose lease expires goes back to the front of the queue with a new lease id, so
  the work of a dead or stopped actor is re-issued, never lost.
- Pacing: groups issued but not yet consumed by the learner never exceed
  max(max_staleness // U, 1) x prompts_per_step, where U = updates_per_batch is the number
  of optimizer updates (policy versions) one batch of prompts_per_step groups can take; so in
  steady state no group arrives at the learner more than max_staleness versions old.
- Budgets of a round are computed from the statistics at the moment the round is formed.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from allocator.budget import dynamo_budgets
from allocator.config import AllocatorConfig
from allocator.stats import ProblemStats
from protocol.messages import NoWork, StatsReport, WorkGrant
from tasks.problems import Problem

RESTORE_ID_GAP = 1 << 24  # more grants than any snapshot period issues


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
    done: bool = False


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
        self.learner_version = 0
        self.consumed_groups = 0
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
            self.queue.append(g.grant_id)
        self.round += 1
        self.counters["rounds"] += 1

    # ------------------------------------------------------------------ messages
    def outstanding(self) -> int:
        """Groups issued that the learner has not consumed yet."""
        return self.issued_groups - self.consumed_groups

    def fair_share(self, actor_id: str, now: float) -> int:
        """Most grants one actor may hold: the pacing window split over the live actors, so
        one greedy actor cannot take all the work while another idles (and a stopped one
        holds little that must wait for its lease to expire)."""
        self.last_seen[actor_id] = now
        live = sum(1 for t in self.last_seen.values() if now - t <= self.cfg.lease_s)
        held = sum(1 for g in self.grants.values() if g.actor_id == actor_id)
        return max(1, -(-self.window // live)) - held

    def request(self, actor_id: str, want: int, now: float) -> list[WorkGrant] | NoWork:
        out: list[WorkGrant] = []
        want = min(want, self.fair_share(actor_id, now))
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
            p = self.problems[g.problem]
            out.append(WorkGrant(grant_id=gid, lease_id=g.lease_id, problem_id=p.id,
                                 prompt=p.prompt, answer=p.answer, verifier=self.verifier,
                                 n=g.n, lease_s=self.cfg.lease_s,
                                 issued_version=self.learner_version))
        if out:
            self.counters["grants_issued"] += len(out)
            return out
        self.counters["requests_paced"] += 1
        return NoWork(retry_after_s=0.05,
                      reason=f"pacing: {self.outstanding()} groups outstanding, window "
                             f"{self.window} (learner version {self.learner_version})")

    def report(self, r: StatsReport) -> str:
        """Apply a stats report once; returns 'accepted', 'late', 'duplicate', 'mismatch' or
        'unknown'."""
        g = self.grants.get(r.grant_id)
        if g is None:
            status = "duplicate" if r.grant_id < self.next_grant_id else "unknown"
        elif r.lease_id != g.lease_id or not g.actor_id:  # no actor_id: expired, re-queued
            status = "late"
        elif self.problems[g.problem].id != r.problem_id or r.n != g.n:
            status = "mismatch"
        else:
            status = "accepted"
            self.stats.update_one(g.problem, r.k, r.n)
            del self.grants[g.grant_id]
            self.completed_groups += 1
        self.counters[f"report_{status}"] += 1
        return status

    def heartbeat(self, actor_id: str, in_flight: list[int], now: float) -> None:
        """Renew the leases an alive actor still holds."""
        self.last_seen[actor_id] = now
        for gid in in_flight:
            g = self.grants.get(gid)
            if g is not None and g.actor_id == actor_id and g.deadline > now:
                g.deadline = now + self.cfg.lease_s

    def progress(self, version: int, consumed_groups: int) -> None:
        if consumed_groups < self.consumed_groups:
            # The learner restarted from a checkpoint. Groups it received after that
            # checkpoint are gone with it: stop counting them as outstanding (or the pacing
            # window would stay full forever) and count them as lost.
            in_flight = sum(1 for g in self.grants.values() if g.lease_id)
            completed = self.issued_groups - in_flight
            self.counters["groups_lost_to_learner_restart"] += max(0, completed - consumed_groups)
            self.counters["learner_restarts"] += 1
            self.issued_groups = consumed_groups + in_flight
            self.learner_version = version
            self.consumed_groups = consumed_groups
            return
        self.learner_version = max(self.learner_version, version)
        self.consumed_groups = consumed_groups

    def _forget_previous_launch(self) -> None:
        """A resumed run (`--resume`): every actor and learner of the previous launch is gone.
        Leased grants are re-queued now rather than after a lease period. Groups issued but
        not consumed by the checkpointed learner were either leased (they stay outstanding,
        to be re-issued) or completed and lost with the old learner. The lost ones must stop
        counting as outstanding, or the pacing window could stay full for ever; they are
        counted instead. The learner resumes with exactly the snapshot's consumed count, so
        progress() sees no regression and cannot do this itself."""
        for g in sorted(self.grants.values(), key=lambda g: -g.grant_id):
            if g.actor_id:
                g.actor_id = ""
                self.queue.appendleft(g.grant_id)
        in_flight = sum(1 for g in self.grants.values() if g.lease_id)
        lost = self.issued_groups - in_flight - self.consumed_groups
        self.counters["groups_lost_to_resume"] += max(0, lost)
        self.issued_groups = self.consumed_groups + in_flight

    def expire(self, now: float) -> int:
        """Re-queue (at the front) every grant whose lease ran out; returns how many."""
        expired = [g for g in self.grants.values() if g.actor_id and g.deadline <= now]
        for g in sorted(expired, key=lambda g: -g.grant_id):
            g.actor_id = ""
            self.queue.appendleft(g.grant_id)
        self.counters["leases_expired"] += len(expired)
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
            "learner_version": self.learner_version, "consumed_groups": self.consumed_groups,
            "counters": dict(self.counters),
            "num_problems": len(self.problems),
        }

    def load_state_dict(self, s: dict[str, Any], now: float) -> None:
        if s["num_problems"] != len(self.problems):
            raise ValueError(f"snapshot is of {s['num_problems']} problems, the task has "
                             f"{len(self.problems)}")
        self.stats.load_state_dict(s["stats"])
        for key in ("epoch", "cursor", "round", "next_grant_id", "next_lease_id",
                    "issued_groups", "completed_groups", "learner_version", "consumed_groups"):
            setattr(self, key, int(s[key]))
        self.grants = {g["grant_id"]: Grant(**g) for g in s["grants"]}
        # Leases held before the restart stay valid for one more lease period: their actors
        # may still report (they reconnect), otherwise the grants are re-issued.
        for g in self.grants.values():
            if g.actor_id:
                g.deadline = now + self.cfg.lease_s
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
