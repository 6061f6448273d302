"""The Evaluator protocol: a model plus a task gives a JSON-serialisable result.

``TaskModel`` is what every benchmark row evaluates: one encoder (pretrained,
fine-tuned, merged or jointly trained) and a linear head per task.
``AccuracyEvaluator`` tokenizes each task's splits once and caches them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from alloykit.eval.data import Splits
from alloykit.eval.model import Encoded, accuracy_stderr, embed, encode
from alloykit.eval.tasks import Task


@dataclass
class TaskModel:
    encoder: torch.nn.Module
    heads: dict[str, torch.nn.Linear] = field(default_factory=dict)

    def head(self, task: str) -> torch.nn.Linear:
        if task not in self.heads:
            raise KeyError(f"model has no head for task '{task}' (heads: {', '.join(self.heads)})")
        return self.heads[task]


@runtime_checkable
class Evaluator(Protocol):
    def evaluate(self, model: TaskModel, task: Task, split: str = "test") -> dict[str, Any]:
        """Score ``model`` on one split of ``task``; every value is JSON-serialisable."""
        ...


class AccuracyEvaluator:
    """Top-1 accuracy of the task's head on mean-pooled encoder outputs."""

    def __init__(self, tokenizer, *, max_len: int = 32, seed: int = 0, n_test: int = 1000, n_val: int = 200,
                 n_train: int | None = None, batch_size: int = 128):
        self.tokenizer, self.max_len, self.seed = tokenizer, max_len, seed
        self.sizes = dict(n_test=n_test, n_val=n_val, n_train=n_train)
        self.batch_size = batch_size
        self._splits: dict[str, Splits] = {}
        self._encoded: dict[tuple[str, str], Encoded] = {}

    def splits(self, task: Task) -> Splits:
        if task.name not in self._splits:
            self._splits[task.name] = task.splits(seed=self.seed, **self.sizes)
        return self._splits[task.name]

    def encoded(self, task: Task, split: str) -> Encoded:
        key = (task.name, split)
        if key not in self._encoded:
            self._encoded[key] = encode(self.tokenizer, getattr(self.splits(task), split), self.max_len)
        return self._encoded[key]

    def evaluate(self, model: TaskModel, task: Task, split: str = "test") -> dict[str, Any]:
        t0 = time.monotonic()
        data = self.encoded(task, split)
        with torch.inference_mode():
            pred = model.head(task.name)(embed(model.encoder, data, self.batch_size)).argmax(-1)
        correct = int((pred == data.labels).sum())
        n = len(data)
        acc = correct / n if n else float("nan")
        n_classes = len(self.splits(task).labels)
        return {"task": task.name, "split": split, "n": n, "correct": correct, "accuracy": acc,
                "stderr": accuracy_stderr(acc, n), "chance": 1.0 / n_classes, "n_classes": n_classes,
                "seconds": round(time.monotonic() - t0, 2)}
