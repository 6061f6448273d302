"""``alloykit search``: AdaMerging and model soups, on a tiny BERT with a toy task and a tiny Llama.

The toy task is hand-checkable: the head reads one coordinate of the mean-pooled
output, s(x) = pooled(x)[0], and says "pos" iff s(x) > 0, with labels taken from the
base encoder itself (the base is 100% accurate). A task vector that only moves the last
LayerNorm's bias moves every pooled output by that vector (mean pooling of a constant),
so its effect on the head is exact: along coordinate 0 it shifts s, elsewhere it is
invisible to the head.
"""

from __future__ import annotations

import random

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from alloykit.cli.main import main
from alloykit.config import load_recipe
from alloykit.search.adamerging import SuiteEntropy, TaskVectorModel, adamerging, softmax_entropy
from alloykit.search.soups import greedy_soup
from alloykit.testing.helpers import read_state as _state

TOY = "search_toy"
LN_BIAS = "encoder.layer.1.output.LayerNorm.bias"  # the last LayerNorm: its output is last_hidden_state
WORDS = "alpha beta gamma delta river stone cloud green quick slow bright dark small large open closed".split()


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64)
    return BertModel(cfg).eval()


def toy_base(root, *, seed: int, draws: int):
    """The tiny base, saved to ``root/base``; distinct random texts of 2 to 6 words (from ``draws``
    draws); and each text's pooled coordinate 0, the one the toy head reads."""
    from alloykit.eval.data import Split
    from alloykit.eval.model import base_model_path, embed, encode, load_tokenizer

    base = _tiny_bert()
    base.save_pretrained(root / "base", safe_serialization=True)
    tok = load_tokenizer(base_model_path())
    rng = random.Random(seed)
    texts = sorted({" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(draws)})
    return base, texts, embed(base, encode(tok, Split(texts, [0] * len(texts)), 32))[:, 0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Base BERT folder, fine-tune folders (encoder/ + heads.safetensors) named by their LN-bias shift, the toy task."""
    from alloykit.eval.tasks import Task, register_task

    root = tmp_path_factory.mktemp("toy")
    base, texts, s = toy_base(root, seed=0, draws=4000)
    examples = [(t, "pos" if v > 0 else "neg") for t, v in zip(texts, s.tolist()) if abs(v) > 1e-3]  # no borderline
    assert len(examples) > 1300  # the benchmark's 1000 test + 200 validation, plus training rows
    register_task(Task(TOY, "toy: sign of a pooled coordinate of the tiny base", lambda: examples), replace=True)
    head = {f"{TOY}.weight": torch.zeros(2, 16), f"{TOY}.bias": torch.zeros(2)}
    head[f"{TOY}.weight"][0, 0], head[f"{TOY}.weight"][1, 0] = -1.0, 1.0  # labels sorted: neg = 0, pos = 1
    sd = {k: v.contiguous() for k, v in base.state_dict().items()}
    folders = {}
    for name, shift in {"e1x4": (0, 4.0), "e2": (1, 1.0), "e3": (2, 1.0), "e1x100": (0, 100.0)}.items():
        ft = dict(sd)
        ft[LN_BIAS] = sd[LN_BIAS].clone()
        ft[LN_BIAS][shift[0]] += shift[1]
        (root / name / "encoder").mkdir(parents=True)
        save_file(ft, root / name / "encoder" / "model.safetensors")
        (root / name / "encoder" / "config.json").write_text((root / "base" / "config.json").read_text())
        save_file(head, root / name / "heads.safetensors")
        folders[name] = root / name
    return root, folders


def _coefficients(recipe_path, names: list[str]) -> torch.Tensor:
    """[K, n_tensors] weights as the recipe states them (per-tensor filters, or one number per model)."""
    rows = []
    for m in load_recipe(recipe_path).models:
        w = m.parameters["weight"]
        if isinstance(w, list):
            by_name = {c.filter: c.value for c in w if c.filter}
            assert [c.filter for c in w][-1] is None and w[-1].value == 0.0  # buffers keep the base
            rows.append([by_name[n] for n in names])
        else:
            rows.append([w] * len(names))
    return torch.tensor(rows, dtype=torch.float32)


# -- the core --------------------------------------------------------------------------------
def test_softmax_entropy_matches_hand_values():
    h = softmax_entropy(torch.zeros(1, 2))
    assert float(h) == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-7)
    p = torch.tensor([0.7, 0.2, 0.1])
    assert float(softmax_entropy(p.log())) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    assert float(softmax_entropy(torch.tensor([1e4, 0.0]))) == pytest.approx(0.0, abs=1e-6)


def test_greedy_soup_leaves_out_the_ingredient_that_hurts():
    # scores of uniform averages by hand: C alone is best; A joins (0.8 >= 0.8), B would drop it to 0.7
    table = {(2,): 0.8, (0,): 0.75, (1,): 0.6, (2, 0): 0.8, (2, 0, 1): 0.7}
    res = greedy_soup(3, lambda idx: table[tuple(idx)])
    assert res.chosen == [2, 0] and res.score == 0.8 and res.individual == [0.75, 0.6, 0.8]
    assert [t["kept"] for t in res.trace] == [True, False]


def _toy_objective(toy):
    """The toy task bound to the base, its head found in e1x4's heads.safetensors (as `search --task` does)."""
    from alloykit.eval.loading import load_model, model_folder
    from alloykit.eval.suite import TaskSuite
    from alloykit.eval.tasks import get_task

    root, f = toy
    model = load_model(model_folder(root / "base"))
    suite = TaskSuite(model, [get_task(TOY)], heads_from=[model_folder(f["e1x4"])])
    return model.module, SuiteEntropy(suite, "validation", 64)


def test_adamerging_moves_toward_the_confident_task_vector(toy):
    """e1x4 shifts s by 4 lambda (more confident as lambda grows); e2 is invisible to the head (zero gradient)."""
    root, f = toy
    encoder, objective = _toy_objective(toy)
    base = {n: p.detach() for n, p in encoder.named_parameters()}
    encoder.requires_grad_(False)
    tv = TaskVectorModel(base, [load_file(f[n] / "encoder" / "model.safetensors").__getitem__ for n in ("e1x4", "e2")])
    res = adamerging(tv, objective, granularity="task", steps=30, lr=0.05, batch_size=16)
    lam = res.coefficients[:, 0]
    assert lam[0] > 0.9 and lam[1] == pytest.approx(0.3, abs=0)  # toward the confident model; the other untouched
    assert res.entropy_final < res.entropy_init
    # independent reference: the plain module with the bias moved by lambda * 4 along e1, plain forward
    ref = _tiny_bert()
    ref.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        ref.encoder.layer[1].output.LayerNorm.bias[0] += float(lam[0]) * 4.0
        ref.encoder.layer[1].output.LayerNorm.bias[1] += float(lam[1]) * 1.0
        from alloykit.eval.model import forward

        from alloykit.eval.heads import linear_heads

        head = linear_heads(f["e1x4"] / "heads.safetensors")[TOY]
        data = objective.data[0]
        ids, mask = data.batch(torch.arange(len(data)))
        h = softmax_entropy(head(forward(ref, ids, mask))).mean()
    assert res.entropy_final == pytest.approx(float(h), abs=1e-5)
    # layer-wise: only the LayerNorm bias of the confident model has a gradient
    res = adamerging(tv, objective, granularity="layer", steps=10, lr=0.05, batch_size=16)
    g = res.groups.index(LN_BIAS)
    assert res.coefficients[0, g] > 0.7
    others = torch.cat([res.coefficients[0, :g], res.coefficients[0, g + 1:], res.coefficients[1]])
    assert torch.equal(others, torch.full_like(others, 0.3))


def test_clamp_holds_the_coefficients(toy):
    _, f = toy
    encoder, objective = _toy_objective(toy)
    encoder.requires_grad_(False)
    tv = TaskVectorModel({n: p.detach() for n, p in encoder.named_parameters()},
                         [load_file(f["e1x4"] / "encoder" / "model.safetensors").__getitem__])
    res = adamerging(tv, objective, steps=20, lr=0.2, init=0.1, clamp=(0.0, 0.25))
    assert float(res.coefficients.max()) == 0.25  # pushed up against the upper bound


# -- round trips through `alloykit merge` ---------------------------------------------------------
def test_encoder_layerwise_recipe_merges_to_the_searched_model(toy, tmp_path):
    root, f = toy
    recipe, out = tmp_path / "ada.yaml", tmp_path / "merged"
    assert main(["search", "adamerging", "--base", str(root / "base"), "--models", str(f["e1x4"]), str(f["e2"]),
                 "--task", TOY, "--granularity", "layer", "--steps", "4", "--lr", "0.05", "--samples", "32", "-q",
                 "--out", str(recipe)]) == 0
    text = recipe.read_text()
    assert "# alloykit search adamerging" in text and "labels unused" in text and "4 steps" in text
    assert main(["merge", str(recipe), str(out), "-q"]) == 0
    base = _state(root / "base")
    names = [n for n, p in _tiny_bert().named_parameters()]
    lam = _coefficients(recipe, names)
    fts = [_state(f[n] / "encoder") for n in ("e1x4", "e2")]
    tv = TaskVectorModel({n: base[n] for n in names}, [ft.__getitem__ for ft in fts])
    expect, merged = tv.params(lam), _state(out)
    for n in names:
        assert torch.equal(merged[n], expect[n]), n  # bit for bit in fp32
    assert lam[1].eq(0.3).all() and lam[0, names.index(LN_BIAS)] > 0.3


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_llama_recipe_merges_to_the_functional_model(family, tmp_path, granularity):
    from transformers import AutoModelForCausalLM

    from alloykit.search.run import adamerging_search

    base_dir, tunes = family
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat sat on the mat"}\n"a plain JSON string"\n{"text": "tokens are bytes here"}\n')
    text, res = adamerging_search(str(base_dir), [str(t) for t in tunes[:2]], data=[str(data)], granularity=granularity,
                                  steps=3, lr=0.05, seed=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert main(["merge", str(recipe), str(tmp_path / "m"), "-q"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    base, fts = _state(base_dir), [_state(t) for t in tunes[:2]]
    names = [n for n, _ in model.named_parameters()]
    tv = TaskVectorModel({n: base[n] for n in names}, [ft.__getitem__ for ft in fts])
    assert torch.equal(_coefficients(recipe, names), res.coefficients.expand(2, len(names)))
    params, merged = tv.params(res.coefficients), _state(tmp_path / "m")
    assert all(torch.equal(merged[n], params[n]) for n in names)
    ids = torch.tensor([list(b"the cat sat")])
    with torch.no_grad():
        functional = torch.func.functional_call(model, params, (ids,)).logits
        assert torch.equal(merged_model(ids).logits, functional)
    assert res.entropy_final < res.entropy_init  # three steps downhill
    assert f"entropy (nats, summed over tasks): {res.entropy_init:.4f}" in text


# -- soups ------------------------------------------------------------------------------------
def test_greedy_soup_cli_leaves_out_the_harmful_model(toy, tmp_path):
    """e2 and e3 are invisible to the head (accuracy 1.0 each and together); e1x100 says "pos" for everything."""
    root, f = toy
    recipe = tmp_path / "soup.yaml"
    models = [str(f[n]) for n in ("e1x100", "e2", "e3")]
    assert main(["search", "greedy-soup", "--base", str(root / "base"), "--models", *models, "--task", TOY,
                 "--out", str(recipe)]) == 0
    r = load_recipe(recipe)
    assert r.merge_method == "linear" and [m.model for m in r.models] == [str(f["e2"] / "encoder"), str(f["e3"] / "encoder")]
    text = recipe.read_text()
    assert f"individual {models[1]}: 1.0000" in text and f"individual {models[2]}: 1.0000" in text
    assert "left out" in text and "soup of 2 of 3 models: validation score 1.0000" in text
    assert main(["search", "uniform-soup", "--base", str(root / "base"), "--models", *models, "--out",
                 str(tmp_path / "u.yaml")]) == 0
    u = yaml.safe_load((tmp_path / "u.yaml").read_text())
    assert u["merge_method"] == "linear" and len(u["models"]) == 3 and u["parameters"] == {"normalize": True}


# -- mistakes ---------------------------------------------------------------------------------
def test_bad_inputs_get_one_line_and_exit_2(toy, family, tmp_path, capsys):
    from alloykit.testing.fixtures import LlamaShape, write_llama

    root, f = toy
    base_dir, tunes = family
    other = write_llama(tmp_path / "wide", LlamaShape(hidden=32, intermediate=64))
    out = str(tmp_path / "r.yaml")
    cases = {
        "unknown task 'nope'": ["--base", str(root / "base"), "--models", str(f["e2"]), "--task", "nope"],
        "no such file or folder": ["--base", str(root / "base"), "--models", str(tmp_path / "missing"), "--task", TOY],
        "must share the base's architecture": ["--base", str(base_dir), "--models", str(other), "--data", out],
        "lower bound exceeds": ["--base", str(base_dir), "--models", str(tunes[0]), "--data", out, "--clamp", "1", "0"],
        "give either --task": ["--base", str(base_dir), "--models", str(tunes[0])],
    }
    for want, args in cases.items():
        assert main(["search", "adamerging", *args, "--out", out]) == 2, want
        err = capsys.readouterr().err.strip()
        assert want in err and err.count("\n") == 0 and err.startswith("alloykit: error:"), err
