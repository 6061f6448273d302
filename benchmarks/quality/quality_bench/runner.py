"""Run a track's rows over its fine-tuning seeds, checkpointing the results JSON as rows finish.

``run_track`` builds the track (pre-training the image base once, cached), fine-tunes every
task for every seed (cached), then runs the asked rows: the preset's ``seeded_rows`` on
every seed, the others on the first seed. With ``update`` it loads an earlier results file
of the same configuration and replaces (or adds) only the asked rows, against the same
cached fine-tunes: that is how a new row joins a finished benchmark.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from quality_bench.bench import Bench, SearchConfig, summarize
from quality_bench.rows import get_row
from quality_bench.tracks import TRACKS, TrackConfig


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def _jsonable(d: dict) -> dict:
    """As the results JSON holds it (tuples become lists), for comparisons with a loaded file."""
    return json.loads(json.dumps(d))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def task_vectors(bench: Bench) -> dict[str, dict]:
    """How far each fine-tune moved: ||theta_t - theta_0|| / ||theta_0|| over the merged tensors, per seed,
    and the mean pairwise cosine between the tasks' vectors of one seed."""
    base = bench.track.base_sd
    names = [n for n, v in base.items() if v.is_floating_point()]
    norm0 = sum(float(base[n].double().square().sum()) for n in names) ** 0.5
    out: dict[str, dict] = {t: {"relative_norm": []} for t in bench.tasks}
    cos = []
    for seed in bench.track.cfg.seeds:
        ft = bench.finetunes(seed)
        flat = {t: torch.cat([(ft.sd[t][n].double() - base[n].double()).flatten() for n in names]) for t in bench.tasks}
        for t in bench.tasks:
            out[t]["relative_norm"].append(float(flat[t].norm()) / norm0)
        m = torch.stack([v / v.norm() for v in flat.values()])
        sim = m @ m.T
        k = len(bench.tasks)
        cos.append(float((sim.sum() - sim.diag().sum()) / max(1, k * (k - 1))))
    return {"per_task": out, "mean_pairwise_cosine": cos}


def json_path(json_dir: Path, preset: str, track: str, part: int | None = None) -> Path:
    return json_dir / f"results-{preset}-{track}{'.part2' if part == 2 else ''}.json"


def load_results(json_dir: Path, preset: str, track: str) -> dict:
    """A track's results, with the rows, times and study of its second process (--jobs 2) merged in."""
    results = json.loads(json_path(json_dir, preset, track).read_text())
    p2 = json_path(json_dir, preset, track, 2)
    if p2.is_file():
        other = json.loads(p2.read_text())
        results["rows"].update(other["rows"])
        for key in ("timings", "cpu_s"):
            for k, v in other.get(key, {}).items():
                results[key][f"{k} (second process)"] = v
        results["total_cpu_s"] = results.get("total_cpu_s", 0) + other.get("total_cpu_s", 0)
        if "adamerging_study" in other:
            results["adamerging_study"] = other["adamerging_study"]
    return results


