"""Time alloykit against mergekit and the plain read-sum-write baseline on the same inputs.

    python benchmarks/run.py --root .bench --size 1.1b --methods linear,ties --repeats 3 --mergekit-repeats 1

Each tool runs as a subprocess on the same recipe and inputs (page cache warmed by a
first read). Reported per run: wall time, CPU time (user+sys of the child, from
wait4), and peak anonymous resident memory (RssAnon of the child, sampled every
20 ms from /proc/PID/status: tensors in flight, not the page cache or mmapped files).
Medians over ``--repeats`` and their spread (min-max of wall and CPU seconds, and the
1-minute load average at the end of each run) go to docs/benchmarks.json; `report.py`
turns them into docs/benchmarks.md and plots. ``--size 3b`` (Llama-3.2-3B's layout, 25.7 GB
of inputs, ``generate.py``) is generated on first use: about 40 minutes and the disk space.
``--cold`` drops the page cache (``sync; echo 1 > /proc/sys/vm/drop_caches``, root only) before every
measured run instead of warming it, and files the figures under "SIZE, cold": issue 17's 3B target, whose
inputs are larger than the page cache could hold anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PY = sys.executable
ALLOYKIT = [PY, "-m", "alloykit.cli.main"]
MERGEKIT = [str(Path(PY).parent / "mergekit-yaml")]

#: method -> (fine-tunes used, per-model parameters (one dict, or one per model), shared parameters, base_model)
METHODS: dict[str, tuple[int, dict | list[dict], dict, bool]] = {
    # mergekit's methods
    "linear": (3, {"weight": 1.0}, {}, False),
    "task_arithmetic": (3, {"weight": 0.5}, {}, True),
    "ties": (3, {"weight": 0.5, "density": 0.5}, {}, True),
    "dare_ties": (3, {"weight": 0.5, "density": 0.5}, {}, True),
    "dare_linear": (3, {"weight": 0.5, "density": 0.5}, {}, True),
    "breadcrumbs": (3, {"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}, True),
    "breadcrumbs_ties": (3, {"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}, True),
    "della": (3, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}, True),
    "della_linear": (3, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}, True),
    "sce": (3, {}, {"select_topk": 0.5}, True),
    "model_stock": (3, {}, {}, True),
    "slerp": (1, {}, {"t": 0.5}, True),
    "nuslerp": (2, [{"weight": 0.4}, {"weight": 0.6}], {}, True),
    "multislerp": (3, [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], {}, True),
    "karcher": (3, {}, {}, False),
    # alloykit only: interference and subspace methods
    "pcb": (3, {}, {}, True),
    "magmax": (3, {}, {}, True),
    "consensus_ta": (3, {}, {}, True),
    "tsv_m": (3, {}, {}, True),
    "iso_c": (3, {}, {}, True),
    "iso_cts": (3, {}, {}, True),
    "cart": (3, {}, {}, False),
}
#: methods mergekit 0.1.5 has (the others run in alloykit only)
MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
            "della_linear", "sce", "model_stock", "slerp", "nuslerp", "multislerp", "karcher"}
#: the mergekit family the targets are set for (issue 17)
FAMILY = sorted(MERGEKIT_METHODS - {"linear", "task_arithmetic"})


def recipe(method: str, root: Path, n: int | None = None) -> dict:
    k, per, shared, base = METHODS[method]
    k = n or k
    pers = per if isinstance(per, list) else [per] * k
    r = {"merge_method": method, "dtype": "bfloat16",
         "models": [{"model": str(root / f"ft{i + 1}"), **({"parameters": pers[i]} if pers[i] else {})} for i in range(k)]}
    if base:
        r["base_model"] = str(root / "base")
    if shared:
        r["parameters"] = shared
    return r


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall and CPU seconds and peak anonymous RSS (bytes) of the child."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        path = f"/proc/{proc.pid}/status"
        while not stop.is_set():
            try:
                for line in open(path):
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                return
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    stop.set()
    th.join()
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {err[-2000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_anon": peak[0], "maxrss": ru.ru_maxrss * 1024,
            "load": os.getloadavg()[0]}


def drop_page_cache() -> None:
    """Write back dirty pages, then drop the clean ones, so that the next run reads its inputs from the disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("1\n")


def warm(root: Path) -> None:
    for f in root.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def summarize(runs: list[dict]) -> dict:
    """Medians over the repeats, with their spread (min, max) and every run's figures."""
    walls = [r["wall"] for r in runs]
    cpus = [r["cpu"] for r in runs]
    if len(runs) > 1:
        print(f"    median of {len(runs)}: {statistics.median(walls):.1f} s wall ({min(walls):.1f}-{max(walls):.1f}), "
              f"cpu {statistics.median(cpus):.1f} s ({min(cpus):.1f}-{max(cpus):.1f})", flush=True)
    return {
        "runs": len(runs),
        "wall_median": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "cpu_median": statistics.median(cpus),
        "cpu_min": min(cpus),
        "cpu_max": max(cpus),
        "load_1min": [r["load"] for r in runs],
        "rss_anon_peak": max(r["rss_anon"] for r in runs),
        "maxrss_peak": max(r["maxrss"] for r in runs),
    }


