"""Multi-stage recipes: several merges in one YAML file, later ones using earlier results.

The format is mergekit-multi's: documents separated by ``---``, each a recipe; a document
with a ``name`` is an intermediate merge written to ``INTERMEDIATE_DIR/NAME``, and any
model reference (``model:``, ``base_model:``, a slice source, ``tokenizer_source``, the base
of ``NAME+ADAPTER``) equal to a name means that intermediate. At most one document has no
name: the final merge, written to the output folder. The references form a graph that
must have no cycle; merges run in an order that respects it (document order otherwise).

Intermediates are cached and resumable. Each stage records, beside its output, a digest
of what decides its bytes (its recipe with the intermediates' paths filled in, the seed,
alloykit's version, and the size and modification time of every input file). A rerun
skips a stage whose output exists with the same digest, continues a stage that was
interrupted with the same digest (its verified shards are kept: ``merge(resume=True)``),
and redoes a stage whose recipe or inputs changed, which in turn redoes the stages that
use it (their inputs changed). ``lazy=False`` redoes every stage.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alloykit.config import Recipe, load_documents, parse_recipe
from alloykit.errors import OutputError, RecipeError
from alloykit.merge import run_merge
from alloykit.output.folder import temp_dir_for
from alloykit.output.journal import digest
from alloykit.output.model import WriteOptions, plan_fingerprint
from alloykit.request import MergeRequest

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One merge of a multi-stage recipe."""

    name: str | None  # None: the final merge
    recipe: Recipe  # with the intermediates' names replaced by their folders
    out: Path
    uses: list[str] = field(default_factory=list)  # names of the intermediates it reads

    @property
    def label(self) -> str:
        return self.name or "final merge"


def _ref_keys(data: dict) -> list[tuple[Any, Any]]:
    """(container, key) of every model reference in a recipe dict."""
    out: list[tuple[Any, Any]] = []

    def layout(node: dict) -> None:
        for m in node.get("models") or []:
            out.append((m, "model"))
        for sl in node.get("slices") or []:
            out.extend((src, "model") for src in sl.get("sources") or [])
            if sl.get("base_model") is not None:
                out.append((sl, "base_model"))

    layout(data)
    for module in (data.get("modules") or {}).values():
        layout(module)
    for key in ("base_model", "tokenizer_source"):
        if data.get(key) is not None:
            out.append((data, key))
    if isinstance(data.get("tokenizer"), dict) and data["tokenizer"].get("source") is not None:
        out.append((data["tokenizer"], "source"))
    return out


def _substitute(ref: str, folders: dict[str, Path], where: str) -> tuple[str, set[str]]:
    """'NAME' -> its folder, 'NAME+ADAPTER' -> 'FOLDER+ADAPTER'; other references unchanged."""
    parts = ref.split("+")
    used = set()
    for i, part in enumerate(parts):
        path, _, revision = part.partition("@")
        if path in folders:
            if revision:
                raise RecipeError(f"{where}: '{part}' names the intermediate merge '{path}', which has no revisions; drop '@{revision}'")
            parts[i] = str(folders[path])
            used.add(path)
    return "+".join(parts), used


def load_stages(
    documents: list[dict], intermediate_dir: str | os.PathLike, out: str | os.PathLike | None, *, sink_to_out: bool = False
) -> list[Stage]:
    """The merges of a multi-stage recipe, in an order where each comes after those it uses.

    ``sink_to_out``: when every document is named, the one merge no other uses is the final
    one and goes to ``out`` (``alloykit merge FILE OUT``); otherwise (``alloykit multi``, as
    mergekit-multi) every named merge goes to the intermediate folder.
    """
    inter = Path(intermediate_dir).absolute()
    named: dict[str, int] = {}
    final = None
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise RecipeError(f"document {i + 1}: expected a mapping of keys (merge_method, models...), got {type(doc).__name__}")
        name = doc.get("name")
        if name is None:
            if final is not None:
                raise RecipeError(f"documents {final + 1} and {i + 1} both have no 'name'; only the final merge may be unnamed")
            final = i
            continue
        if not isinstance(name, str) or not name or "/" in name or "+" in name or "@" in name or name.startswith("."):
            raise RecipeError(f"document {i + 1}: name {name!r} must be a plain folder name (no '/', '+', '@', no leading '.')")
        if name in named:
            raise RecipeError(f"documents {named[name] + 1} and {i + 1} are both named '{name}'; names must be unique")
        named[name] = i
    if final is not None and out is None:
        raise RecipeError(f"document {final + 1} has no 'name', so it is the final merge: give the output folder for it")
    folders = {name: inter / name for name in named}
    stages = []
    for i, doc in enumerate(documents):
        where = f"document {i + 1}" + (f" ('{doc['name']}')" if doc.get("name") else "")
        try:
            parse_recipe(doc)  # schema errors first, located
        except RecipeError as err:
            raise RecipeError(f"{where}: {err}") from None
        data = json.loads(json.dumps(doc))  # a deep copy
        uses: set[str] = set()
        for container, key in _ref_keys(data):
            container[key], used = _substitute(str(container[key]), folders, where)
            uses |= used
        if doc.get("name") in uses:
            raise RecipeError(f"{where} uses its own result '{doc['name']}'")
        stage_out = folders[doc["name"]] if doc.get("name") else Path(out).absolute()
        stages.append(Stage(doc.get("name"), parse_recipe(data), stage_out, sorted(uses)))
    if final is None and sink_to_out and out is not None:
        used = {u for s in stages for u in s.uses}
        sinks = [s for s in stages if s.name not in used]
        if len(sinks) != 1:
            raise RecipeError(f"every document is named and {len(sinks)} merges are used by no other "
                              f"({', '.join(s.label for s in sinks)}): remove the name of the final one")
        sinks[0].out = Path(out).absolute()
    return _ordered(stages)


