"""`dynamo-rl audit RUN_DIR`: the run's exactly-once guarantees, checked from independent records.

Joins the learner's grant record (RUN_DIR/learner_grants.json, written by the learner before
any receipt leaves it; else the latest checkpoint's), the allocator's ledger
(RUN_DIR/allocator_state.pkl: every grant id formed, every grant completed, i.e. reported by
an actor and received by the learner) and the drop counters of both. Violations:

- trained twice: a grant id the learner added to its record twice (the record counts every
  repeat itself, whatever the intake's de-duplication did), or a stored record whose ranges
  overlap;
- never issued: a grant id trained or dropped that the allocator never formed;
- lost: a completed grant neither trained, dropped with a reason nor pending at the learner,
  and not among the grants the allocator recorded lost with a restarted learner (`lost`, by
  id, settled against the ids the restarted learner's checkpoint holds);
- lost unheld: a grant the allocator recorded lost that no finished learner session held
  (RUN_DIR/learner_grants.d/<session>.json: each session's last record, moved aside by the
  next one), i.e. a loss the allocator invented, which would hide a real one.

Prints the totals and each violation; the exit status is 1 if there is any, 2 if a record is
missing. Meant for a stopped run (learner first, allocator last, as the launchers stop them);
on a live run the two records are read at slightly different moments.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

from learner.grant_record import ARCHIVE_DIR, RECORD_FILE, GrantRecord
from protocol.idset import IdSet

MAX_LISTED = 20  # ids shown per violation


def learner_record(run_dir: Path) -> dict[str, Any]:
    live = run_dir / RECORD_FILE
    if live.is_file():
        return json.loads(live.read_text())
    latest = run_dir / "checkpoints" / "LATEST"
    if latest.is_file():
        state = run_dir / "checkpoints" / latest.read_text().strip() / "learner_state.json"
        d = json.loads(state.read_text())
        return {**d["grants"], "pending": [], "counters": d["counters"]}
    raise FileNotFoundError(f"{run_dir} holds no {RECORD_FILE} and no checkpoint")


def allocator_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "allocator_state.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with path.open("rb") as f:
        return pickle.load(f)


def finished_sessions(run_dir: Path) -> IdSet:
    """Every grant id a finished learner session held at its last record (trained, dropped
    or pending)."""
    out = IdSet()
    for path in sorted((run_dir / ARCHIVE_DIR).glob("*.json")):
        try:
            d = json.loads(path.read_text())
            rec = GrantRecord.from_dict(d)
            pending = IdSet.from_ranges(d["pending"])
        except (ValueError, KeyError) as e:  # kept aside torn, or edited
            raise ValueError(f"{path.name}: {e}") from e
        out.update(rec.consumed().union(pending))
    return out


def _ids(s: IdSet) -> str:
    shown = [str(i) for _, i in zip(range(MAX_LISTED), s, strict=False)]
    return ", ".join(shown) + (" ..." if len(s) > MAX_LISTED else "")


def audit(run_dir: Path) -> dict[str, Any]:
    """{"totals": {...}, "violations": [str, ...]} of the run in run_dir."""
    run_dir = Path(run_dir)
    lrec, alloc = learner_record(run_dir), allocator_state(run_dir)
    violations: list[str] = []
    try:
        rec = GrantRecord.from_dict(lrec)
        pending = IdSet.from_ranges(lrec["pending"])
    except ValueError as e:  # overlapping ranges: an id stored twice
        return {"totals": {}, "violations": [f"learner record malformed: {e}"]}
    formed = IdSet.from_ranges(alloc["formed"])
    completed = IdSet.from_ranges(alloc["completed"])
    trained, dropped = rec.trained, rec.dropped
    both = [f"{r}: {_ids(trained.intersection(d))}" for r, d in dropped.items()
            if len(trained.intersection(d))]
    if rec.repeat_count or both:
        violations.append(f"trained twice: {rec.repeat_count} repeated grant ids "
                          f"({', '.join(map(str, rec.repeats[:MAX_LISTED]))})"
                          + (f"; trained and dropped: {'; '.join(both)}" if both else ""))
    consumed = rec.consumed()
    never = consumed.difference(formed)
    if never:
        violations.append(f"never issued: {len(never)} grant ids trained or dropped that "
                          f"the allocator never formed ({_ids(never)})")
    counters = alloc["counters"]
    lost = IdSet.from_ranges(alloc.get("lost", []))
    missing = completed.difference(consumed.union(pending))
    unaccounted = missing.difference(lost)
    if unaccounted:
        violations.append(f"lost: {len(unaccounted)} completed grants neither trained, "
                          f"dropped nor pending at the learner, nor recorded lost with a "
                          f"learner restart ({_ids(unaccounted)})")
    try:
        held = finished_sessions(run_dir)
    except ValueError as e:
        violations.append(f"learner record malformed: {ARCHIVE_DIR}/{e}")
        held = IdSet()
    unheld = lost.difference(held)
    if unheld:
        violations.append(f"lost unheld: {len(unheld)} grants recorded lost with a learner "
                          f"restart that no finished learner session held ({_ids(unheld)})")
    lc = lrec.get("counters", {})
    totals = {
        "formed": len(formed), "issued": alloc["issued_groups"],
        "completed": len(completed), "trained": len(trained),
        "dropped": {r: len(d) for r, d in sorted(dropped.items())},
        "pending_at_learner": len(pending),
        "completed_not_consumed": len(missing), "recorded_lost": len(lost),
        "recorded_lost_but_trained": len(lost.intersection(trained)),
        "trained_not_completed": len(trained.difference(completed)),
        "in_flight_at_allocator": len(alloc["grants"]) - len(alloc["queue"]),
        "learner_counters": {k: v for k, v in sorted(lc.items())
                             if k.startswith(("dropped_", "refused_", "rejected_"))},
        "allocator_counters": {k: v for k, v in sorted(counters.items())
                               if k.startswith(("report_", "refused_", "rejected_",
                                                "progress_refused_", "receipt_", "groups_",
                                                "leases_", "learner_restarts"))},
    }
    return {"totals": totals, "violations": violations}


def main(run_dir: str) -> int:
    try:
        out = audit(Path(run_dir))
    except FileNotFoundError as e:
        print(f"dynamo-rl audit: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out["totals"], indent=1))
    for v in out["violations"]:
        print(f"VIOLATION {v}")
    print("audit: " + ("FAILED" if out["violations"] else "ok"))
    return 1 if out["violations"] else 0
