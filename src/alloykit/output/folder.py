"""One crash-safe output folder: every command that writes a model or an adapter goes through it.

The target is either absent or whole:

1. the target is checked (a non-empty one needs ``overwrite``) before anything is computed;
2. everything is written in ``.NAME.alloykit-tmp`` beside the target, locked with ``flock``
   (released by the kernel however the process ends) so that a second run into the same
   target cannot delete or publish this one's files;
3. with a journal (sharded models), each shard is recorded once fsynced, so an interrupted
   run can be resumed from its verified shards;
4. at the end the small files are fsynced, then the folder, and it is renamed into place
   (an existing target, with ``overwrite``, is moved aside first and removed after);
5. on an interrupt, a full disk or an unreadable input, verified shards are kept for
   ``--resume`` and the error says where; on anything else the temp folder is removed.

``stale_folders`` lists what interrupted runs left behind (``alloykit clean``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from alloykit.errors import CheckpointError, OutputError
from alloykit.io.durable import fsync_dir, fsync_file
from alloykit.output.faults import fault_point
from alloykit.output.journal import JOURNAL, Fingerprint, Journal, describe_change, read_journal_summary

TMP_MARK = ".alloykit-tmp"
OLD_MARK = ".alloykit-old"
MANIFEST = "alloykit_manifest.json"
SPACE_MARGIN = 64 << 20


def temp_dir_for(out_dir: Path) -> Path:
    """The clearly named working folder beside the target: ``.NAME.alloykit-tmp``."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{TMP_MARK}"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while writing: says where the unfinished output is and what to do with it."""

    def __init__(self, target: Path, tmp: Path, kept: int, total: int | None):
        self.target, self.tmp, self.kept, self.total = target, tmp, kept, total
        super().__init__(str(self))

    def __str__(self) -> str:
        if not self.kept:
            return f"interrupted before anything of '{self.target}' was finished; its working folder was removed"
        of = f" of {self.total}" if self.total is not None else ""
        return (f"interrupted: {self.kept}{of} finished shard(s) of '{self.target}' are kept in '{self.tmp}'; "
                f"resume: rerun the same command with --resume; discard: alloykit clean '{self.target}' --remove")


def finished_fingerprint(target: Path) -> Fingerprint | None:
    """The fingerprint recorded in a finished alloykit output folder, or None."""
    try:
        data = json.loads((Path(target) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fp = data.get("fingerprint") if isinstance(data, dict) else None
    return fp if isinstance(fp, dict) else None


class OutputFolder:
    """A target folder written through a locked temp folder and published by one rename.

    Usage::

        folder = OutputFolder(target, overwrite=..., what="merge")
        if folder.already_done(fingerprint, resume):   # --resume of a finished, identical run
            return
        with folder.writing(fingerprint, resume=resume, space=bytes_to_write) as journal:
            ... write into folder.tmp (journal.complete(shard) as shards finish) ...
            folder.commit()
    """

    def __init__(self, target: str | os.PathLike, *, overwrite: bool = False, what: str = "merge"):
        self.target = Path(target).absolute()
        self.tmp = temp_dir_for(self.target)
        self.overwrite = overwrite
        self.what = what
        self.journal: Journal | None = None
        self.total_shards: int | None = None
        self._lock_fd: int | None = None

    # -- before any work -------------------------------------------------------------
    def _occupied(self) -> bool:
        t = self.target
        return (t.exists() or t.is_symlink()) and (not t.is_dir() or t.is_symlink() or any(t.iterdir()))

    def already_done(self, fingerprint: Fingerprint, resume: bool) -> bool:
        """Check the target before any work. True when ``resume`` finds this very output
        finished there (same fingerprint): nothing to do. Raises when the target is taken."""
        if not self._occupied() or self.overwrite:
            return False
        if resume and not self.tmp.exists():
            old = finished_fingerprint(self.target)
            if old is None:
                raise OutputError(f"output folder '{self.target}' exists and is not empty, and holds no finished alloykit "
                                  f"output (no {MANIFEST}): nothing to resume; choose another folder or pass --overwrite")
            change = describe_change(old, fingerprint)
            if not change:
                return True
            raise OutputError(f"output folder '{self.target}' holds a finished {self.what} that differs: {change}; "
                              "pass --overwrite to redo it, or choose another folder")
        raise OutputError(f"output folder '{self.target}' exists and is not empty; choose another folder or pass --overwrite")

    def check_space(self, need: int) -> None:
        free = shutil.disk_usage(self.target.parent).free
        if need + SPACE_MARGIN > free:
            raise OutputError(
                f"not enough disk space in '{self.target.parent}': the {self.what} writes {need / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB free; free space or choose another output folder"
            )

    # -- the temp folder -------------------------------------------------------------
    def _create_parent(self) -> None:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create the folder '{self.target.parent}': {err.strerror or err}") from None

    def _open_tmp(self) -> None:
        try:
            if self.tmp.is_symlink() or (self.tmp.exists() and not self.tmp.is_dir()):
                self.tmp.unlink()  # not ours to follow
            if not self.tmp.exists():
                self.tmp.mkdir()
            fd = os.open(self.tmp, os.O_RDONLY)
        except FileExistsError:
            raise OutputError(f"another alloykit run into the same folder started just now ('{self.tmp}'); "
                              "wait for it or choose another folder") from None
        except OSError as err:
            raise OutputError(f"cannot create the working folder '{self.tmp}': {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"another alloykit merge or extraction is writing to the same output (its working folder '{self.tmp}' "
                "is locked); wait for it to finish or choose another folder"
            ) from None
        self._lock_fd = fd

    def _start(self, fingerprint: Fingerprint, resume: bool) -> Journal:
        """Reuse an interrupted run's verified shards (``resume``), or start clean."""
        journal, why = Journal.load_verified(self.tmp, fingerprint) if resume else (Journal(self.tmp, fingerprint), "")
        if why and (self.tmp / JOURNAL).exists():
            raise OutputError(f"cannot resume from '{self.tmp}': {why}; rerun without --resume to start over")
        keep = set(journal.shards) | ({JOURNAL} if journal.shards else set())
        for p in self.tmp.iterdir():  # leftovers of an interrupted run, or all of it when not resuming
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return journal

    def writing(self, fingerprint: Fingerprint, *, resume: bool = False, space: int = 0) -> "_Writing":
        """Context manager: prepare and lock the temp folder, yield its journal, clean up on errors."""
        return _Writing(self, fingerprint, resume, space)

    # -- publishing ------------------------------------------------------------------
    def commit(self) -> Path:
        """Rename the finished folder into place (flushed first, so the rename publishes whole files)."""
        if self.journal is not None:
            self.journal.remove()
        fault_point("journal-removed")
        for p in self.tmp.rglob("*"):  # shards were fsynced as they completed; the small files were not
            if p.is_file() and not p.is_symlink() and not p.name.endswith(".safetensors"):
                fsync_file(p)
        fsync_dir(self.tmp)
        old = self.target.parent / f".{self.target.name}{OLD_MARK}"
        _remove(old)  # left by a run killed between the two renames below
        if self.target.exists() or self.target.is_symlink():
            os.rename(self.target, old)
            fault_point("target-moved-aside")
            os.rename(self.tmp, self.target)
            _remove(old)
        else:
            os.rename(self.tmp, self.target)
        fault_point("renamed")
        fsync_dir(self.target.parent)
        return self.target

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _Writing:
    def __init__(self, folder: OutputFolder, fingerprint: Fingerprint, resume: bool, space: int):
        self.folder, self.fingerprint, self.resume, self.space = folder, fingerprint, resume, space

    def __enter__(self) -> Journal:
        f = self.folder
        f._create_parent()
        if not self.resume and self.space:
            f.check_space(self.space)
        fault_point("planned")
        f._open_tmp()
        try:
            f.journal = f._start(self.fingerprint, self.resume)
            if self.resume and self.space:
                f.check_space(self.space - sum(rec["size"] for rec in f.journal.shards.values()))
        except BaseException:
            f.release()
            raise
        return f.journal

    def __exit__(self, kind, err, tb) -> bool:
        f = self.folder
        try:
            if err is None:
                return False
            if isinstance(err, OSError):
                err = OutputError(f"cannot write the output in '{f.tmp}': {err.strerror or err} "
                                  "(free disk space or choose another folder)")
            if isinstance(err, (KeyboardInterrupt, OutputError, CheckpointError)):
                # an interrupt, a full disk, an input that failed to read: a rerun of the same plan can
                # succeed, so the verified shards are kept for --resume (other errors need a new plan)
                kept = len(f.journal.shards) if f.journal is not None else 0
                if not kept:
                    shutil.rmtree(f.tmp, ignore_errors=True)
                if isinstance(err, KeyboardInterrupt):
                    raise Interrupted(f.target, f.tmp, kept, f.total_shards) from None
                if kept:
                    raise type(err)(f"{err}; {kept} finished shard(s) are kept in '{f.tmp}': rerun with --resume "
                                    "to continue, or delete it") from None
                raise err from None
            shutil.rmtree(f.tmp, ignore_errors=True)  # a bug: trust nothing it wrote
            return False
        finally:
            f.release()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# -- what interrupted runs leave behind ------------------------------------------------


