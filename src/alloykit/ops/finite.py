"""Whether a tensor holds only finite numbers, as cheaply as the executor can ask it.

The executor checks every block it reads (and every merged tensor) for NaN and Inf, so
the check runs over all the input bytes of a merge. torch answers it with a reduction and
a temporary (``isfinite(t.sum())``), about 10 ns an entry on a shared 2-core machine with
its thread pool; reading the exponent bits in one numba loop (an entry is NaN or Inf
exactly when its exponent bits are all ones) takes about 0.2 ns an entry.
"""

from __future__ import annotations

import numpy as np
import torch

from alloykit.ops.jit import available, jit

#: the exponent bits of each floating dtype the kernel reads, and the integer view of its bytes
_EXPONENT = {
    torch.float32: (torch.int32, np.int32(0x7F800000)),
    torch.bfloat16: (torch.int16, np.int16(0x7F80)),
    torch.float16: (torch.int16, np.int16(0x7C00)),
}


@jit
def _exponents_not_all_ones(bits, exponent):  # noqa: ANN001, ANN202
    """True when no entry's exponent bits are all ones (no NaN, no Inf); branch-free, so it vectorizes."""
    bad = 0
    for j in range(bits.size):
        bad |= (bits[j] & exponent) == exponent
    return bad == 0


def all_finite(t: torch.Tensor) -> bool:
    """``bool(torch.isfinite(t).all())``, read from the exponent bits where the kernels run."""
    spec = _EXPONENT.get(t.dtype)
    if spec is not None and t.device.type == "cpu" and t.is_contiguous() and available():
        int_dtype, exponent = spec
        return bool(_exponents_not_all_ones(t.view(int_dtype).reshape(-1).numpy(), exponent))
    if bool(torch.isfinite(t.sum())):  # one reduction, no temporary: a finite sum means finite entries
        return True
    return bool(torch.isfinite(t).all())  # an overflowing sum of finite entries is confirmed element-wise
