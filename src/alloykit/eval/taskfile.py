"""Task files: a user's task in a few lines of YAML, no Python.

::

    # sentiment.yaml: paths are relative to this file's folder
    name: sentiment                 # default: the file name without .yaml (and without .task)
    data:                           # JSONL, one {"text": ..., "label": ...} per line (or .txt, no labels)
      train: sentiment-train.jsonl
      validation: sentiment-val.jsonl
      test: sentiment-test.jsonl
    head: ft-sentiment              # a fine-tuned *ForSequenceClassification folder: its classifier,
                                    # or heads.safetensors holding sentiment.weight / sentiment.bias
    metric: accuracy                # accuracy | macro_f1 | perplexity

Optional keys: ``description``; ``head_key`` (the head's key in a heads.safetensors, default
the task's name); ``pooling`` (``mean`` or ``cls``: how an encoder's hidden states reach a
heads.safetensors head; default mean, or the folder's sentence-transformers setting);
``labels`` (the class names in head-output order: needed only when string labels meet a
head whose config.json does not name its classes); ``max_len`` (tokens per text).

Without ``head``, a sequence-classification model uses its own head and a causal LM its
next-token distribution (``metric: perplexity``, labels unused). Without labels (a ``.txt``
file, or JSONL without ``"label"``) the data still serve statistics (Grams, sampled Fisher)
and AdaMerging (which never reads labels); the metric is then perplexity. The file is read with the
project's guarded YAML loader and checked strictly: an unknown key is an error that names
the closest allowed one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alloykit.config import explain, load_yaml
from alloykit.eval.loading import POOLINGS
from alloykit.eval.tasks import METRICS, Task, TaskError, get_task
from alloykit.eval.textfiles import read_text_file, sha256_file


class TaskFileError(TaskError):
    """A task file is malformed or names something that does not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataFiles(_Strict):
    train: str | None = None
    validation: str | None = None
    test: str | None = None

    @model_validator(mode="after")
    def _some(self) -> "DataFiles":
        if not (self.train or self.validation or self.test):
            raise ValueError("name at least one data file: train, validation or test")
        return self


class TaskFile(_Strict):
    name: str | None = Field(default=None, min_length=1)
    description: str | None = None
    data: DataFiles
    head: str | None = None
    head_key: str | None = None
    pooling: Literal[POOLINGS] | None = None  # type: ignore[valid-type]
    labels: list[str] | None = Field(default=None, min_length=1)
    metric: Literal[METRICS] | None = None  # type: ignore[valid-type]
    max_len: int | None = Field(default=None, ge=2)

    @field_validator("labels")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            dup = next(x for x in v if v.count(x) > 1)
            raise ValueError(f"label '{dup}' is listed twice")
        return v


_HINTS = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation", "label": "labels",
          "heads": "head", "model": "head", "metrics": "metric", "max_length": "max_len"}


def format_validation_error(err: ValidationError, root: type[BaseModel], what: str) -> str:
    """One line for a pydantic error (the project's one reading of them, ``alloykit.config.explain``),
    with the slips task files see most (``_HINTS``) suggested first."""
    return explain(err, root).line(what, hints=_HINTS)


def load_task_file(path: str | os.PathLike) -> Task:
    """Read, check and resolve a task file: its data files are read (and hashed) now, so that a bad
    line or a missing file is reported before any model is loaded."""
    p = Path(path)
    what = f"task file '{path}'"
    raw = load_yaml(p, what="task file", error=TaskFileError)
    if not isinstance(raw, dict):
        raise TaskFileError(f"{what}: expected a mapping of keys (name, data, head, metric...), got {type(raw).__name__}")
    try:
        spec = TaskFile.model_validate(raw)
    except ValidationError as err:
        raise TaskFileError(format_validation_error(err, TaskFile, what)) from None
    here = p.parent
    name = spec.name or p.name.removesuffix(".yaml").removesuffix(".yml").removesuffix(".task")
    data = {}
    for split in ("train", "validation", "test"):
        rel = getattr(spec.data, split)
        if rel is not None:
            f = here / rel
            if not f.is_file():
                raise TaskFileError(f"{what}: data.{split} '{rel}' does not exist (looked for {f}; paths are relative to "
                                    "the task file's folder)")
            data[split] = read_text_file(f)
    head = None
    if spec.head is not None:
        h = here / spec.head
        if not h.exists():
            raise TaskFileError(f"{what}: head '{spec.head}' does not exist (looked for {h}; paths are relative to the "
                                "task file's folder); give a fine-tuned sequence-classification folder or a heads.safetensors")
        head = str(h)
    task = Task(name, spec.description or f"task file {p}", data=data, head=head, head_key=spec.head_key,
                pooling=spec.pooling, metric=spec.metric, label_names=tuple(spec.labels) if spec.labels else None,
                max_len=spec.max_len, path=p, sha256=sha256_file(p))
    kind = task.label_kind  # checks the labels now (mixed kinds, unknown names, unlabelled texts)
    if task.metric_name != "perplexity" and kind is None:
        raise TaskFileError(f"{what}: metric {task.metric_name} needs labels, and the data files have none; add a "
                            "\"label\" to every JSONL line, or use metric: perplexity (causal LMs)")
    return task


def is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or Path(spec).is_file()


def resolve_task(spec: str | Task) -> Task:
    """A task file (a path ending in .yaml/.yml, or an existing file) or a built-in task name."""
    if isinstance(spec, Task):
        return spec
    if is_task_file(spec):
        return load_task_file(spec)
    return get_task(spec)


def resolve_tasks(specs) -> list[Task]:
    tasks = [resolve_task(s) for s in specs]
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise TaskError(f"task '{dup}' is given twice; give each task once (task files name them with 'name:')")
    return tasks
