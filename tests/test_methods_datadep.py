"""Fisher merging and RegMean against their closed forms, and their plan-time checks."""

from __future__ import annotations

import pytest
import torch

from alloykit.errors import PlanError, RecipeError
from alloykit.merge import merge_state_dicts
from alloykit.methods.registry import MergeInput, get_method
from alloykit.methods.weighted import FisherModelParams, FisherParams, RegMeanParams


def _x(name, tensors, params, stats, norms=None, model_params=None):
    k = tensors.shape[0]
    return MergeInput(name, tensors, None, params, model_params or [FisherModelParams()] * k, stats=stats, stats_norms=norms)


def _regression_case(k=3, out=4, inp=5, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(k, out, inp, generator=g, dtype=torch.float64)
    xs = [torch.randn(n + 7 * i, inp, generator=g, dtype=torch.float64) for i in range(k)]
    return ws, xs


def test_regmean_alpha_1_is_the_least_squares_solution_of_the_merged_regression():
    ws, xs = _regression_case()
    # min_W sum_i ||X_i W^T - X_i W_i^T||^2 / n_i (Grams averaged over tokens): stack X_i / sqrt(n_i)
    a = torch.cat([x / x.shape[0] ** 0.5 for x in xs])
    b = torch.cat([x @ w.T / x.shape[0] ** 0.5 for x, w in zip(xs, ws)])
    expected = torch.linalg.lstsq(a, b).solution.T
    grams = torch.stack([x.T @ x / x.shape[0] for x in xs]).float()
    out = get_method("regmean").fn(_x("l.weight", ws.float(), RegMeanParams(alpha=1.0), grams))
    assert torch.allclose(out.double(), expected, atol=1e-4)
    assert not torch.allclose(out, ws.float().mean(0), atol=1e-2)  # data-dependent: not the average


def test_regmean_alpha_below_1_shrinks_off_diagonal_entries_as_the_paper_says():
    ws, xs = _regression_case(k=2, seed=1)
    alpha = 0.5
    grams = [x.T @ x / x.shape[0] for x in xs]
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    expected = (torch.inverse(sum(shrunk)) @ sum(g @ w.T for g, w in zip(shrunk, ws))).T
    out = get_method("regmean").fn(_x("l.weight", ws.float(), RegMeanParams(alpha=alpha), torch.stack(grams).float()))
    assert torch.allclose(out.double(), expected, atol=1e-4)
    # alpha 0: diagonal Grams, a per-input-column weighted average of the models
    d = torch.stack([torch.diag(g) for g in grams])  # [K, in]
    expected0 = (ws * d[:, None, :]).sum(0) / d.sum(0)
    out0 = get_method("regmean").fn(_x("l.weight", ws.float(), RegMeanParams(alpha=0.0), torch.stack(grams).float()))
    assert torch.allclose(out0.double(), expected0, atol=1e-5)


def test_regmean_averages_tensors_without_grams_and_survives_a_singular_sum():
    t = torch.randn(3, 6)
    assert torch.allclose(get_method("regmean").fn(_x("l.bias", t, RegMeanParams(), None)), t.mean(0))
    ws = torch.randn(2, 3, 4)
    x = torch.randn(10, 4)
    x[:, 3] = 0  # no data reaches input 3: the summed Gram is singular
    grams = torch.stack([x.T @ x / 10] * 2)
    out = get_method("regmean").fn(_x("l.weight", ws, RegMeanParams(alpha=1.0), grams))
    assert torch.isfinite(out).all()
    # on the directions the data spans, the merged layer reproduces the average of the outputs;
    # the direction no data reached is merged by the plain average (not zeroed)
    assert torch.allclose(x @ out.T, x @ ws.mean(0).T, atol=1e-4)
    assert torch.allclose(out[:, 3], ws.mean(0)[:, 3], atol=1e-4)


def test_fisher_with_equal_fishers_is_the_weighted_average():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 5, 4, generator=g)
    f = torch.rand(5, 4, generator=g).expand(3, 5, 4).clone()
    mp = [FisherModelParams(weight=w) for w in (1.0, 2.0, 3.0)]
    out = get_method("fisher").fn(_x("w", t, FisherParams(normalize=False), f, model_params=mp))
    expected = (t[0] + 2 * t[1] + 3 * t[2]) / 6
    assert torch.allclose(out, expected, atol=1e-6)


def test_fisher_follows_the_model_whose_fisher_dominates():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 8, generator=g)
    f = torch.stack([torch.full((8,), 1e4), torch.full((8,), 1e-3)])
    out = get_method("fisher").fn(_x("w", t, FisherParams(normalize=False), f))
    assert torch.allclose(out, t[0], atol=1e-5 * t.abs().max())
    # entry by entry: each entry follows the model with the larger Fisher there
    f2 = torch.stack([torch.tensor([1e4, 1e-3] * 4), torch.tensor([1e-3, 1e4] * 4)])
    out2 = get_method("fisher").fn(_x("w", t, FisherParams(normalize=False), f2))
    expected = torch.where(torch.arange(8) % 2 == 0, t[0], t[1])
    assert torch.allclose(out2, expected, atol=1e-5)


