"""Kill a merge (SIGKILL) at many points, then check: no folder at the target, and
``--resume`` completes to output byte-identical to an uninterrupted run.

Kill points are exact, not timed: ``ALLOYKIT_FAULT_KILL_AFTER=N`` kills the merge after
N tensors are written, ``ALLOYKIT_FAULT_KILL_AT=PHASE`` at a named phase (both read by
``alloykit.output.faults``). The killed runs are subprocesses; the resumes run the same CLI in
process, which keeps the file well under a minute and a half on two cores.
"""

import json
import os
import random
import subprocess
import sys

import pytest

from alloykit.cli.main import main
from alloykit.methods.registry import all_methods
from alloykit.testing.fixtures import LlamaShape, write_family

CLI = [sys.executable, "-m", "alloykit.cli.main"]
N_KILLS = 24
LAYERS = 6
N_TENSORS = LAYERS * 9 + 3
SHARD = ["--max-shard-size", "20KB"]
# a randomized method when one is registered: resumed tensors must redraw the same masks
METHOD = "dare_ties" if "dare_ties" in all_methods() else "ties"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_family(root, 2, LlamaShape(layers=LAYERS), shard_bytes=50_000)
    recipe = root / "r.yaml"
    recipe.write_text(
        f"merge_method: {METHOD}\nbase_model: base\nmodels:\n"
        "  - model: ft1\n    parameters: {weight: 1.0, density: 0.6}\n"
        "  - model: ft2\n    parameters: {weight: 0.5, density: 0.4}\n"
        "dtype: bfloat16\nseed: 5\n"
    )
    ref = root / "ref"
    subprocess.run(CLI + ["merge", str(recipe), str(ref), "-q", *SHARD], check=True)
    return root, recipe, ref


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def killed(recipe, out, *extra, after=None, at=None):
    """Run a merge in a subprocess that SIGKILLs itself at the given point; assert it was killed."""
    env = dict(os.environ)
    if after is not None:
        env["ALLOYKIT_FAULT_KILL_AFTER"] = str(after)
    if at is not None:
        env["ALLOYKIT_FAULT_KILL_AT"] = at
    r = subprocess.run(CLI + ["merge", str(recipe), str(out), "-q", *SHARD, *extra], env=env, capture_output=True, text=True)
    assert r.returncode == -9, f"kill point {after or at}: the merge was not killed (rc {r.returncode}): {r.stderr}"


