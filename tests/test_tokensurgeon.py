"""alloykit tokensurgeon: a donor's tokenizer on a model; new rows from pieces, or OMP as mergekit-tokensurgeon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alloykit.errors import AlloyError
from alloykit.testing.vocab_models import ADDED, fast_tokenizer, permuted, train_bpe, write_vocab_model
from alloykit.transplant import tokensurgeon

transformers = pytest.importorskip("transformers")
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("surgeon")
    tok = train_bpe()
    model = write_vocab_model(root / "model", fast_tokenizer(tok), seed=1)
    donor = write_vocab_model(root / "donor", fast_tokenizer(permuted(tok), ADDED + ["Ġhellohello"]), seed=2)
    return model, donor


def vocab(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def test_pieces_rows_by_hand(pair, tmp_path):
    model, donor = pair
    out = tokensurgeon(model, donor, tmp_path / "out", method="pieces", progress=False)
    got, m = load_file(str(out / "model.safetensors")), load_file(str(model / "model.safetensors"))
    vo, vm = vocab(out), vocab(model)
    assert vo == vocab(donor) and len(vo) == 300 + 17
    mtok = transformers.AutoTokenizer.from_pretrained(str(model))
    for name in (EMB, HEAD):
        assert got[name].shape == (317, 32)
        for t in ("Ġthe", "hello", "<s>"):  # kept: the model's row, at the donor's id
            torch.testing.assert_close(got[name][vo[t]], m[name][vm[t]])
        # new: the mean of the rows of its pieces in the model's own tokenizer
        pieces = mtok(" hellohello", add_special_tokens=False)["input_ids"]
        assert len(pieces) >= 2
        torch.testing.assert_close(got[name][vo["Ġhellohello"]], m[name][pieces].mean(0))
        pieces = mtok("newword3", add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(got[name][vo["newword3"]], m[name][pieces].mean(0))
    for key in ("layers.0.mlp.up_proj.weight", "norm.weight"):
        assert torch.equal(got["model." + key], m["model." + key])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 317
    manifest = json.loads((out / "alloykit_manifest.json").read_text())
    assert any("tokenizer donor" in i["ref"] for i in manifest["inputs"])
    assert "tokensurgeon" in (out / "alloykit_recipe.yaml").read_text()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    lm = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    ids = tok("hellohello newword3 <|im_end|>", return_tensors="pt").input_ids
    assert int(ids.max()) >= 300
    assert lm.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] == ids.shape[1] + 3


def test_omp_matches_mergekit_tokensurgeon(pair, tmp_path):
    model, donor = pair
    exe = Path(sys.executable).with_name("mergekit-tokensurgeon")
    r = subprocess.run([str(exe), str(model), str(donor), str(tmp_path / "mk"), "-k", "8"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    ak = tokensurgeon(model, donor, tmp_path / "ak", method="omp", k=8, progress=False)
    mk, got = load_file(str(tmp_path / "mk" / "model.safetensors")), load_file(str(ak / "model.safetensors"))
    assert set(mk) == set(got)
    for name in mk:
        torch.testing.assert_close(got[name], mk[name], rtol=0, atol=1e-5)
    assert vocab(tmp_path / "mk") == vocab(ak)


def test_omp_against_mergekits_batch_omp():
    from mergekit.tokensurgeon import batch_omp

    from alloykit.vocab.surgeon import omp

    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(500, 48, generator=g)
    targets = torch.randn(12, 48, generator=g)
    i1, c1 = omp(targets, atoms, 16)
    i2, c2 = batch_omp(targets, atoms, 16)
    assert torch.equal(i1.sort(1).values, i2.sort(1).values)
    r1 = torch.einsum("bk,bkd->bd", c1.float(), atoms[i1])
    r2 = torch.einsum("bk,bkd->bd", c2, atoms[i2])
    torch.testing.assert_close(r1, r2, rtol=0, atol=1e-4)
    # a target that is a sparse combination is recovered exactly
    exact = 0.5 * atoms[3] - 2.0 * atoms[77] + atoms[401]
    idx, coef = omp(exact[None], atoms, 3)
    assert sorted(idx[0].tolist()) == [3, 77, 401]
    torch.testing.assert_close(torch.einsum("k,kd->d", coef[0].float(), atoms[idx[0]]), exact, rtol=0, atol=1e-5)


def test_tied_model_and_cli_forms(tmp_path):
    tok = train_bpe()
    model = write_vocab_model(tmp_path / "m", fast_tokenizer(tok), seed=1, tied=True)
    donor = write_vocab_model(tmp_path / "d", fast_tokenizer(tok, ADDED), seed=2)
    cli = [sys.executable, "-m", "alloykit.cli.main", "tokensurgeon"]
    r = subprocess.run([*cli, str(model), "--donor", str(donor), str(tmp_path / "o"), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert HEAD not in got and got[EMB].shape[0] == 316
    r = subprocess.run([*cli, str(model), str(donor), str(tmp_path / "o2"), "-a", "subword", "-q"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    # the default is omp (as mergekit-tokensurgeon's); -a subword means pieces
    omp_ref = tokensurgeon(model, donor, tmp_path / "omp", method="omp", progress=False)
    assert torch.equal(load_file(str(omp_ref / "model.safetensors"))[EMB], got[EMB])
    pieces_ref = tokensurgeon(model, donor, tmp_path / "pieces", method="pieces", progress=False)
    assert torch.equal(load_file(str(tmp_path / "o2" / "model.safetensors"))[EMB],
                       load_file(str(pieces_ref / "model.safetensors"))[EMB])
    assert not torch.equal(load_file(str(pieces_ref / "model.safetensors"))[EMB], got[EMB])
    r = subprocess.run([*cli, str(model), str(tmp_path / "o3"), "-q"], capture_output=True, text=True)
    assert r.returncode == 2 and "MODEL DONOR OUT" in r.stderr


def test_bad_inputs_leave_no_folder(pair, tmp_path):
    model, donor = pair
    with pytest.raises(AlloyError, match="--method 'magic'"):
        tokensurgeon(model, donor, tmp_path / "o", method="magic", progress=False)
    with pytest.raises(AlloyError, match="share only"):
        tokensurgeon(model, donor, tmp_path / "o", method="omp", k=100_000, progress=False)
    empty = tmp_path / "notok"
    empty.mkdir()
    for f in ("model.safetensors", "config.json"):
        (empty / f).write_bytes((Path(donor) / f).read_bytes())
    with pytest.raises(AlloyError, match="donor folder has no tokenizer"):
        tokensurgeon(model, empty, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
