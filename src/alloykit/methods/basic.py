"""Basic merges: weighted averaging (model soups), passthrough, NearSwap.

Task arithmetic lives with its sparsified relatives in ``sparse.py``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alloykit.methods.registry import MergeInput, Params, register
from alloykit.ops.interpolate import lerp


class LinearParams(Params):
    normalize: bool = Field(True, description="divide by the sum of the weights")


class WeightParams(Params):
    weight: float = Field(description="this model's weight")


def _linear_check(params: LinearParams, models: list[WeightParams]) -> str | None:
    if params.normalize and sum(m.weight for m in models) == 0:
        weights = [m.weight for m in models]
        return f"the weights {weights} sum to 0 and normalize divides by their sum: give weights with a nonzero sum, or set normalize: false"
    return None


@register(
    "linear",
    params=LinearParams,
    model_params=WeightParams,
    base="ignored",
    check=_linear_check,
    reproduces="mergekit linear",
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
)
def linear(x: MergeInput) -> torch.Tensor:
    """Weighted average of the inputs (a model soup).

    merged = sum_i w_i theta_i / sum_i w_i   (without the division if normalize is false)
    """
    weights = [m.weight for m in x.model_params]
    out = torch.zeros_like(x.tensors[0])
    for t, w in zip(x.tensors, weights):  # accumulate: no [K, ...] temporary
        out.add_(t, alpha=w)
    if x.params.normalize:
        out /= sum(weights)
    return out


class PassthroughModelParams(Params):
    scale: float | None = Field(None, description="multiply the tensor by this factor (e.g. 0 to zero a layer)")


@register(
    "passthrough",
    model_params=PassthroughModelParams,
    base="ignored",
    min_models=1,
    max_models=1,
    reproduces="mergekit passthrough",
    paper="mergekit's passthrough (layer stacking with slices, e.g. frankenmerges)",
)
def passthrough(x: MergeInput) -> torch.Tensor:
    """Copy the single input unchanged (optionally scaled); with slices it stacks layers.

    merged = scale * theta_1 (scale 1 when unset)
    """
    scale = x.model_params[0].scale
    return x.tensors[0].clone() if scale is None else x.tensors[0] * scale


class NearSwapParams(Params):
    t: float = Field(ge=0, description="similarity threshold: entries closer than t take the other model's value")


@register(
    "nearswap",
    params=NearSwapParams,
    base="required",
    min_models=1,
    max_models=1,
    fixed_point=True,
    reproduces="mergekit nearswap",
    paper="alchemonaut 2024, NearSwap (QuartetAnemoi-70B)",
)
def nearswap(x: MergeInput) -> torch.Tensor:
    """Take the other model's value where it is near the base's, keep the base's elsewhere.

    w = clamp(t / max(|base - model|, 1e-6), 0, 1);  merged = w * model + (1 - w) * base
    """
    a, b = x.base, x.tensors[0]
    w = (x.params.t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return lerp(a, b, w)
