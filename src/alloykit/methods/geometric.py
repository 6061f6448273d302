"""Geometric merges: interpolation on the sphere, Karcher means, Model Stock.

These treat weights as points (or directions) and interpolate along great circles
rather than straight lines, which keeps the norm of the weights from shrinking
when the inputs point in different directions.

Every method here reproduces mergekit 0.1.5's method of the same name in float32 (same
parameters, defaults, scopes and edge cases; bit for bit on the tests' tensors, within
float rounding in general). Each also has a fast path (``geometric_fast.py``: two passes
over blocks of rows, the per-tensor inner products computed once), which these functions
specify. None of them treats a tensor differently by its name or its
number of dimensions, except where noted (model_stock's ``filter_wise`` on 1-D tensors).
"""

from __future__ import annotations

import torch
from pydantic import Field

from alloykit.errors import PlanError
from alloykit.methods import geometric_fast
from alloykit.methods.registry import MergeInput, Params, register
from alloykit.methods.stream import Streamed
from alloykit.ops.interpolate import karcher_mean, slerp_flat, slerp_rows, stock_combine, stock_ratio

# --------------------------------------------------------------------------------------
# slerp
# --------------------------------------------------------------------------------------


class SlerpParams(Params):
    t: float = Field(
        ge=0, le=1, allow_inf_nan=False,
        description="interpolation factor in [0, 1]: 0 gives the base model, 1 the other model",
    )


@register(
    "slerp",
    streamed=Streamed(geometric_fast.slerp, jit=False),
    params=SlerpParams,
    base="required",
    min_models=1,
    max_models=1,
    reproduces="mergekit slerp",
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); White 2016, Sampling generative networks (arXiv:1609.04468)",
)
def slerp(x: MergeInput) -> torch.Tensor:
    """Spherical linear interpolation between the base and one other model, each tensor as one vector.

    cos theta = <b/|b|, m/|m|> over the flattened tensors (norms <= 1e-8 count as 1);
    merged = sin((1-t) theta)/sin theta * base + sin(t theta)/sin theta * model.
    Nearly colinear or antipodal tensors (|cos theta| > 0.9995) use linear interpolation,
    (1-t) base + t model. t = 0 gives the base, t = 1 the other model.
    """
    return slerp_flat(x.base, x.tensors[0], x.params.t)


# --------------------------------------------------------------------------------------
# nuslerp
# --------------------------------------------------------------------------------------


class NuSlerpParams(Params):
    nuslerp_flatten: bool = Field(
        True, description="treat each tensor as one flat vector (one angle per tensor); false: one angle per row or column"
    )
    nuslerp_row_wise: bool = Field(
        False,
        description="without flattening: the vectors run along dim 0 (the columns of a matrix) instead of along "
        "the last dimension (its rows); named as in mergekit",
    )


class NonBaseWeight(Params):
    weight: float = Field(allow_inf_nan=False, description="this model's relative weight")


@register(
    "nuslerp",
    streamed=Streamed(geometric_fast.nuslerp, jit=False),
    params=NuSlerpParams,
    model_params=NonBaseWeight,
    base="optional",
    min_models=2,
    max_models=2,
    reproduces="mergekit nuslerp",
    paper="mergekit's NuSLERP (SLERP of two models, or of their task vectors, per tensor or per row)",
)
def nuslerp(x: MergeInput) -> torch.Tensor:
    """SLERP of two models (of their task vectors, given a base) with t set by their weights.

    t = w_2 / (w_1 + w_2), or 0.5 when |w_1 + w_2| < 1e-6 (as mergekit; t may leave
    [0, 1] with negative weights). For each vector pair (the whole tensor when
    flattened, else each row, or each column with nuslerp_row_wise):
    cos theta = <v_1/|v_1|, v_2/|v_2|> (norms floored at 1e-7);
    s = (sin((1-t) theta) v_1 + sin(t theta) v_2) / sin theta, or lerp where
    1 - cos^2 theta <= 1e-16. merged = s, or base + s on the task vectors
    v_i = theta_i - base when a base is given.
    """
    w1, w2 = (m.weight for m in x.model_params)
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    base = x.base
    a, b = (x.deltas() if base is not None else x.tensors).unbind(0)
    if x.params.nuslerp_flatten:
        out = slerp_rows(a.reshape(-1), b.reshape(-1), t).reshape(a.shape)
    elif x.params.nuslerp_row_wise and a.dim() > 1:
        out = slerp_rows(a.transpose(0, -1), b.transpose(0, -1), t).transpose(0, -1)
    else:  # the last dimension (for a 1-D or 0-d tensor: the whole tensor either way)
        out = slerp_rows(a, b, t)
    return base + out if base is not None else out


# --------------------------------------------------------------------------------------
# multislerp
# --------------------------------------------------------------------------------------


class MultiSlerpParams(Params):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False, description="added to norms before dividing by them")


def _multislerp_check(params: MultiSlerpParams, models: list[NonBaseWeight]) -> str | None:
    if params.normalize_weights and len(models) > 1 and sum(m.weight for m in models) == 0:
        weights = [m.weight for m in models]
        return (
            f"the weights {weights} sum to 0 and normalize_weights divides by their sum: "
            "give weights with a nonzero sum, or set normalize_weights: false"
        )
    return None


