"""``alloykit analyze``: interference statistics against hand-checkable cases and dense references."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloykit.analysis import analyze, layer_of
from alloykit.cli.main import main
from alloykit.testing.helpers import read_state as _state


@pytest.fixture(scope="module")
def signed(family, tmp_path_factory):
    """Base, A = base + tau, B = base - tau, C = A (one file each), tau from a real fixture fine-tune."""
    base_dir, tunes = family
    base, ft = _state(base_dir), _state(tunes[0])
    root = tmp_path_factory.mktemp("signed")
    paths = {}
    for name, sign in (("A", 1.0), ("B", -1.0), ("C", 1.0)):
        paths[name] = root / f"{name}.safetensors"
        save_file({n: (base[n] + sign * (ft[n] - base[n])).contiguous() for n in base}, paths[name])
    paths["base"] = root / "base.safetensors"
    save_file({n: t.contiguous() for n, t in base.items()}, paths["base"])
    tau = torch.cat([(ft[n] - base[n]).reshape(-1) for n in sorted(base)])
    return paths, tau


def test_self_negation_and_copy(signed):
    paths, tau = signed
    r = analyze([paths["A"], paths["B"], paths["C"]], paths["base"], density=1.0)
    m = r["model"]
    cos = torch.tensor(m["cosine"])
    assert torch.allclose(cos, torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=cos.dtype), atol=1e-9)
    nonzero = float((tau != 0).double().mean())
    assert nonzero > 0.99  # random fine-tunes change (almost) every entry
    assert m["sign_conflict_pairwise"][0][1] == pytest.approx(nonzero)  # A vs -A: every changed entry
    assert m["sign_conflict_pairwise"][0][2] == 0.0  # A vs its copy: none
    assert m["sign_conflict_rate"] == pytest.approx(nonzero)
    assert m["norms"][0] == pytest.approx(float(tau.double().norm()), rel=1e-9)
    # density 1 trims nothing; tau + (-tau) + tau sums to tau, so B's entries (all of the opposite sign) lose
    assert m["ties_trimmed_fraction"] == 0.0
    assert m["ties_elected_out_fraction"] == pytest.approx(1 / 3, abs=1e-6)
    for layer in r["layers"]:
        assert layer["cosine"][0][1] == pytest.approx(-1.0, abs=1e-9)
        assert layer["sign_conflict_rate"] == pytest.approx(1.0, abs=0.01)


def test_opposite_pair_ties_election_drops_half(signed):
    """tau and -tau cancel: every sum is 0, which elects +, so exactly B's kept entries are dropped."""
    paths, tau = signed
    m = analyze([paths["A"], paths["B"]], paths["base"], density=1.0)["model"]
    assert m["ties_elected_out_fraction"] == pytest.approx(0.5, abs=1e-6)


def test_against_dense_reference(family):
    base_dir, tunes = family
    base = _state(base_dir)
    taus = [{n: (t[n] - base[n]).double().reshape(-1) for n in base} for t in map(_state, tunes)]
    r = analyze(tunes, base_dir, density=0.2)
    flat = [torch.cat([t[n] for n in sorted(base)]) for t in taus]
    for i in range(3):
        for j in range(3):
            ref = float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm()))
            assert r["model"]["cosine"][i][j] == pytest.approx(ref, abs=1e-9)
            ref_conf = float(((flat[i] > 0) & (flat[j] < 0) | (flat[i] < 0) & (flat[j] > 0)).double().mean())
            assert r["model"]["sign_conflict_pairwise"][i][j] == pytest.approx(ref_conf, abs=1e-12)
    # one layer, independently: the tensors of block 1
    names = [n for n in base if ".layers.1." in n]
    a, b = (torch.cat([taus[k][n] for n in names]) for k in (0, 1))
    layer1 = next(layer for layer in r["layers"] if layer["layer"] == "layer 1")
    assert layer1["params"] == a.numel()
    assert layer1["cosine"][0][1] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-9)
    assert layer1["mean_abs"][0] == pytest.approx(float(a.abs().mean()), rel=1e-9)
    # the trim keeps about 20% per tensor (rounding: at most one entry per tensor)
    n_tensors, n_params = r["tensors"], r["model"]["params"]
    assert abs(r["model"]["ties_trimmed_fraction"] - 0.8) <= n_tensors / n_params
    # trimmed energy by a dense top-k per tensor
    for k in range(3):
        removed = total = 0.0
        for n in base:
            t = taus[k][n]
            kept = torch.topk(t.abs(), max(1, round(0.2 * t.numel()))).values
            removed += float(t.pow(2).sum() - kept.pow(2).sum())
            total += float(t.pow(2).sum())
        assert r["model"]["ties_trimmed_energy"][k] == pytest.approx(removed / total, abs=0.02)


