"""The causal-LM track's skills, built from data that installs offline.

Each task is a list of examples ``{"prompt", "target", "choices", "label"}``: a model is
fine-tuned on prompt -> target (loss on the target's tokens), and evaluated on held-out
examples by the loss of the true target and by choosing it among ``choices`` (the true
target and three distractors from other examples of the same task) by log-likelihood.

- ``definitions``: WordNet 3.0 glosses (Debian ``wordnet-base``): ``Definition of "word":`` -> the gloss.
- ``german`` / ``spanish``: fortunes (Debian ``fortunes-de`` / ``fortunes-es``): the first words of
  a saying -> the rest (fine-tuned on the whole texts: language modelling).
- ``qa``: chatterbot-corpus (PyPI), English conversations: ``Question: ...\\nAnswer:`` -> the reply.

Splits are deterministic (a hash of the text), disjoint by prompt, and independent of the
number of examples asked for.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from alloykit.eval.data import WORDNET_DIR, DataMissingError, package_files, read_fortunes

TASKS = ("definitions", "german", "spanish", "qa")
N_CHOICES = 4


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


# -- sources ----------------------------------------------------------------------------
def definitions() -> list[dict]:
    out, seen = [], set()
    for pos in ("noun", "verb", "adj", "adv"):
        path = WORDNET_DIR / f"data.{pos}"
        if not path.is_file():
            raise DataMissingError(f"WordNet ({path}) is not installed; install it with: apt-get install -y wordnet-base")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  "):
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 6:
                continue
            word = fields[4].replace("_", " ")
            word = word.split("(")[0]  # adjective markers such as 'big(a)'
            definition = gloss.split('; "')[0].split(";")[0].strip()
            n = len(definition.split())
            if not 3 <= n <= 16 or word.lower() in definition.lower() or word in seen:
                continue
            seen.add(word)
            out.append({"prompt": f'Definition of "{word}":', "target": " " + definition, "group": pos})
    return out


def fortunes(package: str) -> list[dict]:
    out = []
    for f in package_files(package):
        for text in read_fortunes(f):
            words = text.split()
            if not 8 <= len(words) <= 40:
                continue
            k = min(10, len(words) // 2)
            out.append({"prompt": " ".join(words[:k]), "target": " " + _words(" ".join(words[k:]), 16), "text": _words(text, 40)})
    return out


def qa() -> list[dict]:
    try:
        import chatterbot_corpus
    except ImportError:
        raise DataMissingError("the PyPI package 'chatterbot-corpus' is not installed; install it with: pip install chatterbot-corpus") from None
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    out, seen = [], set()
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [" ".join(str(s).split()) for s in conv if isinstance(s, str) and s.strip()]
            for q, a in zip(turns, turns[1:]):
                key = q.lower()
                if key in seen or len(a.split()) > 30:
                    continue
                seen.add(key)
                out.append({"prompt": f"Question: {q}\nAnswer:", "target": " " + _words(a, 24), "group": f.stem})
    return out


SOURCES = {
    "definitions": definitions,
    "german": lambda: fortunes("fortunes-de"),
    "spanish": lambda: fortunes("fortunes-es"),
    "qa": qa,
}


# -- splits and choices -----------------------------------------------------------------
def build(task: str, *, n_test: int, n_val: int, n_train: int | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """train / val / test examples of one task; val and test carry four choices each."""
    rows = {}
    for r in SOURCES[task]():
        rows.setdefault(r["prompt"], r)  # one example per prompt: splits stay disjoint
    rows = sorted(rows.values(), key=lambda r: _h(f"{task}:{seed}:{r['prompt']}"))
    n = len(rows)
    n_test, n_val = min(n_test, n // 3), min(n_val, n // 6)
    test, val, train = rows[:n_test], rows[n_test:n_test + n_val], rows[n_test + n_val:]
    if n_train is not None:
        train = train[:n_train]
    rng = random.Random(_h(f"{task}:choices:{seed}"))
    return {"train": [_train_row(task, r) for r in train], "val": _with_choices(val, rng), "test": _with_choices(test, rng)}


def _train_row(task: str, r: dict) -> dict:
    if "text" in r:  # fortunes: language modelling on the whole text
        return {"prompt": "", "target": r["text"]}
    return {"prompt": r["prompt"], "target": r["target"]}


def _with_choices(rows: list[dict], rng: random.Random) -> list[dict]:
    """Three distractors per example: targets of other examples of the same split (same
    group where the task has groups, e.g. the part of speech, so the form does not give it away)."""
    out = []
    for i, r in enumerate(rows):
        pool = [j for j, o in enumerate(rows) if j != i and o.get("group") == r.get("group") and o["target"] != r["target"]]
        if len(pool) < N_CHOICES - 1:
            pool = [j for j, o in enumerate(rows) if j != i and o["target"] != r["target"]]
        picks = rng.sample(pool, N_CHOICES - 1)
        choices = [rows[j]["target"] for j in picks]
        label = rng.randrange(N_CHOICES)
        choices.insert(label, r["target"])
        out.append({"prompt": r["prompt"], "target": r["target"], "choices": choices, "label": label})
    return out


def write(folder: Path, data: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        # plain text (prompt + target, one per line) for `alloykit stats collect --data` and `search adamerging --data`
        (folder / f"{split}.txt").write_text("".join((r["prompt"] + r["target"]).replace("\n", " ").strip() + "\n" for r in rows),
                                             encoding="utf-8")


def read(folder: Path, split: str) -> list[dict]:
    with open(folder / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]
