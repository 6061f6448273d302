"""Recipes: mergekit's YAML schema, validated strictly.

A mergekit recipe runs unchanged. Unlike mergekit, an unknown key (a typo such as
``desnity``) or a value of the wrong type is an error that names the key, the
allowed set and the closest match, instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alloykit.errors import AlloyError, RecipeError, did_you_mean

Scalar = Union[bool, int, float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Conditional(_Strict):
    """``{filter: self_attn, value: 0.5}``: applies to tensors whose name contains ``filter``."""

    filter: str | None = None
    value: Union[Scalar, list[Scalar]]


#: a parameter value: a scalar, a gradient (list of numbers interpolated over layers),
#: or filtered values (first match wins)
ParamSetting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]
ParamDict = dict[str, ParamSetting]


class InputModel(_Strict):
    model: str
    parameters: ParamDict | None = None
    #: alloykit extension: the model's statistics folder (``alloykit stats collect``), read by
    #: data-dependent methods (fisher, regmean); ignored by the others
    stats: str | None = None
    #: alloykit extension, documentation only: the calibration data the statistics came from
    calibration: str | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: ParamDict | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    parameters: ParamDict | None = None
    base_model: str | None = None


class TokenizerConfig(_Strict):
    source: str = "base"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


class Recipe(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    parameters: ParamDict | None = None
    #: output dtype unless out_dtype is given. alloykit always computes in float32 and rounds once;
    #: mergekit also rounds the inputs to this dtype and computes in it (a few ulps apart in half dtypes)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None
    #: alloykit extension: the seed of randomized methods (the CLI's --seed overrides it)
    seed: int | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = _DTYPE_ALIASES.get(v, v)
        if v not in DTYPES:
            raise ValueError(f"dtype '{v}' is not one of {', '.join(DTYPES)}{did_you_mean(v, DTYPES)}")
        return v

    @model_validator(mode="after")
    def _one_layout(self) -> "Recipe":
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty: list at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty: list at least one slice")
        if self.models:
            seen: set[str] = set()
            for m in self.models:
                if m.model in seen:
                    raise ValueError(
                        f"model '{m.model}' is listed twice in 'models'; list it once "
                        "(give it a larger weight to count it more)"
                    )
                seen.add(m.model)
        return self

    @property
    def tokenizer_source_resolved(self) -> str | None:
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, by_alias=True), sort_keys=False)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "bool", "int", "float", "Conditional", "list[Conditional]", "list[union[bool,int,float,str]]"):
            continue  # union branch names add noise, not location
        else:
            out += ("." if out else "") + str(part)
    return out or "recipe"


def _allowed_keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping that holds the unknown key at ``loc``."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = str(field.annotation)
        for cand in (InputModel, SliceSource, Slice, TokenizerConfig, Conditional):
            if cand.__name__ in ann:
                model = cand
                break
    return list(model.model_fields)


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    for e in err.errors():  # prefer the most specific message: unknown keys first
        if e["type"] == "extra_forbidden":
            first = e
            break
    loc = tuple(first["loc"])
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys_at(loc)
        return (
            f"recipe: unknown key '{_loc(loc)}'{did_you_mean(key, allowed)}; "
            f"allowed here: {', '.join(allowed)}"
        )
    if first["type"] == "missing":
        return f"recipe: missing required key '{_loc(loc)}'"
    msg = first["msg"].removeprefix("Value error, ")
    where = _loc(loc)
    got = first.get("input")
    if where == "recipe":
        return f"recipe: {msg}"
    if isinstance(got, dict):
        return f"recipe: '{where}': {msg}"
    return f"recipe: '{where}' = {_short_repr(got)}: {msg}"


def _short_repr(value: Any) -> str:
    """A bounded repr for messages: a hostile value must not become a megabyte-long line."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 6, 6, 60, 60
    return r.repr(value)


#: values (scalars, lists, mappings) a recipe may hold once YAML aliases are expanded;
#: real recipes hold hundreds, an alias bomb ("billion laughs") billions
MAX_RECIPE_NODES = 20_000


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that also refuses a key given twice in one mapping (YAML keeps the
    last silently, so a second ``models:`` would quietly replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # '<<' merge keys may be overridden; non-scalar keys fail in the base class
            key = self.construct_scalar(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{str(key)[:60]}' appears twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_size(data: Any, what: str = "recipe", error: type[AlloyError] = RecipeError) -> None:
    """Refuse documents that expand past MAX_RECIPE_NODES (counted without expanding them)."""
    stack, count = [data], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_RECIPE_NODES:
            raise error(
                f"{what} holds more than {MAX_RECIPE_NODES} values once YAML aliases (*name) are expanded; "
                "write it out without nested or recursive aliases"
            )
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_recipe(data: Any) -> Recipe:
    """Validate a recipe given as a dict (or a Recipe, returned as is)."""
    if isinstance(data, Recipe):
        return data
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: expected a mapping of keys (merge_method, models...), got {type(data).__name__}")
    _check_size(data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err)) from None


def load_yaml(path: str | Path, *, what: str = "recipe file", error: type[AlloyError] = RecipeError) -> Any:
    """Read one YAML document with the recipe's guards: safe tags only, no key twice in a mapping,
    no alias bomb. Errors name ``what`` and the file, and are raised as ``error``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{what} '{path}' cannot be read: {err}") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{what} '{path}': invalid YAML{where}: {problem}") from None
    _check_size(data, f"{what} '{path}'", error)
    return data


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe (``yaml.safe_load``: tags that build objects are refused)."""
    return parse_recipe(load_yaml(path))
