"""The resume journal: which output shards are complete, with their size and checksum.

It lives in the temporary output folder as ``alloykit_journal.json`` and is rewritten
atomically (write, fsync, rename) each time a shard completes. A resumed merge trusts
a shard only if the journal's fingerprint matches the new plan and the file on disk
still has the recorded size and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path

JOURNAL = "alloykit_journal.json"


def fault_point(name: str) -> None:
    """Test hook: ``ALLOYKIT_FAULT_KILL_AT=name`` SIGKILLs the process at this point of a merge.

    The reliability suite kills merges at every named phase this way (planned,
    journal-part, tensors-written, metadata-written, journal-removed, target-moved-aside,
    renamed); unset, it costs one environment lookup per phase.
    """
    if os.environ.get("ALLOYKIT_FAULT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_file(path: Path) -> None:
    """Flush one written file to disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


class Journal:
    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.shards: dict[str, dict] = {}
        self._lock = threading.Lock()

    @classmethod
    def load_verified(cls, folder: Path, fingerprint: str) -> tuple["Journal", str]:
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
            return journal, "the recipe, inputs or options changed since the interrupted run"
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
        tmp = self.folder / (JOURNAL + ".part")
        data = json.dumps({"fingerprint": self.fingerprint, "shards": self.shards}, indent=1)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("journal-part")
        os.replace(tmp, self.folder / JOURNAL)

    def remove(self) -> None:
        for name in (JOURNAL, JOURNAL + ".part"):
            try:
                (self.folder / name).unlink()
            except FileNotFoundError:
                pass
