"""Top-level merges: a recipe to a model folder, or state dicts to a state dict."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alloykit.config import Recipe, load_recipe, parse_recipe
from alloykit.errors import CheckpointError, OutputError, PlanError
from alloykit.io.checkpoint import Checkpoint, StateDictCheckpoint
from alloykit import __version__
from alloykit.card import write_metadata
from alloykit.io.gguf_write import check_type, folder_to_gguf
from alloykit.io.journal import JOURNAL, Journal, fault_point, file_sha256, fsync_file
from alloykit.io.side import SideOutputs
from alloykit.io.writer import ShardedWriter, ShardLayout, plan_shards
from alloykit.plan.executor import DEFAULT_BUDGET, run_jobs
from alloykit.plan.planner import Plan, make_plan

_log = logging.getLogger(__name__)

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
    resume: bool = False,
    progress: bool = True,
    fail_on_nonfinite: bool = False,
    budget_bytes: int = DEFAULT_BUDGET,
    copy_tokenizer: bool = True,
    recipe_dir: str | os.PathLike | None = None,
    output_lora: int | None = None,
    gguf_type: str | None = None,
) -> Path:
    """Merge the models a recipe names into ``out_dir`` (a Hugging Face model folder).

    ``output_lora=RANK`` writes, instead of the model, a PEFT LoRA adapter of that rank
    holding the merged model's delta from the recipe's base_model
    (``alloykit.lora.output.merge_to_lora``, which also returns the per-layer errors).
    ``gguf_type`` (f32, f16, bf16, q8_0, ...): the weights are written as one GGUF file
    ``model.TYPE.gguf`` instead of safetensors (``alloykit.io.gguf_write``).

    The output is written into ``.NAME.alloykit-tmp`` beside the target and renamed
    into place only when complete: ``out_dir`` either does not exist or is whole.
    An interrupted merge leaves that folder; ``resume=True`` continues from its
    verified complete shards, otherwise it is cleaned and the merge starts over.
    """
    if output_lora is not None:
        from alloykit.lora.output import merge_to_lora

        merge_to_lora(recipe, out_dir, output_lora, recipe_dir=recipe_dir, device=device, threads=threads, seed=seed,
                      allow_pickle=allow_pickle, progress=progress)
        return Path(out_dir).absolute()
    out = Path(out_dir).absolute()
    if gguf_type is not None:
        check_type(gguf_type)
    plan = plan_recipe(recipe, allow_pickle=allow_pickle, seed=seed, recipe_dir=recipe_dir)
    tmp = temp_dir_for(out)
    lock_fd = None
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            hint = " (a finished merge? there is nothing to resume)" if resume and not tmp.exists() else ""
            raise OutputError(f"output folder '{out}' exists and is not empty{hint}; choose another folder or pass --overwrite")
        if max_shard_size <= 0:
            raise OutputError(f"--max-shard-size {max_shard_size}: must be a positive number of bytes")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the folder '{out.parent}': {err.strerror or err}") from None
        shards = plan_shards([(j.name, j.out_dtype, j.shape) for j in plan.jobs], max_shard_size)
        if not resume:
            _check_space(out.parent, plan.out_bytes)
        fault_point("planned")
        journal, lock_fd = _start(plan, shards, tmp, resume, progress)
        if resume:
            reused = sum(journal.shards[s.filename]["size"] for s in shards if s.filename in journal.shards)
            _check_space(out.parent, plan.out_bytes - reused)
        try:
            try:
                _write(plan, tmp, shards, journal, device=device, threads=threads, progress=progress,
                       fail_on_nonfinite=fail_on_nonfinite, budget_bytes=budget_bytes, copy_tokenizer=copy_tokenizer)
                if gguf_type is not None:  # before the journal goes: an interrupted conversion can --resume
                    folder_to_gguf(tmp, gguf_type, tokenizer_from=plan.checkpoints[plan.tokenizer_source]
                                   if plan.tokenizer_source is not None else None)
                journal.remove()
                fault_point("journal-removed")
                _replace(tmp, out)
            except OSError as err:
                raise OutputError(f"cannot write the output in '{tmp}': {err.strerror or err} (free disk space or choose another folder)") from None
        except (KeyboardInterrupt, OutputError, CheckpointError) as err:
            # an interrupt, a full disk, an input that failed to read: a rerun of the same plan can
            # succeed, so the verified shards are kept for --resume (other errors need a new plan)
            if not journal.shards:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            kept = f"{len(journal.shards)} finished shard(s) are kept in '{tmp}': rerun with --resume to continue, or delete it"
            if isinstance(err, KeyboardInterrupt):
                if progress:
                    _log.warning(kept)
                raise
            raise type(err)(f"{err}; {kept}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a bug: trust nothing it wrote
            raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        plan.close()
    return out


def plan_fingerprint(plan: Plan, shards: list[ShardLayout]) -> str:
    """Digest of everything that decides the output bytes: recipe, seed, inputs' headers, layout."""
    h = hashlib.sha256()
    h.update(plan.recipe.to_yaml().encode())
    h.update(f"seed={plan.seed};version={__version__}".encode())
    for ck in plan.checkpoints:
        for name, info in sorted(ck.tensors.items()):
            h.update(f"{name}|{info.dtype}|{info.shape}|{info.offset}|{info.nbytes};".encode())
        for f in getattr(ck, "files", []):
            st = os.stat(f)
            h.update(f"{os.path.realpath(f)}|{st.st_size}|{st.st_mtime_ns};".encode())
    for j in plan.jobs:
        h.update(f"{j.name}|{j.out_dtype}|{j.shape}|{j.sources}|{j.base}|{j.params!r}|{j.model_params!r};".encode())
    for s in shards:
        h.update(f"{s.filename}|{s.size};".encode())
    return h.hexdigest()


