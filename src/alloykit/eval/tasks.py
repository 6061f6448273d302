"""Tasks: labelled (or plain) text in train / validation / test splits, a head, a metric.

One class, two sources:

* **built-in tasks**, registered by name (:func:`register_task`), whose examples come from
  installed packages (WordNet, fortunes, chatterbot-corpus) and are split here,
  deterministically (seed 0, 1,000 test and 200 validation examples per task by default:
  the quality benchmark's full preset);
* **task files** (:func:`load_task_file`, :mod:`alloykit.eval.taskfile`): a small YAML file
  naming the user's JSONL or text files per split, the head and the metric.

:func:`alloykit.eval.taskfile.resolve_task` takes either: a path ending in
``.yaml``/``.yml`` (or an existing file) is a task file, anything else a built-in name.
Every command that reads tasks (``stats collect``, ``search``, ``eval``) goes through it,
and every artifact records :meth:`Task.record` of the data it read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from alloykit.errors import AlloyError, did_you_mean
from alloykit.eval import data as D
from alloykit.eval.textfiles import TextFile, read_text_file

SPLIT_NAMES = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}
METRICS = ("accuracy", "macro_f1", "perplexity")
#: the built-in tasks' splits where a command does not choose them (the quality benchmark's full preset)
SPLIT_SIZES = dict(seed=0, n_test=1000, n_val=200)


class TaskError(AlloyError):
    """A task is unknown, or its data do not fit what is asked of it."""


def split_name(name: str) -> str:
    """'train' | 'validation' | 'test' ('val', 'valid', 'dev' accepted)."""
    canon = _SPLIT_ALIASES.get(name, name)
    if canon not in SPLIT_NAMES:
        raise TaskError(f"split '{name}': choose one of {', '.join(SPLIT_NAMES)}{did_you_mean(name, SPLIT_NAMES)}")
    return canon


@dataclass(frozen=True)
class Task:
    """A task. Built-in tasks set ``load`` (all examples, split by :meth:`splits`); task files set
    ``data`` (one parsed file per split) and may name a ``head``, ``metric``, ``labels``..."""

    name: str
    description: str = ""
    load: Callable[[], list[D.Example]] | None = field(default=None, repr=False)
    #: built-in: where the data come from, and the command that installs them
    source: str = ""
    install: str = ""
    #: built-in: cap on examples per class before splitting (balances skewed label sets)
    per_class: int | None = None
    #: task file: split -> its parsed data file
    data: dict[str, TextFile] = field(default_factory=dict, repr=False)
    #: the head: a sequence-classification folder or a heads.safetensors file (None: the model's own,
    #: or for built-in tasks the heads.safetensors beside the fine-tunes)
    head: str | None = None
    head_key: str | None = None
    pooling: str | None = None
    metric: str | None = None
    #: class names in head-output order, when the task file gives them
    label_names: tuple[str, ...] | None = None
    max_len: int | None = None
    path: Path | None = None  # the task file
    sha256: str | None = None  # of the task file

    @property
    def builtin(self) -> bool:
        return self.load is not None

    @property
    def key(self) -> str:
        """The head's key in a heads.safetensors file."""
        return self.head_key or self.name

    # -- splits ---------------------------------------------------------------------------
    def splits(self, *, seed: int = 0, n_test: int = 1000, n_val: int = 200, n_train: int | None = None) -> D.Splits:
        """All three splits. Built-in: split here (sizes and seed as given). Task file: the files as
        they are (sizes and seed do not apply; a split without a file is empty)."""
        if self.builtin:
            return D.make_splits(self.load(), key=self.name, seed=seed, n_test=n_test, n_val=n_val,
                                 n_train=n_train, per_class=self.per_class)
        names, kind = self._label_index()
        parts = {}
        for split in SPLIT_NAMES:
            f = self.data.get(split)
            if f is None:
                parts[split] = D.Split([], [])
                continue
            labels = [-1 if r.label is None else (names.index(r.label) if kind == "name" else r.label) for r in f.records]
            parts[split] = D.Split(f.texts, labels)
        return D.Splits(names, train=parts["train"], val=parts["validation"], test=parts["test"])

    def split(self, name: str) -> D.Split:
        """One split (built-in tasks at :data:`SPLIT_SIZES`); an error if a task file has none."""
        name = split_name(name)
        if not self.builtin and name not in self.data:
            raise TaskError(f"task '{self.name}' ({self.path}) has no {name} split; add 'data: {{{name}: FILE.jsonl}}' "
                            f"to the task file (it has: {', '.join(self.data)})")
        s = self._default_splits()
        return {"train": s.train, "validation": s.val, "test": s.test}[name]

    def _default_splits(self) -> D.Splits:
        """Splits at SPLIT_SIZES, made once per task (a built-in task's data take seconds to read)."""
        if not self.builtin:
            return self.splits()
        key = id(self)
        if key not in _DEFAULT_SPLITS:
            _DEFAULT_SPLITS[key] = (self, self.splits(**SPLIT_SIZES))  # the task is kept: its id stays unique
        return _DEFAULT_SPLITS[key][1]

    @property
    def labels(self) -> list[str]:
        """Class names (the index a label stands for); empty for text without labels."""
        return self._default_splits().labels if self.builtin else self._label_index()[0]

    @property
    def label_kind(self) -> str | None:
        """'name' (string labels), 'index' (integer class indices) or None (no labels)."""
        return "name" if self.builtin else self._label_index()[1]

    @property
    def metric_name(self) -> str:
        return self.metric or ("accuracy" if self.builtin or self.label_kind else "perplexity")

    def _label_index(self) -> tuple[list[str], str | None]:
        records = [r for f in self.data.values() for r in f.records]
        labelled = [r for r in records if r.label is not None]
        if not labelled:
            return [], None
        if len(labelled) != len(records):
            f = next(f for f in self.data.values() if any(r.label is None for r in f.records))
            raise TaskError(f"task '{self.name}': data file '{f.path}' has texts without a \"label\" among labelled "
                            "ones; label every text of the task, or none")
        kinds = {type(r.label) for r in labelled}
        if len(kinds) > 1:
            raise TaskError(f"task '{self.name}': labels mix strings and integers; use class names or class indices")
        if kinds == {int}:
            top = max(r.label for r in labelled)
            names = list(self.label_names) if self.label_names else [str(i) for i in range(top + 1)]
            bad = next((r.label for r in labelled if not 0 <= r.label < len(names)), None)
            if bad is not None:
                raise TaskError(f"task '{self.name}': label {bad} is no class index of its {len(names)} labels "
                                f"({', '.join(names)})")
            return names, "index"
        if self.label_names:
            unknown = sorted({r.label for r in labelled} - set(self.label_names))
            if unknown:
                raise TaskError(f"task '{self.name}': label '{unknown[0]}' is not in its 'labels' "
                                f"({', '.join(self.label_names)}){did_you_mean(unknown[0], self.label_names)}")
            return list(self.label_names), "name"
        return sorted({r.label for r in labelled}), "name"

    # -- provenance -------------------------------------------------------------------------
    def record(self, split: str, used: int | None = None) -> dict:
        """What an artifact records about the data of ``split``: the task file and the data file with
        their SHA-256 (task files), or the source package, seed, sizes and a SHA-256 of the split's
        texts and labels (built-in tasks); ``used``: how many examples the command read."""
        split = split_name(split)
        out: dict = {"task": self.name, "split": split}
        if self.builtin:
            part = self.split(split)
            digest = hashlib.sha256(json.dumps([part.texts, part.labels], ensure_ascii=False).encode()).hexdigest()
            out.update({"builtin": self.source, **SPLIT_SIZES, "examples": len(part), "sha256": digest})
        else:
            if self.path is not None:
                out.update({"task_file": str(self.path), "task_file_sha256": self.sha256})
            out.update(self.data[split].record())
        if used is not None:
            out["used"] = used
        return out


