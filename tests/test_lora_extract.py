"""extract-lora: truncated SVD of deltas, checked by Eckart-Young and by loading the adapter in PEFT."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloykit.testing.fixtures import write_llama

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
