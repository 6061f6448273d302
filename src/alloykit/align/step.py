"""The recipe step ``align:``: align the inputs to base_model, merge, optionally REPAIR.

::

    merge_method: linear
    base_model: ./run-a
    models:
      - {model: ./run-a, parameters: {weight: 0.5}}
      - {model: ./run-b, parameters: {weight: 0.5}}
    align: {method: weight_matching}             # or activation_matching with data: calib.txt
    #      repair: true, data: calib.txt         # REPAIR the merged model afterwards

Each model other than base_model gets an aligned copy inside the output's locked working
folder (``.OUT.alloykit-tmp``, removed before publishing); the merge reads those copies under
the recipe's own names, so the recorded recipe and model card are the user's. The output
also holds ``alloykit_alignment.json`` (per input: method, share of units moved).

REPAIR's endpoints are the models under ``models:`` (aligned), weighted by their scalar
``weight`` parameters (equal when absent), on the first ``samples`` texts of ``data``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from alloykit import __version__
from alloykit.align.api import ALIGNMENT_FILE, align
from alloykit.align.data import calibration_batches, token_limit
from alloykit.align.families import hf_spec
from alloykit.align.output import check_target, fill_folder
from alloykit.align.repair import repair
from alloykit.config import AlignStep, Recipe
from alloykit.errors import OutputError, RecipeError
from alloykit.eval.loading import load_model, load_tokenizer, model_folder
from alloykit.io.checkpoint import Checkpoint
from alloykit.merge import WriteOptions, run_merge
from alloykit.output.journal import digest
from alloykit.output.model import Written
from alloykit.request import MergeRequest

log = logging.getLogger(__name__)


def _resolve(ref: str, recipe_dir: Path | None) -> Path:
    p = Path(ref).expanduser()
    if not p.exists() and recipe_dir is not None and not p.is_absolute() and (recipe_dir / p).exists():
        return recipe_dir / p
    return p


def steps(recipe: Recipe) -> dict[str, AlignStep]:
    """model reference -> its alignment step (base_model and opted-out models excluded)."""
    out = {}
    for m in recipe.models or []:
        if m.model == recipe.base_model or m.align is False:
            continue
        step = m.align if isinstance(m.align, AlignStep) else (AlignStep() if m.align is True else recipe.align)
        if step is not None:
            out[m.model] = step
    return out


def _weight(m) -> float:
    w = (m.parameters or {}).get("weight", 1.0)
    return float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else 1.0


def merge_aligned(request: MergeRequest, out_dir: str | os.PathLike, options: WriteOptions) -> Written:
    """Run the recipe's ``align:`` step, merge the aligned inputs, REPAIR if asked; publish ``out_dir`` atomically."""
    recipe, rdir = request.recipe, request.recipe_dir
    if options.resume:
        raise OutputError("--resume is not available for recipes with an 'align' step (the aligned inputs are "
                          "recomputed); rerun without --resume")
    folder = check_target(Path(out_dir), options.overwrite)
    base = _resolve(recipe.base_model, rdir)
    todo = steps(recipe)
    top = recipe.align
    if top is not None and top.repair:
        spec = hf_spec(json.loads((base / "config.json").read_text()), {n: i.shape for n, i in Checkpoint(base).tensors.items()},
                       permute_outputs=True)
        if not any(g.producers for g in spec.groups):
            raise RecipeError(f"'align.repair': the {spec.family} family has no layer REPAIR can rescale")
    progress = options.progress
    say = log.info if progress else (lambda s: None)
    final_seed = request.seed if request.seed is not None else (recipe.seed or 0)
    fingerprint = {"recipe": digest(recipe.to_yaml()), "seed": str(final_seed), "alloykit": __version__}
    # the output folder's lock is held from the first alignment to the publication; the aligned copies
    # live inside its working folder, so a failure removes them with it and 'alloykit clean' finds them
    # after a kill
    with folder.writing(fingerprint):
        work = folder.tmp / "alloykit-align-work"
        work.mkdir()
        preloaded, records = {}, {}
        for i, (ref, step) in enumerate(todo.items()):
            say(f"align: '{ref}' to '{recipe.base_model}' ({step.method})")
            data = str(_resolve(step.data, rdir)) if step.data else None
            res = align(_resolve(ref, rdir), base, work / f"input{i}", method=step.method, data=data,
                        samples=step.samples, max_iter=step.max_iter, seed=final_seed,
                        allow_pickle=request.allow_pickle, progress=progress)
            preloaded[ref] = Checkpoint(res.path, label=ref)
            records[ref] = {"reference": recipe.base_model, "method": step.method, "data": step.data,
                            "moved_fraction_mean": res.report["moved_fraction_mean"],
                            "groups": res.report["groups"]}
        merged = run_merge(request, work / "merged", replace(options, overwrite=False, resume=False),
                           preloaded=preloaded).path
        _record(merged, records, {ref: str(_resolve(ref, rdir)) for ref in records})
        if top is not None and top.repair:
            say(f"repair: rescaling the merged units to the inputs' statistics on {top.data}")
            _repair(merged, recipe, preloaded, rdir, top, folder.tmp)
        else:
            for p in merged.iterdir():
                os.rename(p, folder.tmp / p.name)
        for ck in preloaded.values():  # the aligned copies are read; their files go with the work folder
            ck.close()
        shutil.rmtree(work)
        folder.commit()
    return Written(folder.target)


def _record(folder: Path, records: dict, originals: dict[str, str]) -> None:
    (folder / ALIGNMENT_FILE).write_text(json.dumps({"inputs": records}, indent=1) + "\n")
    manifest_path = folder / "alloykit_manifest.json"
    if manifest_path.is_file():  # the merge read the aligned copies: record the user's paths
        manifest = json.loads(manifest_path.read_text())
        for entry in manifest.get("inputs", []):
            if entry.get("ref") in originals:
                entry["path"] = originals[entry["ref"]]
                entry["aligned_to_base"] = True
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def _repair(merged: Path, recipe: Recipe, preloaded: dict, rdir: Path | None, step: AlignStep, into: Path) -> None:
    """REPAIR the merged folder's model and write it into the (empty) folder ``into``."""
    loaded = load_model(model_folder(merged))
    module, config = loaded.module, loaded.folder.config
    endpoints, weights = [], []
    for m in recipe.models:
        path = preloaded[m.model].path if m.model in preloaded else _resolve(m.model, rdir)
        endpoints.append(load_model(model_folder(path)).module)
        weights.append(_weight(m))
    batches, _ = calibration_batches(_resolve(step.data, rdir), load_tokenizer(loaded), samples=step.samples,
                                     max_len=token_limit(config, 128), batch_size=16)
    sd = module.state_dict()
    spec = hf_spec(config, {k: tuple(v.shape) for k, v in sd.items()}, permute_outputs=True,  # every layer REPAIR may rescale
                   float_names={k for k, v in sd.items() if v.is_floating_point()})
    repair(module, endpoints, spec, batches, weights=weights)
    saved = Checkpoint(merged).tensors
    names = {v: k for k, v in loaded.names.items()}  # checkpoint name -> module name
    tensors = {k: module.state_dict()[names.get(k, k)].detach().to(info.dtype).contiguous() for k, info in saved.items()}
    keep = [p.name for p in merged.iterdir() if p.is_file() and not p.name.endswith(".safetensors")
            and p.name != "model.safetensors.index.json"]
    fill_folder(into, tensors, source=merged, json_files={}, copy_names=keep)
