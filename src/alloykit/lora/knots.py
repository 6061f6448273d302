"""KnOTS: merge LoRA updates in the shared basis of their joint SVD.

Stoica, Ramesh, Ecsedi, Choshen & Hoffman, "Model merging with SVD to tie the KnOTS",
ICLR 2025 (arXiv:2410.19735). For one adapted weight with task updates
Delta_i = s_i B_i A_i (out x in), i = 1..K:

1. concatenate them column-wise (along the input dimension, the paper's
   ``concat_across_output``): [Delta_1 ... Delta_K] (out x K*in) = U S V^T, so that
   Delta_i = U S V_i^T with V_i^T the i-th block of in columns of V^T;
2. scale each block by the singular values (the paper's default ``s_on_V``): the task's
   coordinates in the shared basis are S V_i^T (rank x in);
3. merge these K blocks with an ordinary task-vector method (TIES in the paper's main
   results, also DARE-TIES or linear), the base being 0: M = merge(S V_1^T, ..., S V_K^T);
4. the merged update is U M (out x in); ``merge-lora`` then truncates it to the output
   rank by SVD.

Singular values below ``1e-6 * s_max`` are dropped (the paper drops s <= 1e-5): their
directions carry nothing. The SVD is computed from the low-rank factors, never from the
dense out x K*in matrix: with L = [s_1 B_1 ... s_K B_K] = Q R (thin QR) and
N = R blockdiag(A_1, ..., A_K), [Delta_1 ... Delta_K] = Q N, so U = Q U_N, S = S_N, V = V_N
(and N's own SVD goes through a thin QR of N^T).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RELATIVE_CUTOFF = 1e-6


def joint_svd(factors: list[tuple[torch.Tensor, torch.Tensor] | None], shape: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(U, [S V_1^T, ..., S V_K^T]) of the column-wise concatenation of the updates L_i @ R_i.

    ``factors[i]`` is (L_i, R_i) with L_i (out x r_i) and R_i (r_i x in), or None for a
    task that does not adapt this weight (its block is then 0).
    """
    out_dim, in_dim = shape
    present = [f for f in factors if f is not None]
    left = torch.cat([f[0] for f in present], 1).double()
    q, r = torch.linalg.qr(left)  # q: out x p, r: p x (sum r_i)
    blocks, col = [], 0
    for f in factors:
        if f is None:
            blocks.append(torch.zeros(r.shape[0], in_dim, dtype=torch.float64))
            continue
        rank = f[0].shape[1]
        blocks.append(r[:, col : col + rank] @ f[1].double())
        col += rank
    # N is p x K*in, very wide: its SVD through a thin QR of N^T is several times faster
    q_t, r_t = torch.linalg.qr(torch.cat(blocks, 1).T)
    u_n, s, vh_small = torch.linalg.svd(r_t.T)
    vh = vh_small @ q_t.T
    keep = s > RELATIVE_CUTOFF * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    u = (q @ u_n[:, keep]).float()
    s_vh = s[keep, None] * vh[keep]
    # a task without this weight has an exactly zero block (not SVD round-off, which TIES would count)
    return u, [blk.float() if f is not None else torch.zeros(blk.shape) for blk, f in zip(s_vh.split(in_dim, dim=1), factors)]


def knots_update(
    factors: list[tuple[torch.Tensor, torch.Tensor] | None],
    shape: tuple[int, int],
    merge_blocks: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The KnOTS-merged dense update U merge(S V_1^T, ..., S V_K^T) of one weight.

    ``merge_blocks`` takes the K x rank x in stack of scaled V blocks and returns the
    merged rank x in block (a registered method run with a zero base).
    """
    u, blocks = joint_svd(factors, shape)
    if u.shape[1] == 0:
        return torch.zeros(shape)
    return u @ merge_blocks(torch.stack(blocks))
