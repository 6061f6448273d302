"""merge-lora: exact cat, SVD truncation at the Eckart-Young error, task-vector methods on dense deltas."""

import subprocess
import sys

import pytest
import torch

import alloykit
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.lora import LoraCheckpoint
from alloykit.testing.fixtures import write_llama
from alloykit.testing.helpers import run_cli as cli

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


def test_sce_runs_through_the_planners_resolver_and_matches_the_engine(setup, tmp_path, capsys):
    """sce has no per-model weight: merge-lora used to pass one anyway and fail."""
    root, base = setup
    code, out, err = cli(capsys, "merge-lora", root / "a1", root / "a2", tmp_path / "sce", "--base", base,
                         "--method", "sce", "--rank", "64")
    assert code == 0 and "merged 2 adapters with sce" in out, err
    merged = load_merged(base, tmp_path / "sce")
    engine = alloykit.merge({"merge_method": "sce", "base_model": str(base),
                             "models": [{"model": f"{base}+{root / f'a{i}'}"} for i in (1, 2)]}, tmp_path / "engine", progress=False)
    e = Checkpoint(engine)
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(merged[n], e.read(n), rtol=1e-4, atol=1e-5)
    capsys.readouterr()  # transformers' loading bars
    code, out, err = cli(capsys, "merge-lora", root / "a1", root / "a2", tmp_path / "o", "--base", base,
                         "--method", "sce", "--rank", "8", "--weights", "1", "2")
    assert code == 2 and "merge-lora --weights: unknown parameter 'weight' for method sce" in err and "\n" not in err
    code, out, err = cli(capsys, "merge-lora", root / "a1", root / "a2", tmp_path / "o", "--base", base,
                         "--method", "ties", "--rank", "8", "--density", "1.5")
    assert code == 2 and "density" in err and "\n" not in err and not (tmp_path / "o").exists()


def test_merge_lora_recipe_is_typed_and_read_with_the_guarded_loader(setup, tmp_path, capsys):
    root, base = setup
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "a1").symlink_to(root / "a1")
    good = (f"merge_lora:\n  base: {base}\n  adapters: [a1, {root / 'a2'}]\n  method: ties\n  rank: 8\n"
            "  weights: [1.0, 0.5]\n  parameters: {density: 0.5}\n")
    (recipes / "r.yaml").write_text(good)
    code, out, err = cli(capsys, "merge-lora", "--recipe", recipes / "r.yaml", tmp_path / "out")  # 'a1': from the recipe's folder
    assert code == 0, err
    record = (tmp_path / "out" / "alloykit_recipe.yaml").read_text()
    assert "method: ties" in record and "density: 0.5" in record
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(  # an alias bomb: 10^6 values from 6 lines
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcde", "bcdef"))
    for text, message in ((good + "  method: cat\n", "key 'method' appears twice"),
                          (good.replace("weights:", "wieghts:"), "unknown key 'merge_lora.wieghts' (did you mean 'weights'?)"),
                          (good.replace("rank: 8", "rank: 0"), "'merge_lora.rank' = 0"),
                          ("merge_lora: 3\n", "'merge_lora' = 3"),
                          (bomb, "holds more than 20000 values"),
                          ("!!python/object:os.system {}\n", "invalid YAML")):
        (recipes / "bad.yaml").write_text(text)
        code, out, err = cli(capsys, "merge-lora", "--recipe", recipes / "bad.yaml", tmp_path / "bad")
        assert code == 2 and message in err and "\n" not in err, (text, err)
        assert not (tmp_path / "bad").exists()
