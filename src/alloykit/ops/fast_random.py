"""Fast kernels of the DARE/DELLA random stream: the same bits as ``alloykit.ops.philox``.

``keep_draws`` fills a block of keep/drop flags for entries ``start .. start + count - 1``
of one model's stream. Philox4x32-10 runs once per 8 entries (16 bits each, in a loop
without branches that LLVM vectorizes), and the 32 refinement bits are generated only
for the entries whose 16 bits tie with the probability's leading 16 bits (one in 65536).
Only called when ``alloykit.ops.jit.available()``.
"""

from __future__ import annotations

import numpy as np

from alloykit.ops.jit import jit

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_U32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


@jit(inline=True)
def _philox(c0, c1, c2, c3, k0, k1):  # noqa: ANN001, ANN202 (numba helper: uint64 words below 2^32)
    for _ in range(10):
        p0 = c0 * _M0
        p1 = c2 * _M1
        c0, c1, c2, c3 = (p1 >> _S32) ^ c1 ^ k0, p1 & _U32, (p0 >> _S32) ^ c3 ^ k1, p0 & _U32
        k0 = (k0 + _W0) & _U32
        k1 = (k1 + _W1) & _U32
    return c0, c1, c2, c3


@jit
def philox_words(seed, model, domain, first, count, out):  # noqa: ANN001, ANN201
    """out[j, :] = the four words of counter (first + j, model, domain) under key seed."""
    k0 = np.uint64(seed) & _U32
    k1 = (np.uint64(seed) >> _S32) & _U32
    for j in range(count):
        c = np.uint64(first + j)
        w0, w1, w2, w3 = _philox(c & _U32, c >> _S32, np.uint64(model), np.uint64(domain), k0, k1)
        out[j, 0] = w0
        out[j, 1] = w1
        out[j, 2] = w2
        out[j, 3] = w3


@jit
def keep_draws(seed, model, start, thresholds, constant, lanes, keep):  # noqa: ANN001, ANN201
    """keep[j] = 1 if entry start + j of ``model``'s stream is kept, else 0.

    ``thresholds`` holds ceil(p * 2^48) per entry (int64), or one value for all entries
    when ``constant``. ``lanes`` is scratch of at least ``8 * (count // 8 + 2)`` uint32.
    """
    count = keep.shape[0]
    if count == 0:
        return
    k0 = np.uint64(seed) & _U32
    k1 = (np.uint64(seed) >> _S32) & _U32
    m = np.uint64(model)
    g0 = start >> 3
    ng = ((start + count - 1) >> 3) - g0 + 1
    for g in range(ng):  # one Philox call per 8 entries, no branches: vectorized
        c = np.uint64(g0 + g)
        w0, w1, w2, w3 = _philox(c & _U32, c >> _S32, m, np.uint64(0), k0, k1)
        base = 8 * g
        lanes[base] = np.uint32(w0 & np.uint64(0xFFFF))
        lanes[base + 1] = np.uint32(w0 >> np.uint64(16))
        lanes[base + 2] = np.uint32(w1 & np.uint64(0xFFFF))
        lanes[base + 3] = np.uint32(w1 >> np.uint64(16))
        lanes[base + 4] = np.uint32(w2 & np.uint64(0xFFFF))
        lanes[base + 5] = np.uint32(w2 >> np.uint64(16))
        lanes[base + 6] = np.uint32(w3 & np.uint64(0xFFFF))
        lanes[base + 7] = np.uint32(w3 >> np.uint64(16))
    offset = start - 8 * g0
    ties = 0
    for j in range(count):  # compare the leading 16 bits; flag ties for the refinement
        t = thresholds[0] if constant else thresholds[j]
        hi = t >> 32
        u = np.int64(lanes[offset + j])
        keep[j] = np.uint8(1) if u < hi else np.uint8(0)
        ties += 1 if u == hi else 0
    if ties == 0:
        return
    for j in range(count):  # rare: the 16 bits equal p's: compare the next 32
        t = thresholds[0] if constant else thresholds[j]
        if np.int64(lanes[offset + j]) == (t >> 32):
            e = start + j
            q = np.uint64(e >> 2)
            r0, r1, r2, r3 = _philox(q & _U32, q >> _S32, m, np.uint64(1), k0, k1)
            w = e & 3
            word = r0 if w == 0 else (r1 if w == 1 else (r2 if w == 2 else r3))
            keep[j] = np.uint8(1) if np.int64(word) < (t & np.int64(0xFFFFFFFF)) else np.uint8(0)


@jit
def della_thresholds(sorted_keys, col_bits, low, epsilon, thresholds):  # noqa: ANN001, ANN201
    """DELLA's ceil(p * 2^48) per entry of a block of rows, in flat order.

    ``sorted_keys`` [rows, n]: each row's (magnitude key << col_bits | column), sorted, so
    the entry of column c has rank = its position. p = clamp(low + (rank / (n - 1)) * 2 *
    epsilon, 0, 1) in float32, as ``sparsify.della_keep_probability`` computes it
    (rank / (n - 1) is 0.5 for a row of one entry); low = density - epsilon.
    """
    rows, n = sorted_keys.shape
    mask = (np.int64(1) << col_bits) - 1
    denominator = np.float32(n - 1)
    two = np.float32(2.0)
    for r in range(rows):
        for position in range(n):
            col = sorted_keys[r, position] & mask
            norm = np.float32(position) / denominator if n > 1 else np.float32(0.5)
            p = low + (norm * two) * epsilon
            p = min(max(p, np.float32(0.0)), np.float32(1.0))
            thresholds[r * n + col] = np.int64(np.ceil(np.float64(p) * 281474976710656.0))