@dataclass
class StaleFolder:
    path: Path
    target: Path
    bytes: int
    age_s: float
    shards: int | None  # finished shards recorded in its journal, None without a journal
    in_use: bool  # locked by a running alloykit command


def _is_locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def _size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def stale_folders(path: str | os.PathLike) -> list[StaleFolder]:
    """Working folders left by interrupted runs: those inside folder ``path``, and those of the
    target ``path`` itself (``.NAME.alloykit-tmp`` / ``.NAME.alloykit-old`` beside it)."""
    path = Path(path).absolute()
    found: dict[Path, None] = {}
    if path.is_dir() and not path.is_symlink():
        for p in sorted(path.iterdir()):
            if p.name.startswith(".") and p.name.endswith((TMP_MARK, OLD_MARK)) and p.is_dir() and not p.is_symlink():
                found[p] = None
    for mark in (TMP_MARK, OLD_MARK):
        p = path.parent / f".{path.name}{mark}"
        if p.is_dir() and not p.is_symlink():
            found[p] = None
    out = []
    now = time.time()
    for p in found:
        name = p.name[1:].removesuffix(TMP_MARK).removesuffix(OLD_MARK)
        journal = read_journal_summary(p)
        out.append(StaleFolder(p, p.parent / name, _size(p), now - p.stat().st_mtime,
                               len(journal["shards"]) if journal else None, _is_locked(p)))
    return out


def remove_stale(folder: StaleFolder) -> None:
    """Delete one stale working folder (never one a running command holds)."""
    if _is_locked(folder.path):
        raise OutputError(f"'{folder.path}' is in use by a running alloykit command; wait for it to finish")
    shutil.rmtree(folder.path)
