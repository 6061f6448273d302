"""Merge LoRA adapters of one base into one PEFT adapter.

- ``cat``: exact. A = [s_1 w_1 A_1; ...; s_K w_K A_K], B = [B_1 ... B_K], alpha = r =
  sum r_i, so B A = sum_i w_i s_i B_i A_i; the rank adds up.
- any registered task-vector method (``task_arithmetic``, ``ties``, ``dare_ties``,
  ``dare_linear``, ``magnitude_prune``, ...): applied to the adapters' dense updates
  D_i = s_i B_i A_i per module (the base's weight plays no part, so the base is 0),
  then truncated back to ``rank`` by SVD (``alloykit.lora.extract.low_rank``); the
  truncation error per module is the discarded singular values (Eckart-Young).
  ``svd`` is ``task_arithmetic`` followed by the truncation (PEFT's ``svd``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from alloykit.errors import AlloyError, OutputError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.lora import LoraCheckpoint
from alloykit.lora.extract import low_rank
from alloykit.methods.registry import MergeInput, get_method
from alloykit.plan.planner import tensor_seed


def merge_adapters(
    adapters: list[str | os.PathLike],
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "cat",
    weights: list[float] | None = None,
    rank: int | None = None,
    params: dict | None = None,
    model_params: dict | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Write the merged adapter to ``out``; returns each module's relative truncation error."""
    if len(adapters) < 1:
        raise AlloyError("merge-lora: give at least one adapter")
    weights = weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise AlloyError(f"merge-lora: {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    cks = [LoraCheckpoint(Checkpoint(base), a, str(a)) for a in adapters]
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"output folder '{out}' exists and is not empty; choose another folder")
    try:
        modules = sorted({name for ck in cks for name in ck._deltas})
        if not modules:
            raise AlloyError("merge-lora: the adapters hold no LoRA updates")
        if any(ck._replace for ck in cks):
            raise AlloyError("merge-lora: adapters with modules_to_save are not supported; merge them as models ('base+adapter') instead")
        tensors: dict[str, torch.Tensor] = {}
        errors: dict[str, float] = {}
        if method == "cat":
            out_rank = _cat(cks, weights, modules, tensors)
        else:
            if rank is None:
                raise AlloyError(f"merge-lora --method {method}: give --rank, the rank of the merged adapter")
            out_rank = rank
            spec = get_method("task_arithmetic" if method == "svd" else method)
            for name in modules:
                shape = cks[0].info(name).shape
                deltas = torch.stack([ck.delta(name) if name in ck._deltas else torch.zeros(shape) for ck in cks])
                per = [{"weight": w, **(model_params or {})} for w in weights]
                mp = [spec.model_params.model_validate(p) for p in per]
                gen = torch.Generator().manual_seed(tensor_seed(seed, name)) if spec.randomized else None
                x = MergeInput(name, deltas, torch.zeros(shape), spec.params.model_validate(params or {}), mp, gen)
                merged = spec.fn(x)
                b, a = low_rank(merged, rank)
                if a.shape[0] < rank:  # a matrix smaller than the rank: pad with zero directions (exact)
                    a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
                    b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
                norm = float(torch.linalg.vector_norm(merged))
                errors[name] = float(torch.linalg.vector_norm(merged - b @ a)) / norm if norm else 0.0
                module = name.removesuffix(".weight")
                tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
                tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        cfg = json.loads((Path(adapters[0]) / "adapter_config.json").read_text())
    finally:
        for ck in cks:
            ck.close()
    cfg.update({"r": out_rank, "lora_alpha": out_rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                "target_modules": sorted({m.removesuffix(".weight") for m in modules}), "fan_in_fan_out": False,
                "modules_to_save": None, "base_model_name_or_path": str(Path(base).absolute())})
    tmp = out.parent / f".{out.name}.alloykit-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return errors


def _cat(cks: list[LoraCheckpoint], weights: list[float], modules: list[str], tensors: dict) -> int:
    """Exact concatenation; modules an adapter lacks get zero blocks so every module has the same rank."""
    ranks = [max((ck.adapter.info(d.a).shape[0] for ds in ck._deltas.values() for d in ds), default=0) for ck in cks]
    total = sum(ranks)
    for name in modules:
        out_dim, in_dim = cks[0].info(name).shape
        a_rows, b_cols = [], []
        for ck, w, r in zip(cks, weights, ranks):
            a_blk, b_blk = torch.zeros(r, in_dim), torch.zeros(out_dim, r)
            for d in ck._deltas.get(name, []):
                if d.transpose:
                    raise AlloyError("merge-lora --method cat: fan_in_fan_out and embedding adapters are not supported; use --method svd")
                a, b = ck.adapter.read(d.a).float(), ck.adapter.read(d.b).float()
                a_blk[: a.shape[0]] = a * (d.scale * w)
                b_blk[:, : b.shape[1]] = b
            a_rows.append(a_blk)
            b_cols.append(b_blk)
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.cat(a_rows).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.cat(b_cols, 1).contiguous()
    return total
