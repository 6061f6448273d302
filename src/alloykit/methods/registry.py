"""The one registry of merge methods.

A method is a pure per-tensor function ``fn(x: MergeInput) -> Tensor`` plus a typed
declaration of its parameters. The declaration (two pydantic models, ``extra="forbid"``)
is the single source for recipe validation, ``alloykit methods NAME`` and the docs.

Methods register themselves where they are defined::

    @register("linear", params=LinearParams, model_params=WeightParams, base="ignored")
    def linear(x: MergeInput) -> torch.Tensor:
        '''Weighted average ...'''

Methods of other distributions (plugins) are found through the entry-point group
``alloykit.methods``: each entry point names a module or an object whose import runs
its ``@register`` (or a ``MethodSpec``), and its name is the method's. They load the
first time a recipe names a method alloykit does not define, or when every method is
listed (docs/plugins.md has a worked example).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from alloykit.errors import RecipeError, did_you_mean
from alloykit.methods.stream import Streamed
from alloykit.roles import TensorRole, role_of

_log = logging.getLogger(__name__)

#: the entry-point group of plugin methods
ENTRY_POINT_GROUP = "alloykit.methods"

BasePolicy = Literal["required", "optional", "ignored"]
#: statistics a data-dependent method reads besides the weights (``alloykit stats collect``):
#: "fisher" (diagonal Fisher, the tensor's shape) or "gram" (inputs' Gram X^T X of a linear
#: weight, [in, in])
StatsKind = Literal["fisher", "gram"]


class Params(BaseModel):
    """Base class of every method's parameter declaration (shared or per model)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class NoParams(Params):
    """A method without parameters of this scope."""


