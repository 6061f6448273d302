"""``modules:`` recipes (multi-part models), against mergekit 0.1.5 on the same inputs.

A tiny Qwen2.5-VL-shaped model (text_decoder, vision_tower, multi_modal_projector) and the
tiny Llama (one module, 'default'). Tensors are compared in float32 with
max |alloykit - mergekit| <= 1e-6 * max |mergekit| per tensor (the same bound as
test_mergekit_diff.py; measured: equal). One deliberate difference, pinned below: a module
the recipe does not list is copied from base_model by alloykit, left out by mergekit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import alloykit
from alloykit.config import parse_recipe
from alloykit.errors import RecipeError
from alloykit.plan.layout import model_modules, owner
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import read_state
from alloykit.testing.hubcache import refuse_network
from alloykit.testing.vlm import config as vl_config
from alloykit.testing.vlm import tensors as vl_tensors
from alloykit.testing.vlm import write_qwen2_5_vl

mk_merge = pytest.importorskip("mergekit.merge")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.io.tasks import LoaderCache  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

RTOL = 1e-6


@pytest.fixture(autouse=True)
def offline():
    with refuse_network():
        yield


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    return [str(write_qwen2_5_vl(root / "base"))] + [str(write_qwen2_5_vl(root / f"ft{i}", seed=i, base_seed=0)) for i in (1, 2)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    base, tunes = write_family(tmp_path_factory.mktemp("llama"), 2, LlamaShape(vocab=64, hidden=32, intermediate=48, layers=4),
                               delta_scale=0.5)
    return [str(base)] + [str(t) for t in tunes]



def both(recipe: dict, tmp_path: Path) -> tuple[dict, dict]:
    LoaderCache.loaders.clear()  # mergekit keeps loaders per process, keyed by the path as written
    mk_merge.run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
                       MergeOptions(quiet=True, write_model_card=False))
    alloykit.merge(recipe, tmp_path / "ak", progress=False)
    return read_state(tmp_path / "mk"), read_state(tmp_path / "ak")


def assert_same(mk: dict, ak: dict) -> None:
    assert set(mk) == set(ak), sorted(set(mk) ^ set(ak))
    for name in mk:
        assert ak[name].shape == mk[name].shape, name
        diff = (ak[name].double() - mk[name].double()).abs().max().item()
        assert diff <= RTOL * mk[name].double().abs().max().item(), f"{name}: {diff:.3g}"


def test_layout_assigns_every_vl_tensor_to_its_module():
    layouts = model_modules(vl_config())
    assert [m.name for m in layouts] == ["multi_modal_projector", "vision_tower", "text_decoder"]
    got = {name: owner(layouts, name).name for name, _ in vl_tensors()}
    assert got["visual.merger.mlp.0.weight"] == "multi_modal_projector"
    assert got["visual.blocks.1.attn.qkv.weight"] == "vision_tower"
    assert got["lm_head.weight"] == got["model.layers.2.mlp.up_proj.weight"] == "text_decoder"
    vision = layouts[1]
    assert vision.layer_of("visual.blocks.1.norm2.weight") == ("visual.blocks.", 1, "norm2.weight")
    assert vision.layer_of("visual.patch_embed.proj.weight") is None
    assert [m.name for m in model_modules({"architectures": ["LlamaForCausalLM"]})] == ["default"]


# ---- a vision-language model: every module, each with its own method inputs and parameters -----------


VL_RECIPE = """
merge_method: slerp
base_model: {base}
modules:
  text_decoder:
    slices:
      - sources:
          - model: {base}
            layer_range: [0, 3]
          - model: {ft1}
            layer_range: [0, 3]
    parameters:
      t:
        - filter: self_attn
          value: [0, 0.5, 1]
        - value: 0.6
  vision_tower:
    models:
      - model: {base}
      - model: {ft2}
    parameters:
      t: 0.3
  multi_modal_projector:
    models:
      - model: {base}
      - model: {ft1}
parameters:
  t: 0.7
