"""Durable writes: fsync a file or a folder, checksum a file, replace a small file atomically.

A rename publishes a file whole only if its bytes reached the disk first: every writer of
an output folder (model shards, adapters, side outputs, journals) flushes through here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush one written file to disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames); best effort on filesystems that refuse it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_text_durably(path: Path, text: str, before_rename: Callable[[], None] | None = None) -> None:
    """Write ``path`` through ``PATH.part`` + fsync + rename: readers see the old file or the new one."""
    part = path.with_name(path.name + ".part")
    with open(part, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(part, path)
