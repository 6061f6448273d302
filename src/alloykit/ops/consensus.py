"""Sign consensus over a stack of task vectors (TIES' "elect" and "disjoint merge" steps).

All functions take a stack ``deltas`` of shape [K, ...] (one task vector per model,
already trimmed and, where the recipe says so, weighted) and never modify it.

* ``elect_sign``: the per-entry majority sign, +1 or -1 (a tie counts as +1).
* ``fill_zero_signs``: FusionBench's variant of the tie rule.
* ``agreement_mask``: which entries of which model agree with the elected sign.
* ``disjoint_sum`` / ``disjoint_mean`` / ``disjoint_max``: combine the agreeing entries.
* ``elected_disjoint``: elect, agree and combine in one go, the same numbers as the
  three steps above, in float arithmetic only (several times faster: comparisons and
  boolean masks cost many times more than float operations on the CPU).
"""

from __future__ import annotations

from typing import Literal

import torch

ConsensusMethod = Literal["sum", "count"]


def elect_sign(deltas: torch.Tensor, method: ConsensusMethod = "sum") -> torch.Tensor:
    """Elected sign per entry, +1.0 or -1.0, shape ``deltas.shape[1:]``.

    ``sum`` (TIES' rule): the sign of ``sum_i delta_i``; ``count``: the sign of the
    number of positive minus negative entries. A zero total elects +1 (as mergekit and
    PEFT do; PEFT calls these "total" and "frequency").
    """
    if method == "sum":
        total = deltas.sum(0)
    elif method == "count":
        total = torch.zeros(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
        for d in deltas:  # one model at a time: no [K, ...] temporary
            total += torch.sign(d)
    else:
        raise ValueError(f"unknown consensus method {method!r}; use 'sum' or 'count'")
    return (total >= 0).to(deltas.dtype).mul_(2).sub_(1)


def fill_zero_signs(sign: torch.Tensor) -> torch.Tensor:
    """Replace the 0 entries of ``torch.sign(total)`` by the sign of ``sign.sum()``.

    FusionBench's ``resolve_zero_signs(..., "majority")``: an entry with no majority takes
    the majority of the elected signs of the whole tensor (FusionBench: of the whole
    model). When that is a tie too the entry stays 0, which ``agreement_mask`` treats
    as negative, as FusionBench does.
    """
    return torch.where(sign == 0, torch.sign(sign.sum()), sign)


def agreement_mask(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Boolean [K, ...]: delta_i is nonzero and has the elected sign (sign <= 0 means negative).

    Zero entries never agree, so trimmed entries drop out of every count.
    """
    return (deltas != 0) & (torch.signbit(deltas) != (sign > 0))


def disjoint_sum(deltas: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """``sum_i agree_i * delta_i``: the agreeing entries, added."""
    total = torch.zeros(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    for d, a in zip(deltas, agree):  # one model at a time: no [K, ...] temporary
        total.addcmul_(d, a)
    return total


def disjoint_mean(
    deltas: torch.Tensor, agree: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of the agreeing entries.

    Without ``weights`` (PEFT, FusionBench): ``disjoint_sum / max(1, count of agreeing)``.
    With ``weights`` of shape [K, 1, ..., 1] and weighted ``deltas`` (mergekit):
    ``disjoint_sum / sum_i agree_i * w_i``, where a divisor of exactly 0 is replaced by 1.
    """
    total = disjoint_sum(deltas, agree)
    return total / agreeing_weight(agree, weights)


def agreeing_weight(agree: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Divisor of ``disjoint_mean``: the agreeing count (at least 1) or weight (0 -> 1)."""
    if weights is None:
        return agree.sum(0).clamp_(min=1).to(torch.float32)
    divisor = torch.zeros(agree.shape[1:], dtype=weights.dtype, device=weights.device)
    for a, w in zip(agree, weights.reshape(-1).tolist()):  # no [K, ...] float temporary
        divisor.add_(a, alpha=w)
    divisor[divisor == 0] = 1
    return divisor


def disjoint_max(deltas: torch.Tensor, agree: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Largest agreeing magnitude, with the elected sign (FusionBench's ``max``)."""
    return (deltas * agree).abs().amax(0) * sign


def elected_disjoint(
    deltas: torch.Tensor, method: ConsensusMethod = "sum", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``disjoint_sum(deltas, agree)``, or with ``weights`` ``disjoint_mean(deltas, agree, weights)``,
    where ``agree = agreement_mask(deltas, elect_sign(deltas, method))``: the same result bit
    for bit (NaN entries give NaN either way).

    With s = +1/-1 the elected sign, ``a = max(d_i * s, 0)`` is |d_i| where d_i agrees and
    0 elsewhere, so ``a * s`` is d_i or a zero and ``sign(a)`` is the agreement as 1 or 0:
    the sums below add exactly the terms that the masked versions add.
    """
    if method == "sum":
        total = deltas.sum(0)
    elif method == "count":
        total = torch.zeros(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
        for d in deltas:
            total += torch.sign(d)
    else:
        raise ValueError(f"unknown consensus method {method!r}; use 'sum' or 'count'")
    sign = torch.sign(total).add_(0.5).sign_()  # +1 where total >= 0 (a zero elects +), -1 below
    merged = torch.zeros(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    divisor = None if weights is None else torch.zeros_like(merged)
    ws = [] if weights is None else weights.reshape(-1).tolist()
    for i, d in enumerate(deltas):
        agreeing = (d * sign).clamp_(min=0)
        merged.addcmul_(agreeing, sign)
        if divisor is not None:
            divisor.add_(agreeing.sign_(), alpha=ws[i])
    if divisor is None:
        return merged
    divisor += divisor.abs().sign_().neg_().add_(1)  # a divisor of 0 becomes 1
    return merged.div_(divisor)
