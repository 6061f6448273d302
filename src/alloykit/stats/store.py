"""Statistics folders: what ``alloykit stats collect`` writes and data-dependent merges read.

A folder holds ``alloykit_stats.json`` (kinds, samples, data source, model, version)
and one safetensors file per kind, keyed like the model:

* ``fisher.safetensors``: the diagonal Fisher of every trainable tensor, same name and
  shape as the tensor (float32);
* ``gram.safetensors``: for every ``nn.Linear`` weight ``W`` [out, in], the Gram of the
  layer's inputs ``X^T X / n`` [in, in] (float32, averaged over the n tokens it saw,
  recorded per tensor in the JSON under ``gram.tokens``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from alloykit import __version__
from alloykit.errors import CheckpointError, OutputError
from alloykit.io.checkpoint import Checkpoint, StateDictCheckpoint
from alloykit.io.durable import fsync_file
from alloykit.output.folder import OutputFolder

META_FILE = "alloykit_stats.json"
FORMAT = "alloykit-stats"
VERSION = 1
KINDS = ("fisher", "gram")
KIND_FILES = {kind: f"{kind}.safetensors" for kind in KINDS}


@dataclass
class Stats:
    """One model's statistics: per kind, a checkpoint of tensors (read lazily) and the summary."""

    label: str
    meta: dict[str, Any]
    checkpoints: dict[str, Any] = field(default_factory=dict)  # kind -> Checkpoint | StateDictCheckpoint

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if k in self.checkpoints]

    def norm(self, kind: str) -> float | None:
        """The statistics' L2 norm over all tensors (recorded at collection), or None."""
        value = (self.meta.get(kind) or {}).get("norm")
        return float(value) if value is not None else None

    def close(self) -> None:
        for ck in self.checkpoints.values():
            ck.close()


def open_stats(path: str | os.PathLike, model_label: str, make: str | None = None) -> Stats:
    """The statistics folder ``path`` of model ``model_label`` (headers only); ``make``: the
    command that writes it, for the message when it is missing."""
    folder = Path(path)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {META_FILE}"
        raise CheckpointError(f"statistics '{folder}' of model '{model_label}' {what}; "
                              f"write it with: {make or f'alloykit stats collect {model_label} --out {folder}'}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"statistics '{folder}': {META_FILE} cannot be read ({err}); collect them again") from None
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"statistics '{folder}': {META_FILE} is not alloykit statistics version <= {VERSION} "
                              f"(format {meta.get('format')!r}, version {meta.get('version')!r}); collect them again")
    cks = {k: Checkpoint(folder / f, label=f"{folder}/{f}") for k, f in KIND_FILES.items() if (folder / f).is_file()}
    return Stats(str(folder), meta, cks)


def memory_stats(label: str, tensors: dict[str, dict[str, torch.Tensor]], meta: dict | None = None) -> Stats:
    """In-memory statistics (kind -> name -> tensor), e.g. for ``merge_state_dicts``; the
    Fisher norm is computed here when ``meta`` does not give it."""
    meta = dict(meta or {})
    for kind, sd in tensors.items():
        meta.setdefault(kind, {}).setdefault("norm", l2_norm(sd))
    return Stats(label, meta, {k: StateDictCheckpoint(sd, f"{label} {k}") for k, sd in tensors.items()})


def l2_norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(float(t.double().pow(2).sum()) for t in tensors.values()) ** 0.5)


def write_stats(out: str | os.PathLike, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
    """Write a statistics folder through the crash-safe output folder (``alloykit.output.folder``):
    written aside, fsynced, renamed into place, so ``out`` is absent, the old statistics, or the
    new ones. An existing statistics folder is replaced; any other non-empty folder is refused."""
    target = Path(out)
    if target.is_dir() and any(target.iterdir()) and not (target / META_FILE).is_file():
        raise OutputError(f"statistics folder '{target}' exists and holds something else (no {META_FILE}); "
                          "choose another folder")
    folder = OutputFolder(target, overwrite=True, what="statistics collection")
    full = {"format": FORMAT, "version": VERSION, "alloykit": __version__, "kinds": sorted(tensors), **meta}
    with folder.writing({"stats": ",".join(sorted(tensors))}):
        for kind, sd in tensors.items():
            path = folder.tmp / KIND_FILES[kind]
            save_file({k: v.detach().float().contiguous() for k, v in sd.items()}, path)
            fsync_file(path)
            full.setdefault(kind, {})["norm"] = l2_norm(sd)
        (folder.tmp / META_FILE).write_text(json.dumps(full, indent=1))
        folder.commit()
    return target