def _start(plan: Plan, shards: list[ShardLayout], tmp: Path, resume: bool, progress: bool) -> tuple[Journal, int]:
    """Prepare and lock the temporary folder: reuse an interrupted run's verified shards, or start clean.

    The lock (``flock`` on the folder, released by the kernel however the process ends) stops
    a second merge into the same target from deleting or renaming this one's files.
    """
    fingerprint = plan_fingerprint(plan, shards)
    try:
        if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
            tmp.unlink()  # not ours to follow
        if not tmp.exists():
            tmp.mkdir()
        lock_fd = _lock(tmp)
    except FileExistsError:
        raise OutputError(f"another alloykit merge into the same folder started just now ('{tmp}'); wait for it or choose another folder") from None
    except OSError as err:
        raise OutputError(f"cannot create the working folder '{tmp}': {err.strerror or err}") from None
    try:
        journal, why = Journal.load_verified(tmp, fingerprint) if resume else (Journal(tmp, fingerprint), "")
        if why and (tmp / JOURNAL).exists():
            raise OutputError(f"cannot resume from '{tmp}': {why}; rerun without --resume to start over")
        if resume and progress:
            _log.info(f"resuming: {len(journal.shards)} of {len(shards)} shards already complete")
        keep = set(journal.shards) | ({JOURNAL} if journal.shards else set())
        for p in tmp.iterdir():  # leftovers of an interrupted run, or all of it when not resuming
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    except BaseException:
        os.close(lock_fd)
        raise
    return journal, lock_fd


def _lock(folder: Path) -> int:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(
            f"another alloykit merge is writing to the same output (its working folder '{folder}' is locked); "
            "wait for it to finish or choose another folder"
        ) from None
    return fd


