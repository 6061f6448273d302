"""``alloykit.align``: permute a model's hidden units to match a reference model.

Two ways in:

* folders (``alloykit align MODEL --to REFERENCE OUT``): Hugging Face checkpoints of the
  BERT or Llama families; the spec comes from config.json, the output is an ordinary model
  folder (the model's config and tokenizer, permuted weights, ``alloykit_alignment.json``);
* torch modules (Python): any Hugging Face model of those families, or a plain MLP/CNN whose
  spec is traced with torch.fx on an example input; returns an aligned copy of the module.

Weight matching needs no data. Activation matching needs calibration inputs: a text file
for token models, a tensor / array file / batches for plain modules.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from alloykit import __version__
from alloykit.align.activations import correlations
from alloykit.align.data import calibration_batches, module_batches, token_limit
from alloykit.align.families import hf_spec
from alloykit.align.matching import activation_matching, weight_matching
from alloykit.align.output import check_target, write_model_folder
from alloykit.align.spec import HeadPerm, Perm, Spec, apply_permutations
from alloykit.align.trace import module_spec
from alloykit.errors import AlloyError, CheckpointError
from alloykit.eval.loading import LoadedModel, ModelFolder, load_model, load_tokenizer, model_folder
from alloykit.io.checkpoint import Checkpoint

log = logging.getLogger(__name__)

METHODS = ("weight_matching", "activation_matching")
ALIGNMENT_FILE = "alloykit_alignment.json"


@dataclass
class Alignment:
    """The result: the permutations found, the permuted weights, and a report."""

    spec: Spec
    perms: dict[str, Perm]
    state_dict: dict[str, torch.Tensor]
    report: dict
    module: torch.nn.Module | None = None  # the aligned copy, when modules were given
    path: Path | None = None  # the output folder, when folders were given

    def moved(self) -> dict[str, float]:
        """Per group, the share of units the alignment moved (0 = already aligned)."""
        return {g.name: moved_fraction(self.perms[g.name]) for g in self.spec.groups}


def moved_fraction(perm: Perm) -> float:
    if isinstance(perm, HeadPerm):
        return perm.moved_fraction()
    return float((perm != torch.arange(len(perm))).float().mean()) if len(perm) else 0.0


def _perm_json(perm: Perm) -> Any:
    return perm.to_json() if isinstance(perm, HeadPerm) else perm.tolist()


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise AlloyError(f"alignment method '{method}': choose one of {', '.join(METHODS)}")


def _float_shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Shapes of the floating-point tensors (integer buffers such as BERT's position_ids, which
    newer transformers no longer save, are not weights and are carried over as they are)."""
    return {k: tuple(v.shape) for k, v in sd.items() if v.is_floating_point()}


def _same_tensors(ref: dict[str, tuple], model: dict[str, tuple], ref_label: str, label: str) -> None:
    for name, shape in ref.items():
        if name not in model:
            raise CheckpointError(f"model '{label}': has no tensor '{name}' (the reference '{ref_label}' has it); "
                                  "alignment needs two models of one architecture")
        if tuple(model[name]) != tuple(shape):
            raise CheckpointError(f"model '{label}': tensor '{name}' has shape {list(model[name])}, the reference "
                                  f"{list(shape)}; alignment needs two models of one architecture and size")
    extra = sorted(set(model) - set(ref))
    if extra:
        raise CheckpointError(f"model '{label}': tensor '{extra[0]}' is not in the reference '{ref_label}'")


def align(model: Any, to: Any, out: str | os.PathLike | None = None, *, method: str = "weight_matching",
          data: Any = None, example_input: Any = None, samples: int = 256, batch_size: int = 16, max_len: int = 128,
          max_iter: int = 100, seed: int = 0, permute_outputs: bool = False, overwrite: bool = False,
          allow_pickle: bool = False, progress: bool | Callable[[str], None] = False) -> Alignment:
    """Permute ``model``'s hidden units to match ``to`` (the reference); the result computes the same function.

    ``model``/``to``: two model folders (then ``out`` is required and written atomically) or
    two torch modules (an aligned copy is returned in ``Alignment.module``).
    ``method``: ``weight_matching`` (no data) or ``activation_matching`` (``data``: a text
    file for token models; a tensor, ``(inputs, labels)``, batches or a .npy/.safetensors
    file for plain modules). ``example_input``: a plain module's input for tracing (default:
    the first batch of ``data``). ``permute_outputs``: a bare encoder's output features move
    too (their order is recorded; whatever reads them must follow; a benchmark fine-tune
    folder's ``heads.safetensors`` is permuted with them). ``progress``: True logs each step
    (``alloykit.align`` loggers; the CLI shows them), or a callable receiving each line.
    """
    _check_method(method)
    say = log.info if progress is True else (progress or (lambda s: None))
    if isinstance(model, torch.nn.Module) and isinstance(to, torch.nn.Module):
        return _align_modules(model, to, method=method, data=data, example_input=example_input, samples=samples,
                              batch_size=batch_size, max_iter=max_iter, seed=seed, permute_outputs=permute_outputs,
                              say=say)
    if isinstance(model, torch.nn.Module) or isinstance(to, torch.nn.Module):
        raise AlloyError("give two torch modules or two model folders, not one of each")
    if out is None:
        raise AlloyError("aligning model folders writes a new folder: give the output folder (OUT)")
    return _align_folders(Path(model), Path(to), Path(out), method=method, data=data, samples=samples,
                          batch_size=batch_size, max_len=max_len, max_iter=max_iter, seed=seed,
                          permute_outputs=permute_outputs, overwrite=overwrite, allow_pickle=allow_pickle, say=say)


