"""Conformal prediction sets: for each input, the classes that hold the true one with
probability >= ``coverage``.

Split conformal prediction with **APS** (adaptive prediction sets, Romano et al., 2020), the
**non-randomised** variant, optionally regularised as **RAPS** (Angelopoulos et al., 2021). A
sample's conformity score is the probability mass of every class ranked at or above its true
class (RAPS adds ``lam`` per rank beyond ``k_reg``). **LAC** (least ambiguous set-valued
classifiers, Sadinle et al., 2019; score ``1 - p(true class)``) is offered too: with two classes,
APS's score of a misclassified image is 1, so once more than ``1 - coverage`` of the validation
images are misclassified every APS set is both classes, where LAC still gives single-class sets
for confident images. Calibrated on the validation split: the
threshold for ``coverage = 1 - alpha`` is the ``ceil((n + 1)(1 - alpha))``-th smallest of the
``n`` validation scores, so on exchangeable data a set holds the true class with probability
>= ``coverage`` (marginally, over images; not per image or per class). A set holds every class
whose score is within the threshold, and always the top class (no empty sets; that only adds
coverage). A run stores its sorted validation scores, so any coverage can be asked of it later
without the data.

Single-label tasks only (binary, multi-class, ordinal: softmax over classes); a multi-label task
has no single true class and is refused.
"""

from __future__ import annotations

import math

import numpy as np

from medlite.errors import ConfigError
from medlite.tasks.types import BINARY, CLASSIFICATION_TYPES, MULTILABEL

#: the coverages a run reports on its test split
REPORTED = (0.9, 0.95)
#: where the record sits in results.json
KEY = "conformal"
#: aps, raps (APS with a penalty on large sets), lac (least ambiguous sets: score 1 - p(class))
METHODS = ("aps", "raps", "lac")
#: scores this close above the threshold still count as within it: float32 probabilities (ONNX
#: vs PyTorch, another machine) differ by ~1e-7, and this only ever adds coverage
TOLERANCE = 1e-6


def check_coverage(coverage: float) -> float:
    """Coverage must be a probability strictly between 0 and 1."""
    try:
        value = float(coverage)
    except (TypeError, ValueError):
        raise ConfigError(f"coverage must be a number in (0, 1), got {coverage!r}") from None
    if not 0.0 < value < 1.0:
        raise ConfigError(f"coverage must be in (0, 1), e.g. 0.9 or 0.95; got {coverage}")
    return value


def default_method(task_type: str) -> str:
    """What a run calibrates with ``eval.conformal=auto``: LAC for two classes (where
    non-randomised APS degenerates to both classes once the error rate passes ``1 - coverage``),
    APS otherwise."""
    return "lac" if task_type == BINARY else "aps"


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"conformal method must be one of {', '.join(METHODS)}, got {method!r}")


def check_task(task_type: str) -> None:
    """Prediction sets need one true class per image."""
    if task_type == MULTILABEL:
        raise ConfigError(
            "conformal prediction sets are for single-label tasks (binary, multi-class, "
            "ordinal); this run is multi-label"
        )
    if task_type not in CLASSIFICATION_TYPES:
        raise ConfigError(
            f"conformal prediction sets are for classification runs; this one is {task_type}"
        )


def _penalty(ranks: np.ndarray, lam: float, k_reg: int) -> np.ndarray:
    """RAPS's regulariser: ``lam`` per rank past ``k_reg`` (ranks 1-based); 0 for APS."""
    return lam * np.maximum(ranks - k_reg, 0)


def class_scores(
    probs: np.ndarray, lam: float = 0.0, k_reg: int = 1, method: str = "aps"
) -> np.ndarray:
    """(N, K) probabilities -> (N, K) conformity score of each class as the candidate: the
    mass of the classes ranked at or above it (plus RAPS's penalty); LAC: 1 - its probability."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ConfigError(f"conformal scores need (N, classes>=2) probabilities, got {probs.shape}")
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 rows sum to 1 +- 1e-7
    if method == "lac":
        return 1.0 - probs
    order = np.argsort(-probs, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    ranks = np.arange(1, probs.shape[1] + 1)
    sorted_scores = cumulative + _penalty(ranks, lam, k_reg)
    scores = np.empty_like(sorted_scores)
    np.put_along_axis(scores, order, sorted_scores, axis=1)
    return scores


def true_class_scores(
    probs: np.ndarray, labels: np.ndarray, lam: float = 0.0, k_reg: int = 1, method: str = "aps"
) -> np.ndarray:
    """Each sample's score at its true class (what calibration ranks)."""
    labels = np.asarray(labels).reshape(-1).astype(int)
    scores = class_scores(probs, lam, k_reg, method)
    return scores[np.arange(len(labels)), labels]


