"""The sparse / task-vector family: golden values, mergekit and PEFT as oracles, DARE/DELLA statistics."""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import pytest
import torch
from pydantic import ValidationError

from alloykit.methods import get_method
from alloykit.methods.registry import MergeInput
from alloykit.ops import consensus, philox, sparsify

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
from mergekit import merge_methods as mk_methods  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod  # noqa: E402

peft_merge = pytest.importorskip("peft.utils.merge_utils")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def run(name, tensors, base, shared=None, per=None, seed=None):
    """Our method on a [K, ...] stack; per-model params given as {key: [v_1 .. v_K]}."""
    spec = get_method(name)
    tensors = torch.as_tensor(tensors, dtype=torch.float32)
    base = torch.as_tensor(base, dtype=torch.float32)
    per = per or {}
    k = tensors.shape[0]
    mps = [spec.model_params.model_validate({key: vals[i] for key, vals in per.items()}) for i in range(k)]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return spec.fn(MergeInput("w", tensors, base, spec.params.model_validate(shared or {}), mps, gen))


def run_mergekit(name, tensors, base, shared=None, per=None):
    """mergekit 0.1.5's merge_tensors on the same inputs (base passed first)."""
    method = mk_methods.get(name)
    params = dict(shared or {})
    cons = params.pop("consensus_method", None)
    if cons is not None:  # not a mergekit parameter: build the method with that consensus rule
        method = dataclasses.replace(method, consensus_method=ConsensusMethod(cons))
    params.update(per or {})
    return mergekit_api.merge_tensors([base, *tensors], method, parameters=params, base_index=0)


def check(name, shared=None, per=None):
    spec = get_method(name)
    params = spec.params.model_validate(shared or {})
    k = len(next(iter(per.values())))
    mps = [spec.model_params.model_validate({key: v[i] for key, v in per.items()}) for i in range(k)]
    return spec.check(params, mps)


