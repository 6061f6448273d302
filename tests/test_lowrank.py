"""The randomized truncated SVD against the exact one: error within 0.1% of the Eckart-Young least error."""

import pytest
import torch

from alloykit.ops.lowrank import low_rank, truncated_svd

M, N = 1536, 576
BOUND = 1e-3  # stated in alloykit/ops/lowrank.py


def with_spectrum(s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A M x N float64 matrix whose singular values are exactly ``s`` (sorted descending)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(M, N, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64)).Q
    return (u * s) @ v.T


i = torch.arange(1, N + 1, dtype=torch.float64)
SPECTRA = {
    "flat": 1 + 0.01 * torch.linspace(1, 0, N, dtype=torch.float64),
    "i^-0.25": i ** -0.25,
    "i^-0.5": i ** -0.5,
    "i^-1": i ** -1.0,
    "rank 8 + noise": torch.where(i <= 8, 10.0, 0.05).double(),
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_error_is_within_the_stated_bound_of_eckart_young(spectrum):
    s = SPECTRA[spectrum]
    d = with_spectrum(s)
    for rank in (16, 64, 128):
        optimum = s[rank:].square().sum().sqrt()  # Eckart-Young: the least error of any rank-r matrix
        b, a = low_rank(d.float(), rank, generator=torch.Generator().manual_seed(1))
        assert a.shape == (rank, N) and b.shape == (M, rank)
        err = torch.linalg.vector_norm(d - b.double() @ a.double())
        assert float(err / optimum) - 1 < BOUND, f"{spectrum} rank {rank}: error {float(err / optimum) - 1:.2e} above the optimum"


def test_small_matrices_and_ranks_past_the_size():
    """Randomized while the sketch is narrower than the matrix, exact once it is not."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(40, 30, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(d)
    for r in (1, 5, 12):
        b, a = low_rank(d, r, generator=torch.Generator().manual_seed(0))
        err = torch.linalg.vector_norm(d - b @ a)
        assert float(err / s[r:].square().sum().sqrt()) - 1 < BOUND
    for r in (20, 30, 40):  # r + oversampling >= 30 columns: the exact SVD
        b, a = low_rank(d, r)
        assert a.shape[0] == min(r, 30)
        torch.testing.assert_close(torch.linalg.vector_norm(d - b @ a), s[min(r, 30):].square().sum().sqrt(),
                                   rtol=1e-10, atol=1e-10)


def test_exactly_low_rank_is_recovered_and_seeded_draws_repeat():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3000, 3, generator=g) @ torch.randn(3, 2000, generator=g)
    b, a = low_rank(big, 4, generator=torch.Generator().manual_seed(7))
    assert torch.linalg.vector_norm(big - b @ a) / torch.linalg.vector_norm(big) < 1e-5
    again = low_rank(big, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(b, again[0]) and torch.equal(a, again[1])


def test_scale_split_changes_the_factors_not_the_product():
    d = with_spectrum(SPECTRA["i^-0.5"]).float()
    u, s, vh = truncated_svd(d, 8, generator=torch.Generator().manual_seed(0))
    b1, a1 = low_rank(d, 8, generator=torch.Generator().manual_seed(0))
    b2, a2 = low_rank(d, 8, generator=torch.Generator().manual_seed(0), distribute_scale=False)
    torch.testing.assert_close(b1 @ a1, b2 @ a2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b2, u)  # B = U, A = S V^T (mergekit's --no-distribute-scale)
    torch.testing.assert_close(torch.linalg.vector_norm(b1, dim=0), s.sqrt())  # B = U S^1/2