def test_layer_groups():
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "layer 3"
    assert layer_of("encoder.layer.5.attention.self.query.weight") == "layer 5"
    assert layer_of("transformer.h.11.attn.c_attn.weight") == "layer 11"
    assert layer_of("model.embed_tokens.weight") == "embeddings"
    assert layer_of("embeddings.word_embeddings.weight") == "embeddings"
    assert layer_of("lm_head.weight") == "other"


def test_cli_writes_report_and_plots(family, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    base_dir, tunes = family
    out = tmp_path / "an"
    rc = main(["analyze", *map(str, tunes), "--base", str(base_dir), "--out", str(out), "--names", "x", "y", "z"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "cosine similarity" in text and "sign conflict" in text
    report = json.loads((out / "report.json").read_text())
    assert report["models"] == ["x", "y", "z"]
    assert [layer["layer"] for layer in report["layers"]] == ["embeddings", "layer 0", "layer 1", "layer 2", "layer 3", "other"]
    for png in ("analyze-heatmap.png", "analyze-layers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line(family, tmp_path, capsys):
    base_dir, tunes = family
    sd = load_file(next(tunes[0].glob("*.safetensors")))
    name = next(iter(sd))
    save_file({name: torch.zeros(3, 3)}, tmp_path / "bad.safetensors")
    rc = main(["analyze", str(tmp_path / "bad.safetensors"), "--base", str(base_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "has no tensor" in err
    rc = main(["analyze", str(tunes[0]), "--base", str(base_dir), "--density", "1.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--density 1.5" in err
    rc = main(["analyze", str(tmp_path / "missing"), "--base", str(base_dir)])
    assert rc == 2 and "missing" in capsys.readouterr().err


def test_default_labels_are_the_shortest_distinguishing_path_suffixes():
    from alloykit.analysis.interference import short_labels

    assert short_labels(["runs/cola/encoder", "runs/sst2/encoder"]) == ["cola/encoder", "sst2/encoder"]
    assert short_labels(["a/run/checkpoint-500", "b/run/checkpoint-500", "b/run/checkpoint-900"]) == [
        "a/run/checkpoint-500", "b/run/checkpoint-500", "checkpoint-900"]
    snap = "cache/models--org--tuned/snapshots/0123abcd"
    assert short_labels([snap, "x/encoder", "y/tuned.safetensors"]) == ["org/tuned", "encoder", "tuned"]
    assert short_labels(["m", "m"]) == ["m", "m#2"]  # the same model twice stays two rows


def test_cli_labels_the_usual_layout_apart_in_report_table_and_plots(family, tmp_path, capsys, monkeypatch):
    """runs/<task>/encoder: every model used to be labelled 'encoder' everywhere."""
    import shutil

    from alloykit.analysis import plots

    base_dir, tunes = family
    paths = []
    for task, t in zip(("cola", "sst2", "mrpc"), tunes):
        shutil.copytree(t, tmp_path / "runs" / task / "encoder")
        paths.append(str(tmp_path / "runs" / task / "encoder"))
    plotted = []
    monkeypatch.setattr(plots, "plot_report", lambda report, out: plotted.append(list(report["models"])) or [])
    rc = main(["analyze", *paths, "--base", str(base_dir), "--out", str(tmp_path / "an")])
    assert rc == 0
    text = capsys.readouterr().out
    labels = ["cola/encoder", "sst2/encoder", "mrpc/encoder"]
    assert json.loads((tmp_path / "an" / "report.json").read_text())["models"] == labels
    assert plotted == [labels]
    table = text.splitlines()[1:5]
    assert table[0].split() == labels and [row.split()[0] for row in table[1:]] == labels
    rc = main(["analyze", *paths[:2], "--base", str(base_dir), "--names", "a", "a"])
    assert rc == 2 and "'a' is given twice" in capsys.readouterr().err


def test_missing_matplotlib_fails_before_any_model_is_read(family, tmp_path, capsys, monkeypatch):
    import sys

    import alloykit.analysis

    base_dir, tunes = family
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # 'import matplotlib' now raises ImportError
    monkeypatch.setattr(alloykit.analysis, "analyze", lambda *a, **k: pytest.fail("the models were read"))
    rc = main(["analyze", *map(str, tunes), "--base", str(base_dir), "--out", str(tmp_path / "an")])
    err = capsys.readouterr().err
    assert rc == 2 and "matplotlib" in err and "--no-plots" in err and err.count("\n") == 1
    assert not (tmp_path / "an").exists()