def distinct_case(shape, k=3, seed=0):
    """Base and K inputs whose task vectors have all-distinct magnitudes (no threshold ties)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    scale = torch.tensor([0.5, 1.0, 2.0, 1.5][:k]).view(-1, *([1] * len(shape)))
    tensors = base + scale * torch.randn((k, *shape), generator=g)
    for d in (tensors - base).abs():
        assert d.flatten().unique().numel() == d.numel(), "regenerate: tied magnitudes"
    return tensors, base


T = torch.tensor
Z4 = torch.zeros(4)
# two task vectors used by several golden tests (base 0): magnitudes 1 tie three times in B
A = [1.0, -2.0, 3.0, 0.5]
B = [-1.0, 1.0, 1.0, -4.0]


# --------------------------------------------------------------------------------------
# selection primitives
# --------------------------------------------------------------------------------------


def test_top_magnitude_mask_equals_a_stable_descending_sort_under_heavy_ties():
    g = torch.Generator().manual_seed(1)
    for trial in range(60):
        n = int(torch.randint(1, 400, (1,), generator=g))
        t = torch.randint(-4, 5, (n,), generator=g).float() * 0.25  # many ties, zeros, +/- pairs
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[torch.argsort(t.abs(), descending=True, stable=True)[:k]] = True
        got = sparsify.top_magnitude_mask(t, k)
        assert torch.equal(got, ref), (trial, n, k)


def test_magnitude_window_mask_equals_a_stable_ascending_sort_under_heavy_ties():
    g = torch.Generator().manual_seed(2)
    for trial in range(60):
        n = int(torch.randint(1, 300, (1,), generator=g))
        t = torch.randint(-3, 4, (n,), generator=g).float()
        start = int(torch.randint(0, n + 1, (1,), generator=g))
        stop = int(torch.randint(start, n + 1, (1,), generator=g))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[torch.argsort(t.abs(), stable=True)[start:stop]] = True
        assert torch.equal(sparsify.magnitude_window_mask(t, start, stop), ref), (trial, n, start, stop)


def test_kth_smallest_matches_kthvalue_and_counts():
    g = torch.Generator().manual_seed(3)
    v = torch.cat([torch.rand(5000, generator=g), torch.zeros(300), torch.full((200,), 0.5), T([float("inf")])])
    for rank in (0, 299, 300, 1234, 5000, v.numel() - 1):
        value, less, equal = sparsify.kth_smallest(v, rank)
        assert value == torch.kthvalue(v, rank + 1).values
        assert less == int((v < value).sum()) and equal == int((v == value).sum())


def test_magnitude_selection_never_sorts(monkeypatch):
    """The trim must stay linear-time on 1.1B-parameter models: no argsort/sort/topk."""

    def forbidden(*a, **k):
        raise AssertionError("full sort used in magnitude selection")

    for fn in ("argsort", "sort", "topk"):
        monkeypatch.setattr(torch, fn, forbidden)
    t = torch.randn(10_000, generator=torch.Generator().manual_seed(4))
    assert int(sparsify.magnitude_mask(t, 0.3).sum()) == 3000
    assert int(sparsify.outlier_mask(t, 0.3, 0.05).sum()) == 3000
    assert int(sparsify.threshold_mask(t, 0.3).sum()) == 3001


def test_keep_counts_mergekit_vs_peft():
    t = T([0.1, -0.2, 0.3, -0.4])
    # density 0.2 of 4 entries: int(0.8) = 0; mergekit keeps at least one, PEFT none
    assert sparsify.magnitude_mask(t, 0.2).tolist() == [False, False, False, True]
    assert not sparsify.magnitude_mask(t, 0.2, at_least_one=False).any()
    assert not sparsify.magnitude_mask(t, 0.0).any()
    assert sparsify.magnitude_mask(t, 1.0).all()


def test_rescale_l1_restores_the_norm_and_skips_tiny_norms():
    t = T([1.0, -2.0, 3.0, -4.0])
    kept = t * T([0.0, 1.0, 0.0, 1.0])
    assert torch.allclose(sparsify.rescale_l1(t, kept), kept * (10 / 6))
    assert torch.equal(sparsify.rescale_l1(t * 1e-9, kept * 1e-9), kept * 1e-9)  # below eps: unscaled
    assert torch.equal(sparsify.rescale_l1(t, torch.zeros(4)), torch.zeros(4))


def test_della_keep_probability_golden():
    # |t| ranks 0..3 = [0, 3, 2, 1]; p = density - eps + 2 eps rank / 3
    p = sparsify.della_keep_probability(T([0.1, -0.4, 0.3, 0.2]), 0.5, 0.2)
    torch.testing.assert_close(p, T([0.3, 0.7, 0.3 + 0.4 * 2 / 3, 0.3 + 0.4 / 3]))
    # rows along dim 1 for a matrix; a one-entry row gets p = density
    p2 = sparsify.della_keep_probability(T([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), 0.5, 0.1)
    torch.testing.assert_close(p2, T([[0.4, 0.5, 0.6], [0.6, 0.5, 0.4]]))
    p3 = sparsify.della_keep_probability(torch.ones(3, 1), 0.4, 0.1)
    torch.testing.assert_close(p3, torch.full((3, 1), 0.4))


def test_consensus_parts_golden():
    d = T([[1.0, -2.0, 0.0, 3.0], [-3.0, 1.0, 0.0, -1.0], [-1.0, 1.0, 0.0, 0.0]])
    s = consensus.elect_sign(d, "sum")  # sums [-3, 0, 0, 2]: a zero total elects +
    assert s.tolist() == [-1.0, 1.0, 1.0, 1.0]
    assert consensus.elect_sign(d, "count").tolist() == [-1.0, 1.0, 1.0, 1.0]
    agree = consensus.agreement_mask(d, s)
    assert agree.tolist() == [
        [False, False, False, True],
        [True, True, False, False],
        [True, True, False, False],
    ]
    torch.testing.assert_close(consensus.disjoint_sum(d, agree), T([-4.0, 2.0, 0.0, 3.0]))
    torch.testing.assert_close(consensus.disjoint_mean(d, agree), T([-2.0, 1.0, 0.0, 3.0]))
    w = T([1.0, 2.0, 0.5]).view(3, 1)
    torch.testing.assert_close(consensus.agreeing_weight(agree, w), T([2.5, 2.5, 1.0, 1.0]))
    torch.testing.assert_close(consensus.disjoint_max(d, agree, s), T([-3.0, 1.0, 0.0, 3.0]))
    # FusionBench: a zero sign takes the tensor's majority sign
    assert consensus.fill_zero_signs(T([0.0, -1.0, -1.0, 1.0])).tolist() == [-1.0, -1.0, -1.0, 1.0]


# --------------------------------------------------------------------------------------
# golden values, by hand
# --------------------------------------------------------------------------------------


def test_task_arithmetic_golden():
    base = T([1.0, 2.0])
    tensors = T([[2.0, 2.0], [1.0, 5.0]])  # tau = [1, 0], [0, 3]
    out = run("task_arithmetic", tensors, base, {}, {"weight": [0.5, 2.0]})
    torch.testing.assert_close(out, T([1.5, 8.0]))
    out = run("task_arithmetic", tensors, base, {"normalize": True, "lambda": 0.5}, {"weight": [0.5, 2.0]})
    torch.testing.assert_close(out, base + 0.5 * T([0.5, 6.0]) / 2.5)


def test_ties_golden():
    # trim to 2 of 4: A -> [0,-2,3,0]; B ties three magnitudes 1: the lowest index (0) wins -> [-1,0,0,-4]
    # weights [1, 2]: d = [0,-2,3,0], [-2,0,0,-8]; signs of the sum [-,-,+,-]
    # mean over agreeing weights [2,1,1,2]: [-1,-2,3,-4]
    per = {"weight": [1.0, 2.0], "density": [0.5, 0.5]}
    out = run("ties", T([A, B]), Z4, {}, per)
    torch.testing.assert_close(out, T([-1.0, -2.0, 3.0, -4.0]))
    out = run("ties", T([A, B]) + 1, Z4 + 1, {"normalize": False, "lambda": 0.5}, per)
    torch.testing.assert_close(out, 1 + 0.5 * T([-2.0, -2.0, 3.0, -8.0]))


def test_ties_consensus_sum_vs_count_golden():
    tensors = T([[3.0], [-1.0], [-1.0]])
    per = {"weight": [1.0, 1.0, 1.0]}
    assert run("ties", tensors, T([0.0]), {"consensus_method": "sum"}, per).item() == pytest.approx(3.0)
    assert run("ties", tensors, T([0.0]), {"consensus_method": "count"}, per).item() == pytest.approx(-1.0)


def test_ties_rescale_golden():
    # one model, density 0.5: keeps [0,0,3,-4], L1 rescale by 10/7
    out = run("ties", T([[1.0, -2.0, 3.0, -4.0]]), Z4, {"rescale": True}, {"weight": [1.0], "density": [0.5]})
    torch.testing.assert_close(out, T([0.0, 0.0, 3.0, -4.0]) * 10 / 7)


def test_breadcrumbs_golden():
    t = T([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0]])
    # n=10, keep 5, drop int(0.1*10)=1 outlier: ascending ranks [4, 9) = magnitudes 5..9
    out = run("breadcrumbs", t, torch.zeros(10), {}, {"weight": [2.0], "density": [0.5], "gamma": [0.1]})
    torch.testing.assert_close(out, 2 * T([0, 0, 0, 0, 5.0, -6.0, 7.0, -8.0, 9.0, 0]))
    # int(gamma*n) == 0 drops no outlier and keeps the 5 largest (earlier mergekit zeroed everything)
    out = run("breadcrumbs", t, torch.zeros(10), {}, {"weight": [1.0], "density": [0.5], "gamma": [0.05]})
    torch.testing.assert_close(out, T([0, 0, 0, 0, 0, -6.0, 7.0, -8.0, 9.0, -10.0]))
    # density + gamma > 1: fewer outliers are dropped so that 9 entries stay
    out = run("breadcrumbs", t, torch.zeros(10), {}, {"weight": [1.0], "density": [0.9], "gamma": [0.3]})
    torch.testing.assert_close(out, T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, 0]))


def test_breadcrumbs_ties_golden():
    t = T([[1.0, -2.0, 3.0, -4.0, 5.0], [-1.0, 2.0, 3.5, 4.0, -9.0]])
    # n=5, density 0.6 keeps 3, gamma 0.2 drops 1: A keeps ranks [1,4) = |2|,|3|,|4|; B keeps |2|,|3.5|,|4|
    # d = [0,-2,3,-4,0], [0,2,3.5,4,0]; sum [0,0,6.5,0,0] -> + + + + +
    per = {"weight": [1.0, 1.0], "density": [0.6, 0.6], "gamma": [0.2, 0.2]}
    out = run("breadcrumbs_ties", t, torch.zeros(5), {}, per)
    torch.testing.assert_close(out, T([0.0, 2.0, 6.5, 4.0, 0.0]))
    out = run("breadcrumbs_ties", t, torch.zeros(5), {"normalize": True}, per)
    torch.testing.assert_close(out, T([0.0, 2.0, 3.25, 4.0, 0.0]))


def test_sce_golden():
    tensors = T([[2.0, 1.0], [1.0, -3.0]])
    # energies mean(t^2) = 2.5, 5 -> c = [1/3, 2/3]; signs [+, -]
    # entry 0: (2/3 + 2/3) / 1 = 4/3; entry 1: only B agrees -> -3
    torch.testing.assert_close(run("sce", tensors, torch.zeros(2)), T([4 / 3, -3.0]))
    # select_topk 0.5: variances [0.25, 4] keep entry 1 only
    torch.testing.assert_close(run("sce", tensors, torch.zeros(2), {"select_topk": 0.5}), T([0.0, -3.0]))


def test_sce_small_task_vectors_keep_energy_weights():
    """Deliberate difference: mergekit switches to uniform weights when sum mean(tau^2) < 1e-6."""
    tensors = T([[2.0, 1.0], [1.0, 1.0]]) * 1e-4  # both agree everywhere
    ours = run("sce", tensors, torch.zeros(2))
    # energies 2.5e-8, 1e-8 -> c = [5/7, 2/7]
    torch.testing.assert_close(ours, T([(2 * 5 + 1 * 2) / 7, 1.0]) * 1e-4)
    theirs = run_mergekit("sce", tensors, torch.zeros(2))
    torch.testing.assert_close(theirs, T([1.5, 1.0]) * 1e-4)  # mergekit: uniform 1/2


def test_ties_peft_golden():
    # PEFT elects on unweighted trimmed deltas and divides by the agreeing count
    per = {"weight": [1.0, 2.0], "density": [0.5, 0.5]}
    out = run("ties_peft", T([A, B]), Z4, {}, per)
    torch.testing.assert_close(out, T([-2.0, -2.0, 3.0, -8.0]))
    # unweighted vs weighted election: mergekit keeps +1 (5*1 - 3 > 0), PEFT keeps -3 (1 - 3 < 0)
    tensors, w = T([[1.0], [-3.0]]), {"weight": [5.0, 1.0]}
    assert run("ties", tensors, T([0.0]), {}, w).item() == pytest.approx(1.0)
    assert run("ties_peft", tensors, T([0.0]), {}, w).item() == pytest.approx(-3.0)


def test_magnitude_prune_golden():
    out = run("magnitude_prune", T([A, B]), Z4, {}, {"weight": [1.0, 0.5], "density": [0.5, 0.25]})
    torch.testing.assert_close(out, T([0.0, -2.0, 3.0, -2.0]))
    # PEFT's count: int(0.2 * 4) = 0 keeps nothing
    out = run("magnitude_prune", T([A]), Z4, {"lambda": 2.0}, {"weight": [1.0], "density": [0.2]})
    torch.testing.assert_close(out, Z4)


def test_ties_fusionbench_golden():
    # density 0.25, n=4: keep |t| >= 3rd smallest -> A: [0,-2,3,0]; B: threshold 1 keeps all (ties)
    # sum [-1,-1,4,-4] -> signs [-,-,+,-]; agreeing: A [F,T,T,F], B [T,F,T,T]
    per = {"density": [0.25, 0.25]}
    out = run("ties_fusionbench", T([A, B]), Z4, {}, per)  # sum, lambda 0.3
    torch.testing.assert_close(out, 0.3 * T([-1.0, -2.0, 4.0, -4.0]))
    out = run("ties_fusionbench", T([A, B]), Z4, {"aggregate": "mean", "lambda": 1.0}, per)
    torch.testing.assert_close(out, T([-1.0, -2.0, 2.0, -4.0]))
    out = run("ties_fusionbench", T([A, B]), Z4, {"aggregate": "max", "lambda": 1.0}, per)
    torch.testing.assert_close(out, T([-1.0, -2.0, 3.0, -4.0]))


def test_ties_fusionbench_zero_sign_takes_the_tensor_majority():
    tensors = T([[1.0, -2.0, -2.0], [-1.0, -1.0, -1.0]])  # entry 0 sums to 0; the tensor leans negative
    out = run("ties_fusionbench", tensors, torch.zeros(3), {"lambda": 1.0}, {"density": [1.0, 1.0]})
    torch.testing.assert_close(out, T([-1.0, -3.0, -3.0]))
    # mergekit / PEFT: a zero total elects +, keeping the +1
    out = run("ties_peft", tensors, torch.zeros(3), {}, {"weight": [1.0, 1.0]})
    torch.testing.assert_close(out, T([1.0, -1.5, -1.5]))


def test_dare_golden_given_the_mask():
    t = T([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0]])
    mask = philox.keep_mask(0.5, 7, 0, 0, 6)  # model 0 of the stream keyed by the tensor's seed
    assert 0 < int(mask.sum()) < 6
    kept = t[0] * mask
    per = {"weight": [1.0], "density": [0.5]}
    l1 = run("dare_linear", t, torch.zeros(6), {}, per, seed=7)
    torch.testing.assert_close(l1, kept * 21 / kept.abs().sum())
    paper = run("dare_linear", t, torch.zeros(6), {"rescale_mode": "inverse_probability"}, per, seed=7)
    torch.testing.assert_close(paper, kept * 2)
    raw = run("dare_linear", t, torch.zeros(6), {"rescale": False}, per, seed=7)
    torch.testing.assert_close(raw, kept)


def test_della_golden_given_the_mask():
    t = T([[0.1, -0.4, 0.3, 0.2]])
    p = T([0.3, 0.7, 0.3 + 0.4 * 2 / 3, 0.3 + 0.4 / 3])
    mask = philox.keep_mask(p, 3, 0, 0, 4)
    per = {"weight": [1.0], "density": [0.5], "epsilon": [0.2]}
    out = run("della_linear", t, Z4, {"rescale_mode": "inverse_probability"}, per, seed=3)
    torch.testing.assert_close(out, torch.where(mask, t[0] / p, 0.0))


def test_int8_mask_is_accepted_and_changes_nothing():
    tensors, base = distinct_case((5, 6))
    per = {"weight": [0.3, 0.5, 0.2], "density": [0.5, 0.6, 0.4]}
    a = run("ties", tensors, base, {"int8_mask": True}, per)
    assert torch.equal(a, run("ties", tensors, base, {}, per))


# --------------------------------------------------------------------------------------
# differential: mergekit 0.1.5 as the oracle
# --------------------------------------------------------------------------------------

SHAPES = [(7,), (16,), (33, 17), (4, 5, 6)]
PER = {"weight": [0.7, -0.3, 1.4], "density": [0.3, 0.55, 0.9]}


def _combos(name):
    consensus_names = {"ties", "breadcrumbs_ties"}
    for normalize, lam, rescale in itertools.product([True, False], [1.0, 0.6], [False, True]):
        shared = {"normalize": normalize, "lambda": lam}
        if name != "task_arithmetic":
            shared["rescale"] = rescale
        elif rescale:
            continue
        for cons in ("sum", "count") if name in consensus_names else (None,):
            yield dict(shared, **({"consensus_method": cons} if cons else {}))


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_mergekit_deterministic(name, shape):
    tensors, base = distinct_case(shape, seed=len(shape) * 100 + shape[0])
    per = {"weight": PER["weight"]} if name == "task_arithmetic" else dict(PER)
    if name.startswith("breadcrumbs"):
        per["gamma"] = [0.05, 0.2, 0.0]
    for shared in _combos(name):
        ours = run(name, tensors, base, shared, per)
        theirs = run_mergekit(name, tensors, base, shared, per)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=f"{name} {shared}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_mergekit(shape, select_topk):
    tensors, base = distinct_case(shape, seed=7)
    ours = run("sce", tensors, base, {"select_topk": select_topk})
    theirs = run_mergekit("sce", tensors, base, {"select_topk": select_topk})
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_ties_matches_mergekit_on_small_tensors_with_ties():
    """Up to 16 entries mergekit's CPU sort is stable: tied magnitudes must be kept alike."""
    g = torch.Generator().manual_seed(11)
    for trial in range(40):
        n = int(torch.randint(2, 17, (1,), generator=g))
        base = torch.zeros(n)
        tensors = torch.randint(-3, 4, (3, n), generator=g).float()
        per = {"weight": [1.0, 0.5, 2.0], "density": [0.3, 0.5, 0.7]}
        for name in ("ties", "breadcrumbs_ties"):
            p = dict(per, gamma=[0.1, 0.2, 0.3]) if name.startswith("breadcrumbs") else per
            ours, theirs = run(name, tensors, base, {}, p), run_mergekit(name, tensors, base, {}, p)
            torch.testing.assert_close(ours, theirs, msg=f"{name} trial {trial}")


