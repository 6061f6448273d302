"""``svd: randomized`` in the subspace merges (TSV-M, CART) against the exact SVD.

The randomized solver finds only the top singular triplets a method keeps; on fine-tune-like
task vectors (low rank with a decaying spectrum, plus noise, overlapping across tasks) the
merged tensor must stay within a relative 1e-3 of the exact one (measured: 5e-5 for TSV-M at
fraction 0.05, 7e-6 for CART at rank 8%; where the kept rank reaches into a flat noise floor
the kept noise directions differ and so does the merge, by 2-5% at 2048 x 2048: documented
in docs/benchmarks.md, not asserted here); where the sketch would exceed
a quarter of min(m, n) the exact SVD runs (the same bytes); the sketch is seeded by the tensor's
name (the same bytes on every run).
"""

from __future__ import annotations

import pytest
import torch

from alloykit.methods import get_method
from alloykit.methods.registry import MergeInput
from alloykit.methods.subspace import top_svd
from alloykit.roles import role_of

NAME = "model.layers.0.mlp.down_proj.weight"


def fine_tunes(m: int, n: int, k: int = 3, rank: int = 32, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(m * n)
    shared = torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g)
    taus = []
    for _ in range(k):
        low = (torch.randn(m, rank, generator=g) * torch.logspace(0, -1.5, rank)) @ torch.randn(rank, n, generator=g)
        low = low / low.norm() + 0.3 * shared / shared.norm()
        e = torch.randn(m, n, generator=g)
        taus.append((low + noise * e / e.norm()) * 0.05)
    base = torch.randn(m, n, generator=g) * 0.02
    return base, torch.stack(taus)


def merge(method: str, base: torch.Tensor, tau: torch.Tensor, **params) -> torch.Tensor:
    spec = get_method(method)
    x = MergeInput(NAME, base + tau, base, spec.params(**params), [spec.model_params()] * tau.shape[0], role=role_of(NAME))
    return spec.fn(x)


@pytest.mark.parametrize("method,params", [("tsv_m", {"fraction": 0.05}), ("cart", {}), ("cart", {"rank_fraction": 0.02})])
def test_randomized_svd_is_within_1e_3_of_the_exact_merge(method, params):
    base, tau = fine_tunes(576, 1536)
    exact = merge(method, base, tau, **params)
    assert get_method(method).params(**params).svd == "exact"  # the default: the papers' computation
    fast = merge(method, base, tau, svd="randomized", **params)
    rel = float((fast - exact).norm() / (exact - base).norm())
    assert rel < 1e-3, rel
    assert not torch.equal(fast, exact)  # the randomized solver did run
    assert torch.equal(fast, merge(method, base, tau, svd="randomized", **params))  # seeded by the tensor's name


def test_where_the_sketch_would_exceed_a_quarter_of_the_rank_the_exact_svd_runs():
    base, tau = fine_tunes(200, 300)
    # TSV-M's default keeps p / K = 66 per task, fraction 0.15 keeps 30: sketches of 132 and 60 > 50 = p / 4
    for params in ({}, {"fraction": 0.15}):
        assert torch.equal(merge("tsv_m", base, tau, svd="randomized", **params), merge("tsv_m", base, tau, **params))
    u, s, vh = top_svd(tau[0], 10, "randomized", NAME)  # a sketch of 20 <= 50: randomized
    ue, se, vhe = top_svd(tau[0], 10)
    assert u.shape == ue.shape == (200, 10) and vh.shape == vhe.shape == (10, 300)
    assert torch.allclose(s, se, rtol=1e-3) and not torch.equal(s, se)