def describe_record(rec: dict) -> str:
    """One line for a recipe header or a log: task, split, file and hash, counts (and, when the
    record has them, the tokens per text, the tokenization and the head)."""
    used = f", {rec['used']} used" if "used" in rec else ""
    if "max_len" in rec:
        used += f", at most {rec['max_len']} tokens ({rec.get('tokens', '?')})"
    if rec.get("head"):
        used += f", head: {rec['head']}"
    if "builtin" in rec:
        return (f"built-in task {rec['task']} ({rec['builtin']}): {rec['split']} split, seed {rec['seed']}, "
                f"{rec['examples']} examples{used}; sha256 {rec['sha256']}")
    if "task_file" not in rec:  # a --data file
        return f"{rec['path']}: {rec['texts']} texts{used}; sha256 {rec['sha256']}"
    return (f"task {rec['task']} ({rec['task_file']}): {rec['split']} split {rec['path']}, {rec['texts']} texts{used}; "
            f"sha256 {rec['sha256']}")


# -- the registry and resolution -------------------------------------------------------------
_TASKS: dict[str, Task] = {}
_DEFAULT_SPLITS: dict[int, tuple[Task, D.Splits]] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    if task.name in _TASKS and not replace:
        raise ValueError(f"task {task.name!r} registered twice")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """A built-in task by name."""
    try:
        return _TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task '{name}'{did_you_mean(name, _TASKS)}; known tasks: {', '.join(_TASKS)}; "
                        "or give a task file (TASK.yaml, see docs/data-dependent.md)") from None


def all_tasks() -> dict[str, Task]:
    return dict(_TASKS)


def text_task(path: str | Path) -> Task:
    """A ``--data`` file as a task: the same texts (and labels, if any) for every split."""
    f = read_text_file(path)
    if not f.records:
        raise TaskError(f"data file '{path}' holds no text")
    return Task(Path(path).name, f"data file {path}", data={s: f for s in SPLIT_NAMES})


_WN = "WordNet 3.0 glosses (Debian wordnet-base)"
_APT_WN = "apt-get install -y wordnet-base"
register_task(Task("wordnet_noun", "noun gloss -> noun supersense (26 lexicographer files)",
                   partial(D.wordnet_supersense, "noun"), _WN, _APT_WN, per_class=3000))
register_task(Task("wordnet_verb", "verb gloss -> verb supersense (15 lexicographer files)",
                   partial(D.wordnet_supersense, "verb"), _WN, _APT_WN))
register_task(Task("wordnet_pos", "gloss -> part of speech (noun, verb, adjective, adverb; balanced)",
                   D.wordnet_pos, _WN, _APT_WN, per_class=3000))
register_task(Task("fortune_category", "English fortune -> its fortunes file (categories with >= 200 texts)",
                   D.fortune_categories, "Debian fortunes", "apt-get install -y fortunes", per_class=500))
register_task(Task("fortune_language", "fortune -> language (en, de, es, it, pt, pl)",
                   D.fortune_languages, "Debian fortunes, fortunes-{de,es,it,br,pl}",
                   "apt-get install -y " + " ".join(D.FORTUNE_LANGUAGES.values()), per_class=2000))
register_task(Task("chatterbot_topic", "chatbot utterance -> conversation topic (21 files)",
                   D.chatterbot_topics, "PyPI chatterbot-corpus", "pip install chatterbot-corpus"))
