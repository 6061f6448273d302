"""Recipes run unchanged in mergekit and alloykit, and give the same tensors.

Each recipe is written once as YAML and run by both tools on small Llama-shaped
checkpoints; every output tensor is compared (fp32; tolerance 1e-5 relative, the
rounding of a different accumulation order). Randomized methods (DARE, DELLA) are
compared by statistics in test_methods_sparse.py instead.
"""

import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

import alloykit
from alloykit.methods.registry import all_methods

mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from alloykit.testing.fixtures import LlamaShape, write_family

    root = tmp_path_factory.mktemp("mkdiff")
    base, tunes = write_family(root, 3, LlamaShape(vocab=64, hidden=32, intermediate=48, layers=4, heads=4, kv_heads=2), shard_bytes=40_000, delta_scale=0.5)
    return str(base), [str(t) for t in tunes]


def load(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def both(recipe: dict, tmp_path, seed=None):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfg = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    mergekit_merge.run_merge(cfg, str(tmp_path / "mk"), MergeOptions(write_model_card=False, quiet=True, copy_tokenizer=False, random_seed=seed))
    alloykit.merge(str(path), tmp_path / "ak", progress=False, seed=seed)
    return load(tmp_path / "mk"), load(tmp_path / "ak")


def assert_same(mk, ak, rtol=1e-5, atol=1e-6):
    assert set(mk) == set(ak), set(mk) ^ set(ak)
    for name in mk:
        assert mk[name].dtype == ak[name].dtype, name
        torch.testing.assert_close(ak[name], mk[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def models_block(tunes, params_list):
    return [{"model": t, **({"parameters": p} if p else {})} for t, p in zip(tunes, params_list)]


DETERMINISTIC = {
    "linear": ({}, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 1.3}], False),
    "task_arithmetic": ({"lambda": 0.8}, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 1.3}], True),
    "ties": ({"normalize": True}, [{"weight": 0.2, "density": 0.5}, {"weight": 0.5, "density": 0.7}, {"weight": 1.3, "density": 0.3}], True),
    "breadcrumbs": ({}, [{"weight": 0.5, "density": 0.8, "gamma": 0.05}] * 3, True),
    "breadcrumbs_ties": ({}, [{"weight": 0.5, "density": 0.8, "gamma": 0.05}] * 3, True),
    "sce": ({"select_topk": 0.5}, [{}, {}, {}], True),
    "model_stock": ({}, [{}, {}, {}], True),
    "multislerp": ({}, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 1.3}], True),
    "karcher": ({}, [{}, {}, {}], False),
}


@pytest.mark.parametrize("method", sorted(DETERMINISTIC))
def test_models_recipe_matches_mergekit(method, models, tmp_path):
    if method not in all_methods():
        pytest.fail(f"{method} is not registered")
    base, tunes = models
    params, per_model, uses_base = DETERMINISTIC[method]
    recipe = {"merge_method": method, "models": models_block(tunes, per_model), "dtype": "float32"}
    if uses_base:
        recipe["base_model"] = base
    if params:
        recipe["parameters"] = params
    assert_same(*both(recipe, tmp_path))


def test_two_model_methods_match_mergekit(models, tmp_path):
    base, tunes = models
    for method, params, per_model in (
        ("slerp", {"t": [0.1, 0.9]}, [{}]),
        ("nearswap", {"t": 0.01}, [{}]),
        ("nuslerp", {"nuslerp_flatten": False}, [{"weight": 0.3}, {"weight": 0.8}]),
    ):
        recipe = {"merge_method": method, "base_model": base, "models": models_block(tunes[: len(per_model)], per_model),
                  "parameters": params, "dtype": "float32"}
        out = tmp_path / method
        out.mkdir()
        assert_same(*both(recipe, out))


def test_gradients_filters_and_base_listed_in_models(models, tmp_path):
    base, tunes = models
    recipe = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": base}] + models_block(tunes[:2], [
            {"weight": [0.2, 1.0], "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.8}]},
            {"weight": [{"filter": "mlp", "value": [1.0, 0.1]}, {"value": 0.6}], "density": 0.5},
        ]),
        "parameters": {"normalize": False, "int8_mask": True},
        "dtype": "float32",
    }
    assert_same(*both(recipe, tmp_path))


def test_bf16_output(models, tmp_path):
    base, tunes = models
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "models": models_block(tunes, [{"weight": 0.3}] * 3),
              "dtype": "float32", "out_dtype": "bfloat16"}
    mk, ak = both(recipe, tmp_path)
    assert_same(mk, ak, rtol=1e-2, atol=1e-2)  # one bf16 rounding step apart at most
    for name in mk:
        assert (mk[name].float() - ak[name].float()).abs().max() <= 2 ** -7 * mk[name].float().abs().max() + 1e-6


def test_slices_passthrough_and_per_slice_merge(models, tmp_path):
    base, tunes = models
    stack = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": tunes[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": tunes[1], "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    (tmp_path / "a").mkdir()
    mk, ak = both(stack, tmp_path / "a")
    assert_same(mk, ak)
    import json

    assert json.loads((tmp_path / "a" / "ak" / "config.json").read_text())["num_hidden_layers"] == 5
    per_slice = {
        "merge_method": "slerp",
        "base_model": tunes[0],
        "slices": [
            {"sources": [{"model": tunes[0], "layer_range": [0, 2]}, {"model": tunes[1], "layer_range": [2, 4]}]},
        ],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.4}]},
        "dtype": "float32",
    }
    (tmp_path / "b").mkdir()
    assert_same(*both(per_slice, tmp_path / "b"))


def test_dare_ties_same_seed_reproducible_and_close_in_expectation(models, tmp_path):
    base, tunes = models
    recipe = {"merge_method": "dare_ties", "base_model": base,
              "models": models_block(tunes, [{"weight": 1.0, "density": 0.5}] * 3), "dtype": "float32"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    a = load(alloykit.merge(str(path), tmp_path / "a", seed=3, progress=False))
    b = load(alloykit.merge(str(path), tmp_path / "b", seed=3, progress=False))
    c = load(alloykit.merge(str(path), tmp_path / "c", seed=4, progress=False))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    # kept fraction of the merged delta is in line with density 0.5 over 3 models
    base_t = load(base)[name]
    kept = ((a[name] - base_t) != 0).float().mean().item()
    assert 0.5 < kept < 1.0
