"""DynaMO sequence level: per-prompt sample budgets from Bernoulli statistics (docs/DESIGN.md §2).

Pure, vectorised numpy; no state, no I/O. For a round of B prompts with per-problem
successes k and samples scored g (floats allowed: statistics may decay):

    P_i = k_i (g_i - k_i) / (g_i (g_i - 1))            unbiased Bernoulli variance, g_i >= 2
    exploring_i  <=>  g_i < b0,  b0 = max(initial_budget, n_min)
    priority_i = min_priority                            if k_i / g_i >= mastery_threshold
               = max(P_i + (1 - k_i/g_i)·1e-6, min_priority)   rule "variance" (reference code)
               = max(sqrt(P_i + (1 - k_i/g_i)·1e-6), min_priority)  rule "std" (Neyman, paper)
               = 1                                       rule "uniform" (plain GRPO)
    n_i = b0 if exploring, else n_min + water-fill share ∝ priority_i, capped at n_max

Invariants of `allocate` (checked by tests/test_allocator_budget.py):
- Σ n_i == total exactly, and n_min <= n_i <= n_max, or a `BudgetError` naming the
  quantities that make the round infeasible; nothing is ever silently clipped.
- Exploring prompts get exactly b0 unless every other prompt is already at n_max (see
  `allocate` for that fallback).
- Among non-exploring prompts, a higher priority never gets fewer samples; equal priorities
  get budgets differing by at most one. Ties are broken deterministically (larger fractional
  share, then higher priority, then lower index), so equal inputs give equal outputs.
- Cost is O(B) plus, only for pathological priority spreads, a sort of the prompts that
  could still hit n_max. B = 10^6: ~30 ms `allocate`, ~50 ms with `priorities`, on a
  2-core dev VM (bench/allocator.py).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Rule = Literal["variance", "std", "uniform"]

# Water-fill passes before switching to the exact sort-based solve (see `_water_fill`).
_MAX_CAP_PASSES = 8
# The continuous shares are scaled down by this much so that their floors never sum above
# the budget; largest remainder then hands the missing units back (see `_water_fill`).
_SHARE_SAFETY = 1.0 - 1e-9
# Histogram narrowing of the largest-remainder selection (see `_mth_largest`).
_BUCKETS = 4096
_MAX_NARROWING = 4


class BudgetError(ValueError):
    """A round's sample budget cannot satisfy n_min <= n_i <= n_max with Σ n_i == total."""


