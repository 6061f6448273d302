"""The subspace family (TSV-M, Iso-C, Iso-CTS, CART, MagMax, Consensus): golden values on constructed cases."""

from __future__ import annotations

import pytest
import torch

from alloykit.methods import get_method
from alloykit.methods.registry import MergeInput
from alloykit.methods.subspace import iso_cts_sizes

NAMES = ("tsv_m", "iso_c", "iso_cts", "cart", "magmax", "consensus_ta")
MATRIX_METHODS = ("tsv_m", "iso_c", "iso_cts", "cart")


def run(name, tensors, base, shared=None, tensor_name="layers.0.mlp.up_proj.weight"):
    spec = get_method(name)
    tensors = torch.as_tensor(tensors, dtype=torch.float32)
    base = None if base is None else torch.as_tensor(base, dtype=torch.float32)
    mps = [spec.model_params.model_validate({}) for _ in range(tensors.shape[0])]
    return spec.fn(MergeInput(tensor_name, tensors, base, spec.params.model_validate(shared or {}), mps))


def orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def rank1_tasks(m, n, strengths, seed=0):
    """Task matrices s_i u_i v_i^T with mutually orthonormal u's and v's."""
    u, v = orthonormal(m, len(strengths), seed), orthonormal(n, len(strengths), seed + 1)
    return torch.stack([s * torch.outer(u[:, i], v[:, i]) for i, s in enumerate(strengths)]), u, v


def base_of(shape, seed=9):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_all_registered_with_paper_and_formula():
    for name in NAMES:
        spec = get_method(name)
        assert "arXiv:" in spec.paper and "arXiv:" in spec.doc, name
        assert "merged" in spec.doc, name


# ----------------------------------------------------------------------------- Iso-C / Iso-CTS


def test_iso_c_orthogonal_tasks_give_flat_spectrum_at_mean():
    taus, u, v = rank1_tasks(6, 5, [3.0, 2.0, 0.5])
    base = base_of((6, 5))
    delta = run("iso_c", base + taus, base) - base
    sv = torch.linalg.svdvals(delta)
    mean = (3.0 + 2.0 + 0.5) / 5  # mean over all min(m, n) = 5 singular values of M
    torch.testing.assert_close(sv, torch.full((5,), mean), atol=1e-5, rtol=1e-5)
    for i in range(3):  # each task direction survives, at the isotropic strength
        torch.testing.assert_close(delta @ v[:, i], mean * u[:, i], atol=1e-5, rtol=1e-5)


def test_iso_c_alpha_scales():
    taus, _, _ = rank1_tasks(6, 5, [3.0, 2.0])
    base = base_of((6, 5))
    one = run("iso_c", base + taus, base) - base
    half = run("iso_c", base + taus, base, {"alpha": 0.5}) - base
    torch.testing.assert_close(half, one * 0.5, atol=1e-6, rtol=1e-5)


def test_iso_cts_sizes():
    assert iso_cts_sizes(6, 2, 0.8) == (4, 1)
    assert iso_cts_sizes(5, 2, 0.8) == (5, 0)  # round(0.5) == 0: all common
    assert iso_cts_sizes(7, 2, 0.0) == (1, 3)  # round(3.5) == 4 capped at 7 // 2
    assert iso_cts_sizes(100, 8, 0.8) == (84, 2)  # round(2.5) == 2 (Python rounds half to even)
    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)
    for p in range(1, 30):
        for k in range(1, 6):
            for f in (0.0, 0.3, 0.8, 1.0):
                c, s = iso_cts_sizes(p, k, f)
                assert c >= 0 and s >= 0 and c + k * s == p


def test_iso_cts_full_common_space_is_iso_c():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, generator=g)
    tensors = base + 0.1 * torch.randn(3, 8, 6, generator=g)
    a = run("iso_cts", tensors, base, {"common_space_fraction": 1.0})
    b = run("iso_c", tensors, base)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_iso_cts_spectrum_is_flat_and_covers_tasks():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(12, 10, generator=g)
    tensors = base + 0.1 * torch.randn(2, 12, 10, generator=g)
    delta = run("iso_cts", tensors, base, {"common_space_fraction": 0.6}) - base
    sv = torch.linalg.svdvals(delta)
    assert float(sv.max() - sv.min()) < 1e-4 * float(sv.max())


# ----------------------------------------------------------------------------- TSV-M


def test_tsv_m_rank1_orthogonal_tasks_return_base_plus_sum():
    taus, _, _ = rank1_tasks(3, 5, [3.0, 2.0, 0.5])  # p = 3, K = 3: one triplet per task
    base = base_of((3, 5))
    out = run("tsv_m", base + taus, base)
    torch.testing.assert_close(out, base + taus.sum(0), atol=1e-5, rtol=1e-5)


