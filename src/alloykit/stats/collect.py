"""Statistics of a model on calibration data: diagonal Fisher and the Grams of linear inputs.

Two kinds of model, one loop:

* the quality benchmark's encoder and task head (``alloykit.eval``): a BERT/MiniLM
  encoder, mean-pooled embeddings into the task's linear head; log-likelihood =
  log softmax of the head's logits at the label;
* a Hugging Face causal LM on a user's text: log-likelihood = sum over the sequence's
  positions of the next token's log-probability (the negated summed cross-entropy).

What is computed (``collect``):

* ``fisher`` (empirical) and ``fisher_sampled``: the diagonal Fisher
  F = 1/N sum_n (d log p(y_n | x_n) / d theta)^2 of every parameter, per example:
  examples run one at a time (batch 1) with ``torch.autograd``, so each squared
  gradient is one example's, not a batch's. Empirical uses the data's labels (the next
  tokens); sampled draws each label from the model's own predictive distribution with
  a seeded ``torch.Generator`` (the true Fisher's Monte Carlo estimate, one draw).
* ``gram``: for every ``nn.Linear`` of the model, G = X^T X / n over the n tokens its
  input saw (padding excluded), accumulated in float32 by forward hooks in batches
  without gradients; n is recorded per tensor.

Memory: the model, one float32 accumulator per parameter (Fisher) and one
in_features^2 float32 matrix per linear layer (Gram).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alloykit.errors import AlloyError
from alloykit.vocab.files import has_tokenizer

KIND_CHOICES = ("fisher", "fisher_sampled", "gram", "all")


@dataclass
class Example:
    """One calibration example: token ids [T]; ``label`` (a class, for a head) or None (next tokens)."""

    ids: torch.Tensor
    label: int | None = None
    head: str | None = None  # which task head scores it (encoder models)


@dataclass
class Target:
    """A model to collect statistics on, and how to score an example batch.

    ``logits(batch) -> (logits [B, P, C], labels [B, P], mask [B, P])``: P scored
    positions per example (1 for a classifier head, T-1 next tokens for a causal LM).
    ``hook_mask`` is the token mask [B, T] of the current batch, for the Gram hooks.
    """

    module: torch.nn.Module
    describe: str
    score: Callable[[list[Example], "Target"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    hook_mask: torch.Tensor | None = None
    heads: dict[str, torch.nn.Linear] = field(default_factory=dict)


def pad(examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], mask [B, T]) right-padded to the longest example."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask


def score_causal(examples: list[Example], target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad(examples)
    target.hook_mask = mask
    logits = target.module(input_ids=ids, attention_mask=mask).logits
    return logits[:, :-1], ids[:, 1:], mask[:, 1:] * mask[:, :-1]


def score_encoder(examples: list[Example], target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from alloykit.eval.model import forward

    ids, mask = pad(examples)
    target.hook_mask = mask
    pooled = forward(target.module, ids, mask)
    logits = torch.stack([target.heads[e.head](p) for e, p in zip(examples, pooled)]) if target.heads else pooled
    labels = torch.tensor([e.label for e in examples])
    return logits.unsqueeze(1), labels.unsqueeze(1), torch.ones(len(examples), 1, dtype=torch.long)


class Progress:
    def __init__(self, what: str, total: int, log: Callable[[str], None], every: float = 2.0, unit: str = "samples"):
        self.what, self.total, self.log, self.every, self.unit = what, total, log, every, unit
        self.start = self.last = time.monotonic()
        self.done = self.batches = 0

    def step(self, n: int) -> None:
        self.done += n
        self.batches += 1
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            batches = f"{self.batches} batches, " if self.unit == "samples" else ""
            self.log(f"  {self.what}: {batches}{self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s")


def fisher(target: Target, examples: list[Example], *, sampled: bool, seed: int = 0,
           log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every parameter, averaged over ``examples`` (one backward pass each)."""
    module = target.module
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    prog = Progress("fisher (sampled)" if sampled else "fisher (empirical)", len(examples), log)
    for ex in examples:
        module.zero_grad(set_to_none=True)
        logits, labels, mask = target.score([ex], target)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if sampled:  # labels from the model's own predictive distribution
            probs = logp.detach().exp().reshape(-1, logp.shape[-1])
            labels = torch.multinomial(probs, 1, generator=gen).view(labels.shape)
        ll = (logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum()
        ll.backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n].add_(p.grad.float().square())
        prog.step(1)
    module.zero_grad(set_to_none=True)
    return {n: a / max(len(examples), 1) for n, a in acc.items()}


