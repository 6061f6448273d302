"""Fast paths of the geometric merges (``geometric.py``), streamed over blocks of rows.

Where a merge treats each tensor as one vector (slerp, nuslerp flattened, model_stock,
multislerp, karcher), its per-tensor statistics are inner products of the K inputs (or
task vectors): one pass accumulates their Gram matrix in float64, the scalars of the
method follow from it, and a second pass writes the output, entry by entry with the
reference's own formula where it is one (slerp, nuslerp, model_stock: the same bytes,
given the same scalars), else as the linear combination the method reduces to
(multislerp, karcher: the merged vector lies in the span of the inputs). The scalars
differ from the reference's float32 reductions in their last bits (float64 sums in
another order), so these paths agree with the references to a relative 1e-6 (karcher,
iterated, 1e-5) rather than bit for bit (``tests/test_fast_paths.py``).

Where the merge works row by row (nuslerp unflattened, model_stock filter_wise), rows are
independent: the reference runs on each block of rows (the same bytes). Other layouts
(nuslerp along columns) decline, and the reference runs on the whole tensor.

None of this needs numba: two passes of torch operations on blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from alloykit.errors import PlanError
from alloykit.methods.registry import MergeInput, get_method
from alloykit.methods.stream import Block, RowSums, StreamInput
from alloykit.ops.interpolate import (
    slerp_coefficients,
    slerp_rows_apply,
    slerp_rows_coefficients,
    stock_combine,
    stock_ratio,
)


def _vectors(x: StreamInput, block: Block, deltas: bool, with_base: bool) -> torch.Tensor:
    """The block's vectors as float32 [V, m]: the K inputs (minus the base with ``deltas``),
    and the base as one more row with ``with_base``."""
    stack = torch.from_numpy(block.stack)
    if deltas:
        stack.sub_(torch.from_numpy(block.base))
    if with_base:
        return torch.cat([torch.from_numpy(block.base).unsqueeze(0), stack])
    return stack


def gram(x: StreamInput, deltas: bool, with_base: bool = False) -> np.ndarray:
    """One pass: the Gram matrix of the tensor's vectors (see ``_vectors``), float64, row by
    row and the rows' matrices added exactly (the same at any block size)."""
    n_vectors = x.k + (1 if with_base else 0)
    sums = RowSums(x, (n_vectors, n_vectors))
    for block in x.blocks():
        v = _vectors(x, block, deltas, with_base).double()
        rows = v.view(v.shape[0], block.row1 - block.row0, x.row_len).transpose(0, 1)  # [rows, V, row_len]
        sums.add(block, torch.bmm(rows, rows.transpose(1, 2)).numpy())
    return sums.total()


