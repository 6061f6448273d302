"""Which of several equal magnitudes a mergekit trim keeps: the order of torch's sort.

mergekit trims a task vector with ``torch.argsort(|t|, descending=True)[:k]`` (TIES, DARE
not) and keeps ``torch.sort(|t|).indices[b:b + n]`` (Model Breadcrumbs), both unstable
sorts of the flattened float32 magnitudes. When the cut falls inside a group of equal
magnitudes (real fine-tunes: weight decay shrinks untouched rows by one factor; bf16
task vectors: a few thousand distinct values in millions of entries), which members of
the group are kept is decided by the sort's internals.

torch's CPU sort of a float tensor is libstdc++'s ``std::sort`` (introsort) on (value,
index) pairs in the Linux wheels (checked at run time below). Its result for the entries
around the cut is determined by the chain of partitions that contain the cut, so the
chain can be followed without sorting the rest: median-of-three pivot moved to the front
(positions first + 1, middle, last - 1), Hoare partition of the remainder, depth limit
2 floor(log2 n), ranges of at most 16 finished by insertion sort (stable). Following only
the ranges that hold a cut costs about 2n element visits instead of n log n, and the
magnitudes as int32 keys (4 bytes an entry instead of the 12 of a value + index sort).

``sort_kept_ties`` does that; ``torch_sort_is_introsort`` checks, once per process, that
torch's sort agrees with it on a sample (another C++ library, e.g. libc++ on macOS, or a
build with x86-simd-sort, orders ties differently): where it does not, or where the
depth limit would make std::sort switch to heapsort, callers sort with torch itself,
as mergekit does. ``tests/test_tie_order.py`` compares with torch.argsort and with
mergekit's own functions.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from alloykit.ops import jit as _jit
from alloykit.ops.jit import jit

#: std::sort's _S_threshold: ranges this small are left to the final insertion sort
LEAF = 16


@jit(inline=True)
def _before(x, y, tie_key, descending):  # noqa: ANN001, ANN202
    """std::sort's comparator on encoded keys (a negative key is a tied entry: tie_key)."""
    a = tie_key if x < 0 else x
    b = tie_key if y < 0 else y
    return a > b if descending else a < b


@jit(inline=True)
def _median_to_first(a, first, last, tie_key, descending):  # noqa: ANN001, ANN202
    """libstdc++'s __move_median_to_first(first, first + 1, mid, last - 1)."""
    mid = first + (last - first) // 2
    i1, i2, i3 = first + 1, mid, last - 1
    if _before(a[i1], a[i2], tie_key, descending):
        if _before(a[i2], a[i3], tie_key, descending):
            m = i2
        elif _before(a[i1], a[i3], tie_key, descending):
            m = i3
        else:
            m = i1
    elif _before(a[i1], a[i3], tie_key, descending):
        m = i1
    elif _before(a[i2], a[i3], tie_key, descending):
        m = i3
    else:
        m = i2
    t = a[first]
    a[first] = a[m]
    a[m] = t


@jit
def _partition(a, first, last, tie_key, descending):  # noqa: ANN001, ANN202
    """libstdc++'s __unguarded_partition_pivot on a[first:last]; returns the cut (the
    specification of ``_partition_blocks``, which the sort follower uses)."""
    _median_to_first(a, first, last, tie_key, descending)
    return _hoare(a, first, first + 1, last, tie_key, descending)


@jit(inline=True)
def _hoare(a, first, lo, hi, tie_key, descending):  # noqa: ANN001, ANN202
    """The Hoare loop of __unguarded_partition around the pivot a[first], from scan
    positions lo (next left) and hi (one past the next right)."""
    pivot = a[first]
    while True:
        while _before(a[lo], pivot, tie_key, descending):
            lo += 1
        hi -= 1
        while _before(pivot, a[hi], tie_key, descending):
            hi -= 1
        if not lo < hi:
            return lo
        t = a[lo]
        a[lo] = a[hi]
        a[hi] = t
        lo += 1


#: entries per side scanned at a time by ``_partition_blocks``
_SCAN = 128


@jit
def _partition_blocks(a, first, last, tie_key, descending):  # noqa: ANN001, ANN202
    """``_partition``, with the same result, scanning blocks without branches.

    The Hoare loop swaps the i-th entry from the left that does not belong left of the
    pivot with the i-th from the right that does not belong right of it, for as long as
    the two positions do not cross, and each swap only touches positions both scans have
    passed: so the entries to swap can be found a block at a time, on the original values,
    by flags rather than branches (as in Edelkamp and Weiss's BlockQuicksort). Once the
    scans are within two blocks of each other the Hoare loop finishes from the state of
    the last swap.
    """
    _median_to_first(a, first, last, tie_key, descending)
    pivot = a[first]
    left = np.empty(_SCAN, np.int64)
    right = np.empty(_SCAN, np.int64)
    n_left = n_right = start_left = start_right = 0
    scan_lo, scan_hi = first + 1, last  # next left position; one past the next right one
    last_lo, last_hi = first, last  # the last swapped pair (none yet: as if before the first scan)
    while scan_hi - scan_lo > 2 * _SCAN:
        if n_left == 0:
            start_left = 0
            for j in range(_SCAN):
                left[n_left] = scan_lo + j
                n_left += 0 if _before(a[scan_lo + j], pivot, tie_key, descending) else 1
            scan_lo += _SCAN
        if n_right == 0:
            start_right = 0
            for j in range(_SCAN):
                right[n_right] = scan_hi - 1 - j
                n_right += 0 if _before(pivot, a[scan_hi - 1 - j], tie_key, descending) else 1
            scan_hi -= _SCAN
        n = min(n_left, n_right)
        for i in range(n):
            p, q = left[start_left + i], right[start_right + i]
            t = a[p]
            a[p] = a[q]
            a[q] = t
        if n > 0:
            last_lo, last_hi = left[start_left + n - 1], right[start_right + n - 1]
        n_left -= n
        n_right -= n
        start_left += n
        start_right += n
    return _hoare(a, first, last_lo + 1, last_hi, tie_key, descending)


