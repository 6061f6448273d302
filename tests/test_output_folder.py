"""The one output folder, as a user meets it: a finished merge resumed, an interrupted one
(Ctrl-C, SIGTERM) explained, stale working folders listed and removed, killed adapter
extractions leaving no target."""

import fcntl
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloykit.cli.main import main
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import run_cli as cli

CLI = [sys.executable, "-m", "alloykit.cli.main"]
SHARD = ["--max-shard-size", "20KB"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("outfolder")
    base, tunes = write_family(root, 2, LlamaShape(layers=4), shard_bytes=50_000)
    recipe = root / "r.yaml"
    recipe.write_text("merge_method: dare_ties\nbase_model: base\nmodels:\n"
                      "  - model: ft1\n    parameters: {weight: 1.0, density: 0.6}\n"
                      "  - model: ft2\n    parameters: {weight: 0.5, density: 0.4}\nseed: 5\n")
    ref = root / "ref"
    assert main(["merge", str(recipe), str(ref), "-q", *SHARD]) == 0
    return root, recipe, ref, base, tunes


def subprocess_cli(*args, **env):
    return subprocess.run(CLI + [str(a) for a in args], env={**os.environ, **env}, capture_output=True, text=True)


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def state(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# -- --resume of a merge that already finished -----------------------------------------


def test_resume_of_a_finished_merge_is_a_no_op_that_says_so(setup, capsys):
    root, recipe, ref, _, _ = setup
    before = state(ref)
    code, out, err = cli(capsys, "merge", recipe, ref, *SHARD, "--resume")
    assert code == 0, err
    assert "nothing to do" in out and "already holds this merge" in out
    assert state(ref) == before  # not a byte, not a date touched
    fingerprint = json.loads((ref / "alloykit_manifest.json").read_text())["fingerprint"]
    assert {"recipe", "seed", "alloykit", "layout", "input:ft1", "input:ft2", "input:base"} <= set(fingerprint)


def test_resume_of_a_finished_merge_that_differs_says_what_in_one_line(setup, tmp_path, capsys):
    root, recipe, ref, _, tunes = setup
    changed = tmp_path / "r.yaml"
    changed.write_text(recipe.read_text().replace("weight: 0.5", "weight: 0.7").replace("model: ", f"model: {root}/")
                       .replace("base_model: base", f"base_model: {root}/base"))
    code, out, err = cli(capsys, "merge", changed, ref, *SHARD, "--resume")
    assert code == 2 and "\n" not in err and "the recipe changed" in err and "--overwrite" in err, err
    code, out, err = cli(capsys, "merge", recipe, ref, *SHARD, "--resume", "--seed", "6")
    assert code == 2 and "the seed changed (5 then, 6 now)" in err, err
    code, out, err = cli(capsys, "merge", recipe, ref, "--max-shard-size", "30KB", "--resume")
    assert code == 2 and "the output layout" in err, err
    shard = next(tunes[0].glob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the fine-tune was rewritten since
    try:
        code, out, err = cli(capsys, "merge", recipe, ref, *SHARD, "--resume")
        assert code == 2 and "input 'ft1' changed" in err and "recipe" not in err.split("differs")[1], err
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------


@pytest.mark.parametrize("signal_name", ["INT", "TERM"])
def test_interrupted_merge_says_where_its_work_is_and_how_to_resume_or_discard(setup, tmp_path, capsys, signal_name):
    root, recipe, ref, _, _ = setup
    out = tmp_path / "out"
    r = subprocess_cli("merge", recipe, out, "-q", *SHARD, "--threads", "1",
                       ALLOYKIT_FAULT_KILL_AFTER="30", ALLOYKIT_FAULT_SIGNAL=signal_name)
    tmp = tmp_path / ".out.alloykit-tmp"
    assert r.returncode == 130, r.stderr
    assert not out.exists() and tmp.is_dir()
    message = r.stderr.strip()
    assert "\n" not in message and "Traceback" not in r.stderr, r.stderr
    assert f"'{tmp}'" in message and "--resume" in message and f"alloykit clean '{out}' --remove" in message
    assert "finished shard(s)" in message
    code, listed, err = cli(capsys, "clean", tmp_path)
    assert code == 0 and str(tmp) in listed and "finished shard(s)" in listed and "target 'out' absent" in listed
    assert tmp.is_dir()  # listing removes nothing
    code, _, err = cli(capsys, "merge", recipe, out, "-q", *SHARD, "--resume")
    assert code == 0, err
    assert folder_bytes(out) == folder_bytes(ref) and not tmp.exists()


def test_clean_removes_stale_folders_but_never_one_in_use(tmp_path, capsys):
    stale = tmp_path / ".old-merge.alloykit-tmp"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    aside = tmp_path / ".m.alloykit-old"
    aside.mkdir()
    busy = tmp_path / ".running.alloykit-tmp"
    busy.mkdir()
    (tmp_path / "model").mkdir()  # an ordinary folder: never touched
    (tmp_path / ".hidden").mkdir()
    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running merge holds
    try:
        code, out, err = cli(capsys, "clean", tmp_path)
        assert code == 0 and all(str(p) in out for p in (stale, aside, busy)) and "no journal" in out
        assert "in use by a running alloykit command" in out
        code, out, err = cli(capsys, "clean", tmp_path / "old-merge", "--remove")  # one target's folder only
        assert code == 0 and f"removed {stale}" in out and not stale.exists() and aside.exists()
        code, out, err = cli(capsys, "clean", tmp_path, "--remove")
        assert code == 0 and not aside.exists() and busy.exists() and "freed" in out
    finally:
        os.close(fd)
    assert (tmp_path / "model").is_dir() and (tmp_path / ".hidden").is_dir()
    code, out, err = cli(capsys, "clean", tmp_path, "--remove")
    assert code == 0 and not busy.exists()
    code, out, err = cli(capsys, "clean", tmp_path)
    assert code == 0 and "no working folders" in out


# -- adapters go through the same folder -------------------------------------------------


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory):
    """A base and a fine-tune whose linear deltas are rank 2 (so every rank-4 extraction is exact)."""
    root = tmp_path_factory.mktemp("extract")
    base, (ft,) = write_family(root, 1, LlamaShape(layers=3))
    g = torch.Generator().manual_seed(0)
    for f in ft.glob("*.safetensors"):
        sd = load_file(str(f))
        base_sd = load_file(str(base / f.name))
        for name in sd:
            if sd[name].dim() == 2 and "embed" not in name:
                w = base_sd[name]
                sd[name] = w + 0.05 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
        save_file(sd, str(f), metadata={"format": "pt"})
    return root, base, ft


@pytest.fixture(scope="module")
def whole_adapter(lora_pair):
    """The uninterrupted extraction (3 threads)."""
    root, base, ft = lora_pair
    assert main(["extract-lora", str(ft), str(root / "whole"), "--base", str(base), "--rank", "4", "-q", "--threads", "3"]) == 0
    return load_file(str(root / "whole" / "adapter_model.safetensors"))


@pytest.mark.parametrize("kill", [{"ALLOYKIT_FAULT_KILL_AFTER": "7"}, {"ALLOYKIT_FAULT_KILL_AT": "metadata-written"}])
def test_killed_adapter_extraction_leaves_no_target(lora_pair, whole_adapter, tmp_path, capsys, kill):
    root, base, ft = lora_pair
    out = tmp_path / "adapter"
    args = ["extract-lora", ft, out, "--base", base, "--rank", "4", "-q"]
    r = subprocess_cli(*args, **kill)
    assert r.returncode == -9, f"not killed: {r.stderr}"
    assert not out.exists() and (tmp_path / ".adapter.alloykit-tmp").is_dir()
    code, _, err = cli(capsys, *args, "--threads", "1")  # the rerun cleans the leftovers and starts over
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    code, stdout, err = cli(capsys, *args, "--resume")
    assert code == 0 and "nothing to do" in stdout, err
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == whole_adapter.keys()
    for name, t in got.items():  # any thread count: the same bytes
        assert torch.equal(t, whole_adapter[name]), name
    assert {"adapter_config.json", "alloykit_recipe.yaml", "alloykit_manifest.json", "README.md",
            "alloykit_extract_report.json"} <= {p.name for p in out.iterdir()}


def test_killed_output_lora_merge_leaves_no_target(setup, tmp_path):
    root, recipe, ref, _, _ = setup
    out = tmp_path / "merged-adapter"
    r = subprocess_cli("merge", recipe, out, "--output-lora", "4", "-q", ALLOYKIT_FAULT_KILL_AFTER="10")
    assert r.returncode == -9 and not out.exists()
    assert main(["merge", str(recipe), str(out), "--output-lora", "4", "-q"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert not (tmp_path / ".merged-adapter.alloykit-tmp").exists()


def test_extraction_into_a_target_another_run_holds_is_refused(lora_pair, tmp_path, capsys):
    root, base, ft = lora_pair
    tmp = tmp_path / ".adapter.alloykit-tmp"
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, out, err = cli(capsys, "extract-lora", ft, tmp_path / "adapter", "--base", base, "--rank", "4")
        assert code == 2 and "another alloykit merge or extraction" in err and "\n" not in err
    finally:
        os.close(fd)
    code, out, err = cli(capsys, "extract-lora", ft, tmp_path / "adapter", "--base", base, "--rank", "4", "-q")
    assert code == 0, err


# -- the records every output holds -----------------------------------------------------


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_front_matter_is_what_the_hub_reads(setup, tmp_path, capsys):
    import shutil

    root, _, _, base, tunes = setup
    shutil.copytree(tunes[1], tmp_path / "models" / "tuned")  # named relative to the recipe
    snapshot = tmp_path / "cache" / "models--someorg--tuned-3" / "snapshots" / "0a1b2c"
    shutil.copytree(tunes[0], snapshot)  # a Hub cache snapshot, named by absolute path
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      f"  - model: {tunes[0]}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: ../models/tuned\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {snapshot}\n    parameters: {{weight: 0.2}}\n")
    code, _, err = cli(capsys, "merge", recipe, tmp_path / "out", "-q")
    assert code == 0, err
    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == ["base", "ft1", "../models/tuned", "someorg/tuned-3"]
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"
    assert {"merge", "alloykit", "task_arithmetic"} <= set(meta["tags"])
    assert str(tmp_path) not in card and str(root) not in card and "/tmp" not in card  # no local absolute path
    assert "- model: ../models/tuned" in card  # the recipe on the card names models the same way


def test_adapter_cards_name_their_base(lora_pair, tmp_path, capsys):
    root, base, ft = lora_pair
    code, _, err = cli(capsys, "extract-lora", ft, tmp_path / "ad", "--base", base, "--rank", "4", "-q")
    assert code == 0, err
    card = (tmp_path / "ad" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "base" and meta["base_model_relation"] == "adapter" and meta["library_name"] == "peft"
    assert str(root) not in card
    manifest = json.loads((tmp_path / "ad" / "alloykit_manifest.json").read_text())
    assert manifest["command"] == "extract-lora" and manifest["rank"] == 4 and "fingerprint" in manifest


def test_statistics_folders_go_through_the_same_folder(tmp_path):
    from alloykit.errors import OutputError
    from alloykit.stats.store import META_FILE, open_stats, write_stats

    out = tmp_path / "s.stats"
    write_stats(out, {"fisher": {"w": torch.ones(2, 2)}}, {"samples": 1})
    write_stats(out, {"fisher": {"w": torch.full((2, 2), 3.0)}}, {"samples": 2})  # a rerun replaces them whole
    stats = open_stats(out, "m")
    assert stats.meta["samples"] == 2 and float(stats.checkpoints["fisher"].read("w")[0, 0]) == 3.0
    stats.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.stats"]  # no working folder left
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(OutputError, match=f"no {META_FILE}"):  # a model folder given as --out by mistake
        write_stats(model, {"fisher": {"w": torch.ones(1)}}, {})
    assert (model / "model.safetensors").read_bytes() == b"weights"
