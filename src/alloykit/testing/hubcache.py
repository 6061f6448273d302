"""A Hugging Face Hub cache folder written as the Hub client writes it, without a network.

``models--org--name/blobs/<etag>`` holds each file's bytes once (the etag: a git blob
SHA-1 for small files, the SHA-256 of the content for LFS files such as safetensors),
``snapshots/<commit>/<file>`` are relative symlinks to the blobs, and
``refs/<branch or tag>`` holds the commit hash. ``huggingface_hub.snapshot_download(...,
local_files_only=True)`` and ``try_to_load_from_cache`` read it like a real download
(the tests check that), so Hub names can be tested offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model", ".gguf")


def repo_folder(cache: str | Path, repo: str) -> Path:
    return Path(cache) / ("models--" + repo.replace("/", "--"))


def _etag(name: str, data: bytes) -> str:
    if name.endswith(_LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(
    cache: str | Path,
    repo: str,
    source: str | Path,
    *,
    refs: tuple[str, ...] = ("main",),
    skip: tuple[str, ...] = (),
) -> str:
    """Put every file of the folder ``source`` into the cache as one commit of ``repo``.

    ``refs`` (branches or tags) are pointed at the commit; files named in ``skip`` are left out
    (a partial download). Returns the commit hash (derived from the content, so stable).
    """
    root = repo_folder(cache, repo)
    files = sorted(p for p in Path(source).rglob("*") if p.is_file())
    digest = hashlib.sha1()
    entries = []
    for path in files:
        rel = path.relative_to(source).as_posix()
        data = path.read_bytes()
        etag = _etag(rel, data)
        digest.update(f"{rel}:{etag};".encode())
        entries.append((rel, etag, data))
    commit = digest.hexdigest()
    for rel, etag, data in entries:
        blob = root / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        if rel in skip:
            continue
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        ref_file = root / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)  # the client writes the hash without a newline
    return commit


@contextlib.contextmanager
def refuse_network() -> Iterator[None]:
    """Within the block any socket connection fails the test (offline tests stay offline)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    saved = socket.socket.connect, socket.create_connection
    socket.socket.connect, socket.create_connection = refuse, refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.create_connection = saved
