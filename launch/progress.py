"""Progress of a long loop: a live bar on a terminal, and in logs (output not a terminal) one
line per tenth of the loop instead of the thousands of carriage-return updates a bar writes."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.tty = sys.stderr.isatty()
        self.note = ""
        self._bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step")
        self._every = max(1, total // 10)
        self._t0 = time.monotonic()

    def __iter__(self) -> Iterator[int]:
        for i in range(self.total):
            yield i
            if self._bar is not None:
                self._bar.set_postfix_str(self.note, refresh=False)
                self._bar.update(1)
            elif self.enabled and ((i + 1) % self._every == 0 or i + 1 == self.total):
                print(f"[{self.desc}] {i + 1}/{self.total} steps, "
                      f"{time.monotonic() - self._t0:.0f}s {self.note}", file=sys.stderr,
                      flush=True)
        if self._bar is not None:
            self._bar.close()