class StopForward(Exception):
    """Raised by a hook once the layers being measured have run (the rest of the pass is not needed)."""


@torch.no_grad()
def gram(target: Target, examples: list[Example], *, batch_size: int = 16, log: Callable[[str], None] = print,
         linears: dict[str, torch.nn.Linear] | None = None,
         stop_after: torch.nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """X^T X / n of the inputs of ``linears`` (default: every linear layer of the model, by module
    name) over the tokens of ``examples`` (padding excluded); ``stop_after``: a module after
    which each forward pass is cut short."""
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def hook(name: str):
        def fn(mod: torch.nn.Linear, inputs, output) -> None:
            x = inputs[0].detach()
            m = target.hook_mask
            if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m.bool()]
            x = x.reshape(-1, x.shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32)
                tokens[name] = 0
            sums[name].addmm_(x.T, x)
            tokens[name] += x.shape[0]
        return fn

    def stop(mod, inputs, output) -> None:
        raise StopForward

    if linears is None:
        linears = {name: mod for name, mod in target.module.named_modules() if isinstance(mod, torch.nn.Linear)}
    handles = [mod.register_forward_hook(hook(f"{name}.weight")) for name, mod in linears.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    prog = Progress("gram", len(examples), log)
    try:
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            try:
                target.score(batch, target)
            except StopForward:
                pass
            prog.step(len(batch))
    finally:
        for h in handles:
            h.remove()
        target.hook_mask = None
    return {n: s / max(tokens[n], 1) for n, s in sums.items()}, tokens


def collect(target: Target, examples: list[Example], kind: str, *, batch_size: int = 16, seed: int = 0,
            log: Callable[[str], None] = print) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """kind -> {tensor name: statistic}, and the summary for ``alloykit_stats.json``."""
    if kind not in KIND_CHOICES:
        raise AlloyError(f"--kind {kind}: choose one of {', '.join(KIND_CHOICES)}")
    if not examples:
        raise AlloyError("no calibration examples: the data gave none (lines need at least 2 tokens)")
    target.module.eval()  # no dropout: statistics of the deterministic model
    out: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict = {"samples": len(examples)}
    if kind in ("fisher", "fisher_sampled", "all"):
        sampled = kind == "fisher_sampled"
        out["fisher"] = fisher(target, examples, sampled=sampled, seed=seed, log=log)
        meta["fisher"] = {"variant": "sampled" if sampled else "empirical", "per_example": "batch 1, torch.autograd",
                          "seed": seed}
    if kind in ("gram", "all"):
        out["gram"], tokens = gram(target, examples, batch_size=batch_size, log=log)
        meta["gram"] = {"tokens": tokens, "normalised": "X^T X / tokens", "inputs": "own"}
    return out, meta


# -- loading models and data --------------------------------------------------------------

def _offline() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging

    logging.disable_progress_bar()  # our own progress lines go to stderr; no loading bars between them


def heads_file(model: Path, head: str | None) -> Path | None:
    """The benchmark's heads file: ``--head``, else MODEL/heads.safetensors or MODEL/../heads.safetensors."""
    if head:
        return Path(head)
    for cand in (model / "heads.safetensors", model.parent / "heads.safetensors"):
        if cand.is_file():
            return cand
    return None


def encoder_folder(model: Path) -> Path:
    return model / "encoder" if (model / "encoder" / "config.json").is_file() else model


def load_heads(path: Path, tasks: list[str]) -> dict[str, torch.nn.Linear]:
    from safetensors.torch import load_file

    sd = load_file(path)
    heads = {}
    for t in tasks:
        if f"{t}.weight" not in sd:
            have = sorted({k.rsplit(".", 1)[0] for k in sd})
            raise AlloyError(f"heads '{path}' have no head for task '{t}' (heads: {', '.join(have)}); pass --task with one of them")
        w, b = sd[f"{t}.weight"], sd[f"{t}.bias"]
        heads[t] = torch.nn.Linear(w.shape[1], w.shape[0])
        heads[t].load_state_dict({"weight": w, "bias": b})
        heads[t].requires_grad_(False)  # only the encoder is merged: its Fisher is what is kept
    return heads


def _tokenizer(folder: Path):
    if not has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _need_folder(model: Path) -> None:
    if not model.is_dir():
        raise AlloyError(f"model '{model}' is not a folder (alloykit reads local model folders)")


def encoder_target(model: Path, tasks: list[str], head: str | None) -> Target:
    from alloykit.eval.model import load_encoder

    _need_folder(model)
    _offline()
    enc = load_encoder(encoder_folder(model))
    hf = heads_file(model, head)
    if hf is None and tasks:
        raise AlloyError(f"model '{model}': no heads.safetensors beside it; pass --head HEADS.safetensors")
    heads = load_heads(hf, tasks) if hf is not None else {}
    return Target(enc, f"encoder + task heads ({', '.join(tasks)})", score_encoder, heads=heads)


def task_examples(model: Path, tasks: list[str], samples: int, max_len: int, seed: int = 0,
                  split: str = "train") -> tuple[list[Example], str]:
    """The first ``samples`` examples of each task's ``split`` (the benchmark's splits, seed ``seed``)."""
    from alloykit.eval.model import encode, load_tokenizer
    from alloykit.eval.tasks import get_task

    tok = _tokenizer(encoder_folder(model)) or load_tokenizer()
    out: list[Example] = []
    for t in tasks:
        enc = encode(tok, getattr(get_task(t).splits(seed=seed), split), max_len).head(samples)
        out += [Example(enc.ids[i, : int(enc.lengths[i])], int(enc.labels[i]), t) for i in range(len(enc))]
    return out, f"{split} split of task(s) {', '.join(tasks)} (seed {seed}, first {samples} each, max_len {max_len})"


def causal_target(model: Path) -> Target:
    _need_folder(model)
    _offline()
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32, trust_remote_code=False)
    return Target(lm, f"causal LM {type(lm).__name__}", score_causal)


