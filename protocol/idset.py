"""A set of non-negative integer ids (grant ids) stored as sorted, disjoint half-open ranges.

Grant ids are issued in order, so the ids a run completes or trains form a few long runs with
holes only where a group is still in flight, was dropped or was lost: the memory of an `IdSet`
grows with the number of holes, not with the number of ids.

Invariants: `starts` and `ends` are strictly increasing, `starts[i] < ends[i] < starts[i+1]`
(adjacent ranges are always merged), so two equal sets have equal ranges and `len` is the
sum of the range lengths. `from_ranges` refuses ranges that break this (a duplicate id in a
stored record shows up as overlapping ranges and is refused, never silently merged).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator


class IdSet:
    """Sorted disjoint ranges [start, end) of ints."""

    __slots__ = ("starts", "ends", "_len")

    def __init__(self, ids: Iterable[int] = ()) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._len = 0
        for i in ids:
            self.add(i)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, i: object) -> bool:
        if not isinstance(i, int):
            return False
        k = bisect_right(self.starts, i) - 1
        return k >= 0 and i < self.ends[k]

    def __iter__(self) -> Iterator[int]:
        for s, e in zip(self.starts, self.ends, strict=True):
            yield from range(s, e)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdSet) and self.starts == other.starts \
            and self.ends == other.ends

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"IdSet({self.ranges()})"

    @property
    def num_ranges(self) -> int:
        return len(self.starts)

    def add(self, i: int) -> bool:
        """Add id i; False if it was already present (nothing changes then)."""
        if i < 0:
            raise ValueError(f"ids are >= 0, got {i}")
        k = bisect_right(self.starts, i) - 1
        if k >= 0 and i < self.ends[k]:
            return False
        joins_left = k >= 0 and self.ends[k] == i
        joins_right = k + 1 < len(self.starts) and self.starts[k + 1] == i + 1
        if joins_left and joins_right:
            self.ends[k] = self.ends[k + 1]
            del self.starts[k + 1], self.ends[k + 1]
        elif joins_left:
            self.ends[k] = i + 1
        elif joins_right:
            self.starts[k + 1] = i
        else:
            self.starts.insert(k + 1, i)
            self.ends.insert(k + 1, i + 1)
        self._len += 1
        return True

    def discard(self, i: int) -> bool:
        """Remove id i; False if it was absent."""
        k = bisect_right(self.starts, i) - 1
        if k < 0 or i >= self.ends[k]:
            return False
        s, e = self.starts[k], self.ends[k]
        if s == i and e == i + 1:
            del self.starts[k], self.ends[k]
        elif s == i:
            self.starts[k] = i + 1
        elif e == i + 1:
            self.ends[k] = i
        else:
            self.ends[k] = i
            self.starts.insert(k + 1, i + 1)
            self.ends.insert(k + 1, e)
        self._len -= 1
        return True

    def add_range(self, start: int, end: int) -> None:
        """Add every id in [start, end) (ids formed together, e.g. one allocation round)."""
        for i in range(start, end):  # rounds are short; ids mostly extend the last range
            self.add(i)

    def update(self, other: IdSet) -> None:
        for s, e in zip(other.starts, other.ends, strict=True):
            self.add_range(s, e)

    def union(self, *others: IdSet) -> IdSet:
        out = self.copy()
        for o in others:
            out.update(o)
        return out

    def difference(self, other: IdSet) -> IdSet:
        """Ids in self and not in other; one sweep over both ranges (O(ranges), not ids)."""
        out = IdSet()
        k, os_, oe = 0, other.starts, other.ends
        for s, e in zip(self.starts, self.ends, strict=True):
            while k < len(os_) and oe[k] <= s:
                k += 1
            j = k
            while s < e:
                if j >= len(os_) or os_[j] >= e:  # nothing of other left in [s, e)
                    out.starts.append(s)
                    out.ends.append(e)
                    out._len += e - s
                    break
                if os_[j] > s:
                    out.starts.append(s)
                    out.ends.append(os_[j])
                    out._len += os_[j] - s
                s = max(s, oe[j])
                j += 1
        return out

    def intersection(self, other: IdSet) -> IdSet:
        return IdSet(i for i in self if i in other)

    def copy(self) -> IdSet:
        out = IdSet()
        out.starts, out.ends, out._len = list(self.starts), list(self.ends), self._len
        return out

    def ranges(self) -> list[list[int]]:
        """JSON-able [[start, end), ...]."""
        return [[s, e] for s, e in zip(self.starts, self.ends, strict=True)]

    @classmethod
    def from_ranges(cls, ranges: Iterable[Iterable[int]]) -> IdSet:
        """Inverse of `ranges()`; raises ValueError on empty, unsorted, overlapping or
        touching ranges (none of which `ranges()` ever writes)."""
        out = cls()
        last = -1
        for r in ranges:
            s, e = (int(x) for x in r)
            if not last < s < e:
                raise ValueError(f"range [{s}, {e}) is empty, overlaps or touches the "
                                 f"previous one (ending at {last})")
            out.starts.append(s)
            out.ends.append(e)
            out._len += e - s
            last = e
        return out
