"""Classification metrics, computed in one place for every number a user sees.

AUC and ACC follow ``medmnist.evaluator.getAUC/getACC`` exactly (macro one-vs-rest AUC; binary
scores taken from the last column; multi-label ACC per label at threshold 0.5, averaged), so
medlite's numbers compare directly with published MedMNIST results; they use scikit-learn, as
the evaluator does. The tests check equality. F1, the confusion counts behind sensitivity and
specificity, and the quadratic-weighted kappa come from torchmetrics (kappa over the full grade
range, as the ordinal benchmarks define it).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from torchmetrics.functional import classification as tmc

from medlite.tasks.calibration import calibration_metrics
from medlite.tasks.types import BINARY, MULTILABEL, ORDINAL

log = logging.getLogger(__name__)


def _safe_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC, or NaN where it is undefined (one class only), instead of an exception."""
    if np.unique(y_true).size < 2:
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


def auc(y_true: np.ndarray, y_score: np.ndarray, task: str) -> float:
    """Same definition as ``medmnist.evaluator.getAUC``."""
    y_true = np.asarray(y_true).squeeze()
    y_score = np.asarray(y_score).squeeze()
    if task == MULTILABEL:
        return float(
            np.mean([_safe_auc(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])])
        )
    if task == BINARY:
        if y_score.ndim == 2:
            y_score = y_score[:, -1]
        return _safe_auc(y_true, y_score)
    per_class = [
        _safe_auc((y_true == i).astype(float), y_score[:, i]) for i in range(y_score.shape[1])
    ]
    return float(np.mean(per_class))


def acc(y_true: np.ndarray, y_score: np.ndarray, task: str, threshold: float = 0.5) -> float:
    """Same definition as ``medmnist.evaluator.getACC``."""
    y_true = np.asarray(y_true).squeeze()
    y_score = np.asarray(y_score).squeeze()
    if task == MULTILABEL:
        y_pred = y_score > threshold
        return float(
            np.mean([accuracy_score(y_true[:, i], y_pred[:, i]) for i in range(y_true.shape[1])])
        )
    if task == BINARY:
        if y_score.ndim == 2:
            y_score = y_score[:, -1]
        return float(accuracy_score(y_true, y_score > threshold))
    return float(accuracy_score(y_true, np.argmax(y_score, axis=-1)))


def predictions(y_score: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions consistent with :func:`acc`."""
    y_score = np.asarray(y_score)
    if task == MULTILABEL:
        return (y_score > threshold).astype(int)
    if task == BINARY:
        return (y_score[:, -1] > threshold).astype(int)
    return np.argmax(y_score, axis=-1)


def _sens_spec(stats: torch.Tensor) -> tuple[float, float]:
    """Sensitivity and specificity from torchmetrics' ``[tp, fp, tn, fn, support]``; NaN where
    undefined (no positives / no negatives) rather than a misleading 0."""
    tp, fp, tn, fn = (float(v) for v in stats[:4])
    pos, neg = tp + fn, tn + fp
    return (tp / pos if pos else float("nan")), (tn / neg if neg else float("nan"))


def compute_metrics(y_true: np.ndarray, y_score: np.ndarray, task: str) -> dict[str, float]:
    """All metrics medlite reports for one split of a classification task.

    ``y_true`` is MedMNIST-shaped (N, 1) or (N, L); ``y_score`` holds probabilities (N, C).
    Binary and multi-label tasks add sensitivity/specificity (macro over labels for multi-label);
    ordinal tasks add the mean absolute grade error and quadratic-weighted kappa. Every task
    ends with the calibration metrics (:mod:`medlite.tasks.calibration`: ECE, MCE, Brier, NLL).
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"auc": auc(y_true, y_score, task), "acc": acc(y_true, y_score, task)}
        y_pred = torch.as_tensor(predictions(y_score, task))
        if task == MULTILABEL:
            target = torch.as_tensor(y_true).long()
            n_labels = int(target.shape[1])
            out["f1"] = float(tmc.multilabel_f1_score(y_pred, target, n_labels, average="macro"))
            stats = tmc.multilabel_stat_scores(y_pred, target, n_labels, average=None)
            pairs = [_sens_spec(row) for row in stats]
            out["sensitivity"] = float(np.nanmean([p[0] for p in pairs]))
            out["specificity"] = float(np.nanmean([p[1] for p in pairs]))
            return out | calibration_metrics(y_true, y_score, task)
        target = torch.as_tensor(y_true.reshape(-1)).long()
        if task == BINARY:
            out["f1"] = float(tmc.binary_f1_score(y_pred, target))
            out["sensitivity"], out["specificity"] = _sens_spec(
                tmc.binary_stat_scores(y_pred, target)
            )
        else:
            k = int(y_score.shape[1])
            out["f1"] = float(tmc.multiclass_f1_score(y_pred, target, k, average="macro"))
        if task == ORDINAL:
            out["mae"] = float(torch.mean((target - y_pred).abs().float()))
            out["qwk"] = float(tmc.multiclass_cohen_kappa(y_pred, target, k, weights="quadratic"))
    return out | calibration_metrics(y_true, y_score, task)
