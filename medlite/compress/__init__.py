"""Compression recipes: ``compress=<name>`` builds a list of steps from ``cfg.compress.steps``.

Each technique lives in its own module of this package and registers its step kinds with
:func:`medlite.compress.registry.register_step`; importing the package discovers them all
(:func:`~medlite.compress.registry.discover_steps`), so a new step kind is one module here plus a
``conf/compress/<name>.yaml`` that uses it.
"""

from __future__ import annotations

from medlite.compress.base import CompressionStep, LossTerm, RunContext, frozen_copy
from medlite.compress.registry import STEP_TYPES, discover_steps, register_step
from medlite.errors import ConfigError


def build_steps(step_cfgs: list[dict] | None) -> list[CompressionStep]:
    """``[{kind: prune, ratio: 0.5}, ...]`` -> step objects, with a clear error for a bad recipe."""
    steps = []
    for i, raw in enumerate(step_cfgs or []):
        params = dict(raw)
        kind = params.pop("kind", None)
        if kind not in STEP_TYPES:
            valid = ", ".join(sorted(STEP_TYPES)) or "(none available yet)"
            raise ConfigError(
                f"compress.steps[{i}]: unknown step kind {kind!r}; valid kinds: {valid}"
            )
        try:
            steps.append(STEP_TYPES[kind](**params))
        except TypeError as err:  # an unknown or missing parameter
            raise ConfigError(f"compress.steps[{i}] (kind {kind}): {err}") from None
    for i, step in enumerate(steps[:-1]):
        if step.terminal:
            raise ConfigError(
                f"compress.steps[{i}] ({step.kind}) produces a model that cannot be changed "
                f"further, so it must be the last step; it is followed by {steps[i + 1].kind}"
            )
    return steps


discover_steps()

__all__ = [
    "STEP_TYPES",
    "CompressionStep",
    "LossTerm",
    "RunContext",
    "build_steps",
    "discover_steps",
    "frozen_copy",
    "register_step",
]
