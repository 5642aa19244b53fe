"""Latency histograms that merge across processes, and the percentile summary the reports print.

A histogram counts microseconds in log-linear buckets: exact below 1,024 µs, then 512 buckets per
power of two (at most 0.2 % wide). Receivers add to the bucket arrays inline in their hot loop (see
:func:`bucket`); they travel between processes as the bytes of an ``array('q')``.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

SUB_BITS = 9
EXACT = 1 << (SUB_BITS + 1)  # values below this have a bucket each
BUCKETS = (23 << SUB_BITS) + (1 << SUB_BITS)  # up to 2**32 µs (71 minutes)
TOP = BUCKETS - 1


def bucket(us: int) -> int:
    """The bucket of a value in µs (the receivers inline this)."""
    if us < EXACT:
        return us if us > 0 else 0
    e = us.bit_length() - SUB_BITS - 1
    return min(TOP, (e << SUB_BITS) + (us >> e))


def bucket_value(index: int) -> float:
    """The middle of a bucket, in µs."""
    if index < EXACT:
        return float(index)
    e = (index >> SUB_BITS) - 1
    low = (index - (e << SUB_BITS)) << e
    return low + ((1 << e) - 1) / 2


@dataclass(slots=True)
class Histogram:
    """Counts of µs values; ``total`` and ``peak`` are exact, percentiles are the bucket's middle."""

    counts: array[int] = field(default_factory=lambda: array("q", bytes(8 * BUCKETS)))
    total: int = 0  # sum of the values, µs
    peak: int = 0  # largest value, µs

    def add(self, us: int) -> None:
        self.counts[bucket(us)] += 1
        self.total += max(us, 0)
        self.peak = max(self.peak, us)

    def merge(self, other: Histogram) -> None:
        mine = self.counts
        for i, n in enumerate(other.counts):
            if n:
                mine[i] += n
        self.total += other.total
        self.peak = max(self.peak, other.peak)

    def to_wire(self) -> tuple[bytes, int, int]:
        return self.counts.tobytes(), self.total, self.peak

    @classmethod
    def from_wire(cls, wire: tuple[bytes, int, int]) -> Histogram:
        counts = array("q")
        counts.frombytes(wire[0])
        return cls(counts, wire[1], wire[2])

    def summary(self) -> dict[str, Any]:
        """count, p50/p90/p99/p99.9/max/mean in ms (all zero when empty)."""
        n = sum(self.counts)
        out: dict[str, Any] = {"count": n}
        names = (("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99), ("p999_ms", 0.999))
        if n == 0:
            out.update({name: 0.0 for name, _ in names})
            out.update(max_ms=0.0, mean_ms=0.0)
            return out
        # The rank rule of ssebench: the round(q*n)-th smallest value.
        ranks = [(name, max(1, int(q * n + 0.5))) for name, q in names]
        seen = 0
        it = iter(ranks)
        name, rank = next(it)
        for index, count in enumerate(self.counts):
            if not count:
                continue
            seen += count
            while seen >= rank:
                out[name] = round(min(bucket_value(index), self.peak) / 1000, 3)
                nxt = next(it, None)
                if nxt is None:
                    break
                name, rank = nxt
            else:
                continue
            break
        out["max_ms"] = round(self.peak / 1000, 3)
        out["mean_ms"] = round(self.total / n / 1000, 3)
        return out


def add_counts(into: array[int], other: array[int]) -> None:
    """Element-wise ``into += other``; ``into`` grows to ``other``'s length."""
    if len(other) > len(into):
        into.extend(array(into.typecode, bytes(into.itemsize * (len(other) - len(into)))))
    for i, n in enumerate(other):
        if n:
            into[i] += n
