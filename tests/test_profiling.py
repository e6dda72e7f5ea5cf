"""Throughput profiling: spans are cheap and well formed, traces from several processes and
hosts merge onto one clock, and `dynamo-rl profile` reports numbers that agree with the
metrics of a real short run."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, TRAINED_STEPS

from telemetry import spans
from telemetry.merge import chrome_trace, read_jsonl, read_traces
from telemetry.report import verdict

STEPS = TRAINED_STEPS  # the shared run: eval at 0 and STEPS, checkpoints every STEPS // 2
SPAN_BUDGET_NS = 20_000  # far above what it costs (~1 µs); a shared CI core can be slow


# ------------------------------------------------------------------ unit: spans and merge


def test_span_costs_microseconds_and_records_nesting_per_thread(tmp_path):
    tracer = spans.open_trace(tmp_path, "bench", "test")
    try:
        n = 20_000
        t0 = time.perf_counter_ns()
        for _ in range(n):
            with spans.span("x"):
                pass
        per_span = (time.perf_counter_ns() - t0) / n
        print(f"span overhead: {per_span:.0f} ns")
        assert per_span < SPAN_BUDGET_NS

        def work() -> None:
            with spans.span("outer", k=1):
                with spans.span("inner"):
                    time.sleep(0.001)

        th = threading.Thread(target=work, name="worker")
        th.start()
        th.join()
    finally:
        spans.close_trace()
    recs = list(read_jsonl(tracer.path))
    assert recs[0]["kind"] == "process" and recs[0]["name"] == "bench"
    assert any(r["kind"] == "clock" for r in recs)
    by_name = {r["name"]: r for r in recs if r["kind"] == "span" and r["name"] != "x"}
    outer, inner = by_name["outer"], by_name["inner"]
    assert outer["thread"] == inner["thread"] == "worker" and outer["args"] == {"k": 1}
    assert outer["start_ns"] <= inner["start_ns"] < inner["end_ns"] <= outer["end_ns"]
    assert sum(r["kind"] == "span" for r in recs) == n + 2  # nothing lost across flushes


def write_trace_file(path: Path, head: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"kind": "process", **head})] + [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n" + '{"kind": "span", "na')  # cut mid-write


def test_merge_aligns_remote_clocks_by_the_fastest_heartbeat(tmp_path):
    s = 1_000_000_000
    # Allocator on host A: monotonic + 100 s = wall. It received heartbeats from the actor on
    # host B with (receive - sent_at) = delay + 5 s: B's clock is 5 s behind A's.
    write_trace_file(tmp_path / "trace" / "allocator-1.jsonl",
                     {"name": "allocator", "role": "allocator", "host": "A", "pid": 1,
                      "clock_id": None},
                     [{"kind": "clock", "mono_ns": 0, "wall_ns": 100 * s},
                      {"kind": "span", "name": "allocate", "tid": 7, "thread": "MainThread",
                       "start_ns": 2 * s, "end_ns": 3 * s},
                      *({"kind": "clock_sample", "sender": "B-a0-9", "delta_ns": 5 * s + d}
                        for d in (3_000_000, 400_000, 9_000_000))])
    # Actor on host B: monotonic + 90 s = B's wall clock. Its span at B-wall 97 s is
    # A-wall 102.0004 s (5 s offset + 0.4 ms smallest delay).
    write_trace_file(tmp_path / "trace" / "actor0-9.jsonl",
                     {"name": "actor0", "role": "actor", "host": "B", "pid": 9,
                      "clock_id": "B-a0-9"},
                     [{"kind": "clock", "mono_ns": 0, "wall_ns": 90 * s},
                      {"kind": "span", "name": "generate", "tid": 3, "thread": "MainThread",
                       "start_ns": 7 * s, "end_ns": 8 * s}])
    write_trace_file(tmp_path / "trace" / "learner0-2.jsonl",
                     {"name": "learner0", "role": "learner", "host": "A", "pid": 2,
                      "clock_id": "A-learner0-2"},
                     [{"kind": "clock", "mono_ns": 50 * s, "wall_ns": 100 * s},
                      {"kind": "span", "name": "fwd_bwd", "tid": 5, "thread": "MainThread",
                       "start_ns": 53 * s, "end_ns": 54 * s}])
    procs = read_traces(tmp_path)
    assert [p.name for p in procs] == ["allocator", "learner0", "actor0"]
    actor = procs[2]
    assert actor.cross_offset_ns == 5 * s + 400_000 and "3 heartbeat" in actor.alignment
    assert procs[1].cross_offset_ns == 0 and "same host" in procs[1].alignment
    trace = chrome_trace(procs)
    x = {e["name"]: e for e in trace["traceEvents"] if e["ph"] == "X"}
    assert trace["otherData"]["wall_origin_ns"] == 102 * s  # the allocator's span is first
    assert x["allocate"]["ts"] == 0 and x["fwd_bwd"]["ts"] == 1e6  # learner: 103 s
    assert x["generate"]["ts"] == pytest.approx(400.0)  # 0.4 ms after the allocator's span
    assert {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"} \
        == {"allocator (A:1)", "learner0 (A:2)", "actor0 (B:9)"}


# ------------------------------------------------------------------ a real short run


@pytest.fixture(scope="module")
def profiled(trained):
    """`dynamo-rl profile` of the shared 32-step run (conftest's `trained`)."""
    run_dir, out = trained.run_dir, trained.output
    prof = subprocess.run([sys.executable, "-m", "launch.cli", "profile", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert prof.returncode == 0, prof.stdout + prof.stderr
    print(prof.stdout)
    return run_dir, out, prof.stdout


def test_trace_has_every_process_with_nested_ordered_spans(profiled):
    run_dir = profiled[0]
    trace = json.loads((run_dir / "trace.json").read_text())
    assert (run_dir / "profile" / "trace.json").read_bytes() == (run_dir / "trace.json") \
        .read_bytes()
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"].split(" ")[0] for e in events
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert {"allocator", "learner0", "actor0"} <= set(names.values())
    seen: dict[str, set[str]] = {}
    threads: dict[tuple[int, int], list[dict]] = {}
    for e in events:
        if e["ph"] == "X":
            seen.setdefault(names[e["pid"]], set()).add(e["name"])
            threads.setdefault((e["pid"], e["tid"]), []).append(e)
    assert {"allocate", "expire"} <= seen["allocator"]
    assert {"wait_batch", "train_step", "prepare", "recompute", "fwd_bwd", "optimizer",
            "publish_weights", "eval", "checkpoint"} <= seen["learner0"]
    assert {"generate", "apply_weights", "score", "send"} <= seen["actor0"]
    assert seen["actor0"] & {"wait_grant", "wait_weights"}
    eps = 1e-3  # µs: float rounding of ns-exact spans
    for key, evs in threads.items():
        assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs), key  # as recorded
        open_ends: list[float] = []  # every pair of spans is nested or disjoint
        for e in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
            assert e["dur"] >= 0
            while open_ends and open_ends[-1] <= e["ts"] + eps:
                open_ends.pop()
            assert not open_ends or e["ts"] + e["dur"] <= open_ends[-1] + eps, (key, e)
            open_ends.append(e["ts"] + e["dur"])


def test_metrics_carry_every_listed_key(profiled):
    run_dir = profiled[0]
    recs = list(read_jsonl(run_dir / "metrics.jsonl"))
    steps = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    always = {"reward/mean", "accuracy/train", "zero_signal_frac", "samples", "gen_tokens",
              "train_tokens", "staleness/hist", "dropped/stale", "dropped/duplicate",
              "budget/min", "budget/mean", "budget/max", "budget/hist", "time/wait_batch",
              "time/publish", "step_wall_s", "idle/learner", "throughput/train_tokens_per_s",
              "queue/intake"}
    trained = {"is/mean_abs_dlogp", "is/kl_k3", "is/frac_truncated", "entropy/mean",
               "beta_comp/mean", "beta_stab/mean", "grad_norm", "time/prepare",
               "time/recompute", "time/fwd_bwd", "time/optimizer"}
    for r in steps:
        assert always <= r.keys(), always - r.keys()
        # the model was built with the collector off; once training, collection is back on
        assert r["gc_enabled"] and r["gc_frozen_objects"] > 100_000, r
        if not r.get("skipped_step"):
            assert trained <= r.keys(), trained - r.keys()
    assert any(not r.get("skipped_step") for r in steps)
    assert [r["step"] for r in recs if "eval/acc" in r and "eval/pass1" in r] == [0, STEPS]
    assert [r["step"] for r in steps if "time/checkpoint" in r] == [STEPS // 2, STEPS]
    actor = list(read_jsonl(run_dir / "metrics_actor0.jsonl"))
    assert {"gen_tokens", "engine_busy_s", "engine_idle_s", "weights_s", "tokens_sent",
            "outbox", "held_grants", "started_at"} <= actor[-1].keys()
    # the engine was built with the collector off; once running, collection is back on
    assert actor[-1]["gc_enabled"] and actor[-1]["gc_frozen_objects"] > 100_000
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_report_agrees_with_the_metrics_it_was_built_from(profiled):
    run_dir, run_out, table = profiled
    summary = json.loads((run_dir / "profile" / "summary.json").read_text())
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 0]
    w = summary["window"]
    used = [r for r in steps if w["first_step"] <= r["step"] <= w["last_step"]]
    assert w["first_step"] == 2 and w["last_step"] == STEPS  # step 1 waits for start-up
    wall = sum(r["step_wall_s"] for r in used)
    learner = summary["learner"]
    assert learner["wall_s"] == pytest.approx(wall)
    assert summary["throughput"]["train_tokens_per_s"] == pytest.approx(
        sum(r["train_tokens"] for r in used) / wall)
    assert summary["throughput"]["samples_per_s"] == pytest.approx(
        sum(r["samples"] for r in used) / wall)
    assert learner["idle_frac"] == pytest.approx(sum(r["time/wait_batch"] for r in used) / wall)
    assert learner["time_share"]["fwd_bwd"] == pytest.approx(
        sum(r["time/fwd_bwd"] for r in used) / wall)
    # The phases partition the step: what is left over is bookkeeping.
    assert -0.01 < learner["time_share"]["other"] < 0.1
    actor = summary["actors"]["actor0"]
    assert actor["gen_tokens_per_s"] > 0 and 0 <= actor["idle_frac"] <= 1
    assert summary["weight_sync"]["n"] >= 1 and summary["weight_sync"]["mean_s"] > 0
    # The verdict is the one the window's own idle shares give, and it shows them.
    li, ai = learner["idle_frac"], summary["actor_idle_frac_mean"]
    assert summary["verdict"] == verdict(learner, ai)
    assert f"learner idle {li:.0%} waiting for batches while actors idle {ai:.0%}" in \
        summary["verdict"]["evidence"]
    assert f"{summary['throughput']['train_tokens_per_s']:.1f}" in table
    assert f"verdict: {summary['verdict']['evidence']}" in table
    assert f"[run] step {STEPS:4d}/{STEPS}" in run_out and "ETA" in run_out


@pytest.mark.parametrize(("learner_idle", "actor_idle", "bound"), [
    (0.6, 0.1, "generation-bound"), (0.1, 0.6, "training-bound"), (0.1, 0.2, "balanced"),
    (0.5, 0.45, "latency-bound")])
def test_verdict_names_the_side_the_run_waits_on(learner_idle, actor_idle, bound):
    learner = {"idle_frac": learner_idle,
               "time_share": {"wait_batch": learner_idle, "fwd_bwd": 0.3, "other": 0.01}}
    assert verdict(learner, actor_idle)["bound"] == bound


def test_profile_draws_non_trivial_figures(profiled):
    out = profiled[0] / "profile"
    for name in ("timeline", "throughput", "learning", "histograms"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 15_000, name
