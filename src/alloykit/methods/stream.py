"""Streamed execution of a method: its fast path, which sees one tensor as blocks of rows.

A method's reference function (``MergeInput`` -> tensor) holds the whole tensor in
float32 and is the specification. A method may also declare a fast path
(``register(..., streamed=Streamed(fn))``): ``fn(x: StreamInput) -> bool`` computes the
same tensor from passes over the inputs' rows, each block read from the checkpoint in
its file dtype and converted to float32 just before use, so a tensor's float32 working
set is a few blocks whatever its size (``BLOCK_ENTRIES`` per input), and writes the
result a block at a time. It returns False to decline a tensor (a dtype, layout or
parameter it does not handle): the executor then runs the reference.

Each fast path is tested against its reference: bit for bit where the arithmetic is the
same, within a stated tolerance where a sum over the whole tensor is taken in another
order (``tests/test_fast_paths.py``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alloykit.ops.jit import available as jit_available

#: entries per input in one block (rounded to whole rows; at least one row): 256 KiB of
#: float32, so a block of 4 inputs and the kernels' scratch stay in the CPU's L2 cache
BLOCK_ENTRIES = 1 << 16


class Stopped(Exception):
    """Raised by ``StreamInput.blocks`` between two blocks once the merge was told to stop
    (Ctrl-C or SIGTERM in the main thread): a worker thread sees no signal, and a tensor's
    passes can take minutes, so this is where a streamed job ends early."""


@dataclass
class Block:
    """One block of rows of every input, in float32 (numpy views of reused buffers: valid
    until the next block is read)."""

    start: int  # flat index of the block's first entry
    row0: int
    row1: int
    stack: np.ndarray  # [K, m]: the non-base inputs
    base: np.ndarray | None  # [m]

    @property
    def size(self) -> int:
        return self.stack.shape[1]

    def deltas(self) -> np.ndarray:
        """The task vectors ``stack - base``, in place in ``stack`` (a block is read once per
        pass, and its inputs are not needed again)."""
        np.subtract(self.stack, self.base, out=self.stack)
        return self.stack


#: fills float32 buffers with rows [row0, row1) of the K inputs and of the base
RowReader = Callable[[int, int, torch.Tensor, torch.Tensor | None], None]


class StreamInput:
    """What a method's fast path sees for one output tensor: its inputs as passes over
    blocks of rows, and a place for the result."""

    def __init__(self, name: str, shape: tuple[int, ...], k: int, has_base: bool, params: Any, model_params: list[Any],
                 seed: int | None, read_rows: RowReader, out: torch.Tensor, block_entries: int = BLOCK_ENTRIES,
                 compute_dtype: torch.dtype | None = None, role: Any = None, stop: threading.Event | None = None):
        self.name, self.shape, self.k = name, tuple(shape), k
        #: set by the executor when the merge is interrupted: ``blocks`` then raises ``Stopped``
        self.stop = stop
        #: as ``MergeInput.compute_dtype`` and ``MergeInput.role``
        self.compute_dtype, self.role = compute_dtype, role
        self.params, self.model_params, self.seed = params, model_params, seed
        self.has_base = has_base
        self.numel = math.prod(self.shape)
        # a 0-d or 1-D tensor is one row
        self.rows = self.shape[0] if len(self.shape) >= 2 else 1
        self.row_len = self.numel // self.rows if self.rows else 0
        self.rows_per_block = max(1, block_entries // max(1, self.row_len))
        self._read = read_rows
        self._out = out.view(-1)
        m = min(self.rows, self.rows_per_block) * self.row_len
        self._stack = torch.empty(k * m, dtype=torch.float32)
        self._base = torch.empty(m, dtype=torch.float32) if has_base else None
        self._result = torch.empty(m, dtype=torch.float32)
        self.passes = 0

    @property
    def block_size(self) -> int:
        """Entries per input in the largest block."""
        return self._stack.numel() // max(1, self.k)

    def blocks(self) -> Iterator[Block]:
        """One pass over the tensor, block by block, in row order."""
        self.passes += 1
        for r0 in range(0, self.rows, self.rows_per_block):
            if self.stop is not None and self.stop.is_set():
                raise Stopped(f"tensor '{self.name}' stopped at row {r0} of {self.rows}")
            r1 = min(self.rows, r0 + self.rows_per_block)
            m = (r1 - r0) * self.row_len
            stack = self._stack[: self.k * m].view(self.k, m)  # contiguous, the last block too
            base = self._base[:m] if self._base is not None else None
            self._read(r0, r1, stack, base)
            yield Block(r0 * self.row_len, r0, r1, stack.numpy(), base.numpy() if base is not None else None)

    def by_rows(self, values: np.ndarray, block: Block) -> np.ndarray:
        """A [K, m] block as [rows, K, row_len] (a view where it can be): rows first, for
        per-row sums (``RowSums``)."""
        return values.reshape(values.shape[0], block.row1 - block.row0, self.row_len).transpose(1, 0, 2)

    def result_buffer(self, block: Block) -> np.ndarray:
        """A float32 buffer of the block's size for the merged values (then ``write`` it)."""
        return self._result[: block.size].numpy()

    def write(self, block: Block, values: np.ndarray | torch.Tensor) -> None:
        """Store the merged float32 values of ``block`` (rounded once to the output dtype)."""
        if isinstance(values, np.ndarray):
            values = torch.from_numpy(values)
        self._out[block.start : block.start + block.size].copy_(values.reshape(-1))


class RowSums:
    """Sums over a whole tensor that do not depend on how it is cut into blocks: each row's
    sum is taken alone (float64), and the rows' sums are added exactly (``math.fsum``), so
    a fast path gives the same bytes at any block size. The rows' sums live in one array
    allocated up front (small allocations kept between blocks would fragment the heap)."""

    def __init__(self, x: StreamInput, shape: tuple[int, ...] = ()):
        self.rows = np.zeros((x.rows, *shape), dtype=np.float64)

    def add(self, block: Block, per_row: np.ndarray) -> None:
        """``per_row``: [rows of the block, *shape], one entry per row."""
        self.rows[block.row0 : block.row1] = per_row

    def total(self, extra: np.ndarray | None = None) -> np.ndarray:
        """The exact sum over rows; ``extra`` (same shape as the rows' sums) is added row by
        row first, without changing the stored sums, so that calling twice gives one answer."""
        rows = self.rows if extra is None else self.rows + extra
        flat = rows.reshape(rows.shape[0], -1)
        sums = np.array([math.fsum(flat[:, j]) for j in range(flat.shape[1])])
        return sums.reshape(rows.shape[1:])


@dataclass(frozen=True)
class Streamed:
    """A method's fast path, the memory it needs besides its blocks and output
    (``scratch_bytes(numel, k, compute_dtype)``, e.g. one int32 key per entry to order tied
    magnitudes), and whether it runs numba kernels (``jit``: then only where
    ``alloykit.ops.jit.available()``)."""

    run: Callable[[StreamInput], bool]
    scratch_bytes: Callable[[int, int, torch.dtype | None], int] = lambda numel, k, dtype: 0
    jit: bool = True

    def usable(self) -> bool:
        return not self.jit or jit_available()
