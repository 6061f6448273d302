"""Checkpoints: an index of every tensor built from headers only, and a lazy reader.

A checkpoint is a Hugging Face model folder (``model.safetensors``, or shards plus
``model.safetensors.index.json``), a single ``.safetensors`` file, or, only with
``allow_pickle=True``, PyTorch ``.bin``/``.pt`` files loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

from alloykit.errors import CheckpointError
from alloykit.io.safetensors_format import TensorInfo, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class TensorIndex:
    """Name -> TensorInfo lookups shared by every kind of checkpoint."""

    label: str
    tensors: dict[str, TensorInfo]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"model '{self.label}': has no tensor '{name}'") from None


class Checkpoint(TensorIndex):
    """Tensor index of one model; tensors are read one at a time, on demand."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        self.allow_pickle = allow_pickle
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}  # file -> mmap-loaded state dict
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._index()

    # -- index ------------------------------------------------------------------
    def _index(self) -> None:
        p = self.path
        if not p.exists():
            raise CheckpointError(f"model '{self.label}': no file or folder at '{p}' (alloykit reads local folders; download the model first)")
        if p.is_file():
            files = [p]
        else:
            files = self._folder_files(p)
        for f in files:
            if f.suffix == ".safetensors":
                tensors, _ = read_header(str(f))
            else:
                tensors = self._index_pickle(f)
            for name, info in tensors.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"model '{self.label}': tensor '{name}' appears in both {Path(self.tensors[name].path).name} and {f.name}; the checkpoint is inconsistent"
                    )
                self.tensors[name] = info

    def _folder_files(self, p: Path) -> list[Path]:
        index = p / "model.safetensors.index.json"
        if index.exists():
            return self._files_from_index(index)
        single = p / "model.safetensors"
        if single.exists():
            return [single]
        shards = sorted(p.glob("*.safetensors"))
        if shards:
            return shards
        pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
        pt_index = p / "pytorch_model.bin.index.json"
        if pt_index.exists():
            pickles = self._files_from_index(pt_index)
        if pickles:
            if not self.allow_pickle:
                raise CheckpointError(
                    f"model '{self.label}': only pickle checkpoints ({pickles[0].name}) found; pickle can run code, "
                    "so it is refused by default: convert to safetensors, or pass --allow-pickle (loads with weights_only=True)"
                )
            return pickles
        raise CheckpointError(f"model '{self.label}': no *.safetensors files in folder '{p}'")

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"model '{self.label}': {index.name} is not a valid index (needs a 'weight_map' object)") from None
        files = []
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise CheckpointError(f"model '{self.label}': {index.name} maps tensor '{tensor}' to '{shard}', which is not a file name in the model folder")
            if shard not in files:
                files.append(shard)
        missing = [s for s in files if not (index.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"model '{self.label}': {index.name} names shard '{missing[0]}', which is missing from '{index.parent}'")
        return [index.parent / s for s in files]

    def _index_pickle(self, f: Path) -> dict[str, TensorInfo]:
        if f.suffix not in PICKLE_SUFFIXES:
            raise CheckpointError(f"model '{self.label}': '{f.name}' is neither .safetensors nor a PyTorch checkpoint")
        if not self.allow_pickle:
            raise CheckpointError(
                f"model '{self.label}': '{f.name}' is a pickle checkpoint, refused by default; convert to safetensors or pass --allow-pickle"
            )
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many types for bad pickles
            raise CheckpointError(f"model '{self.label}': cannot load '{f.name}' with weights_only=True: {str(err).splitlines()[0]}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"model '{self.label}': '{f.name}' does not hold a flat state dict of tensors")
        self._pickled[str(f)] = sd
        return {
            k: TensorInfo(k, str(f), v.dtype, tuple(v.shape), -1, v.numel() * v.element_size()) for k, v in sd.items()
        }

    # -- reading ----------------------------------------------------------------

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into fresh memory (one copy from the page cache), or into ``out``
        (a contiguous CPU tensor of the tensor's dtype and shape, e.g. a reused buffer)."""
        info = self.info(name)
        if info.offset < 0:
            t = self._pickled[info.path][name]
            return t.clone() if out is None else out.copy_(t)
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != tuple(info.shape) or not out.is_contiguous():
            raise ValueError(f"read '{name}' into {out.dtype}{list(out.shape)}: need a contiguous {info.dtype}{list(info.shape)}")
        self._pread(info, 0, info.nbytes, out)
        return out

    def read_range(self, name: str, start: int, count: int, out: torch.Tensor) -> torch.Tensor:
        """Entries ``start .. start + count - 1`` of tensor ``name`` in flat (row-major) order
        into ``out`` (contiguous, the tensor's dtype, ``count`` entries): a block of rows
        read without the rest of the tensor."""
        info = self.info(name)
        if not 0 <= start <= start + count <= info.numel:
            raise ValueError(f"read '{name}' entries {start}..{start + count}: it has {info.numel}")
        if out.dtype != info.dtype or out.numel() != count or not out.is_contiguous():
            raise ValueError(f"read '{name}' into {out.dtype}[{out.numel()}]: need a contiguous {info.dtype}[{count}]")
        if info.offset < 0:
            return out.view(-1).copy_(self._pickled[info.path][name].reshape(-1)[start : start + count])
        itemsize = info.nbytes // max(1, info.numel)
        self._pread(info, start * itemsize, count * itemsize, out)
        return out

    def _pread(self, info: TensorInfo, skip: int, nbytes: int, out: torch.Tensor) -> None:
        """``nbytes`` of the tensor's data from byte ``skip`` on, into ``out``'s memory."""
        if nbytes == 0:
            return
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd = self._fd(info.path)
        done = 0
        name = info.name
        try:
            while done < nbytes:
                n = os.preadv(fd, [buf[done:nbytes]], info.offset + skip + done)
                if n <= 0:
                    raise CheckpointError(f"model '{self.label}': tensor '{name}' in {Path(info.path).name}: file ended early (truncated?)")
                done += n
        except OSError as err:
            raise CheckpointError(f"model '{self.label}': tensor '{name}' in {Path(info.path).name}: read failed: {err.strerror or err}") from None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._pickled.clear()

    # -- pickling (a plan sent to other processes: distributed merges) -----------
    def __getstate__(self) -> dict:
        """The index travels, open files and the lock do not (the receiver opens its own);
        pickle checkpoints are re-indexed by the receiver rather than shipping their tensors."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock", "_pickled")}
        state["_had_pickled"] = bool(self._pickled)
        return state

    def __setstate__(self, state: dict) -> None:
        had_pickled = state.pop("_had_pickled", False)
        self.__dict__.update(state)
        self._fds, self._lock, self._pickled = {}, threading.Lock(), {}
        if had_pickled:
            self.tensors = {}
            self._index()

    # -- metadata ---------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def config(self) -> dict | None:
        cfg = self.folder / "config.json"
        if not (self.path.is_dir() and cfg.exists()):
            return None
        try:
            return json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise CheckpointError(f"model '{self.label}': config.json is not valid JSON") from None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def files(self) -> list[str]:
        return sorted({t.path for t in self.tensors.values()})


class StateDictCheckpoint(TensorIndex):
    """An in-memory state dict behind the same interface as :class:`Checkpoint`."""

    def __init__(self, state_dict: dict[str, torch.Tensor], label: str):
        self.label = label
        self.path = Path(label)
        self._sd = {k: v.detach() for k, v in state_dict.items()}
        self.tensors = {
            k: TensorInfo(k, label, v.dtype, tuple(v.shape), -1, v.numel() * v.element_size()) for k, v in self._sd.items()
        }

    def read(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._sd[name].to("cpu")

    def config(self) -> dict | None:
        return None

    def close(self) -> None:
        pass

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
