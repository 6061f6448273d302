"""The method contract: checks every registered merge method must pass.

Like scikit-learn's ``check_estimator``, the same checks run on every method, so a
new method is held to the same promises as the old ones. Use from a test::

    @pytest.mark.parametrize("name", all_methods())
    def test_contract(name):
        check_method(get_method(name))

or on your own method (a plugin, say): ``check_method(spec)`` raises AssertionError
naming the broken promise.

Two kinds of check: the method's function called directly on small stacks (shape,
purity, fixed point, determinism, declarations), and the method run through the real
planner and executor (``check_through_engine``, ``check_plan_time_check``): whole
tensors on 1, 2 and 3 threads, and, for a method that declares itself ``elementwise``,
row blocks forced small, all compared with the direct call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import ValidationError

from alloykit.config import parse_recipe
from alloykit.errors import RecipeError
from alloykit.io.checkpoint import StateDictCheckpoint
from alloykit.methods.registry import MergeInput, MethodSpec
from alloykit.plan import executor
from alloykit.plan.planner import Plan, make_plan, tensor_seed
from alloykit.stats.store import memory_stats

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


# -- through the planner and the executor --------------------------------------------------

#: a small Llama-shaped model: every role the planner tags, 2-D and N-D tensors, and tensors
#: large enough to run in row blocks at ``ENGINE_BLOCK_ELEMENTS`` (the last block shorter)
ENGINE_TENSORS: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (40, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.0.self_attn.q_proj.weight": (16, 8),
    "model.layers.0.mlp.up_proj.weight": (26, 8),
    "model.layers.1.mlp.down_proj.weight": (8, 26),
    "model.layers.1.conv.weight": (7, 4, 5),
    "model.norm.weight": (8,),
    "lm_head.weight": (40, 8),
}
#: entries per row block when the engine check forces blocks (the executor's is 2^18)
ENGINE_BLOCK_ELEMENTS = 64
THREAD_COUNTS = (1, 2, 3)


@contextlib.contextmanager
def forced_row_blocks(block_elements: int = ENGINE_BLOCK_ELEMENTS) -> Iterator[None]:
    """Make the executor split tensors of more than ``block_elements`` entries into row blocks."""
    saved = executor.BLOCK_ELEMENTS
    executor.BLOCK_ELEMENTS = block_elements
    try:
        yield
    finally:
        executor.BLOCK_ELEMENTS = saved


def _engine_stats(spec: MethodSpec, sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Statistics of one model as ``alloykit stats collect`` writes them: a positive Fisher per
    tensor, or an SPD Gram [in, in] per 2-D weight that is no embedding or head."""
    g = torch.Generator().manual_seed(2000 + seed)
    if spec.needs_stats == "fisher":
        return {n: torch.rand(t.shape, generator=g) + 0.01 for n, t in sd.items()}
    out = {}
    for n, t in sd.items():
        if t.dim() == 2 and n not in ("model.embed_tokens.weight", "lm_head.weight"):
            x = torch.randn(3 * t.shape[1], t.shape[1], generator=g)
            out[n] = x.T @ x / (3 * t.shape[1])
    return out


def engine_plan(spec: MethodSpec, model_params: list[dict] | None = None, seed: int = 5) -> tuple[Plan, dict]:
    """A plan of ``spec`` over in-memory models with ``ENGINE_TENSORS`` (the recipe's
    parameters: ``example_params``-like values, or ``model_params`` per model); returns the
    plan and the state dicts by reference ("base", "model0", ...)."""
    k = num_models(spec)
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(shape, generator=g) for n, shape in ENGINE_TENSORS.items()}
    sds = {"base": base} if spec.base != "ignored" else {}
    for i in range(k):
        sds[f"model{i}"] = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    refs = [r for r in sds if r != "base"]
    per_model = model_params or [_required_values(spec.model_params, 1.0) for _ in refs]
    recipe: dict[str, Any] = {
        "merge_method": spec.name,
        "models": [{"model": r, **({"parameters": p} if p else {}), **({"stats": f"{r}.stats"} if spec.needs_stats else {})}
                   for r, p in zip(refs, per_model)],
        "dtype": "float32",
    }
    if shared := _required_values(spec.params, 0.5):
        recipe["parameters"] = shared
    if "base" in sds:
        recipe["base_model"] = "base"
    stats = {}
    if spec.needs_stats:
        meta = {spec.needs_stats: {"inputs": spec.stats_inputs or "own"}}
        stats = {f"{r}.stats": memory_stats(f"{r}.stats", {spec.needs_stats: _engine_stats(spec, sds[r], i)}, meta)
                 for i, r in enumerate(refs)}
    preloaded = {r: StateDictCheckpoint(sd, r) for r, sd in sds.items()}
    plan = make_plan(parse_recipe(recipe), seed=seed, preloaded=preloaded, preloaded_stats=stats, method=spec)
    return plan, sds


