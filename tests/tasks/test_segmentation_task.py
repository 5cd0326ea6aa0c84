"""The segmentation task on hand-made masks: Dice, IoU and HD95 values that can be worked out on
paper, the empty-mask conventions the README states, and the loss on logit maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlite.errors import ConfigError
from medlite.tasks import SEGMENTATION, SegmentationTask, get_task

BINARY = SegmentationTask(SEGMENTATION, ("background", "lesion"))


def _square(size: int = 32, top: int = 8, left: int = 8, side: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), np.int64)
    mask[top : top + side, left : left + side] = 1
    return mask


def test_identical_masks_score_perfectly():
    truth = np.stack([_square(), _square(top=2, left=20, side=5)])
    m = BINARY.metrics(truth, truth.copy())
    assert m == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}


def test_disjoint_masks_score_zero():
    m = BINARY.metrics(_square(top=0, left=0)[None], _square(top=20, left=20)[None])
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert m["hd95"] > 20


def test_known_partial_overlap():
    """An 8x8 square against the same square moved 2 columns: overlap 8x6 = 48 pixels, so
    Dice = 2*48/(64+64) = 0.75 and IoU = 48/80 = 0.6."""
    m = BINARY.metrics(_square()[None], _square(left=10)[None])
    assert m["dice"] == pytest.approx(0.75)
    assert m["iou"] == pytest.approx(0.6)


def test_hd95_of_a_known_shift():
    """A one-pixel-wide vertical line moved by 5 columns: every boundary point is exactly 5 px
    from the other line, so the 95th-percentile Hausdorff distance is 5."""
    truth = np.zeros((1, 40, 40), np.int64)
    pred = np.zeros_like(truth)
    truth[0, 5:35, 10] = 1
    pred[0, 5:35, 15] = 1
    assert BINARY.metrics(truth, pred)["hd95"] == pytest.approx(5.0)


def test_empty_mask_conventions():
    """No lesion in the reference: Dice/IoU 1 when the prediction is empty too, 0 for a false
    alarm; HD95 is undefined there and left out of the mean (NaN when nothing is left)."""
    empty = np.zeros((1, 16, 16), np.int64)
    both_empty = BINARY.metrics(empty, empty)
    assert both_empty["dice"] == 1.0 and both_empty["iou"] == 1.0
    assert np.isnan(both_empty["hd95"])
    alarm = BINARY.metrics(empty, _square(16, 4, 4, 4)[None])
    assert alarm["dice"] == 0.0 and alarm["iou"] == 0.0
    # averaged per image: a perfect lesion image and a false alarm give 0.5; HD95 only from the
    # image where it is defined
    truth = np.stack([_square(), np.zeros((32, 32), np.int64)])
    pred = np.stack([_square(), _square(top=20, left=20, side=4)])
    mixed = BINARY.metrics(truth, pred)
    assert mixed["dice"] == pytest.approx(0.5) and mixed["hd95"] == 0.0


def test_multiclass_background_excluded_and_classes_averaged():
    task = get_task(SEGMENTATION, ["background", "margin", "core"])
    truth = np.zeros((1, 20, 20), np.int64)
    truth[0, 4:12, 4:12] = 1
    truth[0, 6:10, 6:10] = 2
    pred = truth.copy()
    pred[0, 6:10, 6:10] = 1  # the core predicted as margin
    m = task.metrics(truth, pred)
    # margin: truth 48 px, pred 64 px, overlap 48 -> 2*48/112; core: 0
    assert m["dice"] == pytest.approx((2 * 48 / 112 + 0.0) / 2)


def test_probabilities_and_masks_give_the_same_metrics():
    rng = np.random.default_rng(0)
    truth = (rng.random((3, 24, 24)) > 0.7).astype(np.int64)
    probs = rng.random((3, 2, 24, 24)).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    assert BINARY.metrics(truth, probs) == BINARY.metrics(truth, probs.argmax(axis=1))
    assert BINARY.eval_outputs(torch.from_numpy(probs)).dtype == torch.uint8


def test_loss_decreases_towards_the_truth_and_takes_class_weights():
    truth = torch.from_numpy(_square()[None])
    good = torch.stack([1 - truth, truth], dim=1).float() * 8 - 4  # confident and right
    bad = -good
    assert BINARY.loss(good, BINARY.targets(truth)) < BINARY.loss(bad, BINARY.targets(truth))
    weights = BINARY.class_weights(np.array([960, 64]), 1)
    assert weights[1] / weights[0] == pytest.approx(960 / 64)
    assert torch.isfinite(BINARY.loss(bad, truth, class_weights=weights))


def test_record_names_the_monitored_metric():
    record = BINARY.record()
    assert record["kind"] == "segmentation" and record["monitor"] == "val/dice"
    assert record["headline"] == ["dice", "iou"] and record["mode"] == "max"
    with pytest.raises(ConfigError, match="background"):
        SegmentationTask(SEGMENTATION, ("background",))
