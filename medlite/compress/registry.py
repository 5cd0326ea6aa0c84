"""Step kinds by name: ``compress.steps[i].kind`` -> the class that implements it."""

from __future__ import annotations

from collections.abc import Callable

from medlite.compress.base import CompressionStep

STEP_TYPES: dict[str, type[CompressionStep]] = {}


def register_step(kind: str) -> Callable[[type[CompressionStep]], type[CompressionStep]]:
    """Class decorator: ``@register_step("prune")`` makes ``kind: prune`` usable in a recipe."""

    def add(cls: type[CompressionStep]) -> type[CompressionStep]:
        if kind in STEP_TYPES:
            raise ValueError(f"compression step kind {kind!r} registered twice")
        cls.kind = kind
        STEP_TYPES[kind] = cls
        return cls

    return add
