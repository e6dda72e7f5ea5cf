"""Completions per second of the whole RL loop, per placement, on this machine.

Runs `dynamo-rl run` on the built-in task for each placement (disaggregated: the cores split
between actor and learner, generation overlapping training; colocated: they take turns,
each with every core) and each model size (the 0.5M embedded model; a 25M Qwen2, hidden 512,
6 layers, built untrained with `build_sized_model`), the same batch shape (32 prompts x 8
samples per step) and the same number of steps, and reports from the run's own records:
completions/s in the training loop (samples / time from the first to the last step), the
wall time of the whole command, the start-up (launch -> first learner step) and the
held-out pass@1 at the end (embedded model only: the 25M model is untrained).

    python bench/throughput.py                        # both sizes, both placements
    python bench/throughput.py --models tiny --steps 60

Final line: JSON with `rows` ([{model, placement, completions_per_s, wall_s, startup_s,
pass1_after}]) and `colocated_over_disaggregated` per model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"tiny": None, "25M": dict(hidden_size=512, intermediate_size=2048,
                                   num_hidden_layers=6, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=64)}


def run_once(model: str, placement: str, steps: int, tmp: Path, seed: int) -> dict:
    run_dir = tmp / f"{model}-{placement}"
    args = [sys.executable, "-m", "launch.cli", "run", str(ROOT / "configs" / "default.toml"),
            "--run_dir", str(run_dir), "--placement", placement,
            "--learner.total_steps", str(steps), "--learner.checkpoint_every", str(10 * steps),
            "--learner.seed", str(seed), "--allocator.seed", str(seed)]
    if SIZES[model] is not None:
        from launch.embedded_model import build_sized_model

        path = build_sized_model(tmp / f"model-{model}", seed=seed, **SIZES[model])
        # untrained: every group is flat unless kept (the learner then does its full work)
        args += ["--model.path", str(path), "--learner.eval_every", "0",
                 "--learner.skip_zero_signal", "false", "--preset", "grpo"]
    else:
        args += ["--learner.eval_every", str(steps)]
    t0 = time.time()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{model}/{placement}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [x for x in recs if x.get("step", 0) > 0]
    evals = [x for x in recs if "eval/pass1" in x]
    # the training loop: from the end of the first step to the end of the last
    loop_s = steps_[-1]["time"] - steps_[0]["time"]
    samples = sum(x["samples"] for x in steps_[1:])
    return {"model": model, "placement": placement, "steps": len(steps_),
            "completions_per_s": samples / loop_s, "wall_s": wall,
            "startup_s": steps_[0]["time"] - t0,
            "pass1_after": evals[-1]["eval/pass1"] if evals else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--placements", nargs="+", default=["disaggregated", "colocated"])
    ap.add_argument("--steps", type=int, default=60, help="learner steps (tiny model)")
    ap.add_argument("--steps-25m", type=int, default=8, help="learner steps (25M model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    print(f"{'model':>6} {'placement':>14} {'compl/s':>9} {'wall s':>8} {'start s':>8} "
          f"{'pass@1':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for placement in args.placements:
                steps = args.steps if model == "tiny" else args.steps_25m
                row = run_once(model, placement, steps, Path(tmp), args.seed)
                rows.append(row)
                p1 = "" if row["pass1_after"] is None else f"{row['pass1_after']:.3f}"
                print(f"{model:>6} {placement:>14} {row['completions_per_s']:>9.1f} "
                      f"{row['wall_s']:>8.1f} {row['startup_s']:>8.1f} {p1:>7}", flush=True)
    ratio = {}
    for model in args.models:
        by = {r["placement"]: r for r in rows if r["model"] == model}
        if {"colocated", "disaggregated"} <= by.keys():
            ratio[model] = by["colocated"]["completions_per_s"] / \
                by["disaggregated"]["completions_per_s"]
    print(json.dumps({"rows": rows, "colocated_over_disaggregated": ratio}))


if __name__ == "__main__":
    main()
