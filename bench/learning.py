"""Does DynaMO beat GRPO here? The four presets through the real system, several seeds.

Every run: allocator + vLLM CPU actor + DeepSpeed learner (async), the embedded model on the
built-in task, the same number of learner steps and so the same number of sampled
completions (every preset spends exactly B * n_mean samples per round), held-out greedy
accuracy and sampled pass@1 (4 samples) evaluated every `--eval-every` steps, per difficulty
bucket. Also per run: the fraction of sampled completions that carried a learning signal
(non-zero advantage) and the learner's split-half estimate of gradient variance.

Output: a table (mean ± std over seeds), `learning.png` (held-out accuracy against samples
consumed), and one JSON line. About 2 minutes per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from launch.embedded_model import ensure_embedded_model
from launch.harness import make_config

_ROOT = Path(__file__).resolve().parents[1]

PRESETS = ("grpo", "alloc-only", "modulation-only", "dynamo")


def one_run(preset: str, seed: int, args, tmp: Path, model: Path) -> list[dict]:
    run_dir = tmp / f"{preset}-s{seed}"
    cfg = make_config(
        run_dir, model, preset=preset,
        task={"num_problems": args.problems, "num_eval_problems": 512},
        allocator={"batch_prompts": 32, "n_mean": 8, "n_min": 4, "n_max": 16,
                   "max_staleness": 1, "seed": seed, **args.alloc},
        actor={"seed": seed},
        learner={"total_steps": args.steps, "prompts_per_step": 32, "lr": args.lr,
                 "eval_every": args.eval_every, "checkpoint_every": 10**6, "seed": seed,
                 "grad_variance_every": args.eval_every})
    r = subprocess.run([sys.executable, "-m", "launch.cli", "run", str(cfg)], cwd=_ROOT,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{preset} seed {seed} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarise(recs: list[dict]) -> dict:
    steps = [r for r in recs if r["step"] > 0]
    evals = [r for r in recs if "eval/acc" in r]
    samples = np.cumsum([0] + [r["samples"] for r in steps])
    curve = [(int(samples[r["step"]]), r["eval/acc"], r["eval/pass1"]) for r in evals]
    total = sum(r["samples"] for r in steps)
    signal = sum(r.get("signal_samples", 0) for r in steps) / max(total, 1)
    var = [r["grad/split_half_var"] for r in steps if "grad/split_half_var" in r]
    last = evals[-1]
    return {"curve": curve, "acc": last["eval/acc"], "pass1": last["eval/pass1"],
            "acc0": evals[0]["eval/acc"], "pass1_0": evals[0]["eval/pass1"],
            "buckets": {k.removeprefix("eval/pass1_"): v for k, v in last.items()
                        if k.startswith("eval/pass1_")},
            "signal_frac": signal, "grad_var": float(np.mean(var)) if var else None,
            "samples": total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-4)
    # 512 problems: 60 steps x 32 prompts pass over the set ~3.75 times, so the allocator has
    # per-problem statistics for most of the run (in a first epoch every budget is uniform).
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", default="bench/learning.png")
    ap.add_argument("--alloc", action="append", default=[], metavar="KEY=VALUE",
                    help="allocator setting for every run (repeatable), e.g. rule=std or "
                    "stats_half_life=64; values are parsed as JSON where they parse")
    ap.add_argument("--runs-out", default=None,
                    help="also write every run's summary (curves, buckets) to this JSON file")
    args = ap.parse_args()
    alloc = {}
    for kv in args.alloc:
        key, _, raw = kv.partition("=")
        try:
            alloc[key] = json.loads(raw)
        except json.JSONDecodeError:
            alloc[key] = raw
    args.alloc = alloc
    model = ensure_embedded_model(_ROOT / ".cache/models", 600, 0, progress=False)
    presets = args.presets.split(",")
    res: dict[str, list[dict]] = {p: [] for p in presets}
    with tempfile.TemporaryDirectory() as d:
        for seed in range(args.seeds):
            for p in presets:
                s = summarise(one_run(p, seed, args, Path(d), model))
                res[p].append(s)
                print(f"{p:16s} seed {seed}: greedy {s['acc0']:.3f} -> {s['acc']:.3f}, "
                      f"pass@1 {s['pass1_0']:.3f} -> {s['pass1']:.3f}, signal "
                      f"{s['signal_frac']:.2f}, grad var {s['grad_var']}", flush=True)

    def ms(vals: list[float]) -> str:
        return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.3f}"

    print(f"\n{'preset':16s} {'greedy acc':>15s} {'pass@1':>15s} {'signal frac':>15s} "
          f"{'grad var':>12s}  per-bucket pass@1")
    table = {}
    for p, runs in res.items():
        buckets = sorted(runs[0]["buckets"])
        per_b = {b: float(np.mean([r["buckets"][b] for r in runs])) for b in buckets}
        gv = [r["grad_var"] for r in runs if r["grad_var"] is not None]
        print(f"{p:16s} {ms([r['acc'] for r in runs]):>15s} {ms([r['pass1'] for r in runs]):>15s} "
              f"{ms([r['signal_frac'] for r in runs]):>15s} "
              f"{(f'{np.mean(gv):.3g}' if gv else '-'):>12s}  "
              + " ".join(f"{b}:{v:.2f}" for b, v in per_b.items()))
        table[p] = {"acc_mean": float(np.mean([r["acc"] for r in runs])),
                    "acc_std": float(np.std([r["acc"] for r in runs], ddof=1))
                    if len(runs) > 1 else 0.0,
                    "pass1_mean": float(np.mean([r["pass1"] for r in runs])),
                    "pass1_std": float(np.std([r["pass1"] for r in runs], ddof=1))
                    if len(runs) > 1 else 0.0,
                    "signal_frac": float(np.mean([r["signal_frac"] for r in runs])),
                    "grad_var": float(np.mean(gv)) if gv else None, "per_bucket": per_b,
                    "samples": runs[0]["samples"]}
    if args.runs_out:
        Path(args.runs_out).write_text(json.dumps({"args": vars(args), "runs": res}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p, runs in res.items():
        xs = [c[0] for c in runs[0]["curve"]]
        for ax, i, label in ((axes[0], 1, "greedy accuracy"), (axes[1], 2, "pass@1 (4 samples)")):
            ys = np.array([[c[i] for c in r["curve"]] for r in runs])
            ax.plot(xs, ys.mean(0), label=p)
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.15)
            ax.set_xlabel("sampled completions consumed")
            ax.set_ylabel(f"held-out {label}")
    axes[0].legend()
    fig.suptitle(f"embedded model, built-in task, {args.seeds} seeds (mean ± std)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(json.dumps({"bench": "learning", "seeds": args.seeds, "steps": args.steps,
                      "presets": table, "figure": args.out}))


if __name__ == "__main__":
    main()
