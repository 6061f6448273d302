"""The resume journal, and the fingerprint of what decides an output's bytes.

The journal lives in the temporary output folder as ``alloykit_journal.json`` and is
rewritten atomically (write, fsync, rename) each time a shard completes. A resumed run
trusts a shard only if the journal's fingerprint equals the new run's and the file on
disk still has the recorded size and SHA-256.

A fingerprint is a small mapping of named parts (recipe, seed, version, each input, the
output layout...), each a short digest or value, so that a mismatch can say *what*
differs, in one line. The finished folder keeps it in ``alloykit_manifest.json``, which is
how ``--resume`` recognises a merge that already finished.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from alloykit.io.durable import file_sha256, write_text_durably
from alloykit.output.faults import fault_point

JOURNAL = "alloykit_journal.json"

Fingerprint = dict[str, str]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: how each part of a fingerprint is named in a message
_PART_NAMES = {"recipe": "the recipe", "seed": "the seed", "alloykit": "the alloykit version",
               "stream": "the random stream of the DARE/DELLA masks",
               "layout": "the output layout (tensors, dtypes, shard size)", "options": "the options"}


def describe_change(old: Fingerprint | None, new: Fingerprint) -> str:
    """What differs between two fingerprints, as a phrase ('' when nothing does)."""
    if not isinstance(old, dict):
        return "it was written by another alloykit version (no comparable fingerprint)"
    changed = []
    for key in list(new) + [k for k in old if k not in new]:
        if old.get(key) == new.get(key):
            continue
        if key.startswith("input:"):
            label = key.removeprefix("input:")
            what = ("is new" if key not in old else "is no longer an input" if key not in new
                    else "changed (its files, sizes, dates or tensor headers)")
            changed.append(f"input '{label}' {what}")
        elif key == "stream" and key not in old:  # before the counter-based stream: torch's generator
            changed.append(f"{_PART_NAMES[key]} changed (torch's generator then, {new.get(key)} now: other bytes)")
        elif key in ("seed", "alloykit", "stream"):
            changed.append(f"{_PART_NAMES[key]} changed ({old.get(key)} then, {new.get(key)} now)")
        else:
            changed.append(f"{_PART_NAMES.get(key, key)} changed")
    return "; ".join(changed)


class Journal:
    def __init__(self, folder: Path, fingerprint: Fingerprint):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.shards: dict[str, dict] = {}
        self._lock = threading.Lock()

    @classmethod
    def load_verified(cls, folder: Path, fingerprint: Fingerprint) -> tuple["Journal", str]:
        """The journal of an interrupted run, keeping only shards that verify.

        Returns (journal, why) where ``why`` says why nothing could be reused ('' if
        the journal was usable).
        """
        journal = cls(folder, fingerprint)
        path = Path(folder) / JOURNAL
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return journal, "no journal in the interrupted run's folder"
        except (OSError, ValueError):
            return journal, "the journal is unreadable"
        if not isinstance(data, dict) or not isinstance(data.get("shards"), dict):
            return journal, "the journal is unreadable"
        if data.get("fingerprint") != fingerprint:
            return journal, f"since the interrupted run, {describe_change(data.get('fingerprint'), fingerprint)}"
        for name, rec in data["shards"].items():
            f = Path(folder) / name
            if not isinstance(rec, dict) or Path(name).name != name or name == JOURNAL or f.is_symlink() or not f.is_file():
                continue
            if f.stat().st_size == rec.get("size") and file_sha256(f) == rec.get("sha256"):
                journal.shards[name] = rec
        return journal, ""

    def complete(self, name: str, size: int, sha256: str) -> None:
        with self._lock:
            self.shards[name] = {"size": size, "sha256": sha256}
            self._save()

    def _save(self) -> None:
        data = json.dumps({"fingerprint": self.fingerprint, "shards": self.shards}, indent=1)
        write_text_durably(self.folder / JOURNAL, data, before_rename=lambda: fault_point("journal-part"))

    def remove(self) -> None:
        for name in (JOURNAL, JOURNAL + ".part"):
            try:
                (self.folder / name).unlink()
            except FileNotFoundError:
                pass


def read_journal_summary(folder: Path) -> dict | None:
    """The shards recorded in a temp folder's journal (for listing stale folders), or None."""
    try:
        data = json.loads((Path(folder) / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("shards"), dict) else None
