"""GGUF inputs and outputs, checked against transformers' own GGUF loading and the gguf library.

Oracles: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (transformers' reader,
with its own name map and Q/K un-permutation) for every tensor alloykit reads or writes;
``gguf.quants.quantize``/``dequantize`` for what a quantized type must hold.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lm_fixtures import (alloykit_cache, base_and_tune, merge_recipe, smol_tokenizer, smollm2_gguf,  # noqa: F401 (fixture)
                         state_dict, tiny_causal_lm)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from alloykit.cli.main import main  # noqa: E402
from alloykit.io.checkpoint import Checkpoint  # noqa: E402
from alloykit.io.gguf import GGUFCheckpoint, permute_qk  # noqa: E402
from alloykit.io.gguf_write import write_gguf  # noqa: E402
from alloykit.merge import merge  # noqa: E402


def test_permutation_matches_llama_cpp_formula():
    # llama.cpp's convert_hf_to_gguf: w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    w = torch.arange(8 * 3 * 5, dtype=torch.float32).reshape(8 * 3, 5)
    want = w.numpy().reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(24, 5)
    assert np.array_equal(permute_qk(w, 3).numpy(), want)
    assert torch.equal(permute_qk(permute_qk(w, 3), 3, inverse=True), w)


@pytest.mark.slow
def test_real_smollm2_gguf_equals_transformers_loading():
    """SmolLM2-135M-Instruct Q4_1 (Q8_0 embeddings, F32 norms): every tensor equal to transformers'."""
    path = smollm2_gguf()
    ref = state_dict(path.parent, path.name)
    ck = GGUFCheckpoint(path)
    try:
        assert set(ck.tensors) == set(ref) - {"lm_head.weight"}  # tied: lm_head is the embedding
        for name in ck.tensors:
            got = ck.read(name)
            assert got.dtype == torch.float32 and torch.equal(got, ref[name]), name
        cfg = ck.config()
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
        assert cfg["num_hidden_layers"] == 30 and cfg["num_key_value_heads"] == 3
        tok = transformers.AutoTokenizer.from_pretrained(str(ck.tokenizer_folder()))
        ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        text = 'Definition of "cat": a small domesticated carnivore, Übergröße 42'
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    finally:
        ck.close()


@pytest.mark.parametrize("arch,tie,tokenizer", [("llama", True, True), ("llama", False, False), ("qwen2", True, False),
                                                ("qwen3", False, False)])
def test_write_f32_then_transformers_reads_the_same_model(tmp_path, smol_tokenizer, arch, tie, tokenizer):
    """alloykit's writer (F32) -> transformers' GGUF reader: every tensor equals the source; alloykit's
    reader gives the source's tensors back (Q/K permutation undone, GQA key heads). The tokenizer
    (49k tokens, slow to write and parse) is checked once."""
    src = tiny_causal_lm(tmp_path / "src", smol_tokenizer if tokenizer else None, seed=1, arch=arch, tie=tie)
    (tmp_path / "g").mkdir()
    out = write_gguf(src, tmp_path / "g" / "m.gguf", "f32")
    want = state_dict(src)
    got = state_dict(out.parent, out.name)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    ck = GGUFCheckpoint(out)
    try:
        for name in Checkpoint(src).tensors:
            assert torch.equal(ck.read(name), want[name]), name
        assert ("lm_head.weight" in ck.tensors) == (not tie)
    finally:
        ck.close()
    if tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
        ref = transformers.AutoTokenizer.from_pretrained(str(src))
        text = "Question: what is a wavelength?\nAnswer: the inverse of frequency <|im_end|>"
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
        assert tok.chat_template == ref.chat_template and tok.eos_token == ref.eos_token


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_1"])
def test_quantized_output_holds_the_gguf_library_rounding(tmp_path, qtype):
    src = tiny_causal_lm(tmp_path / "src", None, seed=2)  # no tokenizer: the tensors are what this checks
    out = write_gguf(src, tmp_path / f"m.{qtype}.gguf", qtype)
    got = state_dict(tmp_path, out.name)
    gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay F32
    assert types["blk.0.attn_q.weight"] == gtype and types["token_embd.weight"] == gtype
    for name, w in state_dict(src).items():
        if w.dim() == 1:
            want = w
        else:  # quantization blocks run along rows, so it commutes with llama.cpp's row permutation
            want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gtype), gtype))
        assert torch.equal(got[name], want.float()), name


@pytest.mark.slow
def test_gguf_base_merges_with_safetensors_and_generates(tmp_path, smol_tokenizer):
    """A GGUF base + a safetensors fine-tune: the merge equals the same merge of the base's
    safetensors copy, writes config and tokenizer from the GGUF, and generates."""
    base_hf, ft = base_and_tune(tmp_path, smol_tokenizer, seeds=(3, 4), noise=0.02)
    gdir = tmp_path / "gguf-base"
    gdir.mkdir()
    write_gguf(base_hf, gdir / "base.q8_0.gguf", "q8_0")  # a quantized base, as downloaded GGUFs are
    deq = tmp_path / "base-deq"
    assert main(["convert", str(gdir), str(deq), "--quiet"]) == 0  # the folder holding one .gguf
    recipe = {"merge_method": "task_arithmetic", "base_model": str(gdir), "parameters": {"weight": 0.7},
              "models": [{"model": str(ft)}]}
    merge(recipe, tmp_path / "m-gguf", progress=False)
    merge(dict(recipe, base_model=str(deq)), tmp_path / "m-hf", progress=False)
    a, b = Checkpoint(tmp_path / "m-gguf"), Checkpoint(tmp_path / "m-hf")
    base_deq, ftc = Checkpoint(deq), Checkpoint(ft)
    for name in a.tensors:
        assert torch.equal(a.read(name), b.read(name)), name
        want = base_deq.read(name) + 0.7 * (ftc.read(name) - base_deq.read(name))
        torch.testing.assert_close(a.read(name), want, rtol=0, atol=1e-6)
    out = tmp_path / "m-gguf"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert (out / "tokenizer.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok("The cat", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)
    # greedy decoding = argmax of the merged weights' own logits, step by step
    seq = ids
    for _ in range(5):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq)