def read_texts(path: Path) -> Iterator[str]:
    """Texts of a .txt file (one per non-empty line) or a .jsonl file (each line's "text")."""
    if not path.is_file():
        raise AlloyError(f"--data '{path}' does not exist")
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise AlloyError(f"--data '{path}' line {no}: expected a JSON object with a \"text\" field") from None
                yield str(text)
            else:
                yield line


def text_examples(model: Path, data: Path, samples: int, max_len: int, vocab: int,
                  log: Callable[[str], None] = print) -> tuple[list[Example], str]:
    """Token ids of the first ``samples`` texts: the model folder's tokenizer, else UTF-8 bytes."""
    if data.suffix not in (".txt", ".jsonl"):
        raise AlloyError(f"--data '{data}': give a .txt file (one text per line) or a .jsonl file (a \"text\" per line)")
    tok = _tokenizer(model)
    if tok is None:
        log(f"  no tokenizer in '{model}': token ids are the texts' UTF-8 bytes (mod the vocabulary size {vocab})")
    out = []
    for text in read_texts(data):
        if len(out) >= samples:
            break
        ids = tok(text, truncation=True, max_length=max_len)["input_ids"] if tok else [b % vocab for b in text.encode()][:max_len]
        if len(ids) >= 2:
            out.append(Example(torch.tensor(ids, dtype=torch.long)))
    how = "tokenizer" if tok else "UTF-8 bytes"
    return out, f"{data} (first {len(out)} texts of >= 2 tokens, {how}, max_len {max_len})"


