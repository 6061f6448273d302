"""Fused kernel of the task-vector merges: mask, rescale, weight, elect, disjoint sum, add.

``combine`` runs steps 2-5 of ``alloykit.methods.sparse``'s pipeline on one block of
task vectors in one go: the same float32 operations, in the same order, per entry as
the reference (``_merge_weighted`` and ``ops.consensus.elected_disjoint``), so the
result is bit for bit the reference's (``tests/test_fast_paths.py``):

    x_i   = ((delta_i * keep_i) * scale_i) * w_i           (keep 1/0; scale where rescaled)
    sum:    merged = x_1 + ... + x_K  [/ divisor]            (task arithmetic, breadcrumbs, DARE linear)
    elect:  s = -1 if (x_1 + ... + x_K) < 0 else +1          (count: the sum of sign(x_i))
            a_i = max(x_i s, 0);  merged = sum_i a_i s  [/ max-or-1(sum_i [a_i > 0] w_i)]
    out   = base + merged * lambda

Every loop runs over the entries of one model (the innermost index), without branches,
so LLVM vectorizes it; a block's temporaries stay in the CPU cache.
"""

from __future__ import annotations

import numpy as np

from alloykit.ops.jit import jit

SUM, ELECT_SUM, ELECT_COUNT = 0, 1, 2


@jit
def combine(deltas, keep, use_keep, scale, rescaled, weights, mode, normalize, divisor, lam, base, out,  # noqa: ANN001, ANN201
            total, merged, agreeing_weight):
    """out = base + lambda * merge(deltas) (see the module docstring). ``deltas`` [K, m]
    float32 is overwritten with x_i; ``total``, ``merged``, ``agreeing_weight``: [m] scratch."""
    k, m = deltas.shape
    zero, one = np.float32(0.0), np.float32(1.0)
    for i in range(k):
        w, c = weights[i], scale[i]
        for j in range(m):
            x = deltas[i, j]
            if use_keep:
                x = x * keep[i, j]
            if rescaled[i]:
                x = x * c
            deltas[i, j] = x * w
    for j in range(m):
        total[j] = zero
        merged[j] = zero
        agreeing_weight[j] = zero
    if mode == SUM:
        for i in range(k):
            for j in range(m):
                total[j] = total[j] + deltas[i, j]
        for j in range(m):
            t = total[j]
            if normalize:
                t = t / divisor
            merged[j] = t
    else:
        for i in range(k):
            for j in range(m):
                x = deltas[i, j]
                if mode == ELECT_SUM:
                    total[j] = total[j] + x
                else:  # torch.sign: NaN counts 0
                    total[j] = total[j] + (one if x > zero else (-one if x < zero else zero))
        for j in range(m):
            total[j] = -one if total[j] < zero else one  # the elected sign (0 and NaN elect +)
        for i in range(k):
            w = weights[i]
            for j in range(m):
                s = total[j]
                a = deltas[i, j] * s
                a = zero if a < zero else a  # clamp(min=0): keeps -0.0 and NaN, as torch does
                merged[j] = merged[j] + a * s
                agreeing_weight[j] = agreeing_weight[j] + (w if a > zero else zero)
        if normalize:
            for j in range(m):
                d = agreeing_weight[j]
                merged[j] = merged[j] / (one if d == zero else d)
    for j in range(m):
        r = merged[j]
        if lam != one:
            r = r * lam
        out[j] = base[j] + r
