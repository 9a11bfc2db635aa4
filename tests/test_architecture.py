"""The package's import architecture: tiers import only downward, and no import cycle.

    cli ──► training ──► core          core:     lorakit/*.py (config, layers, kernels, inject, io, ...)
     │  └─► serving ───► core          training: lorakit/training/     serving: lorakit/serving/
     └─────────────────► core          cli:      lorakit/cli/ and lorakit/__main__.py

Every import statement counts, at module level or inside a function (a lazy import is still a
dependency); imports under ``if TYPE_CHECKING:`` do not (they never run).

The one allowed exception: ``lorakit/__init__.py``'s module ``__getattr__`` imports
``lorakit.training`` the first time ``lorakit.train`` / ``Trainer`` / ``TrainConfig`` is used, so
those names sit at the top level (DESIGN.md) while ``import lorakit`` stays light. Without that
exception it would be an upward import (core → training) and close a cycle (training imports
core).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import lorakit

SRC = Path(lorakit.__file__).resolve().parents[1]
ALLOWED = {"core": {"core"}, "training": {"core", "training"}, "serving": {"core", "serving"},
           "cli": {"core", "training", "serving", "cli"}}
EXCEPTION = ("lorakit", "__getattr__", "lorakit.training")  # (module, function, imported package)


def modules(src: Path, package: str = "lorakit") -> dict[str, Path]:
    """{dotted name: file} for every module of the package (a package is its __init__.py)."""
    found = {}
    for f in sorted((src / package).rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = f
    return found


def tier(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("training", "serving", "cli"):
        return parts[1]
    return "cli" if parts[-1] == "__main__" else "core"


def imports(src: Path, package: str = "lorakit") -> list[tuple[str, int, str, str]]:
    """(module, line, function or "", imported module) for every import of a package module."""
    mods = modules(src, package)

    def resolve(name: str) -> str:  # "lorakit.io.atomic_dir" -> "lorakit.io"
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = []
    for mod, path in mods.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for node, function in _walk(tree, ""):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = here
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.split(".")[0] == package else ""
                if target and target != mod:
                    edges.append((mod, node.lineno, function, target))
    return edges


def _walk(node: ast.AST, function: str):
    """Every node with the name of the function it sits in; skips `if TYPE_CHECKING:` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (pair for sub in child.orelse for pair in _walk_one(sub, function))
            continue
        yield from _walk_one(child, function)


def _walk_one(node: ast.AST, function: str):
    yield node, function
    inner = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
    yield from _walk(node, inner)


def upward(edges) -> list[str]:
    return [f"{m}:{line} imports {t} ({tier(m)} -> {tier(t)})" for m, line, fn, t in edges
            if tier(t) not in ALLOWED[tier(m)] and (m, fn, t) != EXCEPTION]


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for m, _, fn, t in edges:
        if (m, fn, t) != EXCEPTION:
            graph.setdefault(m, set()).add(t)
            graph.setdefault(t, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# --- the package --------------------------------------------------------------------------------------
def test_imports_only_go_down_the_tiers():
    edges = imports(SRC)
    assert len({m for m, *_ in edges}) > 30                        # the walk sees the whole package
    assert upward(edges) == []


def test_no_import_cycle():
    assert cycles(imports(SRC)) == []


def test_the_one_exception_is_the_lazy_training_attributes():
    edges = imports(SRC)
    lazy = [(m, fn, t) for m, _, fn, t in edges if m == "lorakit" and tier(t) != "core"]
    assert lazy == [EXCEPTION]
    assert lorakit.Trainer.__module__ == "lorakit.training.trainer"  # and it works


def test_import_lorakit_stays_light():
    """`import lorakit` loads the LoRA core only: no trainer, server, CLI, plotting or transformers."""
    code = "import json, sys, lorakit; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = set(json.loads(out.stdout))
    assert "lorakit.layers" in loaded
    heavy = {"lorakit.training", "lorakit.serving", "lorakit.cli", "matplotlib", "fastapi", "transformers"}
    assert heavy & loaded == set()


# --- the checker itself -------------------------------------------------------------------------------
def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    pkg = tmp_path / "lorakit"
    (pkg / "training").mkdir(parents=True)
    files = {
        "__init__.py": "def __getattr__(name):\n    from . import training\n",
        "a.py": "from .b import x\n",
        "b.py": "def f():\n    from . import a\n",                          # a lazy import closes a <-> b
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .training import t\n",
        "d.py": "import lorakit.training.t\n",                              # core -> training
        "training/__init__.py": "",
        "training/t.py": "from ..a import x\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    edges = imports(tmp_path)
    assert upward(edges) == ["lorakit.d:1 imports lorakit.training.t (core -> training)"]
    assert cycles(edges) == [["lorakit.a", "lorakit.b"]]
