"""Data-free interference-balancing merges: PCB-merging and WUDI-merging.

Both are pure per-tensor functions on task vectors ``tau_i = theta_i - theta_0``.

* ``pcb`` weighs every entry of every task vector by a competition score (how large it
  is within its task, how much it agrees with the other tasks), drops all but the top
  ``density`` of each task's scores and takes the score-weighted mean.
* ``wudi`` solves, per linear weight matrix, for the task vector that least disturbs each
  task's outputs on inputs in that task's own subspace (the rows of its task matrix).
  Like the matrix methods of ``subspace.py`` it treats 2-D non-embedding weights only;
  every other tensor takes the shared ``average_fallback`` (theta_0 + mean_i tau_i).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from alloykit.methods import interference_fast
from alloykit.methods.registry import MergeInput, NoParams, Params, register
from alloykit.methods.stream import Streamed
from alloykit.methods.subspace import average_fallback, is_matrix_weight

# --------------------------------------------------------------------------------------
# PCB-merging
# --------------------------------------------------------------------------------------


class PcbParams(Params):
    density: float = Field(
        0.2, gt=0, le=1,
        description="fraction r of each task's entries kept: those whose balance score beta_i is in the top r "
        "(beta_i >= the (1 - r) quantile of beta_i); 1 keeps every entry",
    )
    lambda_: float = Field(
        1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged (score-weighted mean) task vector"
    )


def _minmax_(v: torch.Tensor) -> torch.Tensor:
    """In place: min-max normalisation of a 1-D tensor to [0, 1] (a constant tensor maps to 0)."""
    lo, hi = v.aminmax()
    span = float(hi - lo)
    return v.sub_(lo).div_(span) if span > 0 else v.zero_()


def _softmax_d_(v: torch.Tensor) -> torch.Tensor:
    """In place: ``d * softmax(v)`` over the d entries of a 1-D tensor (the paper's softmax rescaled to mean 1).

    The factor d is the same for every task of one tensor, so it cancels in PCB's weighted
    mean; it keeps the scores near 1 instead of near 1/d (float32 on 10^8-entry tensors).
    """
    v.sub_(v.max()).exp_()
    return v.mul_(v.numel() / float(v.sum()))


def pcb_score(tau: torch.Tensor, i: int) -> torch.Tensor:
    """PCB balance score beta_i [d] of task i, from K flattened task vectors tau [K, d].

      beta_intra_i = softmax(K * Norm(tau_i * tau_i))
      beta_inter_i = sum_j softmax(Norm(tau_i * tau_j))
      beta_i = beta_intra_i * beta_inter_i
    Norm = min-max over the d entries, softmax over the d entries (both scaled by d).
    In place on [d] temporaries (no [K, d] ones: embeddings are 10^7-10^8 entries).
    """
    k = tau.shape[0]
    inter = torch.zeros_like(tau[i])
    for j in range(k):
        inter += _softmax_d_(_minmax_(tau[i] * tau[j]))
    return _softmax_d_(_minmax_(tau[i] * tau[i]).mul_(k)).mul_(inter)


def top_fraction_threshold(scores: torch.Tensor, density: float) -> torch.Tensor:
    """``sorted(scores)[floor((1 - density) * d)]`` (ascending) of a 1-D tensor: entries at or
    above it are the top ``density`` of the d entries (ties at the threshold all count)."""
    d = scores.numel()
    return scores.kthvalue(min(d - 1, int((1 - density) * d)) + 1).values


@register(
    "pcb",
    streamed=Streamed(interference_fast.pcb, interference_fast.score_bytes),
    params=PcbParams,
    model_params=NoParams,
    paper="Du et al. 2024, Parameter Competition Balancing for Model Merging (PCB-merging, NeurIPS 2024, "
    "arXiv:2410.02396)",
    base="required",
)
def pcb(x: MergeInput) -> torch.Tensor:
    """PCB-merging: balance scores within and across tasks, drop low scores, score-weighted mean.

    On the d entries of one tensor, with K task vectors tau_i:
      beta_intra_i = softmax(K * Norm(tau_i * tau_i))          (intra-balancing)
      beta_inter_i = sum_j softmax(Norm(tau_i * tau_j))        (inter-balancing, j = 1..K)
      beta_i = beta_intra_i * beta_inter_i
      m_i = beta_i >= sorted(beta_i)[floor((1 - density) * d)] (keep the top ``density`` = r)
      tau_m = sum_i m_i beta_i tau_i / sum_i m_i beta_i        (0 where the denominator is 0)
      merged = theta_0 + lambda * tau_m
    Norm is min-max normalisation over the entries (as the authors' ``normalize``), softmax
    is over the entries; both are rescaled by d, which cancels in tau_m.

    Followed: the paper's equations (softmax intra/inter-balancing, binary drop, rescale by
    the kept scores). The authors' code (and FusionBench) differ: exp(K * Norm(|tau_i|)^2)
    without the softmax denominator, tanh(tau_i * sum_j tau_j) for inter-balancing, a
    0.01% outlier clamp, and kept scores min-max rescaled from the threshold. They also
    flatten the whole model into one vector; here every tensor is balanced on its own
    (the quantile and the normalisations are per tensor), as TIES is in mergekit.

    Du et al. 2024, Parameter Competition Balancing for Model Merging (arXiv:2410.02396).
    """
    tau = x.deltas()
    flat = tau.reshape(x.k, -1)
    if flat.shape[1] == 0:
        return x.base.clone()
    num = torch.zeros_like(flat[0])
    den = torch.zeros_like(flat[0])
    for i in range(x.k):  # one task at a time: [d] temporaries only
        beta = pcb_score(flat, i)
        beta *= beta >= top_fraction_threshold(beta, x.params.density)
        den += beta
        num.addcmul_(beta, flat[i])
    merged = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    return x.base + merged.view(x.base.shape) * x.params.lambda_


# --------------------------------------------------------------------------------------
# WUDI-merging
# --------------------------------------------------------------------------------------


class WudiParams(Params):
    solver: Literal["adam", "closed_form"] = Field(
        "adam",
        description="'adam': the paper's optimiser (Adam from sum_i tau_i, ``steps`` steps of size ``lr``); "
        "'closed_form': the exact minimiser from the normal equations (a ridge-regularised solve)",
    )
    steps: int = Field(300, ge=0, description="Adam steps per matrix (the paper's 300)")
    lr: float = Field(1e-5, gt=0, allow_inf_nan=False, description="Adam learning rate (the paper's 1e-5)")
    ridge: float = Field(
        0.05, ge=0, allow_inf_nan=False,
        description="closed_form only: Tikhonov weight toward the Adam solver's starting point sum_i tau_i, relative "
        "to the Gram matrix's mean eigenvalue (trace / n). Directions the tasks barely use are then left where "
        "Adam leaves them instead of being amplified; 0 gives the exact (possibly near-singular) minimiser",
    )


def wudi_system(tau: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, B) of WUDI's normal equations ``M G = B`` for task matrices tau [K, out, in]:

      w_i = 1 / ||tau_i||_F^2 (0 for a zero task vector, which adds nothing to the loss)
      G = sum_i w_i tau_i^T tau_i            [in, in]
      B = sum_i w_i tau_i tau_i^T tau_i      [out, in]
    The gradient of the WUDI loss is 2 (M G - B).
    """
    _, out_dim, in_dim = tau.shape
    g = torch.zeros(in_dim, in_dim, dtype=dtype, device=tau.device)
    b = torch.zeros(out_dim, in_dim, dtype=dtype, device=tau.device)
    for t in tau:
        t = t.to(dtype)
        sq = float(t.pow(2).sum())
        if sq == 0:
            continue
        gram = t.T @ t
        g.add_(gram, alpha=1 / sq)
        # tau tau^T tau, in the cheaper association for this shape
        b.add_(t @ gram if in_dim <= out_dim else (t @ t.T) @ t, alpha=1 / sq)
    return g, b


def wudi_closed_form(tau: torch.Tensor, ridge: float) -> torch.Tensor:
    """The WUDI minimiser with a Tikhonov term toward M0 = sum_i tau_i (where the paper's Adam starts):

      M = argmin_M  sum_i w_i ||(M - tau_i) tau_i^T||_F^2 + eps ||M - M0||_F^2
        = (B + eps M0) (G + eps I)^-1,   eps = ridge * trace(G) / in   (float64 solve).

    Why toward M0 and scaled to G's spectrum: with few tasks G (in x in) has rank at most
    sum_i rank(tau_i) and, on real fine-tunes, a condition number near 1e12. A ridge toward 0
    that is tiny against G's eigenvalues leaves the near-null directions free, and the
    solve amplifies B's noise along them (a 384 x 1536 FFN matrix merged from four MiniLM
    fine-tunes came out with 14 times the norm of sum_i tau_i). Adam, started at M0 with a
    small step, hardly moves along those low-curvature directions; the Tikhonov term does
    the same in closed form. Directions with eigenvalues well above eps are solved exactly.
    """
    g, b = wudi_system(tau)
    if float(g.abs().max()) == 0:  # every task vector is zero
        return torch.zeros_like(tau[0])
    eps = ridge * float(g.diagonal().sum()) / g.shape[0]
    if eps > 0:
        g.diagonal().add_(eps)
        b.add_(tau.sum(0).to(b.dtype), alpha=eps)
    # G is symmetric, so M G = B  <=>  G M^T = B^T
    return torch.linalg.solve(g, b.T).T.to(tau.dtype)


def wudi_adam(tau: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The paper's solver: Adam (torch's defaults: betas 0.9/0.999, eps 1e-8) from M = sum_i tau_i.

    The gradient 2 (M G - B) is computed in closed form from the precomputed (G, B), so a
    step costs one [out, in] x [in, in] product and no autograd; the arithmetic of each
    step is torch.optim.Adam's.
    """
    merged = tau.sum(0)
    if steps == 0:
        return merged
    g, b = (a.to(tau.dtype) for a in wudi_system(tau))
    m = torch.zeros_like(merged)
    v = torch.zeros_like(merged)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        grad = torch.addmm(b, merged, g, beta=-2.0, alpha=2.0)  # 2 (M G - B)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        merged.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    return merged


@register(
    "wudi",
    params=WudiParams,
    model_params=NoParams,
    paper="Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding Data-Free Model "
    "Merging via Task Vectors (WUDI-merging, ICML 2025, arXiv:2503.08099)",
    base="required",
)
def wudi(x: MergeInput) -> torch.Tensor:
    """WUDI-merging: per linear weight, the task vector that least disturbs each task on its own inputs.

    For a 2-D weight (torch's [out, in] layout) the rows of tau_i span task i's inputs, so
    the interference of a merged tau_m on task i is (tau_m - tau_i) tau_i^T:
      tau_m = argmin_M sum_i ||(M - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2
      merged = theta_0 + tau_m
    solver 'adam' (the paper): ``steps`` Adam steps of size ``lr`` from M = sum_i tau_i.
    solver 'closed_form': the normal equations M G = B with G = sum_i w_i tau_i^T tau_i,
    B = sum_i w_i tau_i tau_i^T tau_i, w_i = 1 / ||tau_i||_F^2, regularised toward Adam's
    starting point: M = (B + eps sum_i tau_i)(G + eps I)^-1, eps = ridge * trace(G) / in
    (G is near-singular on real fine-tunes; see ``wudi_closed_form``).
    Other tensors and embeddings: theta_0 + mean_i tau_i (``average_fallback``, as the
    reference code averages the task vectors it does not optimise).

    Cheng et al. 2025, Whoever Started the Interference Should End It (arXiv:2503.08099).
    """
    if not is_matrix_weight(x):
        return average_fallback(x, 1.0)
    tau = x.deltas()
    p = x.params
    merged = wudi_closed_form(tau, p.ridge) if p.solver == "closed_form" else wudi_adam(tau, p.steps, p.lr)
    return x.base + merged
