"""Which tensors are indexed by token: the input embedding and the output head.

Until the project's tensor-roles module lands, this file is the one place that decides
it (``vocab_tensors``), by name: the names used by the architectures mergekit knows, with
the vocabulary on axis 0. A tensor qualifies only when its first dimension equals the
model's ``vocab_size`` (when its config gives one), so a same-named tensor of another
role is never remapped.
"""

from __future__ import annotations

#: name suffixes of token-indexed tensors (vocabulary on axis 0)
EMBEDDING_NAMES = (
    "embed_tokens.weight",      # Llama, Mistral, Qwen, Gemma, Phi-3, OLMo...
    "wte.weight",               # GPT-2, GPT-BigCode
    "word_embeddings.weight",   # BERT, RoBERTa, Bloom, Falcon
    "embed_in.weight",          # GPT-NeoX
    "tok_embeddings.weight",    # InternLM2
)
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")


def vocab_axis(name: str) -> int | None:
    """0 for a tensor named as a token embedding or output head, else None."""
    if name.endswith(EMBEDDING_NAMES) or name in HEAD_NAMES or name.endswith(".lm_head.weight"):
        return 0
    return None


def is_input_embedding(name: str) -> bool:
    """Whether a token-indexed tensor is the input embedding (else it is an output head)."""
    return name.endswith(EMBEDDING_NAMES)


def vocab_tensors(names, shapes: dict[str, tuple[int, ...]], vocab_size: int | None) -> dict[str, int]:
    """Token-indexed tensors among ``names``: name -> vocabulary axis.

    ``shapes`` gives each tensor's shape; ``vocab_size`` the model's (from its config,
    None when unknown): a candidate whose axis length differs from it is left out.
    """
    out: dict[str, int] = {}
    for name in names:
        axis = vocab_axis(name)
        shape = shapes[name]
        if axis is None or len(shape) <= axis:
            continue
        if vocab_size is not None and shape[axis] != vocab_size:
            continue
        out[name] = axis
    return out