@dataclass
class MergeInput:
    """What a method sees for one output tensor.

    ``tensors`` stacks the K non-base inputs along dim 0 (float32, on the compute
    device); ``base`` is the base model's tensor or None; ``params`` holds the shared
    parameters and ``model_params`` one entry per input, both already resolved for
    this tensor (filters and layer gradients applied) and validated. ``role`` says what
    the tensor is (``alloykit.roles``): a method that treats embeddings, heads or norms
    differently reads it, never the name.
    """

    name: str
    tensors: torch.Tensor
    base: torch.Tensor | None
    params: Any
    model_params: list[Any]
    generator: torch.Generator | None = None
    #: set by the executor, which never reads the stack again: ``deltas()`` may then reuse
    #: its memory (saving a [K, ...] float32 temporary on the largest tensors)
    owned: bool = False
    #: for methods with ``needs_stats``: the K models' statistics of this tensor, stacked
    #: [K, ...] float32 (Fisher: the tensor's shape; Gram: [K, in, in]), or None where the
    #: statistics hold none for it (a buffer, a tensor that is no linear weight)
    stats: torch.Tensor | None = None
    #: one scalar per model from its statistics' summary (the Fisher's global L2 norm over
    #: all tensors, for per-model normalisation), [K] float32, or None
    stats_norms: torch.Tensor | None = None
    #: side outputs of a method declared ``side_outputs`` (group -> this tensor's entry), see ``emit``
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the tensor's role, as the planner tagged it (from the name, when called directly)
    role: TensorRole | None = None
    #: the dtype mergekit would merge this tensor in (the recipe's ``dtype``, else the inputs'),
    #: or None when unknown. alloykit computes in float32 whatever it is; a method reads it only
    #: to follow mergekit where mergekit's result can be matched (which of several equal
    #: magnitudes a trim keeps: only in float32)
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.role is None:
            self.role = role_of(self.name)

    @property
    def k(self) -> int:
        return self.tensors.shape[0]

    def column(self, field_name: str) -> torch.Tensor:
        """Per-model parameter as a [K, 1, ..., 1] tensor that broadcasts over the stack."""
        values = [float(getattr(m, field_name)) for m in self.model_params]
        col = torch.tensor(values, dtype=self.tensors.dtype, device=self.tensors.device)
        return col.view(-1, *([1] * (self.tensors.dim() - 1)))

    def emit(self, group: str, tensor: torch.Tensor) -> None:
        """Record a side output of this tensor: stored in ``<output>/<method>/<group>.safetensors``
        under the tensor's name (only for methods registered with ``side_outputs=True``)."""
        self.side[group] = tensor

    def deltas(self) -> torch.Tensor:
        """Task vectors: each input minus the base (tau_i = theta_i - theta_0).

        Call it once; when the stack is ``owned`` the result reuses its memory.
        """
        if self.base is None:
            raise RecipeError(f"tensor {self.name}: this method needs a base_model")
        if self.owned:  # in place: ``tensors`` holds the task vectors from here on
            self.owned = False
            return self.tensors.sub_(self.base.unsqueeze(0))
        return self.tensors - self.base.unsqueeze(0)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[MergeInput], torch.Tensor]
    params: type[Params]
    model_params: type[Params]
    base: BasePolicy
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    #: rows are independent (output row r depends only on row r of each input, for every
    #: parameter value): the executor may merge a large tensor a block of rows at a time
    elementwise: bool = False
    #: the method also emits named side tensors (``MergeInput.emit``) that the writer stores
    #: beside the model, e.g. EMR's per-task masks; such a method must not be ``elementwise``
    side_outputs: bool = False
    #: if True, merging K copies of one tensor returns that tensor (checked by the suite)
    fixed_point: bool = True
    #: which peer implementation the numbers reproduce, e.g. "mergekit"
    reproduces: str = ""
    paper: str = ""
    #: statistics the method reads (MergeInput.stats); the planner attaches them from each
    #: model's ``stats:`` folder and fails at plan time when they are missing
    needs_stats: StatsKind | None = None
    #: where the statistics' inputs must come from (their summary's ``inputs``): "own" (each
    #: model's own forward pass) or "merged" (RegMean++: the merged model's earlier layers)
    stats_inputs: str | None = None
    #: plan-time check of one tensor's resolved parameters; returns an error message or None
    #: (e.g. "weights sum to 0" for a method that divides by their sum)
    check: Callable[[Any, list[Any]], str | None] | None = None
    #: the method's fast path, streamed over blocks of rows (``alloykit.methods.stream``); the
    #: function stays the specification it is tested against
    streamed: Streamed | None = None

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.strip().splitlines()[0] if doc else ""

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    def param_fields(self) -> dict[str, tuple[str, Any]]:
        """Recipe key -> (scope, pydantic FieldInfo) for every parameter."""
        out: dict[str, tuple[str, Any]] = {}
        for scope, model in (("shared", self.params), ("per-model", self.model_params)):
            for fname, info in model.model_fields.items():
                out[info.alias or fname] = (scope, info)
        return out


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    params: type[Params] = NoParams,
    model_params: type[Params] = NoParams,
    base: BasePolicy = "ignored",
    **kwargs: Any,
) -> Callable[[Callable[[MergeInput], torch.Tensor]], Callable[[MergeInput], torch.Tensor]]:
    """Decorator: register ``fn`` as merge method ``name``."""

    def deco(fn: Callable[[MergeInput], torch.Tensor]) -> Callable[[MergeInput], torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(
            name=name, fn=fn, params=params, model_params=model_params, base=base, **kwargs
        )
        return fn

    return deco


# The built-in families need no loading step: this module is inside ``alloykit.methods``, whose
# ``__init__`` imports every family (registering it) before anyone can import this module.

#: plugin entry points that failed to load: name -> why (their methods are reported, not registered)
_PLUGIN_ERRORS: dict[str, str] = {}
_plugins_loaded = False


def load_plugins(*, reload: bool = False) -> dict[str, str]:
    """Import every ``alloykit.methods`` entry point (once; ``reload`` looks again, e.g. after
    sys.path changed). A plugin that fails to import, or registers no method of its entry
    point's name, is logged and skipped: it cannot break the built-in methods. Returns the
    failures (entry point name -> reason)."""
    global _plugins_loaded
    if _plugins_loaded and not reload:
        return dict(_PLUGIN_ERRORS)
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", None) or "?"
        if ep.name in _REGISTRY:  # loaded before, or a built-in name (which a plugin cannot replace)
            if _REGISTRY[ep.name].fn.__module__.startswith("alloykit.methods.") and ep.name not in _PLUGIN_ERRORS:
                _PLUGIN_ERRORS[ep.name] = f"plugin '{ep.value}' (distribution {dist}) names built-in method '{ep.name}'; ignored"
                _log.warning(_PLUGIN_ERRORS[ep.name])
            continue
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin: report it, keep the rest
            _PLUGIN_ERRORS[ep.name] = f"plugin '{ep.value}' (distribution {dist}) failed to import: {type(err).__name__}: {err}"
            _log.warning(_PLUGIN_ERRORS[ep.name])
            continue
        if isinstance(obj, MethodSpec) and obj.name not in _REGISTRY:
            _REGISTRY[obj.name] = obj
        if ep.name not in _REGISTRY:
            _PLUGIN_ERRORS[ep.name] = (f"plugin '{ep.value}' (distribution {dist}) registered no method named "
                                       f"'{ep.name}'; name the entry point after its @register name")
            _log.warning(_PLUGIN_ERRORS[ep.name])
    return dict(_PLUGIN_ERRORS)


def get_method(name: str) -> MethodSpec:
    """The method ``name``: built in, else from a plugin (entry point group ``alloykit.methods``)."""
    if name not in _REGISTRY:
        load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in _PLUGIN_ERRORS:
            raise RecipeError(f"merge_method '{name}': {_PLUGIN_ERRORS[name]}") from None
        raise RecipeError(
            f"unknown merge_method '{name}'{did_you_mean(name, _REGISTRY)}; "
            f"run 'alloykit methods' to list the {len(_REGISTRY)} methods"
        ) from None


def all_methods() -> dict[str, MethodSpec]:
    """Every method: the built-in ones and those of installed plugins."""
    load_plugins()
    return dict(sorted(_REGISTRY.items()))
