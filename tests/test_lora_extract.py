"""extract-lora: truncated SVD of deltas, checked by Eckart-Young and by loading the adapter in PEFT."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloykit.testing.fixtures import LlamaShape, write_llama
from alloykit.testing.helpers import run_cli as cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_extract_exact_low_rank_delta_loads_in_peft(tmp_path):
    base = write_llama(tmp_path / "base")
    ft = tmp_path / "ft"
    import shutil

    shutil.copytree(base, ft)
    sd = load_file(str(ft / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight", "lm_head.weight"):
        w = sd[name]
        sd[name] = w + 0.05 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    sd["model.norm.weight"] = sd["model.norm.weight"] + 0.1
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    r = subprocess.run([sys.executable, "-m", "alloykit.cli.main", "extract-lora", str(ft), str(tmp_path / "ad"),
                        "--base", str(base), "--rank", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 linear layers as LoRA" in r.stdout and "1 tensors saved whole" in r.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "ad").merge_and_unload().state_dict()
    for name, want in sd.items():
        torch.testing.assert_close(merged[name], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_extract_errors(tmp_path):
    base = write_llama(tmp_path / "base")
    r = subprocess.run([sys.executable, "-m", "alloykit.cli.main", "extract-lora", str(base), str(tmp_path / "ad"),
                        "--base", str(base), "--rank", "4"], capture_output=True, text=True)
    assert r.returncode == 2 and "nothing to extract" in r.stderr
    assert not (tmp_path / "ad").exists()


MERGEKIT_EXTRACT = Path(sys.executable).parent / "mergekit-extract-lora"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A base and a fine-tune: rank-3 deltas on layers 0 and 1, full-rank noise on layer 2,
    a rank-2 change of the token embedding, a shifted final norm."""
    root = tmp_path_factory.mktemp("extract-flags")
    base = write_llama(root / "base", LlamaShape(layers=3))
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    for name, w in list(sd.items()):
        if w.dim() == 2 and "embed" not in name:
            rank = 3 if ".layers.2." not in name else min(w.shape)
            sd[name] = w + 0.05 * torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g) / rank
    sd["model.embed_tokens.weight"] += 0.05 * torch.randn(256, 2, generator=g) @ torch.randn(2, 64, generator=g)
    sd["model.norm.weight"] += 0.1
    (root / "ft").mkdir()
    save_file(sd, str(root / "ft" / "model.safetensors"), metadata={"format": "pt"})
    (root / "ft" / "config.json").write_text((base / "config.json").read_text())
    return root, base, root / "ft", sd


def products(adapter: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Each module's update B A (scale 1: lora_alpha = r everywhere, as both tools write)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k in t:
        if k.endswith("lora_A.weight"):
            module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = t[k.replace("lora_A", "lora_B")] @ t[k]
    return out, cfg


@pytest.mark.skipif(not MERGEKIT_EXTRACT.exists(), reason="mergekit not installed")
def test_mergekit_extract_lora_command_line_gives_mergekits_adapter(tuned, tmp_path, capsys):
    """The same flags to both tools: the same modules, the same per-module ranks (--sv-epsilon),
    the same updates where the delta has rank <= max-rank, and on full-rank deltas an error
    within the stated bound of the exact SVD's (which mergekit computes)."""
    root, base, ft, sd = tuned
    flags = ["--model", ft, "--base-model", base, "--max-rank", "4", "--sv-epsilon", "1e-4", "-e", r"mlp\.down_proj"]
    code, out, err = cli(capsys, "extract-lora", *flags, "--out-path", tmp_path / "ours", "--lazy-unpickle", "--no-copy-tokenizer")
    assert code == 0, err
    r = subprocess.run([str(MERGEKIT_EXTRACT), *map(str, flags), "--out-path", str(tmp_path / "theirs")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours, our_cfg = products(tmp_path / "ours")
    theirs, their_cfg = products(tmp_path / "theirs")
    changed = {m for m in theirs if float(theirs[m].abs().max()) > 0}  # mergekit also writes unchanged modules
    assert set(ours) - {"lm_head"} == changed - {"lm_head"}  # lm_head: mergekit saves it whole, alloykit as LoRA
    assert not any("down_proj" in m for m in ours)
    assert {m: r for m, r in our_cfg["rank_pattern"].items() if m != "lm_head"} == {
        m: r for m, r in their_cfg["rank_pattern"].items() if m in changed}
    assert set(our_cfg["rank_pattern"].values()) == {3}  # rank-3 deltas: the epsilon cut the 4th direction
    b = load_file(str(base / "model.safetensors"))
    for m in ours.keys() & changed:
        delta = sd[m + ".weight"] - b[m + ".weight"]
        if ".layers.2." in m:  # full rank: both near the Eckart-Young optimum (mergekit's is exact)
            e_ours = torch.linalg.vector_norm(delta - ours[m])
            e_theirs = torch.linalg.vector_norm(delta - theirs[m])
            assert float(e_ours / e_theirs) - 1 < 1e-3, m
        else:
            torch.testing.assert_close(ours[m], theirs[m], rtol=1e-4, atol=1e-5, msg=lambda s: f"{m}: {s}")


def test_extract_lora_flags_embed_lora_save_module_scale(tuned, tmp_path, capsys):
    root, base, ft, sd = tuned
    code, out, err = cli(capsys, "extract-lora", ft, tmp_path / "ad", "--base", base, "--max-rank", "3",
                         "--embed-lora", "--save-module", "lm_head", "--no-distribute-scale", "-i", r"layers\.[01]\.",
                         "-i", "embed", "-i", "lm_head", "-i", r"model\.norm", "--per-layer")
    assert code == 0, err
    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in t  # the embedding as LoRA (rank 2 exactly)
    assert cfg["modules_to_save"] == ["lm_head", "model.norm"] and "base_model.model.lm_head.weight" in t
    assert not any(".layers.2." in k for k in t)  # --include-regex
    q = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(q.T @ q, torch.eye(3), atol=1e-5, rtol=0)  # --no-distribute-scale: B = U
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "ad").merge_and_unload().state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(merged[name], sd[name], rtol=1e-4, atol=1e-5, msg=lambda s: f"{name}: {s}")


def test_extract_lora_refuses_remote_code_and_double_arguments(tuned, tmp_path, capsys):
    root, base, ft, sd = tuned
    code, out, err = cli(capsys, "extract-lora", "--model", ft, "--base-model", base, "--out-path", tmp_path / "o",
                         "--trust-remote-code")
    assert code == 2 and "never runs code" in err
    code, out, err = cli(capsys, "extract-lora", ft, tmp_path / "o", "--model", base, "--base", base)
    assert code == 2 and "given twice" in err
    code, out, err = cli(capsys, "extract-lora", "--base", base, "--out-path", tmp_path / "o")
    assert code == 2 and "--model" in err
    assert not (tmp_path / "o").exists()
