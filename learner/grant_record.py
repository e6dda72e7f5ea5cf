"""The learner's record of what it did with each group, by grant id: the learner's side of
`dynamo-rl audit` (launch/audit.py).

- `trained`: grant ids of the groups passed to a completed `Trainer.step`, added after the
  step, so a checkpoint's record holds exactly the groups its weights were trained on.
- `dropped[reason]`: grant ids consumed without training (reason "stale").
- `repeats`: ids added a second time (to either). The intake's de-duplication should make
  this impossible; the record does not rely on it, it counts every repeat itself.
- `pending` (written, not kept): ids received and not yet consumed when the record was
  written; the learner writes its record before it sends the receipts of those ids to the
  allocator, so every grant the allocator saw received is in a record on disk.

Memory: `IdSet` ranges, so the record grows with the holes in the id sequence (dropped, lost
or in-flight groups), not with the number of groups; at most `MAX_LISTED_REPEATS` repeated ids
are listed (all are counted). Written atomically (temporary file, rename) as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from protocol.idset import IdSet

RECORD_FILE = "learner_grants.json"
ARCHIVE_DIR = "learner_grants.d"  # each finished session's last record, by session
MAX_LISTED_REPEATS = 1000


class GrantRecord:
    def __init__(self) -> None:
        self.trained = IdSet()
        self.dropped: dict[str, IdSet] = {}
        self.repeat_count = 0
        self.repeats: list[int] = []

    def seen(self, gid: int) -> bool:
        return gid in self.trained or any(gid in d for d in self.dropped.values())

    def _add(self, target: IdSet, gid: int) -> None:
        if self.seen(gid):
            self.repeat_count += 1
            if len(self.repeats) < MAX_LISTED_REPEATS:
                self.repeats.append(gid)
            return
        target.add(gid)

    def add_trained(self, ids: Iterable[int]) -> None:
        for gid in ids:
            self._add(self.trained, gid)

    def add_dropped(self, reason: str, gid: int) -> None:
        self._add(self.dropped.setdefault(reason, IdSet()), gid)

    def consumed(self) -> IdSet:
        """Every id trained or dropped."""
        return self.trained.union(*self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"trained": self.trained.ranges(),
                "dropped": {k: v.ranges() for k, v in sorted(self.dropped.items())},
                "repeat_count": self.repeat_count, "repeats": list(self.repeats)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GrantRecord:
        """Raises ValueError on a malformed record (overlapping ranges included)."""
        out = cls()
        out.trained = IdSet.from_ranges(d["trained"])
        out.dropped = {k: IdSet.from_ranges(v) for k, v in d["dropped"].items()}
        out.repeat_count = int(d["repeat_count"])
        out.repeats = [int(x) for x in d["repeats"]]
        return out

    def write(self, run_dir: Path, *, pending: Iterable[int], **extra: Any) -> None:
        """RUN_DIR/learner_grants.json: the record, the pending ids and `extra` (counters,
        step, version, session), replaced atomically."""
        path = Path(run_dir) / RECORD_FILE
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**self.to_dict(), "pending": IdSet(pending).ranges(),
                                   **extra}))
        tmp.replace(path)
