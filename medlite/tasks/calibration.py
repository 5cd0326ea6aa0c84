"""Calibration of classifiers: do predicted probabilities mean what they say?

Reported for every classification split (:func:`calibration_metrics`, part of the task's
metrics), from the probabilities:

- **ECE** (expected calibration error): confidences in :data:`BINS` equal-width bins over
  [0, 1]; ECE = sum over bins of (bin size / N) * |accuracy of the bin - mean confidence of the
  bin|. Binary and multi-class tasks use the top-label confidence (the largest softmax
  probability, "correct" = the argmax is the label); multi-label tasks treat each label as a
  binary problem on its positive probability and average the labels' ECEs.
- **MCE** (maximum calibration error): the largest |accuracy - confidence| of a non-empty bin.
- **Brier score**: binary, (p(positive) - y)^2; multi-class, the sum over classes of
  (p_k - onehot_k)^2; multi-label, (p - y)^2 averaged over labels; each averaged over images.
- **NLL**: mean -log p(true class) (multi-label: mean binary cross-entropy over labels).

ECE and MCE are torchmetrics' ``CalibrationError`` (norm ``l1`` and ``max``); the tests check
them against a hand computation. **Temperature scaling** (:func:`fit_temperature`) divides the
logits by T > 0 fitted on the validation split by minimising NLL (LBFGS on log T): one T for
softmax tasks, one per label for multi-label tasks. It changes no argmax, so ACC and (binary)
AUC stay as they are; :class:`TemperatureScaled` bakes T into deployed models.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)

from medlite.tasks.types import BINARY, MULTILABEL

log = logging.getLogger(__name__)

#: equal-width confidence bins of ECE / MCE and the reliability diagram
BINS = 15
#: the calibration metrics every classification split reports, in table order
NAMES = ("ece", "mce", "brier", "nll")
TITLES = {"ece": "ECE", "mce": "MCE", "brier": "Brier", "nll": "NLL"}
#: ONNX ``metadata_props`` key stating the temperature an exported graph already divides by
ONNX_KEY = "medlite.temperature"
#: the results.json block
RESULTS_KEY = "calibration"
PLOT = "calibration.png"
_EPS = 1e-12
_LOG_T_MAX = 3.0


# ---------------------------------------------------------------------- metrics (probabilities)
def _ce(probs: torch.Tensor, target: torch.Tensor, task: str, norm: str) -> float:
    """torchmetrics' calibration error, top-label (softmax) or per label averaged (sigmoid)."""
    if task == MULTILABEL:
        per_label = [
            float(
                binary_calibration_error(
                    probs[:, i].contiguous(), target[:, i].contiguous(), n_bins=BINS, norm=norm
                )
            )
            for i in range(probs.shape[1])
        ]
        return float(np.mean(per_label))
    k = int(probs.shape[1])
    return float(multiclass_calibration_error(probs, target, k, n_bins=BINS, norm=norm))


def brier(y_true: np.ndarray, probs: np.ndarray, task: str) -> float:
    """Brier score (module docstring for the definition per task type)."""
    if task == MULTILABEL:
        return float(np.mean((probs - y_true) ** 2))
    flat = y_true.reshape(-1).astype(int)
    if task == BINARY:
        return float(np.mean((probs[:, -1] - flat) ** 2))
    onehot = np.eye(probs.shape[1])[flat]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def nll(y_true: np.ndarray, probs: np.ndarray, task: str) -> float:
    """Negative log-likelihood of the labels under the probabilities (clipped away from 0)."""
    p = np.clip(probs, _EPS, 1 - _EPS)
    if task == MULTILABEL:
        return float(-np.mean(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)))
    flat = y_true.reshape(-1).astype(int)
    return float(-np.mean(np.log(p[np.arange(len(flat)), flat])))


