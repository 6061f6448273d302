"""The import graph keeps the layers of docs/architecture.md: no arrow upward, no circle.

Read statically from every module's ``import`` statements (those inside functions too),
so a deferred import cannot hide an upward dependency. A module in no layer fails the
test: place it in ``LAYERS`` here and in docs/architecture.md.
"""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

#: bottom to top; a module may import its own layer and those below (the same table as the docs)
LAYERS = [
    ("foundation", ["alloykit.errors", "alloykit.roles", "alloykit.progress"]),
    ("ops", ["alloykit.ops"]),
    ("io", ["alloykit.io", "alloykit.config", "alloykit.vocab"]),
    ("methods", ["alloykit.methods"]),
    ("plan", ["alloykit.plan"]),
    ("output", ["alloykit.request", "alloykit.output", "alloykit.merge", "alloykit.card"]),
    ("features", ["alloykit.lora", "alloykit.stats", "alloykit.search", "alloykit.analysis", "alloykit.eval", "alloykit.transplant",
                  "alloykit.align", "alloykit.moe", "alloykit.distributed"]),
    ("entry", ["alloykit.cli", "alloykit.testing"]),
]
#: the package root (``alloykit/__init__.py``) is the composition root: it may import anything
#: (lazily), and any module may read ``alloykit.__version__`` from it
ROOT = "alloykit"
#: arrows other workstreams of issue 13 were removing; all are gone (none may be added)
KNOWN: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _layer(mod: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return best[0] if best else None


def _edges() -> set[tuple[str, str]]:
    mods = _modules()
    edges = set()
    for mod, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if not name.startswith("alloykit"):
                    continue
                while name not in mods and "." in name:
                    name = name.rpartition(".")[0]
                if name != mod and not mod.startswith(name + "."):  # a package's own __init__ is not an edge
                    edges.add((mod, name))
    return edges


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if m != ROOT and _layer(m) is None]
    assert not unplaced, f"modules in no layer: {unplaced}; add them to LAYERS here and to docs/architecture.md"


def test_no_module_imports_upward():
    upward = sorted((a, b) for a, b in _edges() - KNOWN
                    if a != ROOT and b != ROOT and _layer(b) is not None and _layer(a) is not None and _layer(b) > _layer(a))
    assert not upward, "imports that go up a layer (docs/architecture.md): " + "; ".join(f"{a} -> {b}" for a, b in upward)


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for a, b in _edges() - KNOWN:
        if ROOT not in (a, b):
            graph.setdefault(a, set()).add(b)
    # Tarjan's strongly connected components
    index, low, on, stack, circles, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_docs_show_the_same_layers():
    text = DOC.read_text()
    for name, prefixes in LAYERS:
        row = next((line for line in text.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/architecture.md has no row for layer '{name}'"
        for p in prefixes:
            assert re.search(rf"`{re.escape(p.removeprefix('alloykit.'))}[`/]", row), f"layer '{name}' of the docs lacks {p}"


#: none: the quality benchmark's harness, which printed, now lives in benchmarks/quality/
PRINTS_KNOWN: set[str] = set()


def test_only_the_cli_prints():
    """Library code logs (``logging``) and shows progress (``alloykit.progress``); ``print``,
    called or passed as a callback, is the CLI's."""
    offenders = []
    for mod, f in _modules().items():
        if mod.startswith("alloykit.cli") or mod in PRINTS_KNOWN:
            continue
        offenders += [f"{mod}:{n.lineno}" for n in ast.walk(ast.parse(f.read_text()))
                      if isinstance(n, ast.Name) and n.id == "print"]
    assert not offenders, f"print in library code: {offenders}"
