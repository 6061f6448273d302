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
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from alloykit import __version__
from alloykit.align.activations import correlations
from alloykit.align.data import module_batches, text_batches, token_limit
from alloykit.align.families import hf_spec
from alloykit.align.matching import activation_matching, weight_matching
from alloykit.align.output import check_target, write_model_folder
from alloykit.align.spec import HeadPerm, Perm, Spec, apply_permutations
from alloykit.align.trace import module_spec
from alloykit.errors import AlloyError, CheckpointError
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


def _stderr(msg: str) -> None:
    print(f"alloykit: {msg}", file=sys.stderr, flush=True)


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
    too (their order is recorded; whatever reads them must follow). ``progress``: True
    prints to stderr, or a callable receiving each line.
    """
    _check_method(method)
    say = _stderr if progress is True else (progress or (lambda s: None))
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


def read_config(folder: Path, label: str) -> dict:
    if not folder.is_dir():
        raise CheckpointError(f"model '{label}': '{folder}' is not a model folder")
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"model '{label}': no config.json in '{folder}'; alignment derives the permutations "
                              "from the architecture in config.json") from None
    except (OSError, ValueError):
        raise CheckpointError(f"model '{label}': config.json is not valid JSON") from None


def load_hf_module(folder: Path, config: dict) -> torch.nn.Module:
    """The folder's model class named in config.json (built-in transformers classes only, no remote code)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    arch = (config.get("architectures") or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModel
    return cls.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False).eval()


def read_folder(folder: Path, label: str, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor) of a model folder."""
    config = read_config(folder, label)
    ck = Checkpoint(folder, allow_pickle=allow_pickle, label=label)
    try:
        return config, {n: ck.read(n) for n in ck.tensors}
    finally:
        ck.close()


def _align_folders(model: Path, to: Path, out: Path, *, method: str, data: Any, samples: int, batch_size: int,
                   max_len: int, max_iter: int, seed: int, permute_outputs: bool, overwrite: bool, allow_pickle: bool,
                   say: Callable[[str], None]) -> Alignment:
    out = out.absolute()
    check_target(out, overwrite)
    if method == "activation_matching" and data is None:
        raise AlloyError("activation matching needs calibration text: --data FILE.txt|FILE.jsonl")
    ref_cfg, ref_sd = read_folder(to, str(to), allow_pickle)
    cfg, model_sd = read_folder(model, str(model), allow_pickle)
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
        ref_module, model_module = load_hf_module(to, ref_cfg), load_hf_module(model, cfg)
        batches, source = text_batches(to, Path(data), samples=samples, max_len=token_limit(ref_cfg, max_len),
                                       vocab=ref_cfg.get("vocab_size", 256), batch_size=batch_size)
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
    path = write_model_folder(out, sd, source=model, json_files={ALIGNMENT_FILE: record}, overwrite=overwrite)
    return Alignment(spec, perms, sd, report, path=path)
