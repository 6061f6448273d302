"""The project's one list of tokenizer and side files (what a model folder carries besides weights)."""

from __future__ import annotations

from pathlib import Path

#: files that make up a tokenizer, in any of the formats transformers reads
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)
#: files read with a tokenizer by processors (copied with it)
PROCESSOR_FILES = ("preprocessor_config.json",)
#: any one of these marks a folder that holds a tokenizer
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model", "tokenizer_config.json")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds tokenizer files."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in TOKENIZER_MARKERS)


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer (and processor) files present in ``folder``."""
    folder = Path(folder)
    return [folder / n for n in TOKENIZER_FILES + PROCESSOR_FILES if (folder / n).is_file()]
