"""Tokenizers and vocabularies: mergekit's ``tokenizer_source`` / ``tokenizer:`` semantics,
row remapping of embeddings and output heads, chat templates, tokenizer transplants."""

from alloykit.vocab.files import TOKENIZER_FILES, has_tokenizer

__all__ = ["TOKENIZER_FILES", "has_tokenizer"]
