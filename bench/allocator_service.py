"""Allocator hot paths: budgets for a 10^6-prompt round and streamed statistics ingest.

- alloc: `dynamo_budgets` (priorities + water-fill + largest remainder) over 1,000,000
  problems with random integer statistics, some still exploring; median of --repeats.
- ingest: `ProblemStats.update` problem updates per second over 10^6 problems, batched
  (random indices, repeats included) and one group per call, with and without decay.

Prints a table, then one JSON line; the JSON reports the slower of decay on/off.

    python bench/allocator_service.py [--problems 1000000 --repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from allocator.budget import allocate, dynamo_budgets, priorities
from allocator.stats import ProblemStats

ALLOC_TARGET_MS = 100
INGEST_TARGET_PER_S = 200_000
LIMITS = dict(n_min=8, n_max=24, initial_budget=4)  # paper defaults, n_mean = 16


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_alloc(problems: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    g = rng.integers(0, 64, problems).astype(np.float64)  # ~1/8 below 8: exploring
    k = rng.binomial(g.astype(np.int64), rng.random(problems)).astype(np.float64)
    decay = 0.5 ** rng.random(problems)  # decayed statistics: no repeated values
    total = 16 * problems
    p, exploring = priorities(k, g, rule="variance", initial_budget=4, n_min=8)
    cases: dict[str, Callable[[], object]] = {
        f"dynamo_budgets variance, {problems} problems": lambda: dynamo_budgets(
            k, g, total=total, rule="variance", **LIMITS),
        "  of which allocate": lambda: allocate(p, exploring, total=total, **LIMITS),
        "dynamo_budgets std": lambda: dynamo_budgets(k, g, total=total, rule="std", **LIMITS),
        "dynamo_budgets uniform": lambda: dynamo_budgets(
            k, g, total=total, rule="uniform", **LIMITS),
        "dynamo_budgets variance, decayed": lambda: dynamo_budgets(
            k * decay, g * decay, total=total, rule="variance", **LIMITS),
    }
    return {name: median_seconds(fn, repeats) * 1e3 for name, fn in cases.items()}


def ingest_rate(problems: int, batch: int, half_life: float | None, repeats: int,
                one: bool = False) -> float:
    """Problem updates per second; `one` uses update_one instead of update([i], [k], [n])."""
    rng = np.random.default_rng(1)
    calls = max(20_000 // batch, 20)
    idx = rng.integers(0, problems, (calls, batch))
    n = rng.integers(2, 25, (calls, batch)).astype(np.float64)
    k = np.floor(rng.random((calls, batch)) * (n + 1))
    s = ProblemStats(problems, half_life=half_life)
    if one:
        rows = list(zip(idx[:, 0].tolist(), k[:, 0].tolist(), n[:, 0].tolist(), strict=True))

        def run() -> None:
            for i, ki, ni in rows:
                s.update_one(i, ki, ni)
    else:
        def run() -> None:
            for c in range(calls):
                s.update(idx[c], k[c], n[c])
    return calls * batch / median_seconds(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    alloc = bench_alloc(args.problems, args.repeats)
    print(f"{'allocation (median of ' + str(args.repeats) + ')':<48}{'ms':>10}")
    for name, ms in alloc.items():
        print(f"{name:<48}{ms:>10.1f}")

    rates: dict[tuple[str, str], float] = {}
    for decay_name, half_life in (("off", None), ("h=256", 256.0)):
        for batch in (1000, 100, 10, 1):
            rates[(f"update, batch {batch}", decay_name)] = ingest_rate(
                args.problems, batch, half_life, args.repeats)
        rates[("update_one", decay_name)] = ingest_rate(
            args.problems, 1, half_life, args.repeats, one=True)
    print(f"\n{'ingest over ' + str(args.problems) + ' problems':<32}"
          f"{'updates/s, no decay':>22}{'with decay':>14}")
    for name in dict.fromkeys(name for name, _ in rates):
        print(f"{name:<32}{rates[(name, 'off')]:>22,.0f}{rates[(name, 'h=256')]:>14,.0f}")

    def slower(name: str) -> int:
        return round(min(rates[(name, "off")], rates[(name, "h=256")]))

    print(json.dumps({
        "bench": "allocator",
        "alloc_1M_ms": round(alloc[f"dynamo_budgets variance, {args.problems} problems"], 1),
        "alloc_target_ms": ALLOC_TARGET_MS,
        "ingest_updates_per_s": slower("update, batch 1000"),
        "ingest_single_updates_per_s": slower("update, batch 1"),
        "ingest_update_one_per_s": slower("update_one"),
        "ingest_target_per_s": INGEST_TARGET_PER_S,
    }))


if __name__ == "__main__":
    main()
