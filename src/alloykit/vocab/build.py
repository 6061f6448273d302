"""The output vocabulary of a merge, with mergekit's semantics, and each model's row map to it.

``build_vocab`` runs at plan time when a recipe names a ``tokenizer_source`` (or has a
``tokenizer:`` section). It loads the inputs' tokenizers (transformers, local files,
never remote code) and decides, as mergekit 0.1.5 does:

* ``base``: the base model's tokenizer (the first model's without a base), *stripped*
  of tokens whose id is past the model's ``vocab_size`` (rows it does not have).
* ``union``: the stripped base tokenizer, then every other token of the inputs in order
  (regular tokens first, as plain added tokens, then their added/special tokens with
  their own settings; tokens past a model's ``vocab_size`` are skipped).
* a model: that model's tokenizer as it is.

Then the keys of ``tokenizer: tokens:`` missing from it are added, and for every input
the map output id -> that input's row (-1: the input lacks the token). The rows
themselves are gathered per tensor by ``alloykit.vocab.remap`` while merging.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloykit.config import ModelTokenSource, Recipe, TokenSetting, ZeroTokenSource
from alloykit.errors import RecipeError
from alloykit.vocab.files import has_tokenizer

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowSource:
    """Where a configured token's row comes from: a model's row, or zeros (model None)."""

    model: int | None
    row: int | None = None  # a fixed row of that model (model_token), else its row of the token


@dataclass
class TokenRule:
    source: RowSource | None  # None: mergekit's automatic rule
    force: bool = False


@dataclass
class VocabPlan:
    """The output vocabulary and every input's row map to it."""

    tokenizer: Any  # a transformers tokenizer (the output's)
    vocab: dict[str, int]
    size: int  # rows of the output matrices: len(vocab), padded to pad_to_multiple_of
    perms: dict[int, torch.Tensor]  # model index -> LongTensor[len(vocab)] of its rows (-1: missing)
    base: int | None
    rules: dict[int, TokenRule] = field(default_factory=dict)  # output id -> configured rule
    copy_from: Path | None = None  # the output tokenizer is this folder's, unchanged: copy its files
    #: config.json keys to set besides vocab_size (a transplant: the donor's special token ids)
    config_updates: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.vocab)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RecipeError("tokenizer_source needs transformers to read tokenizers: pip install 'alloykit[hf]'") from None
    return transformers


def model_folder(ck) -> Path | None:
    """The folder holding a checkpoint's config and tokenizer (a LoRA input: its base's)."""
    inner = getattr(ck, "base", None)
    if inner is not None and hasattr(inner, "path"):
        ck = inner
    path = getattr(ck, "path", None)
    if path is None or not Path(path).exists():
        return None
    return Path(path) if Path(path).is_dir() else Path(path).parent


def model_vocab_size(ck) -> int | None:
    cfg = ck.config() if hasattr(ck, "config") else None
    if cfg is None and getattr(ck, "base", None) is not None:
        cfg = ck.base.config()
    if not cfg:
        return None
    size = cfg.get("vocab_size")
    if size is None and isinstance(cfg.get("text_config"), dict):
        size = cfg["text_config"].get("vocab_size")
    return size if isinstance(size, int) else None


def load_tokenizer(folder: Path, label: str):
    """A transformers tokenizer from local files (fast when it can be; never remote code)."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, use_fast=True)
    except Exception as err:  # transformers raises many types for unreadable tokenizers
        raise RecipeError(f"model '{label}': cannot read its tokenizer in '{folder}': {str(err).splitlines()[0]}") from None


def stripped(tokenizer, vocab_size: int | None, label: str):
    """``tokenizer`` without the tokens whose id is >= ``vocab_size`` (rows the model lacks)."""
    if vocab_size is None:
        return tokenizer
    extra = {t for t, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not extra:
        return tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else None
    if data is None or data["model"]["type"] != "BPE":
        kind = data["model"]["type"] if data else "a slow tokenizer"
        raise RecipeError(f"model '{label}': its tokenizer has {len(extra)} tokens past vocab_size {vocab_size} and is "
                          f"{kind}; only BPE tokenizers can be trimmed to the model's rows (as in mergekit)")
    from tokenizers import Tokenizer

    data["added_tokens"] = [a for a in data["added_tokens"] if a["id"] < vocab_size]
    for t in extra:
        data["model"]["vocab"].pop(t, None)

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in extra for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    out = _copy(tokenizer)
    out._tokenizer = Tokenizer.from_str(json.dumps(data))
    return out


def _copy(tokenizer):
    """An independent copy (saved and reloaded: add_tokens must not change the input's)."""
    transformers = _transformers()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=False)


