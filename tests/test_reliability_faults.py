"""Disk full, I/O errors, refusal to clobber, concurrent merges, code execution, determinism."""

import errno
import fcntl
import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import alloykit
from alloykit.errors import CheckpointError, OutputError
from alloykit.methods.registry import all_methods
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import run_cli as cli

# the modules, not the functions of the same names (alloykit.merge is the function)
folder_mod = importlib.import_module("alloykit.output.folder")
writer_mod = importlib.import_module("alloykit.io.writer")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    base, tunes = write_family(root, 2)
    return root, base, tunes


def recipe(base, tunes, method="task_arithmetic"):
    params = {"weight": 0.5, "density": 0.5} if method in ("dare_ties", "ties", "della", "dare_linear") else {"weight": 0.5}
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(t), "parameters": params} for t in tunes]}


def recipe_file(tmp_path, base, tunes):
    y = tmp_path / "r.yaml"
    y.write_text(json.dumps(recipe(base, tunes)))  # JSON is YAML
    return y


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(fam, tmp_path_factory):
    _, base, tunes = fam
    return alloykit.merge(recipe(base, tunes), tmp_path_factory.mktemp("ref") / "ref", progress=False, max_shard_size=20_000)


# -- disk space ------------------------------------------------------------------------


def fake_free(monkeypatch, free):
    real = folder_mod.shutil.disk_usage
    monkeypatch.setattr(folder_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def test_space_check_refuses_before_writing(fam, tmp_path, monkeypatch, capsys):
    _, base, tunes = fam
    fake_free(monkeypatch, 10 << 20)  # 10 MB free, the merge needs ~1 MB plus the 64 MB margin
    code, _, err = cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out")
    assert code == 2 and "not enough disk space" in err and "GB free" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # not even a temp folder
    fake_free(monkeypatch, 100 << 20)
    code, _, err = cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out", "-q")
    assert code == 0, err


class PwriteFault:
    """os.pwrite that fails with ``err`` after ``ok`` successful calls; ``reserve`` is
    os.posix_fallocate on the same count (streamed tensors are written through a map of
    their reserved region, so on a full disk the reservation is what fails)."""

    def __init__(self, ok, err):
        self.ok, self.err, self.real, self.real_reserve = ok, err, os.pwrite, os.posix_fallocate

    def _spend(self):
        if self.ok <= 0:
            raise OSError(self.err, os.strerror(self.err))
        self.ok -= 1

    def __call__(self, fd, data, offset):
        self._spend()
        return self.real(fd, data, offset)

    def reserve(self, fd, offset, length):
        self._spend()
        return self.real_reserve(fd, offset, length)


def disk_fails_after(monkeypatch, ok, err):
    fault = PwriteFault(ok, err)
    monkeypatch.setattr(writer_mod.os, "pwrite", fault)
    monkeypatch.setattr(writer_mod.os, "posix_fallocate", fault.reserve)


def test_enospc_mid_write_then_resume_is_byte_identical(fam, reference, tmp_path, monkeypatch, capsys):
    _, base, tunes = fam
    y, out = recipe_file(tmp_path, base, tunes), tmp_path / "out"
    disk_fails_after(monkeypatch, 55, errno.ENOSPC)  # ~30 shard headers, then tensors
    code, _, err = cli(capsys, "merge", y, out, "-q", "--max-shard-size", "20KB", "--threads", "1")
    assert code == 2 and "No space left on device" in err and "--resume" in err and "\n" not in err, err
    assert not out.exists()
    tmp = tmp_path / ".out.alloykit-tmp"
    kept = json.loads((tmp / "alloykit_journal.json").read_text())["shards"]
    assert kept  # the finished shards survive the failure
    monkeypatch.undo()
    # resuming needs room only for what is left: refused with less free space than a fresh merge needs
    left = sum(p.stat().st_size for p in reference.glob("*.safetensors")) - sum(r["size"] for r in kept.values())
    fake_free(monkeypatch, (64 << 20) + left + 4096)
    code, _, err = cli(capsys, "merge", y, out, "--max-shard-size", "20KB")
    assert code == 2 and "not enough disk space" in err
    code, _, err = cli(capsys, "merge", y, out, "--max-shard-size", "20KB", "--resume", "-q")
    assert code == 0, err
    assert folder_bytes(out) == folder_bytes(reference)
    assert not tmp.exists()


def test_enospc_before_any_shard_finishes_leaves_nothing(fam, tmp_path, monkeypatch, capsys):
    _, base, tunes = fam
    disk_fails_after(monkeypatch, 0, errno.ENOSPC)
    code, _, err = cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out")
    assert code == 2 and "No space left on device" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_eio_on_fsync_is_one_line_and_no_target(fam, tmp_path, monkeypatch, capsys):
    _, base, tunes = fam

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writer_mod.os, "fsync", eio)
    code, _, err = cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out")
    assert code == 2 and "Input/output error" in err and "model" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): " + r.stderr.decode().strip())
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_planner_refuses_when_a_real_disk_is_small(fam, small_fs):
    _, base, tunes = fam
    with pytest.raises(OutputError, match="not enough disk space"):
        alloykit.merge(recipe(base, tunes), small_fs / "out", progress=False)
    assert os.listdir(small_fs) == []


