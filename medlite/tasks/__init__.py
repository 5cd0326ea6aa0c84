"""Tasks: what a dataset asks of a model, and how a model is judged on it.

``get_task(type, labels)`` builds the task a data source reports; ``task_record(results)`` gives
the ``task`` block of any results.json (older runs, which predate it, get the one their recorded
task type implies), so readers of runs never name a metric themselves.
"""

from __future__ import annotations

from medlite.errors import ConfigError
from medlite.tasks.base import Task, metric_titles
from medlite.tasks.classification import ClassificationTask
from medlite.tasks.segmentation import SegmentationTask
from medlite.tasks.types import (
    BINARY,
    CLASSIFICATION_TYPES,
    MULTICLASS,
    MULTILABEL,
    ORDINAL,
    SEGMENTATION,
    parse_task_type,
)

__all__ = [
    "BINARY",
    "MULTICLASS",
    "MULTILABEL",
    "ORDINAL",
    "SEGMENTATION",
    "ClassificationTask",
    "SegmentationTask",
    "Task",
    "get_task",
    "metric_titles",
    "parse_task_type",
    "task_record",
]


def get_task(type: str, labels: tuple[str, ...] | list[str]) -> Task:
    """The task object for a recorded task type and its label names."""
    if type in CLASSIFICATION_TYPES:
        return ClassificationTask(type=type, labels=tuple(str(x) for x in labels))
    if type == SEGMENTATION:
        return SegmentationTask(type=type, labels=tuple(str(x) for x in labels))
    known = ", ".join((*CLASSIFICATION_TYPES, SEGMENTATION))
    raise ConfigError(f"unknown task type {type!r}; known: {known}")


def task_record(results: dict) -> dict:
    """The ``task`` block of a run's results.json, rebuilt from its data block if absent."""
    record = results.get("task")
    if record:
        return record
    data = results.get("data") or {}
    if data.get("task") and data.get("labels"):
        return get_task(data["task"], data["labels"]).record()
    return ClassificationTask(type=BINARY, labels=("0", "1")).record()
