"""Scoring completions: cheap checks in the caller, the others in worker processes.

Guarantees:
- Scoring never raises for a checker's sake: an unknown verifier name, a checker that
  raises, a worker that dies and a check over its time limit all score 0 and are counted
  (`unknown`, `errors`, `crashes`, `timeouts` in `Verifier.counters`).
- A check running longer than `timeout_s` is killed with its process (SIGKILL) and a fresh
  worker takes its place: nothing keeps running after its deadline. The limit counts from
  the moment a started worker receives the answer; a worker's start-up (importing and
  warming math-verify) is not charged to any answer.
- Checkers outside `verifiers.CHEAP` (math-verify: sympy, unbounded time, GIL-bound) never
  run in the caller's process. Workers are spawned, never forked (the caller may hold an
  engine's threads or CUDA), on the first answer that needs one, and die with the caller.
- Jobs complete independently and whole: `collect` returns a job only once every answer of
  it is scored, with the scores in the order they were submitted.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from tasks.verifiers import CHEAP, CHECKERS, DEFAULT_EXTRACTION, AnswerExtraction, check_math

Item = tuple[str, str, str]  # (verifier name, completion, reference answer)


def _serve(conn: Connection, checkers: dict[str, Callable[[str, str], bool]]) -> None:
    """A worker: warm up, say "ready", then answer (name, completion, answer) items with
    (correct, error) until the pipe closes."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the caller
    except OSError:
        pass
    # We disable math-verify's signal timeouts on purpose (the caller kills us instead).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    check_math("\\boxed{1}", "1")  # imports and warms math-verify outside any time limit
    conn.send("ready")
    while True:
        try:
            name, completion, answer = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((bool(checkers[name](completion, answer)), None))
        except Exception as e:  # noqa: BLE001 - reported to the caller, who scores 0
            conn.send((False, f"{type(e).__name__}: {e}"))


@dataclass(slots=True)
class _Worker:
    proc: Any  # multiprocessing.Process (spawn context)
    conn: Connection
    ready: bool = False
    job: Hashable | None = None  # key of the job whose answer is being checked
    index: int = -1  # that answer's index in its job
    deadline: float = float("inf")


@dataclass(slots=True)
class _Job:
    scores: list[float]
    left: int  # answers still being checked in the pool


class Verifier:
    """Scores (verifier name, completion, answer) items; see the module docstring.

    `score`/`score_many` block until their items are scored; `submit`/`collect` let a caller
    keep several jobs in flight (an actor's scoring thread). Not thread-safe: one caller.
    """

    def __init__(self, timeout_s: float, *, workers: int = 1,
                 answer_extraction: AnswerExtraction = DEFAULT_EXTRACTION) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.timeout_s = timeout_s
        self.workers = workers
        # The registry as it is now (tests add checkers to it), shipped to every worker.
        self.checkers = {**CHECKERS,
                         "math": functools.partial(check_math, extraction=answer_extraction)}
        self.counters: Counter[str] = Counter()
        self._pool: list[_Worker] = []
        self._queue: deque[tuple[Hashable, int, Item]] = deque()
        self._jobs: dict[Hashable, _Job] = {}
        self._done: list[tuple[Hashable, list[float]]] = []
        self._ctx = multiprocessing.get_context("spawn")

    # ---------------------------------------------------------------- blocking API
    def score(self, name: str, completion: str, answer: str) -> float:
        return self.score_many([(name, completion, answer)])[0]

    def score_many(self, items: Sequence[Item]) -> list[float]:
        """Scores of `items`, in order (the pool checks them in parallel)."""
        if self._jobs or self._done:
            raise RuntimeError("score_many while submitted jobs are in flight")
        key = object()
        self.submit(key, items)
        while True:
            for k, scores in self.collect(None):
                if k is key:
                    return scores

    # ---------------------------------------------------------------- job API
    def submit(self, key: Hashable, items: Sequence[Item]) -> None:
        """Start scoring `items` as one job; `collect` returns it once all are scored."""
        if key in self._jobs:
            raise ValueError(f"job {key!r} is already in flight")
        job = _Job([0.0] * len(items), 0)
        for i, (name, completion, answer) in enumerate(items):
            check = self.checkers.get(name)
            if check is None:
                self.counters["unknown"] += 1
            elif name in CHEAP:
                try:
                    job.scores[i] = 1.0 if check(completion, answer) else 0.0
                except Exception:  # noqa: BLE001 - a checker failure scores 0
                    self.counters["errors"] += 1
            else:
                self._queue.append((key, i, (name, completion, answer)))
                job.left += 1
        if job.left:
            self._jobs[key] = job
        else:
            self._done.append((key, job.scores))

    def in_flight(self) -> int:
        return len(self._jobs)

    def collect(self, timeout: float | None) -> list[tuple[Hashable, list[float]]]:
        """Jobs completed since the last call (key, scores), waiting up to `timeout` seconds
        (None: until at least one completes) when none has yet."""
        wait_until = None if timeout is None else time.monotonic() + timeout
        while not self._done and self._jobs:
            self._dispatch()
            deadlines = [w.deadline for w in self._pool if w.job is not None]
            if wait_until is not None:
                deadlines.append(wait_until)
            limit = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            busy = [w.conn for w in self._pool if not w.ready or w.job is not None]
            for conn in wait(busy, limit):  # busy is never empty while jobs are in flight
                self._receive(next(w for w in self._pool if w.conn is conn))
            now = time.monotonic()
            self._expire(now)
            if wait_until is not None and now >= wait_until:
                break
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        for w in self._pool:
            self._stop(w)
        self._pool = []

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- the pool
    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self.checkers),
                                 name="verifier", daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _stop(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        w.conn.close()

    def _replace(self, w: _Worker) -> None:
        self._stop(w)
        self._pool[self._pool.index(w)] = self._start()

    def _dispatch(self) -> None:
        while len(self._pool) < self.workers:
            self._pool.append(self._start())
        for w in self._pool:
            if w.ready and w.job is None and self._queue:
                key, i, item = self._queue.popleft()
                w.job, w.index, w.deadline = key, i, time.monotonic() + self.timeout_s
                try:
                    w.conn.send(item)
                except OSError:  # died idle: the answer goes to a fresh worker
                    self._queue.appendleft((key, i, item))
                    self._replace(w)

    def _finish(self, w: _Worker, score: float) -> None:
        job = self._jobs[w.job]
        job.scores[w.index] = score
        job.left -= 1
        if job.left == 0:
            self._done.append((w.job, self._jobs.pop(w.job).scores))
        w.job, w.index, w.deadline = None, -1, float("inf")

    def _receive(self, w: _Worker) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            if not w.ready:
                w.proc.join(5)
                raise RuntimeError(f"verifier worker exited with code {w.proc.exitcode} "
                                   "before it was ready (see its stderr)") from None
            if w.job is not None:
                self.counters["crashes"] += 1
                self._finish(w, 0.0)
            self._replace(w)
            return
        if msg == "ready":
            w.ready = True
            return
        correct, error = msg
        if error is not None:
            self.counters["errors"] += 1
        self._finish(w, 1.0 if correct else 0.0)

    def _expire(self, now: float) -> None:
        for w in list(self._pool):
            if w.job is not None and w.deadline <= now:
                self.counters["timeouts"] += 1
                self._finish(w, 0.0)
                self._replace(w)  # kills the process running the stuck check
