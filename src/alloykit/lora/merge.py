"""Merge LoRA adapters of one base into one PEFT adapter.

- ``cat``: exact. B = [w_1 s_1 B_1 ... w_K s_K B_K], A = [A_1; ...; A_K], alpha = r =
  sum r_i, so B A = sum_i w_i s_i B_i A_i; the rank adds up.
- any registered task-vector method (``task_arithmetic``, ``ties``, ``dare_ties``,
  ``dare_linear``, ``magnitude_prune``, ...): applied to the adapters' dense updates
  D_i = s_i B_i A_i per module (the base's weight plays no part, so the base is 0),
  then truncated back to ``rank`` by SVD (``alloykit.lora.extract.low_rank``); the
  truncation error per module is the discarded singular values (Eckart-Young).
  ``svd`` is ``task_arithmetic`` followed by the truncation (PEFT's ``svd``).
- ``knots``: KnOTS (``alloykit.lora.knots``): the updates' joint SVD U S [V_1 ... V_K]^T,
  the scaled blocks S V_i^T merged by ``knots_merge`` (any registered task-vector method,
  TIES by default) with a zero base, then U times the merged block, truncated to ``rank``.
- ``lorahub``: LoraHub's composition (``alloykit.lora.hub``): A = sum_i w_i s_i A_i,
  B = sum_i w_i B_i (same rank for every adapter); exact, the rank does not grow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError

from alloykit.errors import AlloyError, OutputError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.lora import LoraCheckpoint
from alloykit.lora.extract import low_rank, store_factors, write_adapter
from alloykit.lora.hub import compose_into, layout_of
from alloykit.lora.knots import knots_update
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
    knots_merge: str = "ties",
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
        elif method == "lorahub":
            out_rank = compose_into(cks, weights, modules, tensors)
        else:
            if rank is None:
                raise AlloyError(f"merge-lora --method {method}: give --rank, the rank of the merged adapter")
            out_rank = rank
            inner = knots_merge if method == "knots" else ("task_arithmetic" if method == "svd" else method)
            spec = get_method(inner)
            try:
                per = [spec.model_params.model_validate({"weight": w, **(model_params or {})}) for w in weights]
                shared = spec.params.model_validate(params or {})
            except ValidationError as err:
                e = err.errors()[0]
                key = ".".join(map(str, e["loc"]))
                if e["type"] == "extra_forbidden":
                    raise AlloyError(f"merge-lora: method '{inner}' has no parameter '{key}'; drop --{key}") from None
                raise AlloyError(f"merge-lora: method '{inner}' parameter '{key}': {e['msg']}") from None
            for name in modules:
                shape = cks[0].info(name).shape
                gen = torch.Generator().manual_seed(tensor_seed(seed, name)) if spec.randomized else None

                def run(stack: torch.Tensor, name=name, gen=gen) -> torch.Tensor:
                    return spec.fn(MergeInput(name, stack, torch.zeros(stack.shape[1:]), shared, per, gen))

                if method == "knots":
                    merged = knots_update([ck.factors(name) for ck in cks], shape, run)
                else:
                    merged = run(torch.stack([ck.delta(name) if name in ck._deltas else torch.zeros(shape) for ck in cks]))
                errors[name] = _store_low_rank(name, merged, rank, tensors, layout_of(cks, name))
        cfg = json.loads((Path(adapters[0]) / "adapter_config.json").read_text())
    finally:
        for ck in cks:
            ck.close()
    cfg.update({"r": out_rank, "lora_alpha": out_rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                "target_modules": sorted({m.removesuffix(".weight") for m in modules}),
                "fan_in_fan_out": any(layout_of(cks, m) == "fan_in_fan_out" for m in modules),
                "modules_to_save": None, "base_model_name_or_path": str(Path(base).absolute())})
    write_adapter(out, tensors, cfg)
    return errors


def _store_low_rank(name: str, merged: torch.Tensor, rank: int, tensors: dict, layout: str) -> float:
    """Truncate ``merged`` to ``rank`` into lora_A/B (zero-padded when the matrix is smaller);
    returns the relative truncation error."""
    b, a = low_rank(merged, rank)
    if a.shape[0] < rank:  # a matrix smaller than the rank: pad with zero directions (exact)
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
    norm = float(torch.linalg.vector_norm(merged))
    store_factors(tensors, name, b, a, layout)
    return float(torch.linalg.vector_norm(merged - b @ a)) / norm if norm else 0.0


def _cat(cks: list[LoraCheckpoint], weights: list[float], modules: list[str], tensors: dict) -> int:
    """Exact concatenation of the factors [w_1 s_1 B_1 ... w_K s_K B_K], [A_1; ...; A_K]; modules an
    adapter lacks get zero blocks so every module has the same rank (the sum of the adapters')."""
    ranks = [max((sum(ck.adapter.info(d.a).shape[0] for d in ds) for ds in ck._deltas.values()), default=0) for ck in cks]
    for name in modules:
        out_dim, in_dim = cks[0].info(name).shape
        lefts, rights = [], []
        for ck, w, r in zip(cks, weights, ranks):
            left, right = torch.zeros(out_dim, r), torch.zeros(r, in_dim)
            f = ck.factors(name)
            if f is not None:
                left[:, : f[0].shape[1]] = f[0] * w
                right[: f[1].shape[0]] = f[1]
            lefts.append(left)
            rights.append(right)
        store_factors(tensors, name, torch.cat(lefts, 1), torch.cat(rights), layout_of(cks, name))
    return sum(ranks)