def _ordered(stages: list[Stage]) -> list[Stage]:
    """Depth-first order: a stage after every stage it uses; document order among the rest."""
    by_name = {s.name: s for s in stages if s.name}
    done: list[Stage] = []
    state: dict[int, str] = {}

    def visit(stage: Stage, path: list[str]) -> None:
        if state.get(id(stage)) == "done":
            return
        if state.get(id(stage)) == "active":
            cycle = path[path.index(stage.label):] + [stage.label]
            raise RecipeError(f"the merges use each other in a cycle: {' -> '.join(cycle)}; break it")
        state[id(stage)] = "active"
        for dep in stage.uses:
            visit(by_name[dep], path + [stage.label])
        state[id(stage)] = "done"
        done.append(stage)

    for s in stages:
        visit(s, [])
    return done


def _stamp_path(stage: Stage, intermediate_dir: Path) -> Path:
    return intermediate_dir / (f".stage-{stage.name}.json" if stage.name else ".final.json")


#: write options that do not change the output's bytes (left out of the stage digest)
_NO_EFFECT = {"device", "threads", "progress", "budget_bytes", "fail_on_nonfinite", "overwrite", "resume"}


def stage_digest(request: MergeRequest, options: WriteOptions) -> str:
    """What decides a stage's output: the fingerprint a merge's output folder records (recipe with the
    intermediates' paths filled in, seed, version, every input's headers, files, sizes and dates, the
    tensor layout) and the write options that change bytes. Reads headers only."""
    kept = {k: v for k, v in sorted(vars(options).items()) if k not in _NO_EFFECT}
    plan = request.plan()
    try:
        parts = plan_fingerprint(plan, "", options=repr(kept))
    finally:
        plan.close()
    return digest(json.dumps(parts, sort_keys=True))


def run_stages(
    stages: list[Stage],
    intermediate_dir: str | os.PathLike,
    *,
    lazy: bool = True,
    overwrite: bool = False,
    seed: int | None = None,
    allow_pickle: bool = False,
    recipe_dir: str | os.PathLike | None = None,
    **write_options: Any,
) -> list[tuple[Stage, str]]:
    """Run every stage in order; returns (stage, what happened: merged / resumed / up to date).

    ``overwrite`` lets the final merge replace an output folder that no run of this recipe
    made; intermediates in ``intermediate_dir`` are always replaced when out of date.
    Relative model paths are looked up from the working directory, then ``recipe_dir``.
    ``write_options``: ``alloykit.merge.WriteOptions`` fields (device, threads, max_shard_size, ...),
    the same for every stage. Each stage is one ``MergeRequest`` written by ``run_merge``, as
    ``alloykit merge`` writes a single recipe.
    """
    inter = Path(intermediate_dir).absolute()
    inter.mkdir(parents=True, exist_ok=True)
    rdir = Path(recipe_dir) if recipe_dir is not None else None
    progress = write_options.get("progress", True)
    report = []
    for i, stage in enumerate(stages):
        request = MergeRequest(stage.recipe, rdir, seed, allow_pickle)
        stamp = _stamp_path(stage, inter)
        digest_now = stage_digest(request, WriteOptions(**write_options))
        previous = _read_stamp(stamp)
        same = previous.get("digest") == digest_now
        if lazy and same and previous.get("complete") and stage.out.is_dir():
            report.append((stage, "up to date"))
            _say(progress, f"[{i + 1}/{len(stages)}] {stage.label}: up to date in {stage.out}")
            continue
        resume = lazy and same and temp_dir_for(stage.out).exists()
        replace = stage.name is not None or overwrite or previous.get("out") == str(stage.out)
        if stage.out.exists() and not replace and any(stage.out.iterdir()):
            raise OutputError(f"output folder '{stage.out}' exists and was not made by this recipe; choose another folder "
                              "or pass --overwrite")
        _say(progress, f"[{i + 1}/{len(stages)}] {stage.label}: {'resuming' if resume else 'merging'} "
                       f"({stage.recipe.merge_method}) -> {stage.out}")
        _write_stamp(stamp, {"digest": digest_now, "complete": False, "out": str(stage.out)})
        run_merge(request, stage.out, WriteOptions(**write_options, resume=resume, overwrite=True))
        _write_stamp(stamp, {"digest": digest_now, "complete": True, "out": str(stage.out)})
        report.append((stage, "resumed" if resume else "merged"))
    return report


def run_multi(
    recipe: str | os.PathLike | list[dict],
    intermediate_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    sink_to_out: bool = False,
    **options: Any,
) -> list[tuple[Stage, str]]:
    """Load and run a multi-stage recipe (a YAML file, or its documents as dicts); see the module docstring."""
    if isinstance(recipe, (str, os.PathLike)):
        options.setdefault("recipe_dir", Path(recipe).parent)
        recipe = load_documents(recipe)
    stages = load_stages(recipe, intermediate_dir, out, sink_to_out=sink_to_out)
    return run_stages(stages, intermediate_dir, **options)


def _read_stamp(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _say(progress: bool, text: str) -> None:
    if progress:
        log.info(text)
