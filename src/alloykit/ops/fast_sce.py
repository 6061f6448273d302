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
  the merged tensor, agree to a relative 1e-6, tests/test_fast_paths.py);
* ``erase_merge``: the elected sign of sum_i tau_i, agreement, energy-weighted disjoint
  mean and the base added: the reference's float32 operations in its order, per entry.
"""

from __future__ import annotations

import math

import numpy as np

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
def row_energies(deltas, keep, row_len, sums):  # noqa: ANN001, ANN201
    """sums[r, i] = sum over row r of the block of (deltas[i] * keep)^2, in float64."""
    k, m = deltas.shape
    rows = m // row_len
    for r in range(rows):
        for i in range(k):
            total = 0.0
            for j in range(r * row_len, (r + 1) * row_len):
                x = np.float64(deltas[i, j] * keep[j])
                total += x * x
            sums[r, i] = total


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