@jit
def _follow_cuts(a, tie_key, descending, cut0, cut1):  # noqa: ANN001, ANN202
    """Run std::sort on ``a`` only inside the ranges that hold cut0 or cut1 (a cut c separates
    positions < c from >= c; -1 for none); False if std::sort would switch to heapsort there."""
    n = a.shape[0]
    depth = 0
    m = n
    while m > 1:
        m >>= 1
        depth += 1
    firsts = np.empty(130, np.int64)
    lasts = np.empty(130, np.int64)
    depths = np.empty(130, np.int64)
    firsts[0], lasts[0], depths[0] = 0, n, 2 * depth
    top = 1
    while top > 0:
        top -= 1
        f, l, d = firsts[top], lasts[top], depths[top]
        while l - f > LEAF:
            if d == 0:
                return False
            d -= 1
            cut = _partition_blocks(a, f, l, tie_key, descending)
            left = (f < cut0 < cut) or (f < cut1 < cut)
            right = (cut < cut0 < l) or (cut < cut1 < l)
            if left and right:
                firsts[top], lasts[top], depths[top] = cut, l, d
                top += 1
                l = cut
            elif right:
                f = cut
            elif left:
                l = cut
            else:
                l = f
        for i in range(f + 1, l):  # the final insertion sort, within this leaf (stable)
            x = a[i]
            j = i
            while j > f and _before(x, a[j - 1], tie_key, descending):
                a[j] = a[j - 1]
                j -= 1
            a[j] = x
    return True


@jit
def _encode_ties(keys, tie_key):  # noqa: ANN001, ANN202
    """In place: entries equal to tie_key become -(1 + their rank among the ties in flat order)."""
    ordinal = 0
    for j in range(keys.shape[0]):
        if keys[j] == tie_key:
            ordinal += 1
            keys[j] = -ordinal
    return ordinal


@jit
def _kept_ties(a, start, stop, kept):  # noqa: ANN001, ANN202
    """kept[o] = 1 for every tied entry (ordinal o) at a position in [start, stop)."""
    for j in range(start, stop):
        if a[j] < 0:
            kept[-a[j] - 1] = 1


def sort_kept_ties(keys: np.ndarray, tie_key: int, descending: bool, start: int, stop: int) -> np.ndarray | None:
    """Which entries of magnitude ``tie_key`` torch's sort puts at positions [start, stop).

    ``keys``: the int32 bit patterns of the float32 magnitudes in flat order (NaNs made
    equal and largest), overwritten. Returns one uint8 flag per tied entry, in flat order,
    or None where only a real sort can tell (std::sort would fall back to heapsort).
    """
    n_ties = _encode_ties(keys, np.int32(tie_key))
    cuts = [c for c in (start, stop) if 0 < c < keys.shape[0]]
    cut0, cut1 = (cuts + [-1, -1])[:2]
    if not _follow_cuts(keys, np.int32(tie_key), descending, cut0, cut1):
        return None
    kept = np.zeros(n_ties, dtype=np.uint8)
    _kept_ties(keys, start, stop, kept)
    return kept


@functools.cache
def torch_sort_is_introsort() -> bool:
    """Whether torch's CPU sort keeps the tied entries ``sort_kept_ties`` predicts (checked on
    samples with many ties, ascending and descending, small and large)."""
    if not _jit.available():
        return False
    gen = torch.Generator().manual_seed(20260611)
    for n, distinct in ((12, 3), (40, 4), (5000, 9), (70001, 300)):
        mags = torch.randint(0, distinct, (n,), generator=gen).float().mul_(0.25)
        bits = mags.view(torch.int32).numpy()
        for descending in (True, False):
            cut = int(torch.randint(1, n, (1,), generator=gen))
            order = torch.sort(mags, descending=descending).indices.numpy()
            tie_key = int(np.sort(bits)[::-1][cut - 1] if descending else np.sort(bits)[cut])
            ties = np.nonzero(bits == tie_key)[0]
            expected = np.isin(ties, order[:cut])
            kept = sort_kept_ties(bits.copy(), tie_key, descending, 0, cut)
            if kept is None or not np.array_equal(kept.astype(bool), expected):
                return False
    return True