def calibration_metrics(y_true: np.ndarray, y_score: np.ndarray, task: str) -> dict[str, float]:
    """ECE, MCE, Brier and NLL of one split; ``y_score`` holds probabilities (N, C)."""
    y_true = np.asarray(y_true)
    probs = np.asarray(y_score, dtype=np.float64)
    if len(probs) == 0:
        return dict.fromkeys(NAMES, float("nan"))
    p = torch.as_tensor(probs)
    target = torch.as_tensor(y_true if task == MULTILABEL else y_true.reshape(-1)).long()
    return {
        "ece": _ce(p, target, task, "l1"),
        "mce": _ce(p, target, task, "max"),
        "brier": brier(y_true, probs, task),
        "nll": nll(y_true, probs, task),
    }


# ---------------------------------------------------------------------- temperature scaling
def _logit_nll(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    if task == MULTILABEL:
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels.reshape(-1).long())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """T minimising the NLL of ``logits / T`` (validation split): shape (1,) for softmax tasks,
    (L,) for multi-label. LBFGS on log T keeps T positive, bounded to [e^-3, e^3] (0.05..20: a
    separable validation split would otherwise drive T to 0); T = 1 is kept when the fit does
    not improve the NLL."""
    z = torch.as_tensor(logits, dtype=torch.float64).detach()
    y = torch.as_tensor(labels).detach()
    n = z.shape[1] if task == MULTILABEL else 1
    log_t = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _logit_nll(z / log_t.clamp(-_LOG_T_MAX, _LOG_T_MAX).exp(), y, task)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = log_t.detach().clamp(-_LOG_T_MAX, _LOG_T_MAX).exp()
    with torch.no_grad():
        before, after = _logit_nll(z, y, task), _logit_nll(z / t, y, task)
    if not torch.isfinite(t).all() or not after <= before:
        log.warning("temperature scaling did not lower the validation NLL; keeping T = 1")
        return torch.ones(n, dtype=torch.float64)
    return t


def temperature_list(t: torch.Tensor) -> list[float]:
    """T as plain floats (JSON, ONNX metadata)."""
    return [float(v) for v in torch.as_tensor(t).reshape(-1)]


def temperature_of(results: dict | None) -> torch.Tensor | None:
    """The temperature a run recorded (results.json), or None (not a classifier, older run)."""
    block = (results or {}).get(RESULTS_KEY) or {}
    t = block.get("temperature")
    if t is None:
        return None
    return torch.as_tensor(t if isinstance(t, list) else [t], dtype=torch.float32)


class TemperatureScaled(nn.Module):
    """``model(x) / T``: calibrated logits (softmax / sigmoid of them are calibrated
    probabilities). Exported as is, so the edge graph carries T."""

    def __init__(self, model: nn.Module, temperature: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.as_tensor(temperature, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature

    @property
    def profile_overrides(self) -> dict:
        return getattr(self.model, "profile_overrides", None) or {}


def scaled(model: nn.Module, results: dict | None) -> nn.Module:
    """``model`` divided by the run's temperature, or unchanged where the run has none."""
    t = temperature_of(results)
    return model if t is None else TemperatureScaled(model, t).eval()


# ---------------------------------------------------------------------- the run's record
def _probs(logits: torch.Tensor, task: str) -> np.ndarray:
    """Float64 probabilities, so metrics of scaled and unscaled logits differ by T alone."""
    z = logits.double()
    return (torch.sigmoid(z) if task == MULTILABEL else torch.softmax(z, dim=-1)).numpy()


def _before_after(logits: torch.Tensor, labels: np.ndarray, t: torch.Tensor, task: str) -> dict:
    return {
        "before": calibration_metrics(labels, _probs(logits, task), task),
        "after": calibration_metrics(labels, _probs(logits / t, task), task),
    }


def calibrate(
    task: str, outputs: dict[str, tuple[torch.Tensor, np.ndarray]]
) -> tuple[dict, torch.Tensor]:
    """Temperature scaling fitted on ``outputs["val"]`` (logits, labels) and the calibration
    metrics of every split in ``outputs`` before and after it: the results.json block and T."""
    val_logits, val_labels = outputs["val"]
    t = fit_temperature(val_logits, torch.as_tensor(val_labels), task)
    record: dict = {
        "method": "temperature scaling (validation NLL, LBFGS on log T)",
        "temperature": temperature_list(t) if task == MULTILABEL else float(t[0]),
        "bins": BINS,
        "confidence": "per label" if task == MULTILABEL else "top label",
    }
    for split, (logits, labels) in outputs.items():
        record[split] = _before_after(logits.double(), labels, t, task)
    return record, t


# ---------------------------------------------------------------------- reliability diagram
def reliability(y_true: np.ndarray, probs: np.ndarray, task: str) -> dict[str, np.ndarray]:
    """Per bin: mean confidence, accuracy and count (the same binning as ECE; multi-label
    pools every label's positive probability)."""
    if task == MULTILABEL:
        conf, correct = probs.reshape(-1), np.asarray(y_true).reshape(-1).astype(float)
    else:
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == np.asarray(y_true).reshape(-1)).astype(float)
    idx = np.clip(np.floor(conf * BINS).astype(int), 0, BINS - 1)
    count = np.bincount(idx, minlength=BINS).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "confidence": np.bincount(idx, conf, BINS) / count,
            "accuracy": np.bincount(idx, correct, BINS) / count,
            "count": count,
        }


