"""Async vs sync: the same learner steps in both modes, in one run, on the embedded default.

sync: actors wait for each new version (max_staleness 0): generate G, then train T.
async: actors generate the next batch while the learner trains this one.
Ideal speed-up of async over sync is (G + T) / max(G, T), with G and T measured in the sync
run (G: the learner's wait for a batch, T: the rest of its step). Final line: JSON with both
wall times, the speed-up, the bound, their ratio (target >= 0.8) and idle fractions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from launch.embedded_model import ensure_embedded_model
from launch.harness import make_config

_ROOT = Path(__file__).resolve().parents[1]

TRAIN_KEYS = ("time/prepare", "time/recompute", "time/fwd_bwd", "time/optimizer",
              "time/publish")


def run_mode(mode: str, steps: int, skip: int, tmp: Path, model: Path,
             overrides: list[str]) -> dict:
    run_dir = tmp / mode
    cfg = make_config(run_dir, model, mode=mode,
                      learner={"total_steps": steps, "eval_every": 0,
                               "checkpoint_every": 10**6},
                      allocator={"n_mean": 8, "n_min": 4, "n_max": 16, "max_staleness": 1})
    r = subprocess.run([sys.executable, "-m", "launch.cli", "run", str(cfg), *overrides],
                       cwd=_ROOT, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [x for x in recs if x["step"] > 0]
    window = recs[skip:]
    wall = window[-1]["elapsed_s"] - recs[skip - 1]["elapsed_s"]
    wait = sum(x["time/wait_batch"] for x in window)
    train = sum(sum(x.get(k, 0.0) for k in TRAIN_KEYS) for x in window)
    actor = [json.loads(x) for x in
             (run_dir / "metrics_actor0.jsonl").read_text().splitlines()]
    busy = actor[-1]["engine_busy_s"] - actor[0]["engine_busy_s"]
    idle = actor[-1]["engine_idle_s"] - actor[0]["engine_idle_s"]
    return {"wall_s": wall, "steps": len(window), "G_s": wait / len(window),
            "T_s": train / len(window), "learner_idle": wait / wall,
            "actor_idle": idle / max(busy + idle, 1e-9),
            "gen_tokens": sum(x["gen_tokens"] for x in window)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=4, help="warm-up steps left out")
    args, overrides = ap.parse_known_args()
    model = ensure_embedded_model(_ROOT / ".cache/models", 600, 0, progress=False)
    with tempfile.TemporaryDirectory() as d:
        res = {m: run_mode(m, args.steps, args.skip, Path(d), model, overrides)
               for m in ("sync", "async")}
    s, a = res["sync"], res["async"]
    speedup = s["wall_s"] / a["wall_s"]
    bound = (s["G_s"] + s["T_s"]) / max(s["G_s"], s["T_s"])
    for m, r in res.items():
        print(f"{m:5s}: {r['steps']} steps in {r['wall_s']:6.1f} s; per step G {r['G_s']:.2f} s "
              f"(learner waiting), T {r['T_s']:.2f} s (training); learner idle "
              f"{r['learner_idle']:.0%}, actor idle {r['actor_idle']:.0%}")
    print(f"async speed-up {speedup:.2f}x, bound (G+T)/max(G,T) = {bound:.2f}x, "
          f"ratio {speedup / bound:.2f}")
    print(json.dumps({"bench": "pipeline", "steps": s["steps"],
                      "sync_wall_s": round(s["wall_s"], 2), "async_wall_s": round(a["wall_s"], 2),
                      "speedup": round(speedup, 3), "G_s": round(s["G_s"], 3),
                      "T_s": round(s["T_s"], 3), "bound": round(bound, 3),
                      "ratio_to_bound": round(speedup / bound, 3), "target": 0.8,
                      "learner_idle": {m: round(r["learner_idle"], 3) for m, r in res.items()},
                      "actor_idle": {m: round(r["actor_idle"], 3) for m, r in res.items()}}))


if __name__ == "__main__":
    main()
