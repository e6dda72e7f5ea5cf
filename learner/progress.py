"""The learner's reports to the allocator: its position, its session, its receipts.

Guarantees:
- `session` is drawn at random once per learner process: the allocator accepts a smaller
  consumed count only with a new session (a restart), never from the same one.
- Before receipts leave, the grant record (learner/grant_record.py) is written with every id
  still pending, so any grant the allocator counts as received is in a record on disk.
- Sends never block (the allocator may be away): receipts that could not be sent are kept
  for the next report; totals are re-sent every time anyway.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import zmq

from learner.intake import Intake
from protocol.messages import LIST_LEN, Heartbeat, LearnerProgress
from protocol.sockets import send


class ProgressReporter:
    def __init__(self, sock: zmq.Socket, intake: Intake, run_dir: Path, sender: str) -> None:
        self.sock, self.intake, self.run_dir, self.sender = sock, intake, run_dir, sender
        self.session = secrets.randbits(62) + 1

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
            received=receipts[:LIST_LEN])
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
