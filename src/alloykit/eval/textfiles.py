"""Text files a user gives alloykit: calibration data (``--data``) and task splits.

One reader, one set of rules, for every command (``stats collect``, ``search``, ``eval``):

* ``.txt``: one text per non-empty line (surrounding whitespace removed);
* ``.jsonl``: one JSON value per non-empty line, either an object with a ``"text"`` string
  and optionally a ``"label"`` (a string, or an integer class index), or a bare JSON
  string (a text without label). Other keys (``"id"``, ``"source"``...) are ignored,
  except one that looks like a misspelt ``text`` or ``label``, which is refused.

Files are read as UTF-8 and hashed (SHA-256 of the bytes), so that every artifact made
from them can record exactly which data it saw (:meth:`TextFile.record`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from alloykit.errors import AlloyError, did_you_mean

SUFFIXES = (".txt", ".jsonl")
KEYS = ("text", "label")


class DataFileError(AlloyError):
    """A text or JSONL data file is missing or malformed."""


@dataclass(frozen=True)
class Record:
    text: str
    label: str | int | None = None


@dataclass(frozen=True)
class TextFile:
    path: Path
    sha256: str
    records: tuple[Record, ...]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.records]

    @property
    def labelled(self) -> bool:
        return bool(self.records) and all(r.label is not None for r in self.records)

    def record(self, used: int | None = None) -> dict:
        """What an artifact records about this file: path, SHA-256, how many texts it holds and used."""
        out = {"path": str(self.path), "sha256": self.sha256, "texts": len(self.records)}
        if used is not None:
            out["used"] = used
        return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_record(value, path: Path, no: int) -> Record:
    where = f"data file '{path}' line {no}"
    if isinstance(value, str):
        return Record(value)
    if not isinstance(value, dict):
        raise DataFileError(f"{where}: expected a JSON object with a \"text\" string (and optionally a \"label\"), "
                            f"got {type(value).__name__}")
    for key in value:
        if key not in KEYS and did_you_mean(key, KEYS):
            raise DataFileError(f"{where}: unknown key '{key}'{did_you_mean(key, KEYS)}; the keys read are \"text\" and \"label\"")
    text, label = value.get("text"), value.get("label")
    if not isinstance(text, str):
        raise DataFileError(f"{where}: needs a \"text\" string (keys found: {', '.join(map(str, value)) or 'none'})")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise DataFileError(f"{where}: \"label\" must be a string or an integer class index, got {json.dumps(label)[:40]}")
    return Record(text, label)


def read_text_file(path: str | os.PathLike) -> TextFile:
    """Read a ``.txt`` or ``.jsonl`` data file (see the module's rules); errors name the file and line."""
    p = Path(path)
    if p.suffix not in SUFFIXES:
        raise DataFileError(f"data file '{path}': give a .txt file (one text per line) or a .jsonl file "
                            "(a {\"text\": ..., \"label\": ...} object per line)")
    if not p.is_file():
        raise DataFileError(f"data file '{path}' does not exist")
    raw = p.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFileError(f"data file '{path}' line {line}: not UTF-8 text; save the file as UTF-8") from None
    records = []
    for no, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix == ".jsonl":
            try:
                value = json.loads(line)
            except ValueError:
                raise DataFileError(f"data file '{path}' line {no}: not valid JSON (a .jsonl file holds one JSON object "
                                    "per line)") from None
            records.append(_json_record(value, p, no))
        else:
            records.append(Record(line))
    return TextFile(p, hashlib.sha256(raw).hexdigest(), tuple(records))
