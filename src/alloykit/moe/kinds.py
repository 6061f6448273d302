"""Output kinds of ``alloykit moe``: which dense inputs each can hold, its config.json, its tensor names.

The kinds are mergekit-moe's, selected the same way: ``architecture:`` picks by name
prefix (``qwen`` matches both Qwen kinds), the kinds that cannot hold the config drop
out, Mixtral wins when it can, else the first left.

| kind | inputs | shared expert | transformers class |
|---|---|---|---|
| Mixtral | llama, mistral | none | MixtralForCausalLM |
| Qwen MoE | llama, mistral, qwen2 | exactly one (with prompts unless the gates are random) | Qwen2MoeForCausalLM |
| Qwen3 MoE | qwen3 | none | Qwen3MoeForCausalLM |
| DeepSeek MoE | refused | | needs the model's own code (``trust_remote_code``), which alloykit never runs |

Tensors are written in the checkpoint layout that transformers' own ``save_pretrained``
writes (one tensor per expert: ``block_sparse_moe.experts.E.w1`` for Mixtral,
``mlp.experts.E.gate_proj`` for the Qwen kinds), which transformers 4 and 5, vLLM and
llama.cpp's converter read. transformers 5 fuses them on load into its in-memory
layout (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]),
which is what mergekit-moe 0.1.5 writes to disk for Mixtral and Qwen3 MoE (transformers 4
cannot read those files).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alloykit.errors import RecipeError, did_you_mean

#: the dense MLP projections, in alloykit.roles' terms -> the projection's short name
PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class OutputKind:
    name: str  # as mergekit-moe names it (``architecture:`` matches a prefix of it)
    model_type: str
    inputs: tuple[str, ...]  # model types of the dense inputs it can hold
    shared: str  # "none", "one" (exactly one, gated by prompts unless random), "refused"
    expert_name: Callable[[int, int, str], str]  # (layer, expert, projection) -> tensor name
    router_name: Callable[[int], str]
    shared_name: Callable[[int, str], str] | None = None
    shared_gate_name: Callable[[int], str] | None = None
    #: attention biases this kind's attention always has; zeros where the base has none
    attention_biases: tuple[str, ...] = ()
    refused: str = ""

    def why_not(self, model_types: set[str], n_shared: int, shared_has_prompts: bool, random_gates: bool) -> str | None:
        """Why this kind cannot hold the config, or None."""
        if self.refused:
            return self.refused
        if len(model_types) != 1:
            return f"needs every input of one architecture (got {', '.join(sorted(model_types))})"
        (mt,) = model_types
        if mt not in self.inputs:
            return f"holds {'/'.join(self.inputs)} models, not {mt}"
        if self.shared == "none" and n_shared:
            return "has no shared expert"
        if self.shared == "one":
            if n_shared != 1:
                return "needs exactly one shared expert"
            if not random_gates and not shared_has_prompts:
                return "gates its shared expert, so the shared expert needs positive_prompts"
        return None


_MIXTRAL_PROJ = {"gate": "w1", "down": "w2", "up": "w3"}

MIXTRAL = OutputKind(
    "Mixtral", "mixtral", ("llama", "mistral"), "none",
    expert_name=lambda layer, e, p: f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_MIXTRAL_PROJ[p]}.weight",
    router_name=lambda layer: f"model.layers.{layer}.block_sparse_moe.gate.weight",
)
DEEPSEEK = OutputKind(
    "DeepSeek MoE", "deepseek", ("llama", "mistral"), "refused",
    expert_name=lambda layer, e, p: "", router_name=lambda layer: "",
    refused="is written for the model's own code (trust_remote_code), which alloykit never runs",
)
QWEN2_MOE = OutputKind(
    "Qwen MoE", "qwen2_moe", ("llama", "mistral", "qwen2"), "one",
    expert_name=lambda layer, e, p: f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight",
    router_name=lambda layer: f"model.layers.{layer}.mlp.gate.weight",
    shared_name=lambda layer, p: f"model.layers.{layer}.mlp.shared_expert.{p}_proj.weight",
    shared_gate_name=lambda layer: f"model.layers.{layer}.mlp.shared_expert_gate.weight",
    attention_biases=("q_proj", "k_proj", "v_proj"),
)
QWEN3_MOE = OutputKind(
    "Qwen3 MoE", "qwen3_moe", ("qwen3",), "none",
    expert_name=lambda layer, e, p: f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight",
    router_name=lambda layer: f"model.layers.{layer}.mlp.gate.weight",
)

#: in mergekit-moe's order (which decides among several kinds that fit, Mixtral aside)
KINDS = (MIXTRAL, DEEPSEEK, QWEN2_MOE, QWEN3_MOE)


def select_kind(architecture: str | None, model_types: set[str], n_shared: int, shared_has_prompts: bool,
                random_gates: bool) -> OutputKind:
    """The output kind, chosen as mergekit-moe chooses it; a one-line error when none fits."""
    candidates = list(KINDS)
    if architecture:
        a = architecture.lower()
        candidates = [k for k in KINDS if k.name.lower().startswith(a) or k.model_type == a]
        if not candidates:
            names = [k.name for k in KINDS] + [k.model_type for k in KINDS]
            raise RecipeError(f"moe config: architecture '{architecture}' is not an output kind{did_you_mean(architecture, names)}; "
                              f"use one of {', '.join(k.name for k in KINDS if not k.refused)}")
    reasons = {k.name: k.why_not(model_types, n_shared, shared_has_prompts, random_gates) for k in candidates}
    fits = [k for k in candidates if reasons[k.name] is None]
    if not fits:
        why = "; ".join(f"{name} {r}" for name, r in reasons.items())
        raise RecipeError(f"moe config: no output architecture can hold these models and experts: {why}")
    return MIXTRAL if MIXTRAL in fits else fits[0]


def output_config(kind: OutputKind, base_config: Any, n_experts: int, experts_per_token: int, dtype_name: str) -> Any:
    """The output's transformers config, from the base's (every other setting kept)."""
    from alloykit.eval.loading import transformers_module

    tf = transformers_module()
    d = {k: v for k, v in base_config.to_dict().items()
         if k not in ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map", "torch_dtype", "dtype")}
    # the base's settings first, then the mixture's (set after construction, where __init__ would rewrite them)
    if kind is MIXTRAL:
        cls, arch = tf.MixtralConfig, "MixtralForCausalLM"
        over = dict(num_local_experts=n_experts, num_experts_per_tok=experts_per_token, sliding_window=None)
    elif kind is QWEN2_MOE:
        cls, arch = tf.Qwen2MoeConfig, "Qwen2MoeForCausalLM"
        over = dict(num_experts=n_experts, num_experts_per_tok=experts_per_token, decoder_sparse_step=1,
                    norm_topk_prob=True, sliding_window=None, use_sliding_window=False,
                    shared_expert_intermediate_size=d["intermediate_size"], moe_intermediate_size=d["intermediate_size"])
    elif kind is QWEN3_MOE:
        cls, arch = tf.Qwen3MoeConfig, "Qwen3MoeForCausalLM"
        over = dict(num_experts=n_experts, num_experts_per_tok=experts_per_token, decoder_sparse_step=1,
                    norm_topk_prob=True, moe_intermediate_size=d["intermediate_size"])
    else:  # pragma: no cover - select_kind never returns a refused kind
        raise RecipeError(f"moe config: output kind {kind.name} {kind.refused}")
    cfg = cls(**d)
    for key, value in over.items():
        setattr(cfg, key, value)
    cfg.architectures = [arch]
    cfg.dtype = dtype_name
    return cfg