def threshold(cal_scores: np.ndarray, coverage: float) -> float:
    """The ``ceil((n+1) * coverage)``-th smallest calibration score; ``inf`` (every class) when
    the calibration set is too small for that coverage (n < coverage / (1 - coverage))."""
    coverage = check_coverage(coverage)
    ordered = np.sort(np.asarray(cal_scores, dtype=np.float64).reshape(-1))
    n = len(ordered)
    if n == 0:
        raise ConfigError("conformal calibration needs at least one validation image")
    k = math.ceil((n + 1) * coverage - 1e-9)  # the tolerance keeps 0.9 * 10 from rounding to 10+
    return math.inf if k > n else float(ordered[k - 1])


def prediction_sets(
    probs: np.ndarray, q: float, lam: float = 0.0, k_reg: int = 1, method: str = "aps"
) -> np.ndarray:
    """(N, K) boolean membership: classes whose score is <= ``q``, and always the top class."""
    probs = np.asarray(probs, dtype=np.float64)
    member = class_scores(probs, lam, k_reg, method) <= q + TOLERANCE
    member[np.arange(len(probs)), probs.argmax(axis=1)] = True
    return member


def set_names(member: np.ndarray, labels: tuple[str, ...] | list[str]) -> list[list[str]]:
    """Boolean membership rows -> each set's class names, in the task's class order."""
    return [[labels[i] for i in np.flatnonzero(row)] for row in member]


def evaluate_sets(member: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Empirical coverage (share of sets holding the true class) and mean set size."""
    labels = np.asarray(labels).reshape(-1).astype(int)
    hit = member[np.arange(len(labels)), labels]
    return {"coverage": float(hit.mean()), "mean_set_size": float(member.sum(axis=1).mean())}


def calibrate(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    test_probs: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    method: str = "aps",
    lam: float = 0.01,
    k_reg: int = 1,
    temperature: float | None = None,
) -> dict:
    """The ``conformal`` block of results.json: method, the sorted validation scores (so any
    coverage works later), and per reported coverage the threshold and, with test data, the
    test split's empirical coverage and mean set size."""
    check_method(method)
    lam, k_reg = (float(lam), int(k_reg)) if method == "raps" else (0.0, 1)
    scores = np.sort(true_class_scores(val_probs, val_labels, lam, k_reg, method))
    record: dict = {
        "method": method,
        "randomised": False,
        "calibrated_on": "val",
        "n_calibration": int(len(scores)),
        "temperature": temperature,
        "val_scores": [float(s) for s in scores],
    }
    if method == "raps":
        record.update(lam=lam, k_reg=k_reg)
    for coverage in REPORTED:
        q = threshold(scores, coverage)
        entry: dict = {"threshold": None if math.isinf(q) else q}
        if test_probs is not None and test_labels is not None:
            member = prediction_sets(test_probs, q, lam, k_reg, method)
            found = evaluate_sets(member, test_labels)
            entry.update(test_coverage=found["coverage"], mean_set_size=found["mean_set_size"])
        record[str(coverage)] = entry
    return record


def sets_from_record(
    record: dict, probs: np.ndarray, coverage: float, labels: tuple[str, ...] | list[str]
) -> list[list[str]]:
    """Prediction sets at ``coverage`` from a run's stored ``conformal`` block."""
    q = threshold(record["val_scores"], coverage)
    lam = float(record.get("lam", 0.0)) if record.get("method") == "raps" else 0.0
    k_reg = int(record.get("k_reg", 1))
    return set_names(prediction_sets(probs, q, lam, k_reg, record["method"]), labels)


def summary_line(record: dict) -> str:
    """One line for the log: coverage and set size on the test split per reported coverage."""
    parts = []
    for coverage in REPORTED:
        entry = record.get(str(coverage)) or {}
        if "test_coverage" in entry:
            parts.append(
                f"{coverage:g}: test coverage {entry['test_coverage']:.3f}, "
                f"mean set size {entry['mean_set_size']:.2f}"
            )
    return f"conformal sets ({record['method'].upper()}, calibrated on val): " + "; ".join(parts)


# ---------------------------------------------------------------------- from a model's logits
def run_temperature(results: dict) -> float | None:
    """The temperature the run's probabilities are scaled by (results.json ``calibration``),
    so sets are calibrated on the probabilities ``predict.py`` reports; None when unscaled."""
    value = (results.get("calibration") or {}).get("temperature")
    return float(value) if isinstance(value, (int, float)) else None


def probabilities(logits, temperature: float | None = None) -> np.ndarray:
    """Raw (N, K) logits -> float64 softmax probabilities, logits divided by ``temperature``."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature:
        z = z / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def calibrate_logits(outputs: dict, task_type: str, results: dict, method: str = "auto") -> dict:
    """The ``conformal`` block from per-split ``(logits, labels)`` (``split_logits``):
    calibrated on ``val``, measured on ``test``, at the run's temperature. ``method="auto"``:
    :func:`default_method`."""
    check_task(task_type)
    method = default_method(task_type) if method == "auto" else method
    temperature = run_temperature(results)
    val_logits, val_y = outputs["val"]
    test_logits, test_y = outputs["test"]
    return calibrate(
        probabilities(val_logits, temperature),
        val_y,
        probabilities(test_logits, temperature),
        test_y,
        method=method,
        temperature=temperature,
    )
