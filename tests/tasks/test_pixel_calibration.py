"""Per-pixel calibration of segmentation maps: the streaming bins give what torchmetrics gives on
every pixel at once, whatever the batching; a segmentation run reports it, and its robustness
under corruptions (Dice, IoU) when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from medlite.robustness.evaluate import CLEAN
from medlite.tasks.calibration import BINS, PIXEL_KEY, PixelCalibration
from tests.helpers import make_cfg, run_with_robustness_at_severity_1


def _maps(seed: int = 0, n: int = 6, k: int = 3, side: int = 16):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, k, side, side, generator=g)
    # truth agrees with the argmax most of the time: a realistic, imperfect model
    masks = logits.argmax(1)
    flip = torch.rand(n, side, side, generator=g) < 0.3
    masks[flip] = torch.randint(0, k, (int(flip.sum()),), generator=g)
    return logits, masks


def test_pixel_metrics_match_a_computation_on_every_pixel() -> None:
    logits, masks = _maps()
    acc = PixelCalibration()
    for start in range(0, len(logits), 4):  # batches of 4 and 2
        acc.update(logits[start : start + 4], masks[start : start + 4])
    got = acc.compute()
    probs = torch.softmax(logits.double(), 1).movedim(1, -1).reshape(-1, logits.shape[1])
    flat = masks.reshape(-1)
    k = logits.shape[1]
    assert got["ece"] == pytest.approx(float(multiclass_calibration_error(probs, flat, k, n_bins=BINS, norm="l1")), abs=1e-6)  # fmt: skip
    assert got["mce"] == pytest.approx(float(multiclass_calibration_error(probs, flat, k, n_bins=BINS, norm="max")), abs=1e-6)  # fmt: skip
    onehot = F.one_hot(flat, k).double()
    assert got["brier"] == pytest.approx(float(((probs - onehot) ** 2).sum(1).mean()), rel=1e-9)
    assert got["nll"] == pytest.approx(float(F.cross_entropy(logits.double(), masks)), rel=1e-9)
    assert acc.pixels == masks.numel()
    # a sharper copy of the same (imperfect) maps is worse calibrated
    sharp = PixelCalibration()
    sharp.update(10 * logits, masks)
    assert sharp.compute()["ece"] > got["ece"]


def test_empty_accumulator_is_nan() -> None:
    assert all(v != v for v in PixelCalibration().compute().values())


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> Path:
    """A debug-sized U-Net on the embedded lesion masks, robustness at severity 1."""
    out = tmp_path_factory.mktemp("seg_trust")
    cfg = make_cfg(
        out,
        ["data=synthseg", "debug=limit", "callbacks=none", "profile.enabled=false",
         "eval.robustness=true", "trainer.limit_test_batches=1.0"],  # the whole test split
    )  # fmt: skip
    run_with_robustness_at_severity_1(cfg)
    return out


def test_segmentation_run_reports_pixel_calibration(seg_run: Path) -> None:
    res = json.loads((seg_run / "results.json").read_text())
    record = res[PIXEL_KEY]
    assert record["bins"] == BINS and "calibration" not in res  # no temperature for masks
    for split in ("val", "test"):
        values = record[split]
        assert 0 <= values["ece"] <= values["mce"] <= 1 and values["nll"] > 0
        assert values["pixels"] > 0


def test_segmentation_robustness_scores_dice_on_clean_masks(seg_run: Path) -> None:
    res = json.loads((seg_run / "results.json").read_text())
    summary = res["robustness"]
    assert set(k for k, v in summary.items() if isinstance(v, dict)) == {"dice", "iou"}
    # the clean row is the test split as training scored it
    assert summary["dice"][CLEAN] == pytest.approx(res["test"]["dice"], abs=1e-6)
    report = json.loads((seg_run / "robustness" / "robustness.json").read_text())
    assert report["metrics"] == ["dice", "iou"] and len(report["rows"]) == 7
    assert (seg_run / "robustness" / "robustness.png").is_file()


def test_robustness_script_scores_a_segmentation_run(seg_run: Path) -> None:
    from medlite.robustness.run import main

    assert main([f"run={seg_run}", "severities=[5]", "corruptions=[contrast]", "limit=8"]) == 0
    record = json.loads((seg_run / "robustness" / "robustness.json").read_text())
    assert [(r["corruption"], r["severity"]) for r in record["rows"]] == [
        (CLEAN, 0),
        ("contrast", 5),
    ]
    assert record["n_test_images"] == 8 and record["metrics"] == ["dice", "iou"]
