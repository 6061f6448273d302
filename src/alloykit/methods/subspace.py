"""Data-free subspace, isotropy and mask merges: TSV-M, Iso-C, Iso-CTS, CART, MagMax, Consensus.

Every method here is a pure per-tensor function on task vectors ``tau_i = theta_i - theta_0``
(CART: on the fine-tunes themselves, centred on their mean).

Matrix methods (``tsv_m``, ``iso_c``, ``iso_cts``, ``cart``) apply their SVD treatment to
2-D weights only. Every other tensor (1-D norms and biases, 0-d and N-D tensors), every
embedding table (token, position, token-type) and the output head (``x.role``, see
``alloykit.roles``) falls back to one shared rule, ``average_fallback``:

    merged = theta_0 + scale * mean_i tau_i

where ``scale`` is the factor the method puts on its merged task vector (``alpha`` for
TSV-M and the Iso methods, as their reference code averages non-matrix task vectors and
scales the result like the matrices). CART uses scale 1, i.e. the plain mean of the
fine-tunes: that is CART at full rank, where the centred task vectors sum to zero and its
``lambda`` has nothing to scale.

SVDs are ``torch.linalg.svd(full_matrices=False)`` in float32 on the tensors' device. Where a
method keeps only the top singular triplets of each task matrix (TSV-M's r per task, CART's
rank-k residuals), ``svd: randomized`` finds them by randomized subspace iteration instead
(``alloykit.ops.lowrank.truncated_svd``, the sketch drawn from a generator seeded by the
tensor's name): cheaper when the rank kept is a small part of min(m, n), approximate
(docs/benchmarks.md, "SVD methods: randomized SVD"), and the exact SVD wherever the sketch
would exceed a quarter of min(m, n) (then it saves nothing). The default is ``exact``, the papers'
computation. Iso-C needs every singular value (the mean of the whole spectrum, a nuclear
norm, which no top-k sketch gives): it always decomposes exactly. Iso-CTS keeps 80% of the
summed matrix's spectrum by default, and its task-specific parts are SVDs of residuals with
the common space removed, nearly flat spectra where any near-optimal subspace differs from
the exact one (6% of the merged task vector measured): it decomposes exactly too.
An SVD needs its whole matrix, so these methods cannot run on row blocks: a job holds the
K task matrices in float32 plus the SVD's workspace (about m n + n^2 floats), which the
executor's memory budget counts per job.
"""

from __future__ import annotations

import zlib
from typing import Any, Literal

import torch
from pydantic import Field

from alloykit.methods import interference_fast
from alloykit.methods.registry import MergeInput, NoParams, Params, register
from alloykit.methods.stream import Streamed
from alloykit.ops.lowrank import OVERSAMPLE, truncated_svd
from alloykit.roles import Kind

# --------------------------------------------------------------------------------------
# Shared parts
# --------------------------------------------------------------------------------------


def is_matrix_weight(x: MergeInput) -> bool:
    """True for a 2-D weight that is not an embedding: the tensors the matrix methods decompose.

    The output head counts as an embedding here (a [vocab, hidden] table, tied to the token
    embedding in many models): the papers (TSV, Iso-C, CART) decompose the layers' linear
    maps, and their code averages what is not one. Position embeddings are tables too
    (GPT-2's ``wpe`` was decomposed before roles, unlike BERT's ``position_embeddings``).
    """
    if x.tensors.dim() != 3:  # [K, m, n]
        return False
    return not (x.role.is_embedding or x.role.kind is Kind.OUTPUT_HEAD)


def average_fallback(x: MergeInput, scale: float) -> torch.Tensor:
    """The matrix methods' rule for other tensors: ``theta_0 + scale * mean_i tau_i``.

    Without a base (CART) or with ``scale == 1`` this is the mean of the inputs.
    """
    mean = x.tensors.mean(0)
    if x.base is None or scale == 1:
        return mean
    return x.base + (mean - x.base) * scale


