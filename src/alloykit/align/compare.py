"""``alloykit analyze --lmc A B (--task TASK | --data FILE)``: the linear path between two model
folders, as they are and after aligning B to A (and with REPAIR), with barriers and a plot.

The data are read as every data command reads them (:mod:`alloykit.eval`: built-in tasks,
task files, or one ``--data`` file), scored by each model's own head:

* sequence classifiers (``*ForSequenceClassification``): labelled data; loss is the mean
  cross-entropy, accuracy top-1;
* causal LMs (``*ForCausalLM``): text; loss is the mean next-token negative log-likelihood,
  accuracy the next-token top-1 accuracy.

An encoder whose head lives in another file (the quality benchmark's ``heads.safetensors``)
is refused: a path between two models trained apart must interpolate their heads too.
Calibration (activation matching, REPAIR) reads ``--calibration FILE``, else each task's
training split (a ``--data`` file's texts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alloykit.align import lmc
from alloykit.align.api import align
from alloykit.align.data import calibration_batches, token_batches, token_limit
from alloykit.align.families import hf_spec
from alloykit.align.repair import endpoint_targets, producers, repair
from alloykit.errors import AlloyError, CheckpointError
from alloykit.eval.loading import load_model, model_folder
from alloykit.eval.suite import TaskSuite, command_tasks

log = logging.getLogger(__name__)


def suite_evaluator(suite: TaskSuite, split: str, samples: int | None, batch_size: int) -> tuple[lmc.Evaluate, int]:
    """(module -> (loss, accuracy) averaged over the suite's tasks, examples scored), each task by its own head."""
    tasks = [(b, suite.encoded(b.name, split, samples)) for b in suite.bound]
    for b, data in tasks:
        if not b.next_token and bool((data.labels < 0).any()):
            raise AlloyError(f"task '{b.name}': a classifier's path needs labels; its {split} split has texts without one")

    @torch.no_grad()
    def evaluate(module: torch.nn.Module) -> tuple[float, float]:
        losses, accs = [], []
        for b, data in tasks:
            total = correct = count = 0.0
            for i in range(0, len(data), batch_size):
                idx = torch.arange(i, min(i + batch_size, len(data)))
                ids, mask = data.batch(idx)
                logits = b.net.head(module(input_ids=ids, attention_mask=mask), mask).float()
                if b.next_token:
                    keep = (mask[:, 1:] * mask[:, :-1]).bool()
                    target = ids[:, 1:]
                    total += float(F.cross_entropy(logits[:, :-1][keep], target[keep], reduction="sum"))
                    correct += float((logits[:, :-1].argmax(-1) == target)[keep].sum())
                    count += float(keep.sum())
                else:
                    labels = data.labels[idx]
                    total += float(F.cross_entropy(logits, labels, reduction="sum"))
                    correct += float((logits.argmax(-1) == labels).sum())
                    count += len(idx)
            losses.append(total / max(count, 1))
            accs.append(correct / max(count, 1))
        return sum(losses) / len(losses), sum(accs) / len(accs)

    return evaluate, sum(len(d) for _, d in tasks)


def lmc_report(a: str | Path, b: str | Path, *, tasks: Sequence[str] | None = None, data: str | None = None,
               split: str = "test", methods: tuple[str, ...] = ("weight_matching",), with_repair: bool = False,
               calibration: str | Path | None = None, steps: int = 11, samples: int | None = 1000,
               calibration_samples: int = 256, max_len: int | None = None, batch_size: int = 32, seed: int = 0,
               model_class: str | None = None, say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Loss/accuracy along the naive path and along each aligned path (plus REPAIR when asked)."""
    task_list = command_tasks(tasks, data)
    la, lb = load_model(model_folder(a, model_class)), load_model(model_folder(b, model_class))
    for loaded in (la, lb):
        if loaded.family not in ("sequence-classification", "causal-lm"):
            raise CheckpointError(f"model '{loaded.folder.given}' is an encoder ({loaded.folder.architecture}) whose head "
                                  "is not in its checkpoint; --lmc interpolates whole models: give sequence classifiers "
                                  "(*ForSequenceClassification) or causal LMs (*ForCausalLM)")
    if la.module.config.model_type != lb.module.config.model_type:
        raise CheckpointError(f"models '{a}' and '{b}' are of different types ({la.module.config.model_type}, "
                              f"{lb.module.config.model_type}); the linear path needs one architecture")
    t0 = time.monotonic()
    suite = TaskSuite(la, task_list, max_len=max_len, head_option=False)
    evaluate, n = suite_evaluator(suite, split, samples, batch_size)
    if calibration:
        calib, calib_record = calibration_batches(calibration, suite.tokenizer, samples=calibration_samples,
                                                  max_len=token_limit(la.folder.config, max_len or 128), batch_size=16)
    else:
        calib, calib_record = _task_calibration(suite, calibration_samples)
    report: dict[str, Any] = {"models": [str(a), str(b)], "kind": la.family, "split": split, "examples": n,
                              "data": suite.record(split, samples), "calibration": calib_record, "paths": {},
                              "moved_fraction": {}}
    say(f"lmc: {la.family}, {n} evaluation examples, {steps} points per path")
    repair_spec = None
    if with_repair:
        sd = la.module.state_dict()
        repair_spec = hf_spec(la.folder.config, {k: tuple(v.shape) for k, v in sd.items()}, permute_outputs=True,
                              float_names={k for k, v in sd.items() if v.is_floating_point()}, label=str(a))
        producers(repair_spec, la.module)  # refuses families REPAIR cannot rescale, before any evaluation
    report["paths"]["naive"] = lmc.path(la.module, lb.module, evaluate, steps=steps, progress=say)
    for method in methods:
        res = align(lb.module, la.module, method=method, data=calib, seed=seed)
        report["moved_fraction"][method] = res.report["moved_fraction_mean"]
        report["paths"][method] = lmc.path(la.module, res.module, evaluate, steps=steps, progress=say)
        if with_repair:
            report["paths"][f"{method}+repair"] = lmc.path(la.module, res.module, evaluate, steps=steps, progress=say,
                                                           adjust=_repairer(repair_spec, la.module, res.module, calib))
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def _task_calibration(suite: TaskSuite, samples: int) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """The first ``samples`` texts of each task's training split (a --data file's texts)."""
    seqs = []
    for b in suite.bound:
        enc = suite.encoded(b.name, "train", samples)
        seqs += [enc.ids[i, :int(enc.lengths[i])].tolist() for i in range(len(enc))]
    return token_batches(seqs, suite.tokenizer.pad_id, 16), suite.record("train", samples)


def _repairer(spec, model_a, model_b, calib) -> Callable:
    names = producers(spec, model_a)
    ta = endpoint_targets([model_a], [1.0], names, calib)
    tb = endpoint_targets([model_b], [1.0], names, calib)

    def adjust(module, alpha: float) -> None:
        mixed = {n: ((1 - alpha) * ta[n][0] + alpha * tb[n][0], (1 - alpha) * ta[n][1] + alpha * tb[n][1]) for n in names}
        repair(module, [], spec, calib, targets=mixed)

    return adjust


def summary(report: dict) -> str:
    lines = [f"linear path {report['models'][0]} -> {report['models'][1]} ({report['kind']}, {report['examples']} "
             f"{report['split']} examples):"]
    for name, p in report["paths"].items():
        mid = len(p["alpha"]) // 2
        moved = report["moved_fraction"].get(name)
        extra = f"; {100 * moved:.0f}% of units moved" if moved is not None else ""
        lines.append(f"  {name:<26} accuracy barrier {100 * p['accuracy_barrier']:5.2f} pts, loss barrier "
                     f"{p['loss_barrier']:.4f}; midpoint accuracy {100 * p['accuracy'][mid]:.2f}% "
                     f"(endpoints {100 * p['accuracy'][0]:.2f}%, {100 * p['accuracy'][-1]:.2f}%){extra}")
    return "\n".join(lines)