def direct_results(plan: Plan) -> dict[str, torch.Tensor]:
    """Every job of ``plan`` computed by calling the method's function on the whole tensors, as
    the method's author would: the reference the engine must reproduce."""
    out = {}
    cks = plan.checkpoints
    with _one_thread():
        for job in plan.jobs:
            if job.copy:
                out[job.name] = cks[job.sources[0].model].read(job.sources[0].tensor).to(job.out_dtype)
                continue
            stack = torch.stack([cks[s.model].read(s.tensor).float() for s in job.sources])
            base = cks[job.base.model].read(job.base.tensor).float() if job.base is not None else None
            gen = torch.Generator().manual_seed(tensor_seed(plan.seed, job.name)) if plan.method.randomized else None
            stats = torch.stack([cks[s.model].read(s.tensor).float() for s in job.stats]) if job.stats else None
            norms = torch.tensor(plan.stats_norms, dtype=torch.float32) if plan.stats_norms is not None else None
            x = MergeInput(job.name, stack, base, job.params, job.model_params, gen, stats=stats, stats_norms=norms,
                           role=job.role)
            out[job.name] = plan.method.fn(x).to(job.out_dtype)
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as the executor runs each job
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _run(plan: Plan, threads: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    executor.run_jobs(plan, out.__setitem__, threads=threads, progress=False)
    return out


def _compare(spec: MethodSpec, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], how: str, hint: str = "") -> None:
    assert set(got) == set(want), f"{spec.name}: {how} wrote tensors {sorted(set(got) ^ set(want))} differently"
    for name, ref in want.items():
        if not torch.equal(got[name], ref):
            diff = (got[name].float() - ref.float()).abs().max()
            raise AssertionError(f"{spec.name}: tensor '{name}' {how} differs from the direct call by up to {diff:.3g}{hint}")


#: how far a method's fast path (``register(..., streamed=...)``) may be from its reference:
#: sums over a whole tensor (norms, energies, inner products) are taken in another order,
#: row by row and then added exactly; relative to the tensor's largest entry
FAST_PATH_TOLERANCE = 1e-5


def check_through_engine(spec: MethodSpec) -> None:
    """Through the real planner and executor the method gives exactly what the direct call
    gives: on 1, 2 and 3 threads, and, if it declares ``elementwise``, in small row blocks.
    A fast path, if it declares one, is checked after: within ``FAST_PATH_TOLERANCE`` of the
    direct call, and the same bytes at any thread count and block size."""
    plan, _ = engine_plan(spec)
    fast = spec.streamed
    try:
        want = direct_results(plan)
        plan.method = dataclasses.replace(plan.method, streamed=None)  # the reference through the executor
        for threads in THREAD_COUNTS:
            _compare(spec, _run(plan, threads), want, f"through the executor on {threads} thread(s)")
        if spec.elementwise:
            with forced_row_blocks():
                blocked = [j.name for j in plan.jobs if executor.block_rows(j, plan, torch.device("cpu")) is not None]
                assert blocked, f"{spec.name}: no tensor ran in row blocks; the check cannot test 'elementwise'"
                for threads in THREAD_COUNTS[:2]:
                    _compare(spec, _run(plan, threads), want, f"in row blocks of {ENGINE_BLOCK_ELEMENTS} entries",
                             "; the method declares elementwise=True, so each output row may depend only on the same "
                             "row of the inputs (no statistic over the whole tensor): fix the method or drop elementwise")
        plan.method = spec
        if fast is not None and fast.usable():
            _check_fast_path(spec, plan, want)
    finally:
        plan.method = spec
        plan.close()


