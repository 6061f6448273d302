"""On a local Ray cluster: ``alloykit merge --ray`` (the shards computed by Ray tasks give the
local merge's bytes, a killed worker's shard is retried, a killed driver's merge resumes from
its journal) and ``alloykit search evolve --workers 2`` (the serial search's evaluations).

One local Ray cluster for the module (2 CPUs, no dashboard); the published recipes of
``test_recipes_compat.py`` on its tiny Llama-shaped models, written in many small shards so
that both workers take part.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from alloykit.cli.main import main  # noqa: E402
from alloykit.testing.fixtures import write_family  # noqa: E402
from test_evolve import config, rows, toy  # noqa: E402,F401  (toy: the evolve tests' fixture)
from test_recipes_compat import RECIPES, SHAPE  # noqa: E402

CLI = [sys.executable, "-m", "alloykit.cli.main"]
SHARD = ["--max-shard-size", "12KB"]
#: several methods, randomized ones included (dare_ties, della draw per-tensor masks)
NAMES = ["linear", "ties", "dare_ties", "della", "gradient_slerp", "model_stock", "passthrough_frankenmerge"]


@pytest.fixture(scope="module")
def cluster():
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base, (a, b, c) = write_family(root, 3, SHAPE, shard_bytes=40_000, delta_scale=0.5)
    return {"base": str(base), "a": str(a), "b": str(b), "c": str(c), "root": root}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def recipe_file(refs, name: str) -> Path:
    path = refs["root"] / f"{name}.yaml"
    path.write_text(RECIPES[name].format(**refs))
    return path


def test_same_bytes_as_local_merge(cluster, refs, tmp_path):
    for name in NAMES:
        path = recipe_file(refs, name)
        local, distributed = tmp_path / f"{name}-local", tmp_path / f"{name}-ray"
        assert main(["merge", str(path), str(local), "-q", *SHARD]) == 0
        assert main(["merge", str(path), str(distributed), "-q", *SHARD, "--ray"]) == 0
        want = folder_bytes(local)
        assert sum(n.endswith(".safetensors") for n in want) > 4, name  # enough shards for both workers
        assert folder_bytes(distributed) == want, name


def test_killed_worker_is_retried(cluster, refs, tmp_path, monkeypatch):
    path = recipe_file(refs, "dare_ties")
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert main(["merge", str(path), str(local), "-q", *SHARD]) == 0
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("ALLOYKIT_FAULT_RAY_KILL_WORKER_ONCE", str(marker))
    assert main(["merge", str(path), str(distributed), "-q", *SHARD, "--ray"]) == 0
    assert marker.exists()  # a worker process did die (SIGKILL) halfway through a shard
    assert folder_bytes(distributed) == folder_bytes(local)
    assert not list(tmp_path.glob(".*alloykit-tmp"))


def test_killed_driver_resumes_from_journal(cluster, refs, tmp_path, capsys):
    path = recipe_file(refs, "della")
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert main(["merge", str(path), str(local), "-q", *SHARD]) == 0
    # the driver, a separate process on the module's cluster, SIGKILLs itself once the first shard is journaled
    env = {**os.environ, "ALLOYKIT_FAULT_KILL_AT": "shard-journaled"}
    r = subprocess.run(CLI + ["merge", str(path), str(distributed), "-q", *SHARD, "--ray", cluster], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert not distributed.exists()
    tmp = tmp_path / ".ray.alloykit-tmp"
    journal = (tmp / "alloykit_journal.json").read_text()
    assert '"sha256"' in journal
    assert main(["merge", str(path), str(distributed), "-v", *SHARD, "--ray", cluster, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming: " in err and "resuming: 0 of" not in err
    assert folder_bytes(distributed) == folder_bytes(local)


def test_worker_refuses_inputs_that_differ(cluster, refs, tmp_path):
    from alloykit.distributed.merge import InputFile, merge_shard
    from alloykit.errors import CheckpointError
    from alloykit.io.writer import plan_shards
    from alloykit.request import MergeRequest

    plan = MergeRequest.of(recipe_file(refs, "linear")).plan()
    shard = plan_shards([(j.name, j.out_dtype, j.shape) for j in plan.jobs], 12_000)[0]
    f = plan.checkpoints[0].files[0]
    wrong = [InputFile(f, os.stat(f).st_size + 1, "0" * 64)]
    with pytest.raises(CheckpointError, match="differs from the driver's"):
        merge_shard(plan, shard, str(tmp_path), wrong, __import__("alloykit").__version__)


def test_without_ray_one_line(refs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert main(["merge", str(recipe_file(refs, "linear")), str(tmp_path / "o"), "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'alloykit[ray]'" in err[0]


def test_evolve_on_ray_workers_gives_the_serial_search(cluster, toy, tmp_path):
    pytest.importorskip("cmaes")
    cfg = config(toy)
    assert main(["search", "evolve", cfg, "--out", str(tmp_path / "serial.yaml"), "-q"]) == 0
    assert main(["search", "evolve", cfg, "--out", str(tmp_path / "ray.yaml"), "-q", "--workers", "2"]) == 0
    assert rows(tmp_path / "ray.evaluations.csv") == rows(tmp_path / "serial.evaluations.csv")
    assert (tmp_path / "ray.yaml").read_text().replace("2 worker(s)", "1 worker(s)") == (tmp_path / "serial.yaml").read_text()
