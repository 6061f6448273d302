"""alloykit.ops.finite.all_finite against torch.isfinite, with the kernel and without it."""

from __future__ import annotations

import pytest
import torch

from alloykit.ops import finite, jit


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(finite, "available", lambda: False)
    elif not jit.available():
        pytest.skip("numba is not installed (pip install 'alloykit[fast]'): only the torch path is tested")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_is_isfinite_all(path, dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(10_001, generator=g).to(dtype)
    assert finite.all_finite(t)
    big = torch.full((4099,), torch.finfo(dtype).max, dtype=dtype)  # finite, but its sum overflows
    assert finite.all_finite(big)
    tiny = torch.full((33,), torch.finfo(dtype).tiny, dtype=dtype) / 4  # subnormals are finite
    assert finite.all_finite(tiny)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 5_000, 10_000):
            u = t.clone()
            u[where] = bad
            assert finite.all_finite(u) is bool(torch.isfinite(u).all()) is False, (bad, where)


def test_non_contiguous_and_empty(path):
    t = torch.randn(64, 64)
    t[3, 7] = float("nan")
    assert finite.all_finite(t.t()) is False  # a transposed view: the torch path
    assert finite.all_finite(t[:, 8:]) is True
    assert finite.all_finite(torch.empty(0)) is True
