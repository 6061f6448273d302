"""Recipes run unchanged in mergekit and alloykit, and give the same tensors.

Each recipe is written once as YAML and run by mergekit 0.1.5 (in process:
``run_merge`` with its model card written) and by ``alloykit.merge``, on tiny
Llama-shaped checkpoints (a base and three fine-tunes with large deltas). Every
output tensor is compared: same names, shapes and dtypes, and in float32
``max |alloykit - mergekit| <= 1e-6 * max |mergekit|`` per tensor (a few fp32 ulps
of the tensor's scale: the rounding of a different summation order).

Deliberate differences, each pinned by a test below:

* ``dtype``: mergekit rounds the inputs to ``dtype`` and computes in it; alloykit
  always computes in float32 and rounds once to the output dtype, so with
  ``dtype: bfloat16`` alloykit's tensors are the float32 merge correctly rounded and
  mergekit's are a few bf16 ulps away (discrete choices such as TIES' top-k can flip
  on the rounded inputs). ``out_dtype`` alone gives the same bits.
* Randomized methods (dare_*, della*): mergekit draws masks from torch's global
  generator in execution order, alloykit from one generator per tensor seeded from
  (seed, tensor name), so the masks differ; their statistics are compared here
  (kept fraction, L1 rescaling, keep rate by magnitude) and draw-for-draw equality
  given the same generator state is tested per method in test_methods_sparse.py.
* mergekit's model card asks the Hub whether a relative model path such as
  ``./ft1`` is a repository and crashes offline (HF_HUB_OFFLINE=1); with absolute
  paths it stays local. alloykit's card never contacts a hub. The relative-path test
  runs mergekit with ``write_model_card=False``.

The whole module runs with sockets refused: neither tool may contact a hub.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported (it reads this once)
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import alloykit  # noqa: E402
from alloykit.errors import RecipeError  # noqa: E402
from alloykit.methods.registry import all_methods  # noqa: E402
from alloykit.testing.fixtures import LlamaShape, write_family  # noqa: E402

mk_merge = pytest.importorskip("mergekit.merge")
from mergekit import merge_methods as mk_methods  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

SHAPE = LlamaShape(vocab=64, hidden=32, intermediate=48, layers=4, heads=4, kv_heads=2)
RTOL = 1e-6
SHARED = sorted(set(all_methods()) & {m.spec.name for m in mk_methods.registered_methods()})
RANDOMIZED = [n for n in SHARED if all_methods()[n].randomized]

#: method -> worst max-abs-diff measured against mergekit (printed at module teardown)
AGREEMENT: dict[str, float] = {}


# --------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def no_network():
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield
    if AGREEMENT:
        print("\nmax |alloykit - mergekit| per method (float32):")
        for name, diff in sorted(AGREEMENT.items()):
            print(f"  {name:18s} {diff:.3g}")


def write_tokenizer(folder: Path, max_length: int) -> None:
    """A 64-token word-level tokenizer; model_max_length tells which folder it came from."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, SHAPE.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=max_length)
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkdiff")
    base, tunes = write_family(root, 3, SHAPE, shard_bytes=40_000, delta_scale=0.5)
    for i, folder in enumerate([base, *tunes]):
        write_tokenizer(folder, 100 + i)
    return str(base), [str(t) for t in tunes]


