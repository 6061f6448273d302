"""Multi-stage recipes (mergekit-multi's format): the graph of named merges, its results
against mergekit-multi on the same file, caching, resuming an interrupted stage, and errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import alloykit
from alloykit.cli.main import main
from alloykit.config import load_recipe
from alloykit.errors import RecipeError
from alloykit.multi import load_stages, run_multi
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import read_state
from alloykit.testing.hubcache import refuse_network

SHAPE = LlamaShape(vocab=64, hidden=32, intermediate=48, layers=3, heads=4, kv_heads=2)
CLI = [sys.executable, "-m", "alloykit.cli.main"]

# mergekit-multi's documented shape: a named linear merge, a named slerp on top of it, and an
# unnamed final TIES merge that uses the second
MULTI = """\
name: first-merge
merge_method: linear
models:
  - model: ft1
    parameters: {weight: 0.6}
  - model: ft2
    parameters: {weight: 0.4}
dtype: float32
---
name: second-merge
merge_method: slerp
base_model: first-merge
models:
  - model: first-merge
  - model: ft3
parameters:
  t: [0.2, 0.8]
dtype: float32
---
merge_method: ties
base_model: base
models:
  - model: second-merge
    parameters: {weight: 0.7, density: 0.6}
  - model: ft1
    parameters: {weight: 0.5, density: 0.8}
