"""Recipe parsing: mergekit's schema accepted, mistakes named precisely."""

import pytest

from alloykit.config import Conditional, load_recipe, parse_recipe
from alloykit.errors import RecipeError
from alloykit.plan.params import evaluate


def test_mergekit_schema_parses():
    r = parse_recipe({
        "merge_method": "ties",
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"density": [1, 0.7, 0.1], "weight": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}}],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "bfloat16",
        "tokenizer_source": "base",
    })
    assert r.merge_method == "ties" and r.dtype == "bfloat16"
    assert isinstance(r.models[0].parameters["weight"][0], Conditional)


@pytest.mark.parametrize("data,needle", [
    ({"merge_method": "linear", "models": [{"model": "a", "paramters": {}}]}, "unknown key 'models[0].paramters' (did you mean 'parameters'?)"),
    ({"merge_method": "linear", "modles": [{"model": "a"}]}, "unknown key 'modles' (did you mean 'modules'?); allowed here: merge_method, base_model, models,"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float8"}, "dtype 'float8' is not one of float32, float16, bfloat16"),
    ({"merge_method": "linear"}, "give exactly one of 'models', 'slices' or 'modules'"),
    ({"merge_method": "linear", "models": [{"model": "a"}, {"model": "a"}]}, "model 'a' is listed twice"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}]}, "layer_range [4, 2] must be [start, end)"),
    ({"models": [{"model": "a"}]}, "missing required key 'merge_method'"),
    (["not", "a", "mapping"], "expected a mapping"),
])
def test_recipe_errors_name_the_key_and_fix(data, needle):
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("merge_method: !!python/object/apply:os.system ['echo pwned > %s']\nmodels: []\n" % (tmp_path / "pwned"))
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(p)
    assert not (tmp_path / "pwned").exists()


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    with pytest.raises(RecipeError, match=r"invalid YAML at line \d+"):
        load_recipe(p)


def test_gradient_interpolates_like_mergekit():
    # t = layer / (n - 1); values interpolated between neighbouring entries
    assert evaluate([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate([1.0, 0.7, 0.1], "x", 0.75) == pytest.approx(0.4)
    assert evaluate([1.0, 0.7, 0.1], "x", 1.0) == pytest.approx(0.1)
    # booleans and strings pick the lower entry
    assert evaluate([True, False], "x", 0.9) is True


def test_filters_first_match_wins():
    s = [Conditional(filter="self_attn", value=0.2), Conditional(filter="mlp", value=[0.0, 1.0]), Conditional(value=0.9)]
    assert evaluate(s, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.2
    assert evaluate(s, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(s, "model.norm.weight", 0.5) == 0.9
