"""The public API: a recipe to a model folder (or a LoRA adapter), or state dicts to a state dict.

Thin by design: a call becomes one ``MergeRequest`` (``alloykit.request``), planned once,
and goes to one writer, chosen in ``run_merge``: a model folder (``alloykit.output.model``)
or, with ``output_lora``, a PEFT adapter (``alloykit.output.adapter``). Crash safety lives in
``alloykit.output.folder``; test-only fault injection in ``alloykit.output.faults``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alloykit.config import Recipe
from alloykit.errors import AlloyError, PlanError
from alloykit.io.checkpoint import StateDictCheckpoint
from alloykit.io.side import SideOutputs
from alloykit.output.adapter import AdapterOptions, write_adapter
from alloykit.output.folder import temp_dir_for
from alloykit.output.model import DEFAULT_SHARD_SIZE, WriteOptions, Written, default_threads, write_model
from alloykit.plan.executor import DEFAULT_BUDGET, run_jobs
from alloykit.plan.planner import Plan
from alloykit.plan.steps import merge_step
from alloykit.request import MergeRequest

__all__ = ["DEFAULT_SHARD_SIZE", "WriteOptions", "default_threads", "merge", "merge_state_dicts", "plan_recipe", "run_merge",
           "temp_dir_for"]


def plan_recipe(
    recipe: Recipe | dict | str | os.PathLike,
    *,
    allow_pickle: bool = False,
    seed: int | None = None,
    recipe_dir: str | os.PathLike | None = None,
) -> Plan:
    """Recipe (object, dict, or YAML path) -> validated plan, reading headers only.

    Relative model paths are looked up from the working directory, then from
    ``recipe_dir`` (the YAML file's folder when a path is given).
    """
    return MergeRequest.of(recipe, recipe_dir=recipe_dir, seed=seed, allow_pickle=allow_pickle).plan()


def merge(
    recipe: Recipe | dict | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    threads: int | None = None,
    seed: int | None = None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    allow_pickle: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    fail_on_nonfinite: bool = False,
    budget_bytes: int = DEFAULT_BUDGET,
    copy_tokenizer: bool = True,
    recipe_dir: str | os.PathLike | None = None,
    output_lora: int | None = None,
    lora_save_others: bool = True,
    gguf_type: str | None = None,
    preloaded: dict[str, Any] | None = None,
) -> Path:
    """Merge the models a recipe names into ``out_dir`` (a Hugging Face model folder).

    ``output_lora=RANK`` writes, instead of the model, a PEFT LoRA adapter of that rank
    holding the merged model's delta from the recipe's base_model (per-layer errors in
    its ``alloykit_extract_report.json``); ``lora_save_others=False`` skips changed
    embeddings and norms instead of saving them whole. ``gguf_type`` (f32, f16, bf16, q8_0, ...):
    the weights are written as one GGUF file ``model.TYPE.gguf`` instead of safetensors
    (``alloykit.io.gguf_write``).

    The output is written into ``.NAME.alloykit-tmp`` beside the target and renamed
    into place only when complete: ``out_dir`` either does not exist or is whole.
    An interrupted merge leaves that folder; ``resume=True`` continues from its
    verified complete shards (or, when ``out_dir`` already holds this very merge,
    does nothing), otherwise it is cleaned and the merge starts over.

    ``preloaded`` maps model references to open checkpoints that stand in for them (the
    aligned copies of a recipe's ``align:`` step).
    """
    request = MergeRequest.of(recipe, recipe_dir=recipe_dir, seed=seed, allow_pickle=allow_pickle)
    options = WriteOptions(device=device, threads=threads, max_shard_size=max_shard_size, overwrite=overwrite, resume=resume,
                           progress=progress, fail_on_nonfinite=fail_on_nonfinite, budget_bytes=budget_bytes,
                           copy_tokenizer=copy_tokenizer, gguf_type=gguf_type)
    return run_merge(request, out_dir, options, output_lora=output_lora, lora_save_others=lora_save_others,
                     preloaded=preloaded).path


def run_merge(request: MergeRequest, out_dir: str | os.PathLike, options: WriteOptions = WriteOptions(), *,
              output_lora: int | None = None, lora_save_others: bool = True,
              preloaded: dict[str, Any] | None = None) -> Written:
    """``merge`` for a prepared request; returns what was written (the CLI reports from it).

    The one place where the output kind is chosen: a model folder, or a LoRA adapter; a
    recipe with an ``align:`` step is handed to that step, which merges back through here."""
    if preloaded is None and request.recipe.wants_alignment:
        if output_lora is not None:
            raise AlloyError("--output-lora: not available for recipes with an 'align' step; merge to a model folder, "
                             "then run 'alloykit extract-lora' on it")
        request.plan().close()  # validate against the inputs' headers before aligning anything
        return merge_step("align")(request, out_dir, options)
    if output_lora is not None:
        return _merge_to_adapter(request, out_dir, output_lora, lora_save_others, options)
    plan = request.plan(preloaded=preloaded)
    try:
        return write_model(plan, out_dir, options, names_dir=request.recipe_dir)
    finally:
        plan.close()


def _merge_to_adapter(request: MergeRequest, out_dir: str | os.PathLike, rank: int, save_others: bool,
                      o: WriteOptions) -> Written:
    """The merged model's delta from the recipe's base_model, as a LoRA adapter of that rank.
    Merged tensors are computed in float32 whatever the recipe's output dtype, so the delta is
    not rounded before it is truncated."""
    base_ref = request.recipe.base_model
    if not base_ref:
        raise AlloyError("--output-lora: the recipe has no base_model; the adapter is the merged model's delta from it, so name one")
    options = AdapterOptions(rank, save_others=save_others, seed=request.seed if request.seed is not None else (request.recipe.seed or 0))
    options.check("--output-lora")
    plan = request.with_out_dtype("float32").plan()
    try:
        merged = [label for label in plan.labels if label != base_ref]
        return write_adapter(plan, plan.checkpoints[plan.config_source], out_dir, options, what="merge",
                             record=request.recipe.model_dump(exclude_none=True, by_alias=True), merged_refs=merged,
                             base_ref=base_ref, names_dir=request.recipe_dir, device=o.device, threads=o.threads,
                             progress=o.progress, overwrite=o.overwrite, resume=o.resume)
    finally:
        plan.close()


def merge_state_dicts(
    models: Sequence[Mapping[str, torch.Tensor] | torch.nn.Module],
    method: str,
    *,
    base: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    parameters: dict[str, Any] | None = None,
    model_parameters: Sequence[dict[str, Any] | None] | None = None,
    seed: int = 0,
    out_dtype: torch.dtype | None = None,
    stats: Sequence[Any] | None = None,
    side_outputs: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts (or modules) with a registered method.

    ``parameters`` are the shared (top-level) parameters, ``model_parameters`` one
    dict per model. ``stats`` (data-dependent methods): per model, its statistics, an
    ``alloykit.stats.store.Stats`` or a dict kind -> {tensor name: tensor}. The tensors go through the same planner and executor as a file
    merge, so the result equals ``merge()`` of the same models saved to disk.
    ``side_outputs``: a dict that receives the method's side outputs, if it emits any
    (group -> {tensor name -> tensor}, as a file merge stores them).
    """
    sds = [m.state_dict() if isinstance(m, torch.nn.Module) else dict(m) for m in models]
    base_sd = base.state_dict() if isinstance(base, torch.nn.Module) else (dict(base) if base is not None else None)
    if model_parameters is not None and len(model_parameters) != len(sds):
        raise PlanError(f"model_parameters has {len(model_parameters)} entries for {len(sds)} models")
    if stats is not None and len(stats) != len(sds):
        raise PlanError(f"stats has {len(stats)} entries for {len(sds)} models")
    preloaded = {f"model{i}": StateDictCheckpoint(sd, f"model{i}") for i, sd in enumerate(sds)}
    # Stats objects or plain dicts: the statistics planning step (alloykit.stats.attach) reads both
    preloaded_stats = {f"model{i}.stats": s for i, s in enumerate(stats)} if stats is not None else {}
    recipe: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": ref, **({"parameters": model_parameters[i]} if model_parameters and model_parameters[i] else {}),
             **({"stats": f"{ref}.stats"} if stats is not None else {})}
            for i, ref in enumerate(preloaded)
        ],
    }
    if base_sd is not None:
        preloaded["base"] = StateDictCheckpoint(base_sd, "base")
        recipe["base_model"] = "base"
    if parameters:
        recipe["parameters"] = parameters
    plan = MergeRequest.of(recipe, seed=seed).plan(preloaded=preloaded, preloaded_stats=preloaded_stats)
    result: dict[str, torch.Tensor] = {}
    side = SideOutputs() if side_outputs is not None else None
    run_jobs(plan, result.__setitem__, threads=1, progress=False, side_sink=side.add if side is not None else None)
    if side is not None:
        side_outputs.update(side.groups)
    if out_dtype is not None:
        result = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in result.items()}
    return result
