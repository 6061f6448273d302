"""Start-up time of light commands: alloykit --help and validate, next to mergekit-yaml --help.

    python benchmarks/startup.py [--runs 15] [--recipe small.yaml] [--before OLD_SRC]

Runs each command ``--runs`` times, interleaved (so that load on a shared machine hits all
alike), after two warm-up rounds; prints the median and minimum wall time and the median
CPU time (user + sys) per command. ``--before`` also times the same commands with another
source tree first on PYTHONPATH (e.g. an older checkout's ``src``). Without ``--recipe`` a
tiny Llama-shaped family is written to a temporary folder and a linear recipe over it is
validated.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from alloykit.testing.fixtures import write_family

SRC = Path(__file__).resolve().parents[1] / "src"


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.decode()[-400:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--recipe")
    ap.add_argument("--before", help="another source tree to time too (its src folder)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    recipe = args.recipe
    if recipe is None:
        _, tunes = write_family(tmp, 2)
        recipe = tmp / "small.yaml"
        recipe.write_text(yaml.safe_dump({"merge_method": "linear",
                                          "models": [{"model": str(t), "parameters": {"weight": 1.0}} for t in tunes]}))
    alloykit = [sys.executable, "-m", "alloykit.cli.main"]
    trees = {"": str(SRC)} | ({" (before)": args.before} if args.before else {})
    cmds = {}
    for tag, src in trees.items():
        env = {**os.environ, "PYTHONPATH": src}
        cmds[f"alloykit --help{tag}"] = (alloykit + ["--help"], env)
        cmds[f"alloykit validate{tag}"] = (alloykit + ["validate", str(recipe)], env)
    mergekit = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or shutil.which("mergekit-yaml")
    if mergekit:
        cmds["mergekit-yaml --help"] = ([mergekit, "--help"], dict(os.environ))
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for round_ in range(args.runs + 2):
        for name, (cmd, env) in cmds.items():
            sample = timed(cmd, env)
            if round_ >= 2:
                results[name].append(sample)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.runs} runs each, interleaved; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"| command | wall median | wall min | CPU median |\n|---|---|---|---|")
    for name, samples in results.items():
        wall, cpu = [s[0] for s in samples], [s[1] for s in samples]
        print(f"| `{name}` | {statistics.median(wall):.3f} s | {min(wall):.3f} s | {statistics.median(cpu):.3f} s |")


if __name__ == "__main__":
    main()
