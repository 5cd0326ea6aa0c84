"""Task type names: the MedMNIST names medlite records, and the short names users may type."""

from __future__ import annotations

from medlite.errors import ConfigError

BINARY = "binary-class"
MULTICLASS = "multi-class"
MULTILABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"
CLASSIFICATION_TYPES = (BINARY, MULTICLASS, MULTILABEL, ORDINAL)
#: per-pixel classes (binary lesion-vs-background or several classes), background first
SEGMENTATION = "segmentation"

#: what ``data.task=...`` accepts, mapped to the recorded type
ALIASES = {
    "binary": BINARY,
    "binary-class": BINARY,
    "multi-class": MULTICLASS,
    "multiclass": MULTICLASS,
    "multi-label": MULTILABEL,
    "multilabel": MULTILABEL,
    "multi-label, binary-class": MULTILABEL,
    "ordinal": ORDINAL,
    "ordinal-regression": ORDINAL,
    "segmentation": SEGMENTATION,
}


def parse_task_type(name: str) -> str:
    """A user's task name (``binary``, ``multi-label``, ...) -> the recorded type string."""
    key = str(name).strip().lower()
    if key not in ALIASES:
        raise ConfigError(
            f"unknown task type {name!r}; use one of binary, multi-class, multi-label, ordinal, "
            "segmentation"
        )
    return ALIASES[key]