def test_fisher_normalisation_matches_the_mergelm_formula():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 6, generator=g)
    f = torch.rand(2, 6, generator=g)
    norms = torch.tensor([3.0, 0.5])  # whole-model norms, as recorded at collection
    eps = 1e-6
    inv = 1 / (norms + eps)
    c = (inv / inv.sum()).view(2, 1)
    fe = f + eps
    expected = (c * fe * t).sum(0) / (c * fe).sum(0)
    out = get_method("fisher").fn(_x("w", t, FisherParams(normalize=True), f, norms))
    assert torch.allclose(out, expected, atol=1e-6)
    # a buffer without Fisher: the same coefficients, as a weighted average
    out_b = get_method("fisher").fn(_x("b", t, FisherParams(normalize=True), None, norms))
    assert torch.allclose(out_b, (c * t).sum(0) / c.sum(), atol=1e-6)


def _sds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"l.weight": torch.randn(3, 4, generator=g), "l.bias": torch.randn(3, generator=g)} for _ in range(2)]


def test_plan_refuses_missing_wrong_kind_and_wrong_shape_statistics():
    sds = _sds()
    with pytest.raises(RecipeError, match=r"model 'model0' names none: run 'alloykit stats collect model0 --out model0.stats --kind gram"):
        merge_state_dicts(sds, "regmean")
    with pytest.raises(RecipeError, match=r"hold fisher, not the gram statistics"):
        merge_state_dicts(sds, "regmean", stats=[{"fisher": {"l.weight": torch.ones(3, 4)}}] * 2)
    with pytest.raises(PlanError, match=r"gram of tensor 'l.weight' has shape \[3, 3\], expected \[4, 4\]"):
        merge_state_dicts(sds, "regmean", stats=[{"gram": {"l.weight": torch.eye(3)}}] * 2)
    with pytest.raises(PlanError, match=r"have no entry for tensor 'l.weight'"):
        merge_state_dicts(sds, "regmean", stats=[{"gram": {"l.weight": torch.eye(4)}}, {"gram": {"x": torch.eye(4)}}])


def test_engine_merge_reads_aligned_statistics():
    sds = _sds(5)
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(30, 4, generator=g) for _ in sds]
    stats = [{"gram": {"l.weight": x.T @ x / 30}} for x in xs]
    out = merge_state_dicts(sds, "regmean", parameters={"alpha": 1.0}, stats=stats)
    a = torch.cat(xs)
    b = torch.cat([x @ sd["l.weight"].T for x, sd in zip(xs, sds)])
    assert torch.allclose(out["l.weight"], torch.linalg.lstsq(a, b).solution.T, atol=1e-5)
    assert torch.allclose(out["l.bias"], (sds[0]["l.bias"] + sds[1]["l.bias"]) / 2)
    fisher = [{"fisher": {"l.weight": torch.full((3, 4), v), "l.bias": torch.ones(3)}} for v in (1.0, 3.0)]
    out = merge_state_dicts(sds, "fisher", parameters={"normalize": False}, stats=fisher)
    assert torch.allclose(out["l.weight"], (sds[0]["l.weight"] + 3 * sds[1]["l.weight"]) / 4, atol=1e-6)


def test_slices_recipes_are_refused_for_data_dependent_methods(tmp_path):
    from alloykit.plan.planner import make_plan
    from alloykit.testing.fixtures import LlamaShape, write_llama

    m = write_llama(tmp_path / "m", LlamaShape(vocab=16, hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1))
    recipe = {"merge_method": "regmean", "slices": [{"sources": [{"model": str(m), "layer_range": [0, 2]}]}]}
    with pytest.raises(RecipeError, match="write the recipe with 'models'"):
        make_plan(recipe)


def test_fisher_default_is_the_papers_formula_and_a_near_zero_fisher_does_not_take_over():
    # docs/data-dependent.md's case: model 1 fits its data near-perfectly, so its Fisher (and its
    # norm) is tiny; the paper's formula (the default) leaves the merge to model 0 where model 0's
    # Fisher is large, while MergeLM's normalisation (normalize: true) hands every entry to model 1
    t = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    f = torch.tensor([[1e-3, 1e-3, 1e-3], [4e-10, 4e-10, 4e-10]])
    norms = torch.tensor([0.89, 2.5e-4])
    eps = 1e-6
    out = get_method("fisher").fn(_x("w", t, FisherParams(), f, norms=norms))
    expected = (4e-10 + eps) / (1e-3 + eps + 4e-10 + eps)  # sum_i F~_i theta_i / sum_i F~_i by hand
    assert torch.allclose(out, torch.full((3,), expected), rtol=1e-5)
    assert out.max() < 0.01
    normalized = get_method("fisher").fn(_x("w", t, FisherParams(normalize=True), f, norms=norms))
    assert normalized.min() > 0.7  # the tiny-Fisher model wins: why normalisation is not the default
