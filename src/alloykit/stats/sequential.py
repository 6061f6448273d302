"""RegMean++ statistics: Grams of each layer's inputs as produced by the *merged* earlier layers.

RegMean (Jin et al. 2023) takes each candidate's Grams from its own forward pass.
RegMean++ (Nguyen et al. 2025) makes the merge aware of the layers before it: the Grams
of block l are computed on model i's data after it went through the merged blocks
0..l-1. So statistics and merge alternate, block by block:

1. tensors before the first block (embeddings, their norms) are merged first (RegMean
   where a linear layer has Grams, else the average);
2. for block l = 0..L-1: each candidate i, with the merged tensors of blocks < l in
   place of its own, runs its calibration data up to block l, whose linear inputs are
   hooked (G_i = X_i^T X_i / n); block l is then merged with these Grams (the
   ``regmean`` formula, ``alpha``), and written into every candidate;
3. tensors after the last block (final norm, output head, pooler) likewise, on a full
   forward pass of the merged blocks.

The Grams are written as one ordinary statistics folder per candidate, marked
``gram.inputs = "merged"`` (with the ``alpha`` used), which the ``regmean_plus_plus``
method reads; merging them with that alpha reproduces the merge made here. All
candidates are held in memory (K models), and block l costs one forward pass through
blocks 0..l per candidate: O(K L^2 / 2) block evaluations in all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from alloykit.errors import AlloyError
from alloykit.eval.loading import load_model, model_folder
from alloykit.eval.suite import TaskSuite, command_tasks
from alloykit.methods.registry import MergeInput, get_method
from alloykit.methods.weighted import RegMeanParams
from alloykit.progress import Progress
from alloykit.roles import role_of
from alloykit.stats.collect import Example, Target, gram, task_target
from alloykit.stats.store import write_stats

_log = logging.getLogger(__name__)


def find_blocks(module: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of repeated blocks: its largest ``nn.ModuleList`` (``model.layers``, ``encoder.layer``)."""
    best = None
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise ValueError(f"{type(module).__name__} has no stack of blocks (nn.ModuleList) for RegMean++")
    return best[1], best[2]


def stage_of(name: str, prefix: str, n_blocks: int) -> int:
    """-1 before the blocks, l inside block l, n_blocks after them (parameter or module names)."""
    if name.startswith(prefix + "."):
        return int(name[len(prefix) + 1 :].split(".", 1)[0])
    # outside the blocks, only what roles place before them (embeddings and their norm) goes
    # first; the rest (final norm, heads, pooler, and tensors no rule places) goes last, where
    # its Grams come from a pass through every merged block
    return -1 if role_of(name).section == "pre" else n_blocks


def regmean_plus_plus(targets: list[Target], examples: list[list[Example]], *, alpha: float = 0.9, batch_size: int = 16,
                      log: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[dict]]:
    """Merge ``targets`` (one model of one architecture each, with its calibration examples)
    by RegMean++; returns the merged state dict, each candidate's Grams and their summaries."""
    fn = get_method("regmean").fn
    params = RegMeanParams(alpha=alpha)
    modules = [t.module.eval() for t in targets]
    prefix, blocks = find_blocks(modules[0])
    n = len(blocks)
    tensors = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in modules]
    names = [k for k, v in tensors[0].items() if v.is_floating_point()]
    linears = [{k: m for k, m in mod.named_modules() if isinstance(m, torch.nn.Linear)} for mod in modules]
    grams: list[dict[str, torch.Tensor]] = [{} for _ in targets]
    tokens: list[dict[str, int]] = [{} for _ in targets]
    merged: dict[str, torch.Tensor] = {}
    prog = Progress("regmean++", (n + 2) * len(targets), log, unit="model-stages")
    for stage in range(-1, n + 1):
        stage_names = [k for k in names if stage_of(k, prefix, n) == stage]
        stage_linears = {k for k in linears[0] if stage_of(k, prefix, n) == stage}
        for i, (target, exs) in enumerate(zip(targets, examples)):
            if stage_linears:
                stop = blocks[stage] if 0 <= stage < n else None
                g, t = gram(target, exs, batch_size=batch_size, log=lambda msg: None,
                            linears={k: linears[i][k] for k in stage_linears}, stop_after=stop)
                grams[i].update(g)
                tokens[i].update(t)
            prog.update(1)
        for k in stage_names:
            stack = torch.stack([t[k].detach().float() for t in tensors])
            stats = torch.stack([g[k] for g in grams]) if k in grams[0] else None
            merged[k] = fn(MergeInput(k, stack, None, params, [None] * len(targets), stats=stats))
            with torch.no_grad():
                for t in tensors:  # every candidate continues from the merged layers
                    t[k].copy_(merged[k])
    metas = [{"samples": len(exs), "gram": {"tokens": tok, "inputs": "merged", "alpha": alpha,
                                           "normalised": "X^T X / tokens", "blocks": prefix}}
             for exs, tok in zip(examples, tokens)]
    return merged, grams, metas


def collect_merged_to_folders(models: list[str], outs: list[str], *, tasks: list[str] | None = None,
                              data: list[str] | None = None, alpha: float = 0.9, samples: int = 256,
                              batch_size: int = 16, max_len: int | None = None, heads: list[str] | None = None,
                              model_class: str | None = None, pooling: str | None = None,
                              log: Callable[[str], None] | None = None) -> list[Path]:
    """``alloykit stats collect-merged``: RegMean++ statistics of ``models``, one folder each in ``outs``.

    ``tasks`` (names or task files) / ``data`` / ``heads``: one per model, or one for all.
    """
    say = log or _log.info  # messages; progress goes to ``log`` if given, else to a bar
    k = len(models)
    if len(outs) != k:
        raise AlloyError(f"--out: give one statistics folder per model ({k}), got {len(outs)}")
    if k < 2:
        raise AlloyError("collect-merged merges models: give at least 2")
    if (tasks is None) == (data is None):
        raise AlloyError("give the calibration data: --task TASK... (task names or files) or --data FILE... (text files)")

    def per_model(values: list[str] | None, flag: str) -> list[str | None]:
        if values is None:
            return [None] * k
        if len(values) not in (1, k):
            raise AlloyError(f"{flag}: give one value, or one per model ({k}); got {len(values)}")
        return values * k if len(values) == 1 else list(values)

    t0 = time.monotonic()
    targets, examples, records = [], [], []
    for model, task, text, head in zip(models, per_model(tasks, "--task"), per_model(data, "--data"), per_model(heads, "--head")):
        suite = TaskSuite(load_model(model_folder(model, model_class)), command_tasks([task] if task else None, text),
                          head=head, pooling=pooling, max_len=max_len, need_head=False)
        target, exs, rec = task_target(suite, "train", samples)
        targets.append(target)
        examples.append(exs)
        records.append(rec)
    say(f"stats: RegMean++ Grams of {k} models (alpha {alpha}), merging block by block")
    _, grams, metas = regmean_plus_plus(targets, examples, alpha=alpha, batch_size=batch_size, log=log)
    secs = round(time.monotonic() - t0, 1)
    out = []
    for model, folder, g, meta, rec, target in zip(models, outs, grams, metas, records, targets):
        meta["gram"]["tokens"] = target.rename(meta["gram"]["tokens"])
        meta.update({"model": str(model), "data": rec, "kind": "gram", "merged_with": list(models), "seconds": secs})
        out.append(write_stats(folder, {"gram": target.rename(g)}, meta))
    say(f"stats: wrote RegMean++ statistics to {', '.join(outs)} in {secs}s")
    return out
