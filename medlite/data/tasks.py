"""Task types of MedMNIST and what each implies for the head, loss and scores.

MedMNIST names four tasks. Binary, multi-class and ordinal tasks are trained with softmax
cross-entropy over ``len(labels)`` logits (the MedMNIST v2 protocol: ordinal grades are scored
like classes by ``medmnist.evaluator``); multi-label tasks use one sigmoid per label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from medlite.errors import ConfigError

BINARY = "binary-class"
MULTICLASS = "multi-class"
MULTILABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"
TASK_TYPES = (BINARY, MULTICLASS, MULTILABEL, ORDINAL)


@dataclass(frozen=True)
class Task:
    """What a dataset asks of a model: its task type and label names."""

    type: str
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ConfigError(f"unknown task type {self.type!r}; expected one of {TASK_TYPES}")

    @classmethod
    def from_info(cls, info: dict) -> Task:
        labels = info["label"]
        return cls(type=info["task"], labels=tuple(labels[str(i)] for i in range(len(labels))))

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @property
    def multilabel(self) -> bool:
        return self.type == MULTILABEL

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """MedMNIST labels (N, 1) or (N, L) -> what the loss expects."""
        if self.multilabel:
            return labels.float()
        return labels.reshape(-1).long()

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        if self.multilabel:
            if label_smoothing:
                targets = targets * (1 - label_smoothing) + 0.5 * label_smoothing
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> the probabilities ``medmnist.evaluator`` expects as ``y_score``."""
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)

    def activation(self) -> nn.Module:
        """The output activation to append for deployment (probabilities out)."""
        return nn.Sigmoid() if self.multilabel else nn.Softmax(dim=-1)
