"""Plugin methods: the worked example of docs/plugins.md, installed as a distribution and used from a recipe.

The package is built from the page's own code blocks: a module and the entry points of its
pyproject.toml, written as an installed distribution (``*.dist-info`` with
``entry_points.txt``) into a folder on the path, which is what ``pip install`` leaves.
"""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from alloykit.errors import RecipeError
from alloykit.io.checkpoint import StateDictCheckpoint
from alloykit.methods import registry
from alloykit.plan.planner import make_plan
from alloykit.testing.contract import check_method

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def install_plugin(site: Path, name: str, module_source: str, pyproject: str) -> None:
    """Write the package and its dist-info (METADATA, entry_points.txt) into ``site``, as pip would."""
    project = tomllib.loads(pyproject)["project"]
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(module_source)
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project.get("entry-points", {})
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items()))


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """The docs' plugin installed in a folder on sys.path; the registry as it was afterwards."""
    site = tmp_path / "site"
    install_plugin(site, "alloykit_trimmed_mean", _blocks("python")[0], _blocks("toml")[0])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield site
    sys.modules.pop("alloykit_trimmed_mean", None)


def test_the_docs_example_is_short():
    module, pyproject = _blocks("python")[0], _blocks("toml")[0]
    assert len(module.strip().splitlines()) < 30 and len(pyproject.strip().splitlines()) < 10


def test_a_recipe_can_name_a_plugin_method_and_the_contract_runs_on_it(plugin_site):
    assert "trimmed_mean" not in registry._REGISTRY
    spec = registry.get_method("trimmed_mean")  # not built in: found through the entry point
    assert spec.fn.__module__ == "alloykit_trimmed_mean" and "trimmed_mean" in registry.all_methods()
    check_method(spec)
    # its plan-time check refuses a trim that leaves no model, naming the method and tensor
    pre = {f"m{i}": StateDictCheckpoint({"w": torch.zeros(3)}, f"m{i}") for i in range(3)}
    recipe = {"merge_method": "trimmed_mean", "models": [{"model": r} for r in pre], "parameters": {"trim": 2}}
    with pytest.raises(RecipeError, match="method trimmed_mean, tensor 'w': trim 2 drops all 3 models"):
        make_plan(recipe, preloaded=pre)


def test_merge_with_a_plugin_from_a_recipe_through_the_cli(plugin_site, tmp_path):
    """A fresh process (as a user runs it) finds the plugin on its path; the result is the per-entry
    median, which the trimmed mean of three models with trim 1 is."""
    g = torch.Generator().manual_seed(0)
    models = {}
    for name in ("a", "b", "c"):
        sd = {"layers.0.w.weight": torch.randn(6, 5, generator=g), "norm.weight": torch.randn(5, generator=g)}
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
        models[name] = sd
    recipe = yaml.safe_load(_blocks("yaml")[0])
    recipe["models"] = [{"model": str(tmp_path / m["model"])} for m in recipe["models"]]
    (tmp_path / "trimmed.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    run = [sys.executable, "-m", "alloykit.cli.main"]
    r = subprocess.run([*run, "merge", str(tmp_path / "trimmed.yaml"), str(tmp_path / "out"), "-q"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name in out:
        torch.testing.assert_close(out[name], torch.stack([m[name] for m in models.values()]).median(0).values, rtol=0, atol=0)
    r = subprocess.run([*run, "methods", "trimmed_mean"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "trim (shared, int, default 1" in r.stdout and "Yin et al. 2018" in r.stdout


def test_a_broken_plugin_is_reported_and_the_builtins_still_work(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install_plugin(site, "alloykit_broken_plugin", "raise ImportError('needs a library that is not installed')\n",
                   '[project]\nname = "alloykit-broken"\nversion = "1.0"\n'
                   '[project.entry-points."alloykit.methods"]\nbroken_method = "alloykit_broken_plugin"\n'
                   'linear = "alloykit_broken_plugin"\n')
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert registry.get_method("linear").fn.__module__ == "alloykit.methods.basic"
    with pytest.raises(RecipeError, match="merge_method 'broken_method': plugin 'alloykit_broken_plugin' "
                                          r"\(distribution alloykit-broken\) failed to import: ImportError"):
        registry.get_method("broken_method")
    errors = registry.load_plugins()
    assert "names built-in method 'linear'; ignored" in errors["linear"]
    sys.modules.pop("alloykit_broken_plugin", None)
