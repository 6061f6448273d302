"""Generate Llama-shaped benchmark checkpoints: a random base plus N fine-tunes (bf16, sharded).

    python benchmarks/generate.py --size 1.1b --finetunes 3 --out .bench/1.1b
    python benchmarks/generate.py --size 3b --finetunes 3 --out .bench/3b    # 4 x 6.4 GB: 25.7 GB

No download: weights are random (seeded); fine-tunes are the base plus small random
deltas. Tensors are generated one at a time, so memory stays small at any size.

``3b`` is Llama-3.2-3B's layout (hidden 3072, intermediate 8192, 28 layers, 24 heads, 8 KV
heads, vocabulary 128256, the output head tied to the embedding: 3.21B parameters, no
``lm_head.weight`` tensor), for issue 17's cold-cache target: its inputs are more than
the page cache of a 24 GiB machine holds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from alloykit.testing.fixtures import SIZES, LlamaShape, write_llama


class TiedLlamaShape(LlamaShape):
    """A Llama layout whose output head is the token embedding (``tie_word_embeddings``)."""

    def config(self, dtype: str = "float32") -> dict:
        return {**super().config(dtype), "tie_word_embeddings": True}

    def tensors(self):  # noqa: ANN201
        return ((name, shape) for name, shape in super().tensors() if name != "lm_head.weight")


#: the fixtures' sizes, and Llama-3.2-3B's layout
BENCH_SIZES = {**SIZES, "3b": TiedLlamaShape(vocab=128256, hidden=3072, intermediate=8192, layers=28, heads=24,
                                             kv_heads=8)}


def generate(size: str, finetunes: int, out: Path, shard_gb: float = 1.0) -> None:
    shape = BENCH_SIZES[size]
    kw = dict(dtype=torch.bfloat16, shard_bytes=int(shard_gb * 1e9))
    t0 = time.time()
    if not (out / "base" / "config.json").exists():
        write_llama(out / "base", shape, seed=0, **kw)
    for i in range(finetunes):
        folder = out / f"ft{i + 1}"
        if not (folder / "config.json").exists():
            write_llama(folder, shape, seed=i + 1, base_seed=0, delta_scale=0.02, **kw)
    print(f"{size}: {shape.num_params / 1e9:.2f}B parameters, base + {finetunes} fine-tunes in {out} ({time.time() - t0:.0f}s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(BENCH_SIZES), default="0.1b")
    ap.add_argument("--finetunes", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    a = ap.parse_args()
    generate(a.size, a.finetunes, a.out, a.shard_gb)


if __name__ == "__main__":
    main()
