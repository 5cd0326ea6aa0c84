"""Image classification in MedMNIST's four flavours: binary, multi-class, multi-label, ordinal.

Binary, multi-class and ordinal tasks are trained with softmax cross-entropy over
``len(labels)`` logits (the MedMNIST v2 protocol: ordinal grades are scored like classes by
``medmnist.evaluator``); multi-label tasks use one sigmoid per label. Checkpoints are selected on
validation AUC, the MedMNIST protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medlite.errors import ConfigError
from medlite.tasks import calibration
from medlite.tasks.base import Task
from medlite.tasks.classification_metrics import compute_metrics, predictions
from medlite.tasks.types import (
    BINARY,
    CLASSIFICATION_TYPES,
    MULTICLASS,
    MULTILABEL,
    ORDINAL,
)

__all__ = ["BINARY", "MULTICLASS", "MULTILABEL", "ORDINAL", "ClassificationTask"]


@dataclass(frozen=True)
class ClassificationTask(Task):
    """What a classification dataset asks of a model: its task type and label names."""

    type: str
    labels: tuple[str, ...]

    kind: ClassVar[str] = "classification"
    monitor_metric: ClassVar[str] = "auc"
    monitor_mode: ClassVar[str] = "max"
    headline: ClassVar[tuple[str, ...]] = ("auc", "acc")
    metric_titles: ClassVar[dict[str, str]] = {
        "auc": "AUC",
        "acc": "ACC",
        "f1": "F1",
        "sensitivity": "sensitivity",
        "specificity": "specificity",
        "mae": "MAE",
        "qwk": "QWK",
        **calibration.TITLES,
    }

    def __post_init__(self) -> None:
        if self.type not in CLASSIFICATION_TYPES:
            raise ConfigError(
                f"unknown task type {self.type!r}; expected one of {CLASSIFICATION_TYPES}"
            )
        if len(self.labels) < 2 and self.type != MULTILABEL:
            raise ConfigError(f"a {self.type} task needs at least 2 classes, got {self.labels}")

    @classmethod
    def from_info(cls, info: dict) -> ClassificationTask:
        """From a ``medmnist.INFO``-shaped record (``task``, ``label`` {"0": name, ...})."""
        labels = info["label"]
        return cls(type=info["task"], labels=tuple(labels[str(i)] for i in range(len(labels))))

    @property
    def metric_names(self) -> tuple[str, ...]:  # type: ignore[override]
        names = ("auc", "acc", "f1")
        if self.type in (BINARY, MULTILABEL):
            names += ("sensitivity", "specificity")
        if self.type == ORDINAL:
            names += ("mae", "qwk")
        return names + calibration.NAMES

    @property
    def multilabel(self) -> bool:
        return self.type == MULTILABEL

    # ------------------------------------------------------------------ training
    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (N, 1) or (N, L) -> what the loss expects."""
        if self.multilabel:
            return labels.float()
        return labels.reshape(-1).long()

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weights = None if class_weights is None else class_weights.to(logits.device, logits.dtype)
        if self.multilabel:
            if label_smoothing:
                targets = targets * (1 - label_smoothing) + 0.5 * label_smoothing
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights)
        return F.cross_entropy(logits, targets, weight=weights, label_smoothing=label_smoothing)

    def class_weights(self, counts: np.ndarray, n_samples: int) -> torch.Tensor:
        """Inverse frequency: ``n / (K * n_c)`` per class (so a balanced set gets all 1); for
        multi-label, BCE's ``pos_weight`` = negatives / positives per label."""
        counts = np.asarray(counts, dtype=np.float64)
        if (counts <= 0).any():
            empty = [self.labels[i] for i in np.flatnonzero(counts <= 0)]
            raise ConfigError(
                f"loss.class_weights=auto: no training example of {', '.join(empty)}; "
                "a weight can't be derived for a class the model never sees"
            )
        if self.multilabel:
            weights = (n_samples - counts) / counts
        else:
            weights = counts.sum() / (len(counts) * counts)
        return torch.tensor(weights, dtype=torch.float32)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> the probabilities ``medmnist.evaluator`` expects as ``y_score``."""
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)

    def activation(self) -> nn.Module:
        return nn.Sigmoid() if self.multilabel else nn.Softmax(dim=-1)

    # ------------------------------------------------------------------ judging
    def metrics(self, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
        return compute_metrics(y_true, y_score, self.type)

    def predictions(self, y_score: np.ndarray) -> np.ndarray:
        return predictions(y_score, self.type)

    def predicted_labels(self, y_score: np.ndarray) -> list[list[str]]:
        """Per row, the predicted label name(s)."""
        chosen = self.predictions(y_score)
        if self.multilabel:
            return [[self.labels[i] for i in np.flatnonzero(row)] for row in chosen]
        return [[self.labels[int(c)]] for c in chosen]

    def roc_curves(self, y_true: np.ndarray, y_score: np.ndarray) -> list[tuple[str, dict]]:
        """One ROC curve per class (per label; the positive class only for binary tasks):
        ``(name, {"fpr", "tpr", "area"})``, skipping classes with one outcome only."""
        from sklearn.metrics import roc_auc_score, roc_curve

        y_true, y_score = np.asarray(y_true), np.asarray(y_score)
        if self.type == BINARY:
            columns = [(self.labels[-1], y_true.reshape(-1) == 1, y_score[:, -1])]
        elif self.multilabel:
            columns = [(lab, y_true[:, i] == 1, y_score[:, i]) for i, lab in enumerate(self.labels)]
        else:
            flat = y_true.reshape(-1)
            columns = [(lab, flat == i, y_score[:, i]) for i, lab in enumerate(self.labels)]
        curves = []
        for name, positive, score in columns:
            if positive.all() or not positive.any():
                continue
            fpr, tpr, _ = roc_curve(positive, score)
            curves.append(
                (name, {"fpr": fpr, "tpr": tpr, "area": float(roc_auc_score(positive, score))})
            )
        return curves
