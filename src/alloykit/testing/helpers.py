"""Helpers for tests of alloykit and of its plugins: run the CLI in-process, read a model back.

Shared by the test suite (instead of a copy per test file) and usable by plugin authors::

    from alloykit.testing.helpers import read_state, run_cli

    def test_merge(capsys, tmp_path):
        code, out, err = run_cli(capsys, "merge", "recipe.yaml", tmp_path / "out", "-q")
        assert code == 0, err
        merged = read_state(tmp_path / "out")
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from alloykit.cli.main import main
from alloykit.io.checkpoint import Checkpoint
from alloykit.merge import plan_recipe
from alloykit.plan import executor


class CliResult(NamedTuple):
    code: int
    out: str  # stdout, without leading or trailing whitespace
    err: str  # stderr, likewise


def run_cli(capsys: Any, *args: Any) -> CliResult:
    """Run ``alloykit ARGS...`` in this process (arguments may be paths or numbers) and return
    its exit code and what it printed (``capsys`` is pytest's fixture)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return CliResult(code, captured.out.strip(), captured.err.strip())


def read_state(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder or file (e.g. a merge's output), by name."""
    ck = Checkpoint(path, allow_pickle=allow_pickle)
    try:
        return {name: ck.read(name) for name in ck.tensors}
    finally:
        ck.close()


def merge_in_memory(recipe: dict, *, seed: int = 0, **run_options: Any) -> dict[str, torch.Tensor]:
    """A recipe merged through the planner and executor into a dict, nothing written
    (``run_options``: the executor's, e.g. ``threads``)."""
    plan = plan_recipe(recipe, seed=seed)
    out: dict[str, torch.Tensor] = {}
    try:
        executor.run_jobs(plan, out.__setitem__, progress=False, **run_options)
    finally:
        plan.close()
    return out
