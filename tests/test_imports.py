"""The floors of the house hold: no import cycle between files, and arrows point down only.

The import graph is read from the source with ``ast`` (nothing is imported): a node is a
module file of the project's packages (a package's ``__init__.py`` is the node of the
package's own name); an edge is an ``import``/``from ... import`` naming another node,
lazy imports inside functions included (a cycle is a design fact either way), imports
under ``if TYPE_CHECKING:`` left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("finevit", "engine", "recaption", "filtering", "train", "eval")
STAGES = ("recaption", "filtering", "train", "eval")

# No allow-list: every import cycle between files is a failure.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the packages (``__init__`` = the package)."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, int]]:
    """Module -> {imported project module: line of the first such import}."""
    modules = module_files(root, packages)

    def resolve(name: str) -> str | None:
        # the longest prefix that is a module: ``from engine.layout import Dataset`` -> engine.layout
        parts = name.split(".")
        while parts:
            if ".".join(parts) in modules:
                return ".".join(parts)
            parts.pop()
        return None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skip = _type_checking_nodes(tree)
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        edges: dict[str, int] = {}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here[: len(here) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = resolve(name)
                if target and target != mod:
                    edges.setdefault(target, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _describe(comp: list[str], graph: dict[str, dict[str, int]]) -> str:
    members = set(comp)
    edges = [f"{a} -> {b} (line {n})" for a in comp for b, n in sorted(graph[a].items()) if b in members]
    return "; ".join(edges)


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(REPO)


def test_no_import_cycle_between_files(graph):
    pruned = {
        m: {d: n for d, n in deps.items() if (m, d) not in KNOWN_CYCLE_EDGES} for m, deps in graph.items()
    }
    found = cycles(pruned)
    assert not found, "import cycles: " + " | ".join(_describe(c, pruned) for c in found)


def test_engine_imports_no_stage(graph):
    bad = [
        f"{mod} imports {dep} (line {n})"
        for mod, deps in graph.items()
        if mod.split(".")[0] == "engine"
        for dep, n in deps.items()
        if dep.split(".")[0] in (*STAGES, "finevit")
    ]
    assert not bad, "engine/ is the ground floor: " + "; ".join(bad)


def test_nothing_imports_the_cli(graph):
    """Library code never imports finevit/; inside it, no command imports cli.py (the roof)."""
    bad = [
        f"{mod} imports {dep} (line {n})"
        for mod, deps in graph.items()
        for dep, n in deps.items()
        if (dep.split(".")[0] == "finevit" and mod.split(".")[0] != "finevit")
        or (dep == "finevit.cli" and mod != "finevit.__main__")
    ]
    assert not bad, "; ".join(bad)


def test_the_walker_sees_lazy_and_relative_imports_but_not_type_checking(tmp_path):
    """The checks above can fail: a cycle through a lazy import is found, a TYPE_CHECKING one is not."""
    pkg = tmp_path / "engine"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from engine.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engine import a\nimport engine.a\n"
    )
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engine import c\n"
    )
    g = import_graph(tmp_path, ("engine",))
    assert g["engine.a"] == {"engine.sub.b": 1}
    assert g["engine.sub.b"] == {"engine.a": 2}
    assert g["engine.c"] == {"engine.a": 4} and g["engine.d"] == {}
    assert cycles(g) == [["engine.a", "engine.sub.b"]]
