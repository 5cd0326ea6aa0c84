"""Test-split metrics for any model, trainable or not (an int8 runtime session included).

The Lightning module computes the same metrics during training; compression needs them for
models Lightning can't drive (ONNX Runtime sessions) and for the before/after rows, so this is
the one plain loop every row of the table goes through.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medlite.tasks import Task


def predict_scores(
    model: nn.Module, loader: DataLoader, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) over a loader, in eval mode, without gradients."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    labels, scores = [], []
    try:
        with torch.inference_mode():
            for x, y in loader:
                logits = model(x)
                labels.append(y)
                scores.append(task.eval_outputs(logits.float()))
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return torch.cat(labels).numpy(), torch.cat(scores).numpy()


def split_batches(
    model: nn.Module, datamodule, split: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch of a split as (the model's raw float32 logits on the CPU, the labels), the
    model in eval mode on its own device, without gradients; its mode is restored after."""
    loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.inference_mode():
            for x, y in loader:
                yield model(x.to(device)).float().cpu(), y
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)


def split_logits(
    model: nn.Module, datamodule, splits: tuple[str, ...] = ("val", "test")
) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Per split, the model's raw logits (float32, CPU, before any activation or temperature)
    and the dataset's labels: what calibration and conformal prediction are fitted on (val) and
    judged on (test). Classification only: (N, C) logits are small; a segmentation split's
    per-pixel maps are not (:func:`pixel_calibration` streams them)."""
    out = {}
    for split in splits:
        logits, labels = [], []
        for z, y in split_batches(model, datamodule, split):
            logits.append(z)
            labels.append(y)
        out[split] = (torch.cat(logits), torch.cat(labels).numpy())
    return out


def pixel_calibration(
    model: nn.Module, datamodule, splits: tuple[str, ...] = ("val", "test")
) -> dict:
    """Per-pixel calibration of a segmentation model on each split, batch by batch: the
    results.json block (:class:`medlite.tasks.calibration.PixelCalibration`)."""
    from medlite.tasks.calibration import BINS, PixelCalibration

    record: dict = {"bins": BINS, "confidence": "top label, every pixel an example"}
    for split in splits:
        acc = PixelCalibration()
        for logits, masks in split_batches(model, datamodule, split):
            acc.update(logits, masks)
        record[split] = acc.compute() | {"pixels": acc.pixels}
    return record


def evaluate(model: nn.Module, loader: DataLoader, task: Task) -> dict[str, float]:
    """The task's metrics of ``model`` on ``loader``."""
    y, s = predict_scores(model, loader, task)
    return task.metrics(y, s)


def evaluate_at_original_size(model: nn.Module, datamodule, split: str = "test") -> dict | None:
    """Segmentation metrics of ``split`` at each image's own size: the predicted class map is
    taken back through the preprocessing (the region the image occupies, then nearest-neighbour
    resizing) and compared with the mask as its file has it. None when the source stores its
    masks at their original size already (generated data)."""
    originals = datamodule.source.original_masks(split)
    if originals is None:
        return None
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    _, predicted = predict_scores(model, loader, datamodule.task)
    pre = datamodule.preprocess
    pairs = [
        (truth, pre.restore_mask(mask, truth.shape))
        for truth, mask in zip(originals, predicted, strict=True)
    ]
    return datamodule.task.metrics_of_pairs(pairs)
