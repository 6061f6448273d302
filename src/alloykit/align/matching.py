"""Finding the permutations: weight matching and activation matching (Git Re-Basin).

Weight matching (Ainsworth, Hayase, Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023, arXiv:2209.04836, Algorithm 1) maximises
sum over tensors of <W_ref, P(W_model)>, the inner product of the reference's weights and
the permuted model's, by coordinate descent: each group's permutation in turn is the
solution of a linear assignment problem with the other groups' permutations held fixed,
the cost matrix being S[i, j] = sum over the group's axes of <row i of W_ref, row j of
P_others(W_model)>; the groups are visited in a seeded random order until no group's
objective improves.

Activation matching (same paper, section 3.1) observes each group's units on calibration
data and assigns the model's units to the reference's by the correlation of their
activations, C[i, j] = corr(a_ref_i, a_model_j), one linear assignment per group (the
activations do not depend on the other groups' permutations, so no iteration).

Attention groups (:class:`~alloykit.align.spec.Heads`) are solved in two levels: for every
pair (reference key/value head a, model key/value head b) the best within-pair assignment
(query heads of the group, q/k dimensions, v dimensions; alternating assignments, exact for
multi-head attention), then one assignment of key/value heads on those pair scores.

The linear assignment solver is scipy's ``linear_sum_assignment`` (the ``align`` extra).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from alloykit.align.spec import Group, HeadPerm, Heads, Perm, Spec, Use, permute_tensor
from alloykit.errors import AlloyError

log = logging.getLogger(__name__)


def assign(score: torch.Tensor) -> torch.Tensor:
    """argmax over permutations p of sum_i score[i, p[i]] (maximising linear assignment)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise AlloyError("alignment needs scipy's linear assignment solver: pip install 'alloykit[align]'") from None
    rows, cols = linear_sum_assignment(score.detach().cpu().double().numpy(), maximize=True)
    out = torch.empty(len(rows), dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return out


# -- attention heads ---------------------------------------------------------------------------------

def head_blocks(h: Heads, role: str, sim: torch.Tensor) -> torch.Tensor:
    """[units_ref, units_model] similarity of one role -> [heads, heads, head_dim, head_dim]."""
    n = h.n_heads if role in ("q", "o") else h.n_kv
    return sim.reshape(n, h.head_dim, n, h.head_dim).permute(0, 2, 1, 3)


def _diag_or_assign(m: torch.Tensor, free: bool) -> tuple[torch.Tensor, float]:
    """Best dimension permutation of one [hd, hd] block (identity when the dimensions are pinned)."""
    d = assign(m) if free else torch.arange(m.shape[0])
    return d, float(m[torch.arange(m.shape[0]), d].sum())


def _pair(h: Heads, a: int, b: int, S: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best (score, query-head assignment, q/k dims, v dims) of reference kv head a against model kv head b."""
    R, hd = h.rep, h.head_dim
    qs = S["q"][a * R:(a + 1) * R, b * R:(b + 1) * R]  # [R, R, hd, hd]
    os_ = S["o"][a * R:(a + 1) * R, b * R:(b + 1) * R]
    k, v = S["k"][a, b], S["v"][a, b]
    sigma = torch.arange(R)
    ar = torch.arange(R)
    best = None
    for _ in range(20):  # alternate: dims given the query-head assignment, then the assignment given the dims
        dqk, s_qk = _diag_or_assign(k + qs[ar, sigma].sum(0), h.qk_dims)
        dv, s_v = _diag_or_assign(v + os_[ar, sigma].sum(0), h.v_dims)
        score = s_qk + s_v
        if best is not None and score <= best[0] + 1e-9 * abs(best[0]):
            break
        best = (score, sigma, dqk, dv)
        if R == 1:
            break
        idx = torch.arange(hd)
        m = qs[:, :, idx, dqk].sum(-1) + os_[:, :, idx, dv].sum(-1)  # [R, R]
        sigma = assign(m)
    return best


def solve_heads(h: Heads, S: dict[str, torch.Tensor]) -> tuple[HeadPerm, float]:
    """Two-level assignment of one attention layer; ``S[role]`` are [n, n, hd, hd] similarity blocks."""
    pairs = [[_pair(h, a, b, S) for b in range(h.n_kv)] for a in range(h.n_kv)]
    kv = assign(torch.tensor([[p[0] for p in row] for row in pairs], dtype=torch.float64))
    q = torch.cat([kv[a] * h.rep + pairs[a][int(kv[a])][1] for a in range(h.n_kv)])
    qk = torch.stack([pairs[a][int(kv[a])][2] for a in range(h.n_kv)])
    v = torch.stack([pairs[a][int(kv[a])][3] for a in range(h.n_kv)])
    perm = HeadPerm(kv, q, qk, v)
    return perm, heads_score(h, perm, S)


def heads_score(h: Heads, perm: HeadPerm, S: dict[str, torch.Tensor]) -> float:
    """The objective of one attention permutation (sum of the matched blocks' matched dimensions)."""
    total = 0.0
    group_of = torch.arange(h.n_heads) // h.rep
    for role, units, dims in (("q", perm.q, perm.qk[group_of]), ("k", perm.kv, perm.qk),
                              ("v", perm.kv, perm.v), ("o", perm.q, perm.v[group_of])):
        blocks = S[role][torch.arange(len(units)), units]  # [n, hd, hd]: each slot against its matched head
        total += float(blocks.gather(2, dims[:, :, None]).sum())
    return total


def solve(group: Group, sims: dict[str, torch.Tensor]) -> tuple[Perm, float]:
    """The best permutation of one group given its similarity (``sims[""]`` or, for heads, one per role)."""
    if group.heads is None:
        perm = assign(sims[""])
        return perm, score(group, perm, sims)
    return solve_heads(group.heads, {r: head_blocks(group.heads, r, s) for r, s in sims.items()})


def score(group: Group, perm: Perm, sims: dict[str, torch.Tensor]) -> float:
    if group.heads is None:
        s = sims[""]
        return float(s[torch.arange(s.shape[0]), perm].sum())
    return heads_score(group.heads, perm, {r: head_blocks(group.heads, r, s) for r, s in sims.items()})


# -- weight matching ---------------------------------------------------------------------------------

def _rows(t: torch.Tensor, use: Use, units: int) -> torch.Tensor:
    """The axis ``use.dim`` of ``t`` first, as [units, everything else]."""
    return t.movedim(use.dim, 0).reshape(units, -1)


def weight_similarity(group: Group, ref: dict[str, torch.Tensor], model: dict[str, torch.Tensor],
                      by_tensor: dict, perms: dict[str, Perm], cache: dict) -> dict[str, torch.Tensor]:
    """S[role][i, j] = sum over the group's axes of <W_ref row i, P_others(W_model) row j>."""
    sims: dict[str, torch.Tensor] = {}
    for use in group.uses:
        others = [(g, u) for g, u in by_tensor[use.tensor] if u is not use]
        key = (group.name, use)
        if not others and key in cache:  # no other permutation touches this tensor: constant term
            contrib = cache[key]
        else:
            units = group.heads.head_dim * (group.heads.n_heads if use.role in ("q", "o") else group.heads.n_kv) \
                if group.heads else group.size
            a = _rows(ref[use.tensor], use, units)
            b = _rows(permute_tensor(use.tensor, model[use.tensor], others, perms), use, units)
            contrib = a @ b.T
            if not others:
                cache[key] = contrib
        sims[use.role] = sims[use.role] + contrib if use.role in sims else contrib
    return sims


def weight_matching(ref: dict[str, torch.Tensor], model: dict[str, torch.Tensor], spec: Spec, *, max_iter: int = 100,
                    seed: int = 0, progress: Callable[[str], None] | None = None) -> tuple[dict[str, Perm], dict]:
    """Permutations taking ``model`` towards ``ref`` (state dicts of one architecture)."""
    by_tensor = spec.by_tensor()
    names = set(by_tensor)
    ref32 = {k: ref[k].float() for k in names}
    model32 = {k: model[k].float() for k in names}
    perms = spec.identity()
    cache: dict = {}
    gen = torch.Generator().manual_seed(seed)
    start = _objective(spec, ref32, model32, by_tensor, perms, cache)
    it = 0
    for it in range(1, max_iter + 1):
        improved = 0
        for gi in torch.randperm(len(spec.groups), generator=gen).tolist():
            g = spec.groups[gi]
            sims = weight_similarity(g, ref32, model32, by_tensor, perms, cache)
            new, new_score = solve(g, sims)
            old_score = score(g, perms[g.name], sims)
            if new_score > old_score + 1e-6 * max(abs(old_score), 1e-12):
                perms[g.name] = new
                improved += 1
        if progress:
            progress(f"weight matching: iteration {it}, {improved} of {len(spec.groups)} groups improved")
        if not improved:
            break
    end = _objective(spec, ref32, model32, by_tensor, perms, cache)
    return perms, {"iterations": it, "objective_before": start, "objective_after": end}


def _objective(spec: Spec, ref: dict, model: dict, by_tensor: dict, perms: dict[str, Perm], cache: dict) -> float:
    """sum over permuted tensors of <W_ref, P(W_model)>."""
    return sum(float((ref[n] * permute_tensor(n, model[n], uses, perms)).sum()) for n, uses in by_tensor.items())


# -- activation matching -----------------------------------------------------------------------------

def activation_matching(spec: Spec, correlations: dict[tuple[str, str], torch.Tensor]) -> tuple[dict[str, Perm], dict]:
    """One assignment per group on the cross-correlation of its units (``correlations[(group, role)]``)."""
    perms: dict[str, Perm] = {}
    mean_corr = {}
    for g in spec.groups:
        sims = {role: c for (name, role), c in correlations.items() if name == g.name}
        if not sims:
            perms[g.name] = g.identity()
            continue
        perm, total = solve(g, sims)
        perms[g.name] = perm
        ident = score(g, g.identity(), sims)
        units = sum(s.shape[0] for s in sims.values())
        mean_corr[g.name] = {"identity": ident / units, "matched": total / units}
    return perms, {"mean_correlation": mean_corr}
