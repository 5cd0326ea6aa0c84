"""Registry of medlite's own architectures, with the metadata sweeps and reports group by.

Mirrors timm's pattern: a decorator registers a constructor under a name; ``create_model`` in
:mod:`medlite.models.factory` looks here first and falls back to timm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

PARADIGMS = ("cnn", "transformer", "linear")
#: what a model's output means: one logit per class, or one logit map per class
TASK_KINDS = ("classification", "segmentation")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    paradigm: str
    min_size: int  # smallest input side the model handles without adaptation
    description: str
    task: str = "classification"  # classification (N, K) or segmentation (N, K, H, W) output
    dims: int = 2  # spatial dimensions of the input: 2 (N, C, H, W) or 3 (N, C, D, H, W)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    paradigm: str,
    min_size: int = 28,
    description: str = "",
    task: str = "classification",
    dims: int = 2,
) -> Callable:
    """Register ``constructor(num_classes, in_chans, img_size, **kw) -> nn.Module``."""
    if paradigm not in PARADIGMS:
        raise ValueError(f"paradigm must be one of {PARADIGMS}, got {paradigm!r}")
    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {TASK_KINDS}, got {task!r}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(
            name, fn, paradigm, min_size, description or (fn.__doc__ or "").strip(), task, dims
        )
        return fn

    return wrap


def get_entry(name: str) -> ModelEntry | None:
    return _REGISTRY.get(name)


def list_models() -> list[str]:
    return sorted(_REGISTRY)
