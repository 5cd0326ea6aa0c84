"""Step kinds by name: ``compress.steps[i].kind`` -> the class that implements it.

Step modules are found, not listed: :func:`discover_steps` imports every module of the
``medlite.compress`` package whose source registers a step (``@register_step(...)``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

from medlite.compress.base import CompressionStep

STEP_TYPES: dict[str, type[CompressionStep]] = {}
_MARKER = "@register_step("


def register_step(kind: str) -> Callable[[type[CompressionStep]], type[CompressionStep]]:
    """Class decorator: ``@register_step("prune")`` makes ``kind: prune`` usable in a recipe."""

    def add(cls: type[CompressionStep]) -> type[CompressionStep]:
        if kind in STEP_TYPES and STEP_TYPES[kind] is not cls:
            raise ValueError(f"compression step kind {kind!r} registered twice")
        cls.kind = kind
        STEP_TYPES[kind] = cls
        return cls

    return add


def discover_steps() -> dict[str, type[CompressionStep]]:
    """Import the modules of ``medlite.compress`` that register step kinds; the registry."""
    package = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package)]):
        source = package / f"{info.name}.py"
        if info.name != "registry" and source.is_file() and _MARKER in source.read_text():
            importlib.import_module(f"medlite.compress.{info.name}")
    return STEP_TYPES
