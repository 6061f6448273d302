"""A tiny Qwen2.5-VL-shaped vision-language checkpoint (text decoder, vision tower, projector).

Tensor names and config keys as the Hub's Qwen2.5-VL checkpoints store them, weights
random (seeded): enough for ``modules:`` recipes to be planned and merged by alloykit and
by mergekit (which reads config.json with transformers' AutoConfig). Not a model that
runs: the vision tower's sizes are only consistent with each other, not with a processor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

TEXT = dict(vocab=64, hidden=32, intermediate=48, layers=3, heads=4, kv_heads=2)
VISION = dict(hidden=16, intermediate=24, depth=2, heads=2, patch=2, temporal_patch=2, merge=2)


def config(text_layers: int = TEXT["layers"], depth: int = VISION["depth"]) -> dict:
    t, v = TEXT, VISION
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "qwen2_5_vl_text", "vocab_size": t["vocab"], "hidden_size": t["hidden"],
            "intermediate_size": t["intermediate"], "num_hidden_layers": text_layers, "num_attention_heads": t["heads"],
            "num_key_value_heads": t["kv_heads"], "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
            "bos_token_id": 1, "eos_token_id": 2,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision", "depth": depth, "hidden_size": v["hidden"], "intermediate_size": v["intermediate"],
            "num_heads": v["heads"], "in_channels": 3, "patch_size": v["patch"], "temporal_patch_size": v["temporal_patch"],
            "spatial_merge_size": v["merge"], "out_hidden_size": t["hidden"], "fullatt_block_indexes": [depth - 1],
        },
    }


def tensors(text_layers: int = TEXT["layers"], depth: int = VISION["depth"]) -> Iterator[tuple[str, tuple[int, ...]]]:
    t, v = TEXT, VISION
    h, hd = t["hidden"], t["hidden"] // t["heads"]
    kv = t["kv_heads"] * hd
    yield "model.embed_tokens.weight", (t["vocab"], h)
    for i in range(text_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for proj, out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            yield p + f"self_attn.{proj}.weight", (out, h)
            yield p + f"self_attn.{proj}.bias", (out,)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (t["intermediate"], h)
        yield p + "mlp.up_proj.weight", (t["intermediate"], h)
        yield p + "mlp.down_proj.weight", (h, t["intermediate"])
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (t["vocab"], h)
    vh, vi = v["hidden"], v["intermediate"]
    yield "visual.patch_embed.proj.weight", (vh, 3, v["temporal_patch"], v["patch"], v["patch"])
    for i in range(depth):
        p = f"visual.blocks.{i}."
        yield p + "norm1.weight", (vh,)
        yield p + "norm2.weight", (vh,)
        yield p + "attn.qkv.weight", (3 * vh, vh)
        yield p + "attn.qkv.bias", (3 * vh,)
        yield p + "attn.proj.weight", (vh, vh)
        yield p + "attn.proj.bias", (vh,)
        for proj, shape in (("gate_proj", (vi, vh)), ("up_proj", (vi, vh)), ("down_proj", (vh, vi))):
            yield p + f"mlp.{proj}.weight", shape
            yield p + f"mlp.{proj}.bias", (shape[0],)
    merged = vh * v["merge"] ** 2
    yield "visual.merger.ln_q.weight", (vh,)
    yield "visual.merger.mlp.0.weight", (merged, merged)
    yield "visual.merger.mlp.0.bias", (merged,)
    yield "visual.merger.mlp.2.weight", (t["hidden"], merged)
    yield "visual.merger.mlp.2.bias", (t["hidden"],)


def write_qwen2_5_vl(folder: str | Path, *, seed: int = 0, base_seed: int | None = None, delta_scale: float = 0.3) -> Path:
    """A random base (``base_seed`` None) or that base plus a random delta drawn from ``seed``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config(), indent=2))
    out = {}
    for i, (name, shape) in enumerate(tensors()):
        g = torch.Generator().manual_seed((base_seed if base_seed is not None else seed) * 7919 + i)
        w = 1.0 + 0.02 * torch.randn(shape, generator=g) if len(shape) == 1 else torch.randn(shape, generator=g) / shape[-1] ** 0.5
        if base_seed is not None:
            gd = torch.Generator().manual_seed(seed * 104_729 + i)
            w = w + delta_scale * w.abs().mean() * torch.randn(shape, generator=gd)
        out[name] = w.contiguous()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
