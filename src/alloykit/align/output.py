"""Writing an aligned (or repaired) model folder: atomically, like a merge.

The folder is written beside the target as ``.NAME.alloykit-tmp`` and renamed into place
once whole, so the target either does not exist or is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from alloykit.vocab.files import TOKENIZER_FILES
from alloykit.errors import OutputError
from alloykit.io.writer import ShardedWriter, plan_shards
from alloykit.merge import DEFAULT_SHARD_SIZE, _replace, temp_dir_for

COPIED = ("config.json", "generation_config.json") + TOKENIZER_FILES


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an occupied target before any work is done."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError(f"output folder '{out}' exists and is not empty; choose another folder or pass --overwrite")


def write_model_folder(out: str | Path, tensors: dict[str, torch.Tensor], *, source: Path | None,
                       json_files: dict[str, dict], overwrite: bool = False,
                       max_shard_size: int = DEFAULT_SHARD_SIZE, copy_names: list[str] | None = None,
                       side_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Sharded safetensors of ``tensors``, the source folder's files ``copy_names`` (default: config,
    generation config, tokenizer), ``json_files``, and ``side_tensors`` (file name -> tensors, e.g.
    a benchmark folder's heads.safetensors)."""
    out = Path(out).absolute()
    check_target(out, overwrite)
    tmp = temp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        shards = plan_shards([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_shard_size)
        writer = ShardedWriter(tmp, shards, {n: t.dtype for n, t in tensors.items()},
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
                    shutil.copyfile(source / name, tmp / name)
        for name, data in json_files.items():
            (tmp / name).write_text(json.dumps(data, indent=1) + "\n")
        for name, side in (side_tensors or {}).items():
            save_file(side, str(tmp / name), metadata={"format": "pt"})
        _replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write the output in '{tmp}': {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
