"""What every task tells the rest of medlite: how to train on it and how to judge a model.

A task owns its loss, output activation and metrics, and the **monitored metric** with its
direction: checkpoint selection, summaries, aggregation, Optuna objectives, the model card and the
compression table ask the task (or the ``task`` block it writes into ``results.json``) instead of
naming a metric themselves, so a new task (segmentation) plugs in without touching them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import nn


class Task(ABC):
    """A dataset's task: its type, its label names and everything that follows from them."""

    #: family of the task ("classification", "segmentation"); tables and plots switch on it
    kind: ClassVar[str] = "task"
    #: metric names in the order tables show them
    metric_names: ClassVar[tuple[str, ...]] = ()
    #: how tables title each metric
    metric_titles: ClassVar[dict[str, str]] = {}
    #: the metric checkpoints are selected on (on the validation split) and sweeps optimise
    monitor_metric: ClassVar[str] = ""
    #: "max" or "min"
    monitor_mode: ClassVar[str] = "max"
    #: the two metrics compact tables show (compression before/after, sweep summaries)
    headline: ClassVar[tuple[str, ...]] = ()

    type: str
    labels: tuple[str, ...]

    # ------------------------------------------------------------------ what the model outputs
    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @abstractmethod
    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Dataset labels -> what :meth:`loss` expects."""

    @abstractmethod
    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    @abstractmethod
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> the probabilities metrics and users see."""

    def eval_outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What evaluation keeps of each batch for :meth:`metrics` (default: the scores)."""
        return self.scores(logits)

    @abstractmethod
    def activation(self) -> nn.Module:
        """The output activation appended for deployment (probabilities out)."""

    @abstractmethod
    def class_weights(self, counts: np.ndarray, n_samples: int) -> torch.Tensor:
        """Loss weights from the training split's per-class (or per-label) counts."""

    # ------------------------------------------------------------------ judging a model
    @abstractmethod
    def metrics(self, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
        """Every metric of one split, from the whole split's labels and scores."""

    @abstractmethod
    def predictions(self, y_score: np.ndarray) -> np.ndarray:
        """Hard predictions consistent with the metrics."""

    def monitor(self, prefix: str = "") -> str:
        """The logged name of the monitored metric, e.g. ``val/auc`` (``kd/val/auc``)."""
        return f"{prefix}val/{self.monitor_metric}"

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is a better value of the monitored metric than ``b``."""
        return a > b if self.monitor_mode == "max" else a < b

    def title(self, metric: str) -> str:
        return self.metric_titles.get(metric, metric)

    def record(self) -> dict:
        """The ``task`` block of results.json: what readers of a run need to know about it."""
        return {
            "kind": self.kind,
            "type": self.type,
            "labels": list(self.labels),
            "metrics": list(self.metric_names),
            "titles": {m: self.title(m) for m in self.metric_names},
            "headline": list(self.headline),
            "monitor": self.monitor(),
            "mode": self.monitor_mode,
        }


def metric_titles(record: dict, names: Sequence[str]) -> list[str]:
    """Table titles of ``names`` from a task record."""
    titles = record.get("titles") or {}
    return [titles.get(n, n) for n in names]