def test_real_enospc_then_grow_the_disk_and_resume(fam, reference, small_fs, monkeypatch):
    """A real full filesystem (tmpfs of 200 KB; the output is ~1 MB): a clear error, no
    target; then the disk grows and --resume finishes byte-identical to a clean run."""
    _, base, tunes = fam
    monkeypatch.setattr(folder_mod.OutputFolder, "check_space", lambda self, need: None)  # let it start, then fill the disk
    with pytest.raises(OutputError, match="No space left on device.*--resume"):
        alloykit.merge(recipe(base, tunes), small_fs / "out", progress=False, max_shard_size=20_000, threads=1)
    assert not (small_fs / "out").exists()
    assert subprocess.run(["mount", "-o", "remount,size=4m", str(small_fs)]).returncode == 0
    alloykit.merge(recipe(base, tunes), small_fs / "out", progress=False, max_shard_size=20_000, resume=True)
    assert folder_bytes(small_fs / "out") == folder_bytes(reference)
    assert os.listdir(small_fs) == ["out"]


# -- read errors -----------------------------------------------------------------------


def test_eio_on_tensor_read_is_one_line_exit_2(fam, tmp_path, monkeypatch, capsys):
    _, base, tunes = fam

    def eio(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", eio)
    code, _, err = cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out")
    assert code == 2 and "read failed: Input/output error" in err and "tensor '" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_eio_on_header_read_is_one_line_exit_2(fam, tmp_path, monkeypatch, capsys):
    _, base, tunes = fam
    fmt = sys.modules["alloykit.io.safetensors_format"]

    class Failing:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self, n=-1):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fmt, "open", Failing, raising=False)
    code, _, err = cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out")
    assert code == 2 and "cannot read: Input/output error" in err and ".safetensors" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


# -- the target folder -----------------------------------------------------------------


def test_existing_target_needs_overwrite(fam, tmp_path, capsys):
    _, base, tunes = fam
    y, out = recipe_file(tmp_path, base, tunes), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = cli(capsys, "merge", y, out)
    assert code == 2 and "--overwrite" in err and "\n" not in err
    assert (out / "keep.txt").read_text() == "precious"
    code, _, err = cli(capsys, "merge", y, out, "--resume")  # resume does not imply overwrite
    assert code == 2 and "nothing to resume" in err and (out / "keep.txt").exists()
    assert cli(capsys, "merge", y, out, "-q", "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


def test_overwrite_replaces_a_file_at_the_target(fam, tmp_path, capsys):
    _, base, tunes = fam
    y, out = recipe_file(tmp_path, base, tunes), tmp_path / "out"
    out.write_text("not a folder")
    assert cli(capsys, "merge", y, out, "-q")[0] == 2
    assert cli(capsys, "merge", y, out, "-q", "--overwrite")[0] == 0
    assert out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


def test_stale_temp_folder_is_cleaned_without_following_links(fam, tmp_path, capsys):
    _, base, tunes = fam
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    tmp = tmp_path / ".out.alloykit-tmp"
    tmp.mkdir()
    (tmp / "junk.safetensors").write_bytes(b"half a shard")
    (tmp / "sub").mkdir()
    (tmp / "link").symlink_to(precious)
    assert cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out", "-q")[0] == 0
    assert not tmp.exists() and (precious / "data.txt").read_text() == "keep me"
    assert not {"junk.safetensors", "sub", "link"} & {p.name for p in (tmp_path / "out").iterdir()}
    # a symlink planted at the temp folder's name (to a folder, to a file) is replaced, not followed
    (tmp_path / ".out2.alloykit-tmp").symlink_to(precious)
    assert cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out2", "-q")[0] == 0
    (tmp_path / ".out3.alloykit-tmp").symlink_to(precious / "data.txt")
    assert cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out3", "-q")[0] == 0
    assert sorted(p.name for p in precious.iterdir()) == ["data.txt"] and (precious / "data.txt").read_text() == "keep me"
    assert (tmp_path / "out2" / "model.safetensors").is_file() and not (tmp_path / "out2").is_symlink()


def test_second_merge_into_the_same_target_is_refused(fam, tmp_path, capsys):
    """A merge holds a lock on its temp folder; another one into the same target must not
    delete or publish its files."""
    _, base, tunes = fam
    tmp = tmp_path / ".out.alloykit-tmp"
    tmp.mkdir()
    (tmp / "alloykit_journal.json").write_text("{}")
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running merge holds
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, _, err = cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out", *extra)
            assert code == 2 and "another alloykit merge" in err and "\n" not in err, err
            assert (tmp / "alloykit_journal.json").read_text() == "{}" and not (tmp_path / "out").exists()
    finally:
        os.close(fd)
    assert cli(capsys, "merge", recipe_file(tmp_path, base, tunes), tmp_path / "out", "-q")[0] == 0


# -- no code execution -----------------------------------------------------------------


def evil_pickle(folder: Path, marker: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Exploit()}, f)


