"""Where SMILE's routers send the quality benchmark's image inputs: per task and layer, the share of
tokens whose top-1 expert is the task's own.

    QUALITY_BENCH_CACHE=... nice -n 15 python benchmarks/moe/smile_routing.py [--rank 32 --gate-rank 8 --n 64]

Uses the image track's cached seed-0 fine-tunes (benchmarks/quality; the cache as the harness
keeps it) and the validation images of each task. With 8 tasks, chance is 0.125.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))

from alloykit.moe.routed import SmileLinear  # noqa: E402
from alloykit.moe.routing import smile  # noqa: E402
from quality_bench.bench import Bench  # noqa: E402
from quality_bench.presets import PRESETS  # noqa: E402
from quality_bench.routing import _base_module  # noqa: E402
from quality_bench.tracks import TRACKS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--gate-rank", type=int, default=8)
    ap.add_argument("--n", type=int, default=64, help="validation images per task")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QUALITY_BENCH_CACHE", ".bench/quality")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    preset = PRESETS["full"]
    track = TRACKS["image"](preset.tracks["image"], args.cache, lambda m: print(m, file=sys.stderr))
    bench = Bench(track, preset.search["image"], lambda m: print(m, file=sys.stderr))
    ft = bench.finetunes(0)
    routed = smile(_base_module(bench), [ft.sd[t] for t in bench.tasks], rank=args.rank, gate_rank=args.gate_rank,
                   top_k=1, experts=bench.tasks).eval()
    chosen: dict[str, torch.Tensor] = {}
    for name, m in routed.named_modules():
        if isinstance(m, SmileLinear):
            m.register_forward_hook(lambda mod, inp, out, name=name: chosen.__setitem__(
                name, mod.routing(inp[0].reshape(-1, inp[0].shape[-1])).argmax(-1)))
    layers = None
    print(f"SMILE rank {args.rank}, gate rank {args.gate_rank}: share of tokens routed to the task's own expert "
          f"({args.n} validation images per task; chance {1 / len(bench.tasks):.3f})")
    for k, task in enumerate(bench.tasks):
        data = track.data(task, "val").head(args.n)
        with torch.no_grad():
            track.features(routed, data.batch(torch.arange(len(data))))
        if layers is None:
            layers = sorted({n.split(".")[1] for n in chosen})
            print("| task | " + " | ".join(f"block {b}" for b in layers) + " | all |")
            print("|---|" + "---|" * (len(layers) + 1))
        per_block = [torch.cat([v for n, v in chosen.items() if n.split(".")[1] == b]) for b in layers]
        shares = [float((v == k).float().mean()) for v in per_block]
        total = float((torch.cat(per_block) == k).float().mean())
        print(f"| {task} | " + " | ".join(f"{s:.2f}" for s in shares) + f" | {total:.2f} |")


if __name__ == "__main__":
    main()
