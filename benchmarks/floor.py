"""What bounds a merge on this machine: the memory and page-cache bandwidth under the read-sum-write baseline.

A merge of K+1 bf16 inputs into one bf16 output moves (K+1) x 2 bytes per entry in and 2 out;
the baseline does that once, a method with P passes reads the inputs P times. This measures
the pieces, one thread unless said, so that a method's ratio to the baseline can be set
against the cost of the passes it makes:

- ``memcpy``: numpy copy of a 512 MiB float32 array (bytes read + bytes written per second);
- ``bf16 -> fp32``: torch's conversion, per input byte read;
- ``fp32 add``: ``a += b`` on float32 (two streams read, one written);
- ``page-cache read``: reading the model's safetensors files (already in the page cache) into
  a reused buffer, as ``safe_open``'s copy out of a mapped file does;
- ``one pass``: reading every input of the benchmark merge as the executor's fast paths do,
  rows converted to float32 block by block (``Checkpoint.read_range``, as the
  executor's row reader), summing nothing: the cost of one pass of a streamed method;
- ``write``: writing one model's worth of bytes (the merge's output) to the work folder, without
  and with fsync: past the kernel's dirty-page limits a writer is held to the disk's speed.

    python benchmarks/floor.py --models .bench/1.1b/base .bench/1.1b/ft1 .bench/1.1b/ft2 .bench/1.1b/ft3 \
        --work .bench/work-floor --out docs/floor-1.1b.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from alloykit.io.checkpoint import Checkpoint

MiB = 1 << 20


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, repeats: int = 3) -> tuple[float, float]:
    """Best wall seconds of ``repeats`` calls and the CPU seconds of that call."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        t, c = time.perf_counter(), cpu_s()
        fn()
        best = min(best, (time.perf_counter() - t, cpu_s() - c))
    return best


def gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def memory_figures() -> dict:
    n = 512 * MiB // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    copy_s, _ = timed(lambda: np.copyto(b, a))
    add_s, _ = timed(lambda: np.add(a, b, out=b))
    half = torch.ones(n, dtype=torch.bfloat16)
    out = torch.empty(n, dtype=torch.float32)
    figures = {"memcpy GB/s (read + write)": gbps(2 * a.nbytes, copy_s),
               "fp32 add GB/s (2 read + 1 write)": gbps(3 * a.nbytes, add_s)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        conv_s, _ = timed(lambda: out.copy_(half))
        figures[f"bf16 -> fp32 GB/s of bf16 read ({threads} thread(s))"] = gbps(half.numel() * 2, conv_s)
    torch.set_num_threads(1)
    return figures


def files_of(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def read_files(models: list[Path]) -> int:
    buf = bytearray(64 * MiB)
    view = memoryview(buf)
    total = 0
    for m in models:
        for f in files_of(m):
            with open(f, "rb", buffering=0) as fh:
                while (n := fh.readinto(view)) > 0:
                    total += n
    return total


def one_pass(models: list[Path], block_entries: int = 1 << 16) -> int:
    """Every tensor of every model read in blocks of rows and converted to float32, as a
    streamed method's pass does (``Checkpoint.read_range``, the executor's row reader),
    nothing computed. Returns the entries read."""
    raw = torch.empty(block_entries * 64, dtype=torch.bfloat16)
    f32 = torch.empty(block_entries * 64, dtype=torch.float32)
    entries = 0
    for m in models:
        ck = Checkpoint(m)
        for name, info in ck.tensors.items():
            shape = tuple(info.shape)
            row_len = math.prod(shape[1:]) if len(shape) >= 2 else max(1, math.prod(shape))
            step = max(1, block_entries // row_len) * row_len
            buf = raw if info.dtype == torch.bfloat16 else torch.empty(step, dtype=info.dtype)
            for start in range(0, info.numel, step):
                n = min(step, info.numel - start)
                f32[:n].copy_(ck.read_range(name, start, n, buf[:n]))
            entries += info.numel
    return entries


def write_figures(work: Path, nbytes: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    data = np.ones(64 * MiB, dtype=np.uint8)
    chunks = max(1, nbytes // data.nbytes)
    path = work / "floor-write.bin"

    def write(sync: bool) -> None:
        with open(path, "wb") as fh:
            for _ in range(chunks):
                fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())

    nbytes = chunks * data.nbytes
    try:
        plain, _ = timed(lambda: write(False), repeats=2)
        synced, _ = timed(lambda: write(True), repeats=2)
    finally:
        path.unlink(missing_ok=True)
    return {"write GB": round(nbytes / 1e9, 2), "write GB/s (no fsync)": gbps(nbytes, plain),
            "write GB/s (fsync)": gbps(nbytes, synced)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", type=Path, required=True, help="the benchmark merge's inputs (base first)")
    ap.add_argument("--work", type=Path, required=True, help="a folder on the disk the merges write to")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    figures: dict = {"hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "load at start": [round(x, 2) for x in os.getloadavg()]}
    figures.update(memory_figures())
    total = read_files(args.models)  # warms the page cache as the benchmark does before timing
    read_s, _ = timed(lambda: read_files(args.models))
    figures["input GB"] = round(total / 1e9, 2)
    figures["page-cache read GB/s"] = gbps(total, read_s)
    pass_s, pass_cpu = timed(lambda: one_pass(args.models), repeats=2)
    figures["one streamed pass: wall s"] = round(pass_s, 2)
    figures["one streamed pass: CPU s"] = round(pass_cpu, 2)
    figures["one streamed pass: GB/s of input"] = gbps(total, pass_s)
    figures.update(write_figures(args.work, sum(f.stat().st_size for f in files_of(args.models[0]))))
    figures["load at end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
