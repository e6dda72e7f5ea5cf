"""DynaMO sequence-level budgets (allocator/budget.py, docs/DESIGN.md §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocator import budget
from allocator.budget import (
    BudgetError,
    allocate,
    bernoulli_variance,
    check_budget_feasible,
    dynamo_budgets,
    priorities,
)

# Paper defaults: n_mean 16, n_min 8, n_max 24, initial budget 4 (raised to n_min = 8).
DEFAULTS = dict(n_min=8, n_max=24, initial_budget=4)


# --- reference numbers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "g", "expected"),
    [
        (3, 4, 0.25),  # 3·1 / (4·3)
        (1, 2, 0.5),  # 1·1 / (2·1)
        (2, 4, 1 / 3),  # 2·2 / (4·3)
        (4, 8, 2 / 7),  # 4·4 / (8·7)
        (0, 5, 0.0),  # never solved: no spread
        (5, 5, 0.0),  # always solved: no spread
        (1.5, 3.0, 0.375),  # decayed counts: 1.5·1.5 / (3·2)
        (1, 1, 0.0),  # g < 2: defined as 0
        (0, 0, 0.0),
    ],
)
def test_bernoulli_variance_reference_values(k: float, g: float, expected: float) -> None:
    assert bernoulli_variance(k, g) == pytest.approx(expected, abs=1e-15)


def test_bernoulli_variance_is_vectorised() -> None:
    p = bernoulli_variance(np.array([3, 0, 1]), np.array([4, 0, 2]))
    np.testing.assert_allclose(p, [0.25, 0.0, 0.5])


def test_priority_rules_reference_values() -> None:
    # k/g: 3/4 mixed, 17/20 = 0.85 mastered (threshold inclusive), 0/6 unsolved, 1/2 exploring.
    k = np.array([3.0, 17.0, 0.0, 1.0])
    g = np.array([4.0, 20.0, 6.0, 2.0])
    kw = dict(initial_budget=4, n_min=2)
    p, exploring = priorities(k, g, rule="variance", **kw)
    # 0.25 + (1 - 0.75)·1e-6; floor; max(0 + 1·1e-6, 0.01); exploring carries 0.
    np.testing.assert_allclose(p, [0.25 + 0.25e-6, 0.01, 0.01, 0.0], rtol=1e-12)
    assert exploring.tolist() == [False, False, False, True]

    p_std, _ = priorities(k, g, rule="std", **kw)
    # Neyman: sqrt of the same quantity; the floor applies after the square root.
    np.testing.assert_allclose(p_std, [math.sqrt(0.25 + 0.25e-6), 0.01, 0.01, 0.0], rtol=1e-12)

    p_uni, exploring_uni = priorities(k, g, rule="uniform", **kw)
    assert p_uni.tolist() == [1.0] * 4 and not exploring_uni.any()


def test_initial_budget_is_raised_to_n_min_for_exploring() -> None:
    # initial_budget 4 < n_min 8: a problem with 6 samples is still exploring.
    _, exploring = priorities([3, 3], [6, 8], rule="variance", initial_budget=4, n_min=8)
    assert exploring.tolist() == [True, False]


def test_one_in_a_million_failure_term_orders_equal_variances() -> None:
    # k=1 and k=3 out of 4 have the same P = 0.1875; the one failing more ranks higher.
    p, _ = priorities([1, 3], [4, 4], rule="variance", initial_budget=4, n_min=2)
    assert p[0] > p[1]
    assert p[0] - p[1] == pytest.approx(0.5e-6)


# --- worked examples ---------------------------------------------------------------------


def test_worked_example_cap_overflow_and_largest_remainder() -> None:
    # g = 8 for all (explored), k = [4, 0, 8, 2], N = 4·16 = 64.
    # P = [16/56, 0, 0, 12/56] = [2/7, 0, 0, 3/14]
    # priority = [2/7 + 0.5e-6, 0.01 (all wrong: floor), 0.01 (mastered), 3/14 + 0.75e-6]
    # Base 4·8 = 32, remainder 32, room per prompt 24 - 8 = 16.
    # Level t = 32 / 0.5200013 = 61.54: problem 0's share 17.6 > 16, capped (n = 24).
    # Re-fill 16 over [0.01, 0.01, 0.2142865]: t = 68.29, shares [0.683, 0.683, 14.634].
    # Floors [0, 0, 14] sum to 14; the 2 units left go to the largest fractions 0.683, 0.683.
    n = dynamo_budgets([4, 0, 8, 2], [8] * 4, total=64, rule="variance", **DEFAULTS)
    assert n.tolist() == [24, 9, 9, 22]
    assert n.dtype == np.int64


def test_worked_example_std_rule_spreads_more_evenly_at_the_top() -> None:
    # Same problems, Neyman weights sqrt(P + ...): [0.5345, 0.01, 0.01, 0.4629].
    # t = 32 / 1.0174 = 31.45: problem 0's share 16.8 is capped again (n = 24).
    # Re-fill 16 over [0.01, 0.01, 0.4629]: t = 33.13, shares [0.331, 0.331, 15.337].
    # Floors [0, 0, 15] leave 1 unit; 0.337 > 0.331 so problem 3 takes it: 8 + 16 = 24.
    n = dynamo_budgets([4, 0, 8, 2], [8] * 4, total=64, rule="std", **DEFAULTS)
    assert n.tolist() == [24, 8, 8, 24]


def test_worked_example_mastered_and_unsolved_stay_at_n_min() -> None:
    # k = [4, 0, 8, 4] of g = 8, N = 40: remainder 8 over priorities
    # [2/7 + 0.5e-6, 0.01, 0.01, 2/7 + 0.5e-6] (sum 0.591430): t = 13.53,
    # shares [3.865, 0.135, 0.135, 3.865] -> floors [3, 0, 0, 3], 2 units to the 0.865s.
    n = dynamo_budgets([4, 0, 8, 4], [8] * 4, total=40, rule="variance", **DEFAULTS)
    assert n.tolist() == [12, 8, 8, 12]


def test_worked_example_exploring_prompts_get_their_initial_budget() -> None:
    # g = [0, 3, 8, 8] < 8 = max(4, n_min) for the first two: they get 8 and sit out.
    # N = 56: 56 - 4·8 = 24 over priorities [2/7 + 0.5e-6, 3/14 + 0.75e-6]: t = 48.0,
    # shares [13.714, 10.286] -> floors [13, 10], the last unit to 0.714: [8+14, 8+10].
    n = dynamo_budgets([0, 1, 4, 2], [0, 3, 8, 8], total=56, rule="variance", **DEFAULTS)
    assert n.tolist() == [8, 8, 22, 18]


def test_worked_example_uniform_ties_go_to_the_lower_index() -> None:
    # 25 = 3·8 + 1: equal shares of 1/3, the odd unit to index 0.
    n = dynamo_budgets([0, 1, 2], [4, 4, 4], total=25, rule="uniform", **DEFAULTS)
    assert n.tolist() == [9, 8, 8]


def test_leftover_goes_to_exploring_prompts_when_the_rest_is_capped() -> None:
    # Non-exploring prompts 1 and 3 saturate at n_max = 16 (32); exploring ones have 8 each;
    # 61 - 48 = 13 left: 6 each to the exploring prompts, the odd unit to the lower index.
    n = allocate([0.0, 1.0, 0.0, 1.0], [True, False, True, False], total=61, n_min=8, n_max=16,
                 initial_budget=4)
    assert n.tolist() == [15, 16, 14, 16]


def test_round_of_only_exploring_prompts_is_split_evenly() -> None:
    n = dynamo_budgets([0] * 4, [0] * 4, total=4 * 16 + 2, rule="variance", **DEFAULTS)
    assert n.tolist() == [17, 17, 16, 16]


def test_empty_round_with_zero_total() -> None:
    assert allocate([], [], total=0, **DEFAULTS).tolist() == []


# --- errors ------------------------------------------------------------------------------


def test_too_small_total_names_the_quantities() -> None:
    with pytest.raises(BudgetError, match=r"B=32 prompts needs at least B\*n_min = 256 samples "
                                          r"but total = 200"):
        allocate(np.ones(32), np.zeros(32, bool), total=200, **DEFAULTS)


def test_too_large_total_names_the_quantities() -> None:
    with pytest.raises(BudgetError, match=r"B=4 prompts takes at most B\*n_max = 96 .* = 100"):
        allocate(np.ones(4), np.zeros(4, bool), total=100, **DEFAULTS)


def test_exploring_budgets_exceeding_total_are_rejected() -> None:
    # 4 prompts, all exploring at max(12, 8) = 12: 48 > 40.
    with pytest.raises(BudgetError, match=r"4 exploring prompts .* = 12 .* need 48 samples "
                                          r"but total = 40"):
        allocate(np.zeros(4), np.ones(4, bool), total=40, n_min=8, n_max=24, initial_budget=12)


@pytest.mark.parametrize(
    ("n_min", "n_max", "initial_budget", "message"),
    [
        (1, 24, 4, r"n_min = 1 but GRPO needs at least 2"),
        (10, 8, 4, r"n_min = 10 exceeds n_max = 8"),
        (8, 24, 30, r"max\(initial_budget, n_min\) = 30 exceeds n_max = 24"),
    ],
)
def test_inconsistent_limits_are_rejected(n_min: int, n_max: int, initial_budget: int,
                                          message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        allocate(np.ones(4), np.zeros(4, bool), total=40, n_min=n_min, n_max=n_max,
                 initial_budget=initial_budget)


def test_budget_error_is_a_value_error() -> None:
    assert issubclass(BudgetError, ValueError)


def test_non_positive_priority_is_rejected() -> None:
    with pytest.raises(ValueError, match="finite and > 0"):
        allocate([1.0, 0.0], [False, False], total=20, **DEFAULTS)


def test_impossible_statistics_are_rejected() -> None:
    with pytest.raises(ValueError, match="0 <= k <= g"):
        priorities([5], [4], rule="variance", initial_budget=4, n_min=8)


def test_check_budget_feasible_accepts_paper_defaults() -> None:
    assert check_budget_feasible(512, 16, 8, 24, 4) == 512 * 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((32, 6, 8, 24, 4), r"B=32 prompts needs at least B\*n_min = 256 samples but total = 192"),
        ((32, 30, 8, 24, 4), r"at most B\*n_max = 768 samples but total = 960"),
        ((4, 10, 8, 24, 12), r"= 12 exceeds n_mean = 10"),
        ((0, 16, 8, 24, 4), r"batch_prompts = 0"),
        ((4, 16, 2, 24, 30), r"= 30 exceeds n_max = 24"),
    ],
)
def test_check_budget_feasible_explains_bad_configs(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        check_budget_feasible(*args)


# --- properties --------------------------------------------------------------------------


@st.composite
def rounds(draw: st.DrawFn, floats: bool = False) -> dict:
    """A feasible round: limits, statistics and a total between the floor and B·n_max."""
    batch = draw(st.integers(1, 40))
    n_min = draw(st.integers(2, 12))
    n_max = draw(st.integers(n_min, n_min + 24))
    initial_budget = draw(st.integers(1, n_max))
    g_max = 3 * max(initial_budget, n_min)
    if floats:
        g = np.array(draw(st.lists(st.floats(0, g_max), min_size=batch, max_size=batch)))
    else:
        g = np.array(draw(st.lists(st.integers(0, g_max), min_size=batch, max_size=batch)), float)
    rate = np.array(draw(st.lists(st.floats(0, 1), min_size=batch, max_size=batch)))
    k = rate * g if floats else np.round(rate * g)
    rule = draw(st.sampled_from(["variance", "std", "uniform"]))
    p, exploring = priorities(k, g, rule=rule, initial_budget=initial_budget, n_min=n_min)
    b0 = max(initial_budget, n_min)
    floor = int(exploring.sum()) * b0 + int((~exploring).sum()) * n_min
    total = draw(st.integers(floor, batch * n_max))
    return dict(k=k, g=g, rule=rule, total=total, n_min=n_min, n_max=n_max,
                initial_budget=initial_budget, priority=p, exploring=exploring)


def _allocate(r: dict) -> np.ndarray:
    return allocate(r["priority"], r["exploring"], total=r["total"], n_min=r["n_min"],
                    n_max=r["n_max"], initial_budget=r["initial_budget"])


def _exact_water_fill(w: np.ndarray, budget: int, cap: int) -> np.ndarray:
    """Slow reference: repeatedly cap everything above the cap, until nothing changes."""
    capped = np.zeros(w.size, dtype=bool)
    while True:
        t = (budget - cap * capped.sum()) / w[~capped].sum()
        over = ~capped & (t * w >= cap)
        if not over.any():
            return np.where(capped, cap, t * w)
        capped |= over


@settings(deadline=None)
@given(rounds())
def test_budgets_sum_to_total_within_limits(r: dict) -> None:
    n = _allocate(r)
    assert n.sum() == r["total"]
    assert n.min(initial=r["n_min"]) >= r["n_min"] and n.max(initial=r["n_max"]) <= r["n_max"]
    # Exploring prompts get exactly their initial budget unless everyone else is full.
    others_full = bool(np.all(n[~r["exploring"]] == r["n_max"]))
    if not others_full:
        assert np.all(n[r["exploring"]] == max(r["initial_budget"], r["n_min"]))


@settings(deadline=None)
@given(rounds(floats=True))
def test_decayed_float_statistics_allocate_exactly(r: dict) -> None:
    n = _allocate(r)
    assert n.sum() == r["total"]
    assert np.all((n >= r["n_min"]) & (n <= r["n_max"]))


@settings(deadline=None)
@given(rounds())
def test_higher_priority_never_gets_fewer_samples(r: dict) -> None:
    n = _allocate(r)
    active = ~r["exploring"]
    p, n = r["priority"][active], n[active]
    assert not np.any((p[:, None] > p[None, :]) & (n[:, None] < n[None, :]))
    # Equal priorities: budgets differ by at most one.
    assert not np.any((p[:, None] == p[None, :]) & (np.abs(n[:, None] - n[None, :]) > 1))


@settings(deadline=None)
@given(rounds())
def test_each_budget_is_within_one_of_its_proportional_share(r: dict) -> None:
    n = _allocate(r)
    active = ~r["exploring"]
    b0 = max(r["initial_budget"], r["n_min"])
    budget = r["total"] - int(r["exploring"].sum()) * b0 - int(active.sum()) * r["n_min"]
    cap = r["n_max"] - r["n_min"]
    if active.any() and 0 < budget < active.sum() * cap:
        share = _exact_water_fill(r["priority"][active], budget, cap)
        assert np.all(np.abs((n[active] - r["n_min"]) - share) < 1.0)


@settings(deadline=None)
@given(rounds())
def test_uniform_rule_gives_equal_budgets(r: dict) -> None:
    n = dynamo_budgets(r["k"], r["g"], total=r["total"], n_min=r["n_min"], n_max=r["n_max"],
                       rule="uniform", initial_budget=r["initial_budget"])
    assert n.sum() == r["total"] and n.max() - n.min() <= 1


@settings(deadline=None)
@given(st.data())
def test_mastered_and_unsolved_never_outrank_problems_with_variance(data: st.DataObject) -> None:
    batch = data.draw(st.integers(2, 40))
    g = np.full(batch, 16.0)
    k = np.array(data.draw(st.lists(st.integers(0, 16), min_size=batch, max_size=batch)), float)
    total = data.draw(st.integers(batch * 8, batch * 24))
    p, _ = priorities(k, g, rule="variance", initial_budget=4, n_min=8)
    n = dynamo_budgets(k, g, total=total, rule="variance", **DEFAULTS)
    at_floor = (k == 0) | (k / g >= 0.85)
    mixed = p > 0.01
    if at_floor.any() and mixed.any():
        assert n[at_floor].max() <= n[mixed].min()


def test_sorting_fallback_matches_capping_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Geometric priorities cap a few more prompts on every pass: the bounded pass loop gives
    # up and the sort-based solve must land on the same budgets.
    rng = np.random.default_rng(0)
    w = np.geomspace(1.0, 1e-4, 2000)[rng.permutation(2000)]
    kw = dict(total=2000 * 16, n_min=8, n_max=24, initial_budget=4)
    passes = allocate(w, np.zeros(w.size, bool), **kw)
    monkeypatch.setattr(budget, "_MAX_CAP_PASSES", 0)
    sorted_solve = allocate(w, np.zeros(w.size, bool), **kw)
    assert sorted_solve.tolist() == passes.tolist()
    assert passes.sum() == kw["total"]


@pytest.mark.parametrize("decayed", [False, True])
def test_large_round_is_exact_and_monotone(decayed: bool) -> None:
    # At scale the largest-remainder selection takes its histogram path. Integer statistics
    # give many identical fractional parts (ties); decayed ones give nearly all distinct.
    rng = np.random.default_rng(1)
    g = rng.integers(0, 40, 200_000).astype(float)
    k = rng.binomial(g.astype(int), rng.random(g.size)).astype(float)
    if decayed:
        keep = 0.5 ** rng.random(g.size)
        k, g = k * keep, g * keep
    total = 16 * g.size
    p, exploring = priorities(k, g, rule="variance", initial_budget=4, n_min=8)
    n = allocate(p, exploring, total=total, **DEFAULTS)
    assert n.sum() == total and n.min() >= 8 and n.max() <= 24
    assert np.all(n[exploring] == 8)

    p, n = p[~exploring], n[~exploring]
    share = _exact_water_fill(p, total - 8 * g.size, 16)
    assert np.all(np.abs((n - 8) - share) < 1.0)
    # Per distinct priority (ascending): the largest budget never exceeds the next group's
    # smallest, and within a group budgets differ by at most one.
    order = np.argsort(p, kind="stable")
    levels, starts = np.unique(p[order], return_index=True)
    lo = np.minimum.reduceat(n[order], starts)
    hi = np.maximum.reduceat(n[order], starts)
    assert levels.size > 100
    assert np.all(hi[:-1] <= lo[1:]) and np.all(hi - lo <= 1)
