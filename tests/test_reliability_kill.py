"""Kill a merge at many points (SIGKILL), then check: no folder at the target, and
``--resume`` completes to output byte-identical to an uninterrupted run."""

import os
import random
import subprocess
import sys

import pytest

from alloykit.testing.fixtures import LlamaShape, write_family

CLI = [sys.executable, "-m", "alloykit.cli.main"]
N_KILLS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_family(root, 2, LlamaShape(layers=6), shard_bytes=50_000)
    recipe = root / "r.yaml"
    recipe.write_text(
        "merge_method: dare_ties\nbase_model: base\nmodels:\n"
        "  - model: ft1\n    parameters: {weight: 1.0, density: 0.6}\n"
        "  - model: ft2\n    parameters: {weight: 0.5, density: 0.4}\n"
        "dtype: bfloat16\nseed: 5\n"
    )
    ref = root / "ref"
    subprocess.run(CLI + ["merge", str(recipe), str(ref), "-q", "--max-shard-size", "20KB"], check=True)
    return root, recipe, ref


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sigkill_at_random_points_then_resume(setup):
    root, recipe, ref = setup
    expected = folder_bytes(ref)
    n_tensors = 6 * 9 + 3
    points = sorted(random.Random(0).sample(range(1, n_tensors), N_KILLS))
    survived = 0
    for i, point in enumerate(points):
        out = root / f"out{i}"
        env = dict(os.environ, ALLOYKIT_FAULT_KILL_AFTER=str(point))
        threads = str(1 + i % 3)
        r = subprocess.run(CLI + ["merge", str(recipe), str(out), "-q", "--max-shard-size", "20KB", "--threads", threads], env=env)
        assert r.returncode == -9, f"kill point {point}: the merge was not killed (rc {r.returncode})"
        assert not out.exists(), f"kill point {point}: a folder was left at the target"
        tmp = root / f".out{i}.alloykit-tmp"
        assert tmp.is_dir()
        r = subprocess.run(CLI + ["merge", str(recipe), str(out), "-q", "--max-shard-size", "20KB", "--resume"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not tmp.exists()
        assert folder_bytes(out) == expected, f"kill point {point}: resumed output differs"
        survived += 1
    assert survived == N_KILLS


def test_resume_refuses_changed_recipe(setup, tmp_path):
    root, recipe, _ = setup
    out = root / "changed"
    env = dict(os.environ, ALLOYKIT_FAULT_KILL_AFTER="10")
    subprocess.run(CLI + ["merge", str(recipe), str(out), "-q", "--max-shard-size", "20KB", "--threads", "1"], env=env)
    changed = root / "r2.yaml"
    changed.write_text(recipe.read_text().replace("seed: 5", "seed: 6"))
    r = subprocess.run(CLI + ["merge", str(changed), str(out), "-q", "--max-shard-size", "20KB", "--resume"], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot resume" in r.stderr and "changed" in r.stderr
    # without --resume the stale folder is cleaned and the merge starts over
    r = subprocess.run(CLI + ["merge", str(changed), str(out), "-q", "--max-shard-size", "20KB"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_corrupted_complete_shard_is_redone(setup):
    root, recipe, ref = setup
    out = root / "corrupt"
    env = dict(os.environ, ALLOYKIT_FAULT_KILL_AFTER="30")
    subprocess.run(CLI + ["merge", str(recipe), str(out), "-q", "--max-shard-size", "20KB", "--threads", "1"], env=env)
    tmp = root / ".corrupt.alloykit-tmp"
    first = sorted(tmp.glob("model-*.safetensors"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # flip a byte in a shard the journal says is complete
    first.write_bytes(bytes(data))
    r = subprocess.run(CLI + ["merge", str(recipe), str(out), "--max-shard-size", "20KB", "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert folder_bytes(out) == folder_bytes(ref)
