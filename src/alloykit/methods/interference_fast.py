"""Fast paths of the interference methods (MagMax, Consensus TA, PCB), streamed over blocks of rows.

The references (``subspace.magmax``, ``subspace.consensus_ta``, ``interference.pcb``) hold
the whole tensor in float32 with [K, d] temporaries (on a 1.1B model the 32000 x 2048
embedding and head: 3-4.5 GB). Here a tensor's float32 working set is a few blocks:

* MagMax: one pass (per entry the task vector of largest magnitude, scaled, added to the
  base): bit for bit the reference's;
* Consensus TA: one pass (tau_MTL, the K TALL masks, their count, the masked sum, scaled):
  bit for bit the reference's for K <= 4. From K = 5 torch's strided ``sum(0)`` adds some
  entries (which: by their position in the tensor and torch's chunking) in another order
  than model order, here always ((0 + tau_1) + tau_2) + ...: tau_MTL then differs in the
  last bit there, and a TALL mask within rounding of its threshold may flip
  (tests/test_fast_interference.py bounds both);
* PCB: five passes. (1) min and max of each product tau_a tau_b (K(K+1)/2 pairs: the
  products are symmetric), which fix every min-max normalisation; (2) the softmax
  denominators, sums over the tensor of exp(Norm(.) - max) (the max after min-max
  normalisation is known: 1, or K for the intra score), per row in float64 and added
  exactly (``RowSums``: the same at any block size); (3, 4) each task's score threshold,
  the (1 - density) quantile of beta_a, by radix select on the float32 bits of the scores
  (``ops.fast_select``: a histogram of the high bits, then the low bits in the bucket of
  the cut; scores are >= 0, so bits order like values); (5) the merge: the kept scores'
  weighted mean. Passes 2-5 recompute the scores (K(K+1)/2 + K exponentials per entry)
  instead of storing them: K float32 scores per entry would be 0.8 GB for a 1.1B
  model's embedding at K = 3. The exponentials and the sums are not torch's (another
  expf, another summation order), so the scores differ in the last bits: the merged
  tensor agrees with the reference to a stated tolerance, except where an entry's score
  is within rounding of its task's threshold (tests/test_fast_interference.py).

Each returns False (the executor then runs the reference) where it cannot follow the
reference: PCB on a tensor whose products are not finite (NaN or Inf inputs: the
reference's normalisation then zeroes every score).
"""

from __future__ import annotations

import numpy as np
import torch

from alloykit.methods.stream import BLOCK_ENTRIES, Block, RowSums, StreamInput
from alloykit.ops import fast_interference, fast_select


def magmax(x: StreamInput) -> bool:
    lam = float(x.params.lambda_)
    for block in x.blocks():
        out = x.result_buffer(block)
        fast_interference.magmax_merge(block.deltas(), block.base, np.float32(lam), lam != 1, out)
        x.write(block, out)
    return True


def consensus_ta(x: StreamInput) -> bool:
    p = x.params
    count = np.empty(x.block_size, dtype=np.float32)
    for block in x.blocks():
        out = x.result_buffer(block)
        fast_interference.consensus_merge(block.deltas(), block.base, np.float32(p.lambda_t), np.float32(p.k),
                                          np.float32(p.alpha), p.alpha != 1, out, count[: block.size])
        x.write(block, out)
    return True