def test_merge_output_format_gguf(tmp_path, smol_tokenizer, capsys):
    base, ft = base_and_tune(tmp_path, smol_tokenizer, seeds=(5, 6), noise=0.02)
    recipe = (f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
              f"  - model: {ft}\n    parameters: {{weight: 0.5}}\n")
    merge_recipe(tmp_path, recipe, "st")
    merge_recipe(tmp_path, recipe, "gg", "--output-format", "gguf", "--gguf-type", "q8_0")
    # alloykit convert FOLDER OUT.gguf writes the same file the merge wrote
    assert main(["convert", str(tmp_path / "st"), str(tmp_path / "c.gguf"), "--type", "q8_0", "--quiet"]) == 0
    converted = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "c.gguf")).tensors}
    for t in gguf.GGUFReader(str(tmp_path / "gg" / "model.Q8_0.gguf")).tensors:
        assert converted[t.name].tensor_type == t.tensor_type and np.array_equal(converted[t.name].data, t.data), t.name
    files = sorted(p.name for p in (tmp_path / "gg").iterdir())
    assert "model.Q8_0.gguf" in files and not any(f.endswith(".safetensors") for f in files)
    got = state_dict(tmp_path / "gg", "model.Q8_0.gguf")
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, w in state_dict(tmp_path / "st").items():
        want = w if w.dim() == 1 else torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8))
        assert torch.equal(got[name], want), name
    # the GGUF output folder is itself a valid input (a folder holding one .gguf)
    ck = GGUFCheckpoint(tmp_path / "gg" / "model.Q8_0.gguf")
    assert set(ck.tensors) == set(Checkpoint(tmp_path / "st").tensors)
    n2d = sum(1 for i in ck.tensors.values() if len(i.shape) == 2)
    assert ck.stored_types == {"Q8_0": n2d, "F32": len(ck.tensors) - n2d}
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "gg")]) == 0
    assert f"stored in GGUF as: Q8_0 x{n2d}, F32 x{len(ck.tensors) - n2d}" in capsys.readouterr().out  # most first


def test_converted_metadata_is_cached_and_follows_the_file(tmp_path, smol_tokenizer, alloykit_cache):
    src = tiny_causal_lm(tmp_path / "a", smol_tokenizer, seed=7, layers=2)
    g = write_gguf(src, tmp_path / "m.gguf", "f32")
    ck = GGUFCheckpoint(g)
    assert ck.config()["num_hidden_layers"] == 2
    tok_dir = ck.tokenizer_folder()
    assert str(tok_dir).startswith(str(alloykit_cache)) and (tok_dir / "tokenizer.json").is_file()
    ck.close()
    assert tok_dir.is_dir()  # the cache outlives the checkpoint
    again = GGUFCheckpoint(g)
    assert again.tokenizer_folder() == tok_dir and again.config() == ck.config()
    # the same path rewritten with another model: the cache key (size, mtime) changes with it
    other = tiny_causal_lm(tmp_path / "b", smol_tokenizer, seed=8, layers=3)
    write_gguf(other, g, "f32")
    assert GGUFCheckpoint(g).config()["num_hidden_layers"] == 3


def _raw_gguf(path, arch: str, qtype, n: int = 256) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.attention.head_count", 1)
    shape = gguf.quants.quant_shape_to_byte_shape((1, n), qtype)
    w.add_tensor("blk.0.attn_v.weight", np.zeros(shape, dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_unsupported_type_and_architecture_give_one_line(tmp_path, capsys):
    _raw_gguf(tmp_path / "k.gguf", "llama", gguf.GGMLQuantizationType.Q8_K)
    _raw_gguf(tmp_path / "g.gguf", "gemma2", gguf.GGMLQuantizationType.F32)
    for f, words in (("k.gguf", ["Q8_K", "llama-quantize"]), ("g.gguf", ["gemma2", "not supported"])):
        recipe = tmp_path / f"{f}.yml"
        recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / f}\n    parameters: {{weight: 1.0}}\n")
        code, err = _cli(["merge", str(recipe), str(tmp_path / f"out-{f}"), "--quiet"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err
        assert not (tmp_path / f"out-{f}").exists()


def test_bad_gguf_inputs_give_one_line(tmp_path, capsys):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        _raw_gguf(two / name, "llama", gguf.GGMLQuantizationType.F32)
    for model, words in ((tmp_path / "junk.gguf", ["not a readable GGUF"]), (two, ["2 GGUF files", "name one file"])):
        code, err = _cli(["convert", str(model), str(tmp_path / "o"), "--quiet"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err
    code, err = _cli(["convert", str(two / "a.gguf"), str(tmp_path / "o.gguf"), "--type", "q4_k"], capsys)
    assert code == 2 and "q4_k" in err and "q8_0" in err


def test_core_imports_without_gguf():
    code = ("import sys; sys.modules['gguf'] = None\n"
            "import alloykit.merge, alloykit.plan.planner, alloykit.io.gguf\n"
            "from alloykit.errors import AlloyError\n"
            "from alloykit.io.gguf import require_gguf\n"
            "try:\n    require_gguf()\nexcept AlloyError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'alloykit[gguf]'" in r.stdout
