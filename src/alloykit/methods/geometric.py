"""Geometric merges: interpolation on the sphere, Karcher means, Model Stock.

These treat weights as points (or directions) and interpolate along great circles
rather than straight lines, which keeps the norm of the weights from shrinking
when the inputs point in different directions.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alloykit.methods.registry import MergeInput, Params, register
from alloykit.ops.interpolate import lerp, slerp_flat, slerp_rows


class SlerpParams(Params):
    t: float = Field(description="interpolation factor: 0 gives the base model, 1 the other model")


@register(
    "slerp",
    params=SlerpParams,
    base="required",
    min_models=1,
    max_models=1,
    reproduces="mergekit slerp",
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
)
def slerp(x: MergeInput) -> torch.Tensor:
    """Spherical linear interpolation between the base and one other model, per tensor.

    Each tensor is one flat vector: theta = arccos(<b/|b|, m/|m|>) and
    merged = sin((1-t) theta)/sin theta * base + sin(t theta)/sin theta * model;
    nearly colinear pairs (|cos theta| > 0.9995) use linear interpolation.
    """
    return slerp_flat(x.base, x.tensors[0], x.params.t)


class NuSlerpParams(Params):
    nuslerp_row_wise: bool = Field(False, description="interpolate columns (vectors along dim 0) instead of rows")
    nuslerp_flatten: bool = Field(True, description="treat the whole tensor as one vector")


class NonBaseWeight(Params):
    weight: float = Field(description="this model's relative weight")


def _nonzero_total(_, models) -> str | None:
    if sum(m.weight for m in models) == 0:
        return "the models' weights sum to 0; this method divides by their sum: give weights with a nonzero sum"
    return None


@register(
    "nuslerp",
    params=NuSlerpParams,
    model_params=NonBaseWeight,
    base="optional",
    min_models=2,
    max_models=2,
    reproduces="mergekit nuslerp",
    paper="mergekit's NuSLERP (row-wise SLERP of models or of task vectors)",
)
def nuslerp(x: MergeInput) -> torch.Tensor:
    """SLERP of two models (or of their task vectors, given a base) with t from their weights.

    t = w_2 / (w_1 + w_2) (0.5 when the weights sum to 0). Without flattening, each row
    (or, row-wise off, each column) is interpolated on its own sphere; with a base,
    merged = base + slerp(tau_1, tau_2, t).
    """
    w = [m.weight for m in x.model_params]
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    a, b = (x.deltas() if x.base is not None else x.tensors).unbind(0)
    shape = a.shape
    if x.params.nuslerp_flatten:
        out = slerp_rows(a.reshape(-1), b.reshape(-1), t)
    elif x.params.nuslerp_row_wise:
        out = slerp_rows(a.transpose(0, -1), b.transpose(0, -1), t).transpose(0, -1)
    else:
        out = slerp_rows(a, b, t)
    out = out.reshape(shape)
    return out + x.base if x.base is not None else out


class MultiSlerpParams(Params):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, description="numerical floor for norms")


@register(
    "multislerp",
    params=MultiSlerpParams,
    model_params=NonBaseWeight,
    base="optional",
    min_models=1,
    reproduces="mergekit multislerp",
    paper="Goddard 2024, Multi-SLERP (barycentric interpolation on a hypersphere)",
)
def multislerp(x: MergeInput) -> torch.Tensor:
    """Weighted barycentric interpolation of K models (or task vectors) on the hypersphere.

    Unit vectors u_i = v_i/|v_i|; m = normalize(sum w_i u_i); tangent vectors
    g = sum w_i (u_i - <u_i, m> m); result = (cos|g| m + sin|g| g/|g|) * sum w_i |v_i|,
    plus the base when one is given. Two exactly opposed inputs fall back to lerp.
    """
    if x.k == 1:
        return x.tensors[0].clone()
    eps = x.params.eps
    v = x.deltas() if x.base is not None else x.tensors
    flat = v.reshape(x.k, -1)
    w = torch.tensor([m.weight for m in x.model_params], dtype=flat.dtype, device=flat.device)
    if x.params.normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if x.k != 2:
            from alloykit.errors import PlanError

            raise PlanError(f"tensor '{x.name}': multislerp inputs cancel out (weighted unit vectors sum to 0); change the weights")
        out = (flat[0] * w[0] + flat[1] * w[1]).reshape(v.shape[1:])
    else:
        mean = mean / mean_norm
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        g = (tangent * w[:, None]).sum(0)
        gn = torch.linalg.vector_norm(g) + eps
        out = (mean * torch.cos(gn) + g * (torch.sin(gn) / gn)) * (norms.squeeze(-1) * w).sum()
        out = out.reshape(v.shape[1:])
    return out + x.base if x.base is not None else out


class KarcherParams(Params):
    max_iter: int = Field(10, ge=1, description="Riemannian gradient steps at most")
    tol: float = Field(1e-5, gt=0, description="stop when the tangent step is below this; norms below it are ignored")


@register(
    "karcher",
    params=KarcherParams,
    base="ignored",
    min_models=1,
    reproduces="mergekit karcher (equal weights; per-model weights are not used; in a 'models' recipe an unlisted base_model joins as one more input, as in mergekit)",
    paper="Karcher 1977, Riemannian center of mass; mergekit's karcher merge",
)
def karcher(x: MergeInput) -> torch.Tensor:
    """Karcher (Riemannian) mean of the inputs' directions, rescaled by their mean norm.

    Directions u_i = v_i/|v_i| (inputs with |v_i| <= tol skipped); iterate
    m <- exp_m(sum a_i theta_i/sin theta_i (u_i - cos theta_i m)) from the normalized
    mean; result = m * (1/K) sum |v_i|. Equal weights a_i, as in mergekit.
    """
    vs = x.tensors
    k = vs.shape[0]
    if k == 1:
        return vs[0].clone()
    tol = x.params.tol
    flat = vs.reshape(k, -1)
    norms = torch.linalg.vector_norm(flat, dim=-1)
    valid = [i for i in range(k) if norms[i].item() > tol]
    if not valid:
        return torch.zeros_like(vs[0])
    units = flat[valid] / norms[valid, None]
    alphas = torch.full((len(valid),), 1.0 / len(valid), dtype=flat.dtype, device=flat.device)
    mean = (alphas[:, None] * units).sum(0)
    mn = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mn.item() < tol else mean / mn
    for _ in range(x.params.max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        use = theta >= tol
        coef = torch.where(use, alphas * theta / torch.sin(torch.where(use, theta, torch.ones_like(theta))), torch.zeros_like(theta))
        tangent = (coef[:, None] * (units - dots[:, None] * mean)).sum(0)
        tn = torch.linalg.vector_norm(tangent)
        if tn.item() < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if un.item() > tol:
            mean = mean / un
    scale = norms.sum() / k
    return (scale * mean).reshape(vs.shape[1:])


class ModelStockParams(Params):
    filter_wise: bool = Field(False, description="one interpolation ratio per row (filter) instead of per tensor")


@register(
    "model_stock",
    params=ModelStockParams,
    base="required",
    min_models=2,
    reproduces="mergekit model_stock",
    paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models (arXiv:2403.19522)",
)
def model_stock(x: MergeInput) -> torch.Tensor:
    """Model Stock: move from the base toward the fine-tunes' average by a ratio set by their angle.

    cos theta = mean pairwise cosine of the task vectors; t = K cos theta / (1 + (K-1) cos theta);
    merged = t * mean(theta_i) + (1 - t) * base (t = 0 where the denominator vanishes).
    """
    shape = x.base.shape
    base, ws = x.base, x.tensors
    if x.params.filter_wise:
        if base.dim() == 1:
            base, ws = base.unsqueeze(0), ws.unsqueeze(1)
    else:
        base, ws = base.reshape(-1), ws.reshape(x.k, -1)
    off = ws - base.unsqueeze(0)
    norms = torch.linalg.vector_norm(off, dim=-1)
    cos = []
    for i in range(x.k):
        for j in range(i + 1, x.k):
            cos.append(((off[i] * off[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    den = 1 + (x.k - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), x.k * c / torch.where(singular, torch.ones_like(den), den))
    return lerp(base, ws.mean(0), t).reshape(shape)
