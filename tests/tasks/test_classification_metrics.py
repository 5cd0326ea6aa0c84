"""medlite's AUC/ACC must equal medmnist.evaluator's for every task type."""

from __future__ import annotations

import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC

from medlite.tasks import BINARY, MULTICLASS, MULTILABEL, ORDINAL
from medlite.tasks.classification_metrics import compute_metrics


def _random_case(task: str, rng: np.random.Generator, n: int = 300):
    if task == MULTILABEL:
        y = rng.integers(0, 2, size=(n, 14))
        s = rng.random((n, 14))
        return y, s
    k = 2 if task == BINARY else (5 if task == ORDINAL else 8)
    y = rng.integers(0, k, size=(n, 1))
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y[:, 0]] * rng.random((n, 1))
    s = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, s


@pytest.mark.parametrize("task", [BINARY, MULTICLASS, MULTILABEL, ORDINAL])
@pytest.mark.parametrize("seed", range(5))
def test_auc_acc_equal_medmnist_evaluator(task: str, seed: int) -> None:
    y, s = _random_case(task, np.random.default_rng(seed))
    ours = compute_metrics(y, s, task)
    assert ours["auc"] == pytest.approx(getAUC(y, s, task), abs=1e-6)
    assert ours["acc"] == pytest.approx(getACC(y, s, task), abs=1e-6)
    assert 0.5 < ours["auc"] <= 1.0 or task == MULTILABEL  # signal injected above


def test_binary_extras_match_confusion_matrix() -> None:
    y = np.array([[0], [0], [1], [1], [1]])
    s = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    m = compute_metrics(y, s, BINARY)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_ordinal_extras() -> None:
    y = np.array([[0], [1], [2], [4]])
    s = np.eye(5)[[0, 2, 2, 1]]
    m = compute_metrics(y, s, ORDINAL)
    assert m["mae"] == pytest.approx((0 + 1 + 0 + 3) / 4)
    assert -1 <= m["qwk"] <= 1


def test_auc_undefined_with_one_class_is_nan_not_crash() -> None:
    y = np.zeros((4, 1), dtype=int)
    s = np.array([[0.8, 0.2]] * 4)
    assert np.isnan(compute_metrics(y, s, BINARY)["auc"])
