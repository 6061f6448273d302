"""Fused kernels of SCE's fast path (``alloykit.methods.sparse_fast.sce``), one block at a time.

SCE (``alloykit.methods.sparse.sce``, the specification) selects the entries whose task
vectors vary the most across models, weights each task vector by its energy, and takes
the disjoint mean of the agreeing entries. Its reference computes the variance with
``torch.var(dim=0, unbiased=False)``, a strided reduction that cost more than everything
else of a pass together (a pass of torch.var, masks and temporaries per block: SCE ran
at 24x the read-sum-write baseline). Here each pass is one loop over the block:

* ``variance``: per entry, the population variance across the K task vectors exactly as
  torch computes it on the CPU (Welford's update in float64, rounded once to float32), so
  the selection's threshold and ties are the reference's bit for bit;
* ``row_energies``: per row and model, the sum of the squares of the selected entries
  (float64; the reference's float32 ``mean`` sums in another order: the energies, and so
  the merged tensor, agree to a relative 1e-6, tests/test_fast_paths.py), split in two
  sums: the entries whose variance lies above the bucket of the selection's cut (all
  selected: ``above_bucket``), and the others (selected or not, decided by the cut's
  exact key);
* ``split_energies`` and ``cut_energies``: the same two sums without a pass of their own.
  While the second pass of the radix select looks for the cut's exact key in its bucket,
  ``split_energies`` adds up the first sum and keeps the entries of the cut's bucket (low
  key bits and K task-vector values, in flat order); once the key is known,
  ``cut_energies`` decides them (flat order breaks ties, as in ``keep_flags``) and adds
  up the second sum. Both sums run over the same entries in the same order as in
  ``row_energies``, so the energies are the same bytes either way;
* ``erase_merge``: the elected sign of sum_i tau_i, agreement, energy-weighted disjoint
  mean and the base added: the reference's float32 operations in its order, per entry.
"""

from __future__ import annotations

import numpy as np

from alloykit.ops.fast_select import _key  # the variance's key: its float32 bits (NaN above +inf)
from alloykit.ops.jit import jit


@jit
def variance(deltas, out, mean, m2):  # noqa: ANN001, ANN201
    """out[j] = population variance of deltas[:, j] (torch's CPU kernel: Welford's update in
    float64, rounded to float32). ``mean``, ``m2``: float64 scratch of at least m entries.
    Models in the outer loop, entries in the inner one: LLVM vectorizes it."""
    k, m = deltas.shape
    for j in range(m):  # the first update: mean = x (x / 1), m2 = x * (x - x)
        x = np.float64(deltas[0, j])
        mean[j] = x
        m2[j] = x * (x - x)
    for i in range(1, k):
        n = np.float64(i + 1)
        for j in range(m):
            x = np.float64(deltas[i, j])
            delta = x - mean[j]
            mu = mean[j] + delta / n
            mean[j] = mu
            m2[j] = m2[j] + delta * (x - mu)
    for j in range(m):
        out[j] = np.float32(m2[j] / np.float64(k))


@jit
def above_bucket(var_bits, bucket, above):  # noqa: ANN001, ANN201
    """above[j] = 1.0 where the variance key (``var_bits``) lies in a high bucket above
    ``bucket``, else 0.0: the entries the selection keeps whatever the cut's exact key
    (float32, what multiplies the task vectors)."""
    for j in range(var_bits.shape[0]):
        above[j] = np.float32(1.0) if (_key(var_bits[j]) >> 16) > bucket else np.float32(0.0)


