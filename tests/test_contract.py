"""Every registered method passes the common contract suite."""

import pytest

from alloykit.methods.registry import all_methods, get_method
from alloykit.testing.contract import iter_checks

CASES = [(name, check) for name in all_methods() for check, _ in iter_checks(get_method(name))]


@pytest.mark.parametrize("name,check", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_contract(name, check):
    dict(iter_checks(get_method(name)))[check]()


def test_registry_has_the_mergekit_family():
    names = set(all_methods())
    assert "linear" in names


def test_contract_catches_a_broken_method():
    """The suite must fail for a method that breaks its promises (in-place edits, wrong shape)."""
    import torch

    from alloykit.methods.registry import MethodSpec, NoParams
    from alloykit.testing.contract import check_fixed_point, check_shape_dtype_and_purity

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
    del torch
