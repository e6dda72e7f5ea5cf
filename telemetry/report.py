"""`dynamo-rl profile RUN_DIR`: where a run's time goes, from its own records.

Inputs (any may be partial: the run can still be going): metrics.jsonl (learner, one line per
step), metrics_actor<i>.jsonl (cumulative actor counters every 2 s), trace/*.jsonl (spans).
Outputs: RUN_DIR/trace.json (merged trace), RUN_DIR/profile/{trace.json (the same file),
summary.json, *.png} and a table on stdout. Across nodes without a shared RUN_DIR, first copy
every node's RUN_DIR/trace/*.jsonl and metrics_actor*.jsonl into one RUN_DIR (names do not
collide: they carry the process name, unique per actor index and learner rank, and the pid).

Every figure is computed over one window: the learner steps from the second on (the first
step's wait for a batch includes the actors' start-up) up to the last; all times on the
allocator's clock (telemetry/merge.py). Rates are totals over the window divided by its
length, never means of per-step rates, so the table and summary.json can be recomputed from
metrics.jsonl exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from telemetry.merge import (
    ProcessTrace,
    Span,
    aligned_spans,
    read_jsonl,
    read_traces,
    step_wall,
    write_trace,
)

IDLE_HIGH = 0.30  # an idle share above this means a side is starved
IDLE_GAP = 0.15  # ... and it must exceed the other side's share by this much
STEP_PHASES = ("wait_batch", "prepare", "recompute", "fwd_bwd", "optimizer", "publish", "eval",
               "checkpoint")
ENGINE_STATES = ("generate", "wait_grant", "wait_weights", "apply_weights")
ACTOR_COUNTERS = ("gen_tokens", "engine_busy_s", "engine_idle_s", "weights_s")


def window_steps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    steps = [r for r in records if r.get("step", 0) > 0]
    return steps[1:] if len(steps) >= 3 else steps


def learner_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    wall = sum(step_wall(r) for r in steps)
    phases = {p: sum(r.get(f"time/{p}", 0.0) for r in steps) for p in STEP_PHASES}
    return {
        "steps": len(steps), "wall_s": wall, "step_s_mean": wall / len(steps),
        "idle_frac": phases["wait_batch"] / wall,
        "time_s_per_step": {p: v / len(steps) for p, v in phases.items()},
        "time_share": {**{p: v / wall for p, v in phases.items()},
                       "other": 1 - sum(phases.values()) / wall},
        "train_tokens_per_s": sum(r.get("train_tokens", 0.0) for r in steps) / wall,
        "consumed_gen_tokens_per_s": sum(r.get("gen_tokens", 0) for r in steps) / wall,
        "samples_per_s": sum(r.get("samples", 0) for r in steps) / wall,
        "intake_queue_mean": _mean([r["queue/intake"] for r in steps if "queue/intake" in r]),
    }


def actor_summary(lines: list[dict[str, Any]], w0: float, w1: float,
                  offsets: dict[str, int]) -> dict[str, Any]:
    """One actor index (all its incarnations) over the window [w0, w1] (allocator clock, s).

    Counters are cumulative per incarnation (zero at `started_at`) and interpolated linearly
    between the 2-s lines at the window's edges."""
    delta = dict.fromkeys(ACTOR_COUNTERS, 0.0)
    covered = 0.0
    for inc in sorted({ln["actor"] for ln in lines}):
        own = [ln for ln in lines if ln["actor"] == inc]
        off = offsets.get(inc, 0) / 1e9
        pts = [(own[0]["started_at"] + off, dict.fromkeys(ACTOR_COUNTERS, 0.0))] \
            if "started_at" in own[0] else []
        pts += [(ln["time"] + off, {k: ln.get(k, 0.0) for k in ACTOR_COUNTERS}) for ln in own]
        a, b = max(w0, pts[0][0]), min(w1, pts[-1][0])
        if b <= a:
            continue
        ts = [t for t, _ in pts]
        for k in ACTOR_COUNTERS:
            ys = [c[k] for _, c in pts]
            delta[k] += float(np.interp(b, ts, ys) - np.interp(a, ts, ys))
        covered += b - a
    engine_s = delta["engine_busy_s"] + delta["engine_idle_s"] + delta["weights_s"]
    inside = [ln for ln in lines if w0 <= ln["time"] + offsets.get(ln["actor"], 0) / 1e9 <= w1]
    return {
        "covered_s": covered, "idle_from": "counters",
        "gen_tokens_per_s": delta["gen_tokens"] / covered if covered else math.nan,
        "idle_frac": delta["engine_idle_s"] / engine_s if engine_s else math.nan,
        "outbox_mean": _mean([ln.get("outbox", 0) for ln in inside]),
        "held_grants_mean": _mean([ln.get("held_grants", 0) for ln in inside]),
        "incarnations": len({ln["actor"] for ln in lines}),
    }


