"""Recipes: mergekit's YAML schema, validated strictly.

A mergekit recipe runs unchanged. Unlike mergekit, an unknown key (a typo such as
``desnity``) or a value of the wrong type is an error that names the key, the
allowed set and the closest match, instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args

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


class AlignStep(_Strict):
    """alloykit extension: permute an input's hidden units to match base_model before merging
    (``alloykit.align``); at top level it applies to every model, per model it overrides."""

    method: Literal["weight_matching", "activation_matching"] = "weight_matching"
    #: calibration text (.txt/.jsonl): activation matching and REPAIR read it
    data: str | None = None
    samples: int = Field(256, ge=1)
    max_iter: int = Field(100, ge=1)
    #: top level only: after merging, rescale the merged units to the inputs' statistics on ``data`` (REPAIR)
    repair: bool = False


class InputModel(_Strict):
    model: str
    parameters: ParamDict | None = None
    #: alloykit extension: align this model to base_model before merging (``false``: not this one)
    align: AlignStep | bool | None = None
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


class ZeroTokenSource(_Strict):
    """``source: {kind: zero}``: the token's row is zero."""

    kind: Literal["zero"]


class ModelTokenSource(_Strict):
    """``source: {kind: model_token, model: M, token: T}`` (or ``token_id``): the row of
    token T (or row ``token_id``) of model M, in M's own vocabulary."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _one_token(self) -> "ModelTokenSource":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class TokenSetting(_Strict):
    """One entry of ``tokenizer: tokens:`` (mergekit's per-token embedding settings).

    ``source``: a model (its row of this token), ``base`` (the base model's), ``{kind: zero}``
    or ``{kind: model_token, ...}``. ``force``: every model takes the source's row, also
    those that have the token (else only the models missing it do).
    """

    source: Union[ZeroTokenSource, ModelTokenSource, str, None] = None
    force: bool = False


class TokenizerConfig(_Strict):
    #: as in mergekit, a ``tokenizer:`` section without ``source`` builds the union
    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def dtype_name(v: str | None) -> str | None:
    """A dtype as recipes spell it (aliases such as bf16 accepted), validated; None stays None."""
    if v is None:
        return v
    v = _DTYPE_ALIASES.get(v, v)
    if v not in DTYPES:
        raise ValueError(f"dtype '{v}' is not one of {', '.join(DTYPES)}{did_you_mean(v, DTYPES)}")
    return v


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
    #: alloykit extension: align every model to base_model before merging (see AlignStep)
    align: AlignStep | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        return dtype_name(v)

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
        if self.wants_alignment:
            if self.models is None or self.base_model is None:
                raise ValueError("'align' aligns each of 'models' to 'base_model': give both (slices cannot be aligned)")
            if any(isinstance(m.align, AlignStep) and m.align.repair for m in self.models):
                raise ValueError("'repair' runs once on the merged model: set it in the top-level 'align', not per model")
            steps = [self.align] + [m.align for m in self.models if isinstance(m.align, AlignStep)]
            if any(st is not None and (st.method == "activation_matching" or st.repair) and not st.data for st in steps):
                raise ValueError("'align': activation_matching and repair read calibration text; add 'data: FILE.txt'")
        return self

    @property
    def wants_alignment(self) -> bool:
        """Does the recipe ask for its inputs to be aligned to base_model before merging?"""
        if self.align is not None:
            return True
        return any(isinstance(m.align, AlignStep) or m.align is True for m in self.models or [])

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
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation can hold (through Optional, list, dict, Union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _allowed_keys_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping that holds the unknown key at ``loc``."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        inner = _models_in(field.annotation)
        if inner:
            model = inner[0]
    return list(model.model_fields)


@dataclass
class Problem:
    """The first problem pydantic found, in the terms a one-line message needs."""

    kind: str  # "unknown" (a key not allowed), "missing" (a required key), "invalid" (a bad value)
    where: str  # the location, e.g. 'models[0].parameters' ('' at the top)
    key: str  # the last key of the location
    value: Any  # the value given ("invalid")
    message: str  # pydantic's message, without its "Value error, " prefix
    allowed: list[str]  # "unknown": the keys allowed there

    def line(self, subject: str, hints: dict[str, str] | None = None) -> str:
        """The standard one-line message, e.g. ``recipe: unknown key 'x' (did you mean 'y'?); allowed here: ...``;
        ``hints``: known slips (an unknown key -> the allowed key meant), tried before spelling."""
        if self.kind == "unknown":
            meant = (hints or {}).get(self.key)
            hint = f" (did you mean '{meant}'?)" if meant in self.allowed else did_you_mean(self.key, self.allowed)
            return f"{subject}: unknown key '{self.where}'{hint}; allowed here: {', '.join(self.allowed)}"
        if self.kind == "missing":
            return f"{subject}: missing required key '{self.where}'"
        if not self.where:
            return f"{subject}: {self.message}"
        if isinstance(self.value, dict):
            return f"{subject}: '{self.where}': {self.message}"
        return f"{subject}: '{self.where}' = {_short_repr(self.value)}: {self.message}"


def explain(err: ValidationError, root: type[BaseModel] | None = None) -> Problem:
    """The one reading of a pydantic ``ValidationError`` (recipes, merge-lora recipes, method
    parameters): its most specific problem (unknown keys first), located; ``root``: the model
    validated, for the keys allowed where an unknown key stands."""
    first = err.errors()[0]
    for e in err.errors():  # prefer the most specific message: unknown keys first
        if e["type"] == "extra_forbidden":
            first = e
            break
    loc = tuple(first["loc"])
    kind = {"extra_forbidden": "unknown", "missing": "missing"}.get(first["type"], "invalid")
    allowed = _allowed_keys_at(root, loc) if kind == "unknown" and root is not None else []
    return Problem(kind, _loc(loc), str(loc[-1]) if loc else "", first.get("input"),
                   first["msg"].removeprefix("Value error, "), allowed)


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
        raise RecipeError(explain(err, Recipe).line("recipe")) from None


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
