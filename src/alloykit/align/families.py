"""Permutation specs of the Hugging Face families alloykit merges, derived from config.json and the tensor names.

* BERT (``model_type: bert``): the residual stream (embeddings, every LayerNorm, the
  inputs of query/key/value/intermediate/pooler, the outputs of attention.output.dense and
  output.dense), each layer's heads (whole heads, q/k dimensions jointly, v dimensions), each
  layer's MLP units, and the pooler's units when a classifier reads them.
* Llama, Mistral, Qwen2 (``model_type: llama | mistral | qwen2``): the residual stream
  (embed_tokens, every RMSNorm, the inputs of q/k/v/gate/up, the outputs of o_proj/down_proj,
  the final norm, lm_head), each layer's heads (key/value heads with their query heads, query
  heads within a group, v dimensions; q/k dimensions stay under RoPE), each layer's MLP units
  (gate_proj and up_proj rows, down_proj columns: SiLU(gate) * up is elementwise).

LayerNorm and RMSNorm commute with a permutation of their features once their weights
(and bias) are permuted: the mean and the root mean square do not depend on the order.

What a model outputs stays in place: a bare encoder (BertModel, LlamaModel) returns the
residual stream itself, so by default its order is kept (``permute_outputs=True`` moves it
too, and the caller must permute whatever reads those features). A checkpoint with a head
(lm_head, tied or not, a classifier, a score layer) may move the stream freely.

Any floating-point tensor the family's layout does not name is an error: permuting a model
around a tensor whose role is unknown could silently change its function.
"""

from __future__ import annotations

from alloykit.align.spec import Group, Heads, Probe, Spec, Use, check_spec
from alloykit.errors import CheckpointError

BERT_TYPES = ("bert",)
LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED = BERT_TYPES + LLAMA_TYPES


def family_of(config: dict, label: str = "model") -> str:
    mt = config.get("model_type")
    if mt in BERT_TYPES:
        return "bert"
    if mt in LLAMA_TYPES:
        return "llama"
    raise CheckpointError(f"model '{label}': model_type '{mt}' has no permutation spec; alignment supports "
                          f"{', '.join(SUPPORTED)} checkpoints (and plain MLP/CNN torch modules from Python)")


def hf_spec(config: dict, shapes: dict[str, tuple[int, ...]], *, permute_outputs: bool = False,
            float_names: set[str] | None = None, label: str = "model") -> Spec:
    """The spec of a Hugging Face checkpoint: its config.json (as a dict) and tensor shapes."""
    family = family_of(config, label)
    builder = _Builder(shapes, label)
    spec = _bert(config, builder, permute_outputs) if family == "bert" else _llama(config, builder, permute_outputs)
    floats = float_names if float_names is not None else set(shapes)
    unknown = sorted(n for n in floats if n not in builder.known)
    if unknown:
        raise CheckpointError(f"model '{label}': tensor '{unknown[0]}' is not part of the {family} layout alloykit can "
                              f"permute ({len(unknown)} such tensor(s)); alignment would not keep the model's function")
    try:
        check_spec(spec, shapes)
    except ValueError as err:
        raise CheckpointError(f"model '{label}': {err}; does config.json match the weights?") from None
    return spec


class _Builder:
    def __init__(self, shapes: dict[str, tuple[int, ...]], label: str):
        self.shapes = shapes
        self.label = label
        self.known: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.shapes

    def need(self, name: str) -> str:
        if name not in self.shapes:
            raise CheckpointError(f"model '{self.label}': tensor '{name}' is missing; config.json and the weights disagree")
        self.known.add(name)
        return name

    def uses(self, *entries: tuple[str, int] | tuple[str, int, str], optional: bool = False) -> list[Use]:
        """Uses of tensors that exist (``optional``: skip missing ones, e.g. biases)."""
        out = []
        for e in entries:
            name, dim, role = e[0], e[1], (e[2] if len(e) > 2 else "")
            if optional and name not in self.shapes:
                continue
            out.append(Use(self.need(name), dim, role=role))
        return out

    def fixed(self, *names: str) -> None:
        """Tensors that no group moves (vocabulary axes, classifier biases), known all the same."""
        self.known.update(n for n in names if n in self.shapes)


