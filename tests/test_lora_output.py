"""merge --output-lora: the merged model's delta as a PEFT adapter, checked against the dense merge."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import alloykit
from alloykit.io.checkpoint import Checkpoint
from alloykit.testing.fixtures import write_llama
from alloykit.testing.helpers import run_cli as cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
LOW_RANK = ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight", "lm_head.weight")

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and two fine-tunes whose deltas are rank 1 on three linear layers (+ a norm shift)."""
    root = tmp_path_factory.mktemp("outlora")
    base = write_llama(root / "base")
    g = torch.Generator().manual_seed(3)
    fts = []
    for i in (1, 2):
        ft = root / f"ft{i}"
        shutil.copytree(base, ft)
        sd = load_file(str(ft / "model.safetensors"))
        for name in LOW_RANK:
            w = sd[name]
            sd[name] = w + 0.05 * torch.randn(w.shape[0], 1, generator=g) @ torch.randn(1, w.shape[1], generator=g)
        sd["model.norm.weight"] = sd["model.norm.weight"] + 0.1 * i
        save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
        fts.append(ft)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, (0.7, 0.5))]}
    dense = alloykit.merge(recipe, root / "dense", progress=False)
    return root, base, recipe, load_file(str(dense / "model.safetensors"))


def peft_merged(base, adapter):
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    return peft.PeftModel.from_pretrained(model, adapter)


def test_exactly_low_rank_merge_is_recovered_exactly_by_the_cli(family, tmp_path, capsys):
    root, base, recipe, dense = family
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = cli(capsys, "merge", tmp_path / "r.yaml", tmp_path / "ad", "--output-lora", 2, "--quiet")
    assert code == 0, err
    assert "3 linear layers as LoRA" in out and "1 tensors saved whole" in out
    assert not (tmp_path / "ad" / "model.safetensors").exists()  # an adapter instead of the model
    report = {e["name"]: e for e in json.loads((tmp_path / "ad" / "alloykit_extract_report.json").read_text())}
    assert all(report[n]["kind"] == "lora" and report[n]["rel_error"] < 1e-5 for n in LOW_RANK)
    pm = peft_merged(base, tmp_path / "ad")
    ids = torch.arange(3, 43).view(2, 20)
    dense_model = transformers.AutoModelForCausalLM.from_pretrained(root / "dense")
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, dense_model(ids).logits, rtol=1e-4, atol=1e-4)
    merged = pm.merge_and_unload().state_dict()
    for name, want in dense.items():
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_truncation_error_is_reported_and_is_the_eckart_young_bound(family, tmp_path):
    root, base, recipe, dense = family
    out = alloykit.merge(recipe, tmp_path / "ad1", output_lora=1, progress=False)  # the Python API
    b = Checkpoint(base)
    report = {e["name"]: e for e in json.loads((out / "alloykit_extract_report.json").read_text())}
    merged = peft_merged(base, out).merge_and_unload().state_dict()
    for name in LOW_RANK:
        delta = (dense[name] - b.read(name)).double()
        s = torch.linalg.svdvals(delta)
        bound = s[1:].square().sum().sqrt()
        err = torch.linalg.vector_norm(merged[name].double() - dense[name].double())
        torch.testing.assert_close(err, bound, rtol=1e-3, atol=1e-5)
        assert report[name]["rel_error"] == pytest.approx(float(bound / s.square().sum().sqrt()), rel=1e-3, abs=1e-6)


def test_output_lora_errors(family, tmp_path, capsys):
    root, base, recipe, dense = family
    no_base = {k: v for k, v in recipe.items() if k != "base_model"} | {"merge_method": "linear"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(no_base))
    code, out, err = cli(capsys, "merge", tmp_path / "r.yaml", tmp_path / "ad", "--output-lora", 2)
    assert code == 2 and "no base_model" in err
    assert not (tmp_path / "ad").exists()
