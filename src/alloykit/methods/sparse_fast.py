"""Fast paths of the task-vector merges (``sparse.py``), streamed over blocks of rows.

Each computes the same tensor as its reference in ``sparse.py`` in as few passes over
the inputs as the trim allows:

* task arithmetic: one pass (delta, weight, sum, add: ``ops.fast_merge.combine``);
* TIES, Model Breadcrumbs: the magnitude thresholds of every model by radix select
  (``ops.fast_select``: a pass for the histogram of the high key bits, a pass for the low
  bits in the bucket of the cut), then one fused pass that masks, weights, elects and
  sums. Where equal magnitudes straddle a cut, one more pass per model collects that
  model's magnitudes as int32 keys and ``ops.tie_order`` follows torch's sort to the
  cut, as mergekit does;
* DARE: masks from the counter-based stream (``ops.fast_random``); with L1 rescaling one
  pass for the norms (masks drawn), one to merge (the same masks drawn again: cheaper
  than storing them);
* DELLA: the same, the keep probability of an entry set by its magnitude rank in its
  row (rows sorted by numpy); the masks of the first pass are kept as bits for the second;
* SCE: the variance threshold by radix select, the selected task vectors' energies added
  up in its second pass (a pass of their own where the cut's bucket is too large to
  keep), then election and disjoint mean, each pass one fused loop (``ops.fast_sce``).

Per entry the arithmetic is the reference's, so the bytes are the reference's; only the
L1 norms of rescaling are sums over the whole tensor, taken here in float64 in another
order than torch's float32 sum (the rescaled entries then differ in the last bits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from alloykit.methods.stream import Block, RowSums, StreamInput
from alloykit.ops import fast_merge, fast_random, fast_sce, fast_select, philox, tie_order
from alloykit.ops.fast_select import KeepRule
from alloykit.ops.sparsify import keep_count, outlier_window

_ZERO_WEIGHT_SUM = 1e-8
_RESCALE_EPS = 1e-7

#: a model's trim: its KeepRule over ascending magnitude ranks, or None to keep everything
RuleOf = Callable[[int, Any], KeepRule | None]


def _weights(x: StreamInput) -> np.ndarray:
    return np.array([float(m.weight) for m in x.model_params], dtype=np.float32)


def _sum_divisor(x: StreamInput, w: np.ndarray) -> np.float32:
    """normalize without election divides by sum_i w_i (a float32 sum, as torch's), or by 1 near 0."""
    total = np.float32(0.0)
    for v in w:
        total = np.float32(total + v)
    return total if abs(float(total)) >= _ZERO_WEIGHT_SUM else np.float32(1.0)


class _Scratch:
    """Per-tensor buffers of one block's size."""

    def __init__(self, x: StreamInput):
        m = x.block_size
        self.keep = np.ones((x.k, m), dtype=np.float32)
        self.total = np.empty(m, dtype=np.float32)
        self.merged = np.empty(m, dtype=np.float32)
        self.agree = np.empty(m, dtype=np.float32)
        self.lanes = np.empty(8 * (m // 8 + 2), dtype=np.uint32)

    def keep_of(self, block: Block) -> np.ndarray:
        return self.keep[:, : block.size] if block.size == self.keep.shape[1] else np.ascontiguousarray(
            self.keep[:, : block.size])


def _combine(x: StreamInput, block: Block, sc: _Scratch, keep: np.ndarray | None, scale: np.ndarray,
             rescaled: np.ndarray, w: np.ndarray, mode: int, normalize: bool, divisor: np.float32) -> None:
    out = x.result_buffer(block)
    m = block.size
    fast_merge.combine(block.stack, keep if keep is not None else sc.keep[:, :1], keep is not None, scale, rescaled, w,
                       mode, normalize, divisor, np.float32(x.params.lambda_), block.base, out, sc.total[:m],
                       sc.merged[:m], sc.agree[:m])
    x.write(block, out)


def _mode(consensus: str | None) -> int:
    if consensus is None:
        return fast_merge.SUM
    return fast_merge.ELECT_SUM if consensus == "sum" else fast_merge.ELECT_COUNT


# --------------------------------------------------------------------------------------
# magnitude trims (TIES, Breadcrumbs): thresholds by radix select, then one fused pass
# --------------------------------------------------------------------------------------


def _l1(x: StreamInput, block: Block, values: np.ndarray) -> np.ndarray:
    """Per row of the block: each model's sum of |values| ([rows, K] float64)."""
    return np.abs(x.by_rows(values, block)).sum(axis=2, dtype=np.float64)


def _locate_edges(x: StreamInput, rules: list[KeepRule | None], with_sums: bool) -> np.ndarray:
    """Two passes of histograms: every rule's edges located. Returns each model's sum of
    |delta| (float64, the same at any block size; zeros unless ``with_sums``)."""
    k = x.k
    counts = np.zeros((k, fast_select.HIGH_BUCKETS), dtype=np.int64)
    sums = RowSums(x, (k,))
    unused = np.zeros((k, 1), dtype=np.float64)
    for block in x.blocks():
        d = block.deltas()
        fast_select.count_high(d.view(np.int32), d, counts, unused, False)
        if with_sums:
            sums.add(block, _l1(x, block, d))
    for i, rule in enumerate(rules):
        for edge in rule.edges if rule else ():
            edge.locate_bucket(counts[i])
    buckets = np.full((k, 2), -1, dtype=np.int64)
    for i, rule in enumerate(rules):
        for e, edge in enumerate(rule.edges if rule else ()):
            buckets[i, e] = edge.bucket
    if (buckets >= 0).any():
        low = np.zeros((k, 2, fast_select.LOW_BINS), dtype=np.int64)
        unused = np.zeros((k, 2, 1), dtype=np.float64)
        for block in x.blocks():
            d = block.deltas()
            fast_select.count_low(d.view(np.int32), d, buckets, low, unused, False)
        for i, rule in enumerate(rules):
            for e, edge in enumerate(rule.edges if rule else ()):
                edge.locate_key(low[i, e])
    return sums.total() if with_sums else np.zeros(k)


def _model_keys(x: StreamInput, model: int) -> np.ndarray:
    """One model's magnitude keys in flat order (int32, 4 bytes an entry)."""
    keys = np.empty(x.numel, dtype=np.int32)
    for block in x.blocks():
        d = block.deltas()
        fast_select.magnitude_keys(d.view(np.int32), model, keys, block.start)
    return keys


def _torch_sort_flags(x: StreamInput, model: int, key: int, descending: bool, start: int, stop: int) -> np.ndarray:
    """The members of tie group ``key`` that torch's sort puts at positions [start, stop):
    mergekit's own computation, for where the sort cannot be followed (other C++ library)."""
    keys = _model_keys(x, model)
    mags = torch.from_numpy(keys).view(torch.float32)
    order = torch.sort(mags, descending=descending).indices[start:stop]
    kept = torch.zeros(x.numel, dtype=torch.bool)
    kept[order] = True
    ties = torch.from_numpy(keys == key)
    return kept[ties].numpy().astype(np.uint8)


def _mergekit_tie_flags(x: StreamInput, model: int, rule: KeepRule) -> dict[int, np.ndarray]:
    """Flags of the tie groups a rule cuts, in mergekit's order (a zero magnitude's do not
    matter: a kept zero adds nothing, so flat order stands there)."""
    flags: dict[int, np.ndarray] = {}
    groups = [g for g in rule.cut_groups() if g[0] != 0]
    if not groups:
        return flags
    # top-k: mergekit keeps positions [0, k) of a descending sort; Breadcrumbs a window of an ascending one
    start, stop = (0, rule.n - rule.start) if rule.descending else (rule.start, rule.stop)
    if tie_order.torch_sort_is_introsort():
        keys = _model_keys(x, model)
        for key, *_ in groups:
            found = tie_order.sort_kept_ties(keys if len(groups) == 1 else keys.copy(), key, rule.descending,
                                             start, stop)
            if found is None:
                break
            flags[key] = found
        else:
            return flags
    for key, *_ in groups:
        flags[key] = _torch_sort_flags(x, model, key, rule.descending, start, stop)
    return flags


def _rule_arrays(rules: list[KeepRule | None]) -> tuple[np.ndarray, ...]:
    k = len(rules)
    lower = np.full(k, fast_select.NO_EDGE, dtype=np.int64)
    upper = np.full(k, fast_select.TOP, dtype=np.int64)
    tie_keys = np.full((k, 2), -1, dtype=np.int64)
    tie_lo = np.zeros((k, 2), dtype=np.int64)
    tie_hi = np.zeros((k, 2), dtype=np.int64)
    offsets = np.full((k, 2), -1, dtype=np.int64)
    chunks, used = [], 0
    for i, rule in enumerate(rules):
        if rule is None:
            continue
        lower[i], upper[i] = rule.lower, rule.upper
        for e, (key, a, b, flags) in enumerate(rule.ties):
            tie_keys[i, e], tie_lo[i, e], tie_hi[i, e] = key, a, b
            if flags is not None:
                offsets[i, e] = used
                chunks.append(flags)
                used += flags.size
    tie_flags = np.concatenate(chunks) if chunks else np.zeros(1, dtype=np.uint8)
    return lower, upper, tie_keys, tie_lo, tie_hi, offsets, tie_flags


def mergekit_tie_order(dtype: torch.dtype | None) -> bool:
    """Whether a trim keeps equal magnitudes at its cut in mergekit's order (torch's sort):
    where mergekit computes in float32 (or unknown). mergekit in bfloat16 or float16 trims
    magnitudes rounded to that dtype, which alloykit (float32) does not compute: no tie
    order would reproduce its choice, so the lower flat index is kept (no sort)."""
    return dtype is None or dtype in (torch.float32, torch.float64)


def trim_merge(x: StreamInput, rule_of: RuleOf, consensus: str | None, *, mergekit_ties: bool | None = None) -> bool:
    """Magnitude trim of each task vector (``rule_of``), then the weighted (elected) sum."""
    if mergekit_ties is None:
        mergekit_ties = mergekit_tie_order(x.compute_dtype)
    rules = [rule_of(x.numel, mp) for mp in x.model_params]
    rescale = bool(getattr(x.params, "rescale", False))
    if any(r is not None for r in rules):
        before = _locate_edges(x, rules, with_sums=rescale)
    else:
        before = np.zeros(x.k)
    for i, rule in enumerate(rules):
        if rule is not None:
            rule.finish(_mergekit_tie_flags(x, i, rule) if mergekit_ties else None)
    arrays = _rule_arrays(rules)
    sc = _Scratch(x)
    scale = np.ones(x.k, dtype=np.float32)
    rescaled = np.zeros(x.k, dtype=np.bool_)
    trimmed = np.array([r is not None for r in rules], dtype=np.bool_)
    if rescale and trimmed.any():
        sums = RowSums(x, (x.k,))
        ordinals = np.zeros((x.k, 2), dtype=np.int64)
        for block in x.blocks():
            d = block.deltas()
            keep = sc.keep_of(block)
            fast_select.keep_flags(d.view(np.int32), *arrays, ordinals, keep)
            sums.add(block, _l1(x, block, d * keep))
        after = sums.total()
        for i in range(x.k):
            if trimmed[i] and before[i] >= _RESCALE_EPS and after[i] >= _RESCALE_EPS:
                scale[i], rescaled[i] = np.float32(before[i]) / np.float32(after[i]), True
    w = _weights(x)
    normalize = bool(x.params.normalize)
    mode = _mode(consensus)
    divisor = _sum_divisor(x, w) if mode == fast_merge.SUM else np.float32(1.0)
    ordinals = np.zeros((x.k, 2), dtype=np.int64)
    for block in x.blocks():
        d = block.deltas()
        keep = None
        if trimmed.any():
            keep = sc.keep_of(block)
            fast_select.keep_flags(d.view(np.int32), *arrays, ordinals, keep)
        _combine(x, block, sc, keep, scale, rescaled, w, mode, normalize, divisor)
    return True


def top_k_rule(numel: int, mp: Any) -> KeepRule | None:
    """TIES' trim: the keep_count(numel, density) largest magnitudes (mergekit's count)."""
    if mp.density >= 1:
        return None
    k = keep_count(numel, mp.density, at_least_one=True)
    return KeepRule(numel, numel - k, numel, descending=True)


def outlier_rule(numel: int, mp: Any) -> KeepRule | None:
    """Model Breadcrumbs' trim: ascending ranks [b, b + int(density * n))."""
    if mp.density >= 1:
        return None
    start, stop = outlier_window(numel, mp.density, mp.gamma)
    return KeepRule(numel, start, stop)


def task_arithmetic(x: StreamInput) -> bool:
    return trim_merge(x, lambda n, mp: None, None)


def ties(x: StreamInput) -> bool:
    return trim_merge(x, top_k_rule, x.params.consensus_method)


def breadcrumbs(x: StreamInput) -> bool:
    return trim_merge(x, outlier_rule, None)


def breadcrumbs_ties(x: StreamInput) -> bool:
    return trim_merge(x, outlier_rule, x.params.consensus_method)


def tie_scratch(numel: int, k: int, dtype: torch.dtype | None) -> int:
    """Bytes to order one model's tied magnitudes as mergekit does: an int32 key an entry."""
    return 4 * numel if mergekit_tie_order(dtype) else 0


# --------------------------------------------------------------------------------------
# random drops (DARE, DELLA): counter-based draws, masks recomputed or kept as bits
# --------------------------------------------------------------------------------------

#: per block: writes model i's keep flags (float32 1/0) for the block's entries
DrawFn = Callable[[StreamInput, Block, int, Any, np.ndarray, _Scratch], None]


def _draw_dare(x: StreamInput, block: Block, i: int, mp: Any, keep_row: np.ndarray, sc: _Scratch) -> None:
    threshold = np.array([philox.threshold48(mp.density)], dtype=np.int64)
    fast_random.keep_draws(x.seed, i, block.start, threshold, True, sc.lanes, keep_row)


def random_merge(x: StreamInput, draw: DrawFn, consensus: str | None, store_masks: bool = False) -> bool:
    """Random drop of each task vector (``draw``), optional L1 rescale, weighted (elected) sum."""
    p = x.params
    if p.rescale and p.rescale_mode == "inverse_probability":
        return False  # a per-entry divisor: left to the reference
    drop = [0 < mp.density < 1 for mp in x.model_params]
    zero = [mp.density <= 0 for mp in x.model_params]
    sc = _Scratch(x)
    scale = np.ones(x.k, dtype=np.float32)
    rescaled = np.zeros(x.k, dtype=np.bool_)
    # DELLA's masks between its passes: bit-packed, one row of bytes per model, blocks at byte boundaries
    stored = np.empty((x.k, x.numel // 8 + x.rows + 1), dtype=np.uint8) if store_masks and p.rescale else None

    def masks(block: Block, d: np.ndarray) -> np.ndarray:
        keep = sc.keep_of(block)
        for i, mp in enumerate(x.model_params):
            if drop[i]:
                draw(x, block, i, mp, keep[i], sc)
            else:
                keep[i] = 0.0 if zero[i] else 1.0
        return keep

    if p.rescale and any(drop):
        sums_before, sums_after = RowSums(x, (x.k,)), RowSums(x, (x.k,))
        offset = 0
        for block in x.blocks():
            d = block.deltas()
            keep = masks(block, d)
            if stored is not None:
                packed = np.packbits(keep > 0, axis=1)
                stored[:, offset : offset + packed.shape[1]] = packed
                offset += packed.shape[1]
            sums_before.add(block, _l1(x, block, d))
            sums_after.add(block, _l1(x, block, d * keep))
        before, after = sums_before.total(), sums_after.total()
        for i in range(x.k):
            if drop[i] and before[i] >= _RESCALE_EPS and after[i] >= _RESCALE_EPS:
                scale[i], rescaled[i] = np.float32(before[i]) / np.float32(after[i]), True
    w = _weights(x)
    mode = _mode(consensus)
    divisor = _sum_divisor(x, w) if mode == fast_merge.SUM else np.float32(1.0)
    offset = 0
    for block in x.blocks():
        d = block.deltas()
        if stored is not None and rescaled.any():
            keep = sc.keep_of(block)
            width = (block.size + 7) // 8
            keep[:] = np.unpackbits(stored[:, offset : offset + width], axis=1, count=block.size)
            offset += width
        else:
            keep = masks(block, d)
        _combine(x, block, sc, keep, scale, rescaled, w, mode, bool(p.normalize), divisor)
    return True


def dare_linear(x: StreamInput) -> bool:
    return random_merge(x, _draw_dare, None)


def dare_ties(x: StreamInput) -> bool:
    return random_merge(x, _draw_dare, x.params.consensus_method)


def _draw_della(x: StreamInput, block: Block, i: int, mp: Any, keep_row: np.ndarray, sc: _Scratch) -> None:
    """DELLA's keep probability of each entry from its magnitude rank in its row (as
    ``sparsify.della_keep_probability``: ties by column), then the stream's draws."""
    rows = block.stack[i].reshape(block.row1 - block.row0, x.row_len)
    n_row = x.row_len
    col_bits = max(1, (n_row - 1).bit_length())
    keys = np.minimum(rows.view(np.int32) & 0x7FFFFFFF, fast_select.NAN_KEY).astype(np.int64)
    keys <<= col_bits
    keys |= np.arange(n_row, dtype=np.int64)
    keys.sort(axis=1)
    thresholds = np.empty(block.size, dtype=np.int64)
    fast_random.della_thresholds(keys, col_bits, np.float32(mp.density - mp.epsilon), np.float32(mp.epsilon),
                                 thresholds)
    fast_random.keep_draws(x.seed, i, block.start, thresholds, False, sc.lanes, keep_row)


def _della_streamable(x: StreamInput) -> bool:
    return len(x.shape) <= 2 and (x.row_len - 1).bit_length() + 31 <= 62


def della(x: StreamInput) -> bool:
    return _della_streamable(x) and random_merge(x, _draw_della, x.params.consensus_method, store_masks=True)


def della_linear(x: StreamInput) -> bool:
    return _della_streamable(x) and random_merge(x, _draw_della, None, store_masks=True)


def della_mask_bytes(numel: int, k: int, dtype: torch.dtype | None) -> int:
    """The masks DELLA keeps between its passes: one bit per entry and model."""
    return k * math.ceil(numel / 8)


# --------------------------------------------------------------------------------------
# SCE: variance selection (radix select on the variance), energies, disjoint mean
# --------------------------------------------------------------------------------------


#: bytes SCE may spend keeping the entries of the variance bucket of its cut (their low key
#: bits and K task-vector values) to add up the energies in the radix select's second pass;
#: where the bucket holds more, the energies take a pass of their own (the same bytes)
SCE_CUT_BUDGET = 64 << 20


def _sce_cut_bytes(entries: int, k: int) -> int:
    return entries * (2 + 4 * k)


def sce_scratch(numel: int, k: int, dtype: torch.dtype | None) -> int:
    """Bytes SCE keeps besides its blocks: at most the cut's bucket within ``SCE_CUT_BUDGET``."""
    return min(SCE_CUT_BUDGET, _sce_cut_bytes(numel, k))


class _SceBlocks:
    """SCE's per-tensor buffers and its per-block steps: variance, selection flags, energies."""

    def __init__(self, x: StreamInput):
        self.x = x
        self.var = np.empty(x.block_size, dtype=np.float32)
        self.keep = np.ones(x.block_size, dtype=np.float32)
        self.above = np.empty(x.block_size, dtype=np.float32)  # 1 above the cut's bucket (all selected), else 0
        self.moments = np.empty((2, x.block_size), dtype=np.float64)  # the variance's running mean and m2
        self.erase = np.empty((2, x.block_size), dtype=np.float32)  # the election's sum, the agreeing weight
        self.per_row = np.empty((2, x.rows_per_block, x.k), dtype=np.float64)  # energy sums of a block's rows
        #: per row and model: energy of the entries above the cut's bucket, then of those in it
        self.certain, self.cut = RowSums(x, (x.k,)), np.zeros((x.rows, x.k), dtype=np.float64)

    def variance(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        """The block's task vectors (computed in place) and their variances."""
        d = block.deltas()
        v = self.var[: block.size]
        fast_sce.variance(d, v, *self.moments)
        return d, v

    def energies(self) -> np.ndarray:
        """mean(tau_i^2) of the selected task vectors: each row's two sums added, rows added exactly."""
        return self.certain.total(extra=self.cut) / max(1, self.x.numel)


def _sce_histogram(x: StreamInput, sb: _SceBlocks, fraction: float) -> tuple[KeepRule, np.ndarray]:
    """Pass 1: the variances' high key bits; the rule keeping the int(fraction * m) largest."""
    counts = np.zeros((1, fast_select.HIGH_BUCKETS), dtype=np.int64)
    unused = np.zeros((1, 1), dtype=np.float64)
    nonzero = 0
    for block in x.blocks():
        v = sb.variance(block)[1][None]
        nonzero += int(np.count_nonzero(v))
        fast_select.count_high(v.view(np.int32), v, counts, unused, False)
    k = int(nonzero * fraction)
    rule = KeepRule(x.numel, x.numel - k, x.numel, descending=True)
    for edge in rule.edges:
        edge.locate_bucket(counts[0])
    return rule, counts[0]


def _sce_low_bits(x: StreamInput, sb: _SceBlocks, bucket: int) -> np.ndarray:
    """Pass 2 alone: the low key bits of the variances in the cut's bucket."""
    buckets = np.array([[bucket, -1]], dtype=np.int64)
    low = np.zeros((1, 2, fast_select.LOW_BINS), dtype=np.int64)
    for block in x.blocks():
        v = sb.variance(block)[1][None]
        fast_select.count_low(v.view(np.int32), v, buckets, low, np.zeros((1, 2, 1)), False)
    return low[0, 0]


def _sce_low_bits_and_energies(x: StreamInput, sb: _SceBlocks, rule: KeepRule, in_bucket: int) -> None:
    """Pass 2 with the energies folded in: the low key bits of the cut's bucket, the energy
    of every entry above that bucket (selected whatever the exact key), and the bucket's
    ``in_bucket`` entries kept, so that once the key is known their energies are added
    without another pass over the inputs."""
    edge = rule.edges[0]
    low = np.zeros(fast_select.LOW_BINS, dtype=np.int64)
    cut_rows = np.zeros(x.rows, dtype=np.int64)
    cut_low = np.empty(in_bucket, dtype=np.uint16)
    cut_taus = np.empty((in_bucket, x.k), dtype=np.float32)
    stored = 0
    found = np.empty(x.row_len, dtype=np.int64)
    for block in x.blocks():
        d, v = sb.variance(block)
        rows = sb.per_row[0, : block.row1 - block.row0]
        above = sb.above[: block.size]
        fast_sce.above_bucket(v.view(np.int32), edge.bucket, above)
        stored = fast_sce.split_energies(d, above, v.view(np.int32), edge.bucket, block.row0, x.row_len, rows,
                                         low, cut_rows, cut_low, cut_taus, stored, found)
        sb.certain.add(block, rows)
    edge.locate_key(low)
    rule.finish()
    lower, upper, tie_keys, tie_lo, tie_hi, *_ = _rule_arrays([rule])
    fast_sce.cut_energies(cut_rows, cut_low, cut_taus, edge.bucket, lower[0], upper[0], tie_keys[0, 0],
                          tie_lo[0, 0], tie_hi[0, 0], sb.cut)


def sce(x: StreamInput) -> bool:
    """Select (variance top-k, flat tie order as ``variance_topk_mask``), calculate (energy
    of the selected task vectors, float64 sums), erase (elected sign, disjoint mean): the
    reference's operations per entry, fused per block (``ops.fast_sce``).

    Passes (when 0 < select_topk < 1): the variances' histogram (high key bits); their low
    key bits in the cut's bucket, with the energies of the entries above that bucket and
    the bucket's entries kept (``SCE_CUT_BUDGET``) to add theirs once the cut's key is
    known; the merge. Three passes, four where the bucket exceeds the budget (the energies
    then take a pass of their own, the same bytes). Why not fewer: the merge needs every
    energy (its weights c_i are ratios of whole-tensor sums, and an output entry is a
    ratio in c, not fixable afterwards), the energies need the exact cut, and the cut
    needs every variance and then a second look at the entries of its bucket, which is
    unknown until the histogram is complete (keeping every entry's K values instead would
    hold the inputs in memory)."""
    fraction = x.params.select_topk
    sb = _SceBlocks(x)
    rule: KeepRule | None = None
    bucket = -1  # the high key bits of the cut: entries above it are all selected
    energies_done = False
    if fraction <= 0:
        rule = KeepRule(x.numel, 0, 0)
    elif fraction < 1:
        rule, counts = _sce_histogram(x, sb, fraction)
        if rule.edges:
            bucket = rule.edges[0].bucket
            in_bucket = int(counts[bucket])
            if _sce_cut_bytes(in_bucket, x.k) <= SCE_CUT_BUDGET:
                _sce_low_bits_and_energies(x, sb, rule, in_bucket)
                energies_done = True
            else:
                rule.edges[0].locate_key(_sce_low_bits(x, sb, bucket))
        if not energies_done:
            rule.finish()
    arrays = _rule_arrays([rule])
    masked = rule is not None and not (rule.start == 0 and rule.stop == x.numel)
    ordinals = np.zeros((1, 2), dtype=np.int64)

    def selected(block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flags = sb.keep[: block.size]
        if not masked:
            return block.deltas(), flags, sb.var[: block.size]
        d, v = sb.variance(block)
        fast_select.keep_flags(v.view(np.int32)[None], *arrays, ordinals, flags[None])
        return d, flags, v

    if not energies_done:  # a pass of their own
        for block in x.blocks():
            d, flags, v = selected(block)
            certain, cut = sb.per_row[:, : block.row1 - block.row0]
            above = flags  # no cut: every kept entry counts as above it
            if bucket >= 0:
                above = sb.above[: block.size]
                fast_sce.above_bucket(v.view(np.int32), bucket, above)
            fast_sce.row_energies(d, flags, above, x.row_len, certain, cut)
            sb.certain.add(block, certain)
            sb.cut[block.row0 : block.row1] = cut
        ordinals[:] = 0
    energy = sb.energies()
    total = float(energy.sum())
    c = (energy / total if total > 0 else np.full(x.k, 1.0 / x.k)).astype(np.float32)
    for block in x.blocks():
        d, flags, _ = selected(block)
        out = x.result_buffer(block)
        fast_sce.erase_merge(d, flags, c, block.base, out, *sb.erase)
        x.write(block, out)
    return True