def _write(x: StreamInput, deltas: bool, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> None:
    """Second pass: ``fn(vectors [K, m], base [m] or None)`` -> merged block."""
    for block in x.blocks():
        base = torch.from_numpy(block.base) if block.base is not None else None
        x.write(block, fn(_vectors(x, block, deltas, False), base))


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def reference_on_row_blocks(x: StreamInput, method: str) -> bool:
    """A method whose output rows depend on the same rows of the inputs only: its reference
    function on each block of rows (rows = the first dimension; a 1-D tensor is one row)."""
    fn = get_method(method).fn
    rest = x.shape[1:] if len(x.shape) >= 2 else ()
    for block in x.blocks():
        rows = (block.row1 - block.row0, *rest) if len(x.shape) >= 2 else x.shape
        stack = torch.from_numpy(block.stack).view(x.k, *rows)
        base = torch.from_numpy(block.base).view(rows) if block.base is not None else None
        x.write(block, fn(MergeInput(x.name, stack, base, x.params, x.model_params, None, owned=True,
                                     role=x.role, compute_dtype=x.compute_dtype)))
    return True


# --------------------------------------------------------------------------------------


def slerp(x: StreamInput) -> bool:
    """slerp_flat from |base|, |model| and their inner product."""
    g = gram(x, deltas=False, with_base=True)  # rows: base, model
    eps = 1e-8
    na, nb = math.sqrt(g[0, 0]), math.sqrt(g[1, 1])
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    t = _f32(x.params.t)
    coef_a, coef_b = slerp_coefficients(_f32(g[0, 1] / (na * nb)), t)
    _write(x, False, lambda v, base: coef_a * base + coef_b * v[0])
    return True


def nuslerp(x: StreamInput) -> bool:
    p = x.params
    if not p.nuslerp_flatten:
        if p.nuslerp_row_wise and len(x.shape) > 1:
            return False  # vectors along dim 0 (columns): not row blocks
        if len(x.shape) <= 2:
            return reference_on_row_blocks(x, "nuslerp")  # one vector per row
        return False
    w1, w2 = (m.weight for m in x.model_params)
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    deltas = x.has_base
    g = gram(x, deltas=deltas)
    floor = 1e-7  # unit_rows' norm floor
    na, nb = max(math.sqrt(g[0, 0]), floor), max(math.sqrt(g[1, 1]), floor)
    coefficients = slerp_rows_coefficients(_f32(g[0, 1] / (na * nb)).view(1), t)

    def merged(v: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        out = slerp_rows_apply(v[0], v[1], t, *coefficients)
        return base + out if base is not None else out

    _write(x, deltas, merged)
    return True


def model_stock(x: StreamInput) -> bool:
    if x.params.filter_wise:
        return len(x.shape) <= 2 and reference_on_row_blocks(x, "model_stock")
    g = gram(x, deltas=True)
    norms = [_f32(math.sqrt(g[i, i])) for i in range(x.k)]
    t = stock_ratio(norms, lambda i, j: _f32(g[i, j]), x.k)
    _write(x, False, lambda v, base: stock_combine(v, base, t, x.k))
    return True


def multislerp(x: StreamInput) -> bool:
    """merged = m * sum_i w_i |v_i| with m the normalized sum_i w_i v_i / (|v_i| + eps): a
    linear combination of the v_i (the tangent step is 0 up to rounding; see the reference)."""
    if x.k == 1:
        return False  # returned as is: nothing to compute
    p = x.params
    deltas = x.has_base
    g = gram(x, deltas=deltas)
    w = np.array([m.weight for m in x.model_params], dtype=np.float64)
    if p.normalize_weights:
        w = w / w.sum()
    norms = np.sqrt(np.diag(g))
    a = w / (norms + p.eps)  # mean = sum_i a_i v_i
    mean_norm = math.sqrt(max(0.0, float(a @ g @ a)))
    if mean_norm < p.eps:
        if x.k != 2 and bool((norms > p.eps).any()):
            raise PlanError(
                f"tensor '{x.name}': multislerp inputs cancel out (their weighted unit vectors sum to 0, e.g. "
                "opposite task vectors with equal weights); change the weights"
            )
        coef = w
    else:
        coef = a / mean_norm * float((norms * w).sum())
    coef32 = torch.tensor(coef, dtype=torch.float32)

    def merged(v: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        out = v[0] * coef32[0]
        for i in range(1, x.k):
            out = out + v[i] * coef32[i]
        return out + base if base is not None else out

    _write(x, deltas, merged)
    return True


def karcher(x: StreamInput) -> bool:
    """The Karcher iteration in the span of the unit inputs: m = sum_i c_i u_i, its inner
    products from the Gram matrix; merged = scale * m = sum_i (scale c_i / |v_i|) v_i."""
    if x.k == 1:
        return False
    tol, max_iter = x.params.tol, x.params.max_iter
    g = gram(x, deltas=False)
    norms = np.sqrt(np.diag(g))
    alphas = np.full(x.k, 1.0 / x.k)
    valid = [i for i in range(x.k) if norms[i] > tol]
    if not valid:
        _write(x, False, lambda v, base: torch.zeros_like(v[0]))
        return True
    weights = alphas[valid] / alphas[valid].sum()
    units = g[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])  # <u_i, u_j>
    c = weights.copy()
    mean_norm = math.sqrt(max(0.0, float(c @ units @ c)))
    if mean_norm < tol:
        c = np.eye(len(valid))[0]
    else:
        c = c / mean_norm
    for _ in range(max_iter):
        cos = np.clip(units @ c, -1.0, 1.0)  # <m, u_i>
        step = np.zeros_like(c)
        for j, w in enumerate(weights):
            theta = math.acos(cos[j])
            if theta < tol:
                continue
            coef = w * theta / math.sin(theta)
            step[j] += coef  # coef * (u_j - cos_j m)
            step -= coef * cos[j] * c
        step_norm = math.sqrt(max(0.0, float(step @ units @ step)))
        if step_norm < tol:
            break
        c = math.cos(step_norm) * c + math.sin(step_norm) * (step / step_norm)
        n = math.sqrt(max(0.0, float(c @ units @ c)))
        if n > tol:
            c = c / n
    scale = float(alphas @ norms)
    coef = np.zeros(x.k)
    coef[valid] = scale * c / norms[valid]
    coef32 = torch.tensor(coef, dtype=torch.float32)

    def merged(v: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        out = v[0] * coef32[0]
        for i in range(1, x.k):
            out = out + v[i] * coef32[i]
        return out

    _write(x, False, merged)
    return True

