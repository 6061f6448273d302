"""Statistics of a model on calibration data: diagonal Fisher and the Grams of linear inputs.

Every family the project merges, one loop (the model, its heads and its data come from
:mod:`alloykit.eval`: :class:`~alloykit.eval.suite.TaskSuite`):

* a classifier: an encoder whose pooled hidden states (mean or CLS) go into a task's
  linear head, or a sequence-classification model with its own head (or another fine-
  tune's); log-likelihood = log softmax of the head's logits at the label;
* a causal LM on text: log-likelihood = sum over the sequence's positions of the next
  token's log-probability (the negated summed cross-entropy).

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

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alloykit.errors import AlloyError
from alloykit.eval.heads import TaskNet
from alloykit.eval.loading import load_model, model_folder
from alloykit.eval.model import forward
from alloykit.eval.suite import TaskSuite, command_tasks
from alloykit.eval.tasks import describe_record
from alloykit.progress import Progress
from alloykit.stats.store import write_stats

_log = logging.getLogger(__name__)

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

    ``score(batch) -> (logits [B, P, C], labels [B, P], mask [B, P])``: P scored
    positions per example (1 for a classifier head, T-1 next tokens for a causal LM).
    ``hook_mask`` is the token mask [B, T] of the current batch, for the Gram hooks.
    ``heads``: linear heads by task (:func:`score_encoder`); ``nets``: task scorers by task
    (:func:`score_tasks`); ``names``: module parameter name -> checkpoint tensor name, the
    keys of the written statistics (None: the same).
    """

    module: torch.nn.Module
    describe: str
    score: Callable[[list[Example], "Target"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    hook_mask: torch.Tensor | None = None
    heads: dict[str, torch.nn.Linear] = field(default_factory=dict)
    nets: dict[str, TaskNet] = field(default_factory=dict)
    names: dict[str, str] | None = None
    pad_id: int = 0

    def rename(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Statistics keyed like the checkpoint (what a recipe's merge reads)."""
        return stats if self.names is None else {self.names[n]: v for n, v in stats.items() if n in self.names}


def pad(examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], mask [B, T]) right-padded to the longest example."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask


def score_tasks(examples: list[Example], target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples of one task scored by its net (``target.nets[example.head]``). Classifier examples
    without a label get label 0: only a sampled Fisher, which draws its own labels, and Grams,
    which read none, run on them."""
    net = target.nets[examples[0].head]
    if any(e.head != examples[0].head for e in examples):
        raise ValueError("score_tasks scores one task per batch (see batches())")
    ids, mask = pad(examples, target.pad_id)
    target.hook_mask = mask
    logits = net.logits(ids, mask)
    if net.kind == "next-token":
        return logits[:, :-1], ids[:, 1:], mask[:, 1:] * mask[:, :-1]
    if net.kind == "body":  # no head: nothing to score (Grams read the forward pass only)
        return logits, torch.zeros(0), torch.zeros(0)
    labels = torch.tensor([e.label if e.label is not None and e.label >= 0 else 0 for e in examples])
    return logits.unsqueeze(1), labels.unsqueeze(1), torch.ones(len(examples), 1, dtype=torch.long)


def batches(examples: list[Example], size: int) -> Iterator[list[Example]]:
    """Batches of at most ``size`` examples, none mixing two tasks (heads)."""
    start = 0
    while start < len(examples):
        end = start + 1
        while end < len(examples) and end - start < size and examples[end].head == examples[start].head:
            end += 1
        yield examples[start:end]
        start = end


def score_causal(examples: list[Example], target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad(examples)
    target.hook_mask = mask
    logits = target.module(input_ids=ids, attention_mask=mask).logits
    return logits[:, :-1], ids[:, 1:], mask[:, 1:] * mask[:, :-1]


def score_encoder(examples: list[Example], target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quality benchmark's encoders: mean-pooled hidden states into ``target.heads[example.head]``."""
    ids, mask = pad(examples)
    target.hook_mask = mask
    pooled = forward(target.module, ids, mask)
    logits = torch.stack([target.heads[e.head](p) for e, p in zip(examples, pooled)]) if target.heads else pooled
    labels = torch.tensor([e.label for e in examples])
    return logits.unsqueeze(1), labels.unsqueeze(1), torch.ones(len(examples), 1, dtype=torch.long)


def fisher(target: Target, examples: list[Example], *, sampled: bool, seed: int = 0,
           log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every parameter, averaged over ``examples`` (one backward pass each)."""
    module = target.module
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    prog = Progress("fisher (sampled)" if sampled else "fisher (empirical)", len(examples), log, unit="samples")
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
        prog.update(1)
    module.zero_grad(set_to_none=True)
    return {n: a / max(len(examples), 1) for n, a in acc.items()}


class StopForward(Exception):
    """Raised by a hook once the layers being measured have run (the rest of the pass is not needed)."""


@torch.no_grad()
def gram(target: Target, examples: list[Example], *, batch_size: int = 16, log: Callable[[str], None] | None = None,
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
    prog = Progress("gram", len(examples), log, unit="samples")
    try:
        for batch in batches(examples, batch_size):
            try:
                target.score(batch, target)
            except StopForward:
                pass
            prog.update(len(batch))
    finally:
        for h in handles:
            h.remove()
        target.hook_mask = None
    return {n: s / max(tokens[n], 1) for n, s in sums.items()}, tokens


def collect(target: Target, examples: list[Example], kind: str, *, batch_size: int = 16, seed: int = 0,
            log: Callable[[str], None] | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """kind -> {tensor name: statistic}, and the summary for ``alloykit_stats.json``.

    ``log``: a callback for the progress lines (default: a progress bar on stderr)."""
    if kind not in KIND_CHOICES:
        raise AlloyError(f"--kind {kind}: choose one of {', '.join(KIND_CHOICES)}")
    if not examples:
        raise AlloyError("no calibration examples: the data gave none (lines need at least 2 tokens)")
    target.module.eval()  # no dropout: statistics of the deterministic model
    out: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict = {"samples": len(examples)}
    if kind in ("fisher", "fisher_sampled", "all"):
        sampled = kind == "fisher_sampled"
        out["fisher"] = target.rename(fisher(target, examples, sampled=sampled, seed=seed, log=log))
        meta["fisher"] = {"variant": "sampled" if sampled else "empirical", "per_example": "batch 1, torch.autograd",
                          "seed": seed}
    if kind in ("gram", "all"):
        grams, tokens = gram(target, examples, batch_size=batch_size, log=log)
        out["gram"], tokens = target.rename(grams), target.rename(tokens)
        meta["gram"] = {"tokens": tokens, "normalised": "X^T X / tokens", "inputs": "own"}
    return out, meta




# -- a model folder and its data ---------------------------------------------------------------
def task_target(suite: TaskSuite, split: str, samples: int) -> tuple[Target, list[Example], list[dict]]:
    """The suite's model as a statistics target, the first ``samples`` examples of ``split`` of each
    task, and the record of that data."""
    model = suite.model
    nets = {b.name: b.net for b in suite.bound}
    examples = []
    for b in suite.bound:
        enc = suite.encoded(b.name, split, samples)
        examples += [Example(enc.ids[i, : int(enc.lengths[i])], int(enc.labels[i]), b.name) for i in range(len(enc))]
    heads = ", ".join(f"{b.name}: {b.net.describe}" for b in suite.bound)
    target = Target(model.module, f"{model.family} {model.folder.architecture} ({heads})", score_tasks, nets=nets,
                    names=model.names, pad_id=suite.tokenizer.pad_id)
    return target, examples, suite.record(split, samples)


def _check_kind(suite: TaskSuite, kind: str) -> None:
    """Fisher needs a head on every task, and the empirical Fisher labels (next tokens, or the data's)."""
    if kind not in KIND_CHOICES:
        raise AlloyError(f"--kind {kind}: choose one of {', '.join(KIND_CHOICES)}")
    if kind not in ("fisher", "fisher_sampled", "all"):
        return
    for b in suite.bound:
        if b.net.kind == "body":
            raise AlloyError(f"--kind {kind}: the Fisher of encoder '{suite.model.folder.given}' needs a head for task "
                             f"'{b.name}' (log p(y | x) is the head's); pass --head (a heads.safetensors or a fine-tuned "
                             "sequence-classification folder) or name it in a task file, or use --kind gram")
        if kind != "fisher_sampled" and b.net.kind == "classifier" and b.task.label_kind is None:
            raise AlloyError(f"--kind {kind}: the empirical Fisher reads labels and task '{b.name}' has none; add a "
                             "\"label\" to every JSONL line, or use --kind fisher_sampled (labels drawn from the model) "
                             "or --kind gram")


def collect_to_folder(model: str, out: str, *, tasks: list[str] | None = None, data: str | None = None,
                      kind: str = "fisher", samples: int = 256, batch_size: int = 16, max_len: int | None = None,
                      head: str | None = None, head_key: str | None = None, model_class: str | None = None,
                      pooling: str | None = None, seed: int = 0, log: Callable[[str], None] | None = None) -> Path:
    """``alloykit stats collect``: load ``model``, collect ``kind`` on the training split of ``tasks``
    (or on the ``data`` file), write the folder ``out``."""
    say = log or _log.info  # messages; progress goes to ``log`` if given, else to a bar
    t0 = time.monotonic()
    task_list = command_tasks(tasks, data)
    loaded = load_model(model_folder(model, model_class))
    suite = TaskSuite(loaded, task_list, head=head, head_key=head_key, pooling=pooling, max_len=max_len,
                      need_head=False)  # Grams need none; _check_kind says what a Fisher needs
    _check_kind(suite, kind)
    if suite.tokenizer.tokenizer is None:
        say(f"  no tokenizer in '{model}': token ids are the texts' UTF-8 bytes (mod the vocabulary size {suite.tokenizer.vocab})")
    target, examples, record = task_target(suite, "train", samples)
    say(f"stats: {kind} of {target.describe} on {len(examples)} examples: "
        + "; ".join(describe_record(r) for r in record))
    tensors, meta = collect(target, examples, kind, batch_size=batch_size, seed=seed, log=log)
    meta.update({"model": str(model), "family": loaded.family, "data": record, "kind": kind,
                 "seconds": round(time.monotonic() - t0, 1)})
    folder = write_stats(out, tensors, meta)
    say(f"stats: wrote {', '.join(tensors)} statistics to {folder} in {meta['seconds']}s")
    return folder
