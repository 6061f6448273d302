"""The planner: recipe + checkpoint headers -> one job per output tensor.

Everything that can be wrong with a merge (recipe, parameters, missing tensors,
shape mismatches, layer ranges) is found here, before a single tensor is read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloykit.config import InputModel, Recipe, Slice, parse_recipe
from alloykit.errors import CheckpointError, PlanError, RecipeError, did_you_mean
from alloykit.io import hub
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.gguf import GGUFCheckpoint, open_gguf
from alloykit.io.lora import LoraCheckpoint, adapter_base, is_adapter
from alloykit.methods.registry import MethodSpec, get_method
from alloykit.plan.layout import DEFAULT, ModuleLayout, get_key, model_modules, owner
from alloykit.plan.params import ParamResolver, check_names
from alloykit.plan.steps import plan_steps
from alloykit.roles import TensorRole, num_layers, role_of
from alloykit.vocab.plan import plan_chat_template, plan_vocab, rows_may_differ

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_seed(seed: int, name: str) -> int:
    """Seed of one tensor's generator: depends on (seed, name) only, not on execution order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Source:
    model: int  # index into Plan.checkpoints
    tensor: str


@dataclass
class TensorJob:
    """One output tensor: where its inputs come from and how they combine."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    sources: list[Source]  # the non-base inputs, in recipe order
    base: Source | None
    params: Any = None
    model_params: list[Any] = field(default_factory=list)
    copy: bool = False  # non-float tensors (and passthrough) are copied from sources[0]
    #: data-dependent methods: each input's statistics of this tensor (aligned with sources),
    #: or None where the statistics cover no such tensor
    stats: list[Source] | None = None
    #: what the tensor is (embedding, attention projection, norm, ...; ``alloykit.roles``)
    role: TensorRole | None = None
    #: tokenizer merges: the job's token-indexed inputs are row-gathered to the output
    #: vocabulary before merging (an ``alloykit.vocab.remap.RowRemap``), else None
    vocab: Any = None

    @property
    def out_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class Plan:
    recipe: Recipe
    method: MethodSpec
    checkpoints: list[Any]  # Checkpoint or StateDictCheckpoint
    labels: list[str]
    jobs: list[TensorJob]
    seed: int
    config_source: int | None  # checkpoint whose config.json / tokenizer are copied
    tokenizer_source: int | None
    num_layers_out: int | None = None
    #: data-dependent methods: one summary norm per input's statistics (Fisher normalisation)
    stats_norms: list[float] | None = None
    #: the output vocabulary when the recipe names a tokenizer source (``alloykit.vocab.build.VocabPlan``)
    vocab: Any = None
    #: the chat template to write (Jinja text resolved from the recipe's chat_template), or None
    chat_template: str | None = None
    #: config.json keys (dotted for nested configs) to set in the output, e.g. a module's layer
    #: count after ``modules:`` slices ({'vision_config.depth': 12})
    config_updates: dict[str, Any] = field(default_factory=dict)

    @property
    def out_bytes(self) -> int:
        return sum(j.out_bytes for j in self.jobs)

    @property
    def in_bytes(self) -> int:
        total = 0
        for j in self.jobs:
            for s in j.sources + ([j.base] if j.base else []):
                total += self.checkpoints[s.model].info(s.tensor).nbytes
        return total

    def close(self) -> None:
        for c in self.checkpoints:
            c.close()


class _Models:
    """Opens each referenced model once (headers only)."""

    def __init__(self, recipe_dir: Path | None, allow_pickle: bool, preloaded: dict[str, Any] | None = None):
        self.recipe_dir = recipe_dir
        self.allow_pickle = allow_pickle
        self.checkpoints: list[Any] = []
        self.labels: list[str] = []
        self._by_ref: dict[str, int] = {}
        for ref, ck in (preloaded or {}).items():
            self.add(ref, ck)

    def add(self, ref: str, ck: Any) -> int:
        self.checkpoints.append(ck)
        self.labels.append(ref)
        self._by_ref[ref] = len(self.checkpoints) - 1
        return self._by_ref[ref]

    def resolve_path(self, ref: str) -> Path:
        """A local path (from the working directory, then the recipe's folder) or, failing that,
        a Hub name (``org/name[@revision]``) resolved to its snapshot in the Hub cache."""
        return hub.locate(ref, self.recipe_dir, allow_pickle=self.allow_pickle)

    def get(self, ref: str) -> int:
        if ref in self._by_ref:
            return self._by_ref[ref]
        path = self.resolve_path(ref)
        if "+" in ref and not path.exists():  # mergekit's 'base+adapter'
            base_ref, _, adapter_ref = ref.rpartition("+")
            return self.add(ref, self._lora(ref, self.resolve_path(base_ref), self.resolve_path(adapter_ref)))
        if is_adapter(path) and not any(path.glob("model*.safetensors")):  # an adapter folder naming its base
            base_ref = adapter_base(path)
            if not base_ref or not self.resolve_path(base_ref).exists():
                raise RecipeError(
                    f"model '{ref}' is a LoRA adapter whose base ({base_ref!r}) is neither a local folder nor a Hub name; "
                    "name it as 'BASE+ADAPTER'"
                )
            return self.add(ref, self._lora(ref, self.resolve_path(base_ref), path))
        return self.add(ref, self._open(path, ref))

    def _open(self, path: Path, label: str):
        # a .gguf file (or a folder holding one) is dequantized on read; anything else is a HF checkpoint
        return open_gguf(path, label) or Checkpoint(path, allow_pickle=self.allow_pickle, label=label)

    def check_distinct(self, indices: list[int]) -> None:
        """Refuse one model folder named twice under different spellings (``m``, ``m/``,
        ``./m``, a symlink): it would be merged twice, or be both the base and an input."""
        seen: dict[frozenset[str], int] = {}
        for i in indices:
            ck = self.checkpoints[i]
            if type(ck) not in (Checkpoint, GGUFCheckpoint):  # in-memory state dicts and LoRA folds have no single file set
                continue
            key = frozenset(os.path.realpath(f) for f in ck.files)
            if key in seen and seen[key] != i:
                raise RecipeError(
                    f"models '{self.labels[seen[key]]}' and '{self.labels[i]}' are the same files; "
                    "list the model once, spelled the same way everywhere (base_model included)"
                )
            seen[key] = i

    def _lora(self, ref: str, base: Path, adapter: Path):
        if not is_adapter(adapter):
            raise RecipeError(f"model '{ref}': '{adapter}' is not a PEFT adapter folder (no adapter_config.json)")
        return LoraCheckpoint(self._open(base, str(base)), adapter, ref)


@dataclass(frozen=True)
class _Part:
    """The tensors one models/slices section plans: all of them, or one module's (``modules:``)."""

    module: ModuleLayout
    layouts: tuple[ModuleLayout, ...]
    #: the module's parameters, between the slices' and the top level's in precedence
    params: dict | None = None
    #: prefix of error messages' locations, e.g. 'modules.vision_tower.'
    where: str = ""

    def names(self, ck) -> list[str]:
        return [n for n in ck.tensors if owner(self.layouts, n) is self.module]

    def num_layers(self, ck) -> int:
        if self.module is DEFAULT[0]:
            return num_layers(ck.config(), ck.tensors)
        cfg = ck.config() or {}
        for key in self.module.count_keys:
            if isinstance(value := get_key(cfg, key), int) and not isinstance(value, bool):
                return value
        idx = [lo[1] for n in self.names(ck) if (lo := self.module.layer_of(n))]
        return max(idx) + 1 if idx else 0


_WHOLE = _Part(DEFAULT[0], DEFAULT)


def _t(layer: int, n: int) -> float:
    return layer / (n - 1) if n > 1 else 1.0


def _out_dtype(recipe: Recipe, in_dtype: torch.dtype) -> torch.dtype:
    if not in_dtype.is_floating_point:
        return in_dtype
    name = recipe.out_dtype or recipe.dtype
    return TORCH_DTYPES[name] if name else in_dtype


class PlanBuilder:
    """A plan under construction: what planning steps (``alloykit.plan.steps``) work with.

    Public: ``recipe``, ``spec`` (the method), ``jobs``, ``preloaded_stats``, ``stats_norms``
    (a step may set it), ``labels``, ``checkpoint(i)``, ``resolve_path(ref)``,
    ``add_checkpoint(label, ck)`` and ``merged_jobs()``. The rest is the planner's own.
    """

    def __init__(self, recipe: Recipe, spec: MethodSpec, models: _Models, preloaded_stats: dict[str, Any] | None = None):
        self.recipe = recipe
        self.spec = spec
        self.models = models
        self.resolver = ParamResolver(spec)
        self.jobs: list[TensorJob] = []
        self.names: set[str] = set()
        #: ``stats:`` references -> statistics already open (in-memory merges)
        self.preloaded_stats: dict[str, Any] = preloaded_stats or {}
        #: one summary number per input's statistics (Fisher normalisation), set by the statistics step
        self.stats_norms: list[float] | None = None
        self._config: dict | None = None
        self._config_read = False
        #: a tokenizer source is named: embeddings and heads may differ in their number of rows
        self.remap_vocab = recipe.tokenizer_source_resolved is not None

    # -- the public API of planning steps ---------------------------------------------
    @property
    def labels(self) -> list[str]:
        """Each opened input's reference, by model index (a ``Source.model``)."""
        return self.models.labels

    def checkpoint(self, index: int) -> Any:
        """The opened input with model index ``index`` (headers read, tensors on demand)."""
        return self.models.checkpoints[index]

    def resolve_path(self, ref: str) -> Path:
        """A path named in the recipe: from the working directory, else from the recipe's folder."""
        return self.models.resolve_path(ref)

    def add_checkpoint(self, label: str, ck: Any) -> int:
        """Open one more input (e.g. statistics) under ``label``; returns its model index, for ``Source``."""
        return self.models.add(label, ck)

    def merged_jobs(self) -> list[TensorJob]:
        """The jobs the method computes (copies of integer buffers excluded)."""
        return [j for j in self.jobs if not j.copy]

    # -- the planner's own ---------------------------------------------------------
    def role(self, name: str, ref_idx: int) -> TensorRole:
        """Role of output tensor ``name``, read with the reference model's config.json (tied heads)."""
        if not self._config_read:  # one config for the plan: the models share an architecture
            self._config, self._config_read = self.models.checkpoints[ref_idx].config(), True
        return role_of(name, self._config)

    def split_base(self, refs: list[str], base_ref: str | None) -> tuple[list[int], int | None]:
        """Model indices of the non-base inputs, and the base (per the method's policy)."""
        spec = self.spec
        if spec.base == "required" and base_ref is None:
            raise RecipeError(f"method {spec.name} needs a 'base_model' (the model the others were fine-tuned from)")
        base = self.models.get(base_ref) if base_ref is not None and spec.base != "ignored" else None
        inputs = [self.models.get(r) for r in refs if not (base is not None and r == base_ref)]
        self.models.check_distinct(inputs + ([base] if base is not None else []))
        n = len(inputs)
        if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
            want = (
                f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                else f"at least {spec.min_models}" if spec.max_models is None
                else f"{spec.min_models} to {spec.max_models}"
            )
            raise RecipeError(f"method {spec.name} takes {want} model(s) besides the base; the recipe gives {n}")
        return inputs, base

    def copy(self, name: str, model: int) -> None:
        """One tensor copied unchanged from one model (a module the recipe does not merge)."""
        if name in self.names:
            raise PlanError(f"output tensor '{name}' would be written twice")
        self.names.add(name)
        info = self.models.checkpoints[model].info(name)
        self.jobs.append(TensorJob(name, info.shape, _out_dtype(self.recipe, info.dtype), [Source(model, name)], None,
                                   copy=True, role=self.role(name, model)))

    def add(
        self,
        out_name: str,
        in_names: dict[int, str],
        inputs: list[int],
        base: int | None,
        model_levels: list[list[dict | None]],
        shared_levels: list[dict | None],
        t: float,
    ) -> None:
        """One job; ``in_names`` maps each model index to the tensor it contributes."""
        if out_name in self.names:
            raise PlanError(f"output tensor '{out_name}' would be written twice; check the slices' layer ranges")
        self.names.add(out_name)
        ref_idx = base if base is not None else inputs[0]
        ref_ck = self.models.checkpoints[ref_idx]
        ref = ref_ck.info(in_names[ref_idx])
        if not ref.is_float:
            for idx in inputs + ([base] if base is not None else []):  # an integer copy must not hide a float input
                ck = self.models.checkpoints[idx]
                if in_names[idx] in ck and ck.info(in_names[idx]).is_float:
                    raise PlanError(f"tensor '{in_names[idx]}': model '{ck.label}' stores {ck.info(in_names[idx]).dtype}, "
                                    f"'{ref_ck.label}' stores {ref.dtype}; the models must share an architecture")
            # integer buffers (e.g. BERT's position_ids, which newer transformers no longer
            # save) are copied from the reference model, never merged: other inputs may lack them
            self.jobs.append(TensorJob(out_name, ref.shape, ref.dtype, [Source(ref_idx, ref.name)], None, copy=True,
                                       role=self.role(out_name, ref_idx)))
            return
        for idx in inputs + ([base] if base is not None else []):
            ck = self.models.checkpoints[idx]
            name = in_names[idx]
            if name not in ck:
                raise PlanError(
                    f"tensor '{name}' is missing from model '{ck.label}' but present in '{ref_ck.label}'; "
                    "the models must share an architecture"
                )
            info = ck.info(name)
            if info.shape != ref.shape and not (self.remap_vocab and rows_may_differ(ck, ref_ck, name, in_names[ref_idx])):
                raise PlanError(
                    f"tensor '{name}': model '{ck.label}' has shape {list(info.shape)} but '{ref_ck.label}' "
                    f"has {list(ref.shape)}; the models must share an architecture"
                    + (" (vocabularies differ: set tokenizer_source: union, base or a model to remap the rows)"
                       if rows_may_differ(ck, ref_ck, name, in_names[ref_idx]) else "")
                )
            if info.is_float != ref.is_float:
                raise PlanError(f"tensor '{name}': model '{ck.label}' stores {info.dtype}, '{ref_ck.label}' stores {ref.dtype}")
        job = TensorJob(
            out_name, ref.shape, _out_dtype(self.recipe, ref.dtype),
            [Source(i, in_names[i]) for i in inputs],
            Source(base, in_names[base]) if base is not None else None,
            role=self.role(out_name, ref_idx),
        )
        job.params, job.model_params = self.resolver.job(
            shared_levels, out_name, model_levels, [in_names[i] for i in inputs], t, [self.models.labels[i] for i in inputs])
        self.jobs.append(job)


def make_plan(
    recipe: Any,
    *,
    recipe_dir: str | Path | None = None,
    allow_pickle: bool = False,
    seed: int | None = None,
    preloaded: dict[str, Any] | None = None,
    preloaded_stats: dict[str, Any] | None = None,
    method: MethodSpec | None = None,
) -> Plan:
    """Validate ``recipe`` against the inputs' headers and emit every tensor job.

    ``preloaded`` maps model references to already-open checkpoints (in-memory
    state dicts); every other reference is opened from disk, headers only.
    ``preloaded_stats`` likewise maps ``stats:`` references to open statistics.
    ``method``: plan with this method declaration instead of the registered one named by
    the recipe (the contract suite runs methods that are not registered through the engine).
    """
    recipe = parse_recipe(recipe)
    spec = method if method is not None else get_method(recipe.merge_method)
    models = _Models(Path(recipe_dir) if recipe_dir else None, allow_pickle, preloaded)
    check_names(spec, "recipe 'parameters'", recipe.parameters, "shared")
    b = PlanBuilder(recipe, spec, models, preloaded_stats)
    try:
        num_layers_out, config_updates = None, {}
        if recipe.models is not None:
            _plan_models(recipe, spec, b, recipe.models)
        elif spec.needs_stats:
            raise RecipeError(f"method {spec.name} reads each model's statistics: write the recipe with 'models' "
                              "(each with 'stats: FOLDER'), not 'slices' or 'modules'")
        elif recipe.slices is not None:
            num_layers_out = _plan_slices(recipe, spec, b, recipe.slices)
        else:
            config_updates = _plan_modules(recipe, spec, b)
        if not b.jobs:
            raise PlanError("the merge would produce no tensors")
        for step in plan_steps():  # features that complete the plan (statistics: alloykit.stats.attach)
            if step.applies(spec):
                step.function()(b)
        tok = recipe.tokenizer_source_resolved
        cfg_src = models.get(recipe.base_model) if recipe.base_model else b.jobs[0].sources[0].model
        tok_src = cfg_src if tok in (None, "base", "union") else models.get(tok)
        vocab = plan_vocab(recipe, b.jobs, models.checkpoints, models.labels, cfg_src, models.get) if tok else None
        chat = plan_chat_template(recipe, models.checkpoints, models.labels, models.get)
    except BaseException:
        for c in models.checkpoints:
            c.close()
        raise
    final_seed = seed if seed is not None else (recipe.seed if recipe.seed is not None else 0)
    return Plan(recipe, spec, models.checkpoints, models.labels, b.jobs, final_seed, cfg_src, tok_src, num_layers_out,
                b.stats_norms, vocab, chat, config_updates)


def _plan_models(recipe: Recipe, spec: MethodSpec, b: PlanBuilder, models: list[InputModel],
                 part: _Part = _WHOLE) -> None:
    for m in models:
        check_names(spec, f"model '{m.model}'", m.parameters, "model")
    refs = [m.model for m in models]
    base_ref = recipe.base_model
    if spec.base == "ignored" and base_ref is not None and base_ref not in refs:
        # mergekit merges a base_model that is not listed as one more input, last, of a
        # method that has no base (linear's average includes it); so does alloykit
        _check_joined_base(spec, base_ref, len(refs), recipe.parameters)
        refs.append(base_ref)
    inputs, base = b.split_base(refs, base_ref)
    params_of = {m.model: m.parameters for m in models}
    model_levels = [[params_of.get(b.models.labels[i]), part.params, recipe.parameters] for i in inputs]
    ref = b.models.checkpoints[base if base is not None else inputs[0]]
    n = part.num_layers(ref)
    for name in part.names(ref):
        lo = part.module.layer_of(name)
        t = _t(lo[1], n) if lo else 0.0
        all_idx = inputs + ([base] if base is not None else [])
        b.add(name, dict.fromkeys(all_idx, name), inputs, base, model_levels, [part.params, recipe.parameters], t)


def _check_joined_base(spec: MethodSpec, base_ref: str, n_listed: int, shared: dict | None) -> None:
    if spec.max_models is not None and n_listed + 1 > spec.max_models:
        raise RecipeError(
            f"method {spec.name} has no base model and takes at most {spec.max_models} model(s): "
            f"base_model '{base_ref}' would be merged as one more input (as mergekit does); remove base_model"
        )
    for key, (scope, info) in spec.param_fields().items():
        if scope == "per-model" and info.is_required() and not (shared and key in shared):
            raise RecipeError(
                f"method {spec.name} has no base model, so base_model '{base_ref}' is merged as one more input "
                f"(as mergekit does) and needs '{key}': list it under 'models' with its parameters, give a "
                f"top-level '{key}', or remove base_model"
            )


def _plan_slices(recipe: Recipe, spec: MethodSpec, b: PlanBuilder, slices: list[Slice], part: _Part = _WHOLE) -> int:
    out_layer = 0
    first_inputs = last_inputs = None
    layer_jobs: list[tuple] = []
    for si, sl in enumerate(slices):
        where = f"{part.where}slices[{si}]"
        check_names(spec, where, sl.parameters, "shared")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1:
            raise RecipeError(f"{where}: every source must span the same number of layers; got layer_ranges {[list(s.layer_range) for s in sl.sources]}")
        for s in sl.sources:
            check_names(spec, f"{where} model '{s.model}'", s.parameters, "model")
            n = part.num_layers(b.models.checkpoints[b.models.get(s.model)])
            if s.layer_range[1] > n:
                raise RecipeError(
                    f"{where}: layer_range {list(s.layer_range)} of model '{s.model}' is outside its {n} layers (valid: 0 to {n}, end exclusive)"
                )
        base_ref = sl.base_model or recipe.base_model
        refs = [s.model for s in sl.sources]
        if len(set(refs)) != len(refs):
            raise RecipeError(f"{where}: model '{refs[0]}' appears twice among the sources of one slice")
        inputs, base = b.split_base(refs, base_ref)
        by_idx = {b.models.get(s.model): s for s in sl.sources}
        first_inputs = first_inputs or (inputs, base, by_idx, sl)
        last_inputs = (inputs, base, by_idx, sl)
        length = lengths.pop()
        for off in range(length):
            layer_jobs.append((out_layer, off, length, inputs, base, by_idx, sl))
            out_layer += 1
    ref_ck = b.models.checkpoints[first_inputs[1] if first_inputs[1] is not None else first_inputs[0][0]]
    # outside the blocks: the head end (final norm, output and task heads) comes from the last
    # slice's models, everything else (embeddings, and tensors no role rule places) from the first
    config = ref_ck.config()
    non_layer = [n for n in part.names(ref_ck) if part.module.layer_of(n) is None]
    is_post = {n: role_of(n, config).section == "post" for n in non_layer}
    pre = [n for n in non_layer if not is_post[n]]
    post = [n for n in non_layer if is_post[n]]

    def levels(inputs, by_idx, sl):
        return [[by_idx[i].parameters if i in by_idx else None, sl.parameters, part.params, recipe.parameters] for i in inputs]

    for group, (inputs, base, by_idx, sl) in ((pre, first_inputs), (post, last_inputs)):
        all_idx = inputs + ([base] if base is not None else [])
        for name in group:
            b.add(name, dict.fromkeys(all_idx, name), inputs, base, levels(inputs, by_idx, sl),
                  [sl.parameters, part.params, recipe.parameters], 0.0)
    for out_idx, off, length, inputs, base, by_idx, sl in layer_jobs:
        lead = inputs[0]
        ck = b.models.checkpoints[lead]
        lead_layer = by_idx[lead].layer_range[0] + off
        layer_names = [n for n in part.names(ck) if (lo := part.module.layer_of(n)) and lo[1] == lead_layer]
        if not layer_names:
            raise CheckpointError(f"model '{ck.label}' has no tensors for layer {lead_layer}")
        all_idx = inputs + ([base] if base is not None else [])
        for name in layer_names:
            prefix, _, rest = part.module.layer_of(name)
            # each source reads its own layer (its layer_range start + offset); a base that is
            # not among the slice's sources reads the lead source's layer
            in_names = {i: f"{prefix}{(by_idx[i].layer_range[0] if i in by_idx else by_idx[lead].layer_range[0]) + off}.{rest}" for i in all_idx}
            b.add(f"{prefix}{out_idx}.{rest}", in_names, inputs, base, levels(inputs, by_idx, sl),
                  [sl.parameters, part.params, recipe.parameters], _t(off, length))
    return out_layer


def _plan_modules(recipe: Recipe, spec: MethodSpec, b: PlanBuilder) -> dict[str, int]:
    """Each listed module planned as its own models/slices recipe; the tensors of modules the
    recipe does not list are copied from base_model. Returns the config keys of layer counts
    that slices changed."""
    assert recipe.modules is not None
    first = next(iter(recipe.modules.values()))
    ref_name = recipe.base_model or (first.models[0].model if first.models else first.slices[0].sources[0].model)
    ref = b.models.checkpoints[b.models.get(ref_name)]
    layouts = model_modules(ref.config())
    known = [m.name for m in layouts]
    arch = ((ref.config() or {}).get("architectures") or ["a single-part model"])[0]
    for name in recipe.modules:
        if name not in known:
            raise RecipeError(f"modules: '{name}' is not a module of {arch} (model '{ref_name}'){did_you_mean(name, known)}; "
                              f"its modules: {', '.join(known)}")
    updates: dict[str, int] = {}
    for name, module in recipe.modules.items():
        part = _Part(next(m for m in layouts if m.name == name), layouts, module.parameters, f"modules.{name}.")
        check_names(spec, f"modules.{name} 'parameters'", module.parameters, "shared")
        if module.models is not None:
            _plan_models(recipe, spec, b, module.models, part)
        else:
            count = _plan_slices(recipe, spec, b, module.slices, part)
            updates.update(dict.fromkeys(part.module.count_keys, count))
    rest = [n for n in ref.tensors if (o := owner(layouts, n)) is None or o.name not in recipe.modules]
    if rest and recipe.base_model is None:
        unlisted = [m.name for m in layouts if m.name not in recipe.modules and any(m.owns(n) for n in rest)]
        what = f"module(s) {', '.join(unlisted)}" if unlisted else f"tensor '{rest[0]}' (in no module)"
        raise RecipeError(f"modules: the recipe does not merge {what}; list every module ({', '.join(known)}) "
                          "or give a base_model to copy the others from")
    for n in rest:
        b.copy(n, b.models.get(recipe.base_model))
    return updates
