"""Calibration inputs for activation matching, REPAIR and linear-path evaluation.

* token models (Hugging Face folders): a ``.txt`` file (one text per line) or a ``.jsonl``
  file (a "text" per line, optionally a "label"), tokenized with the model folder's
  tokenizer (else UTF-8 bytes modulo the vocabulary, as ``alloykit stats`` does), padded
  into batches of ``{"input_ids", "attention_mask"}``;
* plain modules: a tensor of inputs, an ``(inputs, labels)`` pair, an iterable of batches
  (tensors or ``(inputs, labels)`` pairs, e.g. a DataLoader), or an image/array file
  (``.npy`` read without pickle, ``.safetensors`` holding an ``inputs`` tensor).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alloykit.errors import AlloyError
from alloykit.stats.collect import Example, pad, read_texts, text_examples


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


def token_batches(examples: list[Example], batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(examples), batch_size):
        ids, mask = pad(examples[i:i + batch_size])
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def token_limit(config: dict, max_len: int) -> int:
    """``max_len`` capped by the model's position table (a longer text would not fit)."""
    return min(max_len, config.get("max_position_embeddings") or max_len)


def text_batches(folder: Path, data: Path, *, samples: int, max_len: int, vocab: int, batch_size: int,
                 log=lambda s: None) -> tuple[list[dict[str, torch.Tensor]], str]:
    """Padded token batches of the first ``samples`` texts of ``data`` (.txt or .jsonl)."""
    examples, source = text_examples(folder, data, samples, max_len, vocab, log)
    if not examples:
        raise AlloyError(f"--data '{data}': no text of at least 2 tokens")
    return token_batches(examples, batch_size), source


def labelled_texts(path: Path, samples: int) -> tuple[list[str], list[int]]:
    """(texts, labels) of a .jsonl file whose lines hold "text" and an integer "label"."""
    if path.suffix != ".jsonl":
        raise AlloyError(f"--data '{path}': a classifier is evaluated on a .jsonl file with \"text\" and \"label\" per line")
    texts, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                labels.append(int(row["label"]))
            except (ValueError, KeyError, TypeError):
                raise AlloyError(f"--data '{path}' line {no}: expected a JSON object with \"text\" and an integer \"label\"") from None
            if len(texts) >= samples:
                break
    return texts, labels


__all__ = ["labelled_texts", "module_batches", "read_texts", "tensor_file", "text_batches", "token_batches", "token_limit"]
