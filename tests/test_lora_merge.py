"""merge-lora: exact cat, SVD truncation at the Eckart-Young error, task-vector methods on dense deltas."""

import subprocess
import sys

import pytest
import torch

import alloykit
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.lora import LoraCheckpoint
from alloykit.testing.fixtures import write_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
CLI = [sys.executable, "-m", "alloykit.cli.main"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmerge")
    base = write_llama(root / "base")
    for i, targets in ((1, ["q_proj", "up_proj"]), (2, ["q_proj", "v_proj"])):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(root / f"a{i}")
    return root, base


def dense(root, base, names):
    cks = [LoraCheckpoint(Checkpoint(base), root / f"a{i}", "a") for i in (1, 2)]
    return {n: [ck.delta(n) if ck.delta(n) is not None else torch.zeros(ck.info(n).shape) for ck in cks] for n in names}


def load_merged(base, adapter):
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def run(*args):
    r = subprocess.run(CLI + ["merge-lora", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_cat_is_exact_and_loads_in_peft(setup, tmp_path):
    root, base = setup
    run(root / "a1", root / "a2", tmp_path / "cat", "--base", base, "--weights", "0.3", "0.7")
    merged = load_merged(base, tmp_path / "cat")
    b = Checkpoint(base)
    names = [n for n in b.tensors if any(m in n for m in ("q_proj", "v_proj", "up_proj"))]
    for n, (d1, d2) in dense(root, base, names).items():
        torch.testing.assert_close(merged[n], b.read(n) + 0.3 * d1 + 0.7 * d2, rtol=1e-5, atol=1e-6)


def test_svd_truncation_error_is_the_discarded_singular_values(setup, tmp_path):
    root, base = setup
    out = run(root / "a1", root / "a2", tmp_path / "svd", "--base", base, "--method", "svd", "--rank", "3")
    assert "truncation error" in out
    merged = load_merged(base, tmp_path / "svd")
    b = Checkpoint(base)
    n = "model.layers.1.self_attn.q_proj.weight"
    d1, d2 = dense(root, base, [n])[n]
    full = d1 + d2
    s = torch.linalg.svdvals(full)
    err = torch.linalg.vector_norm(merged[n] - b.read(n) - full)
    torch.testing.assert_close(err, s[3:].square().sum().sqrt(), rtol=1e-3, atol=1e-5)


def test_ties_on_dense_deltas_matches_the_engine(setup, tmp_path):
    root, base = setup
    run(root / "a1", root / "a2", tmp_path / "ties", "--base", base, "--method", "ties", "--rank", "64", "--density", "0.5")
    merged = load_merged(base, tmp_path / "ties")
    engine = alloykit.merge({"merge_method": "ties", "base_model": str(base),
                             "models": [{"model": f"{base}+{root / f'a{i}'}", "parameters": {"weight": 1.0, "density": 0.5}} for i in (1, 2)]},
                            tmp_path / "engine", progress=False)
    e = Checkpoint(engine)
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight"):
        torch.testing.assert_close(merged[n], e.read(n), rtol=1e-4, atol=1e-5)


def test_merge_lora_errors(setup, tmp_path):
    root, base = setup
    r = subprocess.run(CLI + ["merge-lora", str(root / "a1"), str(root / "a2"), str(tmp_path / "o"), "--base", str(base), "--method", "ties"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "give --rank" in r.stderr
    r = subprocess.run(CLI + ["merge-lora", str(root / "a1"), str(root / "a2"), str(tmp_path / "o"), "--base", str(base), "--weights", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "one weight per adapter" in r.stderr


def test_conv1d_and_embedding_adapters_keep_peft_layout(tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out) and embedding updates are (B A)^T in PEFT: cat, the dense
    methods, KnOTS and LoraHub write them so, and the result loads in PEFT."""
    from alloykit.lora.merge import merge_adapters

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    for i in (1, 2):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], fan_in_fan_out=True, init_lora_weights=False)
        peft.get_peft_model(model, conf).save_pretrained(tmp_path / f"a{i}")
    cks = [LoraCheckpoint(Checkpoint(base), tmp_path / f"a{i}", "a") for i in (1, 2)]
    names = sorted(cks[0]._deltas)
    assert {cks[0].layout(n) for n in names} == {"fan_in_fan_out", "embedding"}
    b = Checkpoint(base)
    runs = {"svd": dict(method="svd", rank=8), "knots": dict(method="knots", knots_merge="task_arithmetic", rank=8),
            "hub": dict(method="lorahub", weights=[1.0, 0.0]), "cat": dict(method="cat")}
    for label, kw in runs.items():
        merge_adapters([tmp_path / "a1", tmp_path / "a2"], base, tmp_path / label, **kw)
        merged = load_merged(base, tmp_path / label)
        for n in names:
            want = b.read(n) + cks[0].delta(n) + (0 if label == "hub" else cks[1].delta(n))
            torch.testing.assert_close(merged[n], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{label} {n}: {m}")