@jit(inline=True)
def _square_sums(deltas, mask, row_len, sums):  # noqa: ANN001, ANN202
    """sums[r, i] = the sum, in float64 and flat order, of (deltas[i, j] * mask[j])^2 over
    the entries j of the block's row r."""
    k, m = deltas.shape
    for r in range(m // row_len):
        for i in range(k):
            total = 0.0
            for j in range(r * row_len, (r + 1) * row_len):
                x = np.float64(deltas[i, j] * mask[j])
                total += x * x
            sums[r, i] = total


@jit
def row_energies(deltas, keep, above, row_len, certain, cut):  # noqa: ANN001, ANN201
    """Per row r of the block and model i, in float64: certain[r, i] the sum of the squares
    of deltas[i] * above (the entries above the cut's bucket, all kept), cut[r, i] that of
    deltas[i] * keep over the others, in flat order (an entry below the cut's bucket is
    not kept and adds 0: its variance is finite, so are its deltas). Without a cut,
    ``above`` is ``keep``."""
    _square_sums(deltas, above, row_len, certain)
    k, m = deltas.shape
    for r in range(m // row_len):
        for i in range(k):
            total = 0.0
            for j in range(r * row_len, (r + 1) * row_len):
                x = np.float64(deltas[i, j] * keep[j])
                total += 0.0 if above[j] != np.float32(0.0) else x * x
            cut[r, i] = total


@jit
def split_energies(deltas, above, var_bits, bucket, row0, row_len, certain, low_counts, cut_rows, cut_low, cut_taus,
                   stored, found):  # noqa: ANN001, ANN201
    """The second pass of SCE's radix select with the first energy sum folded in.

    certain: ``row_energies``' first sum (``above``: ``above_bucket``'s flags). Each entry in
    ``bucket`` is counted in ``low_counts`` by its low 16 key bits and kept, in flat order
    from index ``stored`` on: its low bits in ``cut_low``, its K values in ``cut_taus``;
    cut_rows[row0 + r] = how many of the block's row r. Returns the new ``stored``.
    ``found``: int64 scratch of a row's length."""
    _square_sums(deltas, above, row_len, certain)
    k, m = deltas.shape
    for r in range(m // row_len):
        # the bucket's entries listed first without a branch on the key (a few percent to a
        # fifth of a block on bf16 task vectors: a branch mispredicts; 1.6 against 2.2 ns an
        # entry at 3%, 1.7 against 3.6 at 20%)
        n = 0
        for j in range(r * row_len, (r + 1) * row_len):
            found[n] = j
            n += (_key(var_bits[j]) >> 16) == bucket
        for t in range(n):
            j = found[t]
            low = _key(var_bits[j]) & 0xFFFF
            low_counts[low] += 1
            cut_low[stored + t] = low
            for i in range(k):
                cut_taus[stored + t, i] = deltas[i, j]
        stored += n
        cut_rows[row0 + r] = n
    return stored


@jit
def cut_energies(cut_rows, cut_low, cut_taus, bucket, lower, upper, tie_key, tie_lo, tie_hi,
                 cut):  # noqa: ANN001, ANN201
    """cut[r, i] = ``row_energies``' second sum from the entries ``split_energies`` kept:
    the squares of tau_i * keep over row r's entries of the cut's bucket, in flat order,
    keep as ``fast_select.keep_flags`` decides it (lower < key < upper, or the entry is the
    o-th of the tie group ``tie_key`` in flat order with tie_lo <= o < tie_hi)."""
    k = cut_taus.shape[1]
    s = 0
    o = 0
    for r in range(cut_rows.shape[0]):
        for i in range(k):
            cut[r, i] = 0.0
        for _ in range(cut_rows[r]):
            key = (bucket << 16) | np.int64(cut_low[s])
            kept = (key > lower) & (key < upper)
            if key == tie_key:
                kept = kept or (tie_lo <= o < tie_hi)
                o += 1
            f = np.float32(1.0) if kept else np.float32(0.0)
            for i in range(k):
                x = np.float64(cut_taus[s, i] * f)
                cut[r, i] += x * x
            s += 1


@jit
def erase_merge(deltas, keep, c, base, out, total, weight):  # noqa: ANN001, ANN201
    """out = base + sum_i a_i c_i tau_i / max(or1(sum_i a_i c_i), 1e-6), tau_i = deltas[i] * keep,
    s = +1 where sum_i tau_i >= 0 else -1, a_i = [tau_i != 0 and sign(tau_i) == s] (float32,
    the reference's operations in its order: ``elect_sign``, ``agreement_mask``,
    ``disjoint_sum``'s addcmul and ``agreeing_weight``'s add). ``deltas`` is overwritten with
    tau_i; ``total``, ``weight``: float32 scratch of m entries; ``out`` accumulates the sum.

    A NaN tau_i makes the entry NaN whatever its agreement (x * a, then the sum), so the sign
    of a NaN, which torch's signbit would read, never shows."""
    k, m = deltas.shape
    zero, one = np.float32(0.0), np.float32(1.0)
    floor = np.float32(1e-6)
    for j in range(m):
        total[j] = zero
        out[j] = zero
        weight[j] = zero
    for i in range(k):
        for j in range(m):
            t = deltas[i, j] * keep[j]
            deltas[i, j] = t
            total[j] = total[j] + t
    for i in range(k):
        ci = c[i]
        for j in range(m):
            t = deltas[i, j]
            positive = total[j] >= zero  # a NaN sum elects -1, as (total >= 0) does
            a = one if (t != zero) & ((t < zero) != positive) else zero
            out[j] = out[j] + (t * ci) * a
            weight[j] = weight[j] + ci * a
    for j in range(m):
        w = weight[j]
        w = one if w == zero else w
        w = floor if w < floor else w  # clamp(min=1e-6): a NaN stays NaN
        out[j] = base[j] + out[j] / w
