"""Only tasks name metrics: code outside ``medlite/tasks/`` asks the task (or the ``task`` block of
results.json) which metrics exist, so a new task (segmentation: Dice, IoU) needs no edits there.

The check: no string literal outside ``medlite/tasks/`` names AUC (``"auc"``, ``"test AUC"``,
``"val/auc"``, ``"int8_max_auc_drop"``...). Docstrings and comments are free to mention it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("medlite", "scripts")
EXEMPT = ROOT / "medlite" / "tasks"
PATTERN = re.compile(r"\bauc\b|_auc|auc_", re.IGNORECASE)


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are docstrings (module, class, function)."""
    ids = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
        ):
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                ids.add(id(first.value))
    return ids


def metric_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every non-docstring string constant of ``path`` that names AUC."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = _docstring_nodes(tree)
    hits = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and PATTERN.search(node.value)
        ):
            hits.append((node.lineno, node.value))
    return sorted(hits)


def _python_files() -> list[Path]:
    files = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if EXEMPT in path.parents:
                continue
            files.append(path)
    return files


def test_scan_covers_the_code() -> None:
    files = _python_files()
    assert any(p.name == "results.py" for p in files)
    assert not any(EXEMPT in p.parents for p in files)


def test_detector_sees_literals_but_not_docstrings(tmp_path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Module docstring about AUC."""\n'
        "def f():\n"
        '    """Returns the val/auc."""\n'
        "    # a comment on auc\n"
        '    a = "test AUC"\n'
        '    b = f"{x}_auc"\n'
        '    c = "int8_max_auc_drop"\n'
        '    d = "because"  # no match inside a word\n'
        "    return a, b, c, d\n"
    )
    assert [line for line, _ in metric_literals(sample)] == [5, 6, 7]


def test_no_metric_names_outside_tasks() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in _python_files()
        for line, text in metric_literals(path)
    ]
    assert not offenders, (
        "metric names outside medlite/tasks/ (ask the task record instead):\n"
        + "\n".join(offenders)
    )
