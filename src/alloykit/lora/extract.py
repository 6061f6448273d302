"""Extract a PEFT LoRA adapter from a fine-tune: truncated SVD of each linear layer's delta.

For every 2-D weight W (not an embedding) with delta D = W_ft - W_base, keep the top
``rank`` singular triplets: D ~ U_r S_r V_r^T, stored as lora_B = U_r S_r^(1/2) and
lora_A = S_r^(1/2) V_r^T with lora_alpha = r (scale 1). By Eckart-Young the relative
error ||D - B A||_F / ||D||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2) is the least any
rank-r update can reach. Large matrices use randomized SVD (``torch.svd_lowrank``,
Halko et al. 2011). Changed embeddings and 1-D tensors (norms, biases) are saved
whole as ``modules_to_save`` or skipped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from alloykit.errors import AlloyError, OutputError
from alloykit.io.checkpoint import Checkpoint
from alloykit.roles import role_of


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    kind: str  # "lora", "saved" or "skipped"
    rel_error: float


def low_rank(delta: torch.Tensor, rank: int, *, randomized: bool | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-``rank`` approximation of ``delta`` (randomized when large)."""
    m, n = delta.shape
    r = min(rank, m, n)
    if randomized is None:
        randomized = min(m, n) > 4 * r and m * n > 4_000_000
    if randomized:
        torch.manual_seed(seed)  # svd_lowrank draws its sketch from the global generator
        u, s, v = torch.svd_lowrank(delta, q=min(r + 10, m, n), niter=6)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    root = s.sqrt()
    return u * root, root[:, None] * vh


def extract_lora(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    rank: int,
    *,
    save_others: bool = True,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> list[LayerReport]:
    """Write a PEFT adapter folder ``out`` approximating ``finetuned - base`` at ``rank``."""
    if rank < 1:
        raise AlloyError(f"--rank {rank}: must be a positive integer")
    ft = Checkpoint(finetuned, allow_pickle=allow_pickle)
    bs = Checkpoint(base, allow_pickle=allow_pickle)
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"output folder '{out}' exists and is not empty; choose another folder")
    tensors: dict[str, torch.Tensor] = {}
    reports: list[LayerReport] = []
    try:
        for name, info in ft.tensors.items():
            if name not in bs or bs.info(name).shape != info.shape:
                raise AlloyError(f"tensor '{name}': missing from the base or of another shape; is '{base}' this model's base?")
            if not info.is_float:
                continue
            d = ft.read(name).to(device, torch.float32) - bs.read(name).to(device, torch.float32)
            reports.append(extract_tensor(name, d, rank, tensors, (lambda n=name: ft.read(n)) if save_others else None))
    finally:
        ft.close()
        bs.close()
    targets, to_save = targets_of(reports)
    if not targets:
        raise AlloyError(f"'{finetuned}' has no linear layer that differs from '{base}'; nothing to extract")
    write_adapter(out, tensors, adapter_config(base, rank, targets, to_save), reports)
    return reports


def adapter_config(base: str | os.PathLike, rank: int, targets: list[str], to_save: list[str] | None = None) -> dict:
    """A PEFT LoRA config with scale 1 (lora_alpha = r)."""
    return {
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


def write_adapter(out: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict,
                  reports: list[LayerReport] | None = None) -> Path:
    """Write a PEFT adapter folder atomically: into ``.NAME.alloykit-tmp``, then renamed."""
    out = Path(out).absolute()
    tmp = out.parent / f".{out.name}.alloykit-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    if reports is not None:
        (tmp / "alloykit_extract_report.json").write_text(json.dumps([r.__dict__ for r in reports], indent=1) + "\n")
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out


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


def extract_tensor(name: str, delta: torch.Tensor, rank: int, tensors: dict[str, torch.Tensor],
                   finetuned: Callable[[], torch.Tensor] | None = None) -> LayerReport:
    """Store one tensor's delta in ``tensors``: as lora_A/B when it is a linear weight,
    as the whole fine-tuned tensor (``finetuned()``, a modules_to_save entry) when it is
    not and ``finetuned`` is given, else skip it. Returns what was done and its error."""
    shape = tuple(delta.shape)
    norm = float(torch.linalg.vector_norm(delta))
    module = name.removesuffix(".weight")
    if norm == 0:
        return LayerReport(name, shape, "skipped", 0.0)
    # embedding tables (token, position, token-type) are saved whole: PEFT adapts them with another
    # layout, and a fine-tune moves the rows of the tokens it saw, which a low rank fits badly. The
    # output head is a linear map that PEFT adapts like any other (subspace merging instead treats
    # it as an embedding: it averages it, see methods/subspace.py)
    if delta.dim() == 2 and name.endswith(".weight") and not role_of(name).is_embedding:
        b, a = low_rank(delta, rank)
        err = float(torch.linalg.vector_norm(delta - b @ a)) / norm
        store_factors(tensors, name, b, a)
        return LayerReport(name, shape, "lora", err)
    if finetuned is not None and name.endswith(".weight"):
        tensors[f"base_model.model.{name}"] = finetuned()
        return LayerReport(name, shape, "saved", 0.0)
    return LayerReport(name, shape, "skipped", 1.0)


def targets_of(reports: list[LayerReport]) -> tuple[list[str], list[str]]:
    """(target_modules, modules_to_save) of an extraction."""
    return ([r.name.removesuffix(".weight") for r in reports if r.kind == "lora"],
            [r.name.removesuffix(".weight") for r in reports if r.kind == "saved"])


def summary(reports: list[LayerReport]) -> str:
    lora = [r for r in reports if r.kind == "lora"]
    worst = max(lora, key=lambda r: r.rel_error)
    mean = math.fsum(r.rel_error for r in lora) / len(lora)
    return (f"{len(lora)} linear layers as LoRA (relative Frobenius error mean {mean:.4f}, worst {worst.rel_error:.4f} "
            f"in {worst.name}); {sum(r.kind == 'saved' for r in reports)} tensors saved whole; "
            f"{sum(r.kind == 'skipped' for r in reports)} unchanged or skipped")
