"""Fast magnitude selection over a tensor streamed in blocks: the thresholds of
``alloykit.ops.sparsify``'s trims, found by radix select on histograms of key bits.

A magnitude's key is the bit pattern of ``|x|`` as float32 (int32; non-negative floats
order like their bits; every NaN is made one key, above infinity). Selecting the
entry at ascending rank r of one model's task vector takes two passes over the blocks:

1. ``count_high``: a histogram of the top 15 key bits (32768 buckets), and optionally
   the sum of |x| per bucket (float64, for L1 rescaling);
2. ``count_low``: inside the one bucket holding rank r, a histogram of the low 16 bits.

``Edge`` then holds the key at rank r and how many entries are below and equal to it,
exactly as ``sparsify._kth_magnitude`` finds them, and ``KeepRule`` turns the edges of
a trim (the k largest, or a window of ranks) into per-entry keep flags (``keep_flags``),
with the tied entries at a cut kept in the order of the trim's tie rule
(``alloykit.ops.tie_order`` for mergekit's). The kernels work on [K, m] blocks (one row
per model) and only run when ``alloykit.ops.jit.available()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from alloykit.ops.jit import jit

HIGH_BUCKETS = 1 << 15
LOW_BINS = 1 << 16
#: the key every NaN magnitude gets: above +inf (0x7F800000), like a sort puts NaN last
NAN_KEY = 0x7F800001
NO_EDGE = -1
#: a key above every key: "no upper edge"
TOP = 1 << 31


@jit(inline=True)
def _key(bits):  # noqa: ANN001, ANN202
    k = bits & 0x7FFFFFFF
    return k if k < 0x7F800001 else 0x7F800001


@jit
def count_high(bits, values, counts, sums, with_sums):  # noqa: ANN001, ANN201
    """counts[i, key >> 16] += 1 for every entry of row i; sums[i, ...] += |value| (float64)."""
    k, m = bits.shape
    for i in range(k):
        for j in range(m):
            b = _key(bits[i, j]) >> 16
            counts[i, b] += 1
            if with_sums:
                sums[i, b] += abs(np.float64(values[i, j]))


@jit
def count_low(bits, values, buckets, counts, sums, with_sums):  # noqa: ANN001, ANN201
    """For each row i and edge e with buckets[i, e] >= 0: counts[i, e, low 16 key bits] += 1
    over the entries in that high bucket (and their |value| into sums)."""
    k, m = bits.shape
    found = np.empty(m, dtype=np.int64)
    for i in range(k):
        for e in range(buckets.shape[1]):
            bucket = buckets[i, e]
            if bucket < 0:
                continue
            # first the entries in the bucket, without a branch: on real fine-tunes (bf16 task
            # vectors take few distinct values) about a fifth of a block lands in the cut's
            # bucket, a branch on it mispredicts often, and this loop took 2.4 ns an entry
            # against 1.0 ns this way (benchmarks/pass_cost.py)
            n = 0
            for j in range(m):
                found[n] = j
                n += (_key(bits[i, j]) >> 16) == bucket
            for t in range(n):
                j = found[t]
                low = _key(bits[i, j]) & 0xFFFF
                counts[i, e, low] += 1
                if with_sums:
                    sums[i, e, low] += abs(np.float64(values[i, j]))


@jit
def magnitude_keys(bits, row, keys, start):  # noqa: ANN001, ANN201
    """keys[start + j] = key of bits[row, j] (the flat key array of one model, a block at a time)."""
    for j in range(bits.shape[1]):
        keys[start + j] = _key(bits[row, j])


@jit
def keep_flags(bits, lower, upper, tie_keys, tie_lo, tie_hi, tie_offsets, tie_flags, ordinals, keep):  # noqa: ANN001, ANN201
    """keep[i, j] = 1.0 where row i's entry is kept, else 0.0 (float32: what multiplies it).

    Kept: lower[i] < key < upper[i], plus entries whose key equals tie_keys[i, e] (e = 0, 1;
    -1: none) and whose ordinal among those ties (in flat order, counted from
    ordinals[i, e], which is advanced) is in [tie_lo, tie_hi), or, where tie_offsets[i, e]
    >= 0, whose flag tie_flags[tie_offsets[i, e] + ordinal] is set.
    """
    k, m = bits.shape
    for i in range(k):
        lo, hi = lower[i], upper[i]
        for j in range(m):  # vectorized
            key = _key(bits[i, j])
            keep[i, j] = np.float32(1.0) if (key > lo) & (key < hi) else np.float32(0.0)
        for e in range(tie_keys.shape[1]):
            tk = tie_keys[i, e]
            if tk < 0:
                continue
            o = ordinals[i, e]
            a, b, off = tie_lo[i, e], tie_hi[i, e], tie_offsets[i, e]
            if off >= 0:  # kept members named one by one (mergekit's sort order)
                for j in range(m):
                    if _key(bits[i, j]) == tk:
                        if tie_flags[off + o] != 0:
                            keep[i, j] = np.float32(1.0)
                        o += 1
            elif o < b:  # ordinals [a, b) kept: past b no member of the group is kept
                # without a branch on the key: on real fine-tunes many entries share the cut's
                # key, and a branch on it mispredicts often
                for j in range(m):
                    eq = _key(bits[i, j]) == tk
                    keep[i, j] = np.float32(1.0) if (keep[i, j] != np.float32(0.0)) | (eq & (o >= a) & (o < b)) else keep[i, j]
                    o += eq
            ordinals[i, e] = o


@dataclass
class Edge:
    """The entry at one ascending rank of a model's magnitudes: its key, how many entries
    are smaller and how many equal (from the two histograms)."""

    rank: int
    bucket: int = -1
    below: int = 0  # entries in lower buckets
    key: int = -1
    n_less: int = 0
    n_equal: int = 0

    def locate_bucket(self, counts: np.ndarray) -> None:
        cum = np.cumsum(counts)
        self.bucket = int(np.searchsorted(cum, self.rank + 1))
        self.below = int(cum[self.bucket - 1]) if self.bucket else 0

    def locate_key(self, low_counts: np.ndarray) -> None:
        cum = np.cumsum(low_counts)
        low = int(np.searchsorted(cum, self.rank + 1 - self.below))
        self.key = (self.bucket << 16) | low
        self.n_less = self.below + (int(cum[low - 1]) if low else 0)
        self.n_equal = int(low_counts[low])


@dataclass
class KeepRule:
    """Which entries of one model's task vector a trim keeps: ascending ranks [start, stop).

    ``descending``: the trim keeps "the k largest" (ranks [n - k, n)), whose tie rule in flat
    order keeps the lowest ordinals of a cut tie group (a stable descending sort); otherwise
    a window of a stable ascending sort, which keeps the group's ordinals in the window.
    Once the edges are located, ``finish`` sets ``lower``/``upper`` (exclusive key bounds
    of the entries kept for their value) and ``ties``: (key, ordinal start, ordinal stop,
    flags or None) for each tie group the window cuts.
    """

    n: int
    start: int
    stop: int
    descending: bool = False
    edges: list[Edge] = field(default_factory=list)
    lower: int = NO_EDGE
    upper: int = TOP
    ties: list[tuple[int, int, int, np.ndarray | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start, self.stop = max(0, self.start), min(self.n, self.stop)
        if self.start >= self.stop:
            self.upper = 0  # keeps nothing (no key is below 0)
            return
        if self.start > 0:
            self.edges.append(Edge(self.start))
        if self.stop < self.n:
            self.edges.append(Edge(self.stop - 1))

    def cut_groups(self) -> list[tuple[int, int, int, int, int]]:
        """(key, n_less, n_equal, a, b) for each tie group the window cuts: its members hold
        sorted positions n_less .. n_less + n_equal - 1, and [a, b) of them are kept."""
        out: dict[int, tuple[int, int, int, int, int]] = {}
        for e in self.edges:
            a = max(0, self.start - e.n_less)
            b = min(e.n_equal, self.stop - e.n_less)
            if 0 < b - a < e.n_equal:
                out[e.key] = (e.key, e.n_less, e.n_equal, a, b)
        return list(out.values())

    def finish(self, kept_flags: dict[int, np.ndarray] | None = None) -> None:
        """Set the key bounds and tie rules; ``kept_flags[key]``: which members of a cut tie
        group are kept (one flag per member in flat order) when the tie rule is not flat order."""
        if self.start >= self.stop:
            return
        kept_flags = kept_flags or {}
        cut = {g[0]: g for g in self.cut_groups()}
        if self.start > 0:
            e = self.edges[0]
            # the whole group at the lower edge is kept unless the window cuts it
            self.lower = e.key if e.key in cut or self.start > e.n_less else e.key - 1
        if self.stop < self.n:
            e = self.edges[-1]
            self.upper = e.key if e.key in cut or self.stop < e.n_less + e.n_equal else e.key + 1
        for key, _, _, a, b in cut.values():
            if self.descending:  # stable descending order: the lowest ordinals come first
                a, b = 0, b - a
            self.ties.append((key, a, b, kept_flags.get(key)))
