"""A plan written as a PEFT LoRA adapter: each merged tensor's delta from a base, truncated by SVD.

Used by ``merge --output-lora`` (a recipe's merged model as an adapter of its base_model)
and ``extract-lora`` (a fine-tune as an adapter of its base: the plan of a ``passthrough``
recipe). Each tensor goes from the executor straight to the truncation, on the executor's
threads; no full model is written, not even temporarily.

For a 2-D linear weight W with delta D = W - W_base, the top ``rank`` singular triplets
D ~ U_r S_r V_r^T (``alloykit.ops.lowrank``) are stored as lora_B = U_r S_r^(1/2) and
lora_A = S_r^(1/2) V_r^T with lora_alpha = r (scale 1). By Eckart-Young the relative
error ||D - B A||_F / ||D||_F >= sqrt(sum_{i>r} s_i^2 / sum_i s_i^2); the randomized SVD
comes within 0.1% of that least error. Changed embeddings and 1-D tensors (norms) are
saved whole as ``modules_to_save``, or skipped. Per-tensor relative errors go to
``alloykit_extract_report.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from alloykit.card import adapter_card, write_record
from alloykit.errors import AlloyError
from alloykit.io.durable import fsync_file
from alloykit.io.lora import LoraCheckpoint
from alloykit.ops.lowrank import truncated_svd
from alloykit.output.faults import after_tensors, fault_point
from alloykit.output.folder import OutputFolder
from alloykit.output.model import Written, default_threads, input_digest, plan_fingerprint
from alloykit.plan.executor import run_jobs
from alloykit.plan.planner import Plan, tensor_seed
from alloykit.roles import role_of

REPORT = "alloykit_extract_report.json"


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    kind: str  # "lora", "saved" or "skipped"
    rel_error: float
    rank: int = 0


@dataclass(frozen=True)
class AdapterOptions:
    """How deltas become an adapter (``extract-lora``'s flags; mergekit-extract-lora's names in brackets)."""

    rank: int  # [--max-rank]
    #: changed embeddings and norms saved whole (modules_to_save); else skipped [--skip-undecomposable]
    save_others: bool = True
    #: B = U S^(1/2), A = S^(1/2) V^T; else B = U, A = S V^T [--distribute-scale]
    distribute_scale: bool = True
    #: embeddings as LoRA (lora_embedding_A/B) instead of saved whole [--embed-lora]
    embed_lora: bool = False
    #: singular values <= this are dropped, so a module's rank may be lower [--sv-epsilon]
    sv_epsilon: float = 0.0
    #: modules saved whole, by full name or last component [--save-module]
    save_modules: tuple[str, ...] = ()
    #: only modules matching one of these regexes (re.search on the module name) [--include-regex]
    include: tuple[str, ...] = ()
    #: modules matching one of these regexes are left out [--exclude-regex]
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def check(self, flag: str = "--rank") -> None:
        if self.rank < 1:
            raise AlloyError(f"{flag} {self.rank}: the rank must be a positive integer")
        if self.sv_epsilon < 0:
            raise AlloyError(f"--sv-epsilon {self.sv_epsilon}: must be >= 0")
        for pattern in self.include + self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise AlloyError(f"regex '{pattern}': {err}; fix the pattern") from None


def is_embedding(name: str) -> bool:
    """Embedding tables (token, position, token-type) are saved whole unless ``embed_lora``: PEFT
    adapts them with another layout, and a fine-tune moves the rows of the tokens it saw, which a
    low rank fits badly. The output head is a linear map that PEFT adapts like any other."""
    return role_of(name).is_embedding


def store_factors(tensors: dict[str, torch.Tensor], name: str, left: torch.Tensor, right: torch.Tensor,
                  layout: str = "linear") -> None:
    """Put PEFT's lora_A/lora_B for the update ``left @ right`` of weight ``name`` (in the
    weight's own layout) into ``tensors``. PEFT computes (B A)^T for Conv1D (fan_in_fan_out)
    and embedding layers, so there B = right^T and A = left^T."""
    module = name.removesuffix(".weight")
    a, b = (right, left) if layout == "linear" else (left.T, right.T)
    ka, kb = ("lora_embedding_A", "lora_embedding_B") if layout == "embedding" else ("lora_A.weight", "lora_B.weight")
    tensors[f"base_model.model.{module}.{ka}"] = a.contiguous().cpu()
    tensors[f"base_model.model.{module}.{kb}"] = b.contiguous().cpu()


def adapter_config(base: str | os.PathLike, rank: int, targets: list[str], to_save: list[str] | None = None,
                   rank_pattern: dict[str, int] | None = None) -> dict:
    """A PEFT LoRA config with scale 1 (lora_alpha = r, per module where the rank differs)."""
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(Path(base).absolute()),
        "r": rank,
        "lora_alpha": rank,
        "target_modules": targets,
        "modules_to_save": to_save or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": None,
    }
    if rank_pattern:
        config["rank_pattern"] = dict(rank_pattern)
        config["alpha_pattern"] = dict(rank_pattern)
    return config


@dataclass
class AdapterBuilder:
    """Collects an adapter's tensors from per-tensor deltas; ``add`` may be called from many threads."""

    options: AdapterOptions
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _named(self, module: str) -> bool:
        return module in self.options.save_modules or module.rsplit(".", 1)[-1] in self.options.save_modules

    def _selected(self, module: str) -> bool:
        o = self.options
        if o.include and not any(re.search(p, module) for p in o.include):
            return False
        return not any(re.search(p, module) for p in o.exclude)

    def add(self, name: str, delta: torch.Tensor, finetuned: Callable[[], torch.Tensor] | None) -> LayerReport:
        """Store one tensor's delta: as lora_A/B when it is a linear weight (or an embedding with
        ``embed_lora``), as the whole fine-tuned tensor (``finetuned()``, a modules_to_save entry)
        when it is not and saving is allowed, else skip it. Returns what was done and its error."""
        report, tensors = self._convert(name, delta, finetuned)
        with self._lock:
            self.tensors.update(tensors)
            self.reports.append(report)
        return report

    def _convert(self, name: str, delta: torch.Tensor, finetuned) -> tuple[LayerReport, dict[str, torch.Tensor]]:
        o = self.options
        shape = tuple(delta.shape)
        module = name.rsplit(".", 1)[0]
        out: dict[str, torch.Tensor] = {}
        if finetuned is not None and self._named(module):
            out[f"base_model.model.{name}"] = finetuned()
            return LayerReport(name, shape, "saved", 0.0), out
        norm = float(torch.linalg.vector_norm(delta))
        if norm == 0:
            return LayerReport(name, shape, "skipped", 0.0), out
        if not self._selected(module):
            return LayerReport(name, shape, "skipped", 1.0), out
        embedding = is_embedding(name)
        if delta.dim() == 2 and name.endswith(".weight") and (o.embed_lora or not embedding):
            gen = torch.Generator().manual_seed(tensor_seed(o.seed, name))
            u, s, vh = truncated_svd(delta, o.rank, generator=gen)
            keep = int((s > o.sv_epsilon).sum()) if o.sv_epsilon > 0 else len(s)
            if keep == 0:
                return LayerReport(name, shape, "skipped", 1.0), out
            u, s, vh = u[:, :keep], s[:keep], vh[:keep]
            if o.distribute_scale:
                root = s.sqrt()
                left, right = u * root, root[:, None] * vh
            else:
                left, right = u, s[:, None] * vh
            err = float(torch.linalg.vector_norm(delta - left @ right)) / norm
            store_factors(out, name, left, right, "embedding" if embedding else "linear")
            return LayerReport(name, shape, "lora", err, keep), out
        if finetuned is not None and name.endswith(".weight") and o.save_others:
            out[f"base_model.model.{name}"] = finetuned()
            return LayerReport(name, shape, "saved", 0.0), out
        return LayerReport(name, shape, "skipped", 1.0), out

    def targets(self) -> tuple[list[str], list[str]]:
        """(target_modules, modules_to_save) of what was added."""
        return ([r.name.removesuffix(".weight") for r in self.reports if r.kind == "lora"],
                [r.name.rsplit(".", 1)[0] for r in self.reports if r.kind == "saved"])

    def config(self, base: str | os.PathLike) -> dict:
        targets, to_save = self.targets()
        lower = {r.name.removesuffix(".weight"): r.rank for r in self.reports if r.kind == "lora" and r.rank < self.options.rank}
        return adapter_config(base, self.options.rank, targets, sorted(set(to_save), key=to_save.index), lower)

    def write(self, folder: Path, base: str | os.PathLike) -> None:
        """adapter_model.safetensors, adapter_config.json and the per-tensor report, fsynced."""
        self.reports.sort(key=lambda r: r.name)
        path = folder / "adapter_model.safetensors"
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata={"format": "pt"})
        fsync_file(path)
        (folder / "adapter_config.json").write_text(json.dumps(self.config(base), indent=2) + "\n")
        (folder / REPORT).write_text(json.dumps([asdict(r) for r in self.reports], indent=1) + "\n")


