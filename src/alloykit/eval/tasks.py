"""The task registry: named text-classification tasks over installed data.

A task is a loader of (text, label) examples plus how to split them. Register new
ones with :func:`register_task`; the benchmark and the tests look tasks up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from alloykit.errors import AlloyError, did_you_mean
from alloykit.eval import data as D


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    load: Callable[[], list[D.Example]] = field(repr=False)
    #: where the data comes from, and the command that installs it
    source: str = ""
    install: str = ""
    #: cap on examples per class before splitting (balances skewed label sets)
    per_class: int | None = None

    def splits(self, *, seed: int = 0, n_test: int = 1000, n_val: int = 200, n_train: int | None = None) -> D.Splits:
        return D.make_splits(self.load(), key=self.name, seed=seed, n_test=n_test, n_val=n_val,
                             n_train=n_train, per_class=self.per_class)


_TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    if task.name in _TASKS and not replace:
        raise ValueError(f"task {task.name!r} registered twice")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise AlloyError(f"unknown task '{name}'{did_you_mean(name, _TASKS)}; known tasks: {', '.join(_TASKS)}") from None


def all_tasks() -> dict[str, Task]:
    return dict(_TASKS)


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