def test_tsv_m_fraction_keeps_the_rank1_parts():
    taus, _, _ = rank1_tasks(6, 8, [1.5, -0.7])
    noise = 1e-3 * torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(5))
    base = base_of((6, 8))
    # fraction 1/6 of min(m, n) = 6 keeps one triplet per task: the noise is dropped
    out = run("tsv_m", base + taus + noise, base, {"fraction": 1 / 6})
    torch.testing.assert_close(out, base + taus.sum(0), atol=5e-3, rtol=0)
    scaled = run("tsv_m", base + taus, base, {"fraction": 1 / 6, "alpha": 2.0})
    torch.testing.assert_close(scaled, base + 2 * taus.sum(0), atol=1e-5, rtol=1e-5)


def test_tsv_m_whitened_spectrum_is_the_kept_singular_values():
    """U_perp, V_perp orthonormal: the merged delta's singular values are S_cat."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(10, 8, generator=g)
    tensors = base + torch.randn(2, 10, 8, generator=g)
    delta = run("tsv_m", tensors, base) - base
    kept = torch.cat([torch.linalg.svdvals(t - base)[:4] for t in tensors])  # r = 8 // 2
    torch.testing.assert_close(torch.linalg.svdvals(delta), kept.sort(descending=True).values, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- CART


def test_cart_identical_fine_tunes_return_that_fine_tune():
    w = base_of((7, 5), seed=1)
    out = run("cart", w.expand(3, 7, 5).clone(), base_of((7, 5), seed=2), {"rank_fraction": 0.5, "lambda": 3.0})
    torch.testing.assert_close(out, w, atol=1e-6, rtol=1e-6)


def test_cart_golden_rank1():
    g = torch.Generator().manual_seed(8)
    thetas = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    bar = thetas.mean(0)
    expected = bar.clone()
    for t in thetas:
        u, s, vh = torch.linalg.svd(t - bar)
        expected += 0.7 * s[0] * torch.outer(u[:, 0], vh[0])
    out = run("cart", thetas.float(), None, {"rank_fraction": 0.2, "lambda": 0.7})  # floor(0.2 * 5) = 1
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)


def test_cart_full_rank_is_the_average():
    g = torch.Generator().manual_seed(9)
    thetas = torch.randn(3, 6, 5, generator=g)
    out = run("cart", thetas, None, {"rank_fraction": 1.0, "lambda": 2.0})
    torch.testing.assert_close(out, thetas.mean(0), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- MagMax, Consensus


def test_magmax_picks_largest_magnitude_with_sign():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    taus = torch.tensor([[1.0, -3.0, 2.0, 0.0], [-2.0, 1.0, -2.0, 0.5]])
    out = run("magmax", base + taus, base)
    torch.testing.assert_close(out, base + torch.tensor([-2.0, -3.0, 2.0, 0.5]))  # tie 2/-2: first model
    half = run("magmax", base + taus, base, {"lambda": 0.5})
    torch.testing.assert_close(half, base + 0.5 * torch.tensor([-2.0, -3.0, 2.0, 0.5]))


def test_consensus_keeps_entries_two_tasks_mark():
    base = torch.zeros(5)
    taus = torch.tensor(
        [
            [1.0, 1.0, 0.0, 5.0, 1.0],
            [1.0, 0.0, 0.0, -0.1, 1.0],
            [0.0, 0.0, 0.0, 0.1, 1.0],
        ]
    )
    # TALL masks (lambda_t 0.4): counts 2, 1, 3, 1, 3
    out = run("consensus_ta", base + taus, base)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0, 0.0, 0.0, 3.0]))
    out3 = run("consensus_ta", base + taus, base, {"k": 3, "alpha": 0.5})
    torch.testing.assert_close(out3, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.5]))


def test_consensus_check_refuses_k_above_model_count():
    spec = get_method("consensus_ta")
    params = spec.params.model_validate({"k": 3})
    assert "exceeds" in spec.check(params, [spec.model_params.model_validate({})] * 2)
    assert spec.check(params, [spec.model_params.model_validate({})] * 3) is None


# ----------------------------------------------------------------------------- fallback rule


@pytest.mark.parametrize("name", MATRIX_METHODS)
@pytest.mark.parametrize(
    "shape,tensor_name",
    [((7,), "layers.0.input_layernorm.weight"), ((6, 5), "model.embed_tokens.weight"),
     ((6, 5), "lm_head.weight"), ((2, 3, 4), "conv.weight")],
)
def test_fallback_is_base_plus_scaled_mean_task_vector(name, shape, tensor_name):
    g = torch.Generator().manual_seed(10)
    base = torch.randn(shape, generator=g)
    tensors = base + torch.randn((3, *shape), generator=g)
    scale_key = "lambda" if name == "cart" else "alpha"
    out = run(name, tensors, base, {scale_key: 0.5}, tensor_name=tensor_name)
    mean_tau = (tensors - base).mean(0)
    # CART's lambda scales centred low-rank parts that vanish here: scale 1 (the weight average)
    expected = base + (1.0 if name == "cart" else 0.5) * mean_tau
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
