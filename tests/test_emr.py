"""EMR-merging: the unified vector, the side outputs an EMR merge writes, per-task reconstruction."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import alloykit
from alloykit.errors import CheckpointError
from alloykit.io.checkpoint import Checkpoint
from alloykit.methods import get_method
from alloykit.methods.emr import emr_unified, pack_bits, task_state_dict, unpack_bits
from alloykit.methods.registry import MergeInput
from alloykit.testing.helpers import read_state as _state


def test_unified_vector_by_hand():
    tau = torch.tensor([
        [1.0, -2.0, 0.5, 0.0, 1.0],
        [-3.0, -1.0, 0.2, 0.0, -1.0],
        [2.0, 1.0, -0.1, 0.0, 0.0],
    ])
    # sums: 0 -> sign 0 | -2 -> max of |-2|,|-1| | 0.6 -> max of 0.5, 0.2 | 0 | 0 -> sign 0
    want = torch.tensor([0.0, -2.0, 0.5, 0.0, 0.0])
    torch.testing.assert_close(emr_unified(tau), want)


def test_method_emits_masks_and_sums():
    spec = get_method("emr")
    base = torch.tensor([1.0, 1.0, 1.0])
    tau = torch.tensor([[0.5, -0.2, 0.3], [0.1, 0.4, -0.6]])
    x = MergeInput("w", base + tau, base, spec.params(), [spec.model_params(), spec.model_params()])
    out = spec.fn(x)
    uni = torch.tensor([0.5, 0.4, -0.6])  # sums 0.6, 0.2, -0.3
    torch.testing.assert_close(out, base + uni)
    assert unpack_bits(x.side["mask_0"], (3,)).tolist() == [True, False, False]
    assert unpack_bits(x.side["mask_1"], (3,)).tolist() == [True, True, True]
    sums = x.side["sums"]
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, torch.tensor([[1.0, 0.5], [1.1, 1.5]], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 4)])
def test_pack_bits_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, shape), mask)
    assert pack_bits(torch.tensor([True, False, True])).tolist() == [0b101]


@pytest.fixture(scope="module")
def emr_merge(family, tmp_path_factory):
    base, tunes = family
    out = tmp_path_factory.mktemp("emr") / "merged"
    recipe = {"merge_method": "emr", "base_model": str(base), "models": [{"model": str(t)} for t in tunes], "dtype": "float32"}
    alloykit.merge(recipe, out, progress=False, max_shard_size=100_000)
    return base, tunes, out


def test_load_task_model_is_the_papers_formula(emr_merge):
    """3 tasks: theta_0 + lambda_t M_t tau_uni, lambda_t summed over the whole model, by hand."""
    base, tunes, out = emr_merge
    b = _state(base)
    taus = [{n: v - b[n] for n, v in _state(t).items()} for t in tunes]
    uni = {n: emr_unified(torch.stack([tv[n] for tv in taus])) for n in b}
    unified = _state(out)
    for n in b:
        torch.testing.assert_close(unified[n], b[n] + uni[n])
    for t in range(3):
        masks = {n: taus[t][n] * uni[n] > 0 for n in b}
        lam = sum(float(taus[t][n].double().abs().sum()) for n in b) / sum(
            float((masks[n] * uni[n]).double().abs().sum()) for n in b)
        assert lam > 0
        got = alloykit.load_task_model(out, t)
        assert set(got) == set(b)
        for n in b:
            torch.testing.assert_close(got[n], b[n] + lam * masks[n] * uni[n], atol=1e-6, rtol=1e-5)


def test_load_task_model_by_name_and_path(emr_merge):
    base, tunes, out = emr_merge
    by_index = alloykit.load_task_model(out, 1)
    for ref in (str(tunes[1]), tunes[1]):
        got = alloykit.load_task_model(out, ref)
        assert all(torch.equal(got[n], by_index[n]) for n in by_index)
    with pytest.raises(CheckpointError, match="no task 'nope'"):
        alloykit.load_task_model(out, "nope")
    with pytest.raises(CheckpointError, match="index 0..2"):
        alloykit.load_task_model(out, 3)
    with pytest.raises(CheckpointError, match="not the output of an EMR merge"):
        alloykit.load_task_model(base, 0)


def test_manifest_records_the_tasks(emr_merge):
    base, tunes, out = emr_merge
    manifest = json.loads((out / "emr" / "manifest.json").read_text())
    assert manifest["method"] == "emr" and manifest["models"] == [str(t) for t in tunes]
    assert manifest["base"] == str(base) and manifest["groups"] == ["mask_0", "mask_1", "mask_2", "sums"]
    with safe_open(out / "emr" / "mask_0.safetensors", "pt") as f:
        assert set(f.keys()) == set(_state(base))


def test_in_memory_merge_returns_side_outputs(family):
    base, tunes = family
    sds = [_state(t) for t in tunes]
    side: dict = {}
    merged = alloykit.merge_state_dicts(sds, "emr", base=_state(base), side_outputs=side)
    assert sorted(side) == ["mask_0", "mask_1", "mask_2", "sums"]
    assert set(side["sums"]) == set(merged)


def test_cli_merge_writes_the_side_files(family, tmp_path):
    base, tunes = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: emr\nbase_model: {base}\nmodels:\n" + "".join(f"  - model: {t}\n" for t in tunes))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "alloykit.cli.main", "merge", str(recipe), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (out / "emr").iterdir())
    assert names == ["manifest.json", "mask_0.safetensors", "mask_1.safetensors", "mask_2.safetensors", "sums.safetensors"]
    assert not list(tmp_path.glob(".*alloykit-tmp"))


def test_in_memory_task_models_equal_the_loaded_ones(family, emr_merge):
    base, tunes, out = emr_merge
    side: dict = {}
    unified = alloykit.merge_state_dicts([_state(t) for t in tunes], "emr", base=_state(base), side_outputs=side)
    for t in range(3):
        mem = task_state_dict(unified, _state(base), side, t)
        disk = alloykit.load_task_model(out, t)
        assert all(torch.equal(mem[n], disk[n]) for n in disk)


def _tree_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kill", [{"ALLOYKIT_FAULT_KILL_AFTER": "10"}, {"ALLOYKIT_FAULT_KILL_AT": "tensors-written"}])
def test_killed_emr_merge_resumes_to_the_same_side_files(family, tmp_path, kill):
    """Side outputs are held in memory, so a resumed EMR merge recomputes every shard and writes them whole."""
    import os

    base, tunes = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: emr\nbase_model: {base}\ndtype: float32\nmodels:\n" + "".join(f"  - model: {t}\n" for t in tunes))
    cli = [sys.executable, "-m", "alloykit.cli.main", "merge", str(recipe)]
    shard = ["-q", "--max-shard-size", "100KB"]
    subprocess.run(cli + [str(tmp_path / "ref"), *shard], check=True)
    out = tmp_path / "out"
    r = subprocess.run(cli + [str(out), *shard], env={**os.environ, **kill}, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    subprocess.run(cli + [str(out), *shard, "--resume"], check=True)
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "ref")