def write_adapter(
    plan: Plan,
    base: Any,
    out: str | os.PathLike,
    options: AdapterOptions,
    *,
    what: str,
    record: dict[str, Any],
    merged_refs: list[str],
    base_ref: str,
    names_dir: Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
    resume: bool = False,
) -> Written:
    """Compute ``plan`` and write each tensor's delta from checkpoint ``base`` as the adapter ``out``.

    ``record``: what made it (written as ``alloykit_recipe.yaml``); ``merged_refs`` and
    ``base_ref``: the models the card names (relative to ``names_dir``). An adapter is written in one piece at the end,
    so ``resume`` skips a finished identical adapter but otherwise starts over.
    """
    options.check("--output-lora" if what == "merge" else "--rank")
    if isinstance(base, LoraCheckpoint):
        raise AlloyError(f"base model '{base_ref}' is a LoRA adapter; an adapter's base must be a plain model folder "
                         "(fold it first with 'alloykit merge', or name its base)")
    for job in plan.jobs:
        if job.name not in base or tuple(base.info(job.name).shape) != tuple(job.shape):
            raise AlloyError(f"tensor '{job.name}' {list(job.shape)} is not in base model '{base_ref}' with that shape; "
                             "an adapter can only change the base's tensors (is it this model's base?)")
    folder = OutputFolder(out, overwrite=overwrite, what=what)
    fingerprint = plan_fingerprint(plan, "adapter", options=repr(options))
    fingerprint[f"input:{base_ref}"] = input_digest(base)  # the base of extract-lora is not in the plan
    if folder.already_done(fingerprint, resume):
        return Written(folder.target, already_done=True)
    builder = AdapterBuilder(options)

    def sink(name: str, merged: torch.Tensor) -> None:
        if not merged.is_floating_point():
            return
        delta = merged.float() - base.read(name).to(merged.device, torch.float32)
        builder.add(name, delta, lambda: merged.to("cpu", base.info(name).dtype))

    with folder.writing(fingerprint, resume=resume):
        run_jobs(plan, after_tensors(sink), device=device, threads=threads or default_threads(), progress=progress)
        fault_point("tensors-written")
        if not builder.targets()[0]:
            if what == "extract-lora":
                raise AlloyError(f"'{merged_refs[0]}' has no linear layer that differs from '{base_ref}'; nothing to extract")
            raise AlloyError(f"no linear layer of the merged model differs from base model '{base_ref}'; nothing to write")
        builder.write(folder.tmp, getattr(base, "path", base_ref))
        manifest = {"kind": "peft-lora", "command": what, "seed": options.seed, "rank": options.rank,
                    "inputs": [{"ref": label, "path": str(getattr(ck, "path", label))} for label, ck in zip(plan.labels, plan.checkpoints)]
                    + [{"ref": base_ref, "path": str(getattr(base, "path", base_ref)), "role": "base"}],
                    "output": {"tensors": len(builder.tensors), "bytes": sum(t.nbytes for t in builder.tensors.values())},
                    "fingerprint": fingerprint}
        recipe_yaml = yaml.safe_dump(record, sort_keys=False)
        write_record(folder.tmp, recipe_yaml=recipe_yaml, manifest=manifest,
                     card=adapter_card(base_ref, merged_refs, what, summary(builder.reports), recipe_yaml, names_dir))
        fault_point("metadata-written")
        folder.commit()
    return Written(folder.target, reports=builder.reports)


def summary(reports: list[LayerReport]) -> str:
    lora = [r for r in reports if r.kind == "lora"]
    if not lora:
        return "no linear layer as LoRA"
    worst = max(lora, key=lambda r: r.rel_error)
    mean = math.fsum(r.rel_error for r in lora) / len(lora)
    return (f"{len(lora)} linear layers as LoRA (relative Frobenius error mean {mean:.4f}, worst {worst.rel_error:.4f} "
            f"in {worst.name}); {sum(r.kind == 'saved' for r in reports)} tensors saved whole; "
            f"{sum(r.kind == 'skipped' for r in reports)} unchanged or skipped")