def bernoulli_variance(k: ArrayLike, g: ArrayLike) -> NDArray[np.float64]:
    """Unbiased variance of a Bernoulli pass rate, P = k (g - k) / (g (g - 1)).

    Defined as 0 where g < 2: one sample (or none) says nothing about spread, and 0 puts
    such a problem at the priority floor rather than making it look maximally uncertain.
    k and g may be floats (decayed statistics); k = 3, g = 4 gives 0.25.
    """
    k = np.asarray(k, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    defined = g >= 2.0
    denom = np.where(defined, g * (g - 1.0), 1.0)
    return np.where(defined, k * (g - k) / denom, 0.0)


def priorities(
    k: ArrayLike,
    g: ArrayLike,
    *,
    rule: Rule,
    initial_budget: int,
    n_min: int,
    mastery_threshold: float = 0.85,
    min_priority: float = 0.01,
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Per-problem water-fill priority and exploring mask (docs/DESIGN.md §2, priority rule).

    Returns (priority, exploring). Exploring problems (g < max(initial_budget, n_min)) carry
    priority 0: they take no part in the water-fill. For "std" the floor min_priority is
    applied after the square root, so it bounds the weight itself under either rule.
    "uniform" is plain GRPO: every problem has priority 1 and none is exploring, so a round
    is split evenly whatever the statistics say.
    """
    k = np.asarray(k, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    if k.shape != g.shape or k.ndim != 1:
        raise ValueError(f"k and g must be 1-D of the same length, got {k.shape} and {g.shape}")
    if not min_priority > 0.0:
        raise ValueError(f"min_priority = {min_priority} must be > 0 (it is a water-fill weight)")
    if rule == "uniform":
        return np.ones_like(g), np.zeros(g.shape, dtype=bool)
    if rule not in ("variance", "std"):
        raise ValueError(f"unknown priority rule {rule!r}; expected 'variance', 'std' or 'uniform'")
    if np.any(k < 0.0) or np.any(k > g):
        raise ValueError("statistics must satisfy 0 <= k <= g")

    b0 = max(initial_budget, n_min)
    exploring = g < b0
    pass_rate = np.divide(k, g, out=np.zeros_like(g), where=g > 0)
    mastered = pass_rate >= mastery_threshold

    # priority = max(P + (1 - k/g)·1e-6, min_priority); the 1e-6 term orders problems of equal
    # variance by how often they fail (reference implementation's rule).
    variance = bernoulli_variance(k, g) + (1.0 - pass_rate) * 1e-6
    weight = variance if rule == "variance" else np.sqrt(variance)
    priority = np.maximum(weight, min_priority)
    priority[mastered] = min_priority
    priority[exploring] = 0.0
    return priority, exploring


def _check_budget_params(n_min: int, n_max: int, initial_budget: int) -> int:
    """Validate per-prompt limits; return the exploring budget b0 = max(initial_budget, n_min)."""
    if n_min < 2:
        raise BudgetError(f"n_min = {n_min} but GRPO needs at least 2 samples per group")
    if n_min > n_max:
        raise BudgetError(f"n_min = {n_min} exceeds n_max = {n_max}")
    b0 = max(initial_budget, n_min)
    if b0 > n_max:
        raise BudgetError(
            f"exploring budget max(initial_budget, n_min) = {b0} exceeds n_max = {n_max}")
    return b0


def check_budget_feasible(
    batch_prompts: int, n_mean: int, n_min: int, n_max: int, initial_budget: int
) -> int:
    """Start-up check of an allocator configuration; returns the round total N = B·n_mean.

    Besides B·n_min <= N <= B·n_max this requires max(initial_budget, n_min) <= n_mean: in
    the first round every prompt is unexplored and gets that budget, and Σ n_i must be N.
    """
    if batch_prompts < 1:
        raise BudgetError(f"batch_prompts = {batch_prompts}; a round needs at least one prompt")
    b0 = _check_budget_params(n_min, n_max, initial_budget)
    total = batch_prompts * n_mean
    _check_total(batch_prompts, total, n_min, n_max)
    if b0 > n_mean:
        raise BudgetError(
            f"exploring budget max(initial_budget, n_min) = {b0} exceeds n_mean = {n_mean}: a "
            f"first round of B={batch_prompts} unexplored prompts needs B*{b0} = "
            f"{batch_prompts * b0} samples but total = B*n_mean = {total}")
    return total


def _check_total(batch: int, total: int, n_min: int, n_max: int) -> None:
    if batch * n_min > total:
        raise BudgetError(
            f"round of B={batch} prompts needs at least B*n_min = {batch * n_min} samples "
            f"but total = {total}")
    if total > batch * n_max:
        raise BudgetError(
            f"round of B={batch} prompts takes at most B*n_max = {batch * n_max} samples "
            f"but total = {total}")


def allocate(
    priority: ArrayLike,
    exploring: ArrayLike,
    *,
    total: int,
    n_min: int,
    n_max: int,
    initial_budget: int,
) -> NDArray[np.int64]:
    """Integer budgets n_i with Σ n_i == total and n_min <= n_i <= n_max (docs/DESIGN.md §2).

    Exploring prompts get b0 = max(initial_budget, n_min); every other prompt gets n_min
    plus a share of the remainder proportional to its priority, capped at n_max, overflow
    re-spread over the uncapped (water-fill), rounded by largest remainder.

    Fallback: if every non-exploring prompt sits at n_max (or there are none) and samples
    remain, the rest is spread evenly over the exploring prompts up to n_max, lower index
    first for the odd units. Since total <= B·n_max this always succeeds, so the only errors
    are the up-front `BudgetError`s for infeasible parameters.
    """
    priority = np.asarray(priority, dtype=np.float64)
    exploring = np.asarray(exploring, dtype=bool)
    if priority.ndim != 1 or priority.shape != exploring.shape:
        raise ValueError(
            f"priority and exploring must be 1-D of the same length, got {priority.shape} "
            f"and {exploring.shape}")
    b0 = _check_budget_params(n_min, n_max, initial_budget)
    batch = priority.size
    _check_total(batch, total, n_min, n_max)
    n_exploring = int(np.count_nonzero(exploring))
    floor_total = n_exploring * b0 + (batch - n_exploring) * n_min
    if floor_total > total:
        raise BudgetError(
            f"{n_exploring} exploring prompts at max(initial_budget, n_min) = {b0} plus "
            f"{batch - n_exploring} others at n_min = {n_min} need {floor_total} samples "
            f"but total = {total}")

    n = np.where(exploring, b0, n_min).astype(np.int64)
    remaining = total - floor_total
    active = np.flatnonzero(~exploring)
    w = priority[active]
    if not (np.all(np.isfinite(w)) and np.all(w > 0.0)):
        raise ValueError("priorities of non-exploring prompts must be finite and > 0")

    cap = n_max - n_min
    if remaining >= active.size * cap:
        # Everyone in the water-fill is at n_max: the rest goes evenly to exploring prompts.
        n[active] = n_max
        left = remaining - active.size * cap
        if left:
            explorers = np.flatnonzero(exploring)  # non-empty, as total <= B·n_max
            each, odd = divmod(left, explorers.size)
            n[explorers] += each
            n[explorers[:odd]] += 1
        return n
    if remaining > 0:
        n[active] += _water_fill(w, remaining, cap)
    return n


def _water_fill(w: NDArray[np.float64], budget: int, cap: int) -> NDArray[np.int64]:
    """Integers x_i in [0, cap] summing to budget, each within 1 of min(cap, t·w_i).

    Requires 0 < budget < len(w)·cap and w > 0. The level t (where Σ min(cap, t·w_i) equals
    budget) is found by capping passes:
    t = budget_left / Σ_uncapped w, cap every prompt with t·w_i >= cap, repeat. t never
    decreases, so capped prompts stay capped and the fixed point is the exact water-fill.
    Realistic priorities converge in 1-3 passes; if not within _MAX_CAP_PASSES, the exact
    level is read off the few largest remaining weights, sorted (at most budget // cap of
    them can still be capped).
    """
    capped = np.zeros(w.size, dtype=bool)
    left = budget
    for _ in range(_MAX_CAP_PASSES):
        t = left / np.sum(w, where=~capped)
        newly = (w * t >= cap) & ~capped
        n_new = int(np.count_nonzero(newly))
        if n_new == 0:
            break
        capped |= newly
        left -= n_new * cap
    else:
        capped |= _cap_by_sorting(w, capped, left, cap)
        left = budget - int(np.count_nonzero(capped)) * cap

    # Continuous shares x_i = min(cap, t·w_i), t recomputed from the final capped set.
    # Scaling t down by _SHARE_SAFETY keeps Σ floor(x) <= budget despite rounding error.
    t = left / np.sum(w, where=~capped) * _SHARE_SAFETY
    share = np.minimum(t * w, cap)
    share[capped] = cap
    whole = np.floor(share)
    short = budget - int(whole.sum())  # float64 sums these integers exactly (< 2^53)
    if short < 0 or short > np.count_nonzero(whole < cap):
        raise RuntimeError(f"water-fill rounding is off by {short} units")  # unreachable
    # Largest remainder: one more sample to the `short` largest fractional parts.
    frac = np.subtract(share, whole, out=share)
    frac[whole == cap] = -1.0  # prompts at the cap take no extra unit
    x = whole.astype(np.int64)
    x[_top(short, frac, w)] += 1
    return x


def _cap_by_sorting(
    w: NDArray[np.float64], capped: NDArray[np.bool_], left: int, cap: int
) -> NDArray[np.bool_]:
    """Exact completion of the capping passes: mask of further prompts that reach the cap.

    With `left` samples to spread over the uncapped prompts (left < their count · cap), at most
    c = left // cap more can be capped, and they are the c largest weights. Taking the
    c + 1 largest in descending order w_(0) >= w_(1) >= ..., capping the first j gives level
    t_j = (left - j·cap) / (Σ_uncapped w - Σ_{i<j} w_(i)); the answer is the smallest j whose
    first uncapped weight fits, t_j · w_(j) < cap (j = c always does).
    """
    free = np.flatnonzero(~capped)
    wf = w[free]
    c = min(left // cap, free.size - 1)
    top = np.argpartition(-wf, c)[: c + 1] if c + 1 < free.size else np.arange(free.size)
    order = top[np.argsort(-wf[top], kind="stable")]
    w_sorted = wf[order]
    j = np.arange(c + 1)
    level = (left - j * cap) / (wf.sum() - np.concatenate(([0.0], np.cumsum(w_sorted[:-1]))))
    first_fit = int(np.argmax(level * w_sorted < cap))
    more = np.zeros(w.size, dtype=bool)
    more[free[order[:first_fit]]] = True
    return more


def _top(m: int, frac: NDArray[np.float64], prio: NDArray[np.float64]) -> NDArray[np.int64]:
    """Positions of the m largest `frac`, ties to higher `prio`, then to lower position. O(len)."""
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    if m >= frac.size:
        return np.arange(frac.size)
    cut = _mth_largest(frac, m)
    above = np.flatnonzero(frac > cut)
    tied = np.flatnonzero(frac == cut)  # ascending, so slicing prefers lower positions
    need = m - above.size
    if need < tied.size:
        p = prio[tied]
        p_cut = _mth_largest(p, need)
        higher = tied[p > p_cut]
        tied = np.concatenate((higher, tied[p == p_cut][: need - higher.size]))
    return np.concatenate((above, tied))


def _mth_largest(v: NDArray[np.float64], m: int) -> float:
    """The m-th largest value of v (1 <= m <= len(v)).

    np.partition slows down several-fold on arrays with many repeated values, which is what
    integer statistics produce (a 10^6 round has only a few thousand distinct shares). So
    narrow down first: histogram v into _BUCKETS equal bins, keep the bin holding the m-th
    largest, repeat a few times, then partition what is left.
    """
    for _ in range(_MAX_NARROWING):
        if v.size <= _BUCKETS:
            break
        lo, hi = float(v.min()), float(v.max())
        if lo == hi:
            return hi
        scale = _BUCKETS / (hi - lo)
        if not 0.0 < scale < np.inf:  # range too narrow or too wide to bin: partition it all
            break
        bucket = np.minimum(((v - lo) * scale).astype(np.int64), _BUCKETS - 1)
        counts_from_top = np.cumsum(np.bincount(bucket, minlength=_BUCKETS)[::-1])
        j = int(np.searchsorted(counts_from_top, m))  # first bin (from the top) reaching m
        if j:
            m -= int(counts_from_top[j - 1])
        v = v[bucket == _BUCKETS - 1 - j]
    return float(np.partition(v, v.size - m)[v.size - m])


def dynamo_budgets(
    k: ArrayLike,
    g: ArrayLike,
    *,
    total: int,
    n_min: int,
    n_max: int,
    rule: Rule,
    initial_budget: int,
    mastery_threshold: float = 0.85,
    min_priority: float = 0.01,
) -> NDArray[np.int64]:
    """Budgets for one round straight from the statistics: `priorities` then `allocate`."""
    priority, exploring = priorities(
        k, g, rule=rule, initial_budget=initial_budget, n_min=n_min,
        mastery_threshold=mastery_threshold, min_priority=min_priority)
    return allocate(priority, exploring, total=total, n_min=n_min, n_max=n_max,
                    initial_budget=initial_budget)
