"""The evolutionary search's genome, and the ordinary recipe each genome stands for.

Like mergekit-evolve's: every model has a weight and (for methods that sparsify) a density,
one per model or one per model and layer group; optionally a gene chooses the method among
the configured ones, and one chooses ``normalize``. CMA-ES searches the unit cube; a gene
``g`` in [0, 1] maps to ``lo + g * (hi - lo)`` of its range, a categorical gene to the
``floor(g * n)``-th choice.

The recipe of a genome is the search's whole result: the candidate evaluated in memory is
the merge of exactly this recipe (planned from the same text with the models preloaded), so
``alloykit merge`` of the written recipe gives the evaluated model bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alloykit.methods.registry import all_methods, get_method
from alloykit.roles import split_layer


class LmEvalTask(BaseModel):
    """One harness task of the fitness, with its own metric (mergekit-evolve's task entry)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    metric: str | None = None  # default: LmEvalFitness.metric


class LmEvalFitness(BaseModel):
    """``lm_eval:``: fitness from lm-evaluation-harness tasks (local task YAMLs over local data):
    the mean over the tasks of each one's metric, negated where the harness says lower is better
    (perplexity, bits_per_byte). The options are ``alloykit eval --lm-eval``'s, with its defaults."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str | LmEvalTask] = Field(min_length=1)
    #: folders of local task YAMLs (``--include-path``); relative to the config's folder
    include_path: list[str] = Field(default_factory=list)
    metric: str = "acc"
    #: examples per task (a fraction below 1), few-shot examples (default: each task's own)
    limit: float | None = Field(default=None, gt=0)
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=32, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def task_metrics(self) -> list[tuple[str, str]]:
        """(task, metric) pairs; a metric given as mergekit-evolve writes it ('acc,none') keeps its name."""
        pairs = [(t, self.metric) if isinstance(t, str) else (t.name, t.metric or self.metric) for t in self.tasks]
        return [(t, m.split(",")[0]) for t, m in pairs]

    def harness_limit(self) -> int | float | None:
        return int(self.limit) if self.limit is not None and self.limit >= 1 else self.limit


class EvolveConfig(BaseModel):
    """``alloykit search evolve CONFIG.yaml``: what to merge, the genome, the fitness and the budget."""

    model_config = ConfigDict(extra="forbid")

    #: the fine-tunes' common base; without one, only methods that ignore a base (linear...) apply
    base_model: str | None = None
    models: list[str] = Field(min_length=1)
    #: fitness: the mean validation metric over these tasks (built-in names or task files)...
    tasks: list[str] = Field(default_factory=list)
    #: ... or over lm-evaluation-harness tasks (one of the two)
    lm_eval: LmEvalFitness | None = None
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic"], min_length=1)
    #: one weight (and density) per model (1), or per model and group of consecutive layers
    layer_groups: int = Field(default=1, ge=1)
    normalize: bool | Literal["search"] = False
    weight_range: tuple[float, float] = (0.0, 1.0)
    density_range: tuple[float, float] = (0.1, 1.0)
    #: evaluations in all (the budget), and candidates per generation (default: CMA-ES's 4 + 3 ln(dim))
    max_evals: int = Field(default=100, ge=1)
    population: int | None = Field(default=None, ge=2)
    #: CMA-ES's initial step size in the unit cube
    sigma: float = Field(default=0.25, gt=0)
    seed: int = 0
    #: validation examples per task (default: the whole validation split)
    samples: int | None = Field(default=None, ge=1)
    model_class: str | None = None
    pooling: str | None = None
    max_len: int | None = Field(default=None, ge=2)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        known = all_methods()
        for m in v:
            if m not in known:
                raise ValueError(f"method '{m}' is not registered; choose among {', '.join(sorted(known))}")
            spec = get_method(m)
            if spec.needs_stats is not None or spec.side_outputs or "weight" not in spec.model_params.model_fields:
                raise ValueError(f"method '{m}' cannot be searched here (it needs statistics, writes side outputs or "
                                 "takes no per-model weight); choose e.g. task_arithmetic, ties, dare_ties, linear")
        return v

    @model_validator(mode="after")
    def _base(self) -> "EvolveConfig":
        if bool(self.tasks) == (self.lm_eval is not None):
            raise ValueError("give the fitness as 'tasks' (alloykit task files or names) or as 'lm_eval' (harness "
                             "tasks), " + ("not both" if self.tasks else "one of them"))
        if self.base_model is None:
            needs = [m for m in self.methods if get_method(m).base != "ignored"]
            if needs:
                raise ValueError(f"method '{needs[0]}' merges task vectors from a base: add base_model, or search "
                                 "methods that need none (linear)")
        return self

    @field_validator("weight_range", "density_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"[{v[0]:g}, {v[1]:g}]: the lower bound exceeds the upper")
        return v


@dataclass(frozen=True)
class Candidate:
    method: str
    normalize: bool
    weights: list[list[float]]  # [model][group]
    densities: list[list[float]] | None


class Genome:
    """Positions of the genes in CMA-ES's vector; ``decode`` and ``recipe`` of a vector."""

    def __init__(self, config: EvolveConfig):
        self.c = config
        self.k, self.g = len(config.models), config.layer_groups
        self.uses_density = any("density" in get_method(m).model_params.model_fields for m in config.methods)
        self.dim = self.k * self.g * (2 if self.uses_density else 1)
        self.method_gene = self.dim if len(config.methods) > 1 else None
        self.dim += self.method_gene is not None
        self.normalize_gene = self.dim if config.normalize == "search" else None
        self.dim += self.normalize_gene is not None

    def decode(self, x) -> Candidate:
        x = [min(1.0, max(0.0, float(v))) for v in x]
        lo, hi = self.c.weight_range
        n = self.k * self.g
        weights = [[lo + x[m * self.g + j] * (hi - lo) for j in range(self.g)] for m in range(self.k)]
        densities = None
        if self.uses_density:
            dlo, dhi = self.c.density_range
            densities = [[dlo + x[n + m * self.g + j] * (dhi - dlo) for j in range(self.g)] for m in range(self.k)]
        methods = self.c.methods
        method = methods[min(int(x[self.method_gene] * len(methods)), len(methods) - 1)] if self.method_gene is not None \
            else methods[0]
        normalize = x[self.normalize_gene] >= 0.5 if self.normalize_gene is not None else bool(self.c.normalize)
        return Candidate(method, normalize, weights, densities)

    def recipe(self, cand: Candidate, base_ref: str | None, model_refs: list[str], tensor_names: list[str],
               n_layers: int) -> dict[str, Any]:
        """The recipe body (mergekit schema) of a candidate; ``tensor_names``/``n_layers``: the base's,
        for layer groups (each tensor's value is its group's, by a per-tensor filter)."""
        spec = get_method(cand.method)
        models = []
        for m, ref in enumerate(model_refs):
            params: dict[str, Any] = {"weight": self._value(cand.weights[m], tensor_names, n_layers)}
            if cand.densities is not None and "density" in spec.model_params.model_fields:
                params["density"] = self._value(cand.densities[m], tensor_names, n_layers)
            models.append({"model": ref, "parameters": params})
        body: dict[str, Any] = {"merge_method": cand.method}
        if spec.base != "ignored" and base_ref is not None:
            body["base_model"] = base_ref
        body["models"] = models
        if "normalize" in spec.params.model_fields:
            body["parameters"] = {"normalize": cand.normalize}
        body["dtype"] = "float32"
        body["seed"] = self.c.seed
        return body

    def _value(self, per_group: list[float], names: list[str], n_layers: int) -> Any:
        """One number (one group), or per-tensor filter entries, longest names first so that the
        first substring match (the schema's rule) is always the tensor's own entry; tensors outside
        the layers take the first group's value (mergekit's rule for embeddings and heads)."""
        if len(per_group) == 1:
            return per_group[0]
        entries = []
        for name in sorted(names, key=lambda n: (-len(n), n)):
            split = split_layer(name)
            group = 0 if split is None or n_layers == 0 else min(len(per_group) - 1, split[1] * len(per_group) // n_layers)
            entries.append({"filter": name, "value": per_group[group]})
        entries.append({"value": per_group[0]})
        return entries
