"""mergekit-moe's configuration, validated strictly.

A ``mergekit-moe`` YAML file runs unchanged (mergekit 0.1.5's ``MoEMergeConfig``:
``base_model``, ``experts`` with ``source_model``, ``positive_prompts``,
``negative_prompts``, ``noise_scale``, ``residual_scale``; ``gate_mode``, ``dtype``,
``experts_per_token``, ``shared_experts``, ``architecture``). Unlike mergekit, an
unknown key (``postive_prompts``) or a value of the wrong type is an error naming the
key and the closest allowed one instead of being ignored, and the checks mergekit logs
before exiting (too few experts, prompts missing, every expert the same) are one-line
errors that say what to change.

alloykit extensions: ``seed`` (the random gate modes and ``noise_scale`` draw from one
generator per tensor seeded from (seed, tensor name)) and ``tokenizer_source`` (only
``base``: the experts route by the base's tokens, as in mergekit, which ignores the key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alloykit.config import dtype_name, explain, load_yaml
from alloykit.errors import RecipeError, did_you_mean

#: gate modes: mergekit's documented three, its ``uniform_random`` (torch.nn.Linear's initialisation),
#: and the two spellings of ``hidden`` its router also accepts (``hidden_last`` is ``hidden``;
#: ``hidden_avg`` averages over the prompt's tokens instead of taking the last one)
GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
#: modes whose routers come from prompts
PROMPT_MODES = ("hidden", "cheap_embed", "hidden_avg", "hidden_last")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    """One dense model whose MLPs become one expert in every layer."""

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    #: Gaussian noise of this standard deviation added to the expert's MLP weights
    noise_scale: float | None = None
    #: the expert's down projection (its output) multiplied by this
    residual_scale: float | None = None


class MoEConfig(_Strict):
    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal["hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last"] = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    tokenizer_source: Literal["base"] | None = None
    seed: int | None = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        return dtype_name(v)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False, allow_unicode=True)

    def all_experts(self) -> list[tuple[str, Expert]]:
        """(where, expert) of every routed and shared expert, for messages."""
        out = [(f"experts[{i}]", e) for i, e in enumerate(self.experts)]
        return out + [(f"shared_experts[{i}]", e) for i, e in enumerate(self.shared_experts or [])]


def _message(err: ValidationError) -> str:
    """The project's one reading of a pydantic error (``alloykit.config.explain``), with the two
    literal choices mergekit-moe users get wrong said in their terms."""
    problem = explain(err, MoEConfig)
    if problem.kind == "invalid" and problem.key == "gate_mode":
        got = str(problem.value)
        return f"moe config: gate_mode '{got}' is not one of {', '.join(GATE_MODES)}{did_you_mean(got, GATE_MODES)}"
    if problem.kind == "invalid" and problem.key == "tokenizer_source":
        return ("moe config: tokenizer_source must be 'base' (the experts are routed by the base model's tokens; "
                "mergekit-moe always copies the base's tokenizer)")
    return problem.line("moe config")


def parse_moe_config(data: Any) -> MoEConfig:
    """Validate a mergekit-moe configuration given as a dict (a MoEConfig is returned as is)."""
    if isinstance(data, MoEConfig):
        config = data
    else:
        if not isinstance(data, dict):
            raise RecipeError(f"moe config: expected a mapping (base_model, experts, ...), got {type(data).__name__}")
        try:
            config = MoEConfig.model_validate(data)
        except ValidationError as err:
            raise RecipeError(_message(err)) from None
    return config


def load_moe_config(path: str | Path) -> MoEConfig:
    """Read a mergekit-moe YAML file through the guarded loader (safe tags, no duplicate keys, no alias bombs)."""
    return parse_moe_config(load_yaml(path, what="moe config"))


def check(config: MoEConfig, *, allow_all_same: bool = False) -> None:
    """The checks mergekit-moe runs before merging, as one-line errors (``allow_all_same``: its
    ``--i-understand-this-is-not-useful-without-training``, for sparse upcycling)."""
    k, n = config.experts_per_token, len(config.experts)
    if k < 1:
        raise RecipeError(f"moe config: experts_per_token = {k}: must be at least 1")
    if n < k:
        raise RecipeError(f"moe config: {n} expert(s) for experts_per_token = {k}; list at least {k} experts "
                          f"or lower experts_per_token")
    if len(config.shared_experts or []) > 1:
        raise RecipeError(f"moe config: {len(config.shared_experts)} shared_experts; at most one is supported")
    for where, e in config.all_experts():
        for key in ("noise_scale", "residual_scale"):
            v = getattr(e, key)
            if v is not None and not v == v:  # NaN
                raise RecipeError(f"moe config: {where}.{key} is NaN; give a number")
        if e.noise_scale is not None and e.noise_scale < 0:
            raise RecipeError(f"moe config: {where}.noise_scale = {e.noise_scale}: a standard deviation, must be >= 0")
    if config.gate_mode in PROMPT_MODES:
        for i, e in enumerate(config.experts):
            if not e.positive_prompts:
                raise RecipeError(
                    f"moe config: experts[{i}] ('{e.source_model}') has no positive_prompts; gate_mode "
                    f"'{config.gate_mode}' sets each expert's router from its prompts: give it positive_prompts "
                    "(examples of what it should receive), or use gate_mode: random")

        def prompts(e: Expert) -> tuple:
            return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())

        if n > 1 and all(prompts(e) == prompts(config.experts[0]) for e in config.experts[1:]):
            raise RecipeError("moe config: every expert has the same positive and negative prompts, so the routers "
                              "cannot tell them apart; give each expert prompts of what it should receive")
    shared = config.shared_experts or []
    if shared and bool(shared[0].negative_prompts) and not shared[0].positive_prompts:
        raise RecipeError("moe config: shared_experts[0] has negative_prompts but no positive_prompts; give both or neither")
    if not allow_all_same and n > 1 and all(e.source_model == config.experts[0].source_model for e in config.experts[1:]):
        raise RecipeError(
            f"moe config: all {n} experts are the same model ('{config.experts[0].source_model}'): the result computes "
            "the same function at a larger cost; to build it anyway for training (sparse upcycling), pass "
            "--i-understand-this-is-not-useful-without-training")
