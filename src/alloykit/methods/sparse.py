"""Task-vector merges: task arithmetic and its sparsified and sign-consensus variants.

Every method here works on task vectors ``tau_i = theta_i - theta_0`` (each input minus
the base) and returns ``theta_0 + merged delta``. The mergekit-named methods (task
arithmetic, TIES, DARE, Model Breadcrumbs, DELLA, SCE) follow one pipeline, mergekit's
"generalized task arithmetic":

1. sparsify each task vector on its own (``alloykit.ops.sparsify``), optionally
   rescaling what is kept;
2. multiply by the per-model ``weight``;
3. TIES-family only: elect a sign per entry from the weighted deltas and keep the
   agreeing entries (``alloykit.ops.consensus``);
4. sum; with ``normalize`` divide by the sum of the (agreeing) weights;
5. multiply by ``lambda`` and add to the base.

Deterministic methods reproduce mergekit 0.1.5 in float32 up to rounding, including which
of several equal magnitudes a trim keeps where they straddle its cut (the order of torch's
sort, as mergekit's ``argsort``: ``ops.sparsify``'s ``ties="sort"``; where mergekit would
compute in bfloat16 or float16 its trim sees rounded magnitudes that no tie order can
match, and the lower flat index is kept, without a sort). The randomized ones
(DARE, DELLA) draw their masks from a counter-based stream keyed by the tensor's seed
(``ops.philox``: the same bits at any thread count or block size), mergekit's draws in
distribution. ``ties_peft``, ``magnitude_prune`` and ``ties_fusionbench`` reproduce the
other tools' TIES computations (docs/ties-variants.md).

Each mergekit-family method also has a fast path (``sparse_fast.py``), streamed over
blocks of rows; these functions are its specification.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from alloykit.methods.registry import MergeInput, NoParams, Params, register
from alloykit.ops.consensus import (
    ConsensusMethod,
    agreeing_weight,
    agreement_mask,
    disjoint_max,
    disjoint_mean,
    disjoint_sum,
    elect_sign,
    elected_disjoint,
    fill_zero_signs,
)
from alloykit.methods import sparse_fast
from alloykit.methods.stream import Streamed
from alloykit.ops.philox import seed_of
from alloykit.ops.sparsify import (
    della_keep_probability,
    magnitude_mask,
    magnitude_trim_,
    outlier_trim_,
    rescale_inverse_probability,
    rescale_l1_,
    stream_mask,
    TieRule,
    threshold_mask,
    variance_topk_mask,
)

# mergekit treats a weight sum below this as zero (and then skips the division)
_ZERO_WEIGHT_SUM = 1e-8

# entries per block in the per-entry steps of _merge_weighted
_BLOCK = 1 << 16

# --------------------------------------------------------------------------------------
# Parameter declarations
# --------------------------------------------------------------------------------------

_DENSITY = "fraction of this model's task-vector entries to keep, in [0, 1]; 1 keeps all"


class TaskWeight(Params):
    weight: float = Field(allow_inf_nan=False, description="this model's weight (multiplies its task vector)")


class TaskWeightDensity(TaskWeight):
    density: float = Field(1.0, ge=0, le=1, description=_DENSITY)


class BreadcrumbsModelParams(TaskWeightDensity):
    gamma: float = Field(
        0.01, ge=0, le=1,
        description="fraction of largest-magnitude entries dropped as outliers, in [0, 1] "
        "(reduced when density + gamma > 1)",
    )


class DellaModelParams(TaskWeightDensity):
    epsilon: float = Field(
        0.15, ge=0, le=0.5,
        description="keep probabilities spread over [density - epsilon, density + epsilon] by magnitude rank",
    )


class TaskArithmeticParams(Params):
    normalize: bool = Field(False, description="divide the merged delta by the sum of the weights")
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged delta")
    int8_mask: bool = Field(
        False, description="accepted for mergekit recipes; no effect (alloykit's masks are always boolean)"
    )


_CONSENSUS = (
    "sign election: 'sum' = sign of the summed weighted deltas (TIES), "
    "'count' = sign of the number of positive minus negative deltas; a tie elects +"
)
_L1_RESCALE = "rescale each kept task vector by one scalar that restores its L1 norm"


class TrimParams(TaskArithmeticParams):
    rescale: bool = Field(False, description=_L1_RESCALE)


class TrimConsensusParams(TrimParams):
    consensus_method: ConsensusMethod = Field("sum", description=_CONSENSUS)


class TiesParams(TrimConsensusParams):
    normalize: bool = Field(True, description="divide each entry by the sum of the weights of the agreeing models")


class DropParams(TaskArithmeticParams):
    rescale: bool = Field(True, description="rescale the kept entries of each task vector (see rescale_mode)")
    rescale_mode: Literal["l1", "inverse_probability"] = Field(
        "l1",
        description="'l1': one scalar per tensor restoring the L1 norm of the task vector (mergekit); "
        "'inverse_probability': each kept entry divided by its keep probability (the papers, PEFT)",
    )


class DropConsensusParams(DropParams):
    consensus_method: ConsensusMethod = Field("sum", description=_CONSENSUS)


class DellaParams(DropConsensusParams):
    normalize: bool = Field(True, description="divide each entry by the sum of the weights of the agreeing models")


class SceParams(Params):
    select_topk: float = Field(
        1.0, ge=0, le=1,
        description="fraction of entries kept: those whose task vectors vary most across models, in [0, 1]",
    )
    int8_mask: bool = Field(
        False, description="accepted for mergekit recipes; no effect (alloykit's masks are always boolean)"
    )


class PeftTiesParams(Params):
    consensus_method: ConsensusMethod = Field(
        "sum",
        description="sign election on the unweighted trimmed deltas: 'sum' (PEFT 'total') "
        "or 'count' (PEFT 'frequency')",
    )


class FusionBenchModelParams(Params):
    density: float = Field(
        0.2, ge=0, le=1,
        description="fraction of largest magnitudes kept (FusionBench 'threshold' / 100; keeps one more, plus ties)",
    )


class FusionBenchParams(Params):
    lambda_: float = Field(
        0.3, alias="lambda", allow_inf_nan=False, description="scale of the merged delta (FusionBench 'scaling_factor')"
    )
    aggregate: Literal["sum", "mean", "max"] = Field(
        "sum",
        description="combine the agreeing entries: 'sum', 'mean' (TIES paper), or 'max' magnitude "
        "(FusionBench 'merge_func')",
    )


class MagnitudePruneParams(Params):
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged delta")


# --------------------------------------------------------------------------------------
# Plan-time checks
# --------------------------------------------------------------------------------------


def _check_weight_sum(params: Any, model_params: list[Any]) -> str | None:
    """normalize divides by sum_i w_i: refuse a zero sum (mergekit silently skips the division)."""
    if params.normalize and abs(sum(m.weight for m in model_params)) < _ZERO_WEIGHT_SUM:
        return (
            "the weights sum to 0 and normalize divides by their sum; "
            "change the weights or set normalize: false"
        )
    return None


def _check_any_weight(params: Any, model_params: list[Any]) -> str | None:
    """normalize divides each entry by the agreeing weights: all-zero weights make that 0/0 everywhere."""
    if params.normalize and all(m.weight == 0 for m in model_params):
        return "every weight is 0, so normalize would divide 0 by 0; give at least one model a nonzero weight"
    return None


def _check_epsilon(model_params: list[Any]) -> str | None:
    for i, m in enumerate(model_params):
        if 0 < m.density < 1 and not (0 <= m.density - m.epsilon and m.density + m.epsilon <= 1):
            return (
                f"model {i + 1} of {len(model_params)}: density {m.density} +/- epsilon {m.epsilon} leaves [0, 1]; "
                f"use epsilon <= {min(m.density, 1 - m.density):g}"
            )
    return None


def _check_della(params: Any, model_params: list[Any]) -> str | None:
    return _check_epsilon(model_params) or _check_any_weight(params, model_params)


def _check_della_linear(params: Any, model_params: list[Any]) -> str | None:
    return _check_epsilon(model_params) or _check_weight_sum(params, model_params)


# --------------------------------------------------------------------------------------
# The shared pipeline
# --------------------------------------------------------------------------------------

#: ``trim(delta_i, model_params_i, i)``: model i's sparsified task vector
Trim = Callable[[torch.Tensor, Any, int], torch.Tensor]


def _trimmed_deltas(x: MergeInput, trim: Trim | None) -> torch.Tensor:
    """Task vectors [K, ...], each sparsified by ``trim(delta_i, model_params_i, i)``."""
    deltas = x.deltas()
    if trim is not None:
        for i, (delta, mp) in enumerate(zip(deltas, x.model_params)):
            kept = trim(delta, mp, i)
            if kept is not delta:
                delta.copy_(kept)
    return deltas


def _merge_weighted(x: MergeInput, deltas: torch.Tensor, consensus: ConsensusMethod | None) -> torch.Tensor:
    """Steps 2-5: weight, (elect + disjoint merge), normalize, scale by lambda, add the base.

    Every step is per entry, so it runs on blocks of entries (the same operations on each
    entry as on the whole tensor: temporaries stay block-sized) and the result lands in
    ``deltas[0]``, whose block is no longer needed once merged.
    """
    w = x.column("weight")
    deltas.mul_(w)
    total = w.sum()
    divisor = total if abs(float(total)) >= _ZERO_WEIGHT_SUM else 1.0
    k = deltas.shape[0]
    flat, base = deltas.view(k, -1), x.base.reshape(-1)
    for start in range(0, flat.shape[1], _BLOCK):
        d = flat[:, start : start + _BLOCK]
        if consensus is None:
            merged = d.sum(0)
            if x.params.normalize:
                merged /= divisor
        else:  # elect, agree, disjoint sum or weighted mean
            merged = elected_disjoint(d, consensus, w if x.params.normalize else None)
        if x.params.lambda_ != 1:
            merged *= x.params.lambda_
        torch.add(base[start : start + _BLOCK], merged, out=d[0])
    return flat[0].view(x.base.shape)


def _masked(
    delta: torch.Tensor, trim_: Callable[[torch.Tensor], torch.Tensor], rescale_l1_norm: bool, scratch: list[torch.Tensor]
) -> torch.Tensor:
    """``trim_(delta)`` (in place: the trims own their task vector); with ``rescale_l1_norm``
    scaled as ``rescale_l1(delta, trimmed)`` scales it. ``|delta|`` goes to one buffer kept
    in ``scratch`` for all the task vectors (fresh ones each time fragment the heap)."""
    if not rescale_l1_norm:
        return trim_(delta)
    if not scratch:
        scratch.append(torch.empty_like(delta))
    before = torch.abs(delta, out=scratch[0]).sum()
    return rescale_l1_(trim_(delta), before, scratch=scratch[0])


def _tie_rule(x: MergeInput) -> TieRule:
    """mergekit's order of equal magnitudes at a trim's cut where mergekit computes in
    float32 (``sparse_fast.mergekit_tie_order``), else the lower flat index."""
    return "sort" if sparse_fast.mergekit_tie_order(x.compute_dtype) else "flat"


def _magnitude_trim(rescale: bool, ties: TieRule) -> Trim:
    scratch: list[torch.Tensor] = []

    def trim(delta: torch.Tensor, mp: Any, i: int) -> torch.Tensor:
        if mp.density >= 1:
            return delta
        return _masked(delta, lambda d: magnitude_trim_(d, mp.density, ties=ties), rescale, scratch)

    return trim


def _outlier_trim(rescale: bool, ties: TieRule) -> Trim:
    scratch: list[torch.Tensor] = []

    def trim(delta: torch.Tensor, mp: Any, i: int) -> torch.Tensor:
        if mp.density >= 1:
            return delta
        return _masked(delta, lambda d: outlier_trim_(d, mp.density, mp.gamma, ties=ties), rescale, scratch)

    return trim


def _random_trim(x: MergeInput, probability: Callable[[torch.Tensor, Any], torch.Tensor]) -> Trim:
    """Keep each entry with its probability; rescale per ``rescale`` / ``rescale_mode``.

    Draws come from the tensor's stream (``ops.philox``, keyed by its generator's seed):
    entry e of model i is kept when its 48-bit uniform is below the probability, whatever
    the order of computation. ``probability`` must treat rows (dim 0) independently; on the
    CPU it is computed a block of rows at a time, without full-size probabilities and mask.
    """
    seed = seed_of(x.generator)

    def drop_(delta: torch.Tensor, mp: Any, i: int) -> torch.Tensor:
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
        row_len = rows[0].numel()
        step = max(1, _BLOCK // max(1, row_len))
        for r0 in range(0, rows.shape[0], step):
            block = rows[r0 : r0 + step]
            block.mul_(stream_mask(probability(block, mp), seed, i, r0 * row_len, tuple(block.shape), block.dtype))
        return delta

    scratch: list[torch.Tensor] = []

    def trim(delta: torch.Tensor, mp: Any, i: int) -> torch.Tensor:
        if mp.density >= 1:
            return delta
        if mp.density <= 0:
            return torch.zeros_like(delta)
        inverse = x.params.rescale and x.params.rescale_mode == "inverse_probability"
        if delta.device.type == "cpu" and delta.is_contiguous() and not inverse:
            return _masked(delta, lambda d: drop_(d, mp, i), x.params.rescale, scratch)
        prob = probability(delta, mp)
        # 1/0 in the delta's dtype: multiplies without a conversion
        mask = stream_mask(prob, seed, i, 0, tuple(delta.shape), delta.dtype, delta.device)
        if x.params.rescale and x.params.rescale_mode == "inverse_probability":
            return rescale_inverse_probability(delta * mask, prob)
        del prob  # before _masked's temporaries
        return _masked(delta, lambda d: d.mul_(mask), x.params.rescale, scratch)

    return trim


def _dare_probability(delta: torch.Tensor, mp: Any) -> float:
    return mp.density


def _della_probability(delta: torch.Tensor, mp: Any) -> torch.Tensor:
    return della_keep_probability(delta, mp.density, mp.epsilon)


_NEEDS_BASE = dict(base="required")
_TIE_KEYS = dict(scratch_bytes=sparse_fast.tie_scratch)

# --------------------------------------------------------------------------------------
# mergekit's generalized task arithmetic family
# --------------------------------------------------------------------------------------


@register(
    "task_arithmetic",
    streamed=Streamed(sparse_fast.task_arithmetic),
    params=TaskArithmeticParams,
    model_params=TaskWeight,
    check=_check_weight_sum,
    reproduces="mergekit task_arithmetic",
    elementwise=True,
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
    **_NEEDS_BASE,
)
def task_arithmetic(x: MergeInput) -> torch.Tensor:
    """Add the weighted sum of the task vectors to the base.

    merged = theta_0 + lambda * sum_i w_i tau_i   (divided by sum_i w_i if normalize),
    tau_i = theta_i - theta_0.
    """
    return _merge_weighted(x, _trimmed_deltas(x, None), None)


@register(
    "ties",
    streamed=Streamed(sparse_fast.ties, **_TIE_KEYS),
    params=TiesParams,
    model_params=TaskWeightDensity,
    check=_check_any_weight,
    reproduces="mergekit ties",
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (arXiv:2306.01708)",
    **_NEEDS_BASE,
)
def ties(x: MergeInput) -> torch.Tensor:
    """TIES: trim each task vector by magnitude, elect signs, average the agreeing entries.

    d_i = w_i * topk(tau_i, density_i)   (keeps max(1, int(density_i * n)) largest |tau_i|;
          with rescale, scaled back to the L1 norm of tau_i)
    s   = sign(sum_i d_i)                 (0 -> +1; consensus_method=count: sign of the sign count)
    a_i = [sign(d_i) == s]
    merged = theta_0 + lambda * sum_i a_i d_i / sum_i a_i w_i   (no division without normalize;
             a divisor of 0 becomes 1)

    This is mergekit's TIES: weights are applied before the sign election and the mean is
    weighted. Equal magnitudes straddling the trim's cut are kept as mergekit keeps them
    (the order of torch's sort) where mergekit computes in float32; see ``_tie_rule``. For
    PEFT's and FusionBench's TIES see ``ties_peft`` and ``ties_fusionbench``.
    """
    trim = _magnitude_trim(x.params.rescale, _tie_rule(x))
    return _merge_weighted(x, _trimmed_deltas(x, trim), x.params.consensus_method)


@register(
    "breadcrumbs",
    streamed=Streamed(sparse_fast.breadcrumbs, **_TIE_KEYS),
    params=TrimParams,
    model_params=BreadcrumbsModelParams,
    check=_check_weight_sum,
    reproduces="mergekit breadcrumbs",
    paper="Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging "
    "with Sparse Masks (arXiv:2312.06795)",
    **_NEEDS_BASE,
)
def breadcrumbs(x: MergeInput) -> torch.Tensor:
    """Model Breadcrumbs: drop each task vector's largest outliers and smallest entries, then add.

    d_i = tau_i masked to ascending-magnitude ranks [b, b + int(density_i * n)),
          b = max(0, n - int(density_i * n) - int(gamma_i * n))
    merged = theta_0 + lambda * sum_i w_i d_i   (divided by sum_i w_i if normalize)

    When int(gamma * n) == 0 no outliers are dropped and the int(density * n) largest are
    kept, as in mergekit 0.1.5 (earlier mergekit zeroed the whole task vector there).
    """
    return _merge_weighted(x, _trimmed_deltas(x, _outlier_trim(x.params.rescale, _tie_rule(x))), None)


@register(
    "breadcrumbs_ties",
    streamed=Streamed(sparse_fast.breadcrumbs_ties, **_TIE_KEYS),
    params=TrimConsensusParams,
    model_params=BreadcrumbsModelParams,
    check=_check_any_weight,
    reproduces="mergekit breadcrumbs_ties",
    paper="Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795); TIES (arXiv:2306.01708)",
    **_NEEDS_BASE,
)
def breadcrumbs_ties(x: MergeInput) -> torch.Tensor:
    """Model Breadcrumbs trimming followed by TIES sign election and disjoint merge.

    d_i = w_i * breadcrumbs(tau_i, density_i, gamma_i); s = sign(sum_i d_i) (0 -> +1);
    merged = theta_0 + lambda * sum_i [sign(d_i) == s] d_i
             (divided per entry by the agreeing weights if normalize; off by default).
    """
    trim = _outlier_trim(x.params.rescale, _tie_rule(x))
    return _merge_weighted(x, _trimmed_deltas(x, trim), x.params.consensus_method)


@register(
    "dare_linear",
    streamed=Streamed(sparse_fast.dare_linear),
    params=DropParams,
    model_params=TaskWeightDensity,
    check=_check_weight_sum,
    randomized=True,
    reproduces="mergekit dare_linear (in distribution)",
    paper="Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous "
    "Models as a Free Lunch (DARE, arXiv:2311.03099)",
    **_NEEDS_BASE,
)
def dare_linear(x: MergeInput) -> torch.Tensor:
    """DARE: drop task-vector entries at random, rescale the rest, add the weighted sum.

    d_i = tau_i * m_i,  m_i ~ Bernoulli(density_i) per entry (drawn from the tensor's generator)
    rescale_mode=l1 (default, mergekit): d_i *= ||tau_i||_1 / ||d_i||_1, one scalar per tensor
    rescale_mode=inverse_probability (paper, PEFT): d_i /= density_i
    merged = theta_0 + lambda * sum_i w_i d_i   (divided by sum_i w_i if normalize)
    """
    trim = _random_trim(x, _dare_probability)
    return _merge_weighted(x, _trimmed_deltas(x, trim), None)


@register(
    "dare_ties",
    streamed=Streamed(sparse_fast.dare_ties),
    params=DropConsensusParams,
    model_params=TaskWeightDensity,
    check=_check_any_weight,
    randomized=True,
    reproduces="mergekit dare_ties (in distribution)",
    paper="Yu et al. 2024, DARE (arXiv:2311.03099); TIES (arXiv:2306.01708)",
    **_NEEDS_BASE,
)
def dare_ties(x: MergeInput) -> torch.Tensor:
    """DARE random drop and rescale, then TIES sign election and disjoint merge.

    d_i = w_i * dare(tau_i, density_i)   (rescale as in dare_linear)
    s = sign(sum_i d_i) (0 -> +1);  merged = theta_0 + lambda * sum_i [sign(d_i) == s] d_i
    (divided per entry by the agreeing weights if normalize; off by default).
    """
    trim = _random_trim(x, _dare_probability)
    return _merge_weighted(x, _trimmed_deltas(x, trim), x.params.consensus_method)


@register(
    "della",
    streamed=Streamed(sparse_fast.della, sparse_fast.della_mask_bytes),
    params=DellaParams,
    model_params=DellaModelParams,
    check=_check_della,
    randomized=True,
    reproduces="mergekit della (in distribution)",
    paper="Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through "
    "Magnitude-Based Sampling (arXiv:2406.11617)",
    **_NEEDS_BASE,
)
def della(x: MergeInput) -> torch.Tensor:
    """DELLA: drop entries with magnitude-ranked probabilities, then TIES election and mean.

    p_ij = density_i - epsilon_i + 2 epsilon_i * rank_ij / (n_row - 1)
           (rank of |tau_ij| within its row along dim 1, 0 = smallest; a 1-D tensor is one row)
    d_i = w_i * tau_i * m_i,  m_ij ~ Bernoulli(p_ij)
          rescale_mode=l1 (default, mergekit): one scalar restores ||tau_i||_1;
          rescale_mode=inverse_probability (paper): kept entries divided by p_ij
    s = sign(sum_i d_i) (0 -> +1);  merged = theta_0 + lambda * sum_i a_i d_i / sum_i a_i w_i
    (a_i = [sign(d_i) == s]; no division without normalize).

    Unlike mergekit, density +/- epsilon may touch 0 or 1 (mergekit raises), and a row of
    one entry keeps with probability density (mergekit fails with NaN probabilities).
    """
    trim = _random_trim(x, _della_probability)
    return _merge_weighted(x, _trimmed_deltas(x, trim), x.params.consensus_method)


@register(
    "della_linear",
    streamed=Streamed(sparse_fast.della_linear, sparse_fast.della_mask_bytes),
    params=DropParams,
    model_params=DellaModelParams,
    check=_check_della_linear,
    randomized=True,
    reproduces="mergekit della_linear (in distribution)",
    paper="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
    **_NEEDS_BASE,
)
def della_linear(x: MergeInput) -> torch.Tensor:
    """DELLA's magnitude-ranked random drop, then a weighted sum (no sign election).

    d_i = della(tau_i, density_i, epsilon_i) as in ``della``;
    merged = theta_0 + lambda * sum_i w_i d_i   (divided by sum_i w_i if normalize).
    """
    trim = _random_trim(x, _della_probability)
    return _merge_weighted(x, _trimmed_deltas(x, trim), None)


@register(
    "sce",
    streamed=Streamed(sparse_fast.sce, sparse_fast.sce_scratch),
    params=SceParams,
    model_params=NoParams,
    reproduces="mergekit sce",
    paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE, arXiv:2408.07990)",
    **_NEEDS_BASE,
)
def sce(x: MergeInput) -> torch.Tensor:
    """SCE: select high-variance entries, weight task vectors by energy, erase minority signs.

    Select: keep the int(select_topk * m) entries with the largest variance of tau across
            models (m = entries of nonzero variance) in every task vector.
    Calculate: c_i = mean(tau_i^2) / sum_j mean(tau_j^2)   (uniform 1/K if every tau_j is 0).
    Erase: s = sign(sum_i tau_i) (0 -> +1), a_i = [sign(tau_i) == s].
    merged = theta_0 + sum_i a_i c_i tau_i / max(sum_i a_i c_i, 1e-6)

    mergekit falls back to uniform weights when sum_j mean(tau_j^2) < 1e-6, an absolute
    threshold that many real fine-tunes fall under (per-entry deltas of ~5e-4 or less),
    silently turning SCE into a plain disjoint mean; we fall back only when it is 0.
    """
    tvs = x.deltas()
    keep = variance_topk_mask(tvs, x.params.select_topk)
    if not bool(keep.all()):
        tvs.mul_(keep)
    agree = agreement_mask(tvs, elect_sign(tvs, "sum"))
    energy = torch.stack([t.square().mean() for t in tvs])
    total = float(energy.sum())
    c = energy / total if total > 0 else torch.full_like(energy, 1.0 / x.k)
    c = c.view(-1, *([1] * (tvs.dim() - 1)))
    merged = disjoint_sum(tvs.mul_(c), agree) / agreeing_weight(agree, c).clamp_(min=1e-6)
    return x.base + merged


# --------------------------------------------------------------------------------------
# Other tools' TIES: PEFT and FusionBench
# --------------------------------------------------------------------------------------


def _peft_trimmed_deltas(x: MergeInput) -> torch.Tensor:
    """PEFT's magnitude pruning: keep int(density * n) largest |tau| (possibly none)."""

    def trim(delta: torch.Tensor, mp: Any, i: int) -> torch.Tensor:
        if mp.density >= 1:
            return delta
        return delta * magnitude_mask(delta, mp.density, at_least_one=False)

    return _trimmed_deltas(x, trim)


@register(
    "ties_peft",
    params=PeftTiesParams,
    model_params=TaskWeightDensity,
    reproduces="peft.utils.merge_utils.ties",
    paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
    **_NEEDS_BASE,
)
def ties_peft(x: MergeInput) -> torch.Tensor:
    """TIES as PEFT computes it: signs from unweighted deltas, weighted sum over the agreeing count.

    t_i = topk(tau_i, int(density_i * n))            (PEFT: no minimum of one entry)
    s   = sign(sum_i t_i)  (0 -> +1; consensus_method=count: sign of the sign count)
    a_i = [sign(t_i) == s]
    merged = theta_0 + sum_i a_i w_i t_i / max(1, sum_i a_i)
    """
    deltas = _peft_trimmed_deltas(x)
    agree = agreement_mask(deltas, elect_sign(deltas, x.params.consensus_method))
    deltas.mul_(x.column("weight"))
    return x.base + disjoint_mean(deltas, agree)


@register(
    "magnitude_prune",
    params=MagnitudePruneParams,
    model_params=TaskWeightDensity,
    reproduces="peft.utils.merge_utils.magnitude_prune",
    paper="PEFT's magnitude_prune combination (TIES' trim step without election, arXiv:2306.01708)",
    **_NEEDS_BASE,
)
def magnitude_prune(x: MergeInput) -> torch.Tensor:
    """Trim each task vector to its largest magnitudes, then add the weighted sum (no sign election).

    t_i = topk(tau_i, int(density_i * n))   (PEFT's count: no minimum of one entry)
    merged = theta_0 + lambda * sum_i w_i t_i
    """
    deltas = _peft_trimmed_deltas(x)
    merged = deltas.mul_(x.column("weight")).sum(0)
    if x.params.lambda_ != 1:
        merged *= x.params.lambda_
    return x.base + merged


@register(
    "ties_fusionbench",
    params=FusionBenchParams,
    model_params=FusionBenchModelParams,
    reproduces="FusionBench TiesMergingAlgorithm, per tensor",
    paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
    **_NEEDS_BASE,
)
def ties_fusionbench(x: MergeInput) -> torch.Tensor:
    """TIES as FusionBench computes it: unweighted, disjoint sum/mean/max, scaled by lambda.

    t_i = tau_i * [|tau_i| >= m_i],  m_i = (n - int(n * density_i))-th smallest |tau_i|
          (keeps int(n * density_i) + 1 entries plus ties; density 1 keeps all)
    s   = sign(sum_i t_i), a 0 replaced by sign(sum of s over the tensor)
    a_i = [t_i > 0] where s > 0, [t_i < 0] elsewhere
    merged = theta_0 + lambda * agg_i(a_i t_i),  agg = sum | mean over agreeing | max |.| * s

    FusionBench flattens the whole model into one vector, so its trim threshold and its
    tie-breaking sign are global; alloykit applies both per tensor (identical for a
    one-tensor model).
    """
    deltas = _trimmed_deltas(x, lambda d, mp, i: d * threshold_mask(d, mp.density))
    sign = fill_zero_signs(torch.sign(deltas.sum(0)))
    agree = agreement_mask(deltas, sign)
    aggregate = x.params.aggregate
    if aggregate == "sum":
        merged = disjoint_sum(deltas, agree)
    elif aggregate == "mean":
        merged = disjoint_mean(deltas, agree)
    else:
        merged = disjoint_max(deltas, agree, sign)
    return x.base + x.params.lambda_ * merged
