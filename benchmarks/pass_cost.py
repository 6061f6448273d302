"""Where a streamed method's time goes: each pass of its fast path over one real tensor, timed.

The merge benchmark (``run.py``) says how a method compares with the read-sum-write
baseline; this says why. It runs a method's fast path (``register(..., streamed=...)``)
on one tensor of the benchmark's checkpoints, exactly as the executor would (rows read
with ``Checkpoint.read_range`` a block at a time and converted to float32), and times
every pass, beside a pass that only reads (the cost of reading the inputs once). One
thread, numba warmed up on a small tensor first so no pass includes compilation.

    python benchmarks/pass_cost.py --root .bench/1.1b --tensor model.embed_tokens.weight \
        --methods task_arithmetic,ties,breadcrumbs,dare_ties,dare_linear,della,sce,model_stock --out docs/pass_cost-1.1b.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from alloykit.io.checkpoint import Checkpoint
from alloykit.methods.registry import get_method
from alloykit.methods.stream import BLOCK_ENTRIES, StreamInput
from alloykit.plan.planner import tensor_seed

sys.path.insert(0, str(Path(__file__).parent))
from floor import cpu_s  # noqa: E402  (this process's user + system seconds)
from run import METHODS  # noqa: E402  (the benchmark's parameters for each method)


class TimedInput(StreamInput):
    """A StreamInput that records the wall and CPU seconds of each pass over its blocks."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.timings: list[tuple[float, float]] = []

    def blocks(self):
        t, c = time.perf_counter(), cpu_s()
        yield from super().blocks()
        self.timings.append((time.perf_counter() - t, cpu_s() - c))


def stream_input(method: str, cks: list[Checkpoint], name: str, cls=TimedInput) -> StreamInput:
    """The method's StreamInput for tensor ``name`` (inputs ``cks[1:]``, base ``cks[0]``), as the executor builds it."""
    spec = get_method(method)
    n_models, per_model, shared_kw, has_base = METHODS[method]
    sources = cks[1 : 1 + n_models]
    info = cks[0].info(name)
    shape = tuple(info.shape)
    params = spec.params.model_validate(shared_kw)
    per_model = per_model if isinstance(per_model, list) else [per_model] * n_models
    model_params = [spec.model_params.model_validate(kw) for kw in per_model]
    seed = tensor_seed(0, name) if spec.randomized else None
    out = torch.empty(shape, dtype=info.dtype)
    x = cls(name, shape, len(sources), has_base, params, model_params, seed, lambda *a: None, out, BLOCK_ENTRIES,
            info.dtype, None)
    row_len = x.row_len
    raw = torch.empty(x.block_size, dtype=info.dtype)

    def read_rows(r0: int, r1: int, stack: torch.Tensor, base: torch.Tensor | None) -> None:
        start, count = r0 * row_len, (r1 - r0) * row_len
        for ck, row in zip(sources, stack):
            row.copy_(ck.read_range(name, start, count, raw[:count]))
        if base is not None:  # the base model's rows
            base.copy_(cks[0].read_range(name, start, count, raw[:count]))

    x._read = read_rows
    return x


def read_only_pass(x: TimedInput) -> None:
    for _ in x.blocks():
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="a folder made by generate.py (base, ft1, ft2, ft3)")
    ap.add_argument("--tensor", default="model.embed_tokens.weight")
    ap.add_argument("--warmup-tensor", default="model.norm.weight", help="a small tensor: compiles the kernels")
    ap.add_argument("--methods", default="task_arithmetic,ties,breadcrumbs,dare_ties,dare_linear,della,sce,model_stock")
    ap.add_argument("--repeats", type=int, default=3, help="each pass's figure is the median of this many runs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cks = [Checkpoint(args.root / m) for m in ("base", "ft1", "ft2", "ft3")]
    info = cks[0].info(args.tensor)
    result = {"tensor": args.tensor, "shape": list(info.shape), "dtype": str(info.dtype),
              "entries per input": info.numel, "load at start": [round(v, 2) for v in os.getloadavg()], "methods": {}}
    for method in ["read only (1 pass)", *args.methods.split(",")]:
        runs = []
        for rep in range(args.repeats + 1):  # the first run warms up (compiles on the small tensor, then discarded)
            tensor = args.warmup_tensor if rep == 0 else args.tensor
            x = stream_input("task_arithmetic" if method.startswith("read only") else method, cks, tensor)
            if method.startswith("read only"):
                read_only_pass(x)
            else:
                spec = get_method(method)
                if spec.streamed is None or not spec.streamed.usable():
                    raise SystemExit(f"{method}: no usable fast path (numba missing or ALLOYKIT_NO_JIT set)")
                if not spec.streamed.run(x):
                    raise SystemExit(f"{method}: its fast path declined {tensor}")
            if rep:
                runs.append(x.timings)
        passes = len(runs[0])
        med = [sorted(r[p] for r in runs)[len(runs) // 2] for p in range(passes)]
        total_wall = sorted(sum(w for w, _ in r) for r in runs)[len(runs) // 2]
        result["methods"][method] = {"passes": passes, "pass wall s": [round(w, 3) for w, _ in med],
                                     "pass CPU s": [round(c, 3) for _, c in med], "total wall s": round(total_wall, 3)}
        print(f"{method:22s} {passes} pass(es): " + ", ".join(f"{w:.2f}" for w, _ in med) + f"  (total {total_wall:.2f} s)",
              flush=True)
    ro = result["methods"]["read only (1 pass)"]["total wall s"]
    for r in result["methods"].values():
        r["x read-only pass"] = round(r["total wall s"] / ro, 2)
    result["load at end"] = [round(v, 2) for v in os.getloadavg()]
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
