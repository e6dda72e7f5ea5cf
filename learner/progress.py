"""The learner's reports to the allocator: its position, its session, its receipts.

Guarantees:
- `session` is drawn at random once per learner process: the allocator accepts a smaller
  consumed count only with a new session (a restart), never from the same one.
- Before receipts leave, the grant record (learner/grant_record.py) is written with every id
  still pending, so any grant the allocator counts as received is in a record on disk.
- Every report carries the grant ids of the checkpoint this session resumed from
  (`resumed`), so an allocator that sees a new session (a restart, or its own restore from a
  snapshot older than the restart) settles the old session's receipts by id.
- A new session first moves the previous session's last record to
  RUN_DIR/learner_grants.d/<session>.json: the audit checks that every group the allocator
  counts lost with a restart was held by a learner that died (launch/audit.py).
- Sends never block (the allocator may be away): receipts that could not be sent are kept
  for the next report; totals are re-sent every time anyway.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import zmq

from learner.grant_record import ARCHIVE_DIR, RECORD_FILE
from learner.intake import Intake
from protocol.messages import LIST_LEN, Heartbeat, LearnerProgress
from protocol.sockets import send


class ProgressReporter:
    def __init__(self, sock: zmq.Socket, intake: Intake, run_dir: Path, sender: str) -> None:
        self.sock, self.intake, self.run_dir, self.sender = sock, intake, run_dir, sender
        self.session = secrets.randbits(62) + 1
        self.resumed = [x for r in intake.record.consumed().ranges() for x in r]
        archive_previous_record(Path(run_dir))
        # at once: a session killed before its first report must still leave a record (the
        # audit would otherwise read the checkpoint, with no pending ids)
        intake.record.write(self.run_dir, pending=intake.pending(), session=self.session,
                            counters=dict(intake.counters))

    def send(self, version: int, step: int) -> None:
        intake = self.intake
        receipts = intake.take_receipts()
        intake.record.write(self.run_dir, pending=intake.pending(), step=step, version=version,
                            session=self.session, counters=dict(intake.counters))
        c = intake.counters
        progress = LearnerProgress(
            version=version, consumed_groups=c.get("consumed", 0),
            consumed_samples=c.get("consumed_samples", 0),
            dropped_stale=c.get("dropped_stale", 0), session=self.session,
            received=receipts[:LIST_LEN], resumed=self.resumed,
            refused=intake.take_refusals())
        beat = Heartbeat(sender=self.sender, role="learner", sent_at=time.time(),
                         policy_version=version, in_flight=[])
        try:
            send(self.sock, progress, zmq.NOBLOCK)
            intake.give_back_receipts(receipts[LIST_LEN:])
        except zmq.Again:
            intake.give_back_receipts(receipts)
        try:
            send(self.sock, beat, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the next report carries the same totals


def archive_previous_record(run_dir: Path) -> Path | None:
    """Move a previous learner session's last record (RUN_DIR/learner_grants.json) into
    RUN_DIR/learner_grants.d/, named by its session; returns the new path."""
    path = run_dir / RECORD_FILE
    try:
        session = json.loads(path.read_text()).get("session", 0)
    except FileNotFoundError:
        return None
    except ValueError:  # torn by hand (writes are atomic): keep it, under another name
        session = f"unreadable-{time.time_ns()}"
    (run_dir / ARCHIVE_DIR).mkdir(exist_ok=True)
    dest = run_dir / ARCHIVE_DIR / f"{session}.json"
    path.replace(dest)
    return dest
