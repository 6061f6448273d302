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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from alloykit.errors import AlloyError, OutputError
from alloykit.io.checkpoint import Checkpoint

EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")


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
    targets: list[str] = []
    to_save: list[str] = []
    try:
        for name, info in ft.tensors.items():
            if name not in bs or bs.info(name).shape != info.shape:
                raise AlloyError(f"tensor '{name}': missing from the base or of another shape; is '{base}' this model's base?")
            if not info.is_float:
                continue
            d = (ft.read(name).to(device, torch.float32) - bs.read(name).to(device, torch.float32))
            norm = float(torch.linalg.vector_norm(d))
            module = name.removesuffix(".weight")
            if norm == 0:
                reports.append(LayerReport(name, info.shape, "skipped", 0.0))
                continue
            if d.dim() == 2 and name.endswith(".weight") and not any(h in name for h in EMBEDDING_HINTS):
                b, a = low_rank(d, rank)
                err = float(torch.linalg.vector_norm(d - b @ a)) / norm
                tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous().cpu()
                tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous().cpu()
                targets.append(module)
                reports.append(LayerReport(name, info.shape, "lora", err))
            elif save_others and name.endswith(".weight"):
                tensors[f"base_model.model.{name}"] = ft.read(name)
                to_save.append(module)
                reports.append(LayerReport(name, info.shape, "saved", 0.0))
            else:
                reports.append(LayerReport(name, info.shape, "skipped", 1.0))
    finally:
        ft.close()
        bs.close()
    if not targets:
        raise AlloyError(f"'{finetuned}' has no linear layer that differs from '{base}'; nothing to extract")
    tmp = out.parent / f".{out.name}.alloykit-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "alloykit_extract_report.json").write_text(json.dumps([r.__dict__ for r in reports], indent=1) + "\n")
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return reports


def summary(reports: list[LayerReport]) -> str:
    lora = [r for r in reports if r.kind == "lora"]
    worst = max(lora, key=lambda r: r.rel_error)
    mean = math.fsum(r.rel_error for r in lora) / len(lora)
    return (f"{len(lora)} linear layers as LoRA (relative Frobenius error mean {mean:.4f}, worst {worst.rel_error:.4f} "
            f"in {worst.name}); {sum(r.kind == 'saved' for r in reports)} tensors saved whole; "
            f"{sum(r.kind == 'skipped' for r in reports)} unchanged or skipped")