def is_causal_lm(model: Path) -> bool:
    try:
        cfg = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or [])


def collect_to_folder(model: str, out: str, *, tasks: list[str] | None = None, data: str | None = None,
                      kind: str = "fisher", samples: int = 256, batch_size: int = 16, max_len: int | None = None,
                      head: str | None = None, seed: int = 0, log: Callable[[str], None] | None = None) -> Path:
    """``alloykit stats collect``: load ``model``, collect ``kind`` on the data, write the folder ``out``."""
    from alloykit.stats.store import write_stats

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    path = Path(model)
    _need_folder(path)
    if (tasks is None) == (data is None):
        raise AlloyError("give the calibration data: --task TASK (benchmark encoder) or --data FILE.txt|FILE.jsonl (causal LM)")
    t0 = time.monotonic()
    if tasks:
        target = encoder_target(path, tasks, head)
        examples, source = task_examples(path, tasks, samples, max_len or 32, seed)
    else:
        if not is_causal_lm(path):
            raise AlloyError(f"model '{model}': config.json names no *ForCausalLM architecture; --data needs a causal LM "
                             "(for the benchmark's encoders use --task TASK)")
        target = causal_target(path)
        examples, source = text_examples(path, Path(data), samples, max_len or 512, target.module.config.vocab_size, log)
    log(f"alloykit stats: {kind} of {target.describe} on {len(examples)} examples of {source}")
    tensors, meta = collect(target, examples, kind, batch_size=batch_size, seed=seed, log=log)
    meta.update({"model": str(model), "data": source, "kind": kind, "seconds": round(time.monotonic() - t0, 1)})
    folder = write_stats(out, tensors, meta)
    log(f"alloykit stats: wrote {', '.join(tensors)} statistics to {folder} in {meta['seconds']}s")
    return folder


@torch.no_grad()
def evaluate(model: str, *, tasks: list[str] | None = None, data: str | None = None, samples: int = 1000,
             batch_size: int = 16, max_len: int | None = None, head: str | None = None, seed: int = 0) -> dict:
    """``alloykit stats evaluate``: a causal LM's mean next-token loss and perplexity on a text
    file, or the benchmark encoder's accuracy on a task's test split (with its head)."""
    import math

    path = Path(model)
    _need_folder(path)
    if (tasks is None) == (data is None):
        raise AlloyError("give the evaluation data: --task TASK (benchmark encoder) or --data FILE.txt|FILE.jsonl (causal LM)")
    if tasks:
        target = encoder_target(path, tasks, head)
        examples, source = task_examples(path, tasks, samples, max_len or 32, seed, split="test")
    else:
        if not is_causal_lm(path):
            raise AlloyError(f"model '{model}': config.json names no *ForCausalLM architecture")
        target = causal_target(path)
        examples, source = text_examples(path, Path(data), samples, max_len or 512, target.module.config.vocab_size,
                                         lambda s: None)
    if not examples:
        raise AlloyError("no evaluation examples: the data gave none")
    target.module.eval()
    total = correct = 0.0
    nll = 0.0
    for i in range(0, len(examples), batch_size):
        logits, labels, mask = target.score(examples[i : i + batch_size], target)
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll -= float((logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum())
        correct += float(((logits.argmax(-1) == labels) * mask).sum())
        total += float(mask.sum())
    out = {"model": model, "data": source, "examples": len(examples), "positions": int(total),
           "loss": nll / total, "accuracy": correct / total}
    if not tasks:
        out["perplexity"] = math.exp(out["loss"])
    return out
