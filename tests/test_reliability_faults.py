"""Disk full, I/O errors, refusal to clobber, pickle safety, determinism."""

import errno
import os
import pickle
import subprocess

import pytest
import torch

import alloykit
from alloykit.cli.main import main
from alloykit.errors import CheckpointError, OutputError
from alloykit.testing.fixtures import write_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    base, tunes = write_family(root, 2)
    return root, base, tunes


def recipe(base, tunes, method="task_arithmetic"):
    params = {"weight": 0.5, "density": 0.5} if method == "dare_ties" else {"weight": 0.5}
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(t), "parameters": params} for t in tunes]}


@pytest.fixture()
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): " + r.stderr.decode().strip())
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_planner_refuses_when_space_is_short(fam, small_fs):
    _, base, tunes = fam
    with pytest.raises(OutputError, match="not enough disk space"):
        alloykit.merge(recipe(base, tunes), small_fs / "out", progress=False)
    assert os.listdir(small_fs) == []


def test_real_enospc_mid_write_leaves_no_target(fam, small_fs, monkeypatch):
    _, base, tunes = fam
    import sys

    monkeypatch.setattr(sys.modules["alloykit.merge"], "_check_space", lambda folder, need: None)  # let it start, then fill the disk
    with pytest.raises(OutputError, match="No space left on device"):
        alloykit.merge(recipe(base, tunes), small_fs / "out", progress=False, max_shard_size=50_000)
    assert not (small_fs / "out").exists()


def test_eio_on_read_is_one_line_exit_2(fam, tmp_path, monkeypatch, capsys):
    root, base, tunes = fam
    y = tmp_path / "r.yaml"
    y.write_text(f"merge_method: linear\nmodels:\n  - model: {tunes[0]}\n    parameters: {{weight: 1}}\n  - model: {tunes[1]}\n    parameters: {{weight: 1}}\n")

    def eio(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", eio)
    assert main(["merge", str(y), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "read failed: Input/output error" in err and err.count("\n") <= 2
    assert not (tmp_path / "out").exists()


def test_existing_target_needs_overwrite(fam, tmp_path):
    _, base, tunes = fam
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="--overwrite"):
        alloykit.merge(recipe(base, tunes), out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    alloykit.merge(recipe(base, tunes), out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_pickle_refused_unless_allowed_and_never_executes(fam, tmp_path):
    _, base, _ = fam
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Exploit()}, f)
    from alloykit.io.checkpoint import Checkpoint

    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint(evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        Checkpoint(evil, allow_pickle=True)
    assert not marker.exists()
    # a legitimate pickle checkpoint loads behind the flag
    good = tmp_path / "good"
    good.mkdir()
    torch.save({"w": torch.arange(4.0)}, good / "pytorch_model.bin")
    assert torch.equal(Checkpoint(good, allow_pickle=True).read("w"), torch.arange(4.0))


def test_same_seed_same_bytes_for_any_thread_count(fam, tmp_path):
    _, base, tunes = fam
    r = recipe(base, tunes, "dare_ties")
    outs = [alloykit.merge(r, tmp_path / f"t{n}", threads=n, seed=9, progress=False, max_shard_size=30_000) for n in (1, 2, 4)]
    names = sorted(p.name for p in outs[0].iterdir())
    for o in outs[1:]:
        assert sorted(p.name for p in o.iterdir()) == names
        for n in names:
            assert (o / n).read_bytes() == (outs[0] / n).read_bytes(), n


def test_nonfinite_inputs_warn_or_fail(fam, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, base, tunes = fam
    bad = tmp_path / "nan"
    shutil.copytree(tunes[0], bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    sd = load_file(str(shard))
    name = sorted(sd)[0]
    sd[name][0] = float("nan")
    save_file(sd, str(shard))
    r = recipe(base, [bad, tunes[1]])
    with pytest.warns(UserWarning, match=f"tensor '{name}'.*NaN"):
        alloykit.merge(r, tmp_path / "warned", progress=False)
    from alloykit.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=name):
        alloykit.merge(r, tmp_path / "failed", progress=False, fail_on_nonfinite=True)
    assert not (tmp_path / "failed").exists()
