"""Selective merges: each entry of the task vectors is kept, averaged or dropped by a rule.

- ``arcee_fusion`` keeps one fine-tune's changes only where they matter most (an
  importance score above an outlier threshold), and leaves the base elsewhere.
- ``ram`` and ``ramplus_tl`` (Reinforced Agent Merging) split the entries of the task
  vectors into the ones a single model changed (kept whole) and the ones several models
  changed (averaged over those models), instead of averaging every entry over all models.

Each reproduces mergekit 0.1.5's method of the same name in float32, bit for bit on
the same inputs (tests/test_methods_selective.py), with one deliberate difference noted
on ``arcee_fusion``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alloykit.methods.registry import MergeInput, Params, register

_RAM_PAPER = "Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM, arXiv:2601.13572)"

# --------------------------------------------------------------------------------------
# Arcee Fusion
# --------------------------------------------------------------------------------------

# added to both softmax distributions before the log, as mergekit does (no log(0))
_FUSION_EPS = 1e-8


def fusion_importance(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|theta_1 - theta_0| times the KL divergence of their softmaxes along the last axis (per row)."""
    p = torch.softmax(tuned, dim=-1) + _FUSION_EPS
    q = torch.softmax(base, dim=-1) + _FUSION_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (tuned - base).abs() * kl


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """Q2 + 1.5 (Q3 - Q1): Tukey's fence for outliers, quantiles taken as the sorted values at
    floor(q (n - 1)) (no interpolation), computed exactly with kthvalue."""
    flat = importance.reshape(-1)
    last = flat.numel() - 1
    q1, q2, q3 = (flat.kthvalue(idx + 1).values for idx in (last // 4, last // 2, 3 * last // 4))
    return q2 + 1.5 * (q3 - q1)


@register(
    "arcee_fusion",
    base="required",
    min_models=1,
    max_models=1,
    reproduces="mergekit arcee_fusion (exact quantiles; mergekit samples 1M entries of larger tensors)",
    paper="Arcee AI 2025, Arcee Fusion (mergekit's arcee_fusion; https://arcee.ai)",
)
def arcee_fusion(x: MergeInput) -> torch.Tensor:
    """Keep the fine-tune's most important changes (importance above Tukey's outlier fence).

    importance = |theta_1 - theta_0| * KL(softmax(theta_1) || softmax(theta_0)), the KL taken
    along the last axis (one value per row) with 1e-8 added to both distributions;
    threshold = Q2 + 1.5 (Q3 - Q1) of the tensor's importances, Q at floor(q (n - 1)) of the sorted values;
    merged = theta_0 + (theta_1 - theta_0) * [importance >= threshold].
    Exactly one model besides the base. mergekit estimates the quantiles of a tensor with more
    than 1M entries from 1M entries drawn at random (a different threshold on every run);
    alloykit computes them exactly, so on such tensors the two keep slightly different entries.
    """
    base, tuned = x.base, x.tensors[0]
    importance = fusion_importance(tuned, base)
    return base + (tuned - base) * (importance >= fusion_threshold(importance))


# --------------------------------------------------------------------------------------
# Reinforced Agent Merging
# --------------------------------------------------------------------------------------


class RamParams(Params):
    epsilon: float = Field(
        1e-5, ge=0, allow_inf_nan=False,
        description="an entry counts as changed by a model when |tau_i| > epsilon",
    )


class RamPlusParams(RamParams):
    r: float = Field(0.1, allow_inf_nan=False, description="strength of the rescaling of each model's unique entries")
    alpha: float = Field(
        0.2, ge=0, allow_inf_nan=False,
        description="cap of the overlap ratio rho in the rescaling: lambda_i = 1 + r * clamp(rho_i, 0, alpha)",
    )


def _ram_parts(x: MergeInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened task vectors with unchanged entries zeroed, and the masks RAM merges by.

    Returns (tau [K, n] zeroed where |tau| <= epsilon, changed [K, n], counts [1, n] = how many
    models changed each entry, shared [1, n] = counts > 1, unique [1, n] = counts == 1).
    """
    tau = x.deltas().reshape(x.k, -1)
    changed = tau.abs() > x.params.epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return tau * changed, changed, counts, counts > 1, counts == 1


@register(
    "ram",
    params=RamParams,
    base="required",
    reproduces="mergekit ram",
    elementwise=True,
    paper=_RAM_PAPER,
)
def ram(x: MergeInput) -> torch.Tensor:
    """Reinforced Agent Merging: keep entries one model changed, average those several changed.

    c = #{i : |tau_i| > epsilon} per entry;
    merged = theta_0 + sum_i tau_i [|tau_i| > eps] ([c == 1] + [c > 1] / c).
    An entry changed by one model takes that model's change whole (plain averaging would
    divide it by K); an entry changed by several takes their mean; one no model changed
    stays at the base. Model weights are not used.
    """
    tau, _, counts, shared, unique = _ram_parts(x)
    # the same operations in the same order as mergekit, so the sums round alike
    merged = (tau * unique + tau * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return x.base + merged.reshape_as(x.base)


@register(
    "ramplus_tl",
    params=RamPlusParams,
    base="required",
    reproduces="mergekit ramplus_tl",
    paper=_RAM_PAPER + "; RAM+, with the overlap ratio computed per tensor",
)
def ramplus_tl(x: MergeInput) -> torch.Tensor:
    """RAM+ (tensor-local): RAM, with each model's unique entries scaled up by its overlap ratio.

    Per tensor and model: rho_i = #(entries i changed that others changed too) /
    #(entries only i changed) (denominator at least epsilon); lambda_i = 1 + r * clamp(rho_i, 0, alpha);
    merged = theta_0 + sum_i tau_i [|tau_i| > eps] (lambda_i [c == 1] + [c > 1] / c).
    A model whose changes mostly overlap the others' has its few unique changes amplified, up
    to 1 + r * alpha (1.02 by default), to offset their dilution.
    """
    tau, changed, counts, shared, unique = _ram_parts(x)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=x.params.epsilon)
    lam = 1 + x.params.r * rho.clamp(min=0, max=x.params.alpha)
    merged = (tau * unique * lam.unsqueeze(-1) + tau * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return x.base + merged.reshape_as(x.base)
