"""What each tensor of a checkpoint is: its role, its layer, where it sits.

The one place that reads meaning into tensor names. The planner tags every job with
``role_of(name)`` and methods read ``x.role``; nothing else parses names. Families
covered (names as Hugging Face transformers saves them):

* Llama, Mistral, Mixtral, Qwen2/3 (MoE too), Gemma 1-3, Phi-3: ``model.embed_tokens``,
  ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` (Phi-3's fused
  ``qkv_proj``, ``gate_up_proj``; Mixtral's ``block_sparse_moe.experts.E.w1/w2/w3``),
  ``*_layernorm``, ``model.norm``, ``lm_head``, ``score`` (sequence classification);
* BERT and MiniLM: ``embeddings.{word,position,token_type}_embeddings``,
  ``encoder.layer.N.attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``, ``LayerNorm``, ``pooler``, ``classifier``,
  ``cls.predictions`` (the masked-LM head);
* GPT-2: ``transformer.{wte,wpe}``, ``transformer.h.N.attn.c_attn`` (fused q/k/v),
  ``attn.c_proj``, ``mlp.{c_fc,c_proj}``, ``ln_1``, ``ln_2``, ``ln_f``;
* GPT-NeoX (``embed_in``, ``query_key_value``, ``dense_h_to_4h``, ``embed_out``), OPT
  (``embed_positions``, ``fc1``/``fc2``) and CLIP's vision tower (``patch_embedding``,
  ``pre_layrnorm``).

A name no rule knows gets kind ``other`` (never an error): roles decide how a method
treats a tensor, and "other" is always the plain, safe treatment.

Where a tensor sits (``section``) matters to the planner's ``slices`` (what comes from
the first slice's models and what from the last) and to RegMean++ (what is merged before
the blocks, what after). Whether the output head shares the token embedding's matrix
(``tied``) comes from config.json, when there is one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Kind(str, Enum):
    """What a tensor's module does (a weight and its bias share the kind)."""

    EMBEDDING = "embedding"  # token embedding (vocab x hidden); also patch and class embeddings
    POSITION_EMBEDDING = "position_embedding"
    TOKEN_TYPE_EMBEDDING = "token_type_embedding"
    OUTPUT_HEAD = "output_head"  # the LM head: hidden -> vocabulary logits
    CLASSIFIER = "classifier"  # a task head (sequence classification, ``score``, ``classifier``)
    POOLER = "pooler"
    NORM = "norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_QKV = "attn_qkv"  # q, k and v in one matrix (GPT-2's c_attn, NeoX, Phi-3)
    ATTN_O = "attn_o"
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_GATE_UP = "mlp_gate_up"  # gate and up in one matrix (Phi-3)
    MLP_DOWN = "mlp_down"
    ROUTER = "router"  # a mixture-of-experts gate
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


EMBEDDING_KINDS = frozenset({Kind.EMBEDDING, Kind.POSITION_EMBEDDING, Kind.TOKEN_TYPE_EMBEDDING})
ATTENTION_KINDS = frozenset({Kind.ATTN_Q, Kind.ATTN_K, Kind.ATTN_V, Kind.ATTN_QKV, Kind.ATTN_O})
MLP_KINDS = frozenset({Kind.MLP_GATE, Kind.MLP_UP, Kind.MLP_GATE_UP, Kind.MLP_DOWN})

#: config.json keys that hold the number of repeated blocks, in the order they are tried
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

#: ``PREFIX.layers.N.REST``: the outermost (leftmost) stack of repeated blocks
_LAYER_RE = re.compile(r"^(?P<pre>(?:[^.]+\.)*?)(?P<kind>layers|layer|h|blocks|block)\.(?P<idx>\d+)\.(?P<rest>.+)$")

#: fragments of names outside the blocks that mark the end of a model (heads, final norms);
#: only consulted for names no rule below recognises, so that unknown heads keep going last
_POST_FRAGMENTS = ("lm_head", "norm", "ln_f", "score", "classifier", "pooler", "final_layer", "head")

