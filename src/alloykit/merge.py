"""Top-level merges: a recipe to a model folder, or state dicts to a state dict."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alloykit.config import Recipe, load_recipe, parse_recipe
from alloykit.errors import OutputError, PlanError
from alloykit.io.checkpoint import StateDictCheckpoint
from alloykit.io.writer import ShardedWriter, plan_shards
from alloykit.plan.executor import DEFAULT_BUDGET, run_jobs
from alloykit.plan.planner import Plan, make_plan

DEFAULT_SHARD_SIZE = 5_000_000_000
TMP_MARK = ".alloykit-tmp"


def temp_dir_for(out_dir: Path) -> Path:
    """The clearly named working folder beside the target: ``.NAME.alloykit-tmp``."""
    return out_dir.parent / f".{out_dir.name}{TMP_MARK}"


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
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        return make_plan(load_recipe(path), recipe_dir=path.parent, allow_pickle=allow_pickle, seed=seed)
    return make_plan(parse_recipe(recipe), recipe_dir=recipe_dir, allow_pickle=allow_pickle, seed=seed)


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
    progress: bool = True,
    fail_on_nonfinite: bool = False,
    budget_bytes: int = DEFAULT_BUDGET,
    copy_tokenizer: bool = True,
    recipe_dir: str | os.PathLike | None = None,
) -> Path:
    """Merge the models a recipe names into ``out_dir`` (a Hugging Face model folder).

    The output is written into ``.NAME.alloykit-tmp`` beside the target and renamed
    into place only when complete: ``out_dir`` either does not exist or is whole.
    """
    out = Path(out_dir).absolute()
    plan = plan_recipe(recipe, allow_pickle=allow_pickle, seed=seed, recipe_dir=recipe_dir)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise OutputError(f"output folder '{out}' exists and is not empty; choose another folder or pass --overwrite")
        if max_shard_size <= 0:
            raise OutputError(f"--max-shard-size {max_shard_size}: must be a positive number of bytes")
        out.parent.mkdir(parents=True, exist_ok=True)
        _check_space(out.parent, plan.out_bytes)
        tmp = temp_dir_for(out)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            _write(plan, tmp, device=device, threads=threads, max_shard_size=max_shard_size, progress=progress,
                   fail_on_nonfinite=fail_on_nonfinite, budget_bytes=budget_bytes, copy_tokenizer=copy_tokenizer)
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        plan.close()
    return out


def _check_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need + (64 << 20) > free:
        raise OutputError(
            f"not enough disk space in '{folder}': the merge writes {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free; "
            "free space or choose another output folder"
        )


def _replace(tmp: Path, out: Path) -> None:
    _fsync_dir(tmp)
    if out.exists():
        old = out.parent / f".{out.name}.alloykit-old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(plan: Plan, folder: Path, *, device: str, threads: int | None, max_shard_size: int, progress: bool,
           fail_on_nonfinite: bool, budget_bytes: int, copy_tokenizer: bool) -> None:
    entries = [(j.name, j.out_dtype, j.shape) for j in plan.jobs]
    shards = plan_shards(entries, max_shard_size)
    writer = ShardedWriter(folder, shards, {j.name: j.out_dtype for j in plan.jobs}, {j.name: j.shape for j in plan.jobs})
    writer.open()
    try:
        run_jobs(plan, writer.write, device=device, threads=threads or default_threads(), budget_bytes=budget_bytes,
                 progress=progress, fail_on_nonfinite=fail_on_nonfinite)
    finally:
        writer.close()
    writer.write_index()
    from alloykit.card import write_metadata

    write_metadata(plan, folder, copy_tokenizer=copy_tokenizer)


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def merge_state_dicts(
    models: Sequence[Mapping[str, torch.Tensor] | torch.nn.Module],
    method: str,
    *,
    base: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    parameters: dict[str, Any] | None = None,
    model_parameters: Sequence[dict[str, Any] | None] | None = None,
    seed: int = 0,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts (or modules) with a registered method.

    ``parameters`` are the shared (top-level) parameters, ``model_parameters`` one
    dict per model. The tensors go through the same planner and executor as a file
    merge, so the result equals ``merge()`` of the same models saved to disk.
    """
    sds = [m.state_dict() if isinstance(m, torch.nn.Module) else dict(m) for m in models]
    base_sd = base.state_dict() if isinstance(base, torch.nn.Module) else (dict(base) if base is not None else None)
    if model_parameters is not None and len(model_parameters) != len(sds):
        raise PlanError(f"model_parameters has {len(model_parameters)} entries for {len(sds)} models")
    preloaded = {f"model{i}": StateDictCheckpoint(sd, f"model{i}") for i, sd in enumerate(sds)}
    recipe: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": ref, **({"parameters": model_parameters[i]} if model_parameters and model_parameters[i] else {})}
            for i, ref in enumerate(preloaded)
        ],
    }
    if base_sd is not None:
        preloaded["base"] = StateDictCheckpoint(base_sd, "base")
        recipe["base_model"] = "base"
    if parameters:
        recipe["parameters"] = parameters
    plan = make_plan(parse_recipe(recipe), seed=seed, preloaded=preloaded)
    result: dict[str, torch.Tensor] = {}
    run_jobs(plan, result.__setitem__, threads=1, progress=False)
    if out_dtype is not None:
        result = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in result.items()}
    return result