def _check_fast_path(spec: MethodSpec, plan: Plan, want: dict[str, torch.Tensor]) -> None:
    first = _run(plan, 1)
    assert set(first) == set(want), f"{spec.name}: the fast path wrote tensors {sorted(set(first) ^ set(want))} differently"
    for name, ref in want.items():
        diff = float((first[name].float() - ref.float()).abs().max()) if ref.numel() else 0.0
        scale = float(ref.float().abs().max()) if ref.numel() else 0.0
        assert diff <= FAST_PATH_TOLERANCE * max(scale, 1e-30), (
            f"{spec.name}: tensor '{name}' from the fast path differs from the direct call by {diff:.3g} "
            f"(more than {FAST_PATH_TOLERANCE:g} of its largest entry {scale:.3g})")
    _compare(spec, _run(plan, THREAD_COUNTS[-1]), first, f"from the fast path on {THREAD_COUNTS[-1]} threads (against 1)")
    with forced_row_blocks():
        _compare(spec, _run(plan, 2), first, f"from the fast path in blocks of {ENGINE_BLOCK_ELEMENTS} entries (against whole)")


def check_plan_time_check(spec: MethodSpec) -> None:
    """The planner runs the method's ``check`` on every merged job's resolved parameters and
    accepts the example parameters; weights that sum to 0 (or are all 0) are either refused
    at plan time, naming the method and tensor, or merge to finite tensors."""
    calls: list[tuple[str, Any, list[Any]]] = []
    spied = spec
    if spec.check is not None:
        def spy(params: Any, model_params: list[Any]) -> str | None:
            calls.append(("", params, model_params))
            return spec.check(params, model_params)

        spied = dataclasses.replace(spec, check=spy)
    plan, _ = engine_plan(spied)
    try:
        merged = [j for j in plan.jobs if not j.copy]
        if spec.check is not None:
            assert len(calls) == len(merged), (
                f"{spec.name}: the planner ran the plan-time check {len(calls)} times for {len(merged)} merged tensors")
            for (_, params, model_params), job in zip(calls, merged):
                assert params == job.params and model_params == job.model_params, (
                    f"{spec.name}: the plan-time check of '{job.name}' did not see the job's resolved parameters")
    finally:
        plan.close()
    fields = spec.model_params.model_fields
    if "weight" not in fields or fields["weight"].annotation not in (float, "float"):
        return
    k = num_models(spec)
    for weights in ([1.0, -1.0] + [0.0] * (k - 2), [0.0] * k):
        per_model = [{**_required_values(spec.model_params, 1.0), "weight": w} for w in weights]
        try:
            plan, _ = engine_plan(spec, per_model)
        except RecipeError as err:
            # the method's check (names the method) or the parameter's declared bounds (name the parameter)
            named = f"method {spec.name}" in str(err) or "parameter 'weight'" in str(err)
            assert named and "tensor '" in str(err), (
                f"{spec.name}: weights {weights} were refused without naming the method or parameter and the tensor: {err}")
            continue
        try:
            with warnings.catch_warnings():  # the executor warns of the NaN/Inf asserted on below
                warnings.simplefilter("ignore")
                out = _run(plan, 1)
        finally:
            plan.close()
        bad = [n for n, t in out.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        assert not bad, (f"{spec.name}: weights {weights} merge to NaN/Inf in {bad[:2]}; refuse them at plan time "
                         "with a 'check' (see MethodSpec.check)")


CHECKS: tuple[Callable[[MethodSpec], None], ...] = (
    check_shape_dtype_and_purity,
    check_fixed_point,
    check_zero_task_vectors,
    check_seed_determinism,
    check_param_declaration,
    check_through_engine,
    check_plan_time_check,
)


def iter_checks(spec: MethodSpec) -> Iterator[tuple[str, Callable[[], None]]]:
    for check in CHECKS:
        yield check.__name__, (lambda c=check: c(spec))


def check_method(spec: MethodSpec) -> None:
    """Run every contract check on ``spec``; raises AssertionError on the first broken one."""
    for _, run in iter_checks(spec):
        run()
