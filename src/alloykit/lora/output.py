"""``merge --output-lora RANK``: a recipe's merged model written as a PEFT adapter of its base.

Each merged tensor goes from the executor straight to the extraction (no full model is
written, not even temporarily): delta = merged - base_model's tensor, truncated to
``rank`` by SVD exactly as ``extract-lora`` does (``alloykit.lora.extract``; randomized
SVD for large matrices, per-layer relative error in ``alloykit_extract_report.json``).
Changed embeddings and 1-D tensors are saved whole as ``modules_to_save``, or skipped.
Merged tensors are computed in float32 whatever the recipe's output dtype, so the delta
is not rounded before it is truncated.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from alloykit.config import Recipe, load_recipe, parse_recipe
from alloykit.errors import AlloyError, OutputError
from alloykit.io.lora import LoraCheckpoint
from alloykit.lora.extract import LayerReport, adapter_config, extract_tensor, targets_of, write_adapter
from alloykit.merge import default_threads, plan_recipe
from alloykit.plan.executor import run_jobs


def merge_to_lora(
    recipe: Recipe | dict | str | os.PathLike,
    out: str | os.PathLike,
    rank: int,
    *,
    recipe_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    threads: int | None = None,
    seed: int | None = None,
    allow_pickle: bool = False,
    save_others: bool = True,
    progress: bool = False,
) -> list[LayerReport]:
    """Merge ``recipe`` and write the merged model's delta from its base_model as a LoRA adapter."""
    if rank < 1:
        raise AlloyError(f"--output-lora {rank}: the rank must be a positive integer")
    if isinstance(recipe, (str, os.PathLike)):
        recipe_dir = recipe_dir or Path(recipe).parent
        recipe = load_recipe(recipe)
    recipe = parse_recipe(recipe).model_copy(update={"out_dtype": "float32"})
    if not recipe.base_model:
        raise AlloyError("--output-lora: the recipe has no base_model; the adapter is the merged model's delta from it, so name one")
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"output folder '{out}' exists and is not empty; choose another folder")
    plan = plan_recipe(recipe, allow_pickle=allow_pickle, seed=seed, recipe_dir=recipe_dir)
    tensors: dict[str, torch.Tensor] = {}
    reports: list[LayerReport] = []
    lock = threading.Lock()
    try:
        base = plan.checkpoints[plan.config_source]
        if isinstance(base, LoraCheckpoint):
            raise AlloyError(f"--output-lora: base_model '{recipe.base_model}' is a LoRA adapter; an adapter's base must be a "
                             "plain model folder (fold it first with 'alloykit merge', or name its base)")
        for job in plan.jobs:
            if job.name not in base or tuple(base.info(job.name).shape) != tuple(job.shape):
                raise AlloyError(f"--output-lora: merged tensor '{job.name}' {list(job.shape)} is not in base_model "
                                 f"'{recipe.base_model}' with that shape; an adapter can only change the base's tensors")

        def sink(name: str, merged: torch.Tensor) -> None:
            if not merged.is_floating_point():
                return
            delta = merged.float() - base.read(name).float()
            with lock:  # SVDs one at a time: the executor's threads already use the cores
                reports.append(extract_tensor(name, delta, rank, tensors, (lambda: merged.to(base.info(name).dtype)) if save_others else None))

        run_jobs(plan, sink, device=device, threads=threads or default_threads(), progress=progress)
    finally:
        plan.close()
    reports.sort(key=lambda r: r.name)
    targets, to_save = targets_of(reports)
    if not targets:
        raise AlloyError("--output-lora: no linear layer of the merged model differs from base_model; nothing to write")
    write_adapter(out, tensors, adapter_config(base.path, rank, targets, to_save), reports)
    return reports
