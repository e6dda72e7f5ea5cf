"""Chaos run: the real stack with faults injected at random, then an exactly-once audit.

    .venv/bin/python -m launch.chaos configs/default.toml --minutes 5 --actors 2 \
        [--run_dir runs/chaos] [--section.field value ...]

Starts allocator, learner and actors as separate processes (like `dynamo-rl run`), then
every `--every` seconds picks one fault: SIGKILL an actor (a replacement starts), SIGSTOP an
actor for longer than its lease (a partition; then SIGCONT), SIGKILL + restart the
allocator, SIGKILL + resume the learner from its checkpoint, or SIGSTOP the learner (a slow
learner). Every `--rss-every` seconds it records each process's RSS (RUN_DIR/rss.jsonl); the
report gives, per process that lived long enough, its RSS after start-up and at the end and
the slope of a line fitted in between (MiB/min), and the size of the learner's grant record. At
the end it stops everything and prints what happened, peak RSS per role and
`dynamo-rl audit` of the run (launch/audit.py: nothing trained twice or without being
issued, every completed group trained, dropped with a reason or recorded lost; groups dropped
and reports refused, by reason); it exits 1 on any violation or if the learner never stepped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time

from launch.audit import audit
from launch.config import dump_config, load_config
from launch.harness import rss
from launch.local import Child, child_env, shutdown
from launch.runtime import ensure_run_keys, model_path, split_overrides

FAULTS = ("kill_actor", "partition_actor", "restart_allocator", "resume_learner",
          "stall_learner")


def main(argv: list[str] | None = None) -> int:
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m launch.chaos", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--every", type=float, default=20.0, help="seconds between faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help=f"comma-separated subset of {', '.join(FAULTS)}")
    ap.add_argument("--rss-every", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--rss-warm", type=float, default=300.0,
                    help="seconds of each process's life left out of its RSS trend (start-up, "
                    "the engine's caches filling)")
    args = ap.parse_args(own)
    faults = args.faults.split(",")
    if not set(faults) <= set(FAULTS):
        ap.error(f"--faults: unknown {sorted(set(faults) - set(FAULTS))}; known: {FAULTS}")
    cfg = load_config(args.config, ["--learner.total_steps", "1000000",
                                    "--learner.checkpoint_every", "5", *overrides])
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_config(cfg))
    if cfg.network.curve:
        ensure_run_keys(run_dir)
    model_path(cfg)
    env, py, cfg_file = child_env(), [sys.executable, "-m", "launch.cli"], str(
        run_dir / "config.toml")
    logs = run_dir / "logs"

    def child(role: str, *extra: str) -> Child:
        name = role + "".join(extra[1:2])
        c = Child(name, [*py, role, cfg_file, *extra], logs / f"{name}.log", env)
        c.start()
        return c

    alloc = child("allocator")
    learner = child("learner")
    actors = [child("actor", "--index", str(i)) for i in range(args.actors)]
    rng = random.Random(args.seed)
    peak: dict[str, int] = {}
    events: list[str] = []
    t0 = time.monotonic()
    t_end = t0 + 60 * args.minutes
    next_fault = t0 + args.every
    next_sample = t0
    samples = (run_dir / "rss.jsonl").open("w")
    resume: list[tuple[float, int]] = []  # (when, pid): stopped processes to continue
    try:
        while time.monotonic() < t_end:
            time.sleep(0.5)
            sample = time.monotonic() >= next_sample
            for role, cs in (("allocator", [alloc]), ("learner", [learner]), ("actor", actors)):
                for c in cs:
                    r = rss(c.proc.pid)
                    peak[role] = max(peak.get(role, 0), r)
                    if sample and r:
                        samples.write(json.dumps({"t": time.monotonic() - t0, "name": c.name,
                                                  "pid": c.proc.pid, "rss": r}) + "\n")
            if sample:
                samples.flush()
                next_sample += args.rss_every
            for i, a in enumerate(actors):
                if not a.alive():
                    actors[i] = child("actor", "--index", str(i))
            for t_cont, pid in [r for r in resume if r[0] <= time.monotonic()]:
                resume.remove((t_cont, pid))
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            if time.monotonic() < next_fault:
                continue
            fault = rng.choice(faults)
            events.append(f"{time.strftime('%H:%M:%S')} {fault}")
            print(f"[chaos] {events[-1]}", flush=True)
            if fault == "kill_actor":
                os.kill(rng.choice(actors).proc.pid, signal.SIGKILL)
            elif fault == "partition_actor":
                victim = rng.choice(actors).proc.pid
                os.kill(victim, signal.SIGSTOP)  # resumed by the loop, which keeps sampling
                resume.append((time.monotonic() + cfg.allocator.lease_s + 5, victim))
            elif fault == "restart_allocator":
                alloc.proc.kill()
                alloc.proc.wait()
                alloc = child("allocator")
            elif fault == "resume_learner":
                learner.proc.kill()
                learner.proc.wait()
                learner = child("learner")
            else:
                os.kill(learner.proc.pid, signal.SIGSTOP)
                resume.append((time.monotonic() + 15, learner.proc.pid))
            # counted from the fault's end: a partition (lease_s + 5 s) or a stall outlasting
            # --every would otherwise be followed at once by the next fault
            next_fault = max([time.monotonic(), *(t for t, _ in resume)]) + args.every
    finally:
        for _, pid in resume:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        samples.close()
        shutdown([learner], 120)
        shutdown([*actors, alloc], 30)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if x.endswith("}")] if (run_dir / "metrics.jsonl").exists() else []
    checked = audit(run_dir)
    report = {
        "faults": events, "learner_steps": recs[-1]["step"] if recs else 0,
        "audit": checked["totals"], "violations": checked["violations"],
        "peak_rss_mib": {k: v >> 20 for k, v in peak.items()},
        "rss_trend": rss_trend(run_dir / "rss.jsonl", warm_s=args.rss_warm),
        "actor_heap_trend": heap_trend(run_dir, warm_s=args.rss_warm),
        "grant_record": record_size(run_dir),
    }
    print(json.dumps(report, indent=1))
    return 0 if not checked["violations"] and report["learner_steps"] > 0 else 1

def rss_trend(path, warm_s: float = 120.0, min_span_s: float = 180.0
              ) -> dict[str, dict[str, float]]:
    """Per process (a restarted one is a new process) that lived at least warm_s + min_span_s:
    RSS after its first warm_s seconds (start-up, first batches) and at its last sample (MiB),
    the least-squares slope in between (MiB/min), and the high-water marks: the peak RSS of
    the first warm_s seconds and of the time after (MiB). A process that returns freed memory
    (actors trim their heap every actor.heap_trim_s) draws a sawtooth, and idle phases (a
    stalled learner) sit low: a fitted slope then follows where the window starts, while a
    leak must raise the high-water mark."""
    import numpy as np

    series: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        series.setdefault((r["name"], r["pid"]), []).append((r["t"], r["rss"]))
    out = {}
    for (name, pid), pts in sorted(series.items()):
        late = [(t, v) for t, v in pts if t >= pts[0][0] + warm_s]
        if len(late) < 3 or late[-1][0] - late[0][0] < min_span_s:
            continue
        t, v = np.array(late).T
        slope = np.polyfit(t / 60, v / 2**20, 1)[0]
        warm = [v for t, v in pts if t < pts[0][0] + warm_s]
        out[f"{name} (pid {pid})"] = {"minutes": round((t[-1] - t[0]) / 60, 1),
                                      "mib_at_start": round(v[0] / 2**20, 1),
                                      "mib_at_end": round(v[-1] / 2**20, 1),
                                      "slope_mib_per_min": round(float(slope), 2),
                                      "peak_warm_mib": round(max(warm) / 2**20, 1),
                                      "peak_after_mib": round(float(v.max()) / 2**20, 1)}
    return out


def heap_trend(run_dir, warm_s: float = 120.0, min_span_s: float = 180.0
               ) -> dict[str, dict[str, float]]:
    """Per actor process that lived long enough, from its own metrics lines (actors/heap.py):
    the C heap in use, freed-but-kept, and RSS, after warm_s and at the end (MiB), and the
    fitted slope of the heap in use (MiB/min): a leak grows it, a kept high-water mark does
    not."""
    import numpy as np

    series: dict[str, list[dict]] = {}
    for path in sorted(run_dir.glob("metrics_actor*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                m = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if "heap_in_use_mib" in m:
                series.setdefault(m["actor"], []).append(m)
    out = {}
    for actor, ms in sorted(series.items()):
        late = [m for m in ms if m["time"] >= ms[0]["time"] + warm_s]
        if len(late) < 3 or late[-1]["time"] - late[0]["time"] < min_span_s:
            continue
        t = np.array([m["time"] for m in late])
        use = np.array([m["heap_in_use_mib"] for m in late])
        out[actor] = {"minutes": round((t[-1] - t[0]) / 60, 1),
                      "in_use_mib": [late[0]["heap_in_use_mib"], late[-1]["heap_in_use_mib"]],
                      "free_mib": [late[0]["heap_free_mib"], late[-1]["heap_free_mib"]],
                      "rss_mib": [late[0]["rss_mib"], late[-1]["rss_mib"]],
                      "in_use_slope_mib_per_min": round(float(
                          np.polyfit((t - t[0]) / 60, use, 1)[0]), 2),
                      "trimmed_mib": late[-1].get("heap_trimmed_bytes", 0) >> 20}
    return out


def record_size(run_dir) -> dict[str, int]:
    """Ranges (two ints each) the learner's grant record holds, against the ids it covers."""
    path = run_dir / "learner_grants.json"
    if not path.exists():
        return {}
    d = json.loads(path.read_text())
    ranges = len(d["trained"]) + sum(len(v) for v in d["dropped"].values())
    ids = sum(b - a for a, b in d["trained"]) + sum(
        b - a for v in d["dropped"].values() for a, b in v)
    return {"ranges": ranges, "ids": ids}


if __name__ == "__main__":
    sys.exit(main())