def engine_shares(spans: list[Span], process: str, w0: float, w1: float) -> dict[str, float]:
    """Share of the engine thread's time in each state over the window, from its spans."""
    lo, hi = int(w0 * 1e9), int(w1 * 1e9)
    tot = dict.fromkeys(ENGINE_STATES, 0)
    for s in spans:
        if s.process == process and s.name in tot:
            tot[s.name] += max(0, min(s.end_ns, hi) - max(s.start_ns, lo))
    n = sum(tot.values())
    return {k: v / n for k, v in tot.items()} if n else {}


def weight_sync(spans: list[Span]) -> dict[str, Any]:
    """Latency from the learner starting to publish version v to each actor having applied it."""
    published = {s.args["version"]: s.start_ns for s in spans
                 if s.name == "publish_weights" and s.role == "learner"}
    lat = sorted((s.end_ns - published[s.args["version"]]) / 1e9 for s in spans
                 if s.name == "apply_weights" and s.args.get("version") in published)
    if not lat:
        return {"n": 0}
    return {"n": len(lat), "mean_s": float(np.mean(lat)), "p50_s": lat[len(lat) // 2],
            "p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))], "max_s": lat[-1]}


def verdict(learner: dict[str, Any], actor_idle: float | None) -> dict[str, str]:
    """Which side the run waits on, with the numbers that say so."""
    li = learner["idle_frac"]
    busiest = max((p for p in learner["time_share"] if p not in ("wait_batch", "other")),
                  key=learner["time_share"].get)
    where = f"; the learner's largest phase is {busiest} ({learner['time_share'][busiest]:.0%})"
    if actor_idle is None or math.isnan(actor_idle):
        return {"bound": "unknown",
                "evidence": f"learner idle {li:.0%}; no actor metrics in the window{where}"}
    both = f"learner idle {li:.0%} waiting for batches while actors idle {actor_idle:.0%}"
    if li >= IDLE_HIGH and li > actor_idle + IDLE_GAP:
        bound, why = "generation-bound", "more or faster actors would help"
    elif actor_idle >= IDLE_HIGH and actor_idle > li + IDLE_GAP:
        bound, why = "training-bound", "actors wait for grants or weights" + where
    elif li < IDLE_HIGH and actor_idle < IDLE_HIGH:
        bound, why = "balanced", "both sides busy"
    else:
        bound, why = "latency-bound", "each side waits on the other (weight sync, staleness " \
            "pacing): see the timeline"
    return {"bound": bound, "evidence": f"{both} -> {bound} ({why})"}


def build_summary(run_dir: Path, procs: list[ProcessTrace]) -> dict[str, Any]:
    run_dir = Path(run_dir)
    records = list(read_jsonl(run_dir / "metrics.jsonl")) \
        if (run_dir / "metrics.jsonl").is_file() else []
    steps = window_steps(records)
    spans = aligned_spans(procs)
    offsets = {p.clock_id: p.cross_offset_ns for p in procs if p.clock_id}
    out: dict[str, Any] = {"run_dir": str(run_dir), "processes": {
        p.label: {"spans": len(p.spans), "clock": p.alignment,
                  "offset_to_allocator_ms": p.cross_offset_ns / 1e6} for p in procs}}
    if not steps:
        out["verdict"] = {"bound": "unknown", "evidence": "no learner step yet"}
        return out
    learner_off = next((p.cross_offset_ns for p in reversed(procs) if p.name == "learner0"), 0)
    w0 = steps[0]["time"] - step_wall(steps[0]) + learner_off / 1e9
    w1 = steps[-1]["time"] + learner_off / 1e9
    all_steps = [r for r in records if r.get("step", 0) > 0]
    out["window"] = {"first_step": steps[0]["step"], "last_step": steps[-1]["step"],
                     "steps_total": len(all_steps), "start_wall_s": w0, "end_wall_s": w1,
                     "first_step_excluded": len(steps) < len(all_steps)}
    learner = learner_summary(steps)
    actors: dict[str, Any] = {}
    for f in sorted(run_dir.glob("metrics_actor*.jsonl"),
                    key=lambda f: int(re.sub(r"\D", "", f.stem) or 0)):
        lines = [ln for ln in read_jsonl(f) if "actor" in ln]
        if lines:
            name = f.stem.removeprefix("metrics_")
            a = actors[name] = actor_summary(lines, w0, w1, offsets)
            a["engine_time"] = shares = engine_shares(spans, name, w0, w1)
            if shares:  # the spans tile the window exactly; the 2-s counters interpolate
                a["idle_frac"] = shares["wait_grant"] + shares["wait_weights"]
                a["idle_from"] = "trace"
    idle = [a["idle_frac"] for a in actors.values() if not math.isnan(a["idle_frac"])]
    actor_idle = float(np.mean(idle)) if idle else None
    gen = sum(a["gen_tokens_per_s"] for a in actors.values()
              if not math.isnan(a["gen_tokens_per_s"]))
    out.update({
        "throughput": {"gen_tokens_per_s": gen if actors else math.nan,
                       "consumed_gen_tokens_per_s": learner["consumed_gen_tokens_per_s"],
                       "train_tokens_per_s": learner["train_tokens_per_s"],
                       "samples_per_s": learner["samples_per_s"]},
        "learner": learner,
        "actors": actors,
        "actor_idle_frac_mean": actor_idle,
        "weight_sync": weight_sync(spans),
        "verdict": verdict(learner, actor_idle),
        "reward": {"first": all_steps[0].get("reward/mean"),
                   "last": all_steps[-1].get("reward/mean")},
        "eval": [{k: r[k] for k in ("step", "eval/acc", "eval/pass1") if k in r}
                 for r in records if "eval/acc" in r],
    })
    return out


def format_table(s: dict[str, Any]) -> str:
    lines = [f"profile of {s['run_dir']}"]
    if "window" not in s:
        return "\n".join([*lines, f"verdict: {s['verdict']['evidence']}"])
    w = s["window"]
    lines.append(f"window: steps {w['first_step']}-{w['last_step']} of {w['steps_total']}, "
                 f"{w['end_wall_s'] - w['start_wall_s']:.1f} s"
                 + ("  (step 1 left out: it waits for the actors' start-up)"
                    if w["first_step_excluded"] else ""))
    t, ln = s["throughput"], s["learner"]
    row = "  {:<34}{:>12}"
    lines += ["throughput",
              row.format("generated tokens/s (actors)", _num(t["gen_tokens_per_s"], ".1f")),
              row.format("consumed tokens/s (learner)", f"{t['consumed_gen_tokens_per_s']:.1f}"),
              row.format("trained tokens/s", f"{t['train_tokens_per_s']:.1f}"),
              row.format("samples/s", f"{t['samples_per_s']:.2f}"),
              f"learner step: {ln['step_s_mean']:.3f} s mean{'':<11}s/step   share"]
    for p in (*STEP_PHASES, "other"):
        per = ln["time_s_per_step"].get(p)
        lines.append("  {:<34}{:>8}{:>8.1%}".format(p, f"{per:.3f}" if per is not None else "",
                                                   ln["time_share"][p]))
    lines += ["idle (share of wall time)",
              row.format("learner (waiting for batches)", f"{ln['idle_frac']:.1%}")
              + f"   intake queue {_num(ln['intake_queue_mean'], '.1f')} groups after a take"]
    for name, a in s["actors"].items():
        states = ", ".join(f"{k} {v:.0%}" for k, v in a["engine_time"].items() if v >= 0.005)
        lines += [row.format(f"{name} (engine)", _num(a["idle_frac"], ".1%")),
                  f"    {_num(a['gen_tokens_per_s'], '.1f')} tok/s generated; outbox "
                  f"{_num(a['outbox_mean'], '.1f')}, held grants "
                  f"{_num(a['held_grants_mean'], '.1f')}"
                  + (f"; {states}" if states else "")]
    ws = s["weight_sync"]
    lines.append("weight sync, publish -> applied: " + (
        f"mean {ws['mean_s']:.3f} s, p50 {ws['p50_s']:.3f} s, p90 {ws['p90_s']:.3f} s, "
        f"max {ws['max_s']:.3f} s over {ws['n']} (version, actor) pairs" if ws["n"]
        else "no version applied in the trace"))
    lines.append(f"verdict: {s['verdict']['evidence']}")
    return "\n".join(lines)


def profile_run(run_dir: Path, window_s: float = 30.0, echo: bool = True) -> dict[str, Any]:
    """Merge the trace, compute the summary, draw the figures; print the table."""
    from telemetry.figures import draw_figures

    run_dir = Path(run_dir)
    out_dir = run_dir / "profile"
    out_dir.mkdir(exist_ok=True)
    procs = read_traces(run_dir)
    trace = write_trace(run_dir, procs)
    linked = out_dir / "trace.json"  # the same file under profile/, without a second copy
    linked.unlink(missing_ok=True)
    try:
        os.link(trace, linked)
    except OSError:
        linked.write_bytes(trace.read_bytes())
    summary = build_summary(run_dir, procs)
    summary["figures"] = [str(p) for p in draw_figures(run_dir, procs, summary, out_dir,
                                                       window_s)]
    (out_dir / "summary.json").write_text(json.dumps(_nan_to_null(summary), indent=1))
    if echo:
        print(format_table(summary))
        print(f"wrote {trace}, {out_dir}/ (summary.json, trace.json, "
              f"{', '.join(Path(f).name for f in summary['figures'])})")
    return summary


def _num(x: float | None, spec: str) -> str:
    """A number for the table; n/a where the window holds no data for it."""
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


def _nan_to_null(o: Any) -> Any:
    """Strict JSON: NaN (no data) becomes null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_null(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_nan_to_null(v) for v in o]
    return o