def spec_for_module(module: torch.nn.Module, example_input: Any = None, *, permute_outputs: bool = False) -> Spec:
    """A Hugging Face model of a supported family by its config; any other module by tracing."""
    config = getattr(module, "config", None)
    sd = module.state_dict()
    if config is not None and hasattr(config, "to_dict") and getattr(config, "model_type", None):
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        floats = {k for k, v in sd.items() if v.is_floating_point()}
        return hf_spec(config.to_dict(), shapes, permute_outputs=permute_outputs, float_names=floats,
                       label=type(module).__name__)
    if example_input is None:
        raise AlloyError(f"{type(module).__name__}: give example_input (or data) so that the module can be traced")
    return module_spec(module, example_input)


def _align_modules(model: torch.nn.Module, to: torch.nn.Module, *, method: str, data: Any, example_input: Any,
                   samples: int, batch_size: int, max_iter: int, seed: int, permute_outputs: bool,
                   say: Callable[[str], None]) -> Alignment:
    is_hf = getattr(to, "config", None) is not None and hasattr(to.config, "to_dict")
    batches = None
    if method == "activation_matching" or (example_input is None and data is not None and not is_hf):
        if data is None:
            raise AlloyError("activation matching needs calibration data (data=...)")
        batches = _hf_batches(data, batch_size) if is_hf else module_batches(data, batch_size, samples)
    if example_input is None and batches is not None and not is_hf:
        example_input = batches[0][:2]
    spec = spec_for_module(to, example_input, permute_outputs=permute_outputs)
    ref_sd, model_sd = to.state_dict(), model.state_dict()
    _same_tensors(_float_shapes(ref_sd), _float_shapes(model_sd), "reference", "model")
    t0 = time.monotonic()
    was = (to.training, model.training)
    to.eval()
    model.eval()
    try:
        perms, report = _match(spec, method, ref_sd, model_sd, to, model, batches, max_iter, seed, say)
    finally:
        to.train(was[0])
        model.train(was[1])
    sd = apply_permutations(model_sd, spec, perms)
    aligned = copy.deepcopy(model)
    aligned.load_state_dict(sd)
    report = _report(spec, perms, report, method, seed, time.monotonic() - t0)
    return Alignment(spec, perms, aligned.state_dict(), report, module=aligned)


