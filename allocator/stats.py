"""Streamed per-problem Bernoulli statistics (docs/DESIGN.md §2, "beyond the paper").

`ProblemStats` holds, for problems indexed 0..N-1, the successes k_i and samples scored g_i
that `allocator.budget` turns into sample budgets. Each scored group updates its problem at
once (streamed, not once per epoch). Invariants:

- 0 <= k_i <= g_i for every problem at all times; updates that would break it are rejected
  before anything changes.
- Without decay, k_i and g_i are exactly the sums of everything reported for problem i.
- With a half-life h (in samples of that problem), an update of n samples first decays the
  old counts, then adds the new ones:
      k_i <- k_i · 0.5^(n/h) + k,   g_i <- g_i · 0.5^(n/h) + n
  so a sample's weight halves after h further samples of the same problem, and a problem
  nobody samples keeps its statistics. Updates in one `update` call are simultaneous:
  several entries for the same problem act as one group (sum of k, sum of n).
- `state_dict()` is a copy (plain numpy arrays and ints) that `load_state_dict` restores
  exactly; a state of the wrong size or with impossible counts is refused whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

_STATE_VERSION = 1


class ProblemStats:
    """Dense k (successes) and g (samples scored) per problem, float64 because of decay."""

    def __init__(
        self,
        num_problems: int,
        *,
        half_life: float | None = None,
        index: Mapping[str, int] | None = None,
    ) -> None:
        if num_problems < 0:
            raise ValueError(f"num_problems = {num_problems} must be >= 0")
        if half_life is not None and not half_life > 0:
            raise ValueError(f"half_life = {half_life} must be > 0 samples (or None: no decay)")
        if index is not None:
            positions = np.fromiter(index.values(), dtype=np.int64, count=len(index))
            if len(index) != num_problems or not np.array_equal(
                np.sort(positions), np.arange(num_problems)
            ):
                raise ValueError(f"index must map {num_problems} ids onto 0..{num_problems - 1}")
        self.num_problems = num_problems
        self.half_life = half_life
        self.index: Mapping[str, int] = index if index is not None else {}
        self.k = np.zeros(num_problems, dtype=np.float64)
        self.g = np.zeros(num_problems, dtype=np.float64)

    @classmethod
    def from_ids(cls, ids: Sequence[str], *, half_life: float | None = None) -> ProblemStats:
        """Statistics over `ids`, problem ids[i] at index i."""
        index = {pid: i for i, pid in enumerate(ids)}
        if len(index) != len(ids):
            raise ValueError(f"problem ids are not unique ({len(ids) - len(index)} repeats)")
        return cls(len(ids), half_life=half_life, index=index)

    def indices_of(self, ids: Iterable[str]) -> NDArray[np.int64]:
        """Indices of problem ids (KeyError for an unknown id)."""
        return np.array([self.index[pid] for pid in ids], dtype=np.int64)

    def update(self, indices: ArrayLike, k: ArrayLike, n: ArrayLike) -> None:
        """Add k successes out of n scored samples to each problem in `indices`.

        Vectorised over a batch; repeated indices accumulate (one group of Σk out of Σn).
        """
        idx = np.asarray(indices, dtype=np.int64)
        k = np.asarray(k, dtype=np.float64)
        n = np.asarray(n, dtype=np.float64)
        if idx.ndim != 1 or k.shape != idx.shape or n.shape != idx.shape:
            raise ValueError(
                f"indices, k and n must be 1-D of one length, got {idx.shape}, {k.shape}, "
                f"{n.shape}")
        if idx.size == 0:
            return
        if idx.size == 1:  # skip the merge machinery for the common single-group call
            self.update_one(int(idx[0]), float(k[0]), float(n[0]))
            return
        if idx.min() < 0 or idx.max() >= self.num_problems:
            raise IndexError(f"problem index out of range 0..{self.num_problems - 1}")
        if not (np.all(k >= 0.0) and np.all(k <= n) and np.all(n < np.inf)):
            raise ValueError("each update needs 0 <= k <= n < inf")
        # Merge repeats so each problem decays once, by its batch's total sample count.
        problems, slot = np.unique(idx, return_inverse=True)
        if problems.size < idx.size:
            k = np.bincount(slot, weights=k, minlength=problems.size)
            n = np.bincount(slot, weights=n, minlength=problems.size)
        else:
            problems = idx
        if self.half_life is None:
            self.k[problems] += k
            self.g[problems] += n
        else:
            # k_i <- k_i · 0.5^(n/h) + k,  g_i <- g_i · 0.5^(n/h) + n
            keep = 0.5 ** (n / self.half_life)
            self.k[problems] = self.k[problems] * keep + k
            self.g[problems] = self.g[problems] * keep + n

    def update_one(self, index: int, k: float, n: float) -> None:
        """`update` for a single group, in plain Python: the per-message path of the service."""
        if not 0 <= index < self.num_problems:
            raise IndexError(f"problem index {index} out of range 0..{self.num_problems - 1}")
        if not 0 <= k <= n < math.inf:
            raise ValueError(f"an update needs 0 <= k <= n < inf, got k = {k}, n = {n}")
        if self.half_life is None:
            self.k[index] += k
            self.g[index] += n
        else:
            keep = 0.5 ** (n / self.half_life)
            self.k[index] = self.k[index] * keep + k
            self.g[index] = self.g[index] * keep + n

    def pass_rate(self) -> NDArray[np.float64]:
        """k_i / g_i per problem; NaN where nothing has been scored."""
        seen = self.g > 0
        return np.divide(self.k, self.g, out=np.full_like(self.g, np.nan), where=seen)

    def describe(self, mastery_threshold: float = 0.85) -> dict[str, float | int | None]:
        """JSON-ready summary for logs. Fractions are over problems seen (g > 0): mastered
        means pass rate >= mastery_threshold, unsolved no success on record (k == 0), mixed
        the rest. mean_pass_rate is the mean per-problem pass rate (None if none seen)."""
        seen = self.g > 0
        n_seen = int(np.count_nonzero(seen))
        rate = self.k[seen] / self.g[seen]
        mastered = int(np.count_nonzero(rate >= mastery_threshold))
        unsolved = int(np.count_nonzero(rate == 0.0))
        denom = max(n_seen, 1)
        return {
            "problems": self.num_problems,
            "problems_seen": n_seen,
            "samples": float(self.g.sum()),
            "mean_pass_rate": float(rate.mean()) if n_seen else None,
            "frac_mastered": mastered / denom,
            "frac_unsolved": unsolved / denom,
            "frac_mixed": (n_seen - mastered - unsolved) / denom,
        }

    def state_dict(self) -> dict[str, Any]:
        """A snapshot that later updates do not touch: {"version", "num_problems", "k", "g"}."""
        return {
            "version": _STATE_VERSION,
            "num_problems": self.num_problems,
            "k": self.k.copy(),
            "g": self.g.copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`; raises ValueError (changing nothing) if it does not fit."""
        missing = {"version", "num_problems", "k", "g"} - set(state)
        if missing:
            raise ValueError(f"problem-stats state lacks {sorted(missing)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(
                f"problem-stats state version {state['version']}, expected {_STATE_VERSION}")
        if state["num_problems"] != self.num_problems:
            raise ValueError(
                f"problem-stats state covers {state['num_problems']} problems but this problem "
                f"set has {self.num_problems}")
        k = np.asarray(state["k"], dtype=np.float64)
        g = np.asarray(state["g"], dtype=np.float64)
        want = (self.num_problems,)
        if k.shape != want or g.shape != want:
            raise ValueError(
                f"problem-stats state arrays have shapes k {k.shape}, g {g.shape}; expected {want}")
        if not (np.all(np.isfinite(g)) and np.all(k >= 0.0) and np.all(k <= g)):
            raise ValueError("problem-stats state violates 0 <= k <= g (or is not finite)")
        self.k[:] = k
        self.g[:] = g