def bench_tool(tool: str, method: str, root: Path, work: Path, repeats: int, n: int | None = None, threads: int | None = None,
               cold: bool = False) -> dict:
    rfile = work / f"{method}.yaml"
    rfile.write_text(yaml.safe_dump(recipe(method, root, n)))
    runs = []
    for _ in range(repeats):
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        if tool == "alloykit":
            cmd = ALLOYKIT + ["merge", str(rfile), str(out), "-q"] + (["--threads", str(threads)] if threads else [])
        else:
            cmd = MERGEKIT + [str(rfile), str(out), "--lazy-unpickle", "--quiet", "--no-copy-tokenizer"]
        if cold:
            drop_page_cache()
        runs.append(measure(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1")))
        print(f"  {tool:8s} {method:16s} {runs[-1]['wall']:7.1f}s  cpu {runs[-1]['cpu']:6.1f}s  anon {runs[-1]['rss_anon'] / 1e9:.2f} GB"
              f"  load {runs[-1]['load']:.1f}", flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    return summarize(runs)


def bench_baseline(mode: str, root: Path, work: Path, repeats: int, k: int = 3, cold: bool = False) -> dict:
    models = [str(root / "base")] + [str(root / f"ft{i + 1}") for i in range(k)]
    runs = []
    for _ in range(repeats):
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        if cold:
            drop_page_cache()
        runs.append(measure([PY, str(HERE / "baseline.py"), mode, str(out), *models]))
        print(f"  baseline {mode:16s} {runs[-1]['wall']:7.1f}s  cpu {runs[-1]['cpu']:6.1f}s  anon {runs[-1]['rss_anon'] / 1e9:.2f} GB"
              f"  load {runs[-1]['load']:.1f}", flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    return summarize(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description="alloykit vs mergekit vs read-sum-write")
    ap.add_argument("--root", type=Path, default=Path(".bench"))
    ap.add_argument("--size", default="1.1b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit-repeats", type=int, default=1)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-alloykit", action="store_true", help="mergekit only (e.g. a second invocation after an alloykit-only one)")
    ap.add_argument("--no-baselines", action="store_true", help="keep the baselines already in --results")
    ap.add_argument("--warmup-root", type=Path, help="run each alloykit method once on these (smaller) inputs first, "
                    "unmeasured, so that numba's on-disk cache holds every kernel before timing")
    ap.add_argument("--results", type=Path, default=Path("docs/benchmarks.json"))
    ap.add_argument("--work", type=Path, help="scratch folder for recipes and outputs (default ROOT/work; "
                    "give each concurrent invocation its own)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every measured run (root only); "
                    "figures go under 'SIZE, cold'")
    ap.add_argument("--label", help="key of the figures in --results (default SIZE, or 'SIZE, cold')")
    a = ap.parse_args()
    if a.cold and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("run.py: --cold needs to write /proc/sys/vm/drop_caches (run as root), or leave out --cold", file=sys.stderr)
        sys.exit(2)
    root = a.root / a.size
    from generate import generate  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

    generate(a.size, 3, root)
    work = a.work or a.root / "work"
    work.mkdir(parents=True, exist_ok=True)
    if not a.cold:
        warm(root)
    results = json.loads(a.results.read_text()) if a.results.exists() else {}
    entry = results.setdefault(a.label or (f"{a.size}, cold" if a.cold else a.size), {})
    entry["hardware"] = f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    methods = a.methods.split(",")
    if a.warmup_root and not a.no_alloykit:
        for method in methods:
            print(f"== warm-up (not measured): {method} on {a.warmup_root}", flush=True)
            bench_tool("alloykit", method, a.warmup_root, work, 1)
    if not a.no_baselines:
        print(f"== {a.size}: baselines", flush=True)
        entry["read-sum-write"] = bench_baseline("read-sum-write", root, work, a.repeats, cold=a.cold)
        entry["copy"] = bench_baseline("copy", root, work, a.repeats, cold=a.cold)
    for method in methods:
        print(f"== {a.size}: {method}", flush=True)
        if not a.no_alloykit:
            entry.setdefault("alloykit", {})[method] = bench_tool("alloykit", method, root, work, a.repeats, cold=a.cold)
        if not a.no_mergekit and method in MERGEKIT_METHODS:
            entry.setdefault("mergekit", {})[method] = bench_tool("mergekit", method, root, work, a.mergekit_repeats, cold=a.cold)
        a.results.write_text(json.dumps(results, indent=1))
    a.results.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
