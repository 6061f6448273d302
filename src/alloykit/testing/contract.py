"""The method contract: checks every registered merge method must pass.

Like scikit-learn's ``check_estimator``, the same checks run on every method, so a
new method is held to the same promises as the old ones. Use from a test::

    @pytest.mark.parametrize("name", all_methods())
    def test_contract(name):
        check_method(get_method(name))

or on your own method: ``check_method(spec)`` raises AssertionError naming the
broken promise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from pydantic import ValidationError

from alloykit.methods.registry import MergeInput, MethodSpec

SHAPES = ((7,), (6, 5), (2, 3, 4))


def _required_values(model, number: float) -> dict:
    """Defaults everywhere, and ``number`` for each required numeric parameter."""
    values = {}
    for fname, info in model.model_fields.items():
        if info.is_required():
            values[info.alias or fname] = {int: 1, bool: False}.get(info.annotation, number)
    return values


def example_model_params(spec: MethodSpec, k: int) -> list:
    """Per-model parameters with defaults, required numbers set to 1 (e.g. weight)."""
    return [spec.model_params.model_validate(_required_values(spec.model_params, 1.0)) for _ in range(k)]


def example_params(spec: MethodSpec):
    """Shared parameters with defaults, required numbers set to 0.5 (e.g. slerp's t)."""
    return spec.params.model_validate(_required_values(spec.params, 0.5))


def num_models(spec: MethodSpec) -> int:
    if spec.max_models is not None:
        return min(spec.max_models, max(spec.min_models, 2))
    return max(spec.min_models, 2)


def example_stats(spec: MethodSpec, tensors: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Random statistics for a method with ``needs_stats``: positive Fishers of the tensors'
    shape (and their norms), or for a 2-D weight [K, out, in] symmetric positive definite
    Grams [K, in, in] (other tensors have none, as after ``alloykit stats collect``)."""
    if spec.needs_stats is None:
        return None, None
    g = torch.Generator().manual_seed(1000 + seed)
    k = tensors.shape[0]
    if spec.needs_stats == "fisher":
        f = torch.rand(tensors.shape, generator=g) + 0.01
        return f, f.flatten(1).norm(dim=1)
    if tensors.dim() != 3:
        return None, None
    n = tensors.shape[-1]
    x = torch.randn(k, 4 * n, n, generator=g)
    return x.transpose(1, 2) @ x / (4 * n), None


def make_input(spec: MethodSpec, tensors: torch.Tensor, base: torch.Tensor | None, seed: int = 0, name: str = "w") -> MergeInput:
    gen = torch.Generator().manual_seed(seed) if spec.randomized else None
    stats, norms = example_stats(spec, tensors, seed)
    return MergeInput(name, tensors, base, example_params(spec), example_model_params(spec, tensors.shape[0]), gen,
                      stats=stats, stats_norms=norms)


def _random_case(spec: MethodSpec, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    k = num_models(spec)
    base = torch.randn(shape, generator=g)
    tensors = base + 0.1 * torch.randn((k, *shape), generator=g)
    return tensors, (base if spec.base != "ignored" else None)


def check_shape_dtype_and_purity(spec: MethodSpec) -> None:
    """Output has the tensor's shape and float32 dtype, is finite, and inputs are untouched."""
    for i, shape in enumerate(SHAPES):
        tensors, base = _random_case(spec, shape, i)
        t0, b0 = tensors.clone(), None if base is None else base.clone()
        out = spec.fn(make_input(spec, tensors, base))
        assert tuple(out.shape) == shape, f"{spec.name}: shape {tuple(out.shape)} != {shape}"
        assert out.dtype == torch.float32, f"{spec.name}: dtype {out.dtype} != float32"
        assert torch.isfinite(out).all(), f"{spec.name}: non-finite output for finite inputs"
        assert torch.equal(tensors, t0), f"{spec.name}: modified its input stack in place"
        if base is not None:
            assert torch.equal(base, b0), f"{spec.name}: modified the base tensor in place"


def check_fixed_point(spec: MethodSpec) -> None:
    """K copies of one tensor (equal to the base, if any) merge to that tensor."""
    if not spec.fixed_point:
        return
    for i, shape in enumerate(SHAPES):
        g = torch.Generator().manual_seed(100 + i)
        w = torch.randn(shape, generator=g)
        tensors = w.expand(num_models(spec), *shape).clone()
        base = w.clone() if spec.base != "ignored" else None
        out = spec.fn(make_input(spec, tensors, base))
        assert torch.allclose(out, w, atol=1e-5, rtol=1e-5), (
            f"{spec.name}: identical inputs are not a fixed point (max diff {(out - w).abs().max():.3g})"
        )


def check_zero_task_vectors(spec: MethodSpec) -> None:
    """With a base, inputs equal to the base (zero task vectors) give the base back."""
    if spec.base == "ignored" or not spec.fixed_point:
        return
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(7))
    tensors = base.expand(num_models(spec), 6, 5).clone()
    out = spec.fn(make_input(spec, tensors, base))
    assert torch.allclose(out, base, atol=1e-5), f"{spec.name}: zero task vectors do not return the base"


def check_seed_determinism(spec: MethodSpec) -> None:
    """The same generator seed gives the same tensor; randomized methods use the generator."""
    tensors, base = _random_case(spec, (32, 16), 3)
    a = spec.fn(make_input(spec, tensors, base, seed=11))
    b = spec.fn(make_input(spec, tensors, base, seed=11))
    assert torch.equal(a, b), f"{spec.name}: the same seed gave different tensors"


def check_param_declaration(spec: MethodSpec) -> None:
    """Parameters are declared strictly: unknown keys are refused, every field is described."""
    for model in (spec.params, spec.model_params):
        assert model.model_config.get("extra") == "forbid", f"{spec.name}: {model.__name__} must forbid extra keys"
        try:
            model.model_validate({"surely_not_a_parameter": 1})
        except ValidationError:
            pass
        else:
            raise AssertionError(f"{spec.name}: {model.__name__} accepted an unknown key")
        for fname, info in model.model_fields.items():
            assert info.description, f"{spec.name}: parameter '{info.alias or fname}' has no description"
    assert spec.summary, f"{spec.name}: the method's docstring needs a one-line summary"


CHECKS: tuple[Callable[[MethodSpec], None], ...] = (
    check_shape_dtype_and_purity,
    check_fixed_point,
    check_zero_task_vectors,
    check_seed_determinism,
    check_param_declaration,
)


def iter_checks(spec: MethodSpec) -> Iterator[tuple[str, Callable[[], None]]]:
    for check in CHECKS:
        yield check.__name__, (lambda c=check: c(spec))


def check_method(spec: MethodSpec) -> None:
    """Run every contract check on ``spec``; raises AssertionError on the first broken one."""
    for _, run in iter_checks(spec):
        run()