def union_tokenizer(base_tok, others: list[tuple[Any, int | None]]):
    """mergekit's union: the base tokenizer plus every input's other regular tokens (as plain
    added tokens), then every input's added tokens with their own settings (first seen wins)."""
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in others:
        size = size if size is not None else tok.vocab_size
        decoder = tok.added_tokens_decoder
        added_text = {a.content for a in decoder.values()}
        for text, idx in tok.get_vocab().items():
            if idx < size and text not in added_text:
                regular.setdefault(text)
        for idx, info in decoder.items():
            if idx < size and info.content not in added:
                added[info.content] = info
    out = _copy(base_tok)
    base_vocab = base_tok.get_vocab()
    for text in regular:
        if text not in added and text not in base_vocab:
            out.add_tokens(text)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_vocab(recipe: Recipe, checkpoints: list, labels: list[str], referenced: list[int], base: int | None,
                resolve) -> VocabPlan:
    """The output vocabulary of ``recipe`` over the models ``referenced`` (indices into
    ``checkpoints``; ``base`` or the first is the vocabulary's base). ``resolve(ref)`` gives
    the model index of a recipe reference (opening it if needed)."""
    source = recipe.tokenizer_source_resolved
    settings = recipe.tokenizer.tokens if recipe.tokenizer is not None and recipe.tokenizer.tokens else {}
    pad = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer is not None else None
    head = base if base is not None else referenced[0]
    head_folder = model_folder(checkpoints[head])
    if head_folder is None or not has_tokenizer(head_folder):
        raise RecipeError(f"tokenizer_source '{source}': model '{labels[head]}' has no tokenizer files; "
                          "the output vocabulary is built on the base model's tokenizer")
    head_raw = load_tokenizer(head_folder, labels[head])
    head_tok = stripped(head_raw, model_vocab_size(checkpoints[head]), labels[head])
    toks: dict[int, Any] = {head: head_tok}
    for i in referenced:
        if i in toks:
            continue
        folder = model_folder(checkpoints[i])
        if folder is None or not has_tokenizer(folder):
            LOG.warning("model '%s' has no tokenizer; assuming the same as '%s'", labels[i], labels[head])
            continue
        toks[i] = load_tokenizer(folder, labels[i])
    copy_from = None
    if source == "base":
        out = head_tok
        copy_from = head_folder if out is head_raw else None
    elif source == "union":
        # the base first, then the recipe's order (mergekit walks a set: its order changes between runs)
        order = [head] + [i for i in referenced if i != head and i in toks]
        out = union_tokenizer(head_tok, [(toks[i], model_vocab_size(checkpoints[i])) for i in order])
    else:
        idx = resolve(source)
        folder = model_folder(checkpoints[idx])
        if folder is None or not has_tokenizer(folder):
            raise RecipeError(f"tokenizer_source '{source}': that model has no tokenizer files")
        out = toks.get(idx) if idx in toks and idx != head else load_tokenizer(folder, source)
        copy_from = folder
    missing = [t for t in settings if t not in out.get_vocab()]
    if missing:
        out = _copy(out) if copy_from is not None else out
        copy_from = None
        for text in missing:
            out.add_tokens(text)
    vocab = out.get_vocab()
    n = len(vocab)
    if max(vocab.values(), default=-1) >= n:
        raise RecipeError(f"tokenizer_source '{source}': the output tokenizer's ids are not contiguous "
                          f"(largest {max(vocab.values())} for {n} tokens); this vocabulary cannot index rows")
    size = n if not pad or n % pad == 0 else (n // pad + 1) * pad
    perms = {}
    for i in referenced:
        own = (toks.get(i) or head_tok).get_vocab()
        rows = model_vocab_size(checkpoints[i]) or len(own)
        p = torch.full((n,), -1, dtype=torch.long)
        for text, new_id in vocab.items():
            old = own.get(text)
            if old is not None and old < rows:
                p[new_id] = old
        perms[i] = p
    plan = VocabPlan(out, vocab, size, perms, base, copy_from=copy_from)
    plan.rules = _rules(settings, vocab, toks, head_tok, referenced, base, labels, resolve, recipe)
    return plan


def _rules(settings: dict[str, TokenSetting], vocab, toks, head_tok, referenced, base, labels, resolve,
           recipe: Recipe) -> dict[int, TokenRule]:
    rules = {}
    for text, s in settings.items():
        where = f"tokenizer.tokens '{text}'"
        src = s.source
        if src is None:
            if s.force:
                raise RecipeError(f"{where}: 'force: true' needs a 'source' (a model, base, or {{kind: zero}})")
            rules[vocab[text]] = TokenRule(None)
            continue
        if isinstance(src, ZeroTokenSource):
            rules[vocab[text]] = TokenRule(RowSource(None), s.force)
            continue
        ref = src.model if isinstance(src, ModelTokenSource) else src
        idx = _model_index(ref, where, recipe, base, resolve)
        if idx not in referenced:
            raise RecipeError(f"{where}: source '{ref}' is not one of the merged models; name one of: "
                              + ", ".join(labels[i] for i in referenced))
        row = None
        if isinstance(src, ModelTokenSource):
            own = (toks.get(idx) or head_tok).get_vocab()
            if src.token is not None:
                if src.token not in own:
                    raise RecipeError(f"{where}: token '{src.token}' is not in model '{ref}''s vocabulary")
                row = own[src.token]
            else:
                row = src.token_id
                if row < 0:
                    raise RecipeError(f"{where}: token_id {row} must be >= 0")
        else:
            own = (toks.get(idx) or head_tok).get_vocab()
            if text not in own:
                raise RecipeError(f"{where}: model '{ref}' has no token '{text}' to take the row from; "
                                  "give a model that has it, or {kind: model_token, model: M, token: OTHER}")
        rules[vocab[text]] = TokenRule(RowSource(idx, row), s.force)
    return rules


def _model_index(ref: str, where: str, recipe: Recipe, base: int | None, resolve) -> int:
    listed = {m.model for m in recipe.models or []} | {s.model for sl in recipe.slices or [] for s in sl.sources}
    if recipe.base_model:
        listed.add(recipe.base_model)
    if ref == "base" and "base" not in listed:
        if base is None:
            raise RecipeError(f"{where}: source 'base' but the recipe has no base_model")
        return base
    if ref not in listed:
        raise RecipeError(f"{where}: source '{ref}' is not one of the recipe's models; name one of: " + ", ".join(sorted(listed)))
    return resolve(ref)