def orthogonalize(a: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows, if wide): ``P Q^T`` for ``a = P S Q^T``.

    The orthogonal Procrustes solution; a matrix that is already orthonormal comes back
    unchanged (up to rounding).
    """
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


SvdSolver = Literal["exact", "randomized"]


def top_svd(a: torch.Tensor, rank: int, solver: SvdSolver = "exact", name: str = "") -> tuple[torch.Tensor, ...]:
    """(U[:, :rank], s[:rank], Vh[:rank]) of a matrix: by the full SVD, or ``randomized``
    (subspace iteration on a sketch seeded by ``name``: the same bytes on every run) where
    the sketch (2 rank columns, ``lowrank.OVERSAMPLE`` at least) is at most a quarter of
    min(m, n): above that its products cost about as much as the full SVD or more
    (docs/benchmarks.md: 1.06x at r = 0.15 p, 2.3x at r = p/3)."""
    if solver == "randomized" and 4 * (rank + max(OVERSAMPLE, rank)) <= min(a.shape):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return truncated_svd(a, rank, generator=gen)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def low_rank(a: torch.Tensor, rank: int, solver: SvdSolver = "exact", name: str = "") -> torch.Tensor:
    """Best rank-``rank`` approximation of a matrix (truncated SVD, Eckart-Young)."""
    if rank <= 0:
        return torch.zeros_like(a)
    u, s, vh = top_svd(a, rank, solver, name)
    return (u * s) @ vh


def _scaled(base: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    if scale != 1:
        delta = delta * scale
    return base + delta


_ALPHA = "scale of the merged task vector (matrices and fallback tensors alike)"
_SVD = ("how the kept top singular triplets are found: 'exact' (the full SVD, as the reference code) or "
        "'randomized' (subspace iteration on a sketch: faster when the rank kept is a small part of min(m, n), "
        "approximate; see docs/benchmarks.md)")


# --------------------------------------------------------------------------------------
# Parameter declarations
# --------------------------------------------------------------------------------------


class TsvParams(Params):
    fraction: float | None = Field(
        None, gt=0, le=1,
        description="fraction of min(m, n) singular triplets kept per task: floor(fraction * min(m, n)), "
        "at least 1; default 1/K, so that the K tasks together fill the full rank",
    )
    alpha: float = Field(1.0, allow_inf_nan=False, description=_ALPHA)
    svd: SvdSolver = Field("exact", description=_SVD)


class IsoCParams(Params):
    alpha: float = Field(1.0, allow_inf_nan=False, description=_ALPHA)


class IsoCtsParams(Params):
    common_space_fraction: float = Field(
        0.8, ge=0, le=1,
        description="fraction of the rank min(m, n) given to the common subspace (top singular vectors of "
        "the summed task matrix); the rest is shared equally by the task-specific subspaces",
    )
    alpha: float = Field(1.0, allow_inf_nan=False, description=_ALPHA)


class CartParams(Params):
    rank_fraction: float = Field(
        0.08, ge=0, le=1,
        description="rank kept of each centred task matrix, as a fraction of min(m, n): "
        "floor(rank_fraction * min(m, n)), at least 1 when positive (the paper finds ~8% best)",
    )
    lambda_: float = Field(
        1.0, alias="lambda", allow_inf_nan=False, description="scale of the summed low-rank centred task vectors"
    )
    svd: SvdSolver = Field("exact", description=_SVD)


class MagMaxParams(Params):
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged task vector")


class ConsensusParams(Params):
    k: int = Field(2, ge=1, description="keep an entry of the summed task vector where at least k TALL masks select it")
    lambda_t: float = Field(
        0.4, ge=0, allow_inf_nan=False,
        description="TALL mask threshold: task i selects entries with |tau_i| >= lambda_t * |tau_MTL - tau_i|",
    )
    alpha: float = Field(1.0, allow_inf_nan=False, description="scale of the masked multi-task vector")


def _check_consensus_k(params: Any, model_params: list[Any]) -> str | None:
    if params.k > len(model_params):
        return (
            f"k={params.k} exceeds the {len(model_params)} models, so no entry can reach consensus "
            "and the merge would return the base; lower k"
        )
    return None


_NEEDS_BASE = dict(base="required")

# --------------------------------------------------------------------------------------
# Subspace (SVD) methods
# --------------------------------------------------------------------------------------


@register(
    "tsv_m",
    params=TsvParams,
    model_params=NoParams,
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging "
    "(arXiv:2412.00081)",
    **_NEEDS_BASE,
)
def tsv_m(x: MergeInput) -> torch.Tensor:
    """TSV-M: keep each task matrix's top singular vectors, decorrelate them across tasks, sum.

    For a 2-D weight with p = min(m, n) and r = max(1, floor(fraction * p)) (default
    floor(p / K)):
      tau_i = U_i S_i V_i^T                      (per-task SVD, descending)
      U_cat = [U_1[:, :r], ..., U_K[:, :r]]      (m x Kr; likewise V_cat, S_cat)
      U_perp = P Q^T for U_cat = P Sigma Q^T     (Procrustes whitening; likewise V_perp)
      merged = theta_0 + alpha * U_perp diag(S_cat) V_perp^T
    Other tensors and embeddings: theta_0 + alpha * mean_i tau_i (``average_fallback``).
    When K * r > min(m, n) (fraction > 1/K) U_perp cannot have orthonormal columns; the
    formula is applied as is, like the reference code.

    Gargiulo et al. 2025, Task Singular Vectors (arXiv:2412.00081).
    """
    alpha = x.params.alpha
    if not is_matrix_weight(x):
        return average_fallback(x, alpha)
    tau = x.deltas()
    p = min(tau.shape[1], tau.shape[2])
    frac = x.params.fraction
    r = p // x.k if frac is None else int(frac * p)
    r = min(max(1, r), p)
    us, ss, vhs = [], [], []
    for i, t in enumerate(tau):
        u, s, vh = top_svd(t, r, x.params.svd, f"{x.name}/{i}")
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    u_perp = orthogonalize(torch.cat(us, dim=1))
    vh_perp = orthogonalize(torch.cat(vhs, dim=0))
    return _scaled(x.base, (u_perp * torch.cat(ss)) @ vh_perp, alpha)


@register(
    "iso_c",
    params=IsoCParams,
    model_params=NoParams,
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces (arXiv:2502.04959)",
    **_NEEDS_BASE,
)
def iso_c(x: MergeInput) -> torch.Tensor:
    """Iso-C: sum the task matrices and flatten their singular spectrum to its mean.

    For a 2-D weight:
      M = sum_i tau_i = U S V^T                       (thin SVD, p = min(m, n) values)
      merged = theta_0 + alpha * U diag(mean(S)) V^T  (mean over all p singular values)
    Other tensors and embeddings: theta_0 + alpha * mean_i tau_i (``average_fallback``).

    Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging (arXiv:2502.04959).
    """
    alpha = x.params.alpha
    if not is_matrix_weight(x):
        return average_fallback(x, alpha)
    u, s, vh = torch.linalg.svd(x.deltas().sum(0), full_matrices=False)
    return _scaled(x.base, (u * s.mean()) @ vh, alpha)


def iso_cts_sizes(p: int, k_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dims, dims per task) of Iso-CTS for rank p: common + K * per_task == p.

    As the reference code: c = int(p * fraction), per_task = round((p - c) / K) (Python's
    round), common = p - K * per_task; per_task is capped at p // K so common stays >= 0.
    """
    c = int(p * common_space_fraction)
    per_task = min(round((p - c) / k_tasks), p // k_tasks)
    return p - k_tasks * per_task, per_task


@register(
    "iso_cts",
    params=IsoCtsParams,
    model_params=NoParams,
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces (arXiv:2502.04959)",
    **_NEEDS_BASE,
)
def iso_cts(x: MergeInput) -> torch.Tensor:
    """Iso-CTS: common subspace of the summed task matrix plus task-specific subspaces, isotropic.

    For a 2-D weight with p = min(m, n), (c, s) = ``iso_cts_sizes(p, K, common_space_fraction)``
    so that c + K s = p:
      M = sum_i tau_i = U S V^T;  common: U_c = U[:, :c], S_c = S[:c], V_c = V[:, :c]
      tau_i^ts = tau_i - U_c U_c^T tau_i = U_i S_i V_i^T   (left projection off the common space)
      U_cat = [U_1[:, :s], ..., U_K[:, :s], U_c]; likewise S_cat, V_cat
      U_perp = P Q^T for U_cat = P Sigma Q^T (Procrustes; likewise V_perp)
      merged = theta_0 + alpha * U_perp diag(mean(S_cat)) V_perp^T
    Other tensors and embeddings: theta_0 + alpha * mean_i tau_i (``average_fallback``).
    common_space_fraction = 1 gives Iso-C.

    Marczak et al. 2025, No Task Left Behind (arXiv:2502.04959), Algorithm "Iso-CTS".
    """
    alpha = x.params.alpha
    if not is_matrix_weight(x):
        return average_fallback(x, alpha)
    tau = x.deltas()
    p = min(tau.shape[1], tau.shape[2])
    common, per_task = iso_cts_sizes(p, x.k, x.params.common_space_fraction)
    u_c, s_c, vh_c = top_svd(tau.sum(0), common)
    us, ss, vhs = [], [], []
    if per_task > 0:
        for t in tau:
            t_ts = t - u_c @ (u_c.T @ t)
            ut, st, vht = top_svd(t_ts, per_task)
            us.append(ut)
            ss.append(st)
            vhs.append(vht)
    u_perp = orthogonalize(torch.cat([*us, u_c], dim=1))
    vh_perp = orthogonalize(torch.cat([*vhs, vh_c], dim=0))
    s_iso = torch.cat([*ss, s_c]).mean()
    return _scaled(x.base, (u_perp * s_iso) @ vh_perp, alpha)


@register(
    "cart",
    params=CartParams,
    model_params=NoParams,
    paper="Choi et al. 2024, Revisiting Weight Averaging for Model Merging (CART, arXiv:2412.12153)",
    base="ignored",
)
def cart(x: MergeInput) -> torch.Tensor:
    """CART: the mean of the fine-tunes plus low-rank approximations of the centred task vectors.

    For a 2-D weight with k = floor(rank_fraction * min(m, n)) (at least 1 when rank_fraction > 0):
      theta_bar = (1/K) sum_i theta_i
      merged = theta_bar + lambda * sum_i SVD_k(theta_i - theta_bar)
    (SVD_k = best rank-k approximation). No base model is used: the task vectors are
    centred on the weight average. Other tensors and embeddings: theta_bar (the shared
    ``average_fallback`` with scale 1, which is CART at full rank).

    Choi et al. 2024, Revisiting Weight Averaging for Model Merging (arXiv:2412.12153).
    """
    if not is_matrix_weight(x):
        return average_fallback(x, 1.0)
    theta_bar = x.tensors.mean(0)
    p = min(theta_bar.shape)
    frac = x.params.rank_fraction
    rank = min(p, max(1, int(frac * p))) if frac > 0 else 0
    if rank == 0 or x.params.lambda_ == 0:
        return theta_bar
    residual = torch.zeros_like(theta_bar)
    for i, t in enumerate(x.tensors):
        residual += low_rank(t - theta_bar, rank, x.params.svd, f"{x.name}/{i}")
    return _scaled(theta_bar, residual, x.params.lambda_)


# --------------------------------------------------------------------------------------
# Per-entry selection methods
# --------------------------------------------------------------------------------------


@register(
    "magmax",
    streamed=Streamed(interference_fast.magmax),
    elementwise=True,
    params=MagMaxParams,
    model_params=NoParams,
    paper="Marczak et al. 2024, MagMax: Leveraging Model Merging for Seamless Continual Learning "
    "(arXiv:2407.06322)",
    **_NEEDS_BASE,
)
def magmax(x: MergeInput) -> torch.Tensor:
    """MagMax: per entry, the task-vector value of largest magnitude (with its sign).

    i*(p) = argmax_i |tau_i[p]|   (ties: the lowest model index)
    merged[p] = theta_0[p] + lambda * tau_{i*(p)}[p]

    Marczak et al. 2024, MagMax (arXiv:2407.06322).
    """
    tau = x.deltas()
    pick = tau.abs().argmax(0, keepdim=True)
    return _scaled(x.base, tau.gather(0, pick).squeeze(0), x.params.lambda_)


def tall_masks(tau: torch.Tensor, lambda_t: float, mtl: torch.Tensor | None = None) -> torch.Tensor:
    """TALL masks [K, ...]: m_i = |tau_i| >= lambda_t * |tau_MTL - tau_i|, tau_MTL = sum_i tau_i."""
    if mtl is None:
        mtl = tau.sum(0)
    return torch.stack([t.abs() >= (mtl - t).abs().mul_(lambda_t) for t in tau])


@register(
    "consensus_ta",
    # not declared elementwise: from K = 5 torch's sum(0) orders its additions by position, so the
    # reference run on row blocks (the path without numba) could differ with the block size
    streamed=Streamed(interference_fast.consensus_ta),
    params=ConsensusParams,
    model_params=NoParams,
    check=_check_consensus_k,
    paper="Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression "
    "(TALL masks / Consensus Merging, arXiv:2405.07813)",
    **_NEEDS_BASE,
)
def consensus_ta(x: MergeInput) -> torch.Tensor:
    """Consensus task arithmetic: keep the entries of the summed task vector that >= k TALL masks select.

    tau_MTL = sum_i tau_i
    m_i = [ |tau_i| >= lambda_t * |tau_MTL - tau_i| ]      (TALL mask of task i)
    m_cons = [ sum_i m_i >= k ]
    merged = theta_0 + alpha * m_cons * tau_MTL

    Wang et al. 2024, Localizing Task Information for Improved Model Merging and
    Compression (arXiv:2405.07813).
    """
    tau = x.deltas()
    mtl = tau.sum(0)
    count = tall_masks(tau, x.params.lambda_t, mtl).sum(0)
    return _scaled(x.base, mtl * (count >= x.params.k), x.params.alpha)
