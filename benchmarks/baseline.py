"""The physical baselines a merge is judged against, on the same bytes.

- ``read-sum-write``: read every input tensor (safe_open), sum them with fp32
  accumulation, cast back, write safetensors shards (save_file). Nothing clever.
- ``copy``: read every input file once and write one model's worth of bytes.

    python benchmarks/baseline.py read-sum-write OUT MODEL [MODEL ...]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def shard_map(model: Path) -> dict[str, str]:
    index = model / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def read_sum_write(out: Path, models: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    wmap = shard_map(models[0])
    by_shard: dict[str, list[str]] = {}
    for name, shard in wmap.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
        result = {}
        handles = [safe_open(str(m / shard_map(m)[names[0]]), "pt") for m in models]
        for name in names:
            acc = handles[0].get_tensor(name).float()
            for h in handles[1:]:
                acc += h.get_tensor(name).float()
            result[name] = acc.to(torch.bfloat16)
        save_file(result, str(out / shard), metadata={"format": "pt"})


def copy(out: Path, models: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for m in models[1:]:
        for f in m.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    for f in models[0].iterdir():
        shutil.copyfile(f, out / f.name)


if __name__ == "__main__":
    mode, out, *models = sys.argv[1:]
    {"read-sum-write": read_sum_write, "copy": copy}[mode](Path(out), [Path(m) for m in models])