# last module component -> kind, inside an attention module
_ATTENTION = {
    **dict.fromkeys(("q_proj", "query", "q", "wq", "q_lin"), Kind.ATTN_Q),
    **dict.fromkeys(("k_proj", "key", "k", "wk", "k_lin"), Kind.ATTN_K),
    **dict.fromkeys(("v_proj", "value", "v", "wv", "v_lin"), Kind.ATTN_V),
    **dict.fromkeys(("qkv_proj", "c_attn", "query_key_value", "wqkv", "qkv"), Kind.ATTN_QKV),
    **dict.fromkeys(("o_proj", "out_proj", "dense", "c_proj", "o", "wo", "out_lin"), Kind.ATTN_O),
}
_ATTENTION_MODULES = frozenset({"self_attn", "attention", "attn", "self_attention", "mixer"})
# last module component -> kind, inside a block but outside attention
_MLP = {
    **dict.fromkeys(("gate_proj", "w1", "wi_0"), Kind.MLP_GATE),
    **dict.fromkeys(("up_proj", "w3", "c_fc", "fc1", "dense_h_to_4h", "wi", "wi_1", "lin1"), Kind.MLP_UP),
    **dict.fromkeys(("down_proj", "w2", "fc2", "dense_4h_to_h", "wo", "lin2"), Kind.MLP_DOWN),
    "gate_up_proj": Kind.MLP_GATE_UP,
}
_MLP_MODULES = frozenset({"mlp", "feed_forward", "ffn", "block_sparse_moe", "experts", "shared_expert"})
_POSITION = frozenset({"wpe", "position_embeddings", "position_embedding", "embed_positions"})
_TOKEN_EMBEDDING = frozenset({"wte", "word_embeddings", "embed_tokens", "embed_in", "patch_embedding", "class_embedding"})
_OUTPUT_HEAD = frozenset({"lm_head", "embed_out"})
_CLASSIFIER = frozenset({"classifier", "score", "head", "heads", "classification_head", "qa_outputs"})
#: integer buffers saved beside the embeddings (BERT); they are no embedding of their own
_BUFFERS = frozenset({"position_ids", "token_type_ids", "inv_freq", "masked_bias"})

#: tie_word_embeddings when config.json does not say (transformers' default per model_type)
_TIED_BY_DEFAULT = {
    "llama": False, "mistral": False, "mixtral": False, "qwen2": False, "qwen2_moe": False, "qwen3": False,
    "qwen3_moe": False, "phi3": False, "gpt_neox": False, "gemma": True, "gemma2": True, "gemma3_text": True,
    "gpt2": True, "bert": True, "opt": True,
}


@dataclass(frozen=True)
class TensorRole:
    """The role of one tensor.

    ``layer``: index of the repeated block it belongs to (None outside the blocks);
    ``section``: "pre" (before the blocks: embeddings and their norm), "layer", "post"
    (after them: final norm, heads, pooler) or "unknown" (outside the blocks, no rule
    says where); ``param``: the last name component ("weight", "bias", ...); ``tied``:
    an output head that shares the token embedding's matrix (config.json).
    """

    kind: Kind
    layer: int | None = None
    section: str = "unknown"
    param: str = ""
    tied: bool = False

    @property
    def is_embedding(self) -> bool:
        """Token, position or token-type embedding table (rows are looked up, not multiplied)."""
        return self.kind in EMBEDDING_KINDS

    @property
    def is_attention(self) -> bool:
        return self.kind in ATTENTION_KINDS

    @property
    def is_mlp(self) -> bool:
        return self.kind in MLP_KINDS


def split_layer(name: str) -> tuple[str, int, str] | None:
    """'model.layers.3.mlp.up.weight' -> ('model.layers.', 3, 'mlp.up.weight'); None outside the blocks.

    The outermost stack counts (T5's 'block.0.layer.1' is block 0).
    """
    m = _LAYER_RE.match(name)
    if not m:
        return None
    return m["pre"] + m["kind"] + ".", int(m["idx"]), m["rest"]