dtype: float32
"""


def vl_recipe(vl, text=VL_RECIPE) -> dict:
    return yaml.safe_load(text.format(base=vl[0], ft1=vl[1], ft2=vl[2]))


def test_vl_modules_recipe_equals_mergekit(vl, tmp_path):
    mk, ak = both(vl_recipe(vl), tmp_path)
    assert_same(mk, ak)
    base, ft1, _ = (read_state(p) for p in vl)
    # the precedence by hand: the module's filter and gradient [0, .5, 1] give t = 0 at layer 0, 1 at the last
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ak[name], base[name])
    name = "model.layers.2.self_attn.q_proj.weight"
    assert torch.equal(ak[name], ft1[name])
    # vision_tower's module t = 0.3 wins over the top-level 0.7: the same tensors as a plain slerp at 0.3
    plain = {"merge_method": "slerp", "base_model": vl[0], "models": [{"model": vl[0]}, {"model": vl[2]}],
             "parameters": {"t": 0.3}, "dtype": "float32"}
    want = read_state(alloykit.merge(plain, tmp_path / "plain", progress=False))
    assert all(torch.equal(ak[n], want[n]) for n in ak if n.startswith("visual.blocks."))


def test_vl_sliced_modules_set_each_layer_count(vl, tmp_path):
    recipe = vl_recipe(vl, """
merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{{model: {ft1}, layer_range: [0, 2]}}]
      - sources: [{{model: {ft2}, layer_range: [1, 3]}}]
  vision_tower:
    slices:
      - sources: [{{model: {ft2}, layer_range: [1, 2]}}]
  multi_modal_projector:
    models:
      - model: {ft1}
dtype: float32
""")
    mk, ak = both(recipe, tmp_path)
    assert_same(mk, ak)
    assert "model.layers.3.mlp.up_proj.weight" in ak and "visual.blocks.1.norm1.weight" not in ak
    ft2 = read_state(vl[2])
    assert torch.equal(ak["visual.blocks.0.attn.qkv.weight"], ft2["visual.blocks.1.attn.qkv.weight"])
    assert torch.equal(ak["model.layers.2.mlp.up_proj.weight"], ft2["model.layers.1.mlp.up_proj.weight"])
    for out in ("mk", "ak"):
        cfg = json.loads((tmp_path / out / "config.json").read_text())
        assert (cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["depth"]) == (4, 1), out


def test_unlisted_modules_are_copied_from_the_base(vl, tmp_path):
    """By design: mergekit writes only the listed modules (an incomplete model, which its
    fill_missing_params script completes afterwards); alloykit copies the others from base_model."""
    recipe = vl_recipe(vl, """
merge_method: task_arithmetic
base_model: {base}
modules:
  text_decoder:
    models:
      - model: {ft1}
        parameters: {{weight: 0.5}}
      - model: {ft2}
        parameters: {{weight: 0.5}}
