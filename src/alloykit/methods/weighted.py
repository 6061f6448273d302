"""Data-dependent merges that read statistics of each model: Fisher merging and RegMean.

Both are pure per-tensor functions like every other method; the statistics arrive as
one more aligned input, ``MergeInput.stats`` (stacked [K, ...] float32), attached by the
planner from each model's ``stats:`` folder (written by ``alloykit stats collect``).
Tensors the statistics do not cover (buffers; for RegMean every tensor that is not a
linear layer's weight: biases, norms, embeddings) are averaged, as in FusionBench and
the papers' reference code.

RegMean++ (Nguyen et al. 2025) is the RegMean formula on Grams collected on inputs from
the *merged* model's earlier layers: ``alloykit stats collect-merged`` merges and collects
block by block (``alloykit.stats.sequential``) and writes those statistics.
"""

from __future__ import annotations

import torch
from pydantic import Field

from alloykit.methods.registry import MergeInput, Params, register


def weighted_mean(x: MergeInput, coeff: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i theta_i / sum_i c_i`` for per-model coefficients ``coeff`` [K]."""
    col = coeff.view(-1, *([1] * (x.tensors.dim() - 1)))
    return (x.tensors * col).sum(0) / coeff.sum()


# --------------------------------------------------------------------------------------
# Fisher merging
# --------------------------------------------------------------------------------------


class FisherParams(Params):
    epsilon: float = Field(1e-6, ge=0, description="added to every Fisher entry (and to the norms): "
                           "parameters no model's data moves are averaged instead of divided by 0")
    # Off by default (the paper's formula; MergeLM's default): with it, a model that fits its data
    # near-perfectly has a tiny Fisher norm, epsilon / norm then outweighs every other model's
    # entries and the merge is that model (measured in docs/data-dependent.md).
    normalize: bool = Field(False, description="multiply each model's coefficient by 1 / (||F_i|| + epsilon), "
                            "renormalised over the models: FusionBench/MergeLM's normalize_fisher_weight, "
                            "exactly (FusionBench's configs turn it on)")


class FisherModelParams(Params):
    weight: float = Field(1.0, gt=0, description="the model's coefficient lambda_i (scales its Fisher)")


@register("fisher", params=FisherParams, model_params=FisherModelParams, base="ignored", needs_stats="fisher",
          paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (NeurIPS)")
def fisher(x: MergeInput) -> torch.Tensor:
    """Fisher-weighted averaging: each entry averaged with its models' diagonal Fisher as weights.

    merged = sum_i c_i F~_i theta_i / sum_i c_i F~_i, with F~_i = F_i + epsilon the
    diagonal Fisher of model i (squared gradients of its log-likelihood, averaged over
    its examples) and c_i = lambda_i (the model's ``weight``). With ``normalize``, c_i
    also carries 1 / (||F_i|| + epsilon), renormalised to sum to 1 over the models,
    where ||F_i|| is model i's Fisher L2 norm over all its tensors (recorded by
    ``alloykit stats collect``), as in MergeLM and FusionBench. Tensors without Fisher
    statistics (buffers) get the weighted average sum_i c_i theta_i / sum_i c_i.
    Equal Fishers give the weighted average; one Fisher much larger than the others
    gives that model's parameters.
    """
    p = x.params
    coeff = torch.tensor([m.weight for m in x.model_params], dtype=torch.float32, device=x.tensors.device)
    if p.normalize and x.stats_norms is not None:
        inv = 1.0 / (x.stats_norms.to(coeff) + p.epsilon)
        coeff = coeff * inv / inv.sum()
    if x.stats is None:
        return weighted_mean(x, coeff)
    col = coeff.view(-1, *([1] * (x.tensors.dim() - 1)))
    w = (x.stats + p.epsilon) * col
    return (w * x.tensors).sum(0) / w.sum(0)


# --------------------------------------------------------------------------------------
# RegMean
# --------------------------------------------------------------------------------------


class RegMeanParams(Params):
    alpha: float = Field(0.9, ge=0, le=1, description="scale of the Grams' off-diagonal entries "
                         "(1: exact RegMean; 0: diagonal Grams; FusionBench's reduce_non_diagonal_ratio)")


def scaled_grams(grams: torch.Tensor, alpha: float) -> torch.Tensor:
    """G~ = alpha G + (1 - alpha) diag(G) for a stack [K, n, n]: off-diagonal entries times alpha."""
    if alpha == 1:
        return grams
    diag = torch.diagonal(grams, dim1=-2, dim2=-1)
    out = grams * alpha
    torch.diagonal(out, dim1=-2, dim2=-1).copy_(diag)
    return out


#: Grams up to this size are solved in float64 (512 MiB at the limit): sums of Grams from
#: little data are ill-conditioned, and float32 then loses the solution's leading digits
FLOAT64_SOLVE_MAX = 8192


#: ridges tried, relative to the summed Gram's mean diagonal, when the sum is singular
RIDGES = (1e-10, 1e-7, 1e-4)


def regmean_solve(grams: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """W with W^T = (sum_i G_i)^-1 sum_i G_i W_i^T, for Grams [K, in, in] and weights [K, out, in].

    Cholesky of the sum; when it is singular (input directions no model's data reached),
    a ridge r I is added to every G_i, r tiny against the diagonal (``RIDGES``): it leaves
    the covered directions as they are and merges the uncovered ones by the plain average
    (a minimum-norm least-squares solution would set them to zero instead).
    """
    lhs = grams.sum(0)
    rhs = torch.einsum("kij,koj->io", grams, weights)  # sum_i G_i W_i^T: [in, out]
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).T
    k, n = grams.shape[0], grams.shape[-1]
    scale = float(torch.diagonal(lhs).mean()) / k or 1.0
    eye = torch.eye(n, dtype=lhs.dtype, device=lhs.device)
    for rel in RIDGES:
        r = rel * scale
        chol, info = torch.linalg.cholesky_ex(lhs + (k * r) * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs + r * weights.sum(0).T, chol).T
    return torch.linalg.lstsq(lhs + (k * RIDGES[-1] * scale) * eye, rhs + RIDGES[-1] * scale * weights.sum(0).T).solution.T


@register("regmean", params=RegMeanParams, base="ignored", needs_stats="gram", stats_inputs="own",
          paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (ICLR)")
def regmean(x: MergeInput) -> torch.Tensor:
    """RegMean: each linear weight solves the merged least-squares problem of its models' inputs.

    For a linear weight W (torch layout [out, in]) whose models saw inputs X_i, RegMean
    minimises sum_i ||X_i W^T - X_i W_i^T||^2, whose solution is
    W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T with G_i = X_i^T X_i / n_i the Gram of model
    i's inputs (averaged over its n_i tokens, as FusionBench does, so models count
    equally whatever their data size) and G~_i = alpha G_i + (1 - alpha) diag(G_i): the
    paper shrinks off-diagonal entries toward the diagonal (alpha < 1 regularises toward
    the plain average and keeps the sum well conditioned). Solved by Cholesky (float64 up to
    8192 inputs); a singular sum (input directions no data reached) gets a tiny ridge on
    every Gram, which merges those directions by the plain average. Every other tensor (biases, norms,
    embeddings: no Gram statistics) is the plain average.
    """
    if x.stats is None or x.tensors.dim() != 3:
        return x.tensors.mean(0)
    dtype = torch.float64 if x.stats.shape[-1] <= FLOAT64_SOLVE_MAX else torch.float32
    grams = scaled_grams(x.stats.to(dtype), x.params.alpha)
    return regmean_solve(grams, x.tensors.to(dtype)).float().contiguous()



@register("regmean_plus_plus", params=RegMeanParams, base="ignored", needs_stats="gram", stats_inputs="merged",
          paper="Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging")
def regmean_plus_plus(x: MergeInput) -> torch.Tensor:
    """RegMean++: RegMean on Grams of inputs that went through the merged earlier layers.

    The per-tensor formula is RegMean's, W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T with
    G~_i = alpha G_i + (1 - alpha) diag(G_i); what differs is G_i = X_i^T X_i / n_i: X_i
    are the inputs of this layer when model i's calibration data runs through the
    *merged* blocks before it (with model i's own block), so the merge accounts for how
    the earlier merged layers shift the features. Those statistics come from
    ``alloykit stats collect-merged``, which merges block by block while collecting;
    merge them with the alpha given there to reproduce its merge. Tensors without
    Grams are averaged.
    """
    return regmean(x)