def test_pickle_refused_unless_allowed_and_never_executes(fam, tmp_path, capsys):
    _, base, tunes = fam
    marker = tmp_path / "pwned"
    evil_pickle(tmp_path / "evil", marker)
    y = tmp_path / "r.yaml"
    y.write_text(json.dumps(recipe(base, [tmp_path / "evil", tunes[0]])))
    code, _, err = cli(capsys, "merge", y, tmp_path / "out")
    assert code == 2 and "--allow-pickle" in err and "pytorch_model.bin" in err and "\n" not in err
    code, _, err = cli(capsys, "merge", y, tmp_path / "out", "--allow-pickle")
    assert code == 2 and "weights_only=True" in err and "\n" not in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the same payload through the Python API
    from alloykit.io.checkpoint import Checkpoint

    with pytest.raises(CheckpointError, match="weights_only=True"):
        Checkpoint(tmp_path / "evil", allow_pickle=True)
    assert not marker.exists()
    # a legitimate pickle checkpoint loads behind the flag
    good = tmp_path / "good"
    good.mkdir()
    torch.save({"w": torch.arange(4.0)}, good / "pytorch_model.bin")
    assert torch.equal(Checkpoint(good, allow_pickle=True).read("w"), torch.arange(4.0))


def test_model_code_in_an_input_folder_is_never_imported(fam, tmp_path, capsys):
    """A config asking for remote code (auto_map + a modeling file) is merged as data only."""
    import shutil

    _, base, tunes = fam
    marker = tmp_path / "imported"
    evil = tmp_path / "evil"
    shutil.copytree(tunes[0], evil)
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM", "AutoConfig": "modeling_evil.EvilConfig"}
    (evil / "config.json").write_text(json.dumps(cfg))
    y = tmp_path / "r.yaml"
    y.write_text(json.dumps(recipe(evil, [tunes[0], tunes[1]])))
    assert cli(capsys, "merge", y, tmp_path / "out", "-q")[0] == 0
    assert not marker.exists()
    assert not (tmp_path / "out" / "modeling_evil.py").exists()


def test_source_never_enables_remote_code_or_unsafe_loaders():
    src = Path(alloykit.__file__).parent
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "trust_remote_code=True" not in text, f
        assert "weights_only=False" not in text, f
        assert "yaml.load(" not in text or "Loader=_RecipeLoader" in text, f  # a SafeLoader subclass
        assert "yaml.unsafe_load" not in text and "pickle.load" not in text, f


# -- determinism -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """Matrices of 131k entries: above torch's parallel grain, so intra-op threads would show."""
    root = tmp_path_factory.mktemp("wide")
    return write_family(root, 2, LlamaShape(vocab=512, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2))


DETERMINISM_METHODS = ["dare_ties", "della", "ties", "linear", "model_stock"]


@pytest.mark.parametrize("method", DETERMINISM_METHODS)
def test_same_seed_same_bytes_for_any_thread_count(wide_family, tmp_path, method):
    if method not in all_methods():
        pytest.skip(f"{method} is not registered yet")
    base, tunes = wide_family
    r = recipe(base, tunes, method)
    if method in ("linear", "model_stock"):
        r["models"] = [{"model": str(t), **({"parameters": {"weight": 0.5}} if method == "linear" else {})} for t in tunes]
        if method == "linear":
            del r["base_model"]
    runs = [(1, 0), (2, 0), (4, 0), (4, 1)]  # threads, repeat
    outs = [alloykit.merge(r, tmp_path / f"t{n}-{k}", threads=n, seed=9, progress=False, max_shard_size=300_000)
            for n, k in runs]
    first = folder_bytes(outs[0])
    assert len([n for n in first if n.endswith(".safetensors")]) > 2
    for o in outs[1:]:
        assert folder_bytes(o) == first
    if all_methods()[method].randomized:  # and the seed matters, so the comparison could fail
        other = alloykit.merge(r, tmp_path / "seed10", threads=2, seed=10, progress=False, max_shard_size=300_000)
        assert folder_bytes(other) != first


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
    with pytest.warns(UserWarning, match=f"tensor '{name}'.*NaN.*model '{bad}'"):
        alloykit.merge(r, tmp_path / "warned", progress=False)
    from alloykit.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=name):
        alloykit.merge(r, tmp_path / "failed", progress=False, fail_on_nonfinite=True)
    assert not (tmp_path / "failed").exists()
