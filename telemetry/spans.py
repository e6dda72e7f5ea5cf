"""Timed spans of a process's phases, written to `RUN_DIR/trace/<name>-<pid>.jsonl`.

Guarantees:
- Recording a span costs the caller two monotonic clock reads and one deque append (about a
  microsecond, see tests/test_profiling.py); serialising and writing happen on a background
  thread every `flush_s` seconds and once more at exit, so a running run's trace is at most
  about a second behind.
- Spans are timed on the monotonic clock, so on every thread they are ordered and nested
  exactly as the code ran, whatever the wall clock does. Every flush also writes a
  (monotonic, wall) clock pair, from which the merger maps spans to wall-clock time.
- Until `open_trace` is called, `span`, `record` and `event` do nothing: components run
  unchanged outside a run directory (unit tests, benches).

File format, one JSON object per line, told apart by "kind":
  process  {name, role, host, pid, clock_id}        first line: who wrote the file
  clock    {mono_ns, wall_ns}                        a clock pair, at every flush
  span     {name, tid, thread, start_ns, end_ns[, args]}  monotonic ns
  any other kind (e.g. the allocator's clock_sample)  written as given
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import threading
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Any

now_ns = time.monotonic_ns


class _Span:
    """Context manager timing one span on the current thread."""

    __slots__ = ("_tracer", "name", "args", "start")

    def __init__(self, tracer: Tracer, name: str, args: dict[str, Any] | None) -> None:
        self._tracer, self.name, self.args = tracer, name, args

    def __enter__(self) -> _Span:
        self.start = now_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        end, ident, t = now_ns(), threading.get_ident(), self._tracer
        if ident not in t._threads:
            t._threads[ident] = threading.current_thread().name
        t._buf.append((self.name, ident, self.start, end, self.args))


class Tracer:
    """Buffers spans and events of one process and writes them from a background thread."""

    def __init__(self, path: Path, header: dict[str, Any], flush_s: float = 1.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = path.open("a")
        self._buf: deque = deque()  # append/popleft are atomic: no lock on the hot path
        self._lock = threading.Lock()  # one flush at a time (timer thread vs. close)
        self._threads: dict[int, str] = {}  # thread ident -> name, filled by each thread
        self._write({"kind": "process", **header})
        self._flush_locked()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(flush_s,), name="trace-flush",
                                        daemon=True)
        self._thread.start()

    def span(self, name: str, **args: Any) -> _Span:
        return _Span(self, name, args or None)

    def record(self, name: str, start_ns: int, end_ns: int,
               args: dict[str, Any] | None = None, track: str | None = None) -> None:
        """A span measured by the caller (monotonic ns, e.g. from `now_ns()`), on the current
        thread's track or on a named `track` of its own (for work that overlaps on one
        thread, e.g. several verifier jobs in flight: one track per job slot keeps each
        track's spans nested)."""
        if track is None:
            ident = threading.get_ident()
            if ident not in self._threads:  # named while the thread is surely alive
                self._threads[ident] = threading.current_thread().name
        else:
            ident = -(zlib.crc32(track.encode()) + 1)  # never a real thread ident
            self._threads.setdefault(ident, track)
        self._buf.append((name, ident, start_ns, end_ns, args))

    def event(self, kind: str, **fields: Any) -> None:
        self._buf.append({"kind": kind, **fields})

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._flush_locked()
            self._f.close()

    def _run(self, flush_s: float) -> None:
        while not self._stop.wait(flush_s):
            self.flush()

    def _write(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def _flush_locked(self) -> None:
        if self._f.closed:
            return
        self._write({"kind": "clock", "mono_ns": now_ns(), "wall_ns": time.time_ns()})
        for _ in range(len(self._buf)):
            item = self._buf.popleft()
            if isinstance(item, dict):
                self._write(item)
                continue
            name, ident, start, end, args = item
            rec = {"kind": "span", "name": name, "tid": ident,
                   "thread": self._threads[ident], "start_ns": start, "end_ns": end}
            if args:
                rec["args"] = args
            self._write(rec)
        self._f.flush()


_tracer: Tracer | None = None
_NULL = contextlib.nullcontext()


def open_trace(run_dir: Path, name: str, role: str, clock_id: str | None = None,
               flush_s: float = 1.0) -> Tracer:
    """Start recording this process's spans (once per process; later calls return it).

    `clock_id` is the sender name this process uses in its heartbeats to the allocator, whose
    receive-time samples align this process's wall clock with the allocator's across nodes.
    """
    global _tracer
    if _tracer is None:
        pid = os.getpid()
        _tracer = Tracer(Path(run_dir) / "trace" / f"{name}-{pid}.jsonl",
                         {"name": name, "role": role, "host": socket.gethostname(), "pid": pid,
                          "clock_id": clock_id}, flush_s)
        atexit.register(close_trace)
    return _tracer


def close_trace() -> None:
    global _tracer
    if _tracer is not None:
        _tracer.close()
        _tracer = None


def span(name: str, **args: Any) -> contextlib.AbstractContextManager:
    """`with span("generate"): ...` records the block as a span of the current thread."""
    t = _tracer
    return _NULL if t is None else t.span(name, **args)


def record(name: str, start_ns: int, end_ns: int, track: str | None = None,
           **args: Any) -> None:
    t = _tracer
    if t is not None:
        t.record(name, start_ns, end_ns, args or None, track)


def event(kind: str, **fields: Any) -> None:
    t = _tracer
    if t is not None:
        t.event(kind, **fields)
