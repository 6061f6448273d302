"""Every registered method passes the common contract suite."""

import pytest

from alloykit.methods.basic import WeightParams
from alloykit.methods.registry import MethodSpec, NoParams, all_methods, get_method
from alloykit.testing.contract import (CHECKS, check_fixed_point, check_method, check_plan_time_check,
                                       check_shape_dtype_and_purity, check_through_engine, engine_plan, iter_checks)

CASES = [(name, check) for name in all_methods() for check, _ in iter_checks(get_method(name))]


@pytest.mark.parametrize("name,check", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_contract(name, check):
    dict(iter_checks(get_method(name)))[check]()


def test_registry_has_the_mergekit_family():
    names = set(all_methods())
    assert "linear" in names


def test_contract_catches_a_broken_method():
    """The suite must fail for a method that breaks its promises (in-place edits, wrong shape)."""

    def inplace(x):
        """Adds one in place."""
        x.tensors.add_(1)
        return x.tensors[0]

    spec = MethodSpec("bad", inplace, NoParams, NoParams, "ignored")
    with pytest.raises(AssertionError, match="in place"):
        check_shape_dtype_and_purity(spec)

    def shrink(x):
        """Returns the mean, scaled wrongly."""
        return x.tensors.mean(0) * 2

    with pytest.raises(AssertionError, match="fixed point"):
        check_fixed_point(MethodSpec("bad2", shrink, NoParams, NoParams, "ignored"))


def median_trim(x):
    """Keeps each task vector's entries at or above its median magnitude over the whole tensor, then averages."""
    d = x.deltas()
    threshold = d.abs().flatten(1).median(dim=1).values.view(-1, *([1] * (d.dim() - 1)))
    return x.base + (d * (d.abs() >= threshold)).mean(0)


def test_a_method_that_lies_about_elementwise_fails_through_the_engine():
    """median_trim's threshold is a statistic of the whole tensor, so its rows are not independent:
    declared elementwise, it passes every direct check, and only the engine's row blocks expose it."""
    spec = MethodSpec("median_trim", median_trim, NoParams, NoParams, "required", elementwise=True)
    direct = [c for c in CHECKS if c not in (check_through_engine, check_plan_time_check)]
    for check in direct:
        check(spec)
    with pytest.raises(AssertionError, match="in row blocks.*differs from the direct call.*elementwise=True"):
        check_through_engine(spec)
    with pytest.raises(AssertionError, match="elementwise"):
        check_method(spec)
    # declared honestly, the same function passes the whole contract
    check_method(MethodSpec("median_trim", median_trim, NoParams, NoParams, "required"))


def test_a_method_that_divides_by_the_weight_sum_needs_a_plan_time_check():
    def weighted_mean(x):
        """Weighted mean, divided by the sum of the weights."""
        w = x.column("weight")
        return (w * x.tensors).sum(0) / w.sum()

    bare = MethodSpec("weighted_mean", weighted_mean, NoParams, WeightParams, "ignored")
    with pytest.raises(AssertionError, match="merge to NaN/Inf.*refuse them at plan time"):
        check_plan_time_check(bare)

    def nonzero_sum(params, models):
        return "the weights sum to 0" if sum(m.weight for m in models) == 0 else None

    checked = MethodSpec("weighted_mean", weighted_mean, NoParams, WeightParams, "ignored", check=nonzero_sum)
    check_plan_time_check(checked)

    # the planner hands the check each job's resolved parameters: one call per merged tensor
    seen = []
    spy = MethodSpec("weighted_mean", weighted_mean, NoParams, WeightParams, "ignored",
                     check=lambda p, m: seen.append(m) or nonzero_sum(p, m))
    plan, _ = engine_plan(spy)
    assert len(seen) == len(plan.jobs) and all(len(m) == 2 for m in seen)
    plan.close()
