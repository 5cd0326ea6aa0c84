"""Local inference: image files in, class probabilities out, on this machine only.

Preprocessing is the run's own evaluation transform (:attr:`TrainedRun.preprocess`), so an image
is resized, channel-matched and normalised exactly as in training. Nothing here opens a network
connection or logs anywhere but the local console: patient images never leave the machine.
A file that can't be read becomes an error row; the other files of a folder still run.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medlite.data.readers import InputError, conform_channels, list_inputs, read_image
from medlite.deploy.export import FILE_NAMES
from medlite.deploy.onnx import OrtModel
from medlite.deploy.run_dir import TrainedRun
from medlite.errors import ConfigError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "pytorch", "onnx_fp32", "onnx_int8")


@dataclass
class Prediction:
    path: Path
    probabilities: dict[str, float] = field(default_factory=dict)
    predicted: list[str] = field(default_factory=list)
    #: (H, W) or (H, W, C) of the file as read, before resizing to the model's input
    original_shape: tuple[int, ...] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Predictor:
    """A run's model plus its preprocessing; ``runtime`` picks PyTorch or an exported file."""

    def __init__(self, run: TrainedRun | str | Path, runtime: str = "auto") -> None:
        self.run = run if isinstance(run, TrainedRun) else TrainedRun.load(run)
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.runtime = self._choose(runtime)
        self.model = self._load(self.runtime)
        self.task = self.run.task

    def _choose(self, runtime: str) -> str:
        """``auto``: the int8 file when the export passed its checks, else fp32 ONNX, else PyTorch."""
        if runtime != "auto":
            return runtime
        export = self.run.export_dir / "export.json"
        passed = False
        if export.is_file():
            try:
                passed = json.loads(export.read_text()).get("status") == "ok"
            except (OSError, ValueError):
                passed = False
        for fmt in ("onnx_int8", "onnx_fp32"):
            if passed and (self.run.export_dir / FILE_NAMES[fmt]).is_file():
                return fmt
        return "pytorch"

    def _load(self, runtime: str) -> nn.Module:
        if runtime == "pytorch":
            return self.run.torch_model()
        path = self.run.export_dir / FILE_NAMES[runtime]
        if not path.is_file():
            raise ConfigError(
                f"runtime={runtime} needs {path}; export it first: "
                f"python scripts/export.py run={self.run.path}"
            )
        return OrtModel(path)

    def preprocess(self, path: Path) -> tuple[torch.Tensor, tuple[int, ...]]:
        """File -> the (1, C, H, W) tensor the model was trained on, and the file's own shape."""
        image = read_image(path)
        shape = tuple(image.shape)
        image = conform_channels(image, self.run.in_chans, path)
        return self.run.preprocess(np.ascontiguousarray(image)).unsqueeze(0), shape

    def predict_file(self, path: str | Path) -> Prediction:
        path = Path(path)
        try:
            x, shape = self.preprocess(path)
        except InputError as err:
            return Prediction(path=path, error=str(err))
        with torch.inference_mode():
            scores = self.task.scores(self.model(x).float()).cpu().numpy()
        labels = self.task.labels
        predicted = self.task.predicted_labels(scores)[0]
        return Prediction(
            path=path,
            probabilities={lab: float(p) for lab, p in zip(labels, scores[0], strict=True)},
            predicted=predicted,
            original_shape=shape,
        )

    def predict(self, target: str | Path, progress: bool = True) -> list[Prediction]:
        """A file or a folder (recursively); errors become rows, the rest still runs."""
        paths = list_inputs(Path(target))
        if progress and len(paths) > 20:
            from rich.progress import track

            paths_iter = track(paths, description="predicting", transient=True)
        else:
            paths_iter = paths
        return [self.predict_file(p) for p in paths_iter]


def write_csv(rows: list[Prediction], labels: tuple[str, ...], path: str | Path) -> Path:
    """One row per file: predicted label(s), one probability column per class, or the error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "predicted", *[f"p({lab})" for lab in labels], "error"])
        for r in rows:
            probs = [f"{r.probabilities[lab]:.6f}" if r.ok else "" for lab in labels]
            writer.writerow([str(r.path), ";".join(r.predicted), *probs, r.error or ""])
    return path
