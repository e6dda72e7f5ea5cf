"""Per-process trace files (telemetry/spans.py) -> one Chrome trace-event / Perfetto JSON.

One track (pid) per process file, named "<process> (<host>:<pid>)", threads as tids; times
in microseconds from the earliest span, on the allocator's wall clock.

Clock alignment:
1. In a process, spans are monotonic ns; wall = monotonic + the median of (wall - monotonic)
   over the clock pairs it wrote (one per flush).
2. A process on the allocator's host shares its wall clock: offset 0.
3. A process elsewhere that heartbeats the allocator (actors, learner rank 0) gets
   offset = min over the allocator's samples of (receive time - sent_at). Each sample is the
   one-way delay plus the offset between the clocks, so the minimum is the offset plus the
   smallest delay: the NTP assumption that the fastest heartbeat met no queueing. The error
   is that smallest delay (sub-millisecond on a LAN) and always shows the process late.
4. Any other process (no allocator trace, learner ranks > 0 on other nodes) is taken as is:
   its wall clock is assumed synchronised (NTP/PTP).
A file cut short (a running run, a killed process) is read up to its last complete line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLE_ORDER = {"allocator": 0, "learner": 1, "actor": 2}


@dataclass
class ProcessTrace:
    path: Path
    name: str
    role: str
    host: str
    pid: int
    clock_id: str | None
    spans: list[dict[str, Any]] = field(default_factory=list)
    clocks: list[tuple[int, int]] = field(default_factory=list)  # (monotonic, wall) ns
    samples: dict[str, list[int]] = field(default_factory=dict)  # sender -> delta ns
    offset_ns: int = 0  # monotonic ns + offset_ns = allocator wall-clock ns
    cross_offset_ns: int = 0  # this process's wall clock + cross_offset_ns = allocator's
    alignment: str = "unaligned"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.host}:{self.pid})"

    def sort_key(self) -> tuple:
        index = re.findall(r"\d+", self.name)
        return (ROLE_ORDER.get(self.role, 3), int(index[-1]) if index else -1, self.name,
                self.host, self.pid)


@dataclass(slots=True)
class Span:
    process: str  # the process name (e.g. actor0), shared by restarts of the same process
    label: str  # the track: name (host:pid)
    role: str
    thread: str
    name: str
    start_ns: int  # allocator wall clock
    end_ns: int
    args: dict[str, Any]

    @property
    def dur_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The complete JSON lines of a file that may still be being written."""
    with path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                break


def step_wall(r: dict[str, Any]) -> float:
    """A learner step's wall time from its metrics record; runs from before step_wall_s
    existed fall back to the sum of its phases."""
    return r.get("step_wall_s") or sum(v for k, v in r.items() if k.startswith("time/"))


def read_process(path: Path) -> ProcessTrace | None:
    records = read_jsonl(path)
    head = next(records, None)
    if head is None or head.get("kind") != "process":
        return None
    p = ProcessTrace(path, head["name"], head["role"], head["host"], head["pid"],
                     head.get("clock_id"))
    for r in records:
        kind = r.get("kind")
        if kind == "span":
            p.spans.append(r)
        elif kind == "clock":
            p.clocks.append((r["mono_ns"], r["wall_ns"]))
        elif kind == "clock_sample":
            p.samples.setdefault(r["sender"], []).append(r["delta_ns"])
    return p


def align(procs: list[ProcessTrace]) -> None:
    """Set every process's offset_ns and alignment (see the module docstring)."""
    alloc = next((p for p in procs if p.role == "allocator"), None)
    samples: dict[str, list[int]] = {}
    for p in procs:
        if p.role == "allocator":
            for sender, deltas in p.samples.items():
                samples.setdefault(sender, []).extend(deltas)
    for p in procs:
        diffs = sorted(w - m for m, w in p.clocks)
        mono_to_wall = diffs[len(diffs) // 2] if diffs else 0
        if alloc is None:
            cross, how = 0, "no allocator trace: wall clock taken as is"
        elif p.host == alloc.host:
            cross, how = 0, "same host as the allocator"
        elif p.clock_id in samples:
            cross = min(samples[p.clock_id])
            how = f"min over {len(samples[p.clock_id])} heartbeat samples"
        else:
            cross, how = 0, "no clock samples: wall clock assumed synchronised"
        p.offset_ns, p.cross_offset_ns, p.alignment = mono_to_wall + cross, cross, how


def read_traces(run_dir: Path) -> list[ProcessTrace]:
    """Every process trace of the run, aligned, in track order (allocator, learners, actors)."""
    procs = [p for f in sorted((Path(run_dir) / "trace").glob("*.jsonl"))
             if (p := read_process(f)) is not None]
    procs.sort(key=ProcessTrace.sort_key)
    align(procs)
    return procs


def aligned_spans(procs: list[ProcessTrace]) -> list[Span]:
    out = []
    for p in procs:
        for s in p.spans:
            out.append(Span(p.name, p.label, p.role, s["thread"], s["name"],
                            s["start_ns"] + p.offset_ns, s["end_ns"] + p.offset_ns,
                            s.get("args", {})))
    return out


def chrome_trace(procs: list[ProcessTrace]) -> dict[str, Any]:
    """The Chrome trace-event JSON object ("X" complete events, "M" metadata)."""
    starts = [s["start_ns"] + p.offset_ns for p in procs for s in p.spans]
    origin = min(starts) if starts else 0
    events: list[dict[str, Any]] = []
    for pid, p in enumerate(procs, start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": p.label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
        tids: dict[int, int] = {}
        for s in p.spans:
            tid = tids.get(s["tid"])
            if tid is None:
                tid = tids[s["tid"]] = len(tids) + 1
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                               "args": {"name": s["thread"]}})
            ev = {"ph": "X", "name": s["name"], "cat": p.role, "pid": pid, "tid": tid,
                  "ts": (s["start_ns"] + p.offset_ns - origin) / 1e3,
                  "dur": (s["end_ns"] - s["start_ns"]) / 1e3}
            if "args" in s:
                ev["args"] = s["args"]
            events.append(ev)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"wall_origin_ns": origin, "clock": "allocator wall clock",
                          "alignment": {p.label: {"offset_to_allocator_ms":
                                                  p.cross_offset_ns / 1e6,
                                                  "method": p.alignment} for p in procs}}}


def write_trace(run_dir: Path, procs: list[ProcessTrace]) -> Path:
    path = Path(run_dir) / "trace.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(chrome_trace(procs), separators=(",", ":")))
    tmp.replace(path)
    return path
