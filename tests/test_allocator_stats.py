"""Streamed per-problem statistics (allocator/stats.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocator.stats import ProblemStats


def test_repeated_indices_in_one_batch_accumulate() -> None:
    s = ProblemStats(3)
    s.update([0, 2, 0], [1, 2, 3], [4, 4, 4])
    assert s.k.tolist() == [4.0, 0.0, 2.0]
    assert s.g.tolist() == [8.0, 0.0, 4.0]


def test_batched_update_equals_one_update_per_group() -> None:
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 50, 500)
    n = rng.integers(2, 24, 500).astype(float)
    k = np.floor(rng.random(500) * (n + 1))
    batched, one_by_one = ProblemStats(50), ProblemStats(50)
    batched.update(idx, k, n)
    for i, ki, ni in zip(idx.tolist(), k.tolist(), n.tolist(), strict=True):
        one_by_one.update_one(i, ki, ni)
    np.testing.assert_array_equal(batched.k, one_by_one.k)
    np.testing.assert_array_equal(batched.g, one_by_one.g)


def test_decay_halves_old_counts_after_half_life_samples() -> None:
    s = ProblemStats(2, half_life=4.0)
    s.update_one(0, 4, 4)  # nothing to decay yet: k = 4, g = 4
    assert (s.k[0], s.g[0]) == (4.0, 4.0)
    s.update_one(0, 0, 4)  # 4 more samples = one half-life: k = 4·0.5 + 0, g = 4·0.5 + 4
    assert (s.k[0], s.g[0]) == (2.0, 6.0)
    s.update([0], [8], [8])  # two half-lives: k = 2·0.25 + 8, g = 6·0.25 + 8
    assert (s.k[0], s.g[0]) == (8.5, 9.5)
    assert (s.k[1], s.g[1]) == (0.0, 0.0)  # unsampled problems keep their statistics


def test_decay_within_a_batch_acts_as_one_group() -> None:
    split, merged = ProblemStats(1, half_life=3.0), ProblemStats(1, half_life=3.0)
    split.update_one(0, 5, 6)
    merged.update_one(0, 5, 6)
    split.update([0, 0], [1, 2], [2, 4])
    merged.update([0], [3], [6])  # 5·0.25 + 3, 6·0.25 + 6
    np.testing.assert_allclose(split.k, merged.k)
    np.testing.assert_allclose(split.g, merged.g)
    assert merged.k[0] == pytest.approx(4.25) and merged.g[0] == pytest.approx(7.5)


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 16), st.integers(0, 16)),
                max_size=40),
       st.one_of(st.none(), st.floats(0.5, 100)))
def test_streamed_updates_follow_the_decay_formula(groups: list[tuple[int, int, int]],
                                                   half_life: float | None) -> None:
    s = ProblemStats(5, half_life=half_life)
    k_ref, g_ref = [0.0] * 5, [0.0] * 5
    for i, a, b in groups:
        k, n = min(a, b), max(a, b)
        s.update_one(i, k, n)
        keep = 1.0 if half_life is None else 0.5 ** (n / half_life)
        k_ref[i] = k_ref[i] * keep + k  # k_i <- k_i · 0.5^(n/h) + k
        g_ref[i] = g_ref[i] * keep + n  # g_i <- g_i · 0.5^(n/h) + n
    np.testing.assert_allclose(s.k, k_ref, rtol=1e-12)
    np.testing.assert_allclose(s.g, g_ref, rtol=1e-12)
    assert np.all((s.k >= 0) & (s.k <= s.g))


@pytest.mark.parametrize(
    ("indices", "k", "n", "error", "message"),
    [
        ([0], [5], [4], ValueError, "0 <= k <= n"),
        ([0, 1], [1, -1], [4, 4], ValueError, "0 <= k <= n"),
        ([0, 1], [1, 1], [4, np.inf], ValueError, "< inf"),
        ([3], [1], [4], IndexError, "out of range"),
        ([0, -1], [1, 1], [4, 4], IndexError, "out of range"),
        ([0, 1], [1], [4, 4], ValueError, "one length"),
    ],
)
def test_bad_updates_are_rejected_without_effect(indices: list, k: list, n: list,
                                                 error: type[Exception], message: str) -> None:
    s = ProblemStats(3)
    s.update([0, 1, 2], [1, 1, 1], [2, 2, 2])
    with pytest.raises(error, match=message):
        s.update(indices, k, n)
    assert s.k.tolist() == [1.0] * 3 and s.g.tolist() == [2.0] * 3


def test_pass_rate_is_nan_for_unseen_problems() -> None:
    s = ProblemStats(3)
    s.update([0, 1], [3, 0], [4, 4])
    rate = s.pass_rate()
    assert rate[:2].tolist() == [0.75, 0.0] and np.isnan(rate[2])


def test_describe_summarises_seen_problems() -> None:
    s = ProblemStats(5)
    # pass rates: 1.0 and 0.9 mastered, 0.0 unsolved, 0.5 mixed; problem 4 unseen.
    s.update([0, 1, 2, 3], [8, 9, 0, 4], [8, 10, 8, 8])
    d = s.describe()
    assert d == {
        "problems": 5, "problems_seen": 4, "samples": 34.0,
        "mean_pass_rate": pytest.approx((1.0 + 0.9 + 0.0 + 0.5) / 4),
        "frac_mastered": 0.5, "frac_unsolved": 0.25, "frac_mixed": 0.25,
    }
    json.dumps(ProblemStats(2).describe())  # valid JSON even before anything is seen


def test_state_round_trip_restores_identical_statistics() -> None:
    s = ProblemStats(4, half_life=8.0)
    s.update([0, 1, 1, 3], [1, 2, 3, 4], [4, 4, 4, 4])
    state = s.state_dict()
    s.update_one(0, 4, 4)  # the snapshot is a copy, not a view
    assert state["k"][0] == 1.0

    restored = ProblemStats(4, half_life=8.0)
    restored.load_state_dict(state)
    s.load_state_dict(state)
    np.testing.assert_array_equal(restored.k, s.k)
    np.testing.assert_array_equal(restored.g, s.g)
    assert all(isinstance(v, (int, np.ndarray)) for v in state.values())


def _state(num: int = 3, **changes: object) -> dict:
    s = ProblemStats(num)
    s.update(list(range(num)), [1] * num, [2] * num)
    return {**s.state_dict(), **changes}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (_state(num_problems=4), "covers 4 problems but this problem set has 3"),
        (_state(k=np.zeros(4)), r"shapes k \(4,\), g \(3,\); expected \(3,\)"),
        (_state(g=np.zeros((3, 1))), r"g \(3, 1\)"),
        (_state(k=np.array([1.0, 3.0, 1.0])), "0 <= k <= g"),
        (_state(g=np.array([2.0, np.nan, 2.0])), "0 <= k <= g"),
        (_state(version=99), "version 99"),
        ({"k": np.zeros(3)}, "lacks"),
    ],
)
def test_bad_state_is_rejected_without_effect(state: dict, message: str) -> None:
    s = ProblemStats(3)
    s.update_one(0, 1, 4)
    with pytest.raises(ValueError, match=message):
        s.load_state_dict(state)
    assert s.k.tolist() == [1.0, 0.0, 0.0] and s.g.tolist() == [4.0, 0.0, 0.0]


def test_ids_map_to_indices() -> None:
    s = ProblemStats.from_ids(["a", "b", "c"])
    assert s.indices_of(["c", "a"]).tolist() == [2, 0]
    with pytest.raises(KeyError):
        s.indices_of(["zzz"])


def test_duplicate_ids_and_bad_index_maps_are_rejected() -> None:
    with pytest.raises(ValueError, match="not unique"):
        ProblemStats.from_ids(["a", "b", "a"])
    with pytest.raises(ValueError, match="onto 0..1"):
        ProblemStats(2, index={"a": 0, "b": 2})


def test_non_positive_half_life_is_rejected() -> None:
    with pytest.raises(ValueError, match="half_life"):
        ProblemStats(3, half_life=0.0)
