"""A plan written as a Hugging Face model folder: sharded safetensors, resumable, crash-safe.

The writer fixes every shard's layout before computing (``alloykit.io.writer``); each shard
is recorded in the journal when its last tensor lands, so an interrupted merge resumes
from its verified shards. Config, tokenizer, recipe, manifest and model card are written
by ``alloykit.card``; the folder is published by ``OutputFolder``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alloykit import __version__
from alloykit.card import write_metadata
from alloykit.errors import OutputError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.durable import file_sha256
from alloykit.io.gguf_write import check_type, folder_to_gguf
from alloykit.io.side import SideOutputs
from alloykit.io.writer import ShardedWriter, ShardLayout, plan_shards
from alloykit.ops.philox import STREAM as RANDOM_STREAM
from alloykit.output.faults import after_tensors, fault_point
from alloykit.output.folder import OutputFolder
from alloykit.output.journal import Fingerprint, Journal, digest
from alloykit.plan.executor import DEFAULT_BUDGET, run_jobs
from alloykit.plan.planner import Plan

_log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5_000_000_000


@dataclass
class Written:
    """What a command wrote: the folder, and whether ``--resume`` found it already finished."""

    path: Path
    already_done: bool = False
    reused_shards: int = 0
    reports: list[Any] | None = None  # adapters: one report per tensor
    errors: dict[str, float] | None = None  # merge-lora: each module's relative truncation error


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _files_of(ck: Any) -> list[str]:
    """Every file a checkpoint reads (a LoRA fold reads its base's and its adapter's)."""
    files = list(getattr(ck, "files", []) or [])
    for part in ("base", "adapter"):
        files += list(getattr(getattr(ck, part, None), "files", []) or [])
    return files


def input_digest(ck: Any) -> str:
    """One input's part of a fingerprint: its tensor headers, and its files' paths, sizes and dates."""
    text = "".join(f"{n}|{i.dtype}|{i.shape}|{i.offset}|{i.nbytes};" for n, i in sorted(ck.tensors.items()))
    for f in _files_of(ck):
        st = os.stat(f)
        text += f"{os.path.realpath(f)}|{st.st_size}|{st.st_mtime_ns};"
    return digest(text)


def plan_fingerprint(plan: Plan, layout: str, options: str = "") -> Fingerprint:
    """What decides the output bytes, in named parts: recipe, seed, version, the random
    stream of a randomized method (``alloykit.ops.philox.STREAM``), every input (its
    tensor headers, files, sizes and dates), the output layout, and the writer's options."""
    parts: Fingerprint = {"recipe": digest(plan.recipe.to_yaml()), "seed": str(plan.seed), "alloykit": __version__}
    if plan.method.randomized:  # DARE/DELLA masks: the bytes follow the random stream's version
        parts["stream"] = RANDOM_STREAM
    for label, ck in zip(plan.labels, plan.checkpoints):
        parts[f"input:{label}"] = input_digest(ck)
    jobs = "".join(f"{j.name}|{j.out_dtype}|{j.shape}|{j.sources}|{j.base}|{j.params!r}|{j.model_params!r};"
                   for j in plan.jobs)
    parts["layout"] = digest(jobs + layout)
    if options:
        parts["options"] = digest(options)
    return parts


@dataclass(frozen=True)
class WriteOptions:
    """How a plan is computed and written (the merge command's options)."""

    device: str = "cpu"
    threads: int | None = None
    max_shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    fail_on_nonfinite: bool = False
    budget_bytes: int = DEFAULT_BUDGET
    copy_tokenizer: bool = True
    gguf_type: str | None = None  # write the weights as one GGUF file of this type instead of safetensors


def write_model(plan: Plan, out: str | os.PathLike, options: WriteOptions = WriteOptions(), *,
                names_dir: Path | None = None) -> Written:
    """Compute ``plan`` into the model folder ``out`` (absent or whole, whatever happens);
    ``names_dir``: the recipe's folder, which the model card names local models relative to."""
    o = options
    if o.max_shard_size <= 0:
        raise OutputError(f"--max-shard-size {o.max_shard_size}: must be a positive number of bytes")
    if o.gguf_type is not None:
        check_type(o.gguf_type)
    folder = OutputFolder(out, overwrite=o.overwrite, what="merge")
    shards = plan_shards([(j.name, j.out_dtype, j.shape) for j in plan.jobs], o.max_shard_size)
    fingerprint = plan_fingerprint(plan, "".join(f"{s.filename}|{s.size};" for s in shards),
                                   f"gguf={o.gguf_type}" if o.gguf_type else "")
    if folder.already_done(fingerprint, o.resume):
        return Written(folder.target, already_done=True)
    folder.total_shards = len(shards)
    with folder.writing(fingerprint, resume=o.resume, space=plan.out_bytes) as journal:
        if o.resume and o.progress:
            _log.info(f"resuming: {len(journal.shards)} of {len(shards)} shards already complete")
        reused = len(journal.shards)
        _write(plan, folder.tmp, shards, journal, o)
        fault_point("tensors-written")
        write_metadata(plan, folder.tmp, copy_tokenizer=o.copy_tokenizer, fingerprint=fingerprint, names_dir=names_dir)
        fault_point("metadata-written")
        if o.gguf_type is not None:  # inside the journal: an interrupted conversion can --resume
            folder_to_gguf(folder.tmp, o.gguf_type, tokenizer_from=plan.checkpoints[plan.tokenizer_source]
                           if plan.tokenizer_source is not None else None)
        folder.commit()
    return Written(folder.target, reused_shards=reused)


def _write(plan: Plan, folder: Path, shards: list[ShardLayout], journal: Journal, o: WriteOptions) -> None:
    def completed(filename: str, size: int) -> None:
        journal.complete(filename, size, file_sha256(folder / filename))

    writer = ShardedWriter(folder, shards, {j.name: j.out_dtype for j in plan.jobs}, {j.name: j.shape for j in plan.jobs},
                           on_complete=completed)
    side = SideOutputs() if plan.method.side_outputs else None
    # side outputs live in memory until the end, so a resumed merge of such a method recomputes every shard
    done = set(journal.shards) if side is None else set()
    skip = {n for s in shards if s.filename in done for n in s.names}
    writer.open(done)
    try:
        run_jobs(plan, after_tensors(writer.write), device=o.device, threads=o.threads or default_threads(),
                 budget_bytes=o.budget_bytes, progress=o.progress, fail_on_nonfinite=o.fail_on_nonfinite, skip=skip,
                 side_sink=side.add if side is not None else None, out_buffer=writer.buffer)
    finally:
        writer.close()
    writer.write_index()
    if side is not None:
        side.write(folder / plan.method.name, side_manifest(plan))


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
