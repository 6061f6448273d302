"""The safetensors file format, read and checked from headers alone.

Layout: 8 bytes little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the end of the header. Everything a
hostile or truncated file can get wrong is checked here, before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from alloykit.errors import CheckpointError

#: safetensors dtype code -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

#: the reference implementation refuses headers above 100 MB; so do we
MAX_HEADER_BYTES = 100_000_000
#: more dimensions than any model tensor has (torch itself allows 64 at most in places)
MAX_DIMS = 32


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live; enough to plan a merge without reading it."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (tensors, metadata)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES}); the file is corrupt")
            if 8 + n > size:
                raise CheckpointError(f"{path}: truncated safetensors file: header needs {n} bytes, file has {size - 8}")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as err:
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {str(err)[:80]!r} is listed twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_len)
        spans.append((entry["data_offsets"][0], entry["data_offsets"][1], name))
    spans.sort()
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors '{n0}' and '{n1}' overlap in the file; the file is corrupt")
    return tensors, {str(k): str(v) for k, v in meta.items()}


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def check_tensor_name(path: str, name: str) -> None:
    """Tensor names are keys, never paths: refuse separators, '..' and control characters."""
    if (
        not name
        or len(name) > 1024
        or "/" in name
        or "\\" in name
        or name.startswith("..")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise CheckpointError(f"{path}: tensor name {name[:80]!r} is not a valid tensor name (path separators or control characters); the file is corrupt or hostile")


def _tensor_info(path: str, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    check_tensor_name(path, name)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor '{name}': header entry is not an object")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}': unsupported dtype {repr(code)[:40]}")
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        # an empty tensor holds no bytes, so its other dimensions are bounded by nothing in the
        # file; torch's strides (products of dimensions) must still fit in int64
        or math.prod(max(d, 1) for d in shape) >= 2**62
    ):
        raise CheckpointError(f"{path}: tensor '{name}': invalid shape {str(shape)[:80]}")
    offs = entry.get("data_offsets")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise CheckpointError(f"{path}: tensor '{name}': invalid data_offsets {repr(offs)[:80]}")
    dtype = DTYPES[code]
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if offs[1] - offs[0] != nbytes:
        raise CheckpointError(
            f"{path}: tensor '{name}': data_offsets span {offs[1] - offs[0]} bytes but shape {shape} of {code} needs {nbytes}"
        )
    if offs[1] > data_len:
        raise CheckpointError(
            f"{path}: tensor '{name}': data ends at byte {offs[1]} but the file holds {data_len} data bytes (truncated?)"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + offs[0], nbytes)


def header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Build a safetensors header for tensors written back to back in this order.

    Returns the full prefix (length + JSON, padded to 8 bytes) and each tensor's
    data offset relative to the end of the prefix.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