def _check_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need + (64 << 20) > free:
        raise OutputError(
            f"not enough disk space in '{folder}': the merge writes {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free; "
            "free space or choose another output folder"
        )


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place (flushed first, so the rename publishes whole files)."""
    for p in tmp.iterdir():  # shards were fsynced as they completed; the small files were not
        if p.is_file() and not p.name.endswith(".safetensors"):
            fsync_file(p)
    _fsync_dir(tmp)
    old = out.parent / f".{out.name}.alloykit-old"
    _remove(old)  # left by a merge killed between the two renames below
    if out.exists() or out.is_symlink():
        os.rename(out, old)
        fault_point("target-moved-aside")
        os.rename(tmp, out)
        _remove(old)
    else:
        os.rename(tmp, out)
    fault_point("renamed")
    _fsync_dir(out.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


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


def _write(plan: Plan, folder: Path, shards: list[ShardLayout], journal: Journal, *, device: str, threads: int | None,
           progress: bool, fail_on_nonfinite: bool, budget_bytes: int, copy_tokenizer: bool) -> None:
    def completed(filename: str, size: int) -> None:
        journal.complete(filename, size, file_sha256(folder / filename))

    writer = ShardedWriter(folder, shards, {j.name: j.out_dtype for j in plan.jobs}, {j.name: j.shape for j in plan.jobs},
                           on_complete=completed)
    side = SideOutputs() if plan.method.side_outputs else None
    # side outputs live in memory until the end, so a resumed merge of such a method recomputes every shard
    done = set(journal.shards) if side is None else set()
    skip = {n for s in shards if s.filename in done for n in s.names}
    writer.open(done)
    sink = _with_fault_hook(writer.write)
    try:
        run_jobs(plan, sink, device=device, threads=threads or default_threads(), budget_bytes=budget_bytes,
                 progress=progress, fail_on_nonfinite=fail_on_nonfinite, skip=skip,
                 side_sink=side.add if side is not None else None)
    finally:
        writer.close()
    fault_point("tensors-written")
    writer.write_index()
    if side is not None:
        side.write(folder / plan.method.name, side_manifest(plan))
    write_metadata(plan, folder, copy_tokenizer=copy_tokenizer)
    fault_point("metadata-written")


def side_manifest(plan: Plan) -> dict[str, Any]:
    """What a reader of side outputs needs to know: the method and its inputs, in the order
    the method saw them (a job's sources: the recipe's models, base excluded)."""
    job = next((j for j in plan.jobs if not j.copy), None)

    def path_of(i: int) -> str | None:
        ck = plan.checkpoints[i]
        return str(ck.path.resolve()) if isinstance(ck, Checkpoint) else None

    sources = job.sources if job is not None else []
    base = job.base if job is not None else None
    return {
        "method": plan.method.name,
        "alloykit_version": __version__,
        "models": [plan.labels[s.model] for s in sources],
        "model_paths": [path_of(s.model) for s in sources],
        "base": plan.labels[base.model] if base is not None else None,
        "base_path": path_of(base.model) if base is not None else None,
    }


def _with_fault_hook(sink):
    """Test-only fault injection: ALLOYKIT_FAULT_KILL_AFTER=N SIGKILLs the process after N tensors
    (and ALLOYKIT_FAULT_KILL_AT=PHASE at a named phase, see ``fault_point``).

    The reliability suite uses it to kill merges at exact points; unset, it costs nothing.
    """
    after = os.environ.get("ALLOYKIT_FAULT_KILL_AFTER")
    if not after:
        return sink
    limit, count, lock = int(after), [0], threading.Lock()

    def hooked(name, tensor):
        sink(name, tensor)
        with lock:
            count[0] += 1
            if count[0] >= limit:
                os.kill(os.getpid(), signal.SIGKILL)

    return hooked


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
    preloaded_stats = {}
    if stats is not None:
        from alloykit.stats.store import Stats, memory_stats

        preloaded_stats = {f"model{i}.stats": s if isinstance(s, Stats) else memory_stats(f"model{i}.stats", dict(s))
                           for i, s in enumerate(stats)}
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
    plan = make_plan(parse_recipe(recipe), seed=seed, preloaded=preloaded, preloaded_stats=preloaded_stats)
    result: dict[str, torch.Tensor] = {}
    side = SideOutputs() if side_outputs is not None else None
    run_jobs(plan, result.__setitem__, threads=1, progress=False, side_sink=side.add if side is not None else None)
    if side is not None:
        side_outputs.update(side.groups)
    if out_dtype is not None:
        result = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in result.items()}
    return result
