"""Published mergekit recipes run unchanged.

The recipes below are written as mergekit's README and ``examples/`` publish them
(linear, gradient SLERP, TIES with per-model density/weight gradients and filters plus
``normalize``/``int8_mask``, DARE-TIES with the base listed among the models, a
passthrough frankenmerge, Model Stock, DELLA, SCE), with the Hub names replaced by
tiny local Llama-shaped models and the layer ranges scaled to their 4 layers. Each must
pass ``alloykit validate`` and merge through the CLI; the deterministic ones must also
give mergekit's tensors.

mergekit options that change nothing numerically are accepted and are no-ops in
alloykit: ``int8_mask`` (mergekit stores its 0/1 masks as int8 to save memory;
alloykit's masks are boolean) and ``rescale: false``.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from alloykit.cli.main import main  # noqa: E402
from alloykit.testing.fixtures import LlamaShape, write_family  # noqa: E402

SHAPE = LlamaShape(vocab=64, hidden=32, intermediate=48, layers=4, heads=4, kv_heads=2)

RECIPES = {
    # examples/linear.yml
    "linear": """
models:
  - model: {a}
    parameters:
      weight: 1.0
  - model: {b}
    parameters:
      weight: 0.3
  - model: {c}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    # examples/gradient-slerp.yml (layer_range [0, 40] scaled to [0, 4])
    "gradient_slerp": """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    # examples/ties.yml
    "ties": """
models:
  - model: {a}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {b}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {c}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    # the README's DARE-TIES recipe: the base listed among the models without parameters
    "dare_ties": """
models:
  - model: {base}
    # No parameters necessary for base model
  - model: {a}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {b}
    parameters:
      density: 0.53
      weight: 0.3
  - model: {c}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: bfloat16
""",
    # a passthrough frankenmerge (SOLAR / Goliath style: overlapping layer ranges stacked)
    "passthrough_frankenmerge": """
slices:
  - sources:
    - model: {a}
      layer_range: [0, 3]
  - sources:
    - model: {b}
      layer_range: [1, 4]
merge_method: passthrough
dtype: bfloat16
""",
    # examples/orcamini-platy-44layer.yml, three stacked slices
    "passthrough_three_slices": """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
  - sources:
      - model: {b}
        layer_range: [1, 4]
  - sources:
      - model: {c}
        layer_range: [3, 4]
merge_method: passthrough
dtype: float16
""",
    "model_stock": """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: model_stock
base_model: {base}
dtype: bfloat16
""",
    "della": """
models:
  - model: {a}
    parameters:
      weight: 1.0
      density: 0.6
  - model: {b}
    parameters:
      weight: 0.5
      density: 0.6
merge_method: della
base_model: {base}
parameters:
  lambda: 1.1
  normalize: true
  int8_mask: true
dtype: bfloat16
""",
    "sce": """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: sce
base_model: {base}
parameters:
  select_topk: 1.0
dtype: bfloat16
""",
    "task_arithmetic": """
base_model: {base}
models:
  - model: {a}
    parameters:
      weight: 0.6
  - model: {b}
    parameters:
      weight: -0.3   # negation: subtract a skill
merge_method: task_arithmetic
parameters:
  normalize: false
  lambda: 1.0
dtype: float16
""",
}
LAYERS_OUT = {"passthrough_frankenmerge": 6, "passthrough_three_slices": 6}
RANDOMIZED = {"dare_ties", "della"}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    base, (a, b, c) = write_family(root, 3, SHAPE, shard_bytes=40_000, delta_scale=0.5)
    return {"base": str(base), "a": str(a), "b": str(b), "c": str(c)}


def load(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_published_recipe_validates_and_merges(name, refs, tmp_path, capsys):
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPES[name].format(**refs))
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith("OK:")
    out = tmp_path / "merged"
    assert main(["merge", str(path), str(out), "--quiet"]) == 0
    merged = load(out)
    recipe = yaml.safe_load(path.read_text())
    want_dtype = getattr(torch, recipe["dtype"])
    assert {t.dtype for t in merged.values()} == {want_dtype}
    layers = LAYERS_OUT.get(name, SHAPE.layers)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers
    assert len(merged) == 3 + 9 * layers  # embed, norm, lm_head + 9 tensors per Llama layer
    assert all(torch.isfinite(t.float()).all() for t in merged.values())
    if name in RANDOMIZED:
        return
    # the same recipe in float32 gives mergekit's tensors (in a half dtype mergekit computes
    # in that dtype, alloykit in float32: see test_mergekit_diff.py)
    mk_merge = pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    import alloykit

    recipe32 = dict(recipe, dtype="float32")
    mk_merge.run_merge(MergeConfiguration.model_validate(recipe32), str(tmp_path / "mk"), MergeOptions(quiet=True))
    mk, ak = load(tmp_path / "mk"), load(alloykit.merge(recipe32, tmp_path / "ak", progress=False))
    assert set(mk) == set(ak) == set(merged)
    for key, t in ak.items():
        assert t.dtype == mk[key].dtype == torch.float32, key
        assert (t - mk[key]).abs().max() <= 1e-6 * mk[key].abs().max(), key
        assert torch.equal(merged[key], t.to(want_dtype)), key  # the CLI's half-precision output: rounded once


def test_int8_mask_and_rescale_false_are_accepted_no_ops(refs, tmp_path):
    recipe = yaml.safe_load(RECIPES["ties"].format(**refs))
    recipe["dtype"] = "float32"
    outs = []
    for i, extra in enumerate(({"int8_mask": False}, {"int8_mask": True, "rescale": False})):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(yaml.safe_dump({**recipe, "parameters": {**recipe["parameters"], **extra}}))
        assert main(["merge", str(path), str(tmp_path / f"out{i}"), "--quiet"]) == 0
        outs.append(load(tmp_path / f"out{i}"))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
