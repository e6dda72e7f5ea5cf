"""The profile's PNG figures (matplotlib, Agg backend: no display needed).

timeline.png: spans of every process and thread over the last `window_s` seconds;
throughput.png: generated tokens/s per actor and trained tokens/s over time, with idle shares;
learning.png: reward and held-out accuracy per step;
histograms.png: staleness and per-prompt budget over all steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from telemetry.merge import ProcessTrace, aligned_spans, read_jsonl, step_wall  # noqa: E402


def draw_figures(run_dir: Path, procs: list[ProcessTrace], summary: dict[str, Any],
                 out_dir: Path, window_s: float) -> list[Path]:
    records = list(read_jsonl(run_dir / "metrics.jsonl")) \
        if (run_dir / "metrics.jsonl").is_file() else []
    steps = [r for r in records if r.get("step", 0) > 0]
    actor_files = sorted(run_dir.glob("metrics_actor*.jsonl"))
    offsets = {p.clock_id: p.cross_offset_ns / 1e9 for p in procs if p.clock_id}
    out = []
    for name, draw in (("timeline", lambda ax: _timeline(ax, procs, window_s)),
                       ("throughput", lambda ax: _throughput(ax, steps, actor_files, offsets)),
                       ("learning", lambda ax: _learning(ax, records)),
                       ("histograms", lambda ax: _histograms(ax, steps))):
        nrows = 1 if name == "timeline" else 2
        height = 1.5 + 0.4 * _rows(procs) if name == "timeline" else 6.5
        fig, axes = plt.subplots(nrows, 1, figsize=(12, max(height, 3.0)), squeeze=False)
        draw(axes[:, 0])
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        out.append(path)
    return out


def _rows(procs: list[ProcessTrace]) -> int:
    return sum(len({s["thread"] for s in p.spans}) for p in procs)


def _timeline(axes, procs: list[ProcessTrace], window_s: float) -> None:
    ax = axes[0]
    spans = aligned_spans(procs)
    if not spans:
        ax.set_title("no spans recorded")
        return
    end = max(s.end_ns for s in spans)
    start = max(min(s.start_ns for s in spans), end - int(window_s * 1e9))
    width_s = (end - start) / 1e9
    rows: dict[tuple[str, str], int] = {}
    for p in procs:  # track order: allocator, learners, actors
        for thread in dict.fromkeys(s["thread"] for s in p.spans):
            rows.setdefault((p.label, thread), len(rows))
    names = sorted({s.name for s in spans})
    cmap = plt.get_cmap("tab20")
    colour = {n: cmap(i % 20) for i, n in enumerate(names)}
    # Nested spans (train_step > fwd_bwd) are drawn inside their parent, thinner.
    bars: dict[tuple[int, int, str], list[tuple[float, float]]] = {}
    open_ends: dict[int, list[int]] = {}
    for s in sorted(spans, key=lambda s: (s.start_ns, -s.end_ns)):
        row = rows[(s.label, s.thread)]
        stack = open_ends.setdefault(row, [])
        while stack and stack[-1] <= s.start_ns:
            stack.pop()
        depth = len(stack)
        stack.append(s.end_ns)
        if s.end_ns < start:
            continue
        a = (max(s.start_ns, start) - start) / 1e9
        # Short spans stay visible as ticks.
        bars.setdefault((row, depth, s.name), []).append(
            (a, max((s.end_ns - start) / 1e9 - a, width_s / 1500)))
    for (row, depth, name), xs in bars.items():
        h = 0.8 * 0.6 ** depth
        ax.broken_barh(xs, (row - h / 2, h), facecolors=colour[name], linewidth=0)
    ax.set_yticks(range(len(rows)), [f"{label} / {thread}" for label, thread in rows],
                  fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, width_s)
    ax.set_xlabel(f"seconds (last {width_s:.1f} s of the run, allocator clock)")
    ax.legend(handles=[Patch(color=colour[n], label=n) for n in names], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=2 if len(names) > 12 else 1)
    ax.set_title("timeline")


def _throughput(axes, steps: list[dict], actor_files: list[Path],
                offsets: dict[str, float]) -> None:
    rate, idle = axes
    t0 = min([r["time"] - step_wall(r) for r in steps[:1]], default=0.0)
    for f in actor_files:
        lines = [ln for ln in read_jsonl(f) if "actor" in ln]
        xs, gen, idl = [], [], []
        for a, b in zip(lines, lines[1:], strict=False):
            dt = b["time"] - a["time"]
            if a["actor"] != b["actor"] or dt <= 0:
                continue  # a restart: counters begin again
            eng = sum(b.get(k, 0) - a.get(k, 0)
                      for k in ("engine_busy_s", "engine_idle_s", "weights_s"))
            xs.append((a["time"] + b["time"]) / 2 + offsets.get(a["actor"], 0.0) - t0)
            gen.append((b.get("gen_tokens", 0) - a.get("gen_tokens", 0)) / dt)
            idl.append((b["engine_idle_s"] - a["engine_idle_s"]) / eng if eng > 0 else np.nan)
        name = f.stem.removeprefix("metrics_")
        rate.plot(xs, gen, label=f"{name} generated", lw=1)
        idle.plot(xs, idl, label=f"{name} engine idle", lw=1)
    if steps:
        xs = [r["time"] - t0 for r in steps]
        rate.plot(xs, [r.get("train_tokens", 0) / step_wall(r) for r in steps], "k.-",
                  label="learner trained", lw=1)
        idle.plot(xs, [r.get("time/wait_batch", 0) / step_wall(r) for r in steps], "k.-",
                  label="learner waiting for batches", lw=1)
    rate.set_ylabel("tokens/s")
    rate.set_title("throughput")
    idle.set_ylabel("idle share")
    idle.set_ylim(-0.02, 1.02)
    idle.set_xlabel("seconds since the first learner step")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def _learning(axes, records: list[dict]) -> None:
    train, held = axes
    steps = [r for r in records if r.get("step", 0) > 0]
    for key in ("reward/mean", "accuracy/train", "zero_signal_frac"):
        pts = [(r["step"], r[key]) for r in steps if key in r]
        if pts:
            train.plot(*zip(*pts, strict=True), ".-", label=key, lw=1)
    train.set_title("training batches")
    for key in ("eval/acc", "eval/pass1"):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            held.plot(*zip(*pts, strict=True), "o-", label=key)
    held.set_title("held-out evaluation")
    held.set_xlabel("learner step")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def _summed_hist(steps: list[dict], key: str) -> np.ndarray:
    hists = [np.asarray(r[key]) for r in steps if r.get(key)]
    out = np.zeros(max((h.size for h in hists), default=0), dtype=np.int64)
    for h in hists:
        out[: h.size] += h
    return out


def _histograms(axes, steps: list[dict]) -> None:
    for ax, key, label in ((axes[0], "staleness/hist", "staleness (versions behind), tokens"),
                           (axes[1], "budget/hist", "samples per prompt (n_i), prompts")):
        h = _summed_hist(steps, key)
        ax.bar(np.arange(h.size), h, width=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{label}, all {len(steps)} steps")
        ax.grid(alpha=0.3, axis="y")
