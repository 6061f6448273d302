"""Sparsification of one task vector: which entries to keep, and how to rescale them.

Every function here works on a single tensor (one model's task vector; only
``variance_topk_mask`` takes the [K, ...] stack), returns a new tensor and never
modifies its input. Masks are boolean tensors of the input's shape.

Selection by magnitude never sorts: it finds the one or two threshold magnitudes by a
radix select (``kth_smallest``, linear time) and settles ties at a threshold by
position, so the result is fully determined by the values:

* ``top_magnitude_mask(t, k)`` keeps the k largest ``|t|``; among entries tied at the
  k-th largest magnitude the ones with the lower flat index are kept.
* ``magnitude_window_mask(t, start, stop)`` keeps the entries whose position in the
  ascending order of ``|t|`` lies in ``[start, stop)``, tied magnitudes ordered by flat
  index (the order a stable sort gives).

mergekit sorts with ``torch.argsort``, which is stable on CPU only for tensors of at
most 16 entries; beyond that the order of tied magnitudes is an accident of the sort
kernel. Our rule equals mergekit's wherever its order is defined (no ties at the
threshold, or small tensors) and is deterministic everywhere.
"""

from __future__ import annotations

import torch


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
    if not 0 <= rank < flat.numel():
        raise IndexError(f"rank {rank} out of range for {flat.numel()} entries")
    bits = flat.view(torch.int32)
    high = bits >> 16  # 0 .. 0x7FFF for non-negative floats (NaN included)
    counts = torch.bincount(high, minlength=1 << 15).cumsum_(0)
    bucket = int(torch.searchsorted(counts, rank + 1))  # first bucket reaching rank + 1 entries
    below = int(counts[bucket - 1]) if bucket else 0
    low = bits[high == bucket] & 0xFFFF
    low_counts = torch.bincount(low, minlength=1 << 16).cumsum_(0)
    low_bits = int(torch.searchsorted(low_counts, rank + 1 - below))
    n_less = below + (int(low_counts[low_bits - 1]) if low_bits else 0)
    n_equal = below + int(low_counts[low_bits]) - n_less
    pattern = torch.tensor((bucket << 16) | low_bits, dtype=torch.int32, device=flat.device)
    return pattern.view(torch.float32), n_less, n_equal


def _keep_ties(
    keep: torch.Tensor, flat: torch.Tensor, value: torch.Tensor, first: int, last: int, n_equal: int
) -> None:
    """Set ``keep`` for the entries equal to ``value`` at positions [first, last) among them (flat order)."""
    if last <= first:
        return
    if first == 0 and last == n_equal:
        keep |= flat == value
    else:
        tied = torch.nonzero(flat == value).squeeze(1)  # ascending flat index
        keep[tied[first:last]] = True


def magnitude_window_mask(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Keep the entries ranked ``start <= r < stop`` by ascending ``|t|``.

    The rank of an entry is the number of smaller magnitudes plus the number of equal
    ones before it in flat order (the order of a stable sort).
    """
    n = t.numel()
    start, stop = max(0, start), min(n, stop)
    if start >= stop or start == 0 and stop == n:
        return torch.full(t.shape, start < stop, dtype=torch.bool, device=t.device)
    mags = t.abs().reshape(-1)
    keep = torch.ones(n, dtype=torch.bool, device=t.device)
    edges = []
    if start > 0:  # ranks below `start` go
        lo = kth_smallest(mags, start)
        keep &= mags > lo[0]
        edges.append(lo)
    if stop < n:  # ranks from `stop` on go
        hi = kth_smallest(mags, stop - 1)
        keep &= mags < hi[0]
        if not edges or hi[1] != edges[0][1]:
            edges.append(hi)
    for value, n_less, n_equal in edges:  # equal values hold ranks n_less .. n_less + n_equal - 1
        _keep_ties(keep, mags, value, max(0, start - n_less), min(n_equal, stop - n_less), n_equal)
    return keep.reshape(t.shape)


def top_magnitude_mask(t: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` entries of largest ``|t|``; among entries tied at the k-th largest
    magnitude the lower flat index wins (the order of a stable descending sort)."""
    n = t.numel()
    if k <= 0 or k >= n:
        return torch.full(t.shape, k > 0, dtype=torch.bool, device=t.device)
    mags = t.abs().reshape(-1)
    value, n_less, n_equal = kth_smallest(mags, n - k)
    n_tied_kept = k - (n - n_less - n_equal)
    keep = mags > value
    _keep_ties(keep, mags, value, 0, n_tied_kept, n_equal)
    return keep.reshape(t.shape)


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
    n = t.numel()
    if density >= 1:
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    n_keep = keep_count(n, density, at_least_one=False)
    n_top = int(gamma * n)
    bottom = max(0, n - n_keep - n_top)
    return magnitude_window_mask(t, bottom, bottom + n_keep)


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
    mags = t.abs()
    return mags >= kth_smallest(mags, rank - 1)[0]


def bernoulli_mask(prob: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Independent keep/drop draws: entry i is kept with probability ``prob[i]``.

    Draws ``torch.bernoulli(prob)`` from ``generator`` (the global generator when None),
    the same call and draw order as mergekit and PEFT.
    """
    return torch.bernoulli(prob, generator=generator).bool()


def della_keep_probability(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities, from ``density - epsilon`` to ``density + epsilon``.

    Entries are ranked by magnitude within each row (along dim 1; a 0-d or 1-D tensor is
    one row), smallest rank 0, ties in flat-index order, and the probability grows
    linearly with the rank: ``p = (density - epsilon) + 2 * epsilon * rank / (n_row - 1)``.
    A row of one entry gets ``p = density`` (mergekit produces NaN there).
    """
    rows = t.reshape(1, -1) if t.dim() < 2 else t
    n_row = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty(rows.shape, dtype=t.dtype, device=t.device)
    positions = torch.arange(n_row, dtype=t.dtype, device=t.device).view(1, -1, *([1] * (rows.dim() - 2)))
    ranks.scatter_(1, order, positions.expand_as(order).contiguous())
    rank_norm = ranks / (n_row - 1) if n_row > 1 else ranks.fill_(0.5)
    prob = (density - epsilon) + rank_norm * 2 * epsilon
    return prob.clamp_(0, 1).reshape(t.shape)


def rescale_l1(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` by one scalar so that its L1 norm equals ``original``'s (mergekit's rescale).

    Left unscaled when either norm is below ``eps`` (nothing meaningful to restore).
    """
    before = original.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


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
