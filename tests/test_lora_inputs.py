"""LoRA adapters as merge inputs: folded lazily, checked against PEFT's merge_and_unload."""

import json
import shutil

import pytest
import torch

import alloykit
from alloykit.errors import AlloyError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.lora import LoraCheckpoint
from alloykit.testing.fixtures import LlamaShape, write_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("lora") / "base")


def make_adapter(model_dir, out, seed=0, **cfg):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(init_lora_weights=False, **cfg)  # random B: a nonzero update
    pm = peft.get_peft_model(model, config)
    pm.save_pretrained(out)
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_folded_equals_peft(base_dir, adapter_dir, expected):
    ck = LoraCheckpoint(Checkpoint(base_dir), adapter_dir, "lora")
    changed = 0
    for name in ck.tensors:
        torch.testing.assert_close(ck.read(name).float(), expected[name].float(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        changed += not torch.equal(ck.base.read(name).float(), expected[name].float())
    assert changed >= 2  # the adapter really changed some tensors
    ck.close()


CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}),
    "embedding+modules_to_save": dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_folded_weights_match_peft(kind, base, tmp_path):
    expected = make_adapter(base, tmp_path / "ad", **CONFIGS[kind])
    assert_folded_equals_peft(base, tmp_path / "ad", expected)


def test_fan_in_fan_out_gpt2(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    expected = make_adapter(tmp_path / "gpt2", tmp_path / "ad", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ck = LoraCheckpoint(Checkpoint(tmp_path / "gpt2"), tmp_path / "ad", "lora")
    for name in ck.tensors:
        key = name if name in expected else "transformer." + name
        torch.testing.assert_close(ck.read(name).float(), expected[key].float(), rtol=1e-5, atol=1e-6)


def test_base_plus_adapter_recipe_merges(base, tmp_path):
    e1 = make_adapter(base, tmp_path / "a1", seed=1, **CONFIGS["plain"])
    e2 = make_adapter(base, tmp_path / "a2", seed=2, **CONFIGS["plain"])
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": f"{base}+{tmp_path / 'a1'}", "parameters": {"weight": 0.5}},
                         {"model": str(tmp_path / "a2"), "parameters": {"weight": 0.5}}]}  # adapter folder naming its base
    out = alloykit.merge(recipe, tmp_path / "out", progress=False)
    merged = Checkpoint(out)
    b = Checkpoint(base)
    for name in merged.tensors:
        key = name if name in e1 else name
        want = b.read(name) + 0.5 * (e1[key] - b.read(name)) + 0.5 * (e2[key] - b.read(name))
        torch.testing.assert_close(merged.read(name), want, rtol=1e-5, atol=1e-6)


def test_bad_adapters(base, tmp_path):
    make_adapter(base, tmp_path / "ok", **CONFIGS["plain"])
    other = write_llama(tmp_path / "other", LlamaShape(hidden=32, intermediate=48))
    with pytest.raises(AlloyError, match="is this the adapter's base model"):
        LoraCheckpoint(Checkpoint(other), tmp_path / "ok", "x")
    broken = tmp_path / "noconfig"
    shutil.copytree(tmp_path / "ok", broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(AlloyError, match="no adapter_config.json"):
        LoraCheckpoint(Checkpoint(base), broken, "x")
    dora = tmp_path / "dora"
    shutil.copytree(tmp_path / "ok", dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AlloyError, match="DoRA"):
        LoraCheckpoint(Checkpoint(base), dora, "x")
    # an adapter for a module the base does not have
    gpt = tmp_path / "gptlike"
    cfg2 = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=256, n_positions=32)
    transformers.GPT2LMHeadModel(cfg2).save_pretrained(gpt)
    make_adapter(gpt, tmp_path / "gpt_ad", r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(AlloyError, match="does not have"):
        LoraCheckpoint(Checkpoint(base), tmp_path / "gpt_ad", "x")
