"""What the search commands read: model folders, per-task heads, unlabelled inputs.

Two kinds of model:

* the quality benchmark's text encoder with per-task heads (``--task``): a model is a
  fine-tune cache folder holding ``encoder/`` and ``heads.safetensors`` (keys
  ``TASK.weight``, ``TASK.bias``), or an encoder folder with ``heads.safetensors``
  beside it or in its parent; each task's head is looked up across the models;
* a Hugging Face causal LM (``--data``): one text or JSONL file per data set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from alloykit.errors import AlloyError, CheckpointError, PlanError
from alloykit.io.checkpoint import Checkpoint
from alloykit.search.adamerging import TaskVectorModel
from alloykit.vocab.files import has_tokenizer

#: the quality benchmark's splits (its full preset): seed 0, 1000 test, 200 validation examples per task
SPLIT_SIZES = dict(seed=0, n_test=1000, n_val=200)


@dataclass
class ModelRef:
    given: str  # as the user wrote it
    weights: Path  # the folder the recipe names (safetensors + config.json)
    heads: Path | None  # heads.safetensors, when there is one


def resolve(path: str | os.PathLike) -> ModelRef:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model '{path}': no such file or folder; give a model folder (or a fine-tune folder holding encoder/)")
    weights = p / "encoder" if (p / "encoder").is_dir() else p
    heads = next((h for h in (p / "heads.safetensors", weights / "heads.safetensors", p.parent / "heads.safetensors")
                  if h.is_file()), None)
    return ModelRef(str(path), weights, heads)


def checked_pair(base: str, models: Sequence[str]) -> tuple[ModelRef, list[ModelRef], Checkpoint, list[Checkpoint]]:
    """Resolve the base and the models; every model must have the base's tensors with the base's shapes."""
    if not models:
        raise AlloyError("no models given; list the fine-tuned models after --models")
    base_ref, refs = resolve(base), [resolve(m) for m in models]
    base_ck = Checkpoint(base_ref.weights, label=base)
    cks = [Checkpoint(r.weights, label=r.given) for r in refs]
    for ck in cks:
        for name, info in base_ck.tensors.items():
            if name not in ck and not info.dtype.is_floating_point:
                continue  # integer buffers (BERT position_ids) are copied from the base, as merge does
            if name not in ck:
                raise PlanError(f"model '{ck.label}': has no tensor '{name}' (the base has it); "
                                "the models must share the base's architecture")
            if tuple(ck.info(name).shape) != tuple(info.shape):
                raise PlanError(f"model '{ck.label}': tensor '{name}' has shape {list(ck.info(name).shape)}, the base "
                                f"{list(info.shape)}; the models must share the base's architecture")
        extra = sorted(set(ck.tensors) - set(base_ck.tensors))
        if extra:
            raise PlanError(f"model '{ck.label}': tensor '{extra[0]}' is not in the base; "
                            "the models must share the base's architecture")
    return base_ref, refs, base_ck, cks


def task_vectors(module: torch.nn.Module, base_ck: Checkpoint, cks: Sequence[Checkpoint]) -> TaskVectorModel:
    """Task vectors of ``module``'s parameters (loaded from the base, so theta_0 is not copied)."""
    params = dict(module.named_parameters())
    missing = [n for n in params if n not in base_ck]
    if missing:
        raise CheckpointError(f"model '{base_ck.label}': the module's parameter '{missing[0]}' is not a tensor of the "
                              "checkpoint (prefixed names?); save the model with save_pretrained")
    module.requires_grad_(False)
    return TaskVectorModel({n: p.detach() for n, p in params.items()}, [ck.read for ck in cks])


def load_heads(refs: Sequence[ModelRef], tasks: Sequence[str]) -> list[torch.nn.Linear]:
    from safetensors.torch import load_file

    files = [(r, load_file(r.heads)) for r in refs if r.heads is not None]
    out = []
    for task in tasks:
        found = next((hw for _, hw in files if f"{task}.weight" in hw and f"{task}.bias" in hw), None)
        if found is None:
            where = ", ".join(str(r.heads) for r, _ in files) or "none of the models has a heads.safetensors"
            raise AlloyError(f"task '{task}': no head '{task}.weight' among the models' heads ({where}); "
                             "give fine-tune folders that hold the task's head")
        w, b = found[f"{task}.weight"].float(), found[f"{task}.bias"].float()
        head = torch.nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict({"weight": w, "bias": b})
        out.append(head.eval().requires_grad_(False))
    return out