@register(
    "multislerp",
    streamed=Streamed(geometric_fast.multislerp, jit=False),
    params=MultiSlerpParams,
    model_params=NonBaseWeight,
    base="optional",
    min_models=1,
    check=_multislerp_check,
    reproduces="mergekit multislerp (plus a fallback where mergekit raises: see the description)",
    paper="Goddard 2024, Multi-SLERP (barycentric interpolation on a hypersphere, goddard.blog)",
)
def multislerp(x: MergeInput) -> torch.Tensor:
    """Weighted barycentric interpolation of K models (or of their task vectors) on the hypersphere.

    v_i = theta_i (theta_i - base with a base); w_i /= sum w (normalize_weights);
    u_i = v_i / (|v_i| + eps); m = sum w_i u_i / |sum w_i u_i|;
    g = sum w_i (u_i - <u_i, m> m) (the tangent at m); n = |g| + eps;
    merged = (cos(n) m + sin(n) g/n) * sum w_i |v_i|  (+ base).
    (g is 0 up to rounding, m being the normalized weighted mean: in effect
    merged = m * sum w_i |v_i|, the weighted mean direction at the weighted mean norm.)
    One model: returned as is. When |sum w_i u_i| < eps (inputs that cancel out),
    two models fall back to sum w_i v_i (+ base), as in mergekit; so do K > 2 models whose
    v_i all have norm <= eps (e.g. a tensor no fine-tune changed: the base comes back,
    where mergekit raises); other cancelling inputs are an error.
    """
    if x.k == 1:
        return x.tensors[0].clone()
    eps = x.params.eps
    base = x.base
    v = x.deltas() if base is not None else x.tensors
    flat = v.reshape(x.k, -1)
    w = torch.tensor([m.weight for m in x.model_params], dtype=flat.dtype, device=flat.device)
    if x.params.normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if x.k != 2 and bool((norms > eps).any()):
            raise PlanError(
                f"tensor '{x.name}': multislerp inputs cancel out (their weighted unit vectors sum to 0, e.g. "
                "opposite task vectors with equal weights); change the weights"
            )
        out = flat[0] * w[0]
        for i in range(1, x.k):
            out = out + flat[i] * w[i]
        out = out.view(v.shape[1:])
    else:
        mean = mean / mean_norm
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        g = (tangent * w.view(-1, 1)).sum(0)
        gn = torch.linalg.vector_norm(g) + eps
        out = mean * torch.cos(gn) + g * (torch.sin(gn) / gn)
        out = (out * (norms.squeeze(-1) * w).sum()).view(v.shape[1:])
    return out + base if base is not None else out


# --------------------------------------------------------------------------------------
# karcher
# --------------------------------------------------------------------------------------


class KarcherParams(Params):
    max_iter: int = Field(10, ge=0, description="Riemannian gradient steps at most (0: the normalized Euclidean mean direction)")
    tol: float = Field(
        1e-5, ge=0, allow_inf_nan=False,
        description="stop when the step is shorter than this; inputs with a norm at or below it give no direction",
    )


@register(
    "karcher",
    streamed=Streamed(geometric_fast.karcher, jit=False),
    params=KarcherParams,
    base="ignored",
    min_models=1,
    reproduces="mergekit karcher (equal weights; per-model weights are not used; in a 'models' recipe an unlisted base_model joins as one more input, as in mergekit)",
    paper="Karcher 1977, Riemannian center of mass and mollifier smoothing (CPAM); mergekit's karcher merge",
)
def karcher(x: MergeInput) -> torch.Tensor:
    """Karcher (Riemannian) mean of the inputs' directions on the unit sphere, rescaled by their mean norm.

    Each tensor is one vector v_i. Directions u_i = v_i/|v_i| of the inputs with
    |v_i| > tol, equal weights a = 1/(their number); start from m = normalize(sum a u_i)
    and repeat up to max_iter times:
      g = sum a theta_i/sin(theta_i) (u_i - cos(theta_i) m)  (theta_i = angle(m, u_i); terms with theta_i < tol dropped),
      stop if |g| < tol, else m <- normalize(cos|g| m + sin|g| g/|g|).
    merged = m * (1/K) sum_i |v_i| over all K inputs; all-zero inputs give zero; one input
    is returned as is.
    """
    k = x.k
    return karcher_mean(list(x.tensors.unbind(0)), [1.0 / k] * k, x.params.max_iter, x.params.tol)


# --------------------------------------------------------------------------------------
# model_stock
# --------------------------------------------------------------------------------------


class ModelStockParams(Params):
    filter_wise: bool = Field(
        False,
        description="one ratio per row (filter, along the last dimension) instead of one per tensor; "
        "a 1-D tensor is one row",
    )


@register(
    "model_stock",
    streamed=Streamed(geometric_fast.model_stock, jit=False),
    params=ModelStockParams,
    base="required",
    min_models=2,
    reproduces="mergekit model_stock",
    paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models (arXiv:2403.19522)",
)
def model_stock(x: MergeInput) -> torch.Tensor:
    """Model Stock: move from the base toward the fine-tunes' average by a ratio set by their angle.

    Task vectors tau_i = theta_i - base, each tensor one vector (one per row with filter_wise);
    cos theta = mean over pairs i < j of <tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), clamped to [-1, 1];
    t = K cos theta / (1 + (K-1) cos theta)  (Jang et al. 2024, eq. 5, for K models);
    merged = t * (1/K) sum_i theta_i + (1 - t) * base.
    Where |1 + (K-1) cos theta| < 1e-6 there is no finite ratio and the base is kept (t = 0).
    """
    base, ws = x.base, x.tensors
    shape = base.shape
    if x.params.filter_wise:
        if base.dim() == 1:
            base, ws = base.unsqueeze(0), ws.unsqueeze(1)
    else:
        base, ws = base.reshape(-1), ws.reshape(x.k, -1)
    offsets = ws - base.unsqueeze(0)
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    t = stock_ratio(norms, lambda i, j: (offsets[i] * offsets[j]).sum(dim=-1), x.k)
    return stock_combine(ws, base, t, x.k).reshape(shape)