def test_large_tensor_ties_at_the_cut_kept_as_mergekit_keeps_them():
    """Beyond 16 entries mergekit keeps whichever tied entries torch's sort puts first: the
    "sort" tie rule keeps the same ones; the "flat" rule (lower index first) differs only
    among the tied entries."""
    from mergekit.sparsify import magnitude, magnitude_outliers

    d = torch.randint(-20, 21, (4000,), generator=torch.Generator().manual_seed(5)).float()
    theirs = magnitude(d, 0.3)
    assert torch.equal(sparsify.magnitude_trim_(d.clone(), 0.3, ties="sort"), theirs)
    flat = d * sparsify.magnitude_mask(d, 0.3)
    assert int((flat != 0).sum()) == int((theirs != 0).sum()) == 1200
    differ = flat != theirs
    assert differ.any() and (d.abs()[differ] == flat.abs()[flat != 0].min()).all()
    for density, gamma in ((0.5, 0.1), (0.9, 0.01), (0.3, 0.5)):
        theirs = magnitude_outliers(d, density, gamma=gamma)
        assert torch.equal(sparsify.outlier_trim_(d.clone(), density, gamma, ties="sort"), theirs)


def stream_bernoulli(monkeypatch, seed: int) -> None:
    """Make ``torch.bernoulli`` draw from alloykit's stream: call i is model i's task vector
    (mergekit and PEFT draw one mask per model, in order), entry e of it kept when U48(e) <
    ceil(p * 2^48). The oracles then compute with alloykit's masks."""
    calls = itertools.count()

    def bernoulli(p, *args, **kwargs):
        keep = philox.keep_mask(p.float(), seed, next(calls), 0, p.numel())
        return keep.view(p.shape).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
