"""arcee_fusion, ram and ramplus_tl: hand-computed cases, and mergekit 0.1.5 as the oracle.

The differential tests call mergekit's own ``merge_tensors`` in-process on the same
float32 tensors and require EQUAL tensors (torch.equal: the same operations in the same
order round alike). The one deliberate difference, arcee_fusion's quantiles on tensors of
more than 1M entries (mergekit samples 1M entries at random, alloykit is exact), is pinned
below. End-to-end runs of both tools on model folders are in test_recipes_compat.py.
"""

import pytest
import torch

from alloykit.methods.registry import MergeInput, get_method
from alloykit.methods.selective import fusion_threshold
from alloykit.testing.contract import check_method

mk_api = pytest.importorskip("mergekit.merge_methods.api")
mk_methods = pytest.importorskip("mergekit.merge_methods")

NAMES = ("arcee_fusion", "ram", "ramplus_tl")


def run(name, tensors, base, **params):
    spec = get_method(name)
    x = MergeInput("w", torch.stack(tensors), base, spec.params.model_validate(params),
                   [spec.model_params.model_validate({}) for _ in tensors])
    return spec.fn(x)


def mk(name, tensors, base, **params):
    return mk_api.merge_tensors([base, *tensors], name, parameters=params, base_index=0)


def sparse_family(shape, k, seed, keep=0.4):
    """A base and k sparse task vectors (RL-style: most entries untouched, overlaps by chance)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tunes = []
    for _ in range(k):
        delta = 0.1 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < keep)
        tunes.append(base + delta)
    return base, tunes


# ---- declarations ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_declaration_matches_mergekit(name):
    spec = get_method(name)
    theirs = mk_methods.get(name).spec
    ours = {key: info.default for key, (scope, info) in spec.param_fields().items()}
    assert ours == {p.name: p.default for p in theirs.parameters}
    assert all(scope == "shared" for scope, _ in spec.param_fields().values())
    assert spec.base == "required" and theirs.contract.base.value == "required"
    # mergekit counts the base among its inputs: arcee_fusion takes exactly base + 1
    assert (spec.min_models, spec.max_models) == ((1, 1) if name == "arcee_fusion" else (1, None))
    assert spec.reproduces.startswith(f"mergekit {name}") and spec.paper and not spec.randomized


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    check_method(get_method(name))


# ---- by hand --------------------------------------------------------------------------------


def test_ram_by_hand():
    base = torch.zeros(5)
    a = torch.tensor([0.4, 0.0, 0.2, 0.0, 1e-6])
    b = torch.tensor([0.2, 0.3, 0.0, 0.0, 0.0])
    c = torch.tensor([0.0, 0.0, 0.4, 0.0, 0.0])
    out = run("ram", [a, b, c], base)
    # entry 0: a and b changed it -> mean 0.3; entry 1: only b -> 0.3 whole; entry 2: a and c -> 0.3;
    # entry 3: nobody; entry 4: below epsilon -> unchanged
    torch.testing.assert_close(out, torch.tensor([0.3, 0.3, 0.3, 0.0, 0.0]))
    # plain averaging would give entry 1 a third of b's change; RAM keeps it whole
    assert out[1] == b[1]
    # a larger epsilon drops a's 0.2 from entry 2's vote: c's 0.4 alone
    out = run("ram", [a, b, c], base, epsilon=0.25)
    torch.testing.assert_close(out, torch.tensor([0.4, 0.3, 0.4, 0.0, 0.0]))


def test_ramplus_tl_by_hand():
    base = torch.zeros(6)
    a = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # 3 shared with b, 1 unique: rho = 3
    b = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # 3 shared, 2 unique: rho = 1.5
    out = run("ramplus_tl", [a, b], base, r=0.5, alpha=2.0)
    lam_a, lam_b = 1 + 0.5 * 2.0, 1 + 0.5 * 1.5  # rho capped at alpha = 2
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 1.0, lam_a, lam_b, lam_b]))
    # r = 0 is RAM
    assert torch.equal(run("ramplus_tl", [a, b], base, r=0.0), run("ram", [a, b], base))


def test_arcee_fusion_by_hand():
    # two rows; the fine-tune moves row 0 a lot in one entry, row 1 a little everywhere
    base = torch.zeros(2, 4)
    tuned = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.1, 0.1, -0.1, 0.0]])
    p = torch.softmax(tuned, -1) + 1e-8
    q = torch.softmax(base, -1) + 1e-8
    kl = (p * (p / q).log()).sum(-1, keepdim=True)
    importance = tuned.abs() * kl
    s = importance.flatten().sort().values  # n = 8: Q1 = s[1], Q2 = s[3], Q3 = s[5]
    threshold = s[3] + 1.5 * (s[5] - s[1])
    assert torch.equal(fusion_threshold(importance), threshold)
    want = tuned * (importance >= threshold)
    out = run("arcee_fusion", [tuned], base)
    torch.testing.assert_close(out, want)
    assert out[0, 0] == 3.0 and out[1].abs().sum() == 0  # only the outlier change survives


def test_fusion_threshold_is_the_lower_quantile():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75]), interpolation="lower")
    assert torch.equal(fusion_threshold(x), q[1] + 1.5 * (q[2] - q[0]))


# ---- mergekit as the oracle -----------------------------------------------------------------

SHAPES = [(13,), (8, 7), (3, 5, 6), (64, 48)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("params", [{}, {"epsilon": 0.05}], ids=["default", "eps0.05"])
def test_ram_equals_mergekit(shape, k, params):
    base, tunes = sparse_family(shape, k, seed=k * 10 + len(shape))
    assert torch.equal(run("ram", tunes, base, **params), mk("ram", tunes, base, **params))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("params", [{}, {"r": 0.7, "alpha": 1.5, "epsilon": 0.02}, {"r": -0.2}],
                         ids=["default", "strong", "negative_r"])
def test_ramplus_tl_equals_mergekit(shape, k, params):
    base, tunes = sparse_family(shape, k, seed=k * 10 + len(shape) + 1)
    assert torch.equal(run("ramplus_tl", tunes, base, **params), mk("ramplus_tl", tunes, base, **params))


def test_ramplus_tl_equals_mergekit_without_unique_entries():
    # every change shared: the denominator is clamped to epsilon and rho to alpha
    base, (a,) = sparse_family((9, 4), 1, seed=5, keep=1.0)
    tunes = [a, base + 2 * (a - base)]
    assert torch.equal(run("ramplus_tl", tunes, base), mk("ramplus_tl", tunes, base))


@pytest.mark.parametrize("shape", SHAPES + [(200, 300)], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_arcee_fusion_equals_mergekit(shape, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tuned = base + 0.2 * torch.randn(shape, generator=g) * torch.rand(shape, generator=g)
    ours = run("arcee_fusion", [tuned], base)
    assert torch.equal(ours, mk("arcee_fusion", [tuned], base))
    kept = (ours != base).float().mean()
    assert 0 < kept < 0.5  # the fence keeps a minority of entries, not none, not all


def test_arcee_fusion_on_large_tensors_differs_from_mergekit_only_by_its_sampling():
    # 1200 x 1000 > 1M entries: mergekit estimates the quantiles from 1M entries drawn at
    # random (torch's global generator), alloykit takes them exactly
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1200, 1000, generator=g)
    tuned = base + 0.2 * torch.randn(1200, 1000, generator=g)
    ours = run("arcee_fusion", [tuned], base)
    torch.manual_seed(0)
    theirs = mk("arcee_fusion", [tuned], base)
    differ = (ours != theirs).float().mean().item()
    assert differ < 2e-3, differ  # a sampling error of the threshold flips entries near it only
    assert torch.equal(run("arcee_fusion", [tuned], base), ours)  # alloykit: the same on every run