def load(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_mergekit(recipe_path: Path, out: Path, seed=None, card=True) -> Path:
    cfg = MergeConfiguration.model_validate(yaml.safe_load(recipe_path.read_text()))
    mk_merge.run_merge(cfg, str(out), MergeOptions(write_model_card=card, quiet=True, random_seed=seed))
    return out


def both(recipe: dict, tmp_path: Path, seed=None, card=True) -> tuple[dict, dict]:
    """Write ``recipe`` once; run it with mergekit into tmp/mk and alloykit into tmp/ak."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_mergekit(path, tmp_path / "mk", seed=seed, card=card)
    alloykit.merge(str(path), tmp_path / "ak", progress=False, seed=seed)
    return load(tmp_path / "mk"), load(tmp_path / "ak")


def assert_same(mk: dict, ak: dict, method: str | None = None, rtol: float = RTOL) -> float:
    """Same names, shapes, dtypes; per tensor max|ak - mk| <= rtol * max|mk|. Returns the max diff."""
    assert set(mk) == set(ak), f"tensor names differ: {sorted(set(mk) ^ set(ak))}"
    worst = 0.0
    for name in sorted(mk):
        a, m = ak[name], mk[name]
        assert (a.dtype, a.shape) == (m.dtype, m.shape), f"{name}: alloykit {a.dtype} {list(a.shape)}, mergekit {m.dtype} {list(m.shape)}"
        diff = (a.double() - m.double()).abs().max().item()
        scale = m.double().abs().max().item()
        assert diff <= rtol * scale + 1e-30, f"{name}: max abs diff {diff:.3g} > {rtol:g} * {scale:.3g}"
        worst = max(worst, diff)
    if method is not None:
        AGREEMENT[method] = max(AGREEMENT.get(method, 0.0), worst)
    return worst


def models_block(refs, params_list):
    return [{"model": r, **({"parameters": p} if p else {})} for r, p in zip(refs, params_list)]


def layer(name: str, i: int) -> str:
    return name.replace("{i}", str(i))


# --------------------------------------------------------------------------------------
# every shared method: a plain models recipe, unequal weights, per-model and global params
# --------------------------------------------------------------------------------------

W3 = [{"weight": 0.2}, {"weight": 0.5}, {"weight": 1.3}]
#: method -> variants (uses base_model, per-model parameters, global parameters)
RECIPES: dict[str, list[tuple[bool, list[dict], dict]]] = {
    "linear": [(False, W3, {"normalize": True}), (False, W3, {"normalize": False})],
    "task_arithmetic": [(True, W3, {"lambda": 0.8})],
    "ties": [(True, [{"weight": 0.2, "density": 0.5}, {"weight": 0.5, "density": 0.7}, {"weight": 1.3, "density": 0.3}],
              {"normalize": True, "lambda": 0.9})],
    # the third model keeps gamma's default 0.01: int(0.01 * 32) == 0 outliers on the norm vectors
    "breadcrumbs": [(True, [{"weight": 0.5, "density": 0.8, "gamma": 0.05}, {"weight": 0.7, "density": 0.6, "gamma": 0.1},
                            {"weight": 1.1, "density": 0.9}], {"lambda": 1.2})],
    "breadcrumbs_ties": [(True, [{"weight": 0.5, "density": 0.8, "gamma": 0.05}, {"weight": 0.7, "density": 0.6, "gamma": 0.1},
                                 {"weight": 1.1, "density": 0.9}], {"normalize": True})],
    "sce": [(True, [{}, {}, {}], {"select_topk": 0.5})],
    "model_stock": [(True, [{}, {}, {}], {"filter_wise": False}), (True, [{}, {}, {}], {"filter_wise": True})],
    "multislerp": [(False, W3, {"normalize_weights": True}), (True, W3, {})],
    "karcher": [(False, [{}, {}, {}], {"max_iter": 10}), (True, [{}, {}, {}], {})],
    "slerp": [(True, [{}], {"t": 0.3})],
    "nearswap": [(True, [{}], {"t": 0.05})],
    "nuslerp": [(False, [{"weight": 0.3}, {"weight": 0.8}], {"nuslerp_flatten": False}),
                (True, [{"weight": 0.3}, {"weight": 0.8}], {"nuslerp_row_wise": True, "nuslerp_flatten": False})],
    "passthrough": [(False, [{"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}], {})],
    "arcee_fusion": [(True, [{}], {})],
    # epsilon near the deltas' scale: entries changed by one, two or three models all occur
    "ram": [(True, [{}, {}, {}], {}), (True, [{}, {}, {}], {"epsilon": 0.05})],
    "ramplus_tl": [(True, [{}, {}, {}], {"epsilon": 0.05}), (True, [{}, {}, {}], {"epsilon": 0.08, "r": 0.5, "alpha": 1.0})],
}
DETERMINISTIC = [n for n in SHARED if n not in RANDOMIZED]


def test_every_shared_method_is_covered():
    # the mergekit family alloykit promises; a registry problem that hides one fails here
    expected = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce",
                "nearswap", "passthrough"}
    assert expected <= set(SHARED), sorted(expected - set(SHARED))
    missing = [n for n in DETERMINISTIC if n not in RECIPES]
    assert not missing, f"shared with mergekit but no differential recipe yet: {missing}; add one to RECIPES"


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_models_recipe_matches_mergekit(method, models, tmp_path):
    base, tunes = models
    for v, (uses_base, per_model, params) in enumerate(RECIPES.get(method, [])):
        recipe = {"merge_method": method, "models": models_block(tunes, per_model), "dtype": "float32"}
        if uses_base:
            recipe["base_model"] = base
        if params:
            recipe["parameters"] = params
        assert_same(*both(recipe, tmp_path / f"v{v}"), method)


# --------------------------------------------------------------------------------------
# randomized methods: statistics
# --------------------------------------------------------------------------------------


def kept_stats(out: dict, base: dict, tune: dict | None):
    """Kept fraction of the merged delta; keep rates of the upper/lower half of |delta| (2-D tensors)."""
    kept = total = 0
    hi = lo = n_hi = n_lo = 0
    for name, t in out.items():
        d = t - base[name]
        kept += int((d != 0).sum())
        total += d.numel()
        if tune is not None and d.dim() == 2:
            mag = (tune[name] - base[name]).abs()
            upper = mag > mag.median(dim=1, keepdim=True).values
            hi += int(((d != 0) & upper).sum())
            n_hi += int(upper.sum())
            lo += int(((d != 0) & ~upper).sum())
            n_lo += int((~upper).sum())
    return kept / total, (hi / n_hi if n_hi else None), (lo / n_lo if n_lo else None)


@pytest.mark.parametrize("method", RANDOMIZED)
def test_randomized_methods_match_mergekit_in_distribution(method, models, tmp_path):
    base_ref, tunes = models
    base = load(base_ref)
    density, weight, eps = 0.4, 0.7, 0.2
    per = {"weight": weight, "density": density, **({"epsilon": eps} if method.startswith("della") else {})}
    # one model, normalize off: each tensor's merged delta keeps ~density of the entries and,
    # rescaled to the task vector's L1 norm (mergekit's rescale), has L1 norm weight * |delta|_1
    one = {"merge_method": method, "base_model": base_ref, "models": models_block(tunes[:1], [per]),
           "parameters": {"normalize": False}, "dtype": "float32"}
    mk, ak = both(one, tmp_path / "one", seed=7)
    tune = load(tunes[0])
    for out in (mk, ak):
        frac, hi, lo = kept_stats(out, base, tune)
        assert abs(frac - density) < 0.02, frac  # ~35k entries: 7 standard deviations
        if method.startswith("della"):  # keep probability grows with magnitude rank: ~0.5 vs ~0.3
            assert hi - lo > 0.12, (hi, lo)
        else:
            assert abs(hi - lo) < 0.05, (hi, lo)
        for name in out:
            want = weight * (tune[name] - base[name]).abs().sum()
            torch.testing.assert_close((out[name] - base[name]).abs().sum(), want, rtol=1e-5, atol=0)
    # three models: an entry survives if any model kept it
    three = {"merge_method": method, "base_model": base_ref, "models": models_block(tunes, [per] * 3), "dtype": "float32"}
    mk, ak = both(three, tmp_path / "three", seed=7)
    for out in (mk, ak):
        assert abs(kept_stats(out, base, None)[0] - (1 - (1 - density) ** 3)) < 0.02
    # the same seed gives the same tensors in alloykit, another seed other ones
    path = tmp_path / "three" / "recipe.yaml"
    again = load(alloykit.merge(str(path), tmp_path / "again", seed=7, progress=False))
    other = load(alloykit.merge(str(path), tmp_path / "other", seed=8, progress=False))
    name = "model.layers.1.mlp.up_proj.weight"
    assert all(torch.equal(again[n], ak[n]) for n in ak) and not torch.equal(other[name], ak[name])


# --------------------------------------------------------------------------------------
# parameters: per-model vs global, gradients, filters
# --------------------------------------------------------------------------------------


def test_gradients_and_filters_per_model_and_global(models, tmp_path):
    base, tunes = models
    recipe = {
        "merge_method": "ties",
        "base_model": base,
        "models": models_block(tunes, [
            {"weight": [0.2, 1.0], "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.8}]},
            {"weight": [{"filter": "mlp", "value": [1.0, 0.1, 0.7]}, {"value": 0.6}], "density": 0.5},
            {"density": [0.9, 0.2]},  # weight from the global filter below
        ]),
        "parameters": {"normalize": False, "lambda": [0.5, 1.5],
                       "weight": [{"filter": "self_attn.q_proj", "value": 2.0}, {"value": 0.4}]},
        "dtype": "float32",
    }
    assert_same(*both(recipe, tmp_path / "ties"), "ties")
    # linear: a different weight for self_attn in one model, a global gradient filter for the other
    lin = {
        "merge_method": "linear",
        "models": models_block(tunes[:2], [{"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.1}]}, {}]),
        "parameters": {"weight": [{"filter": "mlp", "value": [0.9, 0.1]}, {"value": 0.3}]},
        "dtype": "float32",
    }
    mk, ak = both(lin, tmp_path / "linear")
    assert_same(mk, ak, "linear")
    # reference by hand: q_proj of layer 3 = (0.9 a + 0.3 b) / 1.2; up_proj of layer 3 (t = 1): (0.1 a + 0.1 b) / 0.2
    a, b = load(tunes[0]), load(tunes[1])
    q, up = "model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight"
    torch.testing.assert_close(ak[q], (0.9 * a[q] + 0.3 * b[q]) / 1.2)
    torch.testing.assert_close(ak[up], (a[up] + b[up]) / 2)


def test_slerp_t_filters_self_attn_vs_mlp(models, tmp_path):
    base, tunes = models
    recipe = {  # mergekit's gradient-slerp example
        "merge_method": "slerp",
        "base_model": tunes[0],
        "models": [{"model": tunes[0]}, {"model": tunes[1]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "float32",
    }
    mk, ak = both(recipe, tmp_path)
    assert_same(mk, ak, "slerp")
    a, b = load(tunes[0]), load(tunes[1])
    # t = 0 at layer 0 for self_attn (the base), t = 0 at layer 3 for mlp
    assert torch.equal(ak["model.layers.0.self_attn.v_proj.weight"], a["model.layers.0.self_attn.v_proj.weight"])
    torch.testing.assert_close(ak["model.layers.3.mlp.down_proj.weight"], a["model.layers.3.mlp.down_proj.weight"])


# --------------------------------------------------------------------------------------
# base_model listed inside models, or not
# --------------------------------------------------------------------------------------


def test_base_model_listed_in_models_or_not(models, tmp_path):
    base, tunes = models
    per = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}]
    not_listed = {"merge_method": "ties", "base_model": base, "models": models_block(tunes[:2], per), "dtype": "float32"}
    listed = dict(not_listed, models=[{"model": base, "parameters": {"weight": 5.0}}] + models_block(tunes[:2], per))
    mk1, ak1 = both(not_listed, tmp_path / "not_listed")
    mk2, ak2 = both(listed, tmp_path / "listed")
    assert_same(mk1, ak1, "ties")
    assert_same(mk2, ak2, "ties")
    assert all(torch.equal(ak1[n], ak2[n]) for n in ak1)  # the base's own parameters are not used

    # a method without a base merges an unlisted base_model as one more input (mergekit's planner)
    lin = {"merge_method": "linear", "base_model": base, "models": models_block(tunes[:2], [{}, {}]),
           "parameters": {"weight": 0.7}, "dtype": "float32"}
    mk, ak = both(lin, tmp_path / "linear")
    assert_same(mk, ak, "linear")
    sds = [load(m) for m in (tunes[0], tunes[1], base)]
    name = "model.layers.2.mlp.gate_proj.weight"
    torch.testing.assert_close(ak[name], sum(sd[name] for sd in sds) / 3)


@pytest.mark.parametrize("recipe_kind", ["linear_base_without_weight", "passthrough_with_base"])
def test_base_model_of_a_baseless_method_refused_like_mergekit(recipe_kind, models, tmp_path):
    base, tunes = models
    if recipe_kind == "linear_base_without_weight":
        recipe = {"merge_method": "linear", "base_model": base, "models": models_block(tunes[:2], W3[:2])}
    else:
        recipe = {"merge_method": "passthrough", "base_model": base, "models": [{"model": tunes[0]}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(Exception):
        run_mergekit(path, tmp_path / "mk")
    with pytest.raises(RecipeError, match="base_model"):
        alloykit.merge(str(path), tmp_path / "ak", progress=False)
    assert not (tmp_path / "ak").exists()


# --------------------------------------------------------------------------------------
# dtype and out_dtype
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_out_dtype_gives_mergekits_bits(out_dtype, models, tmp_path):
    base, tunes = models
    name = str(out_dtype).removeprefix("torch.")
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "models": models_block(tunes, W3),
              "dtype": "float32", "out_dtype": name}
    mk, ak = both(recipe, tmp_path)
    assert {t.dtype for t in ak.values()} == {out_dtype}
    # both compute in float32 and round once: equal up to a float32 difference flipping one rounding
    assert_same(mk, ak, rtol=torch.finfo(out_dtype).eps)
    for side in ("mk", "ak"):
        cfg = json.loads((tmp_path / side / "config.json").read_text())
        assert cfg.get("dtype", cfg.get("torch_dtype")) == name, side


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "slerp", "model_stock"])
def test_dtype_bfloat16_rounds_once(method, models, tmp_path):
    base, tunes = models
    per = {"slerp": [{}], "model_stock": [{}, {}, {}]}.get(method, W3)
    recipe = {"merge_method": method, "models": models_block(tunes, per), "dtype": "bfloat16"}
    if method != "linear":
        recipe["base_model"] = base
    if method == "slerp":
        recipe["parameters"] = {"t": 0.3}
    mk, ak = both(recipe, tmp_path / "bf16")
    exact = load(alloykit.merge(dict(recipe, dtype="float32"), tmp_path / "fp32", progress=False))
    assert set(mk) == set(ak) == set(exact)
    for name in ak:
        assert ak[name].dtype == mk[name].dtype == torch.bfloat16
        # alloykit: the float32 merge, rounded once to bfloat16
        assert torch.equal(ak[name], exact[name].to(torch.bfloat16)), name
        # mergekit rounds the inputs first: within a few bf16 ulps of the tensor's scale
        scale = exact[name].abs().max()
        assert (mk[name].float() - exact[name]).abs().max() <= 4 * 2.0**-8 * scale, name


# --------------------------------------------------------------------------------------
# slices: layer stacking and a merge per slice
# --------------------------------------------------------------------------------------


def test_frankenmerge_passthrough_slices(models, tmp_path):
    _, tunes = models
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": tunes[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": tunes[1], "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    mk, ak = both(recipe, tmp_path)
    assert_same(mk, ak, "passthrough")
    a, b = load(tunes[0]), load(tunes[1])
    for out_i, (sd, in_i) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2), (b, 3)]):
        n = "model.layers.{i}.self_attn.o_proj.weight"
        assert torch.equal(ak[layer(n, out_i)], sd[layer(n, in_i)])
    assert torch.equal(ak["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(ak["lm_head.weight"], b["lm_head.weight"])
    for side in ("mk", "ak"):
        assert json.loads((tmp_path / side / "config.json").read_text())["num_hidden_layers"] == 5


def test_slices_with_a_merge_per_slice(models, tmp_path):
    base, tunes = models
    ties = {
        "merge_method": "ties",
        "base_model": base,
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]},
                         {"model": tunes[0], "layer_range": [0, 2], "parameters": {"weight": 0.7, "density": 0.5}},
                         {"model": tunes[1], "layer_range": [1, 3], "parameters": {"weight": [0.2, 0.9], "density": 0.6}}]},
            {"sources": [{"model": base, "layer_range": [2, 4]},
                         {"model": tunes[2], "layer_range": [2, 4], "parameters": {"weight": 1.0, "density": 0.4}}],
             "parameters": {"normalize": False}},
        ],
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    }
    assert_same(*both(ties, tmp_path / "ties"), "ties")
    per_slice_base = {
        "merge_method": "task_arithmetic",
        "slices": [
            {"base_model": tunes[0], "sources": [{"model": tunes[0], "layer_range": [0, 2]},
                                                 {"model": tunes[1], "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
            {"base_model": base, "sources": [{"model": base, "layer_range": [2, 4]},
                                             {"model": tunes[2], "layer_range": [1, 3], "parameters": {"weight": 0.8}}]},
        ],
        "dtype": "float32",
    }
    assert_same(*both(per_slice_base, tmp_path / "per_slice_base"), "task_arithmetic")
    slerp = {
        "merge_method": "slerp",
        "base_model": tunes[0],
        "slices": [{"sources": [{"model": tunes[0], "layer_range": [0, 2]}, {"model": tunes[1], "layer_range": [2, 4]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.4}]},
        "dtype": "float32",
    }
    mk, ak = both(slerp, tmp_path / "slerp")
    assert_same(mk, ak, "slerp")
    # t = 1 at the slice's last layer: self_attn is the second source's layer 3
    n = "model.layers.{i}.self_attn.k_proj.weight"
    torch.testing.assert_close(ak[layer(n, 1)], load(tunes[1])[layer(n, 3)])


def test_per_model_filters_match_each_models_own_layer_names(models, tmp_path):
    # a filter naming a layer matches each source's own tensor name (its layer_range start
    # plus the offset) for per-model parameters, and the output name for shared ones
    _, tunes = models
    by_layer = [{"filter": "layers.1.", "value": 5.0}, {"filter": "layers.3.", "value": 3.0}, {"value": 1.0}]
    recipe = {
        "merge_method": "linear",
        "slices": [{"sources": [{"model": tunes[0], "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                                {"model": tunes[1], "layer_range": [2, 4], "parameters": {"weight": by_layer}}]}],
        "dtype": "float32",
    }
    mk, ak = both(recipe, tmp_path / "per_model")
    assert_same(mk, ak, "linear")
    a, b = load(tunes[0]), load(tunes[1])
    n = "model.layers.{i}.mlp.up_proj.weight"
    # output layer 1 = A's layer 1 (weight 1) with B's layer 3 (weight 3, its own name)
    torch.testing.assert_close(ak[layer(n, 1)], (a[layer(n, 1)] + 3 * b[layer(n, 3)]) / 4)
    shared = dict(recipe, slices=[{"sources": [{"model": tunes[0], "layer_range": [0, 2]},
                                               {"model": tunes[1], "layer_range": [2, 4]}],
                                   "parameters": {"weight": by_layer}}])
    assert_same(*both(shared, tmp_path / "slice_level"), "linear")


# --------------------------------------------------------------------------------------
# the folders beyond tensors: tokenizer, config, loading, offline card
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["base", "ft2"])
def test_tokenizer_source(source, models, tmp_path):
    from transformers import AutoTokenizer

    base, tunes = models
    recipe = {"merge_method": "ties", "base_model": base, "models": models_block(tunes, [{"weight": 0.5, "density": 0.5}] * 3),
              "tokenizer_source": "base" if source == "base" else tunes[1],
              "dtype": "float32"}
    mk, ak = both(recipe, tmp_path)
    assert_same(mk, ak, "ties")
    want = 100 if source == "base" else 102  # model_max_length marks the folder it came from
    toks = [AutoTokenizer.from_pretrained(tmp_path / side) for side in ("mk", "ak")]
    for tok in toks:
        assert tok.model_max_length == want
        assert tok("w3 w10 w63 zz")["input_ids"] == [3, 10, 63, 0]
    assert toks[0].get_vocab() == toks[1].get_vocab()
    for side in ("mk", "ak"):
        assert json.loads((tmp_path / side / "config.json").read_text())["vocab_size"] == SHAPE.vocab


def test_both_outputs_load_in_transformers_with_the_same_logits(models, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    _, tunes = models
    recipe = {  # five merged layers from overlapping ranges
        "merge_method": "slerp",
        "base_model": tunes[0],
        "slices": [
            {"sources": [{"model": tunes[0], "layer_range": [0, 3]}, {"model": tunes[1], "layer_range": [1, 4]}]},
            {"sources": [{"model": tunes[0], "layer_range": [2, 4]}, {"model": tunes[1], "layer_range": [2, 4]}]},
        ],
        "parameters": {"t": [0.2, 0.8]},
        "dtype": "float32",
    }
    mk, ak = both(recipe, tmp_path)
    assert_same(mk, ak, "slerp")
    ids = torch.tensor([[1, 5, 9, 33, 62, 7, 2]])
    logits = []
    for side in ("mk", "ak"):
        assert AutoConfig.from_pretrained(tmp_path / side).num_hidden_layers == 5
        model = LlamaForCausalLM.from_pretrained(tmp_path / side).eval()
        assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    assert logits[0].abs().max() > 0.1  # a real forward pass, not zeros


def test_relative_model_paths_offline(models, tmp_path, monkeypatch):
    base, tunes = models
    root = Path(base).parent
    monkeypatch.chdir(root)
    recipe = {"merge_method": "linear", "models": models_block(["./ft1", "ft2"], W3[:2]), "dtype": "float32"}
    # mergekit's card would ask the Hub about './ft1' (and fail offline): card off for mergekit only
    mk, ak = both(recipe, tmp_path, card=False)
    assert_same(mk, ak, "linear")
    card = (tmp_path / "ak" / "README.md").read_text()
    assert "linear" in card and "./ft1" in card


def test_karcher_base_model_joins_in_models_but_not_in_slices(models, tmp_path):
    """mergekit adds an unlisted base_model to a 'models' recipe as one more input, but a
    slice's inputs are its sources only; karcher has no base of its own."""
    base, tunes = models
    in_models = {"merge_method": "karcher", "base_model": base, "models": models_block(tunes[:2], [{}, {}]), "dtype": "float32"}
    assert_same(*both(in_models, tmp_path / "models"), "karcher")
    in_slices = {"merge_method": "karcher", "base_model": base, "dtype": "float32",
                 "slices": [{"sources": [{"model": tunes[0], "layer_range": [0, 4]}, {"model": tunes[1], "layer_range": [0, 4]}]}]}
    assert_same(*both(in_slices, tmp_path / "slices"), "karcher")
