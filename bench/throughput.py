"""Completions per second of the whole RL loop, per placement, on this machine.

Runs `dynamo-rl run` on the built-in task for each placement (disaggregated: the cores split
between actor and learner, generation overlapping training; colocated: they take turns,
each with every core) and each model size (the 0.5M embedded model; a 25M Qwen2, hidden 512,
6 layers, built untrained with `build_sized_model`), the same batch shape (32 prompts x 8
samples per step) and the same number of steps, and reports from the run's own records:
completions/s in the training loop (samples / time from the first to the last step), the
wall time of the whole command, the start-up (launch -> first learner step) and the
held-out pass@1 at the end (embedded model only: the 25M model is untrained), scored
afterwards by `dynamo-rl eval` (16 samples per problem at temperature 1) with no evaluation
inside the loop, as TRL's model is.

    python bench/throughput.py                        # both sizes, both placements
    python bench/throughput.py --models tiny --steps 60
    python bench/throughput.py --peer trl             # and TRL's GRPOTrainer side by side
    python bench/throughput.py --peer trl --repeat 3  # medians of 3 alternating rounds
    python bench/throughput.py --keep /tmp/tp         # and keep each run's logs and traces

`--peer trl` also runs TRL's GRPOTrainer (bench/trl_grpo.py, in its own environment under
.cache/bench-trl, installed on first use; never a dependency of the project) on the same
model, task, batch shape and number of sampled completions, and its final model of the
embedded size is scored by the same `dynamo-rl eval`, so accuracy per sampled completion is
compared on one evaluator. TRL runs once with each of transformers' attention kernels
(`--peer-attn`, default sdpa and eager) and its faster run is the peer figure, so the ratio is
against TRL's best setting here, not only its default. This machine's speed drifts by up to
40% over minutes: `--repeat` runs every configuration (ours and TRL's, alternating) several
times and reports medians.

Final line: JSON with `rows` ([{model, placement, completions_per_s, wall_s, startup_s,
eval_pass1, peer_completions_per_s, peer_eval_pass1, runs_completions_per_s, ...}], medians
over the repeats), `colocated_over_disaggregated` and `over_peer` (ours / TRL's
completions/s per model and placement: the median over rounds of each round's ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = ROOT / ".cache" / "bench-trl"  # bench/trl_grpo.py installs TRL here
SIZES = {"tiny": None, "25M": dict(hidden_size=512, intermediate_size=2048,
                                   num_hidden_layers=6, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=64)}


def run_once(model: str, placement: str, steps: int, tmp: Path, seed: int,
             keep_final: bool = False) -> dict:
    run_dir = tmp / f"{model}-{placement}"
    # keep_final: a checkpoint at the last step, for `dynamo-rl eval` (one write, ~0.1 s)
    args = [sys.executable, "-m", "launch.cli", "run", str(ROOT / "configs" / "default.toml"),
            "--run_dir", str(run_dir), "--placement", placement, "--learner.total_steps",
            str(steps), "--learner.checkpoint_every", str(steps if keep_final else 10 * steps),
            "--learner.seed", str(seed), "--allocator.seed", str(seed)]
    if SIZES[model] is not None:
        from launch.embedded_model import build_sized_model

        path = build_sized_model(tmp / f"model-{model}", seed=seed, **SIZES[model])
        # untrained: every group is flat unless kept (the learner then does its full work)
        args += ["--model.path", str(path), "--learner.eval_every", "0",
                 "--learner.skip_zero_signal", "false", "--preset", "grpo"]
    else:  # scored afterwards by `dynamo-rl eval`, as TRL's model is: no evaluation in the loop
        args += ["--learner.eval_every", "0"]
    t0 = time.time()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{model}/{placement}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [x for x in recs if x.get("step", 0) > 0]
    # the training loop: from the end of the first step to the end of the last
    loop_s = steps_[-1]["time"] - steps_[0]["time"]
    samples = sum(x["samples"] for x in steps_[1:])
    return {"model": model, "placement": placement, "steps": len(steps_),
            "completions_per_s": samples / loop_s, "wall_s": wall,
            "startup_s": steps_[0]["time"] - t0,
            "model_dir": str(run_dir), "model_path": _model_arg(args)}


def _model_arg(args: list[str]) -> str | None:
    return args[args.index("--model.path") + 1] if "--model.path" in args else None


def run_peer(model: str, model_path: str | None, steps: int, tmp: Path, seed: int,
             attn: str) -> dict:
    """TRL's GRPOTrainer on the same model and batch shape (bench/trl_grpo.py), with the
    model's attention kernels `attn`."""
    if not (PEER_DIR / "trl").is_dir():
        subprocess.run([sys.executable, str(ROOT / "bench/trl_grpo.py"), "--install"],
                       check=True)
    cmd = [sys.executable, str(ROOT / "bench/trl_grpo.py"), str(ROOT / "configs/default.toml"),
           "--steps", str(steps), "--seed", str(seed), "--attn", attn,
           "--out", str(tmp / f"trl-{model}-{attn}")]
    if model_path is not None:
        cmd += ["--model", model_path]
    env = {**os.environ, "PYTHONPATH": str(PEER_DIR)}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=7200, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"trl/{model}/{attn}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def held_out_pass1(model_dir: str, tmp: Path, name: str) -> float:
    """pass@1 of a final model on the held-out set: 16 samples per problem at temperature 1,
    by `dynamo-rl eval` (the same evaluator for both trainers' models)."""
    out = tmp / f"eval-{name}.json"
    r = subprocess.run([sys.executable, "-m", "launch.cli", "eval",
                        str(ROOT / "configs/default.toml"), "--model", model_dir, "--bench",
                        "arithmetic", "--k", "16", "--temperature", "1.0", "--top-p", "1.0",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"eval {name}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return json.loads(out.read_text())["benchmarks"]["arithmetic"]["pass@1"]


def one_round(args: argparse.Namespace, tmp: Path, rep: int) -> list[dict]:
    """Every model and placement once, then TRL on each model (when asked)."""
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        steps = args.steps if model == "tiny" else args.steps_25m
        for placement in args.placements:
            row = run_once(model, placement, steps, tmp, args.seed, keep_final=model == "tiny")
            # the 25M model is untrained: its accuracy says nothing
            row["eval_pass1"] = held_out_pass1(row["model_dir"], tmp, placement) \
                if model == "tiny" else None
            rows.append(row)
            p1 = "" if row["eval_pass1"] is None else f"{row['eval_pass1']:.3f}"
            print(f"{rep:>3} {model:>6} {placement:>14} {row['completions_per_s']:>9.1f} "
                  f"{row['wall_s']:>8.1f} {row['startup_s']:>8.1f} {p1:>7}", flush=True)
        if args.peer:
            # TRL with each attention setting; the faster one is the peer (its best here)
            peers = {}
            for attn in args.peer_attn:
                peers[attn] = run_peer(model, rows[-1]["model_path"], steps, tmp, args.seed,
                                       attn)
                p = peers[attn]
                print(f"{rep:>3} {model:>6} {'trl-' + attn:>14} {p['completions_per_s']:>9.1f} "
                      f"{p['wall_s']:>8.1f} {p['startup_s']:>8.1f}", flush=True)
            best = max(peers, key=lambda a: peers[a]["completions_per_s"])
            peer = peers[best]
            peer_p1 = held_out_pass1(peer["model_dir"], tmp, "trl") if model == "tiny" else None
            if peer_p1 is not None:
                print(f"{rep:>3} {model:>6} {'trl-' + best:>14} {'':>9} {'':>8} {'':>8} "
                      f"{peer_p1:>7.3f}", flush=True)
            for r in rows:
                if r["model"] == model:
                    r.update(peer_completions_per_s=peer["completions_per_s"],
                             peer_wall_s=peer["wall_s"], peer_startup_s=peer["startup_s"],
                             peer_eval_pass1=peer_p1, peer_attn=best,
                             peer_by_attn={a: p["completions_per_s"]
                                           for a, p in peers.items()})
    return rows


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """One row per (model, placement): the median of every figure over the repeats, with
    each repeat's completions/s (and TRL's) kept as lists."""
    out = []
    for i, first in enumerate(runs[0]):
        same = [run[i] for run in runs]
        row = {k: first[k] for k in ("model", "placement", "steps")}
        for k in ("completions_per_s", "wall_s", "startup_s", "eval_pass1",
                  "peer_completions_per_s", "peer_wall_s", "peer_startup_s", "peer_eval_pass1"):
            vals = [r[k] for r in same if r.get(k) is not None]
            if vals:
                row[k] = statistics.median(vals)
        row["runs_completions_per_s"] = [r["completions_per_s"] for r in same]
        if "peer_completions_per_s" in first:
            row["runs_peer_attn"] = [r["peer_attn"] for r in same]
            row["runs_peer_by_attn"] = [r["peer_by_attn"] for r in same]
            row["runs_peer_completions_per_s"] = [r["peer_completions_per_s"] for r in same]
            # each round's ratio (TRL ran minutes after ours): the machine's speed drifts
            # between rounds, so the median of these is steadier than a ratio of medians
            row["runs_over_peer"] = [r["completions_per_s"] / r["peer_completions_per_s"]
                                     for r in same]
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--placements", nargs="+", default=["disaggregated", "colocated"])
    ap.add_argument("--steps", type=int, default=60, help="learner steps (tiny model)")
    ap.add_argument("--steps-25m", type=int, default=8, help="learner steps (25M model)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every run (ours and TRL's alternate); medians reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer", choices=["trl"], help="also run TRL's GRPOTrainer side by side")
    ap.add_argument("--peer-attn", nargs="+", choices=["sdpa", "eager"],
                    default=["sdpa", "eager"], help="TRL's attention kernels, each run; the "
                    "faster is the peer figure")
    ap.add_argument("--keep", type=Path, help="keep every run's directory (logs, traces, "
                    "metrics) under this folder instead of a temporary one")
    args = ap.parse_args()
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        # a run directory left there would be refused ("already holds a run") mid-benchmark
        ap.error(f"--keep {args.keep}: not empty; name a new or empty folder")
    print(f"{'rep':>3} {'model':>6} {'placement':>14} {'compl/s':>9} {'wall s':>8} "
          f"{'start s':>8} {'pass@1':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        runs = [one_round(args, root / f"r{rep}", rep) for rep in range(args.repeat)]
    rows = median_rows(runs)
    ratio = {}
    for model in args.models:
        by = {r["placement"]: r for r in rows if r["model"] == model}
        if {"colocated", "disaggregated"} <= by.keys():
            ratio[model] = by["colocated"]["completions_per_s"] / \
                by["disaggregated"]["completions_per_s"]
    over_peer = {f"{r['model']}/{r['placement']}": statistics.median(r["runs_over_peer"])
                 for r in rows if "runs_over_peer" in r}
    for r in rows:
        if "runs_over_peer" in r:
            each = ", ".join(f"{x:.2f}" for x in r["runs_over_peer"])
            print(f"{r['model']}/{r['placement']}: "
                  f"{over_peer[r['model'] + '/' + r['placement']]:.2f}x TRL's completions/s "
                  f"(median of the rounds' ratios: {each})", flush=True)
    print(json.dumps({"rows": rows, "colocated_over_disaggregated": ratio,
                      "over_peer": over_peer}))


if __name__ == "__main__":
    main()
