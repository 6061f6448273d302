"""Writing an aligned (or repaired) model folder through the one output folder (``alloykit.output``).

The folder is written beside the target as ``.NAME.alloykit-tmp`` (locked) and renamed into
place once whole, so the target either does not exist or is complete, as for a merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from alloykit.io.writer import ShardedWriter, plan_shards
from alloykit.output.folder import OutputFolder
from alloykit.output.journal import digest
from alloykit.output.model import DEFAULT_SHARD_SIZE
from alloykit.vocab.files import TOKENIZER_FILES

COPIED = ("config.json", "generation_config.json") + TOKENIZER_FILES


def check_target(out: Path, overwrite: bool) -> OutputFolder:
    """Refuse an occupied target before any work is done (the merge's rule and message)."""
    folder = OutputFolder(out, overwrite=overwrite, what="alignment")
    folder.already_done({}, resume=False)  # raises when the target is taken
    return folder


def fill_folder(folder: Path, tensors: dict[str, torch.Tensor], *, source: Path | None, json_files: dict[str, dict],
                max_shard_size: int = DEFAULT_SHARD_SIZE, copy_names: list[str] | None = None,
                side_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write into the (existing, empty) ``folder``: sharded safetensors of ``tensors``, the source
    folder's files ``copy_names`` (default: config, generation config, tokenizer), ``json_files``,
    and ``side_tensors`` (file name -> tensors, e.g. a benchmark folder's heads.safetensors)."""
    shards = plan_shards([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_shard_size)
    writer = ShardedWriter(folder, shards, {n: t.dtype for n, t in tensors.items()},
                           {n: tuple(t.shape) for n, t in tensors.items()})
    writer.open()
    try:
        for name, t in tensors.items():
            writer.write(name, t.contiguous())
    finally:
        writer.close()
    writer.write_index()
    if source is not None:
        for name in COPIED if copy_names is None else copy_names:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
    for name, data in json_files.items():
        (folder / name).write_text(json.dumps(data, indent=1) + "\n")
    for name, side in (side_tensors or {}).items():
        save_file(side, str(folder / name), metadata={"format": "pt"})


def write_model_folder(out: str | Path, tensors: dict[str, torch.Tensor], *, source: Path | None,
                       json_files: dict[str, dict], overwrite: bool = False,
                       max_shard_size: int = DEFAULT_SHARD_SIZE, copy_names: list[str] | None = None,
                       side_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """``fill_folder`` into the output folder ``out``, published atomically."""
    folder = check_target(Path(out), overwrite)
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    with folder.writing({"alignment": digest(json.dumps(sorted(json_files), default=str))}, space=need):
        fill_folder(folder.tmp, tensors, source=source, json_files=json_files, max_shard_size=max_shard_size,
                    copy_names=copy_names, side_tensors=side_tensors)
        folder.commit()
    return folder.target