def run_track(track_name: str, cfg: TrackConfig, *, rows: list[str], seeded_rows: list[str], search: SearchConfig,
              cache: Path, json_path: Path, update: bool = False, resume: bool = False, log=print,
              extra: dict | None = None) -> tuple[dict, Bench]:
    """``update``: rerun ``rows`` in an existing results file; ``resume``: continue a run that stopped,
    skipping the rows it finished (its timings add up)."""
    t_start, c_start = time.monotonic(), cpu_seconds()
    done: set[str] = set()
    earlier = json.loads(json_path.read_text()) if resume and json_path.is_file() else {}
    resuming = bool(earlier.get("finetune"))  # stopped after the fine-tunes: keep its finished rows
    if resuming:
        results = earlier
        if results.get("config") != _jsonable(cfg.to_dict()):
            raise SystemExit(f"--resume: {json_path} was made with another configuration; run without --resume")
        done = {n for n, r in results["rows"].items() if r.get("complete")}
        log(f"  resuming {json_path}: {len(done)} rows done")
        t_start -= results.get("wall_s_so_far", 0)
        c_start -= results.get("cpu_s_so_far", 0)
        update = True
    elif update:
        results = json.loads(json_path.read_text())
        old, new = results["config"], _jsonable(cfg.to_dict())
        for key in ("tasks", "recipe", "seeds", "n_test", "n_val", "n_train", "pretrain", "vit"):
            if old.get(key) != new.get(key):
                raise SystemExit(f"--update: {json_path} was made with {key}={old.get(key)!r}, this run has {new.get(key)!r}; "
                                 "use the same preset, or run the whole benchmark")
    else:
        results = {"track": track_name, "config": cfg.to_dict(), "search": vars(search).copy(), "rows": {},
                   "timings": {}, "cpu_s": {}, "hardware": hardware(), "command": " ".join(sys.argv), **(extra or {})}

    def save() -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, json_path)

    def phase(name: str, t0: float, c0: float) -> None:
        results["timings"][name] = round(time.monotonic() - t0, 1) + (results["timings"].get(name, 0) if update else 0)
        results["cpu_s"][name] = round(cpu_seconds() - c0, 1) + (results["cpu_s"].get(name, 0) if update else 0)
        log(f"[{track_name}/{name}] {results['timings'][name]}s wall, {results['cpu_s'][name]} CPU-s")
        save()

    t0, c0 = time.monotonic(), cpu_seconds()
    track = TRACKS[track_name](cfg, cache, log)
    bench = Bench(track, search, log)
    if not update:
        results["tasks"] = {t: track.task_info(t) for t in track.tasks}
        if hasattr(track, "base_meta"):
            results["base"] = track.base_meta
        phase("data and base", t0, c0)
    t0, c0 = time.monotonic(), cpu_seconds()
    for seed in cfg.seeds:
        bench.finetunes(seed)
    trained = [m for s in cfg.seeds for m in bench.finetunes(s).meta.values() if not m["cached"]]
    if update and trained:
        raise SystemExit("--update: a fine-tune was not in the cache, so the kept rows would not match; run the whole benchmark")
    if not update:
        results["finetune"] = {t: {str(s): bench.finetunes(s).meta[t] for s in cfg.seeds} for t in track.tasks}
        results["task_vectors"] = task_vectors(bench)
        phase("fine-tunes", t0, c0)
    results["search"] = vars(search).copy()
    for name in rows:
        if name in done:
            continue
        row = get_row(name)
        seeds = list(cfg.seeds) if row.seeded and name in seeded_rows else [cfg.seeds[0]]
        entry = {"kind": row.kind, "seeded": row.seeded, "seeds": {}}
        t0, c0 = time.monotonic(), cpu_seconds()
        for seed in seeds:
            ts, cs = time.monotonic(), cpu_seconds()
            log(f"  {track_name} row {name} seed {seed}")
            try:
                out = row.run(bench, seed)
            except Exception as err:  # noqa: BLE001 - one failing row is reported, the others still run
                import traceback

                log(traceback.format_exc())
                out = {"status": "error", "reason": f"{type(err).__name__}: {err}"}
            if "scores" in out:
                out = {"status": "ok", **{k: v for k, v in out.items() if k != "scores"}, **summarize(out.pop("scores"))}
            out.update(seconds=round(time.monotonic() - ts, 1), cpu_s=round(cpu_seconds() - cs, 1))
            entry["seeds"][str(seed)] = out
            if out["status"] != "ok":
                break  # n/a or an error: the other seeds would say the same
        entry["complete"] = True
        results["rows"][name] = entry
        results["wall_s_so_far"] = round(time.monotonic() - t_start, 1)
        results["cpu_s_so_far"] = round(cpu_seconds() - c_start, 1)
        results.setdefault("row_seconds", {})[name] = {"wall": round(time.monotonic() - t0, 1), "cpu": round(cpu_seconds() - c0, 1)}
        save()
    if update and not resuming:
        results.setdefault("updates", []).append({"rows": rows, "command": " ".join(sys.argv),
                                                  "seconds": round(time.monotonic() - t_start, 1),
                                                  "cpu_s": round(cpu_seconds() - c_start, 1), "hardware": hardware()})
    else:
        results["wall_s"] = round(time.monotonic() - t_start, 1)
        results["total_cpu_s"] = round(cpu_seconds() - c_start, 1)
        if resuming:
            results["resumed"] = results.get("resumed", 0) + 1
    save()
    return results, bench
