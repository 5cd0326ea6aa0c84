"""Semantic segmentation (binary and multi-class): one class per pixel, on MONAI.

The model outputs one logit map per class, background first (``labels[0]``); training minimises
MONAI's ``DiceCELoss`` (softmax cross-entropy + soft Dice over the foreground classes). Metrics
are MONAI's Dice, IoU and 95th-percentile Hausdorff distance, computed **per image** on hard
(argmax) masks at the resolution the model sees, background excluded, then averaged over images
and foreground classes; checkpoints are kept on validation Dice.

Empty-mask conventions (per image and class): when the reference has no pixel of a class, Dice
and IoU are 1 if the prediction has none either and 0 otherwise (a false alarm on a normal image
costs as much as a miss); HD95 is undefined when either mask is empty and such cases are left out
of its mean (NaN when nothing is left).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medlite.errors import ConfigError
from medlite.tasks.base import Task
from medlite.tasks.types import SEGMENTATION

__all__ = ["SEGMENTATION", "SegmentationTask"]

#: images scored per MONAI call (bounded memory for one-hot masks at 256+ px)
_CHUNK = 16


@dataclass(frozen=True)
class SegmentationTask(Task):
    """Per-pixel classes ``labels`` (``labels[0]`` is the background)."""

    type: str
    labels: tuple[str, ...]

    kind: ClassVar[str] = "segmentation"
    metric_names: ClassVar[tuple[str, ...]] = ("dice", "iou", "hd95")
    metric_titles: ClassVar[dict[str, str]] = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (px)"}
    monitor_metric: ClassVar[str] = "dice"
    monitor_mode: ClassVar[str] = "max"
    headline: ClassVar[tuple[str, ...]] = ("dice", "iou")

    def __post_init__(self) -> None:
        if self.type != SEGMENTATION:
            raise ConfigError(f"a segmentation task has type {SEGMENTATION!r}, got {self.type!r}")
        if len(self.labels) < 2:
            raise ConfigError(
                f"segmentation needs a background and at least one class, got {self.labels}"
            )

    @property
    def foreground(self) -> tuple[str, ...]:
        return self.labels[1:]

    # ------------------------------------------------------------------ training
    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Masks (N, H, W) or (N, 1, H, W) of class indices -> (N, H, W) long."""
        if labels.ndim == 4:
            labels = labels[:, 0]
        return labels.long()

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from monai.losses import DiceCELoss

        weight = None if class_weights is None else class_weights.to(logits.device, logits.dtype)
        loss = DiceCELoss(
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            weight=weight,
            label_smoothing=float(label_smoothing),
        )
        return loss(logits.float(), targets.unsqueeze(1))

    def class_weights(self, counts: np.ndarray, n_samples: int) -> torch.Tensor:
        """Inverse pixel frequency per class, ``n / (K * n_c)``, for the cross-entropy term."""
        counts = np.asarray(counts, dtype=np.float64)
        if (counts <= 0).any():
            empty = [self.labels[i] for i in np.flatnonzero(counts <= 0)]
            raise ConfigError(
                f"loss.class_weights=auto: no training pixel of {', '.join(empty)}; "
                "a weight can't be derived for a class the model never sees"
            )
        return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-pixel class probabilities (N, C, H, W)."""
        return torch.softmax(logits, dim=1)

    def eval_outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What evaluation keeps per image: the hard mask (uint8), 1/16 of the probabilities."""
        return logits.argmax(dim=1).to(torch.uint8)

    def activation(self) -> nn.Module:
        return nn.Softmax(dim=1)

    # ------------------------------------------------------------------ judging
    def predictions(self, y_score: np.ndarray) -> np.ndarray:
        """(N, C, H, W) probabilities, or masks already (N, H, W) -> masks (N, H, W)."""
        y_score = np.asarray(y_score)
        return y_score if y_score.ndim == 3 else np.argmax(y_score, axis=1)

    def metrics(self, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
        """Dice, IoU and HD95 per image (background excluded), averaged over images and classes.

        ``y_score`` may be probabilities (N, C, H, W) or hard masks (N, H, W).
        """
        truth = torch.as_tensor(np.asarray(y_true)).long()
        if truth.ndim == 4:
            truth = truth[:, 0]
        pred = torch.as_tensor(self.predictions(y_score)).long()
        if pred.shape != truth.shape:
            raise ValueError(f"masks of shape {tuple(pred.shape)} vs {tuple(truth.shape)}")
        return _average(self._per_image(truth, pred))

    def metrics_of_pairs(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """The same metrics for (truth, predicted mask) pairs of any sizes (each pair one size):
        scoring on the images' original resolution."""
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.metric_names}
        for truth, pred in pairs:
            t = torch.as_tensor(np.asarray(truth)).long()[None]
            p = torch.as_tensor(np.asarray(pred)).long()[None]
            if p.shape != t.shape:
                raise ValueError(f"masks of shape {tuple(p.shape)} vs {tuple(t.shape)}")
            for name, values in self._per_image(t, p).items():
                chunks[name].append(values)
        if not pairs:
            return {name: float("nan") for name in self.metric_names}
        return _average({name: np.concatenate(v) for name, v in chunks.items()})

    def _per_image(self, truth: torch.Tensor, pred: torch.Tensor) -> dict[str, np.ndarray]:
        """(N, K - 1) values per metric, NaN where undefined (HD95 of an empty mask)."""
        from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

        k = self.num_outputs
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        values = {"dice": [], "iou": [], "hd95": []}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on every empty mask (HD95 undefined)
            for start in range(0, len(truth), _CHUNK):
                t = _onehot(truth[start : start + _CHUNK], k)
                p = _onehot(pred[start : start + _CHUNK], k)
                values["dice"].append(dice(p, t))
                values["iou"].append(iou(p, t))
                values["hd95"].append(hd95(p, t))
        out = {}
        for name, chunks in values.items():
            per_image = torch.cat(chunks).float().numpy()
            per_image[~np.isfinite(per_image)] = np.nan
            out[name] = per_image
        return out

    def foreground_fraction(self, mask: np.ndarray) -> dict[str, float]:
        """Share of the image each foreground class covers (what predict.py reports)."""
        mask = np.asarray(mask)
        return {lab: float((mask == i).mean()) for i, lab in enumerate(self.labels) if i > 0}


def _average(per_image: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over images and classes, leaving out undefined (NaN) values."""
    return {
        name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        for name, v in per_image.items()
    }


def _onehot(mask: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(mask, k).permute(0, 3, 1, 2).float()