dtype: float32
""")
    mk, ak = both(recipe, tmp_path)
    base = read_state(vl[0])
    text = {n for n in base if n.startswith(("model.", "lm_head."))}
    assert set(mk) == text  # mergekit: the vision tower and projector are missing
    assert set(ak) == set(base)
    assert_same(mk, {n: ak[n] for n in text})
    assert all(torch.equal(ak[n], base[n]) for n in set(base) - text)


def test_llama_default_module_equals_models_and_slices_recipes(llama, tmp_path):
    base, ft1, ft2 = llama
    models = [{"model": ft1, "parameters": {"weight": 0.3, "density": [1.0, 0.4]}},
              {"model": ft2, "parameters": {"weight": 0.7, "density": 0.6}}]
    flat = {"merge_method": "ties", "base_model": base, "models": models, "parameters": {"normalize": True}, "dtype": "float32"}
    # the module's parameters sit between the model's and the top level's
    moduled = {"merge_method": "ties", "base_model": base, "modules": {"default": {"models": models, "parameters": {"normalize": True}}},
               "parameters": {"normalize": False}, "dtype": "float32"}
    mk, ak = both(moduled, tmp_path / "m")
    assert_same(mk, ak)
    assert all(torch.equal(ak[k], v) for k, v in read_state(alloykit.merge(flat, tmp_path / "flat", progress=False)).items())
    sliced = {"merge_method": "passthrough", "modules": {"default": {"slices": [
        {"sources": [{"model": ft1, "layer_range": [0, 3]}]}, {"sources": [{"model": ft2, "layer_range": [2, 4]}]}]}},
        "dtype": "float32"}
    mk, ak = both(sliced, tmp_path / "s")
    assert_same(mk, ak)
    assert json.loads((tmp_path / "s" / "ak" / "config.json").read_text())["num_hidden_layers"] == 5


@pytest.mark.parametrize("modules, base, needle", [
    ({"text_decodr": {"models": [{"model": "{ft1}"}]}}, True,
     "modules: 'text_decodr' is not a module of Qwen2_5_VLForConditionalGeneration (model '{base}') (did you mean "
     "'text_decoder'?); its modules: multi_modal_projector, vision_tower, text_decoder"),
    ({"text_decoder": {"models": [{"model": "{ft1}", "parameters": {"weight": 1.0}}]}}, False,
     "modules: the recipe does not merge module(s) multi_modal_projector, vision_tower; "
     "list every module (multi_modal_projector, vision_tower, text_decoder) or give a base_model"),
    ({"vision_tower": {"slices": [{"sources": [{"model": "{ft1}", "layer_range": [0, 3]}]}]}}, True,
     "modules.vision_tower.slices[0]: layer_range [0, 3] of model '{ft1}' is outside its 2 layers"),
    ({"vision_tower": {"models": [{"model": "{ft1}"}], "parameters": {"wieght": 1}}}, True,
     "modules.vision_tower 'parameters': unknown parameter 'wieght' for method linear (did you mean 'weight'?)"),
])
def test_bad_modules_recipes_are_one_line(vl, modules, base, needle):
    sub = {"base": vl[0], "ft1": vl[1]}
    text = json.dumps({"merge_method": "linear", "modules": modules, **({"base_model": vl[0]} if base else {})})
    recipe = json.loads(text.replace("{ft1}", vl[1]))
    with pytest.raises(RecipeError) as err:
        alloykit.plan_recipe(recipe)
    assert needle.format(**sub) in str(err.value) and "\n" not in str(err.value)


def test_modules_schema_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"unknown key 'modules.text_decoder.model' \(did you mean 'models'"):
        parse_recipe({"merge_method": "linear", "modules": {"text_decoder": {"model": [{"model": "a"}]}}})
    with pytest.raises(RecipeError, match="give exactly one of 'models', 'slices' or 'modules'"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a"}], "modules": {"x": {"models": [{"model": "a"}]}}})


def test_gradient_on_a_module_without_layers_takes_its_first_value(vl, tmp_path):
    """By design: a projector has no numbered layers, so a gradient gives it its first value, as
    embeddings get in any recipe. mergekit declares Qwen2.5-VL's projector as two 'layers' that
    both hold the same four tensors, writes each tensor twice and keeps the last: the last value."""
    recipe = vl_recipe(vl, """
merge_method: slerp
base_model: {base}
modules:
  text_decoder: {{models: [{{model: {base}}}, {{model: {ft1}}}]}}
  vision_tower: {{models: [{{model: {base}}}, {{model: {ft1}}}]}}
  multi_modal_projector: {{models: [{{model: {base}}}, {{model: {ft1}}}], parameters: {{t: [0.0, 1.0]}}}}
parameters: {{t: 0.5}}
dtype: float32
""")
    mk, ak = both(recipe, tmp_path)
    base, ft1 = read_state(vl[0]), read_state(vl[1])
    projector = [n for n in base if n.startswith("visual.merger.mlp.")]
    assert all(torch.equal(ak[n], base[n]) for n in projector)  # t = 0
    assert all(torch.equal(mk[n], ft1[n]) for n in projector)  # t = 1
    assert_same({n: mk[n] for n in mk if n not in projector}, {n: ak[n] for n in ak if n not in projector})
