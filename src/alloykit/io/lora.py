"""PEFT LoRA adapters as merge inputs, folded into their base lazily, tensor by tensor.

``LoraCheckpoint`` presents a base model's tensors with the adapter applied on read:
W' = W + s * B @ A (transposed for ``fan_in_fan_out`` layers and for embeddings), with
s = alpha / r, or alpha / sqrt(r) for rsLoRA; per-module r and alpha from the tensors'
shapes and ``rank_pattern`` / ``alpha_pattern``. ``modules_to_save`` (and saved
embedding layers) replace the base tensor; a trained ``lora_B`` bias adds s * b.
No temporary full checkpoint is written. DoRA and non-LoRA adapters are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from alloykit.errors import CheckpointError
from alloykit.io.checkpoint import Checkpoint

PREFIX = "base_model.model."
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


@dataclass(frozen=True)
class _Delta:
    a: str  # adapter tensor names
    b: str
    scale: float
    transpose: bool


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module name ending in it (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(^|.*\.){key}$", module):
            return value
    return default


class LoraCheckpoint:
    """A base checkpoint with a LoRA adapter folded into its tensors on read."""

    def __init__(self, base: Checkpoint, adapter_dir: str | Path, label: str):
        self.base = base
        self.label = label
        self.path = base.path
        self.adapter_dir = Path(adapter_dir)
        cfg = self._config()
        self.adapter = self._adapter_checkpoint()
        self.tensors = dict(base.tensors)
        self._deltas: dict[str, list[_Delta]] = {}
        self._replace: dict[str, str] = {}
        self._bias: dict[str, list[tuple[str, float]]] = {}
        self._index(cfg)

    # -- adapter parsing -----------------------------------------------------------
    def _config(self) -> dict:
        p = self.adapter_dir / "adapter_config.json"
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"adapter '{self.adapter_dir}': no adapter_config.json; a PEFT adapter folder needs one") from None
        except (OSError, ValueError):
            raise CheckpointError(f"adapter '{self.adapter_dir}': adapter_config.json is not valid JSON") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"adapter '{self.adapter_dir}': peft_type {cfg.get('peft_type')!r} is not supported; alloykit folds LoRA adapters")
        if cfg.get("use_dora"):
            raise CheckpointError(
                f"adapter '{self.adapter_dir}': DoRA adapters (use_dora: true) are not supported yet; "
                "merge it into its base with peft's merge_and_unload() and use that folder"
            )
        return cfg

    def _adapter_checkpoint(self) -> Checkpoint:
        for name in ADAPTER_FILES:
            f = self.adapter_dir / name
            if f.is_file():
                return Checkpoint(f, allow_pickle=self.base.allow_pickle, label=f"{self.label} (adapter)")
        raise CheckpointError(f"adapter '{self.adapter_dir}': no adapter_model.safetensors")

    def _index(self, cfg: dict) -> None:
        alpha0, rslora = cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora"))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        alphas = cfg.get("alpha_pattern") or {}
        names = list(self.adapter.tensors)
        for key in names:
            if not key.startswith(PREFIX):
                raise CheckpointError(f"adapter '{self.adapter_dir}': tensor '{key}' does not start with '{PREFIX}'; not a PEFT adapter")
            rest = key[len(PREFIX):]
            if ".lora_A." in rest or rest.endswith(".lora_embedding_A"):
                embedding = rest.endswith(".lora_embedding_A")
                module = rest.rsplit(".lora_embedding_A", 1)[0] if embedding else rest.split(".lora_A.", 1)[0]
                b_key = key.replace("lora_embedding_A", "lora_embedding_B") if embedding else key.replace(".lora_A.", ".lora_B.")
                if b_key not in self.adapter:
                    raise CheckpointError(f"adapter '{self.adapter_dir}': '{key}' has no matching lora_B tensor")
                r = self.adapter.info(key).shape[0]
                alpha = _pattern_value(alphas, module, alpha0)
                scale = alpha / math.sqrt(r) if rslora else alpha / r
                target = module + ".weight"
                self._check_target(target, key)
                d = _Delta(key, b_key, scale, transpose=embedding or fan_in_fan_out)
                self._check_shape(target, d)
                self._deltas.setdefault(target, []).append(d)
                bias_key = b_key.removesuffix("weight") + "bias"
                if not embedding and bias_key in self.adapter:
                    self._check_target(module + ".bias", bias_key)
                    self._bias.setdefault(module + ".bias", []).append((bias_key, scale))
            elif ".lora_B." in rest or rest.endswith(".lora_embedding_B"):
                continue  # read with its lora_A
            else:  # modules_to_save, saved embedding layers, trained biases: replace the base tensor
                target = re.sub(r"\.modules_to_save\.[^.]+\.", ".", rest).replace(".base_layer.", ".")
                self._check_target(target, key)
                if self.adapter.info(key).shape != self.base.info(target).shape:
                    raise CheckpointError(
                        f"adapter '{self.adapter_dir}': '{key}' has shape {list(self.adapter.info(key).shape)} but the base's "
                        f"'{target}' has {list(self.base.info(target).shape)}; is this the adapter's base model?"
                    )
                self._replace[target] = key

    def _check_target(self, target: str, key: str) -> None:
        if target not in self.base:
            raise CheckpointError(
                f"adapter '{self.adapter_dir}': '{key}' targets '{target}', which the base model '{self.base.label}' does not have; "
                "is this the adapter's base model?"
            )

    def _check_shape(self, target: str, d: _Delta) -> None:
        a, b = self.adapter.info(d.a).shape, self.adapter.info(d.b).shape
        shape = (b[0], a[1]) if len(a) == 2 and len(b) == 2 and b[1] == a[0] else None
        if shape is not None and d.transpose:
            shape = (shape[1], shape[0])
        if shape != self.base.info(target).shape:
            raise CheckpointError(
                f"adapter '{self.adapter_dir}': lora_B @ lora_A for '{target}' has shape {list(shape) if shape else [list(b), list(a)]} "
                f"but the base tensor has {list(self.base.info(target).shape)}; is this the adapter's base model?"
            )

    # -- Checkpoint interface --------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str):
        return self.base.info(name)

    def delta(self, name: str) -> torch.Tensor | None:
        """The adapter's dense update of one base tensor (float32), or None."""
        total = None
        for d in self._deltas.get(name, []):
            upd = (self.adapter.read(d.b).float() @ self.adapter.read(d.a).float()) * d.scale
            upd = upd.T if d.transpose else upd
            total = upd if total is None else total + upd
        for key, scale in self._bias.get(name, []):
            upd = self.adapter.read(key).float() * scale
            total = upd if total is None else total + upd
        return total

    def layout(self, name: str) -> str:
        """How PEFT stores this weight's update: 'linear' (B A), 'fan_in_fan_out' (Conv1D:
        (B A)^T) or 'embedding' (lora_embedding_A/B, (B A)^T); 'linear' when not adapted."""
        for d in self._deltas.get(name, []):
            if d.a.endswith(".lora_embedding_A"):
                return "embedding"
            if d.transpose:
                return "fan_in_fan_out"
        return "linear"

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L, R) with L @ R the adapter's weight update of ``name`` (scale and transpose folded
        in; several updates of one weight are concatenated along the rank), or None."""
        lefts, rights = [], []
        for d in self._deltas.get(name, []):
            b, a = self.adapter.read(d.b).float(), self.adapter.read(d.a).float()
            left, right = (a.T, b.T * d.scale) if d.transpose else (b * d.scale, a)
            lefts.append(left)
            rights.append(right)
        return (torch.cat(lefts, 1), torch.cat(rights)) if lefts else None

    def read(self, name: str) -> torch.Tensor:
        if name in self._replace:  # modules_to_save / saved embedding layer, then any LoRA update on top
            t = self.adapter.read(self._replace[name]).to(self.base.info(name).dtype)
        else:
            t = self.base.read(name)
        upd = self.delta(name)
        return t if upd is None else t.float() + upd

    def config(self) -> dict | None:
        return self.base.config()

    @property
    def allow_pickle(self) -> bool:
        return self.base.allow_pickle

    @property
    def folder(self) -> Path:
        return self.base.folder

    @property
    def files(self) -> list[str]:
        return self.base.files + self.adapter.files

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter names (a local path), or None."""
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("base_model_name_or_path")