def role_of(name: str, config: dict[str, Any] | None = None) -> TensorRole:
    """The role of tensor ``name``; ``config`` (the model's config.json) tells whether the
    output head is tied to the token embedding."""
    split = split_layer(name)
    param = name.rpartition(".")[2]
    path = (split[2] if split else name).lower().split(".")  # inside the block, for a tensor in one
    parts = path[:-1]  # the module path
    if path[-1] not in ("weight", "bias"):  # a bare parameter is its own module (fused experts, class_embedding)
        parts = path
    if path[-1] in _BUFFERS or not parts:
        kind = Kind.OTHER
    elif _is_norm(parts[-1]):
        kind = Kind.NORM
    else:
        kind = _kind_in_block(parts) if split else _kind_outside(parts)
    if split is not None:
        return TensorRole(kind, split[1], "layer", param)
    tied = kind is Kind.OUTPUT_HEAD and bool(tied_embeddings(config))
    return TensorRole(kind, None, _section(kind, path[:-1], name), param, tied)


def _kind_in_block(parts: list[str]) -> Kind:
    last = parts[-1]
    if last in ("gate", "router") and len(parts) > 1:
        return Kind.ROUTER
    if any(p in _ATTENTION_MODULES for p in parts[:-1]) or parts[0] in _ATTENTION_MODULES:
        return _ATTENTION.get(last, Kind.OTHER)
    if last in _MLP:
        return _MLP[last]
    # BERT: 'intermediate.dense' (up) and the block's own 'output.dense' (down)
    if parts[-2:] == ["intermediate", "dense"]:
        return Kind.MLP_UP
    if parts[-2:] == ["output", "dense"]:
        return Kind.MLP_DOWN
    if any(p in _MLP_MODULES for p in parts) and last == "c_proj":  # GPT-2's mlp.c_proj
        return Kind.MLP_DOWN
    return Kind.OTHER


def _kind_outside(parts: list[str]) -> Kind:
    last = parts[-1]
    if last in _OUTPUT_HEAD or parts[0] == "lm_head":
        return Kind.OUTPUT_HEAD
    if parts[:3] == ["cls", "predictions", "decoder"] or parts == ["cls", "predictions"]:
        return Kind.OUTPUT_HEAD  # BERT's masked-LM decoder (tied to the word embeddings) and its bias
    if last in _POSITION:
        return Kind.POSITION_EMBEDDING
    if last == "token_type_embeddings":
        return Kind.TOKEN_TYPE_EMBEDDING
    if last in _TOKEN_EMBEDDING or "embed" in last:
        return Kind.EMBEDDING
    if "pooler" in parts:
        return Kind.POOLER
    if last in _CLASSIFIER or parts[0] in _CLASSIFIER:
        return Kind.CLASSIFIER
    return Kind.OTHER


def _is_norm(component: str) -> bool:
    return "norm" in component or re.fullmatch(r"ln(_\w+)?", component) is not None


def _section(kind: Kind, parts: list[str], name: str) -> str:
    if kind in EMBEDDING_KINDS or (any("embed" in p for p in parts) and kind is not Kind.OUTPUT_HEAD):
        return "pre"  # the embeddings and what belongs to them (BERT's embeddings.LayerNorm, position_ids)
    if parts and parts[-1].startswith("pre_"):
        return "pre"  # CLIP's pre_layrnorm
    if kind in (Kind.OUTPUT_HEAD, Kind.CLASSIFIER, Kind.POOLER, Kind.NORM) or (parts and parts[0] == "cls"):
        return "post"
    if any(fragment in name for fragment in _POST_FRAGMENTS):
        return "post"
    return "unknown"


def tied_embeddings(config: dict[str, Any] | None) -> bool | None:
    """Whether the output head shares the token embedding's matrix (``tie_word_embeddings``,
    else transformers' default for the ``model_type``); None without a config."""
    if not config:
        return None
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg.get("tie_word_embeddings"), bool):
            return cfg["tie_word_embeddings"]
    return _TIED_BY_DEFAULT.get(str(config.get("model_type")), True)


def num_layers(config: dict[str, Any] | None, names: Any = ()) -> int:
    """Number of repeated blocks: from config.json when it says, else counted from tensor names."""
    for key in LAYER_COUNT_KEYS:
        if config and isinstance(config.get(key), int):
            return config[key]
    idx = [s[1] for n in names if (s := split_layer(n))]
    return max(idx) + 1 if idx else 0