def plot_reliability(
    labels: np.ndarray, logits: torch.Tensor, t: torch.Tensor, task: str, path: Path
) -> Path:
    """Reliability diagram of one split, before and after temperature scaling."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    from medlite.atomic import atomic_path

    fig = Figure(figsize=(4.5, 4), dpi=120)
    ax = fig.subplots()
    for name, z, style in (("before", logits, "o-"), ("after", logits / t, "s-")):
        probs = _probs(z.double(), task)
        bins = reliability(labels, probs, task)
        ece = calibration_metrics(labels, probs, task)["ece"]
        keep = bins["count"] > 0
        ax.plot(bins["confidence"][keep], bins["accuracy"][keep], style, ms=3, lw=1,
                label=f"{name} scaling (ECE {ece:.3f})")  # fmt: skip
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence" if task != MULTILABEL else "predicted probability")
    ax.set_ylabel("accuracy" if task != MULTILABEL else "observed frequency")
    scale = "T = " + _t_text(temperature_list(t), 4)
    ax.set_title(f"reliability, test split ({BINS} bins; {scale})", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path


def summary_line(record: dict) -> str:
    """One line for the console: T and the test split's ECE / NLL before -> after scaling."""
    shown = _t_text(record.get("temperature"), 4)
    split = "test" if "test" in record else "val"
    ba = record.get(split) or {}
    parts = [
        f"{TITLES[k]} {ba['before'][k]:.4f} -> {ba['after'][k]:.4f}"
        for k in NAMES
        if k in (ba.get("before") or {})
    ]
    return f"calibration ({split}, {BINS} bins): T = {shown} | " + " | ".join(parts)


def markdown_table(record: dict) -> list[str]:
    """The model card's calibration section: each split before and after temperature scaling."""
    shown = _t_text(record.get("temperature"))
    lines = [
        "## Calibration (temperature scaling)",
        "",
        f"T = {shown}, fitted on the validation split by minimising NLL; predict.py and the "
        f"exported graphs divide the logits by T. ECE/MCE over {record.get('bins', BINS)} equal-width "
        f"confidence bins ({record.get('confidence', 'top label')}).",
        "",
        "| split | scaling | " + " | ".join(TITLES[k] for k in NAMES) + " |",
        "|---|---|" + "---|" * len(NAMES),
    ]
    for split in ("val", "test"):
        for when in ("before", "after"):
            values = ((record.get(split) or {}).get(when)) or {}
            if values:
                cells = " | ".join(_cell(values.get(k)) for k in NAMES)
                lines.append(f"| {split} | {when} | {cells} |")
    return lines


def _cell(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.4f}"


