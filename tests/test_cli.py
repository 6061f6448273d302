"""The CLI as a user runs it: a subprocess, real files, exit codes."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "alloykit.cli.main"]


def run(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture()
def recipe(family, tmp_path):
    base, tunes = family
    p = tmp_path / "r.yaml"
    p.write_text(
        "merge_method: linear\nmodels:\n"
        + "".join(f"  - model: {t}\n    parameters: {{weight: {w}}}\n" for t, w in zip(tunes, (1, 2, 3)))
        + "dtype: bfloat16\n"
    )
    return p


def test_validate_plan_merge_inspect(recipe, tmp_path):
    r = run("validate", recipe)
    assert r.returncode == 0 and r.stdout.startswith("OK: linear merge of 3 model(s), 39 tensors"), r.stdout + r.stderr
    r = run("plan", recipe, "--json")
    plan = json.loads(r.stdout)
    assert len(plan["jobs"]) == 39 and plan["jobs"][0]["dtype"] == "bfloat16"
    assert [m["weight"] for m in plan["jobs"][0]["model_params"]] == [1, 2, 3]
    r = run("merge", recipe, tmp_path / "out", "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    assert "[39/39 tensors]" in r.stderr and "MB/s" in r.stderr
    r = run("inspect", tmp_path / "out")
    assert "tensors: 39" in r.stdout and "bfloat16 x39" in r.stdout and "shards: 4" in r.stdout


def test_methods_lists_and_describes():
    r = run("methods")
    assert r.returncode == 0 and "linear" in r.stdout
    r = run("methods", "linear")
    assert "weight (per-model, float, required)" in r.stdout and "normalize (shared, bool, default True)" in r.stdout
    r = run("methods", "lineer")
    assert r.returncode == 2 and "did you mean 'linear'" in r.stderr and "Traceback" not in r.stderr


def test_user_errors_exit_2_with_one_line(recipe, tmp_path):
    text = recipe.read_text().replace("weight: 2", "wieght: 2")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    r = run("merge", bad, tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "did you mean 'weight'" in r.stderr
    assert not (tmp_path / "out").exists()
    r = run("inspect", tmp_path / "nowhere")
    assert r.returncode == 2 and "no file or folder" in r.stderr


def test_relative_paths_resolve_from_the_recipe_folder(family, tmp_path):
    import shutil

    _, tunes = family
    for t in tunes[:2]:
        shutil.copytree(t, tmp_path / t.name)
    p = tmp_path / "rel.yaml"
    p.write_text(f"merge_method: linear\nmodels:\n  - model: {tunes[0].name}\n    parameters: {{weight: 1}}\n  - model: {tunes[1].name}\n    parameters: {{weight: 1}}\n")
    r = run("merge", p, tmp_path / "out", "-q", cwd="/")
    assert r.returncode == 0, r.stderr


def test_methods_reference_doc_is_current():
    """docs/methods.md is generated from the declarations; regenerate with `alloykit methods --markdown > docs/methods.md`."""
    from pathlib import Path

    from alloykit.cli.commands import methods_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
    assert doc.read_text() == methods_markdown()