def resume(capsys, recipe, out, *extra):
    code = main(["merge", str(recipe), str(out), "-q", *SHARD, "--resume", *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def no_leftovers(out):
    names = {p.name for p in out.parent.iterdir()}
    return f".{out.name}.alloykit-tmp" not in names and f".{out.name}.alloykit-old" not in names


def test_sigkill_at_random_points_then_resume(setup, capsys):
    root, recipe, ref = setup
    expected = folder_bytes(ref)
    assert len([n for n in expected if n.endswith(".safetensors")]) >= 10  # many shards: many resume states
    points = sorted(random.Random(0).sample(range(1, N_TENSORS + 1), N_KILLS))
    survived = 0
    for i, point in enumerate(points):
        out = root / f"out{i}"
        killed(recipe, out, "--threads", str(1 + i % 3), after=point)
        assert not out.exists(), f"kill point {point}: a folder was left at the target"
        assert (root / f".out{i}.alloykit-tmp").is_dir()
        resume(capsys, recipe, out)
        assert not (out / "alloykit_journal.json").exists() and no_leftovers(out)
        assert folder_bytes(out) == expected, f"kill point {point}: resumed output differs"
        survived += 1
    assert survived == N_KILLS


def test_resume_skips_the_shards_already_done(setup, capsys):
    """The resumed run computes only the unfinished shards' tensors (and says so)."""
    root, recipe, ref = setup
    out = root / "skips"
    killed(recipe, out, "--threads", "1", after=40)
    journal = json.loads((root / ".skips.alloykit-tmp" / "alloykit_journal.json").read_text())
    done = len(journal["shards"])
    assert done >= 5  # threads=1 writes tensors in order: every shard before tensor 40 is complete
    code = main(["merge", str(recipe), str(out), *SHARD, "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    total = len([n for n in folder_bytes(ref) if n.endswith(".safetensors")])
    assert f"resuming: {done} of {total} shards already complete" in err
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    kept = set(journal["shards"])
    recomputed = sum(1 for f in index.values() if f not in kept)
    assert f"[{recomputed}/{recomputed} tensors]" in err and recomputed < N_TENSORS
    assert folder_bytes(out) == folder_bytes(ref)


PHASES = ["planned", "journal-part", "tensors-written", "metadata-written", "journal-removed", "renamed"]


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_each_phase(setup, capsys, phase):
    root, recipe, ref = setup
    out = root / f"phase-{phase}"
    killed(recipe, out, at=phase)
    if phase == "renamed":  # killed after the rename: the target is whole, nothing is left over
        assert folder_bytes(out) == folder_bytes(ref) and no_leftovers(out)
        return
    assert not out.exists()
    resume(capsys, recipe, out)
    assert folder_bytes(out) == folder_bytes(ref) and no_leftovers(out)


def test_sigkill_while_replacing_an_existing_target(setup, capsys):
    """--overwrite moves the old folder aside, then renames the new one in: killed between the
    two renames the target path is empty, and the next run finishes and cleans up."""
    root, recipe, ref = setup
    out = root / "replace"
    out.mkdir()
    (out / "old.txt").write_text("old model")
    killed(recipe, out, "--overwrite", at="target-moved-aside")
    assert not out.exists()
    resume(capsys, recipe, out)
    assert folder_bytes(out) == folder_bytes(ref) and no_leftovers(out)


def test_sigkill_during_a_resumed_run(setup, capsys):
    root, recipe, ref = setup
    out = root / "twice"
    killed(recipe, out, "--threads", "2", after=15)
    killed(recipe, out, "--threads", "2", "--resume", after=20)
    assert not out.exists()
    resume(capsys, recipe, out)
    assert folder_bytes(out) == folder_bytes(ref)


def test_resume_refuses_changed_recipe(setup, capsys):
    root, recipe, _ = setup
    out = root / "changed"
    killed(recipe, out, "--threads", "1", after=30)
    changed = root / "r2.yaml"
    changed.write_text(recipe.read_text().replace("seed: 5", "seed: 6"))
    code = main(["merge", str(changed), str(out), "-q", *SHARD, "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot resume" in err and "changed" in err and "without --resume" in err and "\n" not in err
    assert (root / ".changed.alloykit-tmp" / "alloykit_journal.json").exists()  # refused: nothing deleted
    # without --resume the stale folder is cleaned and the merge starts over
    assert main(["merge", str(changed), str(out), "-q", *SHARD]) == 0 and no_leftovers(out)


def test_resume_refuses_unreadable_journal(setup, capsys):
    root, recipe, ref = setup
    out = root / "garbled"
    killed(recipe, out, "--threads", "1", after=30)
    (root / ".garbled.alloykit-tmp" / "alloykit_journal.json").write_text('{"shards": [1, 2]}')
    code = main(["merge", str(recipe), str(out), "-q", *SHARD, "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "journal is unreadable" in err and "\n" not in err


def test_corrupted_complete_shard_is_redone(setup, capsys):
    root, recipe, ref = setup
    out = root / "corrupt"
    killed(recipe, out, "--threads", "1", after=30)
    tmp = root / ".corrupt.alloykit-tmp"
    recorded = json.loads((tmp / "alloykit_journal.json").read_text())["shards"]
    first = tmp / sorted(recorded)[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # flip a byte in a shard the journal says is complete
    first.write_bytes(bytes(data))
    resume(capsys, recipe, out)
    assert folder_bytes(out) == folder_bytes(ref)
