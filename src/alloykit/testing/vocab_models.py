"""Tiny Llama-shaped models whose vocabularies differ: for tokenizer and vocabulary tests.

A small byte-level BPE tokenizer is trained locally (``tokenizers``, no download). Every
model's embedding and output-head row of a token is drawn from the token's *text*, so a
token has the same base row in every model whatever its id: a fine-tune with added
tokens, or with the same tokens in another order, is still "the same model" as its base,
and merging them after remapping their rows is meaningful (and checkable against mergekit).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from alloykit.testing.fixtures import LlamaShape

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "merging models in weight space keeps what each fine-tune learned",
    "hello world, hello merge, hello tokenizer",
    "a token missing from one model takes the base model's row",
    "shards, tensors and vocabularies are written atomically",
]
SPECIALS = ["<s>", "</s>", "<unk>"]
#: sixteen added tokens (two special chat markers, fourteen plain words)
ADDED = ["<|im_start|>", "<|im_end|>"] + [f"newword{i}" for i in range(14)]


def train_bpe(vocab_size: int = 300):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on CORPUS (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def permuted(tok, seed: int = 0):
    """The same BPE tokenizer with its regular tokens' ids shuffled (specials stay first)."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    regular = [t for t in vocab if t not in SPECIALS]
    order = torch.randperm(len(regular), generator=torch.Generator().manual_seed(seed)).tolist()
    new = {t: vocab[t] for t in SPECIALS}
    for i, j in enumerate(order):
        new[regular[j]] = len(SPECIALS) + i
    data["model"]["vocab"] = new
    return Tokenizer.from_str(json.dumps(data))


def fast_tokenizer(tok, added: list[str] = (), special_added: tuple[str, ...] = ("<|im_start|>", "<|im_end|>"),
                   chat_template: str | None = None):
    """A transformers fast tokenizer over ``tok`` with ``added`` tokens appended."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for t in added:
        if t in special_added:
            fast.add_tokens([AddedToken(t, special=True, normalized=False)], special_tokens=True)
        else:
            fast.add_tokens([t])
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _gen(*key) -> torch.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def _rows(keys: list[str], salt: str, width: int) -> torch.Tensor:
    """One pseudo-random row per key, a function of (key, salt) only (vectorised: real
    vocabularies have tens of thousands of tokens). Entries uniform, variance 1/width."""
    seeds = torch.tensor([int.from_bytes(hashlib.sha256(f"{salt}|{k}".encode()).digest()[:4], "little") for k in keys],
                         dtype=torch.float64)
    cols = torch.arange(1, width + 1, dtype=torch.float64)
    u = torch.frac(torch.sin(seeds[:, None] * 1e-4 * cols[None, :] * 12.9898 + cols * 78.233) * 43758.5453)
    return ((u - 0.5) * math.sqrt(12.0 / width)).to(torch.float32)


def write_vocab_model(folder: str | Path, fast, *, shape: LlamaShape = LlamaShape(vocab=0, hidden=32, intermediate=48,
                      layers=2, heads=4, kv_heads=2), seed: int = 0, tuned: bool = True, rows: int | None = None,
                      tied: bool = False, delta_scale: float = 0.1) -> Path:
    """A Llama folder (config, one safetensors file, tokenizer) for tokenizer ``fast``.

    Rows of token ``t`` are ``base(t) + delta(seed, t)`` (no delta when ``tuned`` is False);
    ``rows`` (default: the tokenizer's length) larger than the tokenizer pads the matrices
    with random rows, as real checkpoints pad to a multiple of 64. ``tied`` writes no
    ``lm_head.weight`` and sets ``tie_word_embeddings``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = fast.get_vocab()
    n = rows if rows is not None else len(vocab)
    shape = LlamaShape(n, shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads)
    by_id = {i: t for t, i in vocab.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, tshape in shape.tensors():
        if name == "lm_head.weight" and tied:
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            keys = [by_id.get(i, f"<pad row {i}>") for i in range(n)]
            t = _rows(keys, name, shape.hidden)
            if tuned:
                t += delta_scale * _rows(keys, f"{name}/{seed}", shape.hidden)
        else:
            base = torch.randn(tshape, generator=_gen(name))
            t = (1.0 + 0.02 * base) if len(tshape) == 1 else base / math.sqrt(tshape[-1])
            if tuned:
                t = t + delta_scale * torch.randn(tshape, generator=_gen(name, seed)) * t.abs().mean()
        tensors[name] = t.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = shape.config()
    config["tie_word_embeddings"] = tied
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    fast.save_pretrained(folder)
    return folder
