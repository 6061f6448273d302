"""Basic merges: weighted averaging (model soups), passthrough, NearSwap.

Each reproduces mergekit 0.1.5's method of the same name in float32 (same parameters,
defaults, scopes and edge cases). Task arithmetic lives with its sparsified relatives
in ``sparse.py``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alloykit.methods.registry import MergeInput, Params, register


class LinearParams(Params):
    normalize: bool = Field(True, description="divide by the sum of the weights (so they need not sum to 1)")


class WeightParams(Params):
    weight: float = Field(allow_inf_nan=False, description="this model's weight")


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
    elementwise=True,
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
)
def linear(x: MergeInput) -> torch.Tensor:
    """Weighted average of the inputs (a model soup).

    merged = sum_i w_i theta_i / sum_i w_i   (without the division if normalize is false).
    Every input takes part, the base model too when the recipe lists it (this method has
    no base of its own). Weights that sum to 0 with normalize are refused at plan time.
    """
    weights = [m.weight for m in x.model_params]
    out = torch.zeros_like(x.tensors[0])
    for t, w in zip(x.tensors, weights):  # accumulate: no [K, ...] temporary
        out.add_(t, alpha=w)
    if x.params.normalize:
        # the sum in the tensors' precision, as mergekit does (not in Python's float64)
        out /= torch.tensor(weights, dtype=out.dtype, device=out.device).sum()
    return out


class PassthroughModelParams(Params):
    scale: float | None = Field(
        None, allow_inf_nan=False, description="multiply the tensor by this factor (e.g. 0 to zero a layer); unset: copy as is"
    )


@register(
    "passthrough",
    model_params=PassthroughModelParams,
    base="ignored",
    min_models=1,
    max_models=1,
    reproduces="mergekit passthrough",
    elementwise=True,
    paper="mergekit's passthrough (layer stacking with slices, e.g. frankenmerges)",
)
def passthrough(x: MergeInput) -> torch.Tensor:
    """Copy the single input unchanged (optionally scaled); with slices it stacks layers.

    merged = theta_1, or scale * theta_1 when scale is set. Exactly one input per output
    tensor: a slice names one source model, which is how layer-stacking
    ("frankenmerge") recipes are written.
    """
    scale = x.model_params[0].scale
    return x.tensors[0].clone() if scale is None else x.tensors[0] * scale


class NearSwapParams(Params):
    t: float = Field(
        ge=0, allow_inf_nan=False,
        description="similarity threshold (>= 0): entries within t of the base take the other model's value; "
        "farther ones move t toward it; 0 keeps the base",
    )


@register(
    "nearswap",
    params=NearSwapParams,
    base="required",
    min_models=1,
    max_models=1,
    fixed_point=True,
    reproduces="mergekit nearswap",
    elementwise=True,
    paper="alchemonaut 2024, NearSwap (QuartetAnemoi-70B)",
)
def nearswap(x: MergeInput) -> torch.Tensor:
    """Take the other model's value where it is near the base's; elsewhere stay near the base.

    Per entry: w = clamp(t / max(|base - model|, 1e-6), 0, 1);
    merged = w * model + (1 - w) * base.
    Entries within t of the base's take the other model's value; farther ones move exactly
    t toward it (w |model - base| = t). The base is one endpoint, the one other model the
    other; a tensor that no fine-tune changed comes back unchanged.
    """
    a, b = x.base, x.tensors[0]
    w = (x.params.t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a
