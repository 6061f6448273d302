"""Distributed merge (``alloykit merge --ray``) against the local merge, on one machine.

    python benchmarks/generate.py --size 0.1b --finetunes 3 --out .bench/0.1b
    nice -n 15 python benchmarks/distributed.py --models .bench/0.1b --out docs/distributed.json

Runs one recipe (TIES, base + 3 fine-tunes, bf16) as: a local merge with 1 and 2 threads;
a Ray merge on a local cluster started in-process with 1 and 2 worker CPUs; and a Ray merge
on a two-node cluster started on this box (``ray start --head`` plus ``ray start --address``,
one CPU each: two "machines" sharing one filesystem). Every output is checked byte for byte
against the local merge. Wall time and CPU seconds (the driver's user+sys; the Ray workers'
from each shard's task report) go to the JSON file; rerun after a change, compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """merge_method: ties
base_model: {m}/base
models:
  - model: {m}/ft1
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {m}/ft2
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {m}/ft3
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
"""


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run(label: str, fn, out: Path, ref: Path | None, rows: list) -> None:
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.monotonic(), cpu()
    written = fn()
    wall, driver_cpu = time.monotonic() - t0, cpu() - c0
    shards = getattr(written, "shards", None) or []
    workers = {(s["host"], s["pid"]) for s in shards}
    row = {"run": label, "wall_s": round(wall, 2), "driver_cpu_s": round(driver_cpu, 2),
           "worker_cpu_s": round(sum(s["cpu_seconds"] for s in shards), 2), "shards": len(shards) or None,
           "worker_processes": len(workers) or None,
           "same_bytes_as_local": None if ref is None else folder_bytes(out) == folder_bytes(ref)}
    rows.append(row)
    print(json.dumps(row), flush=True)


def stop_cluster(temp_dir: str, port: str) -> None:
    """Stop, by PID, each process of the cluster started here (its temp folder or its port in the command
    line): SIGTERM, then SIGKILL for those still there after 10 s (raylets ignore SIGTERM under load)."""
    import signal

    mine = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd or f"127.0.0.1:{port}" in cmd:
            mine.append(int(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in mine:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in mine):
            time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shard-size", default="40MB")
    a = ap.parse_args()
    import ray

    from alloykit.cli.main import parse_size
    from alloykit.distributed.merge import RayOptions, merge_on_ray
    from alloykit.merge import WriteOptions, run_merge
    from alloykit.request import MergeRequest

    work = Path(tempfile.mkdtemp(prefix="alloykit-dist-"))
    recipe = work / "ties.yaml"
    recipe.write_text(RECIPE.format(m=a.models.resolve()))
    request = MergeRequest.of(recipe)
    shard = parse_size(a.shard_size)
    rows: list = []
    ref = work / "local-1"
    for threads in (1, 2):
        o = WriteOptions(threads=threads, max_shard_size=shard, progress=False)
        run(f"local, {threads} thread(s)", lambda: run_merge(request, work / f"local-{threads}", o), work / f"local-{threads}",
            None if threads == 1 else ref, rows)
    o = WriteOptions(max_shard_size=shard, progress=False)
    for cpus in (1, 2):
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            run(f"ray, local cluster, {cpus} worker CPU(s)", lambda: merge_on_ray(request, work / f"ray-{cpus}", o),
                work / f"ray-{cpus}", ref, rows)
        finally:
            ray.shutdown()
    # two Ray nodes on this box, one CPU each, standing in for two machines on a shared filesystem
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    port = "6391"
    bin_ray = str(Path(sys.executable).with_name("ray"))
    # its own temp folder, so that only the processes of this cluster are stopped at the end (never `ray stop`,
    # which stops every Ray cluster of the user on the machine)
    tmp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    subprocess.run([bin_ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    f"--temp-dir={tmp}", "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        subprocess.run([bin_ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            ray.init(address=f"127.0.0.1:{port}", log_to_driver=False, logging_level="ERROR")
            alive = sum(n["Alive"] for n in ray.nodes())
            ray.shutdown()
            if alive >= 2:
                break
            time.sleep(2)
        run("ray, 2 nodes (ray start --head + ray start --address), 1 CPU each",
            lambda: merge_on_ray(request, work / "ray-2nodes", o, RayOptions(f"127.0.0.1:{port}")), work / "ray-2nodes",
            ref, rows)
    finally:
        ray.shutdown()
        stop_cluster(str(tmp), port)
    load = os.getloadavg()
    a.out.write_text(json.dumps({"recipe": "ties, base + 3 fine-tunes, bf16, 0.1B Llama-shaped (benchmarks/generate.py)",
                                 "shard_size": a.shard_size, "machine": f"{os.cpu_count()} cores shared with other users, "
                                 f"load average {load[0]:.1f} at the end", "rows": rows}, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