def _quiet_loading() -> None:
    """No 'Loading weights' progress bars from transformers on the command line."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def encoder_and_tokenizer(base: ModelRef):
    """The base encoder (fp32) and a tokenizer: the base folder's, else the benchmark base's (same vocabulary)."""
    from alloykit.eval.model import base_model_path, load_encoder, load_tokenizer

    _quiet_loading()
    encoder = load_encoder(base.weights)
    has_tok = has_tokenizer(base.weights)
    tokenizer = load_tokenizer(base.weights if has_tok else base_model_path())
    if len(tokenizer) > encoder.config.vocab_size:
        raise AlloyError(f"base '{base.given}': has no tokenizer files and the benchmark tokenizer's {len(tokenizer)} "
                         f"tokens exceed its vocabulary of {encoder.config.vocab_size}; add the tokenizer to the folder")
    return encoder, tokenizer


def task_texts(task_names: Sequence[str], split: str, samples: int | None):
    """(task objects, texts) of one split of each task, at the benchmark's split sizes."""
    from alloykit.eval.tasks import get_task

    tasks = [get_task(t) for t in task_names]
    texts = []
    for t in tasks:
        part = getattr(t.splits(**SPLIT_SIZES), split).texts
        texts.append(part[:samples] if samples else part)
    return tasks, texts


def encode_unlabelled(tokenizer, texts: list[str], max_len: int):
    """Token ids of texts only (labels are never read: the search is unsupervised)."""
    from alloykit.eval.model import Encoded

    enc = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"].sum(1), torch.zeros(len(texts), dtype=torch.long))


# -- causal LMs ----------------------------------------------------------------------------
def read_texts(path: str | os.PathLike) -> list[str]:
    """A .txt file (one text per non-empty line) or .jsonl (one JSON string, or object with "text", per line)."""
    p = Path(path)
    if not p.is_file():
        raise AlloyError(f"data file '{path}': not found; give a .txt (one text per line) or .jsonl file")
    lines = [ln for ln in p.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if p.suffix != ".jsonl":
        return lines
    out = []
    for i, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln)
        except ValueError:
            raise AlloyError(f"data file '{path}' line {i}: not valid JSON") from None
        text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise AlloyError(f"data file '{path}' line {i}: need a JSON string or an object with a \"text\" string")
        out.append(text)
    return out


def causal_lm_and_tokens(base: ModelRef, files: Sequence[str], samples: int | None, max_len: int):
    """The base causal LM (fp32) and each file's texts as token id tensors.

    Tokenized with the base folder's tokenizer; a folder without one (e.g. alloykit's
    Llama-shaped test fixtures) gets UTF-8 bytes as token ids (needs a vocabulary >= 256).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_loading()
    if not (base.weights / "config.json").is_file():
        raise AlloyError(f"base '{base.given}': no config.json; a causal LM search needs a Hugging Face model folder")
    model = AutoModelForCausalLM.from_pretrained(str(base.weights), dtype=torch.float32).eval()
    has_tok = has_tokenizer(base.weights)
    data = []
    for f in files:
        texts = read_texts(f)[:samples] if samples else read_texts(f)
        if not texts:
            raise AlloyError(f"data file '{f}': holds no text")
        if has_tok:
            tok = AutoTokenizer.from_pretrained(str(base.weights))
            seqs = [torch.tensor(tok(t, truncation=True, max_length=max_len)["input_ids"], dtype=torch.long) for t in texts]
        else:
            if model.config.vocab_size < 256:
                raise AlloyError(f"base '{base.given}': has no tokenizer and a vocabulary of {model.config.vocab_size} "
                                 "< 256, so bytes cannot stand in for tokens; add the tokenizer files")
            seqs = [torch.tensor(list(t.encode("utf-8")[:max_len]), dtype=torch.long) for t in texts]
        data.append([s for s in seqs if len(s)])
    pad = getattr(model.config, "pad_token_id", None) or 0
    return model, data, int(pad)
