"""Sparsification of one task vector: which entries to keep, and how to rescale them.

Every function here works on a single tensor (one model's task vector; only
``variance_topk_mask`` takes the [K, ...] stack), returns a new tensor and never
modifies its input. Masks are boolean tensors of the input's shape.

Selection by magnitude finds the one or two threshold magnitudes by a radix select
(``kth_smallest``, linear time). Where the cut falls inside a group of equal magnitudes,
the members kept depend on the tie rule (``ties``):

* ``"flat"``: the lower flat index first, as a stable sort orders ties:
  ``top_magnitude_mask(t, k)`` keeps the k largest ``|t|``, and among entries tied at the
  k-th largest magnitude those with the lower flat index; ``magnitude_window_mask(t,
  start, stop)`` keeps the entries whose position in the stable ascending order of ``|t|``
  lies in ``[start, stop)``. Fully determined by the values, on any device.
* ``"sort"``: mergekit's rule, the order of torch's own (unstable) sort of ``|t|``:
  ``argsort(|t|, descending=True)[:k]``, ``sort(|t|).indices[start:stop]``. It depends on
  the whole tensor, the device and torch's C++ library, so the sort is run, only when a
  group of equal nonzero magnitudes straddles the cut (kept zeros change nothing): no cost
  otherwise. On the CPU the fast path follows the sort's partitions instead of running it
  (``alloykit.ops.tie_order``), with the same result.

The passes over a tensor run a block of ``BLOCK`` entries at a time: the only
full-size allocation of a mask function is the mask itself (one byte an entry), and a
block's temporaries stay in the CPU cache. Counts are exact, so the results do not
depend on the block size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from alloykit.ops import philox

#: entries per block in the passes over a tensor
BLOCK = 1 << 18

#: how a cut inside a group of equal magnitudes is settled (module docstring)
TieRule = Literal["flat", "sort"]


def _blocks(flat: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    return [(i, flat[i : i + BLOCK]) for i in range(0, flat.numel(), BLOCK)]


def _magnitude_bits(block: torch.Tensor) -> torch.Tensor:
    """|x| of float32 entries as int32 bit patterns, which order like the magnitudes."""
    return block.view(torch.int32) & 0x7FFFFFFF


def keep_count(numel: int, density: float, *, at_least_one: bool) -> int:
    """How many of ``numel`` entries a magnitude trim at ``density`` keeps.

    ``int(density * numel)``, raised to 1 for a positive density when ``at_least_one``
    (mergekit's rule; PEFT's rule does not raise it), and capped at ``numel``.
    """
    if density <= 0 or numel == 0:
        return 0
    k = int(density * numel)
    if at_least_one:
        k = max(1, k)
    return min(k, numel)


def kth_smallest(values: torch.Tensor, rank: int) -> tuple[torch.Tensor, int, int]:
    """The value at 0-based ascending ``rank`` of non-negative float32 ``values``.

    Returns ``(value, n_less, n_equal)``: the value (0-d tensor) and how many entries are
    smaller than it and equal to it. Radix select: the bit patterns of non-negative
    floats order like the floats, so two ``bincount`` passes (high 16 bits, then the low
    16 bits inside the chosen bucket) find the value in linear time, several times
    faster than ``torch.kthvalue`` and far faster than a sort.
    """
    flat = values.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    return _kth_magnitude(flat, rank)


def _kth_magnitude(flat: torch.Tensor, rank: int) -> tuple[torch.Tensor, int, int]:
    """``kth_smallest`` of ``|flat|`` (float32), without a full-size temporary."""
    if not 0 <= rank < flat.numel():
        raise IndexError(f"rank {rank} out of range for {flat.numel()} entries")
    counts = torch.zeros(1 << 15, dtype=torch.int64, device=flat.device)
    for _, block in _blocks(flat):  # high 16 bits: 0 .. 0x7FFF (NaN included)
        counts += torch.bincount(_magnitude_bits(block) >> 16, minlength=1 << 15)
    counts = counts.cumsum_(0)
    bucket = int(torch.searchsorted(counts, rank + 1))  # first bucket reaching rank + 1 entries
    below = int(counts[bucket - 1]) if bucket else 0
    # low 16 bits inside the bucket; bin 0 collects the entries below it, bin 65537 those above
    low_counts = torch.zeros((1 << 16) + 2, dtype=torch.int64, device=flat.device)
    for _, block in _blocks(flat):
        shifted = _magnitude_bits(block).sub_(bucket << 16).clamp_(-1, 1 << 16).add_(1)
        low_counts += torch.bincount(shifted, minlength=(1 << 16) + 2)
    low_counts = low_counts[1 : (1 << 16) + 1].cumsum_(0)
    low_bits = int(torch.searchsorted(low_counts, rank + 1 - below))
    n_less = below + (int(low_counts[low_bits - 1]) if low_bits else 0)
    n_equal = below + int(low_counts[low_bits]) - n_less
    pattern = torch.tensor((bucket << 16) | low_bits, dtype=torch.int32, device=flat.device)
    return pattern.view(torch.float32), n_less, n_equal


def _magnitude_select(
    t: torch.Tensor,
    above: torch.Tensor | None,
    below: torch.Tensor | None,
    ties: list[tuple[torch.Tensor, int, int, int]],
    strict: bool = True,
    apply: bool = False,
) -> torch.Tensor:
    """Mask of ``above < |t| < below`` (either bound optional; ``strict=False`` makes the
    lower bound inclusive), plus, for each ``(value, first, last, n_equal)`` in ``ties``,
    the entries equal to ``value`` at positions [first, last) among them in flat order.

    One pass of blocks; tie positions are counted per block, so only a block holding
    the first or last of the kept tied entries is searched. With ``apply`` (``t`` float32
    and contiguous) each block of ``t`` is multiplied by its mask in place instead, and
    ``t`` is returned: ``t.mul_(mask)`` without the mask.
    """
    flat = t.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    keep = torch.empty(min(BLOCK, flat.numel()) if apply else flat.numel(), dtype=torch.bool, device=flat.device)
    seen = [0] * len(ties)
    for start, block in _blocks(flat):
        mags = block.abs()
        out = keep[: block.numel()] if apply else keep[start : start + block.numel()]
        if above is not None:
            (torch.gt if strict else torch.ge)(mags, above, out=out)
            if below is not None:
                out &= mags < below
        elif below is not None:
            torch.lt(mags, below, out=out)
        else:
            out.fill_(True)
        for j, (value, first, last, n_equal) in enumerate(ties):
            if last <= first or seen[j] >= last:
                continue
            equal = mags == value
            if first == 0 and last == n_equal:
                out |= equal
                continue
            count = int(equal.sum())
            lo, hi = max(first - seen[j], 0), min(last - seen[j], count)
            if lo < hi:
                if lo == 0 and hi == count:
                    out |= equal
                else:
                    out[torch.nonzero(equal).squeeze(1)[lo:hi]] = True
            seen[j] += count
        if apply:
            block.mul_(out)
    return t if apply else keep.reshape(t.shape)


def magnitude_window_mask(t: torch.Tensor, start: int, stop: int, ties: TieRule = "flat") -> torch.Tensor:
    """Keep the entries ranked ``start <= r < stop`` by ascending ``|t|``.

    ``ties="flat"``: the rank of an entry is the number of smaller magnitudes plus the
    number of equal ones before it in flat order (the order of a stable sort);
    ``"sort"``: its position in ``torch.sort(|t|)`` (mergekit), where a tie group is cut.
    """
    return _magnitude_window(t, start, stop, apply=False, ties=ties)


def _magnitude_window(t: torch.Tensor, start: int, stop: int, apply: bool, ties: TieRule = "flat") -> torch.Tensor:
    n = t.numel()
    start, stop = max(0, start), min(n, stop)
    if start >= stop or start == 0 and stop == n:
        return _constant(t, start < stop, apply)
    flat = t.reshape(-1) if t.dtype == torch.float32 else t.reshape(-1).float()
    above = below = None
    edges = []
    if start > 0:  # ranks below `start` go
        lo = _kth_magnitude(flat, start)
        above = lo[0]
        edges.append(lo)
    if stop < n:  # ranks from `stop` on go
        hi = _kth_magnitude(flat, stop - 1)
        below = hi[0]
        if not edges or hi[1] != edges[0][1]:
            edges.append(hi)
    # equal values hold ranks n_less .. n_less + n_equal - 1
    groups = [(value, max(0, start - n_less), min(n_equal, stop - n_less), n_equal) for value, n_less, n_equal in edges]
    if ties == "sort" and any(0 < b - a < n_eq and value != 0 for value, a, b, n_eq in groups):
        return _sorted_keep(t, flat, torch.sort(flat.abs()).indices[start:stop], apply)
    return _magnitude_select(flat, above, below, groups, apply=apply).reshape(t.shape)


def top_magnitude_mask(t: torch.Tensor, k: int, ties: TieRule = "flat") -> torch.Tensor:
    """Keep the ``k`` entries of largest ``|t|``; among entries tied at the k-th largest
    magnitude the lower flat index wins (``ties="flat"``: a stable descending sort), or
    those ``torch.argsort(|t|, descending=True)[:k]`` keeps (``"sort"``: mergekit)."""
    return _top_magnitude(t, k, apply=False, ties=ties)


def _top_magnitude(t: torch.Tensor, k: int, apply: bool, ties: TieRule = "flat") -> torch.Tensor:
    n = t.numel()
    if k <= 0 or k >= n:
        return _constant(t, k > 0, apply)
    flat = t.reshape(-1) if t.dtype == torch.float32 else t.reshape(-1).float()
    value, n_less, n_equal = _kth_magnitude(flat, n - k)
    n_tied_kept = k - (n - n_less - n_equal)
    if ties == "sort" and 0 < n_tied_kept < n_equal and value != 0:
        return _sorted_keep(t, flat, torch.argsort(flat.abs(), descending=True)[:k], apply)
    return _magnitude_select(flat, value, None, [(value, 0, n_tied_kept, n_equal)], apply=apply).reshape(t.shape)


def _sorted_keep(t: torch.Tensor, flat: torch.Tensor, kept: torch.Tensor, apply: bool) -> torch.Tensor:
    """The mask of the flat indices ``kept`` (chosen by torch's sort), or ``t`` times it."""
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[kept] = True
    mask = mask.reshape(t.shape)
    return t.mul_(mask) if apply else mask


def _constant(t: torch.Tensor, keep: bool, apply: bool) -> torch.Tensor:
    """An all-True / all-False mask, or (apply) ``t`` multiplied by it in place."""
    if apply:
        return t if keep else t.mul_(0.0)
    return torch.full(t.shape, keep, dtype=torch.bool, device=t.device)


def _can_apply(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def magnitude_trim_(t: torch.Tensor, density: float, *, at_least_one: bool = True, ties: TieRule = "flat") -> torch.Tensor:
    """``t.mul_(magnitude_mask(t, density))``: the same numbers, computed a block at a time
    without the full-size mask (nor its float32 copy that the multiplication would make)."""
    if density >= 1:
        return t
    k = keep_count(t.numel(), density, at_least_one=at_least_one)
    if _can_apply(t):
        return _top_magnitude(t, k, apply=True, ties=ties)
    return t.mul_(top_magnitude_mask(t, k, ties))


def outlier_trim_(t: torch.Tensor, density: float, gamma: float, ties: TieRule = "flat") -> torch.Tensor:
    """``t.mul_(outlier_mask(t, density, gamma))``, a block at a time (see ``magnitude_trim_``)."""
    if density >= 1:
        return t
    start, stop = outlier_window(t.numel(), density, gamma)
    if _can_apply(t):
        return _magnitude_window(t, start, stop, apply=True, ties=ties)
    return t.mul_(magnitude_window_mask(t, start, stop, ties))


def magnitude_mask(t: torch.Tensor, density: float, *, at_least_one: bool = True) -> torch.Tensor:
    """Keep the ``keep_count(numel, density)`` largest magnitudes (TIES' trim step).

    ``at_least_one=True`` is mergekit's count (a positive density keeps at least one
    entry); ``False`` is PEFT's (``int(density * numel)``, possibly none).
    """
    if density >= 1:
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    return top_magnitude_mask(t, keep_count(t.numel(), density, at_least_one=at_least_one))


def outlier_mask(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest magnitudes, then the
    smallest, keeping ``int(density * numel)`` entries in all.

    With ``n_top = int(gamma * n)`` and ``n_keep = int(density * n)``, keeps ascending
    magnitude ranks ``[b, b + n_keep)`` where ``b = max(0, n - n_keep - n_top)``: when
    ``density + gamma > 1`` fewer outliers are dropped so that the density holds.
    ``n_top == 0`` (a small tensor) drops no outliers and keeps the ``n_keep`` largest.
    A density of 1 or more keeps everything.
    """
    if density >= 1:
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    return magnitude_window_mask(t, *outlier_window(t.numel(), density, gamma))


def outlier_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Ascending ranks [bottom, bottom + n_keep) that ``outlier_mask`` keeps."""
    n_keep = keep_count(n, density, at_least_one=False)
    n_top = int(gamma * n)
    bottom = max(0, n - n_keep - n_top)
    return bottom, bottom + n_keep


def threshold_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """FusionBench's TIES trim: keep ``|t| >= m``, where m is the ``(n - int(n * density))``-th
    smallest magnitude (1-based).

    That keeps the ``int(n * density) + 1`` largest magnitudes and every entry tied with
    the smallest of them; a density of 1 keeps everything (FusionBench fails there).
    """
    n = t.numel()
    rank = n - int(n * density)
    if density >= 1 or rank <= 0:
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    flat = t.reshape(-1) if t.dtype == torch.float32 else t.reshape(-1).float()
    return _magnitude_select(flat, _kth_magnitude(flat, rank - 1)[0], None, [], strict=False).reshape(t.shape)


def stream_mask(prob: torch.Tensor | float, seed: int, model: int, start: int, shape: tuple[int, ...],
                dtype: torch.dtype = torch.bool, device: torch.device | None = None) -> torch.Tensor:
    """Independent keep/drop draws from the counter-based stream (``alloykit.ops.philox``):
    entry e of the block (flat index ``start + e`` in model ``model``'s task vector) is kept
    with probability ``prob[e]`` (or ``prob``). A boolean mask of ``shape``, or 1/0 in
    ``dtype`` (what a multiplication needs)."""
    count = math.prod(shape)
    keep = philox.keep_mask(prob, seed, model, start, count, device).view(shape)
    return keep if dtype == torch.bool else keep.to(dtype)


def della_keep_probability(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities, from ``density - epsilon`` to ``density + epsilon``.

    Entries are ranked by magnitude within each row (along dim 1; a 0-d or 1-D tensor is
    one row), smallest rank 0, ties in flat-index order, and the probability grows
    linearly with the rank: ``p = (density - epsilon) + 2 * epsilon * rank / (n_row - 1)``.
    A row of one entry gets ``p = density`` (mergekit produces NaN there).
    """
    rows = t.reshape(1, -1) if t.dim() < 2 else t
    n_row = rows.shape[1]
    col_bits = max(1, (n_row - 1).bit_length())
    if rows.dim() == 2 and rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.is_contiguous() \
            and 31 + col_bits <= 52:
        prob = torch.empty(rows.shape, dtype=t.dtype)
        step = max(1, BLOCK // n_row)
        for r0 in range(0, rows.shape[0], step):
            prob[r0 : r0 + step] = _rank_probability(_row_ranks(rows[r0 : r0 + step], col_bits), n_row, density, epsilon)
        return prob.reshape(t.shape)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty(rows.shape, dtype=t.dtype, device=t.device)
    positions = torch.arange(n_row, dtype=t.dtype, device=t.device).view(1, -1, *([1] * (rows.dim() - 2)))
    ranks.scatter_(1, order, positions.expand_as(order).contiguous())
    return _rank_probability(ranks, n_row, density, epsilon).reshape(t.shape)


def _rank_probability(ranks: torch.Tensor, n_row: int, density: float, epsilon: float) -> torch.Tensor:
    rank_norm = ranks / (n_row - 1) if n_row > 1 else ranks.fill_(0.5)
    prob = (density - epsilon) + rank_norm * 2 * epsilon
    return prob.clamp_(0, 1)


def _row_ranks(rows: torch.Tensor, col_bits: int) -> torch.Tensor:
    """Ascending rank of each ``|entry|`` within its row (float32), ties by column: the
    ranks of ``argsort(|rows|, dim=1, stable=True)``, found by sorting unique keys
    ``(magnitude bits, column)``. Below 2**52 the keys are exact in float64, whose sort
    numpy vectorizes (AVX-512/AVX2): over ten times faster than the stable argsort.
    """
    n_row = rows.shape[1]
    bits = _magnitude_bits(rows).clamp_(max=0x7F800001)  # every NaN alike: after inf, ties by column
    keys = (bits.to(torch.int64) << col_bits).bitwise_or_(torch.arange(n_row)).to(torch.float64).numpy()
    keys.sort(axis=1)
    cols = torch.from_numpy(keys).to(torch.int64).bitwise_and_((1 << col_bits) - 1)
    ranks = torch.empty(rows.shape, dtype=torch.float32)
    return ranks.scatter_(1, cols, torch.arange(n_row, dtype=torch.float32).expand(rows.shape[0], n_row).contiguous())


def rescale_l1(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` by one scalar so that its L1 norm equals ``original``'s (mergekit's rescale).

    Left unscaled when either norm is below ``eps`` (nothing meaningful to restore).
    """
    before = original.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def rescale_l1_(kept: torch.Tensor, before: torch.Tensor, eps: float = 1e-7, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``rescale_l1`` in place, given the original's L1 norm ``before``: the same result
    as ``rescale_l1(original, kept)`` without keeping the original. ``scratch`` (kept's
    shape) holds ``|kept|`` instead of a fresh temporary."""
    after = torch.abs(kept, out=scratch).sum() if scratch is not None else kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def rescale_inverse_probability(kept: torch.Tensor, prob: torch.Tensor | float) -> torch.Tensor:
    """Divide each kept entry by its keep probability (DARE's and DELLA's papers, PEFT).

    Unbiased: ``E[rescaled] = t``. Entries with probability 0 are never kept and stay 0.
    """
    if isinstance(prob, torch.Tensor):
        return torch.where(prob > 0, kept / prob.clamp(min=torch.finfo(kept.dtype).tiny), 0.0)
    return kept / prob if prob > 0 else torch.zeros_like(kept)


def variance_topk_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's "select" step: keep the entries where the K task vectors vary the most.

    Mask of shape ``deltas.shape[1:]`` holding the ``int(fraction * m)`` entries of largest
    population variance across models (dim 0), where m counts the entries of nonzero
    variance (ties: lower flat index). ``fraction >= 1`` keeps everything.
    """
    shape = deltas.shape[1:]
    if fraction >= 1:
        return torch.ones(shape, dtype=torch.bool, device=deltas.device)
    if fraction <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=deltas.device)
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction)
    return top_magnitude_mask(var, k)