def _t_text(t: float | list[float] | None, limit: int | None = None) -> str:
    """The temperature(s) as text; with ``limit``, the first few and an ellipsis."""
    values = t if isinstance(t, list) else [t]
    shown = ", ".join(f"{v:.3f}" for v in values[:limit] if v is not None)
    return shown + (", ..." if limit is not None and len(values) > limit else "")


# ---------------------------------------------------------------------- per-pixel (segmentation)
#: the results.json block of segmentation runs (no temperature: the maps are judged as they are)
PIXEL_KEY = "pixel_calibration"


class PixelCalibration:
    """ECE, MCE, Brier and NLL of per-pixel softmax probabilities, accumulated batch by batch.

    A test split of 256 px masks is millions of pixels: instead of keeping them (as torchmetrics'
    ``CalibrationError`` does), each batch adds its pixels to :data:`BINS` equal-width bins of
    top-label confidence (count, summed confidence, summed correctness), which is all ECE and MCE
    need; Brier (summed over classes) and NLL are running sums. The same definitions as the
    classification metrics above, with every pixel an example.
    """

    def __init__(self, bins: int = BINS) -> None:
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)
        self.brier = 0.0
        self.nll = 0.0
        self.pixels = 0

    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """``logits`` (N, C, H, W), ``masks`` (N, H, W) or (N, 1, H, W) class indices."""
        probs = torch.softmax(logits.double(), dim=1)
        target = masks.long().reshape(probs.shape[0], *probs.shape[2:])
        conf, pred = probs.max(dim=1)
        idx = torch.clamp((conf * self.bins).long(), max=self.bins - 1).flatten()
        self.count += torch.bincount(idx, minlength=self.bins).double()
        self.confidence += torch.bincount(idx, conf.flatten(), minlength=self.bins)
        hit = (pred == target).double().flatten()
        self.correct += torch.bincount(idx, hit, minlength=self.bins)
        onehot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).double()
        self.brier += float(((probs - onehot) ** 2).sum(dim=1).sum())
        p_true = probs.gather(1, target.unsqueeze(1)).clamp_min(_EPS)
        self.nll += float(-p_true.log().sum())
        self.pixels += int(target.numel())

    def compute(self) -> dict[str, float]:
        if self.pixels == 0:
            return dict.fromkeys(NAMES, float("nan"))
        seen = self.count > 0
        gap = (
            self.correct[seen] / self.count[seen] - self.confidence[seen] / self.count[seen]
        ).abs()
        weight = self.count[seen] / self.pixels
        return {
            "ece": float((weight * gap).sum()),
            "mce": float(gap.max()),
            "brier": self.brier / self.pixels,
            "nll": self.nll / self.pixels,
        }


def pixel_summary_line(record: dict) -> str:
    """One line for the console: the test split's per-pixel ECE, MCE, Brier and NLL."""
    split = "test" if "test" in record else "val"
    values = record.get(split) or {}
    shown = " | ".join(f"{TITLES[k]} {values[k]:.4f}" for k in NAMES if k in values)
    return f"pixel calibration ({split}, {record.get('bins', BINS)} bins): {shown}"


def pixel_markdown_table(record: dict) -> list[str]:
    """The model card's per-pixel calibration section (segmentation)."""
    lines = [
        "## Calibration (per pixel)",
        "",
        f"Every pixel's largest softmax probability in {record.get('bins', BINS)} equal-width "
        "bins (ECE, MCE); Brier summed over classes; NLL of the true class. No temperature "
        "scaling: the probability maps are shipped as the model gives them.",
        "",
        "| split | pixels | " + " | ".join(TITLES[k] for k in NAMES) + " |",
        "|---|---|" + "---|" * len(NAMES),
    ]
    for split in ("val", "test"):
        values = record.get(split) or {}
        if values:
            cells = " | ".join(_cell(values.get(k)) for k in NAMES)
            lines.append(f"| {split} | {values.get('pixels', '-'):,} | {cells} |")
    return lines