def _hf_batches(data: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token batches for a Hugging Face module given from Python: dict batches, or a tensor of ids."""
    if isinstance(data, torch.Tensor):
        return [{"input_ids": data[i:i + batch_size], "attention_mask": torch.ones_like(data[i:i + batch_size])}
                for i in range(0, len(data), batch_size)]
    batches = list(data)
    if not batches or not all(isinstance(b, dict) and "input_ids" in b for b in batches):
        raise AlloyError("a Hugging Face module's calibration data: a tensor of token ids, or batches "
                         "{'input_ids': ..., 'attention_mask': ...}")
    return batches


def _match(spec: Spec, method: str, ref_sd: dict, model_sd: dict, ref_module, model_module, batches,
           max_iter: int, seed: int, say: Callable[[str], None]) -> tuple[dict[str, Perm], dict]:
    if not spec.groups:
        return {}, {"note": "no permutable units"}
    if method == "weight_matching":
        return weight_matching(ref_sd, model_sd, spec, max_iter=max_iter, seed=seed, progress=say)
    say(f"activation matching: observing {len(spec.groups)} groups on {len(batches)} batches")
    corr = correlations(spec, ref_module, model_module, batches)
    return activation_matching(spec, corr)


def _report(spec: Spec, perms: dict[str, Perm], extra: dict, method: str, seed: int, seconds: float) -> dict:
    moved = {g.name: moved_fraction(perms[g.name]) for g in spec.groups}
    return {
        "method": method,
        "seed": seed,
        "family": spec.family,
        "seconds": round(seconds, 2),
        "groups": [{"name": g.name, "units": g.size, "kind": "heads" if g.heads else "units",
                    "moved_fraction": round(moved[g.name], 4)} for g in spec.groups],
        "moved_fraction_mean": round(sum(moved.values()) / max(len(moved), 1), 4),
        "notes": spec.notes,
        **extra,
    }


def read_folder(path: str | os.PathLike, what: str = "model", allow_pickle: bool = False) -> tuple[ModelFolder, dict[str, torch.Tensor]]:
    """A model folder (or a quality-benchmark fine-tune folder holding ``encoder/``) and every tensor of it."""
    folder = model_folder(path, what=what)
    ck = Checkpoint(folder.path, allow_pickle=allow_pickle, label=str(path))
    try:
        return folder, {n: ck.read(n) for n in ck.tensors}
    finally:
        ck.close()


def load_module(folder: ModelFolder) -> LoadedModel:
    """The folder's model (transformers, float32, safetensors only, no remote code) whose parameter
    names are the checkpoint's own (the spec's probes name the checkpoint's modules)."""
    loaded = load_model(folder)
    renamed = next((k for k, v in loaded.names.items() if k != v), None)
    if renamed is not None:
        raise CheckpointError(f"model '{folder.given}': loaded as {type(loaded.module).__name__}, its tensor "
                              f"'{loaded.names[renamed]}' becomes '{renamed}'; activation matching needs the architecture "
                              "config.json names (pass a folder whose 'architectures' matches its weights)")
    return loaded


def _align_folders(model: Path, to: Path, out: Path, *, method: str, data: Any, samples: int, batch_size: int,
                   max_len: int, max_iter: int, seed: int, permute_outputs: bool, overwrite: bool, allow_pickle: bool,
                   say: Callable[[str], None]) -> Alignment:
    out = out.absolute()
    check_target(out, overwrite)
    if method == "activation_matching" and data is None:
        raise AlloyError("activation matching needs calibration text: --data FILE.txt|FILE.jsonl")
    ref_folder, ref_sd = read_folder(to, "reference", allow_pickle)
    folder, model_sd = read_folder(model, "model", allow_pickle)
    ref_cfg, cfg = ref_folder.config, folder.config
    if cfg.get("model_type") != ref_cfg.get("model_type"):
        raise CheckpointError(f"model '{model}' is a {cfg.get('model_type')} model, the reference '{to}' a "
                              f"{ref_cfg.get('model_type')}; alignment needs one architecture")
    _same_tensors(_float_shapes(ref_sd), _float_shapes(model_sd), str(to), str(model))
    spec = hf_spec(ref_cfg, {k: tuple(v.shape) for k, v in ref_sd.items()}, permute_outputs=permute_outputs,
                   float_names={k for k, v in ref_sd.items() if v.is_floating_point()}, label=str(to))
    t0 = time.monotonic()
    say(f"align: {len(spec.groups)} permutation groups ({spec.family}), {method}")
    ref_module = model_module = batches = None
    source = None
    if method == "activation_matching":
        ref_loaded, model_loaded = load_module(ref_folder), load_module(folder)
        ref_module, model_module = ref_loaded.module, model_loaded.module
        batches, source = calibration_batches(data, load_tokenizer(ref_loaded), samples=samples,
                                              max_len=token_limit(ref_cfg, max_len), batch_size=batch_size)
    perms, extra = _match(spec, method, ref_sd, model_sd, ref_module, model_module, batches, max_iter, seed, say)
    sd = apply_permutations(model_sd, spec, perms)
    report = _report(spec, perms, extra, method, seed, time.monotonic() - t0)
    record = {
        "alloykit_version": __version__,
        "torch_version": torch.__version__,
        "model": str(model),
        "reference": str(to),
        "data": source,
        **report,
        "permutations": {name: _perm_json(p) for name, p in perms.items()},
    }
    side = {}
    if folder.heads_file is not None:  # the quality benchmark's layout: task heads read the encoder's output features
        side["heads.safetensors"] = _heads(folder.heads_file, perms.get("residual"))
    path = write_model_folder(out, sd, source=folder.path, json_files={ALIGNMENT_FILE: record}, overwrite=overwrite,
                              side_tensors=side)
    return Alignment(spec, perms, sd, report, path=path)


def _heads(path: Path, residual: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A heads.safetensors (TASK.weight [classes, hidden], TASK.bias), its inputs in the aligned stream's order."""
    from safetensors.torch import load_file

    heads = load_file(str(path))
    if residual is None:
        return heads
    return {k: v.index_select(1, residual).contiguous() if k.endswith(".weight") else v for k, v in heads.items()}
