"""Side outputs: named tensors a method emits beside the merged model (e.g. EMR's task masks).

A method registered with ``side_outputs=True`` calls ``MergeInput.emit(group, tensor)``
for each output tensor. ``SideOutputs`` collects them in memory (on the CPU) while the
merge runs and, at the end, writes one safetensors file per group into
``<output>/<method>/<group>.safetensors``, keyed like the model, plus a
``manifest.json`` naming the inputs in the order the method saw them. The files are
written into the merge's temporary folder, so they appear with the model or not at all.
Side tensors should be small (EMR packs its masks to one bit per entry): they are held
until the merge ends.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from alloykit.io.durable import fsync_file

MANIFEST = "manifest.json"


class SideOutputs:
    """Thread-safe collector of side outputs: group -> {tensor name -> tensor}."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, side: dict[str, torch.Tensor]) -> None:
        with self._lock:
            for group, tensor in side.items():
                self.groups.setdefault(group, {})[name] = tensor.contiguous()

    def write(self, folder: Path, manifest: dict[str, Any]) -> None:
        """One safetensors file per group and ``manifest.json`` (with the group names added), fsynced."""
        folder.mkdir(parents=True, exist_ok=True)
        for group, tensors in sorted(self.groups.items()):
            path = folder / f"{group}.safetensors"
            save_file(tensors, str(path), metadata={"format": "pt"})
            fsync_file(path)
        path = folder / MANIFEST
        path.write_text(json.dumps({**manifest, "groups": sorted(self.groups)}, indent=2) + "\n")
        fsync_file(path)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())
