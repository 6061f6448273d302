"""The counter-based random stream of DARE and DELLA masks (reference implementation).

A keep/drop draw for entry e (flat index) of model i's task vector in a tensor whose
generator seed is s (``tensor_seed(seed, name)``, 63 bits) is a pure function of
(s, i, e): the same bits whatever the thread count, the block size or the order in
which tensors and blocks are computed, and cheap to recompute, so a second pass over a
tensor regenerates its masks instead of storing them.

The generator is Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random
numbers: as easy as 1, 2, 3", SC'11; the Random123 library; also CUDA's curand and JAX's
default): a 10-round bijection of a 128-bit counter under a 64-bit key, key = s.

The stream ("philox4x32-10/1"):

* lanes: counter (g mod 2^32, g div 2^32, i, 0) with g = e div 8 gives four 32-bit words
  w0..w3; entry e takes the 16 bits ``(w[l div 2] >> 16 (l mod 2)) & 0xFFFF``, l = e mod 8
  (low half first). One Philox call serves 8 entries.
* refinement: counter (q mod 2^32, q div 2^32, i, 1) with q = e div 4; entry e takes the
  32-bit word e mod 4.
* U(e) = (lane16(e) * 2^32 + refine32(e)) / 2^48, a uniform on [0, 1) with 48 bits;
  entry e is kept with probability p when U(e) < p, i.e. ``U48(e) < ceil(p * 2^48)``.

That is an exact Bernoulli(p) for any p with 48 significant bits (float32 probabilities:
all of them; torch's own bernoulli resolves p to 24 bits). The fast kernels
(``alloykit.ops.fast_random``) read the 32 refinement bits only where the 16 lane bits
equal p's leading 16 bits (probability 2^-16), so an entry costs 1/8 of a Philox call:
the same bits as this module, which computes every word to stay readable.

This module is the specification; ``tests/test_fast_paths.py`` checks it against
Random123's published known-answer vectors and the fast kernels against it.
"""

from __future__ import annotations

import math

import torch

#: the stream's name and version, recorded in a merge's fingerprint and card
STREAM = "philox4x32-10/1"

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key schedule increments (golden ratio, sqrt(3) - 1)
_U32 = 0xFFFFFFFF
LANE_DOMAIN, REFINE_DOMAIN = 0, 1
#: 2^48: probabilities are compared as 48-bit fixed-point numbers
SCALE = float(1 << 48)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * m`` (a: int64 holding uint32 values; m: a 32-bit
    constant), without int64 overflow: m is split into 16-bit halves."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & _U32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int], rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32-``rounds`` of counters (four int64 tensors holding uint32 words) under key
    (k0, k1): four int64 tensors of output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return c0, c1, c2, c3


def split_key(seed: int) -> tuple[int, int]:
    """Philox key of a tensor seed (its low and high 32 bits)."""
    return seed & _U32, (seed >> 32) & _U32


def _words(seed: int, model: int, domain: int, first: int, count: int, device: torch.device | None) -> torch.Tensor:
    """Output words of counters (c, model, domain) for c = first .. first + count - 1: [count, 4] int64."""
    c = torch.arange(first, first + count, dtype=torch.int64, device=device)
    fill = torch.full_like(c, 0)
    out = philox4x32((c & _U32, c >> 32, fill + model, fill + domain), split_key(seed))
    return torch.stack(out, dim=1)


def uniform48(seed: int, model: int, start: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """U48 (int64, in [0, 2^48)) of entries ``start .. start + count - 1`` of model ``model``."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    e = torch.arange(start, start + count, dtype=torch.int64, device=device)
    g0 = start >> 3
    words = _words(seed, model, LANE_DOMAIN, g0, ((start + count - 1) >> 3) - g0 + 1, device)
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=2).reshape(-1)  # lane l = half l of the group
    lane = halves[e - 8 * g0]
    q0 = start >> 2
    refine = _words(seed, model, REFINE_DOMAIN, q0, ((start + count - 1) >> 2) - q0 + 1, device).reshape(-1)
    return (lane << 32) | refine[e - 4 * q0]


def threshold48(prob: float | torch.Tensor) -> int | torch.Tensor:
    """``ceil(p * 2^48)``: U < p exactly when U48 < this (p as float64; float32 tensors convert exactly)."""
    if isinstance(prob, torch.Tensor):
        return torch.ceil(prob.to(torch.float64) * SCALE).to(torch.int64)
    return math.ceil(prob * SCALE)


def keep_mask(prob: float | torch.Tensor, seed: int, model: int, start: int, count: int,
              device: torch.device | None = None) -> torch.Tensor:
    """Boolean draws of entries ``start .. start + count - 1`` of model ``model``: entry e is
    kept with probability ``prob`` (a float, or a tensor of ``count`` probabilities)."""
    if isinstance(prob, torch.Tensor):
        prob = prob.reshape(-1)
    return uniform48(seed, model, start, count, device) < threshold48(prob)


def seed_of(generator: torch.Generator | None) -> int:
    """The stream key of a tensor: its generator's seed (``tensor_seed(seed, name)`` in a
    merge); without a generator, a key drawn from torch's global generator."""
    if generator is not None:
        return generator.initial_seed() & 0x7FFF_FFFF_FFFF_FFFF
    return int(torch.randint(0, 2**62, (1,)))
