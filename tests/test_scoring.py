"""The verifier pool (tasks.scoring): math checks in worker processes, a stuck check killed
with its process and counted, crashes and errors scored 0, jobs completing independently.

The test checkers below are registered in `tasks.verifiers.CHECKERS` (monkeypatched) and reach
the spawned workers by reference (this module is importable there: pytest put its folder on
sys.path, which spawned children inherit).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks import verifiers
from tasks.scoring import Verifier


def sleepy(completion: str, answer: str) -> bool:
    """Writes its pid to the file named by `completion`, sleeps `answer` seconds, says yes."""
    Path(completion).write_text(str(os.getpid()))
    time.sleep(float(answer))
    return True


def crashing(completion: str, answer: str) -> bool:
    os._exit(3)


def raising(completion: str, answer: str) -> bool:
    raise ArithmeticError("sympy gave up")


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch):
    for fn in (sleepy, crashing, raising):
        monkeypatch.setitem(verifiers.CHECKERS, fn.__name__, fn)
    with Verifier(timeout_s=1.0, workers=2) as v:
        yield v


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_math_is_checked_by_value_in_worker_processes(pool: Verifier) -> None:
    items = [("math", "so \\boxed{\\frac{3}{4}}", "0.75"), ("math", "work\nAnswer: 0.75", "3/4"),
             ("math", "\\boxed{2}", "3"), ("reversed-integer", "21", "12"),
             ("math", "no answer stated", "1")]
    assert pool.score_many(items) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert pool.counters == {}
    workers = [w.proc.pid for w in pool._pool]
    assert len(workers) == 2 and os.getpid() not in workers


def test_a_stuck_check_is_killed_with_its_process_scores_zero_and_is_counted(
        pool: Verifier, tmp_path: Path) -> None:
    files = [tmp_path / f"pid{i}" for i in range(4)]
    items = [("sleepy", str(files[0]), "0.1"), ("sleepy", str(files[1]), "600"),
             ("sleepy", str(files[2]), "0.1"), ("sleepy", str(files[3]), "0.2")]
    start = time.monotonic()
    scores = pool.score_many(items)
    took = time.monotonic() - start
    assert scores == [1.0, 0.0, 1.0, 1.0]  # only the stuck answer scores 0
    assert pool.counters == {"timeouts": 1}
    assert 1.0 <= took < 10  # killed at its 1 s limit (plus a worker's start-up), not 600 s
    stuck = int(files[1].read_text())
    assert _gone(stuck)  # the process is dead and reaped, not a thread left running
    # A fresh worker took its place and the pool goes on scoring.
    assert len(pool._pool) == 2 and stuck not in [w.proc.pid for w in pool._pool]
    assert pool.score_many([("sleepy", str(files[0]), "0")]) == [1.0]


def test_crashed_and_raising_checks_score_zero_and_are_counted(pool: Verifier,
                                                               tmp_path: Path) -> None:
    scores = pool.score_many([("crashing", "", ""), ("raising", "", ""),
                              ("sleepy", str(tmp_path / "p"), "0"), ("no-such", "", "")])
    assert scores == [0.0, 0.0, 1.0, 0.0]
    assert pool.counters == {"crashes": 1, "errors": 1, "unknown": 1}


def test_jobs_complete_independently_and_whole(pool: Verifier, tmp_path: Path) -> None:
    pool.submit("slow", [("sleepy", str(tmp_path / "a"), "0.8"),
                         ("sleepy", str(tmp_path / "b"), "0")])
    pool.submit("fast", [("sleepy", str(tmp_path / "c"), "0")])
    pool.submit("cheap", [("reversed-integer", "21", "12"), ("reversed-integer", "1", "2")])
    order = []
    deadline = time.monotonic() + 30
    while len(order) < 3 and time.monotonic() < deadline:
        order += pool.collect(0.05)
    assert [k for k, _ in order] == ["cheap", "fast", "slow"]
    assert dict(order) == {"cheap": [1.0, 0.0], "fast": [1.0], "slow": [1.0, 1.0]}
    assert pool.in_flight() == 0


def test_cheap_checks_run_in_the_caller_and_start_no_process() -> None:
    with Verifier(timeout_s=1.0) as v:
        assert v.score_many([("reversed-integer", "21", "12"), ("integer", "x", "1")]) == [1, 0]
        assert v.score("integer", "1", "not a number") == 0.0
        assert v._pool == [] and v.counters == {"errors": 1}


@settings(max_examples=200)
@given(name=st.sampled_from(["integer", "reversed-integer", "unknown"]),
       completion=st.text(), answer=st.text())
def test_cheap_scores_never_raise_and_are_zero_or_one(name: str, completion: str,
                                                      answer: str) -> None:
    assert Verifier(timeout_s=1.0).score(name, completion, answer) in (0.0, 1.0)
