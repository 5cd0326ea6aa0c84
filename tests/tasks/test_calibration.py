"""Calibration: ECE / MCE / Brier / NLL against hand computations, temperature scaling on an
over-confident model, the temperature baked into exported graphs, and a tiny run's record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medlite.deploy.export import _divide_onnx_logits, _torch_export
from medlite.deploy.onnx import OrtModel, export_onnx
from medlite.pipeline import run
from medlite.tasks import calibration, get_task
from medlite.tasks.calibration import TemperatureScaled, calibration_metrics, fit_temperature
from medlite.tasks.classification_metrics import compute_metrics
from medlite.tasks.types import BINARY, MULTICLASS, MULTILABEL
from tests.helpers import make_cfg


def test_multiclass_metrics_match_a_hand_computation() -> None:
    # top-label confidences 0.70 (right), 0.62 (wrong), 0.64 (right), 0.90 (right); with 15
    # bins of width 1/15: {0.70}, {0.62, 0.64}, {0.90}
    probs = np.array([[0.7, 0.2, 0.1], [0.62, 0.3, 0.08], [0.1, 0.26, 0.64], [0.05, 0.9, 0.05]])
    y = np.array([[0], [1], [2], [1]])
    got = calibration_metrics(y, probs, MULTICLASS)
    ece = (1 * abs(1 - 0.7) + 2 * abs(0.5 - 0.63) + 1 * abs(1 - 0.9)) / 4  # 0.165
    brier = (0.14 + 0.8808 + 0.2072 + 0.015) / 4
    nll = -(math.log(0.7) + math.log(0.3) + math.log(0.64) + math.log(0.9)) / 4
    assert got["ece"] == pytest.approx(ece, abs=1e-6)
    assert got["mce"] == pytest.approx(0.3, abs=1e-6)
    assert got["brier"] == pytest.approx(brier, abs=1e-9)
    assert got["nll"] == pytest.approx(nll, abs=1e-9)


def test_binary_metrics_match_a_hand_computation() -> None:
    # top label: 0.82 for class 1 (right), 0.70 for class 0 (wrong: the label is 1)
    probs = np.array([[0.18, 0.82], [0.7, 0.3]])
    y = np.array([[1], [1]])
    got = calibration_metrics(y, probs, BINARY)
    assert got["ece"] == pytest.approx((0.18 + 0.7) / 2, abs=1e-6)
    assert got["mce"] == pytest.approx(0.7, abs=1e-6)
    assert got["brier"] == pytest.approx((0.18**2 + 0.7**2) / 2, abs=1e-9)  # (p(1) - y)^2
    assert got["nll"] == pytest.approx(-(math.log(0.82) + math.log(0.3)) / 2, abs=1e-9)


def test_multilabel_metrics_average_the_labels() -> None:
    probs = np.array([[0.9, 0.2], [0.3, 0.7]])
    y = np.array([[1, 0], [0, 0]])
    got = calibration_metrics(y, probs, MULTILABEL)
    # label 0: gaps 0.1 and 0.3; label 1: gaps 0.2 and 0.7 (one image per bin)
    assert got["ece"] == pytest.approx(((0.1 + 0.3) / 2 + (0.2 + 0.7) / 2) / 2, abs=1e-6)
    assert got["mce"] == pytest.approx((0.3 + 0.7) / 2, abs=1e-6)
    assert got["brier"] == pytest.approx((0.01 + 0.04 + 0.09 + 0.49) / 4, abs=1e-9)
    nll = -(math.log(0.9) + math.log(0.8) + math.log(0.7) + math.log(0.3)) / 4
    assert got["nll"] == pytest.approx(nll, abs=1e-9)


def test_every_classification_split_reports_calibration() -> None:
    task = get_task(BINARY, ("benign", "malignant"))
    assert set(calibration.NAMES) <= set(task.metric_names)
    out = compute_metrics(np.array([[1], [0]]), np.array([[0.18, 0.82], [0.7, 0.3]]), BINARY)
    assert set(calibration.NAMES) <= set(out)


def _overconfident(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the model reports 10 z: right ranking, far too sure."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).reshape(-1)
    return 10 * z, y


def test_temperature_scaling_fixes_an_overconfident_model() -> None:
    val_logits, val_y = _overconfident(2000, 4, seed=0)
    test_logits, test_y = _overconfident(2000, 4, seed=1)
    t = fit_temperature(val_logits, val_y, MULTICLASS)
    assert t.shape == (1,) and 7 < float(t) < 14  # the 10x it was made over-confident by
    record, _ = calibration.calibrate(
        MULTICLASS,
        {
            "val": (val_logits, val_y.numpy()[:, None]),
            "test": (test_logits, test_y.numpy()[:, None]),
        },
    )
    for split in ("val", "test"):
        before, after = record[split]["before"], record[split]["after"]
        assert after["nll"] < before["nll"] and after["ece"] < before["ece"] / 2
    assert record["test"]["after"]["ece"] < 0.05


def test_multilabel_gets_one_temperature_per_label() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 2, generator=g)
    y = torch.bernoulli(torch.sigmoid(z), generator=g)
    t = fit_temperature(z * torch.tensor([5.0, 0.5]), y, MULTILABEL)
    assert t.shape == (2,)
    assert 3.5 < float(t[0]) < 7 and 0.35 < float(t[1]) < 0.7


def test_temperature_stays_finite_on_separable_and_inverted_logits() -> None:
    logits = torch.tensor([[2.0, -2.0], [-2.0, 2.0]])
    right = fit_temperature(logits, torch.tensor([0, 1]), BINARY)  # NLL -> 0 as T -> 0
    wrong = fit_temperature(logits, torch.tensor([1, 0]), BINARY)  # NLL falls as T grows
    assert torch.isfinite(right).all() and float(right) < 1
    assert torch.isfinite(wrong).all() and float(wrong) > 1


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


def test_exported_graphs_give_the_calibrated_probabilities(tmp_path: Path) -> None:
    net = _net()
    t = torch.tensor([2.5])
    scaled = TemperatureScaled(net, t).eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        want = torch.softmax(net(x) / 2.5, -1)
    onnx_file = export_onnx(scaled, x, tmp_path / "scaled.onnx")
    program = _torch_export(scaled, x, tmp_path / "scaled.pt2")
    raw_file = export_onnx(net, x, tmp_path / "raw.onnx")  # as an int8 file from a recipe is
    _divide_onnx_logits(raw_file, t)
    for model in (OrtModel(onnx_file), program, OrtModel(raw_file)):
        with torch.no_grad():
            got = torch.softmax(model(x).float(), -1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_tiny_run_records_calibration_and_draws_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(make_cfg(out, ["debug=limit", "callbacks=none", "profile.enabled=false"]))
    res = json.loads((out / "results.json").read_text())
    block = res[calibration.RESULTS_KEY]
    assert block["temperature"] > 0 and block["bins"] == 15
    for split in ("val", "test"):
        assert set(block[split]["before"]) == set(calibration.NAMES)
        assert set(calibration.NAMES) <= set(res[split])
    assert block["val"]["after"]["nll"] <= block["val"]["before"]["nll"] + 1e-9  # fitted there
    assert (out / calibration.PLOT).stat().st_size > 1000
    assert calibration.temperature_of(res).tolist() == pytest.approx([block["temperature"]])
