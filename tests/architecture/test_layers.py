"""The engine's layers, read from the source alone (pure AST, nothing imported): every import of
an engine module (module-level and inside functions, relative ones resolved) goes down the
layers or sideways within its own package, and no engine modules import each other in a cycle.

The order, lowest first. A module belongs to the longest prefix of it listed here; packages on
one line (modalities and methods) may import each other only one way round (the cycle check).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LAYERS = [
    # the package's __init__ disarms hub downloads (core.hub); the method registry sits beside core:
    # core.config takes train.method's choices and checks from it, methods read core's files
    ("engine", "engine.core", "engine.methods"),
    ("engine.models",),                  # model source, consent, runtime, tokenizer, builtins, rope
    ("engine.modalities",),
    ("engine.dataset",),
    ("engine.planning",),
    ("engine.artifacts",),               # what a run produced (outputs read it)
    ("engine.outputs",),
    ("engine.training",),                # the trainer samples generations through outputs.generate
    ("engine.service",),                 # the verbs both faces call
    ("engine.cli", "engine.__main__"),
    ("tui",),
]

def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("engine", "tui"):
        for p in (ROOT / top).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if p.stem == "__init__" else parts)] = p
    return mods


MODULES = _modules()


def _edges() -> set[tuple[str, str]]:
    """(importer, imported) for every import between these modules, wherever it sits in the file.
    ``from P import name`` counts as an import of ``P.name`` when that is a module, else of ``P``."""
    edges = set()
    for name, path in MODULES.items():
        pkg = name if path.stem == "__init__" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            for t in targets:
                while t and t not in MODULES:            # import a.b.c of a module a.b's attribute
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add((name, t))
    return edges


EDGES = _edges()


def _rank(module: str) -> int | None:
    best, rank = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    return rank


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _upward() -> set[tuple[str, str]]:
    """Imports that go to a higher layer (sideways within one package is fine)."""
    return {(a, b) for a, b in EDGES
            if _package(a) != _package(b) and _rank(b) > _rank(a)}


def _cycles() -> list[frozenset]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, list[str]] = {m: [] for m in MODULES}
    for a, b in EDGES:
        graph[a].append(b)
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def test_the_walk_sees_the_engine():
    """The walk finds the modules and their function-level imports (a blind walk passes anything)."""
    assert len(MODULES) > 80 and "engine.training.sft" in MODULES and "tui.app" in MODULES
    assert ("engine.dataset.inspect", "engine.modalities.vision") in EDGES      # inside a function
    assert ("engine.training.recipe", "engine.dataset.rows") in EDGES           # module level


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _rank(m) is None] == []


def test_imports_go_down_the_layers():
    """No import from a lower layer into a higher one: models and modalities never read the data or
    the planner, nothing below the trainer imports it, nothing in engine imports cli, service or
    the TUI."""
    bad = sorted(_upward())
    assert bad == [], "imports that go up the layers: " + ", ".join(f"{a} -> {b}" for a, b in bad)


def test_models_and_modalities_read_neither_data_nor_planner():
    bad = sorted((a, b) for a, b in EDGES if a.startswith(("engine.models", "engine.modalities"))
                 and b.startswith(("engine.dataset", "engine.planning", "engine.training", "engine.outputs")))
    assert bad == []


def test_no_import_cycle():
    """No engine or tui modules import each other in a cycle, at module level or inside functions."""
    assert [sorted(c) for c in _cycles()] == []
