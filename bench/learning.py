"""Does DynaMO beat GRPO here? The four presets and four controls through the real system.

Every run: allocator + vLLM CPU actor + DeepSpeed learner (async), with the paper's
optimisation structure (each rollout batch of 32 prompts is trained as several mini-batch
updates, 4 by default, all against the batch's πold), on either task:
- `builtin`: the embedded model on the built-in arithmetic task (512 training problems,
  512 held-out);
- `math-rehearsal`: configs/math-rehearsal.toml (generated word problems in the DAPO-Math-17k
  and MATH500 schemas, the Qwen-style chat template, math-verify rewards).

Every run of one task consumes the same number of sampled completions (each variant spends
B x n_mean samples per batch; the paper-budget control doubles n_mean and halves the steps).
Runs are paired by seed: seed s of every variant uses the same allocator, actor and learner
seeds. Held-out pass@1 with `--eval-samples` samples per problem (its standard error over
problems), greedy accuracy, the area under the pass@1 curve, the share of samples with a
learning signal, clip fractions, IS ratio extremes and the β statistics.

Variants (`--variants`, comma-separated):
  grpo, alloc-only, modulation-only, dynamo      the presets
  mod-const                                      modulation-only, β_comp := 1.2 on A > 0
  dynamo-update-scope                            dynamo, statistics over the whole update
  dynamo-keep-flat                               dynamo, flat groups kept (official setting)
  dynamo-paper-budget / grpo-paper-budget        n 16 / 8 / 24 at half the steps

Output: per-run lines, a table (mean ± std over seeds, and the paired difference to grpo),
the figure, every run's curves in `--runs-out`, one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from launch.harness import make_config

_ROOT = Path(__file__).resolve().parents[1]

PRESETS = ("grpo", "alloc-only", "modulation-only", "dynamo")
# variant -> (preset, learner overrides, allocator overrides, steps factor)
VARIANTS: dict[str, tuple[str, dict, dict, float]] = {
    **{p: (p, {}, {}, 1.0) for p in PRESETS},
    "mod-const": ("modulation-only", {"comp_constant": 1.2}, {}, 1.0),
    "dynamo-update-scope": ("dynamo", {"dynamo_stats_scope": "update"}, {}, 1.0),
    "dynamo-keep-flat": ("dynamo", {"skip_zero_signal": False}, {}, 1.0),
    "dynamo-paper-budget": ("dynamo", {}, {"n_mean": 16, "n_min": 8, "n_max": 24}, 0.5),
    "grpo-paper-budget": ("grpo", {}, {"n_mean": 16, "n_min": 8, "n_max": 24}, 0.5),
}
_PER_STEP_KEYS = ("clip/low", "clip/high", "clip/dual", "beta_comp/mean_pos", "beta_stab/mean",
                  "beta_stab/frac_below_0.99", "ratio/mean")


def run_config(variant: str, seed: int, args, run_dir: Path) -> Path:
    preset, learner, alloc, factor = VARIANTS[variant]
    steps = max(int(round(args.steps * factor)), 1)
    eval_every = max(int(round(args.eval_every * factor)), 1)
    learner = {"total_steps": steps, "prompts_per_step": 32, "lr": args.lr,
               "mini_batch_prompts": 32 // args.updates, "eval_every": eval_every,
               "eval_samples": args.eval_samples, "checkpoint_every": 10**6, "seed": seed,
               **learner}
    alloc = {"batch_prompts": 32, "max_staleness": args.updates, "seed": seed, **alloc}
    if args.task == "builtin":
        from launch.embedded_model import ensure_embedded_model

        model = ensure_embedded_model(_ROOT / ".cache/models", 600, 0, progress=False)
        return make_config(run_dir, model, preset=preset,
                           task={"num_problems": args.problems or 512,
                                 "num_eval_problems": 512},
                           allocator={"n_mean": 8, "n_min": 4, "n_max": 16, **alloc},
                           actor={"seed": seed}, learner=learner)
    base = tomllib.loads((_ROOT / "configs/math-rehearsal.toml").read_text())
    for key in ("run_dir", "preset"):
        base.pop(key, None)
    sections = {k: v for k, v in base.items() if isinstance(v, dict)}
    sections["allocator"] = {**sections.get("allocator", {}), **alloc}
    sections["learner"] = {**sections.get("learner", {}), **learner}
    sections["actor"] = {**sections.get("actor", {}), "seed": seed}
    if args.problems is not None:
        sections["task"] = {**sections.get("task", {}), "num_problems": args.problems}
    return make_config(run_dir, None, preset=preset, **sections)


def one_run(variant: str, seed: int, args, tmp: Path) -> list[dict]:
    run_dir = tmp / f"{variant}-s{seed}"
    cfg = run_config(variant, seed, args, run_dir)
    r = subprocess.run([sys.executable, "-m", "launch.cli", "run", str(cfg)], cwd=_ROOT,
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarise(recs: list[dict]) -> dict:
    steps = [r for r in recs if r["step"] > 0]
    evals = [r for r in recs if "eval/pass1" in r]
    samples = np.cumsum([0] + [r["samples"] for r in steps])
    curve = [(int(samples[r["step"]]), r["eval/acc"], r["eval/pass1"]) for r in evals]
    total = int(samples[-1])
    signal = sum(r.get("signal_samples", 0) for r in steps) / max(total, 1)
    xs = np.array([c[0] for c in curve], dtype=float)
    ys = np.array([c[2] for c in curve])
    # area under the held-out pass@1 curve, per sample consumed (a mean pass@1 over the run)
    auc = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / max(xs[-1] - xs[0], 1))
    last = evals[-1]
    out = {"curve": curve, "acc": last["eval/acc"], "pass1": last["eval/pass1"],
           "pass1_se": last.get("eval/pass1_se"), "acc0": evals[0]["eval/acc"],
           "pass1_0": evals[0]["eval/pass1"], "auc": auc, "signal_frac": signal,
           "samples": total, "updates": int(sum(r.get("updates", 1) for r in steps)),
           "buckets": {k.removeprefix("eval/pass1_"): v for k, v in last.items()
                       if k.startswith("eval/pass1_") and k != "eval/pass1_se"},
           "ratio_min": min((r["ratio/min"] for r in steps if "ratio/min" in r), default=None),
           "ratio_max": max((r["ratio/max"] for r in steps if "ratio/max" in r), default=None)}
    for key in _PER_STEP_KEYS:
        vals = [r[key] for r in steps if key in r]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def _ms(vals: list[float]) -> str:
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.3f}"


def _paired(runs: list[dict], base: list[dict], key: str) -> str:
    """Mean paired difference to the baseline over seeds, ± its standard error."""
    d = [r[key] - b[key] for r, b in zip(runs, base, strict=True)]
    se = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return f"{np.mean(d):+.3f} ± {se:.3f}"


def report(res: dict[str, list[dict]], args) -> dict:
    base = res.get("grpo")
    print(f"\n{'variant':20s} {'pass@1':>14s} {'(se/problems)':>13s} {'greedy':>14s} "
          f"{'AUC pass@1':>14s} {'signal':>6s} {'vs grpo pass@1':>15s} {'vs grpo AUC':>15s} "
          f"{'clip lo/hi':>11s} {'β_comp+':>7s} {'β_stab<.99':>10s}")
    table = {}
    for v, runs in res.items():
        f = {k: (float(np.mean([r[k] for r in runs])) if runs[0].get(k) is not None else None)
             for k in ("pass1", "pass1_se", "acc", "auc", "signal_frac", *_PER_STEP_KEYS)}
        f["pass1_std"] = float(np.std([r["pass1"] for r in runs], ddof=1)) if len(runs) > 1 else 0
        f["auc_std"] = float(np.std([r["auc"] for r in runs], ddof=1)) if len(runs) > 1 else 0
        f["samples"] = runs[0]["samples"]
        f["seeds"] = len(runs)
        paired = base is not None and v != "grpo" and len(base) == len(runs)
        if paired:
            f["vs_grpo_pass1"] = _paired(runs, base, "pass1")
            f["vs_grpo_auc"] = _paired(runs, base, "auc")

        def fmt(x, spec=".3f"):
            return "-" if x is None else format(x, spec)

        print(f"{v:20s} {_ms([r['pass1'] for r in runs]):>14s} {fmt(f['pass1_se']):>13s} "
              f"{_ms([r['acc'] for r in runs]):>14s} {_ms([r['auc'] for r in runs]):>14s} "
              f"{f['signal_frac']:6.3f} {f.get('vs_grpo_pass1', '-'):>15s} "
              f"{f.get('vs_grpo_auc', '-'):>15s} "
              f"{fmt(f['clip/low'], '.4f')}/{fmt(f['clip/high'], '.4f')} "
              f"{fmt(f['beta_comp/mean_pos']):>7s} "
              f"{fmt(f['beta_stab/frac_below_0.99'], '.4f'):>10s}",
              flush=True)
        table[v] = f
    return table


def figure(res: dict[str, list[dict]], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v, runs in res.items():
        n = min(len(r["curve"]) for r in runs)
        xs = [c[0] for c in runs[0]["curve"][:n]]
        for ax, i, label in ((axes[0], 1, "greedy accuracy"),
                             (axes[1], 2, f"pass@1 ({args.eval_samples} samples)")):
            ys = np.array([[c[i] for c in r["curve"][:n]] for r in runs])
            ax.plot(xs, ys.mean(0), label=v, ls="--" if v not in PRESETS else "-")
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.12)
            ax.set_xlabel("sampled completions consumed")
            ax.set_ylabel(f"held-out {label}")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{args.task}, {args.updates} updates per batch, {args.seeds} seeds "
                 "(mean ± std)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("builtin", "math-rehearsal"), default="builtin")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--updates", type=int, default=4, help="mini-batch updates per batch")
    ap.add_argument("--lr", type=float, default=None,
                    help="default: 5e-5 (builtin), the config's (math-rehearsal)")
    # builtin: 512 problems, so 60 steps x 32 prompts pass over the set ~3.75 times and the
    # allocator has per-problem statistics for most of the run (in a first epoch every budget
    # is uniform). math-rehearsal: the config's 2,048 unless given.
    ap.add_argument("--problems", type=int, default=None,
                    help="training problems (default: 512 builtin, the config's rehearsal)")
    ap.add_argument("--variants", default=",".join(PRESETS))
    ap.add_argument("--out", default="bench/learning.png")
    ap.add_argument("--work-dir", default=None, help="keep every run's directory here")
    ap.add_argument("--runs-out", default=None,
                    help="write every run's summary (curves, buckets) to this JSON file; "
                    "rewritten after each run, and runs already in it are not repeated")
    args = ap.parse_args()
    if args.lr is None:
        args.lr = 5e-5 if args.task == "builtin" else tomllib.loads(
            (_ROOT / "configs/math-rehearsal.toml").read_text())["learner"]["lr"]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    done: dict[str, dict] = {}
    if args.runs_out and Path(args.runs_out).exists():
        done = json.loads(Path(args.runs_out).read_text()).get("by_run", {})
    with tempfile.TemporaryDirectory() as tmp:
        d = args.work_dir or tmp
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for v in variants:
                key = f"{v}/s{seed}"
                if key not in done:
                    t = time.monotonic()
                    done[key] = summarise(one_run(v, seed, args, Path(d)))
                    done[key]["wall_s"] = time.monotonic() - t
                    if args.runs_out:
                        Path(args.runs_out).write_text(json.dumps(
                            {"args": vars(args), "by_run": done}, indent=1))
                s = done[key]
                print(f"{v:20s} seed {seed}: pass@1 {s['pass1_0']:.3f} -> {s['pass1']:.3f} "
                      f"(se {s['pass1_se'] or 0:.3f}), greedy {s['acc0']:.3f} -> {s['acc']:.3f}, "
                      f"AUC {s['auc']:.3f}, signal {s['signal_frac']:.2f}, "
                      f"{s['samples']} samples, {s['wall_s']:.0f} s", flush=True)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    res = {v: [done[f"{v}/s{s}"] for s in seeds] for v in variants}
    table = report(res, args)
    figure(res, args)
    print(json.dumps({"bench": "learning", "task": args.task, "seeds": args.seeds,
                      "steps": args.steps, "updates": args.updates, "variants": table,
                      "figure": args.out}))


if __name__ == "__main__":
    main()