class _PcbScores:
    """What every pass of PCB needs to compute the scores of a block: the pairs (a <= b), their
    normalisations (found by the first pass) and softmax factors (by the second)."""

    def __init__(self, x: StreamInput):
        k = x.k
        pairs = [(a, b) for a in range(k) for b in range(a, k)]
        self.pair_a = np.array([a for a, _ in pairs], dtype=np.int64)
        self.pair_b = np.array([b for _, b in pairs], dtype=np.int64)
        self.pair_of = np.empty((k, k), dtype=np.int64)
        for p, (a, b) in enumerate(pairs):
            self.pair_of[a, b] = self.pair_of[b, a] = p
        self.intra_of = np.array([self.pair_of[a, a] for a in range(k)], dtype=np.int64)
        self.k_scale = np.float32(k)
        n = len(pairs)
        self.lo = np.full(n, np.inf, dtype=np.float32)
        self.hi = np.full(n, -np.inf, dtype=np.float32)
        self.span = np.zeros(n, dtype=np.float32)
        self.top = np.zeros(n, dtype=np.float32)
        self.top_intra = np.zeros(k, dtype=np.float32)
        self.factors = np.ones(n, dtype=np.float32)
        self.intra_factors = np.ones(k, dtype=np.float32)
        self.series = np.empty((n + k, x.block_size), dtype=np.float32)
        self.scores = np.empty((k, x.block_size), dtype=np.float32)

    def extremes(self, d: np.ndarray) -> None:
        """Fold the block's min and max of every product tau_a tau_b into lo, hi (numpy's
        SIMD min/max: faster here than a numba loop, whose float min/max reductions do not
        vectorize; exact either way, and NaN or Inf shows in them)."""
        product = self.scores[0, : d.shape[1]]
        for p, (a, b) in enumerate(zip(self.pair_a, self.pair_b)):
            with np.errstate(over="ignore", invalid="ignore"):  # a product that overflows: the tensor is declined
                np.multiply(d[a], d[b], out=product)
            self.lo[p] = np.minimum(self.lo[p], product.min())  # NaN propagates (Python's min would drop it)
            self.hi[p] = np.maximum(self.hi[p], product.max())

    def normalise(self) -> None:
        """After the extremes: Norm(v) = (v - lo) / span, whose maximum is 1 (0 where span is 0)."""
        self.span = self.hi - self.lo  # float32, as the reference's float(hi - lo)
        self.top = np.where(self.span > 0, 1.0, 0.0).astype(np.float32)
        self.top_intra = (self.top[self.intra_of] * self.k_scale).astype(np.float32)

    def prepare(self, x: StreamInput) -> bool:
        """Passes 1 and 2: the extremes, then the softmax factors; False where a product is
        not finite (NaN or Inf: the reference's normalisation, and its answer, differ)."""
        for block in x.blocks():
            self.extremes(block.deltas())
        if not (np.isfinite(self.lo).all() and np.isfinite(self.hi).all()):
            return False
        self.normalise()
        pairs = len(self.factors)
        sums = RowSums(x, (pairs + x.k,))
        for block in x.blocks():
            series = self.exponentials(block, block.deltas())
            sums.add(block, x.by_rows(series, block).sum(axis=2, dtype=np.float64))
        totals = sums.total()
        # the softmax rescaled to mean 1: e * (d / sum e), the factor rounded to float32 as the reference's
        self.factors = (x.numel / totals[:pairs]).astype(np.float32)
        self.intra_factors = (x.numel / totals[pairs:]).astype(np.float32)
        return True

    def exponentials(self, block: Block, d: np.ndarray) -> np.ndarray:
        series = self.series[:, : block.size]
        fast_interference.pcb_series(d, self.pair_a, self.pair_b, self.lo, self.span, self.top, self.k_scale,
                                     self.top_intra, series)
        return series

    def of(self, block: Block, d: np.ndarray) -> np.ndarray:
        """beta [K, m] of the block (once the factors are known)."""
        scores = self.scores[:, : block.size]
        fast_interference.pcb_scores(self.exponentials(block, d), self.pair_of, self.factors, self.intra_factors,
                                     scores)
        return scores


def pcb(x: StreamInput) -> bool:
    s = _PcbScores(x)
    if not s.prepare(x):
        return False
    merge_by_scores(x, s)
    return True


def merge_by_scores(x: StreamInput, s: _PcbScores) -> np.ndarray:
    """Passes 3-5: each task's score threshold, then the merge. Returns the thresholds' bits."""
    thresholds = _thresholds(x, s)
    num = np.empty(x.block_size, dtype=np.float32)
    den = np.empty(x.block_size, dtype=np.float32)
    lam = np.float32(x.params.lambda_)
    for block in x.blocks():
        d = block.deltas()
        out = x.result_buffer(block)
        m = block.size
        fast_interference.pcb_merge(d, s.of(block, d), thresholds, block.base, lam, out, num[:m], den[:m])
        x.write(block, out)
    return thresholds


def _thresholds(x: StreamInput, s: _PcbScores) -> np.ndarray:
    """Each task's score at ascending rank floor((1 - density) * d) (at most d - 1), as the
    reference's ``top_fraction_threshold``: its float32 bits, by radix select (two passes)."""
    k, n = x.k, x.numel
    rank = min(n - 1, int((1 - x.params.density) * n))
    edges = [fast_select.Edge(rank) for _ in range(k)]
    counts = np.zeros((k, fast_select.HIGH_BUCKETS), dtype=np.int64)
    unused = np.zeros((k, 1), dtype=np.float64)
    for block in x.blocks():
        scores = s.of(block, block.deltas())
        fast_select.count_high(scores.view(np.int32), scores, counts, unused, False)
    buckets = np.empty((k, 1), dtype=np.int64)  # one edge per task
    for a, edge in enumerate(edges):
        edge.locate_bucket(counts[a])
        buckets[a, 0] = edge.bucket
    low = np.zeros((k, 1, fast_select.LOW_BINS), dtype=np.int64)
    unused = np.zeros((k, 1, 1), dtype=np.float64)
    for block in x.blocks():
        scores = s.of(block, block.deltas())
        fast_select.count_low(scores.view(np.int32), scores, buckets, low, unused, False)
    for a, edge in enumerate(edges):
        edge.locate_key(low[a, 0])
    return np.array([e.key for e in edges], dtype=np.int32)


def score_bytes(numel: int, k: int, dtype: torch.dtype | None) -> int:
    """PCB's scratch beside the executor's blocks: per block, the K(K+1)/2 + K exponentials and
    the K scores of every entry (float32); per tensor, the radix select's two histograms
    (int64). Nothing per entry of the tensor."""
    series = 4 * (k * (k + 1) // 2 + 2 * k) * min(numel, BLOCK_ENTRIES)
    return series + 8 * k * (fast_select.HIGH_BUCKETS + fast_select.LOW_BINS)
