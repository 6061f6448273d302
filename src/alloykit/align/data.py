"""Calibration inputs for activation matching and REPAIR.

* token models (Hugging Face folders): a ``.txt`` file (one text per line) or a ``.jsonl``
  file (a "text" per line), read by :func:`alloykit.eval.textfiles.read_text_file` and
  tokenized with the model folder's tokenizer (:func:`alloykit.eval.loading.load_tokenizer`:
  UTF-8 bytes modulo the vocabulary without one), padded into batches of
  ``{"input_ids", "attention_mask"}``;
* plain modules: a tensor of inputs, an ``(inputs, labels)`` pair, an iterable of batches
  (tensors or ``(inputs, labels)`` pairs, e.g. a DataLoader), or an image/array file
  (``.npy`` read without pickle, ``.safetensors`` holding an ``inputs`` tensor).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alloykit.errors import AlloyError
from alloykit.eval.loading import TextTokenizer
from alloykit.eval.textfiles import read_text_file


def tensor_file(path: Path, key: str = "inputs") -> torch.Tensor:
    if not path.is_file():
        raise AlloyError(f"--data '{path}' does not exist")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if key in tensors:
            return tensors[key]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise AlloyError(f"--data '{path}' holds {len(tensors)} tensors and none named '{key}'; name the inputs '{key}'")
    raise AlloyError(f"--data '{path}': give a .npy or .safetensors file of inputs (or a tensor from Python)")


def module_batches(data: Any, batch_size: int = 256, samples: int | None = None) -> list[Any]:
    """Input batches for a plain module (labels, if given, are dropped)."""
    if isinstance(data, (str, os.PathLike)):
        data = tensor_file(Path(data))
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) \
            and isinstance(data[1], torch.Tensor) and len(data[0]) == len(data[1]):
        data = data[0]
    if isinstance(data, torch.Tensor):
        x = data[:samples] if samples else data
        return [x[i:i + batch_size].float() for i in range(0, len(x), batch_size)]
    out, seen = [], 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out.append(x.float())
        seen += len(x)
        if samples and seen >= samples:
            break
    if not out:
        raise AlloyError("the calibration data gave no batches")
    return out


def token_batches(seqs: list[list[int]], pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded ``{"input_ids", "attention_mask"}`` batches of token id lists."""
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def token_limit(config: dict, max_len: int) -> int:
    """``max_len`` capped by the model's position table (a longer text would not fit)."""
    return min(max_len, config.get("max_position_embeddings") or max_len)


def calibration_batches(path: str | os.PathLike, tokenizer: TextTokenizer, *, samples: int, max_len: int,
                        batch_size: int) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Token batches of the first ``samples`` texts of a .txt/.jsonl file, and what was read (path, SHA-256, counts)."""
    f = read_text_file(path)
    seqs = [ids for ids in (tokenizer.encode(t, max_len) for t in f.texts[:samples]) if ids]
    if not seqs:
        raise AlloyError(f"calibration data '{path}': no text gave a token")
    record = {**f.record(used=len(seqs)), "tokens": tokenizer.describe, "max_len": max_len}
    return token_batches(seqs, tokenizer.pad_id, batch_size), record
