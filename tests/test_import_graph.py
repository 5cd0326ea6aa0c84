"""The package's import structure: lower layers never reach back into the pipeline, and no
module imports itself through others (a cycle), function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medlite"
#: layers that the pipeline builds on; they must not import it (nor the CLI)
LOWER = ("medlite.data", "medlite.models", "medlite.compress", "medlite.deploy", "medlite.tasks")
TOP = ("medlite.pipeline", "medlite.cli")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Imports under ``if TYPE_CHECKING:`` only exist for type checkers."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the medlite modules it imports (each import resolved to the most specific
    module it names: ``from medlite.models import registry`` -> ``medlite.models.registry``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in mods else base)
            for target in targets:
                while target and target not in mods:  # import a.b.c -> the module a.b.c or a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_lower_layers_do_not_import_the_pipeline() -> None:
    graph = import_graph()
    bad = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith(LOWER)
        for t in targets
        if t in TOP
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_cycles_and_back_imports(tmp_path, monkeypatch) -> None:
    """The graph is real: a known edge is present, and a planted cycle is reported."""
    graph = import_graph()
    assert "medlite.build" in graph["medlite.pipeline"]
    assert "medlite.data.readers" in graph["medlite.deploy.predict"]
    planted = {k: set(v) for k, v in graph.items()}
    planted["medlite.build"].add("medlite.pipeline")
    assert any("medlite.build" in c and "medlite.pipeline" in c for c in cycles(planted))
