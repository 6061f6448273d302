"""Llama-shaped checkpoints made locally: a random base and fine-tunes of it.

No download: weights are random (seeded), laid out exactly as a Hugging Face
``LlamaForCausalLM`` folder (config.json, sharded safetensors plus index), so the
folders load in transformers and in mergekit. Used by the tests, the demo and the
performance benchmark (sizes up to billions of parameters, written shard by shard).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 256
    hidden: int = 64
    intermediate: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2

    def config(self, dtype: str = "float32") -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": dtype,
        }

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        h, i, hd = self.hidden, self.intermediate, self.hidden // self.heads
        yield "model.embed_tokens.weight", (self.vocab, h)
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.k_proj.weight", (self.kv_heads * hd, h)
            yield p + "self_attn.v_proj.weight", (self.kv_heads * hd, h)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "mlp.gate_proj.weight", (i, h)
            yield p + "mlp.up_proj.weight", (i, h)
            yield p + "mlp.down_proj.weight", (h, i)
            yield p + "input_layernorm.weight", (h,)
            yield p + "post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())


#: Llama-shaped sizes used by the benchmark (TinyLlama's layout at 1.1B)
SIZES = {
    "tiny": LlamaShape(),
    "0.1b": LlamaShape(vocab=32000, hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4),
    "0.5b": LlamaShape(vocab=32000, hidden=1536, intermediate=4096, layers=16, heads=16, kv_heads=4),
    "1.1b": LlamaShape(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
}


def _base_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norms start near one
        return 1.0 + 0.02 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * (1.0 / math.sqrt(shape[-1]))


def write_llama(
    folder: str | Path,
    shape: LlamaShape = LlamaShape(),
    *,
    seed: int = 0,
    base_seed: int | None = None,
    delta_scale: float = 0.01,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int | None = None,
) -> Path:
    """Write a Llama-shaped model folder.

    With ``base_seed`` None the model is a random base drawn from ``seed``; otherwise it
    is that base (regenerated from ``base_seed``) plus a small random delta drawn from
    ``seed`` (a stand-in fine-tune). Tensors are generated one at a time, so any size
    can be written with little memory.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dname = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    (folder / "config.json").write_text(json.dumps(shape.config(dname), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    weight_map: dict[str, int] = {}
    files: list[str] = []

    def flush(last: bool) -> None:
        nonlocal used
        if not shards[-1]:
            return
        idx = len(files)
        tmp_name = f"shard-{idx:05d}.safetensors"
        save_file(shards[-1], str(folder / tmp_name), metadata={"format": "pt"})
        files.append(tmp_name)
        shards[-1] = {}
        used = 0

    for i, (name, tshape) in enumerate(shape.tensors()):
        g = torch.Generator().manual_seed((base_seed if base_seed is not None else seed) * 100_003 + i)
        t = _base_tensor(name, tshape, g)
        if base_seed is not None:
            gd = torch.Generator().manual_seed(seed * 1_000_003 + i + 7)
            t = t + delta_scale * torch.randn(tshape, generator=gd) * t.abs().mean()
        t = t.to(dtype)
        nb = t.numel() * itemsize
        if shard_bytes is not None and used and used + nb > shard_bytes:
            flush(False)
        shards[-1][name] = t
        weight_map[name] = len(files)
        used += nb
    flush(True)
    n = len(files)
    if n == 1:
        (folder / files[0]).rename(folder / "model.safetensors")
    else:
        final = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for old, new in zip(files, final):
            (folder / old).rename(folder / new)
        index = {
            "metadata": {"total_size": shape.num_params * itemsize},
            "weight_map": {name: final[k] for name, k in weight_map.items()},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_family(root: str | Path, n_finetunes: int, shape: LlamaShape = LlamaShape(), **kw) -> tuple[Path, list[Path]]:
    """A base plus ``n_finetunes`` fine-tunes of it under ``root``."""
    root = Path(root)
    base = write_llama(root / "base", shape, seed=0, **kw)
    tunes = [write_llama(root / f"ft{i + 1}", shape, seed=i + 1, base_seed=0, **kw) for i in range(n_finetunes)]
    return base, tunes