@pytest.mark.parametrize("shape", [(50,), (33, 17), (3, 4, 5)], ids=str)
def test_randomized_match_mergekit_given_the_same_draws(name, shape, monkeypatch):
    """mergekit's DARE/DELLA with its bernoulli drawing from our stream gives our tensors:
    the rest of the pipeline (probabilities, rescale, election, normalize) is mergekit's.
    Densities are binary fractions, so mergekit's float32 probabilities are ours."""
    tensors, base = distinct_case(shape, seed=3)
    per = {"weight": [0.7, 0.3, 1.4], "density": [0.25, 0.5, 0.625]}
    if name.startswith("della"):
        per["epsilon"] = [0.1, 0.2, 0.05]
    for shared in ({}, {"rescale": False}, {"normalize": True, "lambda": 0.7}):
        ours = run(name, tensors, base, shared, per, seed=1234)
        with monkeypatch.context() as mp:
            stream_bernoulli(mp, 1234)
            theirs = run_mergekit(name, tensors, base, shared, per)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=f"{name} {shared}")


# --------------------------------------------------------------------------------------
# differential: PEFT as the oracle
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_ties_peft_and_magnitude_prune_match_peft(shape, density):
    tensors, base = distinct_case(shape, seed=21)
    w = [0.7, -0.3, 1.4]
    per = {"weight": w, "density": [density] * 3}
    deltas = list(tensors - base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        for ours_name, peft_name in (("sum", "total"), ("count", "frequency")):
            ours = run("ties_peft", tensors, base, {"consensus_method": ours_name}, per)
            theirs = base + peft_merge.ties(deltas, T(w), density, peft_name)
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        ours = run("magnitude_prune", tensors, base, {}, per)
        theirs = base + peft_merge.magnitude_prune(deltas, T(w), density)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_dare_linear_inverse_probability_matches_peft_given_the_same_draws(monkeypatch):
    tensors, base = distinct_case((20, 9), seed=4)
    w = [0.7, 0.3, 1.4]
    ours = run("dare_linear", tensors, base, {"rescale_mode": "inverse_probability"},
               {"weight": w, "density": [0.375] * 3}, seed=99)
    stream_bernoulli(monkeypatch, 99)
    theirs = base + peft_merge.dare_linear(list(tensors - base), T(w), 0.375)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# DARE / DELLA statistics and determinism
# --------------------------------------------------------------------------------------


def test_dare_kept_fraction_and_l1_rescale():
    n = 20_000
    t = torch.randn(1, n, generator=torch.Generator().manual_seed(0))
    out = run("dare_linear", t, torch.zeros(n), {}, {"weight": [1.0], "density": [0.3]}, seed=5)
    kept = out != 0
    frac = kept.float().mean().item()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5  # binomial, 4 sigma
    # one scalar per tensor: kept entries all scaled alike, L1 norm restored
    ratio = out[kept] / t[0][kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    assert out.abs().sum().item() == pytest.approx(t.abs().sum().item(), rel=1e-5)


def test_dare_inverse_probability_is_unbiased():
    t = T([[1.0, -2.0, 0.5, 4.0]])
    draws = torch.stack([
        run("dare_linear", t, Z4, {"rescale_mode": "inverse_probability"}, {"weight": [1.0], "density": [0.25]}, seed=s)
        for s in range(4000)
    ])
    assert set(torch.unique(draws[:, 0]).tolist()) <= {0.0, 4.0}  # each kept entry times 1/density
    # mean of 4000 draws: std of the mean = |t| sqrt((1-p)/p / 4000) ~ 0.027 |t|
    torch.testing.assert_close(draws.mean(0), t[0], rtol=0.12, atol=0.0)


def test_della_keep_frequency_follows_magnitude_rank():
    n = 21
    t = torch.arange(1, n + 1).float().unsqueeze(0)  # rank = index
    per = {"weight": [1.0], "density": [0.5], "epsilon": [0.3]}
    kept = torch.stack([run("della_linear", t, torch.zeros(n), {}, per, seed=s) != 0 for s in range(3000)]).float()
    freq = kept.mean(0)
    expected = 0.2 + 0.6 * torch.arange(n) / (n - 1)
    assert (freq - expected).abs().max() < 0.04  # binomial sd <= 0.0092
    assert freq[-3:].mean() > freq[:3].mean() + 0.4


def test_same_seed_same_tensor_other_seed_other_tensor_and_global_rng_untouched():
    tensors, base = distinct_case((40, 30), seed=8)
    for name, per in (
        ("dare_ties", {"weight": [1.0, 1.0, 1.0], "density": [0.5] * 3}),
        ("della", {"weight": [1.0, 1.0, 1.0], "density": [0.5] * 3, "epsilon": [0.1] * 3}),
    ):
        state = torch.get_rng_state()
        a = run(name, tensors, base, {}, per, seed=42)
        assert torch.equal(torch.get_rng_state(), state), f"{name} drew from the global generator"
        assert torch.equal(a, run(name, tensors, base, {}, per, seed=42))
        assert not torch.equal(a, run(name, tensors, base, {}, per, seed=43))


# --------------------------------------------------------------------------------------
# declarations and plan-time checks
# --------------------------------------------------------------------------------------


def test_defaults_follow_mergekit():
    names = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
             "della", "della_linear")
    defaults = {name: get_method(name).params.model_validate({}) for name in names}
    assert {n for n, p in defaults.items() if p.normalize} == {"ties", "della"}
    assert {n for n, p in defaults.items() if getattr(p, "rescale", False)} == {
        "dare_linear", "dare_ties", "della", "della_linear"}
    assert all(p.lambda_ == 1.0 for p in defaults.values())
    assert get_method("della").model_params.model_validate({"weight": 1}).epsilon == 0.15
    assert get_method("breadcrumbs").model_params.model_validate({"weight": 1}).gamma == 0.01
    assert get_method("ties").model_params.model_validate({"weight": 1}).density == 1.0
    for name in ("dare_linear", "dare_ties", "della", "della_linear"):
        assert get_method(name).randomized
        assert get_method(name).params.model_validate({}).rescale_mode == "l1"
    assert get_method("ties").params.model_validate({"lambda": 0.5}).lambda_ == 0.5


def test_declarations_refuse_bad_values():
    with pytest.raises(ValidationError):
        get_method("ties").model_params.model_validate({"weight": 1, "density": 1.5})
    with pytest.raises(ValidationError):
        get_method("ties").model_params.model_validate({"density": 0.5})  # weight is required
    with pytest.raises(ValidationError):
        get_method("ties").params.model_validate({"consensus_method": "median"})
    with pytest.raises(ValidationError):
        get_method("dare_linear").params.model_validate({"rescale_mode": "l2"})
    with pytest.raises(ValidationError):
        get_method("ties").model_params.model_validate({"weight": float("nan")})


def test_check_zero_weight_sum_with_normalize():
    per = {"weight": [1.0, -1.0]}
    assert "sum to 0" in check("task_arithmetic", {"normalize": True}, per)
    assert check("task_arithmetic", {"normalize": False}, per) is None
    assert check("task_arithmetic", {"normalize": True}, {"weight": [1.0, -0.5]}) is None
    assert "sum to 0" in check("dare_linear", {"normalize": True}, per)
    assert "sum to 0" in check("breadcrumbs", {"normalize": True}, per)
    # TIES divides by the agreeing weights per entry: only all-zero weights are hopeless
    assert check("ties", {}, per) is None
    assert "every weight is 0" in check("ties", {}, {"weight": [0.0, 0.0]})
    assert check("ties", {"normalize": False}, {"weight": [0.0, 0.0]}) is None


def test_check_della_epsilon_range():
    ok = {"weight": [1.0, 1.0], "density": [0.5, 1.0], "epsilon": [0.5, 0.5]}  # p spans [0, 1]; density 1 skips
    assert check("della", {}, ok) is None
    bad = {"weight": [1.0, 1.0], "density": [0.5, 0.1], "epsilon": [0.15, 0.15]}
    msg = check("della", {}, bad)
    assert "model 2 of 2" in msg and "epsilon <= 0.1" in msg
    assert "model 2 of 2" in check("della_linear", {}, bad)
    assert "sum to 0" in check("della_linear", {"normalize": True}, {"weight": [1.0, -1.0], "density": [1.0, 1.0]})


def test_della_single_entry_rows_do_not_fail():
    tensors, base = distinct_case((6, 1), seed=2)
    out = run("della", tensors, base, {}, {"weight": [1.0] * 3, "density": [0.5] * 3}, seed=0)
    assert torch.isfinite(out).all()


def test_recipe_through_the_planner_matches_mergekit():
    """End to end: 'lambda' and a top-level per-model 'density' resolve as in mergekit."""
    from mergekit.merge_methods.api import merge_state_dicts as mergekit_merge_state_dicts

    from alloykit.merge import merge_state_dicts

    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(8, 6, generator=g), "b.bias": torch.randn(6, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    ours = merge_state_dicts(
        models, "ties", base=base, parameters={"lambda": 0.8, "density": 0.5},
        model_parameters=[{"weight": 0.5}, {"weight": 0.3, "density": 0.7}, {"weight": 0.2}],
    )
    theirs = mergekit_merge_state_dicts(
        {"base": base, **dict(enumerate(models))}, "ties", base="base",
        parameters={"lambda": 0.8, "weight": {0: 0.5, 1: 0.3, 2: 0.2}, "density": {0: 0.5, 1: 0.7, 2: 0.5}},
    )
    for name in base:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6)