def _prefix(shapes: dict, suffix: str, label: str, family: str) -> str:
    hits = [n[: -len(suffix)] for n in shapes if n.endswith(suffix)]
    if len(hits) != 1:
        raise CheckpointError(f"model '{label}': expected one tensor ending in '{suffix}' in a {family} checkpoint, found {len(hits)}")
    return hits[0]


def _bert(cfg: dict, b: _Builder, permute_outputs: bool) -> Spec:
    pre = _prefix(b.shapes, "embeddings.word_embeddings.weight", b.label, "BERT")
    hidden, n_layers, n_heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"model '{b.label}': position_embedding_type '{cfg['position_embedding_type']}' "
                              "is not supported by alignment (only absolute positions)")
    head_dim = hidden // n_heads
    e = f"{pre}embeddings."
    has_pooler = b.has(f"{pre}pooler.dense.weight")
    has_classifier = b.has("classifier.weight")
    notes: list[str] = []
    residual = Group("residual", hidden, b.uses(
        (f"{e}word_embeddings.weight", 1), (f"{e}position_embeddings.weight", 1), (f"{e}LayerNorm.weight", 0),
        (f"{e}LayerNorm.bias", 0)) + b.uses((f"{e}token_type_embeddings.weight", 1), optional=True),
        probes=[Probe(f"{e}LayerNorm")], producers=[f"{e}LayerNorm"])
    b.fixed(f"{e}position_ids", f"{e}token_type_ids")
    groups: list[Group] = []
    for i in range(n_layers):
        p = f"{pre}encoder.layer.{i}."
        a = f"{p}attention."
        residual.uses += b.uses(
            (f"{a}self.query.weight", 1), (f"{a}self.key.weight", 1), (f"{a}self.value.weight", 1),
            (f"{a}output.dense.weight", 0), (f"{a}output.dense.bias", 0), (f"{a}output.LayerNorm.weight", 0),
            (f"{a}output.LayerNorm.bias", 0), (f"{p}intermediate.dense.weight", 1), (f"{p}output.dense.weight", 0),
            (f"{p}output.dense.bias", 0), (f"{p}output.LayerNorm.weight", 0), (f"{p}output.LayerNorm.bias", 0))
        residual.probes += [Probe(f"{a}output.LayerNorm"), Probe(f"{p}output.LayerNorm")]
        residual.producers += [f"{a}output.LayerNorm", f"{p}output.LayerNorm"]
        groups.append(Group(f"layer.{i}.attention", n_heads, b.uses(
            (f"{a}self.query.weight", 0, "q"), (f"{a}self.query.bias", 0, "q"), (f"{a}self.key.weight", 0, "k"),
            (f"{a}self.key.bias", 0, "k"), (f"{a}self.value.weight", 0, "v"), (f"{a}self.value.bias", 0, "v"),
            (f"{a}output.dense.weight", 1, "o")),
            heads=Heads(n_heads, n_heads, head_dim, qk_dims=True),
            probes=[Probe(f"{a}self.query", "out", "q"), Probe(f"{a}self.key", "out", "k"),
                    Probe(f"{a}self.value", "out", "v"), Probe(f"{a}output.dense", "in", "o")]))
        groups.append(Group(f"layer.{i}.mlp", cfg["intermediate_size"], b.uses(
            (f"{p}intermediate.dense.weight", 0), (f"{p}intermediate.dense.bias", 0), (f"{p}output.dense.weight", 1)),
            probes=[Probe(f"{p}output.dense", "in")], producers=[f"{p}intermediate.dense"]))
    if has_pooler:
        residual.uses += b.uses((f"{pre}pooler.dense.weight", 1))
        pooler = Group("pooler", hidden, b.uses((f"{pre}pooler.dense.weight", 0), (f"{pre}pooler.dense.bias", 0)),
                       probes=[Probe(f"{pre}pooler.dense")], producers=[f"{pre}pooler.dense"])
        if has_classifier:
            pooler.uses += b.uses(("classifier.weight", 1))
        if has_classifier or permute_outputs:
            groups.append(pooler)
        else:
            notes.append("pooler units stay in place: the pooler output is an output of this bare encoder")
    elif has_classifier:  # token classification: the classifier reads the stream
        residual.uses += b.uses(("classifier.weight", 1))
    b.fixed("classifier.bias")
    if has_classifier or permute_outputs:
        groups.insert(0, residual)
    else:
        notes.append("the residual stream stays in place: it is this bare encoder's output "
                     "(permute_outputs moves it; then permute whatever reads the features)")
    return Spec("bert", groups, notes)


