"""Fused kernels of the interference methods' fast paths (``alloykit.methods.interference_fast``).

The references (the specification) are ``subspace.magmax``, ``subspace.consensus_ta`` and
``interference.pcb``; each kernel here works on one block of task vectors ``deltas`` [K, m]
(float32, models in the outer loop, entries in the inner one, so LLVM vectorizes it):

* ``magmax_merge``: per entry the task vector of largest magnitude (ties: the lowest model
  index; a NaN counts as the largest, as torch's argmax), then ``_scaled``:
  ``base + tau * lambda``. The reference's float32 operations: bit for bit.
* ``consensus_merge``: tau_MTL = ((0 + tau_1) + tau_2) + ... (torch's order for K <= 4; from
  K = 5 torch's strided sum adds some entries in another order, see the fast path),
  TALL masks ``|tau_i| >= |tau_MTL - tau_i| * lambda_t``, their count, ``base + (tau_MTL *
  [count >= k]) * alpha``.
* PCB (``pcb_series``, ``pcb_scores``, ``pcb_merge``): every softmax of PCB's balance
  scores is ``exp(Norm(tau_a * tau_b) - max) / sum``; per entry the kernels compute the
  K(K+1)/2 pair exponentials (tau_a tau_b = tau_b tau_a: the inter-balancing softmax of
  pair (a, b) is the same vector for task a and task b) and the K intra ones, then the
  scores beta_a = (c_a^intra e_a^intra) * sum_b c_ab e_ab with the reference's per-tensor
  factors c = d / sum (found by the fast path in an earlier pass), then the kept scores'
  weighted mean. ``exp32`` is a float32 exponential that vectorizes (Cephes' expf: 1-2
  ulp, torch's Sleef expf is 1 ulp), so the scores differ from torch's in the last bits.
"""

from __future__ import annotations

import numpy as np

from alloykit.ops.jit import jit

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.0)  # below: 2^n would be a subnormal (the result ~1e-38 instead of a smaller one)
_EXP_HI = np.float32(88.0)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_HALF, _ONE, _ZERO = np.float32(0.5), np.float32(1.0), np.float32(0.0)


@jit(inline=True)
def exp32(x):  # noqa: ANN001, ANN201
    """exp(x) in float32, branch-free (Cephes' expf): x = n ln2 + r, |r| <= ln2 / 2,
    exp(r) by a degree-6 polynomial, 2^n put into the exponent bits."""
    x = x if x > _EXP_LO else _EXP_LO  # selects, not min/max (whose NaN handling stops vectorization)
    x = x if x < _EXP_HI else _EXP_HI
    n = np.floor(x * _LOG2E + _HALF)  # float32 (math.floor would give an int64, and float64 arithmetic)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    p = p * r * r + r + _ONE
    return p * np.int32((np.int32(n) + 127) << 23).view(np.float32)


@jit
def magmax_merge(deltas, base, lam, scaled, out):  # noqa: ANN001, ANN201
    """out = base + tau_{i*} [* lam], i* = argmax_i |tau_i| (the first of equal ones; a NaN wins)."""
    k, m = deltas.shape
    for j in range(m):
        out[j] = deltas[0, j]
    for i in range(1, k):
        for j in range(m):
            t = deltas[i, j]
            a, best = abs(t), abs(out[j])
            # torch's argmax: strictly greater replaces; the first NaN wins and stays
            take = (a > best) | ((a != a) & (best == best))
            out[j] = t if take else out[j]
    for j in range(m):
        v = out[j]
        if scaled:
            v = v * lam
        out[j] = base[j] + v


@jit
def consensus_merge(deltas, base, lambda_t, k_min, alpha, scaled, out, count):  # noqa: ANN001, ANN201
    """out = base + (tau_MTL * [#{i: |tau_i| >= |tau_MTL - tau_i| * lambda_t} >= k_min]) [* alpha].
    ``count``: float32 scratch of m entries."""
    k, m = deltas.shape
    for j in range(m):
        out[j] = _ZERO
        count[j] = _ZERO
    for i in range(k):  # tau_MTL, summed from +0 in model order as torch.sum(0) for K <= 4
        for j in range(m):
            out[j] = out[j] + deltas[i, j]
    for i in range(k):
        for j in range(m):
            t = deltas[i, j]
            count[j] = count[j] + (_ONE if abs(t) >= abs(out[j] - t) * lambda_t else _ZERO)
    for j in range(m):
        v = out[j] * (_ONE if count[j] >= k_min else _ZERO)
        if scaled:
            v = v * alpha
        out[j] = base[j] + v


@jit
def pcb_series(deltas, pair_a, pair_b, lo, span, top, k_scale, top_intra, series):  # noqa: ANN001, ANN201
    """series[p, j] = exp(Norm(tau_a tau_b)[j] - top[p]) for the pairs p, and
    series[P + a, j] = exp(K * Norm(tau_a tau_a)[j] - top_intra[a]) for the tasks a (in the
    loop of pair (a, a): the same normalised product), where Norm(v) = (v - lo) / span
    (0 where span is 0)."""
    m = deltas.shape[1]
    n_pairs = pair_a.shape[0]
    for p in range(n_pairs):
        a, b, l, s, t = pair_a[p], pair_b[p], lo[p], span[p], top[p]
        flat = s == _ZERO
        if a == b:
            intra, t_intra = n_pairs + a, top_intra[a]
            for j in range(m):
                v = deltas[a, j] * deltas[a, j]
                n = _ZERO if flat else (v - l) / s
                series[p, j] = exp32(n - t)
                series[intra, j] = exp32(n * k_scale - t_intra)
        else:
            for j in range(m):
                v = deltas[a, j] * deltas[b, j]
                n = _ZERO if flat else (v - l) / s
                series[p, j] = exp32(n - t)


@jit
def pcb_scores(series, pair_of, factors, intra_factors, scores):  # noqa: ANN001, ANN201
    """scores[a, j] = (intra_factors[a] * series[P + a, j]) * sum_b factors[ab] series[ab, j]
    (the inter sum from 0 in b's order, as the reference's; ``pair_of[a, b]`` is the pair's row)."""
    k, m = scores.shape
    n_pairs = factors.shape[0]
    for a in range(k):
        for j in range(m):
            scores[a, j] = _ZERO
        for b in range(k):
            p = pair_of[a, b]
            c = factors[p]
            for j in range(m):
                scores[a, j] = scores[a, j] + series[p, j] * c
        c = intra_factors[a]
        for j in range(m):
            scores[a, j] = (series[n_pairs + a, j] * c) * scores[a, j]


@jit
def pcb_merge(deltas, scores, thresholds, base, lam, out, num, den):  # noqa: ANN001, ANN201
    """out = base + (num / den, 0 where den is 0) * lam, with beta_a = scores[a] kept where its
    float32 bits are >= thresholds[a] (scores are >= 0: bits order like values),
    num = sum_a beta_a tau_a and den = sum_a beta_a, from 0 in model order."""
    k, m = deltas.shape
    for j in range(m):
        num[j] = _ZERO
        den[j] = _ZERO
    for a in range(k):
        key = thresholds[a]
        bits = scores[a].view(np.int32)
        for j in range(m):
            beta = scores[a, j] * (_ONE if bits[j] >= key else _ZERO)
            den[j] = den[j] + beta
            num[j] = num[j] + beta * deltas[a, j]
    for j in range(m):
        d = den[j]
        merged = num[j] / (d if d > _ZERO else _ONE) if d > _ZERO else _ZERO
        out[j] = base[j] + merged * lam
