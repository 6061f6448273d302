"""Geometric and basic methods: golden values by hand, and mergekit as the oracle."""

import math

import pytest
import torch

from alloykit.methods.registry import MergeInput, get_method

mk_api = pytest.importorskip("mergekit.merge_methods.api")

SHAPES = [(11,), (6, 5), (3, 4, 5)]


def run(name, tensors, base=None, params=None, model_params=None):
    spec = get_method(name)
    k = len(tensors)
    mp = [spec.model_params.model_validate(m) for m in (model_params or [{}] * k)]
    x = MergeInput("w", torch.stack(tensors), base, spec.params.model_validate(params or {}), mp)
    return spec.fn(x)


def case(shape, seed, k=2, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    return b, [b + scale * torch.randn(shape, generator=g) for _ in range(k)]


# ---- golden values -------------------------------------------------------------------------

def test_slerp_orthogonal_unit_vectors_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run("slerp", [b], base=a, params={"t": 0.5})
    torch.testing.assert_close(out, (a + b) / math.sqrt(2))
    torch.testing.assert_close(run("slerp", [b], base=a, params={"t": 0.0}), a)
    # colinear: plain lerp
    torch.testing.assert_close(run("slerp", [2 * a], base=a, params={"t": 0.25}), 1.25 * a)


def test_model_stock_angle_formula():
    # two task vectors at 60 degrees: cos = 0.5, t = 2*0.5/(1+0.5) = 2/3
    base = torch.zeros(2)
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    out = run("model_stock", [w1, w2], base=base)
    torch.testing.assert_close(out, (2 / 3) * (w1 + w2) / 2)


def test_linear_weights_and_normalize():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(run("linear", [a, b], model_params=[{"weight": 1}, {"weight": 3}]), torch.tensor([2.5, 5.0]))
    out = run("linear", [a, b], params={"normalize": False}, model_params=[{"weight": 1}, {"weight": 3}])
    torch.testing.assert_close(out, torch.tensor([10.0, 20.0]))


def test_nearswap_by_hand():
    base, other = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.05, 0.2, 1.0])
    # w = clamp(0.1 / |diff|, 0, 1) = [1, 0.5, 0.1]
    torch.testing.assert_close(run("nearswap", [other], base=base, params={"t": 0.1}), torch.tensor([0.05, 0.1, 0.1]))


def test_karcher_of_orthogonal_equal_norm_vectors_is_bisector():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(run("karcher", [a, b]), torch.tensor([math.sqrt(2), math.sqrt(2)]), atol=1e-5, rtol=1e-5)


def test_passthrough_scale():
    a = torch.tensor([1.0, -2.0])
    torch.testing.assert_close(run("passthrough", [a]), a)
    torch.testing.assert_close(run("passthrough", [a], model_params=[{"scale": 0.5}]), a * 0.5)


def test_zero_weight_sum_refused_at_plan_time():
    for name, params in (("linear", {}), ("nuslerp", {})):
        spec = get_method(name)
        mp = [spec.model_params.model_validate({"weight": w}) for w in (1.0, -1.0)]
        if spec.check is not None:
            assert spec.check(spec.params.model_validate(params), mp)


# ---- mergekit as the oracle ----------------------------------------------------------------

def mk(tensors, method, base=None, **params):
    inputs = ([base] if base is not None else []) + list(tensors)
    return mk_api.merge_tensors(inputs, method, parameters=params, base_index=0 if base is not None else None)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_mergekit(shape, t):
    b, (m,) = case(shape, 1, k=1)
    torch.testing.assert_close(run("slerp", [m], base=b, params={"t": t}), mk([m], "slerp", base=b, t=t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_mergekit(shape, opts, with_base):
    b, ms = case(shape, 2)
    w = [0.3, 0.9]
    ours = run("nuslerp", ms, base=b if with_base else None, params=opts, model_params=[{"weight": v} for v in w])
    theirs = mk(ms, "nuslerp", base=b if with_base else None, weight=w, **opts)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_mergekit(shape, k, with_base):
    b, ms = case(shape, 3, k=k)
    w = [0.2, 0.5, 1.1][:k]
    ours = run("multislerp", ms, base=b if with_base else None, model_params=[{"weight": v} for v in w])
    theirs = mk(ms, "multislerp", base=b if with_base else None, weight=w)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("with_base", [True, False])
def test_karcher_matches_mergekit(shape, k, with_base):
    b, ms = case(shape, 4, k=k, scale=1.0)
    ours = run("karcher", ([b] if with_base else []) + ms, params={"max_iter": 20})  # a base is one more input
    theirs = mk(ms, "karcher", base=b if with_base else None, max_iter=20)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(shape, k, filter_wise):
    b, ms = case(shape, 5, k=k)
    ours = run("model_stock", ms, base=b, params={"filter_wise": filter_wise})
    theirs = mk(ms, "model_stock", base=b, filter_wise=filter_wise)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_and_linear_match_mergekit(shape):
    b, ms = case(shape, 6, k=3)
    torch.testing.assert_close(run("nearswap", ms[:1], base=b, params={"t": 0.2}), mk(ms[:1], "nearswap", base=b, t=0.2), rtol=1e-5, atol=1e-6)
    w = [0.2, 0.5, 1.3]
    for normalize in (True, False):
        ours = run("linear", ms, params={"normalize": normalize}, model_params=[{"weight": v} for v in w])
        torch.testing.assert_close(ours, mk(ms, "linear", weight=w, normalize=normalize), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run("passthrough", ms[:1], model_params=[{"scale": 1.5}]), mk(ms[:1], "passthrough", scale=1.5))
