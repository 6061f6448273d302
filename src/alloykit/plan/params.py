"""Resolve a recipe's parameter settings for one tensor.

Precedence (mergekit's): slice source / model > slice > top-level ``parameters`` >
the method's default. A setting is a scalar, a gradient (a list of numbers
interpolated across the layers of the slice at position ``t`` in [0, 1]; booleans and
strings pick the nearest lower entry), or ``{filter, value}`` entries matched
against the tensor name by substring, first match wins (no match: the next level).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from alloykit.config import Conditional, explain
from alloykit.errors import RecipeError, did_you_mean
from alloykit.methods.registry import MethodSpec

_MISSING = object()


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """One setting for one tensor; ``_MISSING`` when no filter matches."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return _MISSING
        if all(isinstance(e, Conditional) for e in setting):
            for cond in setting:
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return evaluate(cond.value, tensor_name, t)
            return _MISSING
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def check_names(spec: MethodSpec, where: str, params: dict | None, scope: str) -> None:
    """Fail on unknown parameter names and on names given at the wrong level."""
    if not params:
        return
    fields = spec.param_fields()
    for key in params:
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise RecipeError(
                f"{where}: unknown parameter '{key}' for method {spec.name}{did_you_mean(key, fields)}; "
                f"allowed: {allowed}"
            )
        if scope == "model" and fields[key][0] == "shared":
            raise RecipeError(
                f"{where}: '{key}' is a shared parameter of {spec.name}, not a per-model one; "
                "move it to the top-level 'parameters'"
            )


class ParamResolver:
    """Builds validated parameter objects for each tensor, caching identical ones."""

    def __init__(self, spec: MethodSpec, where_to_set: str = "the model's 'parameters' or the top-level 'parameters'"):
        self.spec = spec
        #: where a user sets a missing parameter (a recipe's keys, or merge-lora's options)
        self.where_to_set = where_to_set
        self._cache: dict[tuple, Any] = {}

    def _resolve(self, model_cls, levels: list[dict | None], tensor_name: str, t: float, who: str):
        values: dict[str, Any] = {}
        for fname, info in model_cls.model_fields.items():
            key = info.alias or fname
            for level in levels:
                if level and key in level:
                    v = evaluate(level[key], tensor_name, t)
                    if v is not _MISSING:
                        values[key] = v
                        break
        cache_key = (model_cls, tuple(sorted((k, repr(v)) for k, v in values.items())))
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        try:
            obj = model_cls.model_validate(values)
        except ValidationError as err:
            problem = explain(err)
            if problem.kind == "missing":
                raise RecipeError(
                    f"{who}: method {self.spec.name} needs parameter '{problem.key}' (tensor '{tensor_name}'); "
                    f"set it under {self.where_to_set}"
                ) from None
            raise RecipeError(
                f"{who}: parameter '{problem.key}' = {problem.value!r} for tensor '{tensor_name}': {problem.message}"
            ) from None
        self._cache[cache_key] = obj
        return obj

    def shared(self, levels: list[dict | None], tensor_name: str, t: float):
        return self._resolve(self.spec.params, levels, tensor_name, t, "recipe parameters")

    def per_model(self, levels: list[dict | None], tensor_name: str, t: float, model_label: str):
        return self._resolve(self.spec.model_params, levels, tensor_name, t, f"model '{model_label}'")

    def job(self, shared_levels: list[dict | None], out_name: str, model_levels: list[list[dict | None]],
            in_names: list[str], t: float, labels: list[str]) -> tuple[Any, list[Any]]:
        """One tensor's shared and per-model parameters, checked by the method's plan-time ``check``.

        Shared settings match the output tensor's name; each model's filters match that
        model's own tensor name (its layer index in a slice), as in mergekit."""
        shared = self.shared(shared_levels, out_name, t)
        per = [self.per_model(levels, name, t, label) for levels, name, label in zip(model_levels, in_names, labels)]
        if self.spec.check is not None:
            msg = self.spec.check(shared, per)
            if msg:
                raise RecipeError(f"method {self.spec.name}, tensor '{out_name}': {msg}")
        return shared, per
