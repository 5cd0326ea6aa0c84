"""Compression recipes: ``compress=<name>`` builds a list of steps from ``cfg.compress.steps``."""

from __future__ import annotations

from collections.abc import Callable

from medlite.compress.base import CompressionStep, LossTerm, RunContext
from medlite.errors import ConfigError

# step kind -> constructor(**params); compression techniques register here.
STEP_TYPES: dict[str, Callable[..., CompressionStep]] = {}


def build_steps(step_cfgs: list[dict] | None) -> list[CompressionStep]:
    """``[{kind: prune, ratio: 0.5}, ...]`` -> step objects, with a clear error for unknown kinds."""
    steps = []
    for i, raw in enumerate(step_cfgs or []):
        params = dict(raw)
        kind = params.pop("kind", None)
        if kind not in STEP_TYPES:
            valid = ", ".join(sorted(STEP_TYPES)) or "(none available yet)"
            raise ConfigError(
                f"compress.steps[{i}]: unknown step kind {kind!r}; valid kinds: {valid}"
            )
        steps.append(STEP_TYPES[kind](**params))
    return steps


__all__ = ["STEP_TYPES", "CompressionStep", "LossTerm", "RunContext", "build_steps"]