def _llama(cfg: dict, b: _Builder, permute_outputs: bool) -> Spec:
    pre = _prefix(b.shapes, "embed_tokens.weight", b.label, "Llama")
    hidden, n_layers, n_heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or hidden // n_heads
    archs = cfg.get("architectures") or []
    lm_head = b.has("lm_head.weight") or (cfg.get("tie_word_embeddings") and any(a.endswith("ForCausalLM") for a in archs))
    score = b.has("score.weight")
    residual = Group("residual", hidden, b.uses((f"{pre}embed_tokens.weight", 1), (f"{pre}norm.weight", 0)),
                     probes=[Probe(f"{pre}norm", "in")])
    groups: list[Group] = []
    for i in range(n_layers):
        p = f"{pre}layers.{i}."
        at, mlp = f"{p}self_attn.", f"{p}mlp."
        residual.uses += b.uses(
            (f"{p}input_layernorm.weight", 0), (f"{p}post_attention_layernorm.weight", 0), (f"{at}q_proj.weight", 1),
            (f"{at}k_proj.weight", 1), (f"{at}v_proj.weight", 1), (f"{at}o_proj.weight", 0), (f"{mlp}gate_proj.weight", 1),
            (f"{mlp}up_proj.weight", 1), (f"{mlp}down_proj.weight", 0))
        residual.uses += b.uses((f"{at}o_proj.bias", 0), (f"{mlp}down_proj.bias", 0), optional=True)
        residual.probes += [Probe(f"{p}input_layernorm", "in"), Probe(f"{p}post_attention_layernorm", "in")]
        groups.append(Group(f"layer.{i}.attention", n_heads, b.uses(
            (f"{at}q_proj.weight", 0, "q"), (f"{at}k_proj.weight", 0, "k"), (f"{at}v_proj.weight", 0, "v"),
            (f"{at}o_proj.weight", 1, "o")) + b.uses(
            (f"{at}q_proj.bias", 0, "q"), (f"{at}k_proj.bias", 0, "k"), (f"{at}v_proj.bias", 0, "v"), optional=True),
            heads=Heads(n_heads, n_kv, head_dim, qk_dims=False),
            probes=[Probe(f"{at}q_proj", "out", "q"), Probe(f"{at}k_proj", "out", "k"),
                    Probe(f"{at}v_proj", "out", "v"), Probe(f"{at}o_proj", "in", "o")]))
        groups.append(Group(f"layer.{i}.mlp", cfg["intermediate_size"], b.uses(
            (f"{mlp}gate_proj.weight", 0), (f"{mlp}up_proj.weight", 0), (f"{mlp}down_proj.weight", 1)) + b.uses(
            (f"{mlp}gate_proj.bias", 0), (f"{mlp}up_proj.bias", 0), optional=True),
            probes=[Probe(f"{mlp}down_proj", "in")]))
    notes: list[str] = []
    if b.has("lm_head.weight"):
        residual.uses += b.uses(("lm_head.weight", 1))
    if score:
        residual.uses += b.uses(("score.weight", 1))
        b.fixed("score.bias")
    if lm_head or score or permute_outputs:
        groups.insert(0, residual)
    else:
        notes.append("the residual stream stays in place: it is this bare model's output "
                     "(permute_outputs moves it; then permute whatever reads the features)")
    return Spec("llama", groups, notes)