parameters: {normalize: true}
dtype: float32
"""


@pytest.fixture(autouse=True)
def offline():
    with refuse_network():
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    write_family(root, 3, SHAPE, delta_scale=0.5)
    return root



def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "multi.yaml"
    path.write_text(text)
    return path


def by_hand(root: Path, text: str, work: Path) -> dict:
    """The same stages run one by one with plain single-recipe merges."""
    docs = list(yaml.safe_load_all(text))
    for doc in docs:
        name = doc.pop("name", None)
        dump = yaml.safe_dump(doc).replace("first-merge", str(work / "first-merge")).replace("second-merge", str(work / "second-merge"))
        alloykit.merge(yaml.safe_load(dump), work / (name or "final"), progress=False, recipe_dir=root)
    return read_state(work / "final")


def test_multi_stage_recipe_runs_in_order_and_equals_the_stages_run_by_hand(root, tmp_path, monkeypatch):
    path = write(root / "case1", MULTI)
    monkeypatch.chdir(root)
    assert main(["merge", str(path), str(tmp_path / "out"), "-q"]) == 0
    inter = tmp_path / "out-intermediates"
    assert sorted(p.name for p in inter.iterdir() if not p.name.startswith(".")) == ["first-merge", "second-merge"]
    want = by_hand(root, MULTI, tmp_path / "hand")
    got = read_state(tmp_path / "out")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_multi_stage_recipe_equals_mergekit_multi(root, tmp_path, monkeypatch):
    mk = pytest.importorskip("mergekit.scripts.multimerge")
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    LoaderCache.loaders.clear()  # mergekit keeps loaders per process, keyed by the path as written ('ft2')

    monkeypatch.chdir(root)  # mergekit reads relative model paths from the working directory
    configs, deps = mk.load_config(MULTI, str(tmp_path / "mk-inter"))
    tasks = mk.make_tasks(configs, deps, MergeOptions(quiet=True, write_model_card=False), str(tmp_path / "mk-inter"),
                          str(tmp_path / "mk-out"), lazy=True)
    Executor(tasks, math_device="cpu", storage_device="cpu").execute()
    report = run_multi(write(root / "case2", MULTI), tmp_path / "ak-inter", tmp_path / "ak-out", progress=False)
    assert [(s.label, what) for s, what in report] == [("first-merge", "merged"), ("second-merge", "merged"),
                                                       ("final merge", "merged")]
    for mine, theirs in (("ak-inter/first-merge", "mk-inter/first-merge"), ("ak-inter/second-merge", "mk-inter/second-merge"),
                         ("ak-out", "mk-out")):
        a, m = read_state(tmp_path / mine), read_state(tmp_path / theirs)
        assert a.keys() == m.keys()
        for k in a:
            assert (a[k] - m[k]).abs().max() <= 1e-6 * m[k].abs().max(), (mine, k)


def test_rerun_skips_finished_stages_and_redoes_changed_ones(root, tmp_path):
    path = write(tmp_path / "r", MULTI)
    inter, out = tmp_path / "inter", tmp_path / "out"
    kw = dict(progress=False, recipe_dir=root)

    def run():
        return [what for _, what in run_multi(path, inter, out, **kw)]

    assert run() == ["merged", "merged", "merged"]
    mtimes = {p: p.stat().st_mtime_ns for p in [*inter.rglob("*.safetensors"), *out.glob("*.safetensors")]}
    assert run() == ["up to date"] * 3
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    # the final merge changed: only it is redone
    path.write_text(MULTI.replace("density: 0.8", "density: 0.9"))
    assert run() == ["up to date", "up to date", "merged"]
    # the first merge changed: everything that depends on it is redone
    path.write_text(MULTI.replace("weight: 0.6", "weight: 0.65"))
    assert run() == ["merged", "merged", "merged"]
    # --no-lazy redoes all
    assert [w for _, w in run_multi(path, inter, out, lazy=False, **kw)] == ["merged"] * 3


def test_interrupted_stage_is_resumed(root, tmp_path):
    path = write(root / "case3", MULTI)
    out = tmp_path / "out"
    shard = ["--max-shard-size", "8KB"]
    env = dict(os.environ, ALLOYKIT_FAULT_KILL_AFTER="20")  # a stage writes 30 tensors: dies inside the first
    r = subprocess.run(CLI + ["merge", str(path), str(out), "-q", *shard], env=env, capture_output=True, text=True, cwd=root)
    assert r.returncode == -9, r.stderr
    inter = tmp_path / "out-intermediates"
    assert not (inter / "first-merge").exists()
    partial = inter / ".first-merge.alloykit-tmp"
    assert partial.is_dir() and list(partial.glob("*.safetensors"))
    r = subprocess.run(CLI + ["merge", str(path), str(out), *shard], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "first-merge: resuming" in r.stderr and "second-merge: merging" in r.stderr
    assert "resuming:" in r.stderr and " of " in r.stderr  # merge's own count of the shards it kept
    want = by_hand(root, MULTI, tmp_path / "hand")
    got = read_state(out)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_mergekit_multi_layout_with_every_merge_named(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    text = MULTI.replace("merge_method: ties", "name: third\nmerge_method: ties")
    path = write(tmp_path / "r", text)
    assert main(["multi", str(path), "-I", str(tmp_path / "inter"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "inter").iterdir() if not p.name.startswith(".")) == [
        "first-merge", "second-merge", "third"]
    # alloykit merge FILE OUT: the one merge nothing else uses is the final one, written to OUT
    assert main(["merge", str(path), str(tmp_path / "final"), "-q", "-I", str(tmp_path / "inter")]) == 0
    got, want = read_state(tmp_path / "final"), read_state(tmp_path / "inter" / "third")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("text, needle", [
    ("name: a\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n---\n"
     "name: b\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\n"
     "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n",
     "the merges use each other in a cycle: a -> b -> a; break it"),
    ("name: a\nmerge_method: linear\nmodels: [{model: ft1}]\n---\nname: a\nmerge_method: linear\nmodels: [{model: ft2}]\n",
     "documents 1 and 2 are both named 'a'"),
    ("merge_method: linear\nmodels: [{model: ft1}]\n---\nmerge_method: linear\nmodels: [{model: ft2}]\n",
     "documents 1 and 2 both have no 'name'"),
    ("name: a\nmerge_method: linear\nmodels: [{model: ft1, parameters: {weight: 1}}]\n---\n"
     "merge_method: linear\nmodels: [{model: a@main, parameters: {weight: 1}}]\n",
     "document 2: 'a@main' names the intermediate merge 'a', which has no revisions"),
    ("name: a\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\nmerge_method: linear\nmodels: [{model: a}]\n",
     "document 1 ('a') uses its own result 'a'"),
    ("name: a/b\nmerge_method: linear\nmodels: [{model: ft1}]\n---\nmerge_method: linear\nmodels: [{model: ft2}]\n",
     "document 1: name 'a/b' must be a plain folder name"),
    ("name: a\nmerge_method: linear\nmodels: [{model: ft1, paramters: {weight: 1}}]\n---\nmerge_method: linear\nmodels: [{model: a}]\n",
     "document 1 ('a'): recipe: unknown key 'models[0].paramters'"),
])
def test_bad_multi_stage_recipes_are_one_line(text, needle, tmp_path):
    with pytest.raises(RecipeError) as err:
        load_stages(list(yaml.safe_load_all(text)), tmp_path / "i", tmp_path / "o")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_final_merge_needs_an_output_and_single_recipe_commands_say_so(tmp_path, capsys):
    path = write(tmp_path, MULTI)
    assert main(["multi", str(path), "-I", str(tmp_path / "i")]) == 2
    assert "document 3 has no 'name', so it is the final merge: give the output folder" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="holds 3 documents .* 'alloykit merge FILE OUT' or 'alloykit multi FILE -I DIR'"):
        load_recipe(path)
    for flags, needle in ((["--ray"], "--ray works on one recipe"), (["--output-lora", "8"], "--output-lora works on one recipe"),
                          (["--resume"], "resumes interrupted merges by itself")):
        assert main(["merge", str(path), str(tmp_path / "o"), "-q", *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()


def test_validate_checks_every_document_and_the_order(root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(root)
    path = write(tmp_path, MULTI)
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith(
        "OK: 3 merges in this order: first-merge -> second-merge (after first-merge) -> final merge (after second-merge)")
    path.write_text(MULTI.replace("model: ft2", "model: ft9"))
    assert main(["validate", str(path)]) == 2
    assert "ft9" in capsys.readouterr().err
