"""Labelled text read from installed packages, and deterministic splits.

Sources (all installable offline):

* WordNet 3.0 (Debian ``wordnet-base``): ``/usr/share/wordnet/data.{noun,verb,adj,adv}``.
  Each synset line is ``offset lex_filenum ss_type w_cnt words... p_cnt pointers... | gloss``;
  ``lex_filenum`` is the lexicographer file (the supersense). nltk refuses paths outside
  its own data folder, so the files are parsed here.
* fortune cookies (Debian ``fortunes`` and ``fortunes-LANG``): texts separated by lines
  holding ``%``. Which files a package owns comes from dpkg's file list, so the English
  categories are not mixed with the symlinked Italian files in the same folder.
* chatterbot-corpus (PyPI): YAML files of conversations, one topic per file.
"""

from __future__ import annotations

import os
import random
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from alloykit.errors import AlloyError

WORDNET_DIR = Path(os.environ.get("ALLOYKIT_WORDNET_DIR", "/usr/share/wordnet"))
DPKG_INFO = Path("/var/lib/dpkg/info")
APT_PACKAGES = ("wordnet-base", "fortunes", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-br", "fortunes-pl")
APT_INSTALL = "apt-get install -y " + " ".join(APT_PACKAGES)

# WordNet's lexicographer files, by number (wndb(5) / lexnames(5))
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()

Example = tuple[str, str]  # (text, label)


class DataMissingError(AlloyError):
    """A data package the task reads is not installed."""


def _missing(what: str, install: str) -> DataMissingError:
    return DataMissingError(f"{what} is not installed; install it with: {install}")


# -- WordNet -----------------------------------------------------------------------
def wordnet_synsets(pos: str) -> list[tuple[str, str, str]]:
    """(gloss, supersense, ss_type) for every synset of one data file (noun/verb/adj/adv)."""
    path = WORDNET_DIR / f"data.{pos}"
    if not path.is_file():
        raise _missing(f"WordNet ({path})", "apt-get install -y wordnet-base")
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):  # the licence header
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 3:
                continue
            out.append((gloss.strip(), LEXNAMES[int(fields[1])], fields[2]))
    return out


def wordnet_supersense(pos: str) -> list[Example]:
    return [(g, lex) for g, lex, _ in wordnet_synsets(pos)]


def wordnet_pos() -> list[Example]:
    """Gloss -> part of speech (satellite adjectives 's' count as adjectives)."""
    names = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
    return [(g, names[t]) for pos in ("noun", "verb", "adj", "adv") for g, _, t in wordnet_synsets(pos)]


# -- fortunes ------------------------------------------------------------------------
def package_files(package: str, under: str = "/usr/share/games/fortunes/") -> list[Path]:
    """Fortune text files a Debian package installed (no index .dat files, no duplicates)."""
    listing = DPKG_INFO / f"{package}.list"
    if not listing.is_file():
        raise _missing(f"Debian package '{package}'", f"apt-get install -y {package}")
    seen, out = set(), []
    for line in listing.read_text(errors="replace").splitlines():
        p = Path(line)
        if not line.startswith(under) or p.suffix in (".dat", ".u8") or "/off/" in line or not p.is_file():
            continue
        real = p.resolve()
        if real not in seen:
            seen.add(real)
            out.append(p)
    return sorted(out)


def read_fortunes(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # several older files are Latin-1
        text = raw.decode("latin-1")
    texts = (" ".join(chunk.split()) for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE))
    return [t for t in texts if len(t) >= 10]


def fortune_categories(min_count: int = 200) -> list[Example]:
    """English fortunes labelled by their file (category); categories with few texts dropped."""
    out = []
    for f in package_files("fortunes"):
        texts = read_fortunes(f)
        if len(texts) >= min_count:
            out += [(t, f.name) for t in texts]
    return out


FORTUNE_LANGUAGES = {"en": "fortunes", "de": "fortunes-de", "es": "fortunes-es", "it": "fortunes-it",
                     "pt": "fortunes-br", "pl": "fortunes-pl"}


def fortune_languages() -> list[Example]:
    return [(t, lang) for lang, pkg in FORTUNE_LANGUAGES.items() for f in package_files(pkg) for t in read_fortunes(f)]


# -- chatterbot-corpus ---------------------------------------------------------------
def chatterbot_topics(language: str = "english") -> list[Example]:
    try:
        import chatterbot_corpus
    except ImportError:
        raise _missing("the PyPI package 'chatterbot-corpus'", "pip install chatterbot-corpus") from None
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    out = []
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            out += [(" ".join(str(s).split()), f.stem) for s in conv if isinstance(s, str) and s.strip()]
    return out


# -- splits --------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]  # indices into the task's label list

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Splits:
    labels: list[str]  # class names, sorted
    train: Split
    val: Split
    test: Split


def make_splits(examples: list[Example], *, key: str, seed: int, n_test: int, n_val: int,
                n_train: int | None = None, per_class: int | None = None, min_train: int = 1) -> Splits:
    """Deterministic shuffle, then test / validation / train, disjoint by text.

    Texts that occur with two different labels are dropped (ambiguous), duplicates are
    merged. The order depends only on the data, ``key`` (the task name) and ``seed``,
    never on Python's hash seed. ``per_class`` caps each class before splitting (balance).
    """
    by_text: dict[str, set[str]] = defaultdict(set)
    for text, label in examples:
        by_text[text].add(label)
    clean = sorted((t, next(iter(ls))) for t, ls in by_text.items() if len(ls) == 1)
    rng = random.Random(zlib.crc32(key.encode()) * 1000 + seed)
    rng.shuffle(clean)
    if per_class:
        count: Counter[str] = Counter()
        kept = []
        for t, lab in clean:
            if count[lab] < per_class:
                count[lab] += 1
                kept.append((t, lab))
        clean = kept
        rng.shuffle(clean)  # again: the cap kept the common classes' items early in the order
    labels = sorted({lab for _, lab in clean})
    index = {lab: i for i, lab in enumerate(labels)}
    n = len(clean)
    n_test, n_val = min(n_test, n // 3), min(n_val, n // 6)
    if n - n_test - n_val < min_train:
        raise AlloyError(f"task '{key}': only {n} usable examples; lower n_test/n_val")

    def split(rows: list[Example]) -> Split:
        return Split([t for t, _ in rows], [index[lab] for _, lab in rows])

    train = clean[n_test + n_val:]
    if n_train is not None:
        train = train[:n_train]
    return Splits(labels, train=split(train), val=split(clean[n_test:n_test + n_val]), test=split(clean[:n_test]))
