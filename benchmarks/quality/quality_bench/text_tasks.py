"""Text tasks the benchmark derives from the installed corpora, registered through
:func:`alloykit.eval.register_task` like any user task.

They add what the library's topical tasks lack: properties a frozen sentence embedding
keeps poorly but a fine-tuned encoder learns (word order, length, a word that does not
belong), the SentEval probing tasks' idea (Conneau et al., 2018: BigramShift, SentLen,
SOMO) on WordNet glosses and fortunes.
Every random choice is seeded, so the examples are the same on every machine.
"""

from __future__ import annotations

import random

from alloykit.eval import Task, all_tasks, register_task
from alloykit.eval import data as D

_SRC = "WordNet 3.0 glosses (Debian wordnet-base) and Debian fortunes"
_APT = "apt-get install -y wordnet-base fortunes"


def _sentences(max_words: int = 24) -> list[list[str]]:
    """Word lists of noun glosses (up to the first ';') and English fortunes, 6 words or more."""
    out = []
    for gloss, _, _ in D.wordnet_synsets("noun"):
        words = gloss.split(";")[0].split()
        if len(words) >= 6:
            out.append(words[:max_words])
    for text, _ in D.fortune_categories(min_count=1):
        words = text.split()
        if len(words) >= 6:
            out.append(words[:max_words])
    return out


def bigram_shift() -> list[D.Example]:
    """Half the texts have two adjacent words swapped (SentEval's BigramShift): original or swapped."""
    rng = random.Random(2)
    out = []
    for words in _sentences():
        if rng.random() < 0.5:
            out.append((" ".join(words), "original"))
            continue
        i = rng.randrange(len(words) - 1)
        if words[i] != words[i + 1]:
            out.append((" ".join(words[:i] + [words[i + 1], words[i]] + words[i + 2:]), "swapped"))
    return out


def word_replaced() -> list[D.Example]:
    """Half the texts have one word (4+ letters) replaced by a word of another text (SentEval's
    semantic odd-man-out, without the frequency matching): original or replaced."""
    rng = random.Random(3)
    sents = _sentences()
    pool = [w for words in sents for w in words if len(w) >= 4 and w.isalpha()]
    out = []
    for words in sents:
        slots = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
        if not slots:
            continue
        if rng.random() < 0.5:
            out.append((" ".join(words), "original"))
            continue
        i, new = rng.choice(slots), rng.choice(pool)
        if new.lower() != words[i].lower():
            out.append((" ".join(words[:i] + [new] + words[i + 1:]), "replaced"))
    return out


def word_shuffle() -> list[D.Example]:
    """Half the texts have their words in a random order: original or shuffled."""
    rng = random.Random(4)
    out = []
    for words in _sentences():
        if rng.random() < 0.5:
            out.append((" ".join(words), "original"))
            continue
        shuffled = words[:]
        rng.shuffle(shuffled)
        if shuffled != words:
            out.append((" ".join(shuffled), "shuffled"))
    return out


def gloss_length() -> list[D.Example]:
    """A noun gloss (up to the first ';') -> its number of words, in four bands (SentLen's idea)."""
    bands = ((1, 5, "1-5"), (6, 8, "6-8"), (9, 12, "9-12"), (13, 10**6, "13+"))
    out = []
    for gloss, _, _ in D.wordnet_synsets("noun"):
        text = gloss.split(";")[0].strip()
        n = len(text.split())
        out.append((text, next(name for lo, hi, name in bands if lo <= n <= hi)))
    return out


TASKS = [
    Task("bigram_shift", "text with two adjacent words swapped, or not (SentEval BigramShift)", bigram_shift, _SRC, _APT,
         per_class=6000),
    Task("word_replaced", "text with one word replaced by a word of another text, or not (SentEval SOMO's idea)",
         word_replaced, _SRC, _APT, per_class=6000),
    Task("word_shuffle", "text with its words shuffled, or not", word_shuffle, _SRC, _APT, per_class=6000),
    Task("gloss_length", "noun gloss -> its length in words (4 bands: 1-5, 6-8, 9-12, 13+)", gloss_length,
         "WordNet 3.0 glosses (Debian wordnet-base)", "apt-get install -y wordnet-base", per_class=3000),
]


def register() -> None:
    """Register the derived tasks (once; a second call is a no-op)."""
    known = all_tasks()
    for t in TASKS:
        if t.name not in known:
            register_task(t)
