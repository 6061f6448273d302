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

from alloykit.config import Conditional
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

    def __init__(self, spec: MethodSpec):
        self.spec = spec
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
            e = err.errors()[0]
            key = e["loc"][0] if e["loc"] else "?"
            if e["type"] == "missing":
                raise RecipeError(
                    f"{who}: method {self.spec.name} needs parameter '{key}' (tensor '{tensor_name}'); "
                    f"set it under the model's 'parameters' or the top-level 'parameters'"
                ) from None
            raise RecipeError(
                f"{who}: parameter '{key}' = {e.get('input')!r} for tensor '{tensor_name}': {e['msg']}"
            ) from None
        self._cache[cache_key] = obj
        return obj

    def shared(self, levels: list[dict | None], tensor_name: str, t: float):
        return self._resolve(self.spec.params, levels, tensor_name, t, "recipe parameters")

    def per_model(self, levels: list[dict | None], tensor_name: str, t: float, model_label: str):
        return self._resolve(self.spec.model_params, levels, tensor_name, t, f"model '{model_label}'")
