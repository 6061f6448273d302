"""Sharded safetensors writer with a fixed layout.

Every output tensor's dtype and shape is known when the plan is made, so the
shards, their headers and every tensor's byte offset are fixed before any tensor
is computed. Headers are written first; tensors are then written straight to their
offsets (in any order, from any thread) and never buffered as a whole shard.
A method that fills its output a block at a time can fill it in place instead:
``buffer(name)`` maps the tensor's bytes in the shard file, so the output lives in
the page cache, not in process memory (issue 17: the 394M-entry embedding of a
3B model is 0.79 GB of bf16 that a merge would otherwise hold whole).
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alloykit.errors import OutputError
from alloykit.io.safetensors_format import header_bytes


@dataclass
class ShardLayout:
    filename: str
    names: list[str]
    prefix: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # absolute offsets in the file
    size: int = 0


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int
) -> list[ShardLayout]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` data bytes
    (a tensor larger than the limit gets a shard of its own)."""
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    used = 0
    for e in entries:
        nb = _nbytes(e[1], e[2])
        if groups[-1] and used + nb > max_shard_size:
            groups.append([])
            used = 0
        groups[-1].append(e)
        used += nb
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        prefix, rel = header_bytes(group, {"format": "pt"})
        layout = ShardLayout(fname, [g[0] for g in group], prefix)
        layout.offsets = {g[0]: len(prefix) + off for g, off in zip(group, rel)}
        layout.size = len(prefix) + sum(_nbytes(g[1], g[2]) for g in group)
        shards.append(layout)
    return shards


class ShardedWriter:
    """Writes tensors at precomputed offsets into pre-sized shard files in ``folder``.

    When the last tensor of a shard is written, the shard is fsynced and
    ``on_complete(filename, size)`` is called (the resume journal records it there).
    """

    def __init__(
        self,
        folder: Path,
        shards: list[ShardLayout],
        dtypes: dict[str, torch.dtype],
        shapes: dict[str, tuple[int, ...]],
        on_complete: Callable[[str, int], None] | None = None,
    ):
        self.folder = Path(folder)
        self.shards = shards
        self.dtypes = dtypes
        self.shapes = shapes
        self.on_complete = on_complete
        self._where: dict[str, tuple[ShardLayout, int]] = {}
        for s in shards:
            for name, off in s.offsets.items():
                self._where[name] = (s, off)
        self._fds: dict[str, int] = {}
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}  # name -> (its map, the buffer's address)
        self._remaining: dict[str, int] = {}
        self._lock = threading.Lock()

    def open(self, done: set[str] = frozenset()) -> None:
        """Create every shard not in ``done`` (complete shards of a resumed run stay untouched)."""
        for s in self.shards:
            if s.filename in done:
                continue
            path = self.folder / s.filename
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[s.filename] = fd
                _pwrite_all(fd, s.prefix, 0, path)
                os.ftruncate(fd, s.size)
            except OSError as err:
                raise _cannot_write(path, err) from None
            self._remaining[s.filename] = len(s.names)
            if not s.names:
                self._finish(s)

    def buffer(self, name: str) -> torch.Tensor | None:
        """A tensor of ``name``'s planned dtype and shape over its bytes in its shard file (a
        shared memory map), or None where the region cannot be reserved or mapped (then the
        caller allocates); ``OutputError`` when the disk is full. What is stored in it is
        in the file; ``write(name, the buffer)`` then only flushes it. Any other tensor passed
        to ``write`` is written as usual (a method that declined to fill the buffer)."""
        shard, off = self._where[name]
        fd = self._fds.get(shard.filename)
        nbytes = _nbytes(self.dtypes[name], self.shapes[name])
        if fd is None or nbytes == 0:
            return None
        # A store into a map of a sparse file whose disk is full kills the process (SIGBUS) where
        # pwrite would have said ENOSPC: reserve the region's blocks first, so that a full disk is
        # this one line and the merge can --resume. Without posix_fallocate (macOS, Windows) or
        # where the file system has no such call, no map: the caller allocates, pwrite writes.
        if not hasattr(os, "posix_fallocate"):
            return None
        path = self.folder / shard.filename
        try:
            os.posix_fallocate(fd, off, nbytes)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise _cannot_write(path, err, full_disk_hint=True) from None
        start = off - off % mmap.ALLOCATIONGRANULARITY  # a map starts on the granularity
        try:
            mm = mmap.mmap(fd, off + nbytes - start, offset=start)
        except (OSError, ValueError):  # a file system without shared maps: the caller allocates
            return None
        # the tensor holds a reference to the map: it is unmapped when both are gone
        t = torch.frombuffer(mm, dtype=self.dtypes[name], count=math.prod(self.shapes[name]), offset=off - start)
        t = t.view(self.shapes[name])
        with self._lock:
            self._maps[name] = (mm, t.data_ptr())
        return t

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, off = self._where[name]
        want_dtype, want_shape = self.dtypes[name], self.shapes[name]
        if tensor.dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise AssertionError(f"{name}: planned {want_dtype}{list(want_shape)}, got {tensor.dtype}{list(tensor.shape)}")
        with self._lock:
            mapped = self._maps.pop(name, None)
        t = tensor.detach().to("cpu").contiguous()
        if mapped is not None and t.numel() and t.data_ptr() == mapped[1]:
            # Linux has one page cache: the shard's fsync writes back the pages dirtied through the
            # map, and leaving them to it lets the kernel write them while the next tensor computes;
            # elsewhere msync first
            if sys.platform != "linux":
                try:
                    mapped[0].flush()
                except OSError as err:
                    raise _cannot_write(self.folder / shard.filename, err) from None
        elif t.numel():
            data = memoryview(t.view(-1).view(torch.uint8).numpy())
            _pwrite_all(self._fds[shard.filename], data, off, self.folder / shard.filename)
        with self._lock:
            self._remaining[shard.filename] -= 1
            last = self._remaining[shard.filename] == 0
        if last:
            self._finish(shard)

    def _finish(self, shard: ShardLayout) -> None:
        path = self.folder / shard.filename
        try:
            os.fsync(self._fds[shard.filename])
        except OSError as err:
            raise _cannot_write(path, err) from None
        if self.on_complete is not None:
            self.on_complete(shard.filename, shard.size)

    def close(self) -> None:
        """Close the files (each shard was already fsynced when its last tensor landed)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def write_index(self) -> None:
        if len(self.shards) <= 1:
            return
        total = sum(s.size - len(s.prefix) for s in self.shards)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: s.filename for s in self.shards for n in s.names},
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
    view = memoryview(data)
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as err:
        raise _cannot_write(path, err, full_disk_hint=True) from None


def _cannot_write(path: Path, err: OSError, full_disk_hint: bool = False) -> OutputError:
    """The one-line error of a failed write, open or sync of ``path``."""
    hint = " (free disk space, or choose another output folder)" if full_disk_hint else ""
    return OutputError(f"cannot write '{path}': {err.strerror or err}{hint}")
