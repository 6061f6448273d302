"""Merge LoRA adapters of one base into one PEFT adapter.

- ``cat``: exact. B = [w_1 s_1 B_1 ... w_K s_K B_K], A = [A_1; ...; A_K], alpha = r =
  sum r_i, so B A = sum_i w_i s_i B_i A_i; the rank adds up.
- any registered task-vector method (``task_arithmetic``, ``ties``, ``dare_ties``,
  ``dare_linear``, ``magnitude_prune``, ``sce``, ...): applied to the adapters' dense
  updates D_i = s_i B_i A_i per module (the base's weight plays no part, so the base is 0),
  then truncated back to ``rank`` by SVD (``alloykit.ops.lowrank``); the truncation error
  per module is the discarded singular values (Eckart-Young). Parameters are resolved by
  the planner's resolver, as for a merge recipe: per adapter its ``weights`` entry (methods
  with a per-model weight; 1 by default), shared ``parameters`` (``density`` among them),
  filters and layer gradients included. ``svd`` is ``task_arithmetic`` followed by the
  truncation (PEFT's ``svd``).
- ``knots``: KnOTS (``alloykit.lora.knots``): the updates' joint SVD U S [V_1 ... V_K]^T,
  the scaled blocks S V_i^T merged by ``knots_merge`` (any registered task-vector method,
  TIES by default) with a zero base, then U times the merged block, truncated to ``rank``.
- ``lorahub``: LoraHub's composition (``alloykit.lora.hub``): A = sum_i w_i s_i A_i,
  B = sum_i w_i B_i (same rank for every adapter); exact, the rank does not grow.

The request is one typed ``MergeLoraRecipe`` (``alloykit.lora.recipe``), whether it came
from the command's options or a ``--recipe`` file; the adapter is written through the
crash-safe output folder with its recipe, manifest and card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from alloykit import __version__
from alloykit.card import adapter_card, write_record
from alloykit.errors import AlloyError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.durable import fsync_file
from alloykit.io.lora import LoraCheckpoint
from alloykit.lora.hub import compose_into, layout_of
from alloykit.lora.knots import knots_update
from alloykit.lora.recipe import EXACT_METHODS, MergeLoraRecipe, merge_lora_request, resolve_path
from alloykit.methods.registry import MergeInput, get_method
from alloykit.ops.lowrank import low_rank
from alloykit.output.adapter import store_factors
from alloykit.output.folder import OutputFolder
from alloykit.output.journal import digest
from alloykit.output.model import Written, input_digest
from alloykit.plan.params import ParamResolver, check_names
from alloykit.plan.planner import tensor_seed
from alloykit.roles import role_of

#: where a merge-lora user sets a method's parameters
_WHERE_TO_SET = "merge-lora's options (--weights, --density) or the recipe's 'weights' / 'parameters'"


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
    """Write the merged adapter to ``out``; returns each module's relative truncation error.

    ``params``: the method's shared parameters; ``model_params``: parameters applied to every
    adapter (both at the recipe's top level, where per-model keys apply to each model)."""
    request = merge_lora_request({"base": str(base), "adapters": [str(a) for a in adapters], "method": method,
                                  "weights": weights, "rank": rank, "parameters": {**(params or {}), **(model_params or {})} or None,
                                  "seed": seed, "knots_merge": knots_merge})
    return run_merge_lora(request, out).errors


def run_merge_lora(request: MergeLoraRecipe, out: str | os.PathLike, *, recipe_dir: Path | None = None,
                   overwrite: bool = False) -> Written:
    """Run a merge-lora request into the adapter folder ``out``; ``written.errors`` holds each
    module's relative truncation error (empty for the exact methods)."""
    folder = OutputFolder(out, overwrite=overwrite, what="merge-lora")
    base = resolve_path(request.base, recipe_dir)
    paths = [resolve_path(a, recipe_dir) for a in request.adapters]
    if request.method not in EXACT_METHODS:
        _method_spec(request)  # an unknown method or parameter fails before anything is read
    cks: list[LoraCheckpoint] = []
    try:
        cks = [LoraCheckpoint(Checkpoint(base), a, ref) for a, ref in zip(paths, request.adapters)]
        fingerprint = {"recipe": digest(request.model_dump_json()), "alloykit": __version__,
                       **{f"input:{ck.label}": input_digest(ck) for ck in cks}}
        folder.already_done(fingerprint, resume=False)
        modules = sorted({name for ck in cks for name in ck._deltas})
        if not modules:
            raise AlloyError("merge-lora: the adapters hold no LoRA updates")
        if any(ck._replace for ck in cks):
            raise AlloyError("merge-lora: adapters with modules_to_save are not supported; merge them as models ('base+adapter') instead")
        with folder.writing(fingerprint):
            tensors: dict[str, torch.Tensor] = {}
            errors: dict[str, float] = {}
            weights = request.weights or [1.0] * len(cks)
            if request.method == "cat":
                out_rank = _cat(cks, weights, modules, tensors)
            elif request.method == "lorahub":
                out_rank = compose_into(cks, weights, modules, tensors)
            else:
                out_rank = request.rank
                errors = _dense(request, cks, modules, tensors)
            cfg = json.loads((paths[0] / "adapter_config.json").read_text())
            cfg.update({"r": out_rank, "lora_alpha": out_rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                        "target_modules": sorted({m.removesuffix(".weight") for m in modules}),
                        "fan_in_fan_out": any(layout_of(cks, m) == "fan_in_fan_out" for m in modules),
                        "modules_to_save": None, "base_model_name_or_path": str(Path(base).absolute())})
            path = folder.tmp / "adapter_model.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
            fsync_file(path)
            (folder.tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            record = yaml.safe_dump({"merge_lora": request.model_dump(exclude_none=True)}, sort_keys=False)
            worst = max(errors.values(), default=0.0)
            what = f"rank {out_rank}, " + (f"relative truncation error per module: worst {worst:.4f}" if errors else "exact")
            manifest = {"kind": "peft-lora", "command": "merge-lora", "method": request.method, "seed": request.seed,
                        "rank": out_rank, "inputs": [{"ref": ck.label, "path": str(ck.adapter_dir)} for ck in cks]
                        + [{"ref": request.base, "path": str(base), "role": "base"}],
                        "truncation_errors": errors, "fingerprint": fingerprint}
            write_record(folder.tmp, recipe_yaml=record, manifest=manifest,
                         card=adapter_card(request.base, request.adapters, "merge-lora", what, record, recipe_dir))
            folder.commit()
    finally:
        for ck in cks:
            ck.close()
    return Written(folder.target, errors=errors)


def _method_spec(request: MergeLoraRecipe):
    """The registered method that merges the dense updates (or KnOTS' blocks), names checked."""
    inner = request.knots_merge if request.method == "knots" else ("task_arithmetic" if request.method == "svd" else request.method)
    spec = get_method(inner)
    check_names(spec, "merge-lora parameters", request.method_parameters(), "shared")
    if request.weights is not None:
        check_names(spec, "merge-lora --weights", {"weight": 1.0}, "model")
    return spec


def _dense(request: MergeLoraRecipe, cks: list[LoraCheckpoint], modules: list[str], tensors: dict) -> dict[str, float]:
    """A task-vector method (or KnOTS) on each module's dense updates, truncated to the rank."""
    spec = _method_spec(request)
    resolver = ParamResolver(spec, _WHERE_TO_SET)
    shared_level = request.method_parameters()
    has_weight = "weight" in spec.model_params.model_fields
    weights = request.weights or ([1.0] * len(cks) if has_weight else None)
    model_levels = [[{"weight": w} if weights else None, shared_level] for w in (weights or [None] * len(cks))]
    labels = [ck.label for ck in cks]
    layers = max((role_of(m).layer or 0 for m in modules), default=0) + 1
    errors: dict[str, float] = {}
    for name in modules:
        shape = cks[0].info(name).shape
        layer = role_of(name).layer
        t = layer / (layers - 1) if layer is not None and layers > 1 else 0.0
        shared, per = resolver.job([shared_level], name, model_levels, [name] * len(cks), t, labels)
        gen = torch.Generator().manual_seed(tensor_seed(request.seed, name)) if spec.randomized else None

        def run(stack: torch.Tensor, name=name, gen=gen, shared=shared, per=per) -> torch.Tensor:
            return spec.fn(MergeInput(name, stack, torch.zeros(stack.shape[1:]), shared, per, gen))

        if request.method == "knots":
            merged = knots_update([ck.factors(name) for ck in cks], shape, run)
        else:
            merged = run(torch.stack([ck.delta(name) if name in ck._deltas else torch.zeros(shape) for ck in cks]))
        gen_svd = torch.Generator().manual_seed(tensor_seed(request.seed, name))
        errors[name] = _store_low_rank(name, merged, request.rank, tensors, layout_of(cks, name), gen_svd)
    return errors


def _store_low_rank(name: str, merged: torch.Tensor, rank: int, tensors: dict, layout: str,
                    generator: torch.Generator) -> float:
    """Truncate ``merged`` to ``rank`` into lora_A/B (zero-padded when the matrix is smaller);
    returns the relative truncation error."""
    b, a = low_rank(merged, rank, generator=generator)
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
