"""Local inference: image files in, class probabilities (classification) or masks
(segmentation) out, on this machine only.

Preprocessing is the run's own evaluation transform (:attr:`TrainedRun.preprocess`), so an image
is resized, channel-matched and normalised exactly as in training. Nothing here opens a network
connection or logs anywhere but the local console: patient images never leave the machine.
A file that can't be read becomes an error row; the other files of a folder still run.
Classification probabilities are calibrated: the run's temperature (fitted on its validation
split, :mod:`medlite.tasks.calibration`) divides the logits, inside the exported graph or here.

Memory: a file larger than ``max_pixels`` (default :data:`~medlite.data.readers.MAX_PIXELS`,
8192 x 8192) is refused from its header, before decoding, as an error row. Below that, one 2D
image costs about 3 bytes per pixel (grayscale, 8- or 16-bit) or 7 (RGB) at its peak: the
decoded file plus the uint8 image; scaling and resizing run strip by strip (a 16-bit
8000 x 8000 PNG: ~210 MB above the process's baseline, tested). A segmentation run also draws
its overlay at the file's own size, in float32: about 20 bytes per pixel more.

A volume run (a 3D model) takes NIfTI files and DICOM series folders
(:mod:`medlite.data.volumes`): each is read, resampled and fitted to the training size by the
rule the folder source used, then classified: one probability row per volume. A 2D model given a
volume, or a 3D model given a 2D image, gets an error row saying so.

A segmentation run writes, per input ``<name>.<ext>``, into the output folder (mirroring the
input folder's sub-folders): ``<name>_mask.png`` (class indices, the input's size),
``<name>_overlay.png`` (the image with the predicted classes tinted and outlined) and, for a
NIfTI or DICOM input, ``<name>_mask.nii.gz`` with the input's geometry; conventions in
:mod:`medlite.deploy.masks`. :func:`write_segmentation_csv` gives one row per input with the
share of the image each foreground class covers.
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

from medlite.data import volumes
from medlite.data.readers import (
    MAX_PIXELS,
    InputError,
    conform_channels,
    list_inputs,
    read_image,
)
from medlite.deploy import masks as seg
from medlite.deploy import runtimes
from medlite.deploy.auto import choose_runtime
from medlite.deploy.export import FILE_NAMES
from medlite.deploy.onnx import META_PREPROCESS, model_metadata
from medlite.deploy.run_dir import TrainedRun
from medlite.errors import ConfigError
from medlite.tasks import calibration, conformal

log = logging.getLogger(__name__)

RUNTIMES = ("auto", runtimes.PYTORCH, *runtimes.DEPLOYABLE)


@dataclass
class Prediction:
    path: Path
    probabilities: dict[str, float] = field(default_factory=dict)
    predicted: list[str] = field(default_factory=list)
    #: (H, W) or (H, W, C) of the file as read, before resizing to the model's input
    original_shape: tuple[int, ...] | None = None
    error: str | None = None
    #: segmentation: the class-index mask at the file's (H, W) (None once written to disk)
    mask: np.ndarray | None = field(default=None, repr=False)
    #: segmentation: share of the image each foreground class covers
    fractions: dict[str, float] = field(default_factory=dict)
    #: segmentation: the files written for this input (``mask``, ``overlay``, ``mask_nifti``)
    files: dict[str, str] = field(default_factory=dict)
    #: segmentation, NIfTI/DICOM input: where the NIfTI mask's geometry came from
    geometry: str | None = None
    #: ``coverage=``: the conformal prediction set (class names, in class order)
    set: list[str] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Predictor:
    """A run's model plus its preprocessing; ``runtime`` picks PyTorch or an exported file."""

    def __init__(
        self,
        run: TrainedRun | str | Path,
        runtime: str = "auto",
        max_pixels: int | None = MAX_PIXELS,
        coverage: float | None = None,
    ) -> None:
        self.run = run if isinstance(run, TrainedRun) else TrainedRun.load(run)
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if max_pixels is not None and max_pixels < 1:
            raise ConfigError(f"max_pixels must be a positive number of pixels, got {max_pixels}")
        #: files whose header declares more pixels are refused before decoding (an error row)
        self.max_pixels = max_pixels
        self.runtime_reason = "asked for"
        self.runtime = self._choose(runtime)
        self.model = self._load(self.runtime)
        self.task = self.run.task
        #: ``coverage``: conformal sets from the run's calibration on its validation split
        self.coverage = None if coverage is None else conformal.check_coverage(coverage)
        self.conformal = None if coverage is None else self._conformal_record()

    def _conformal_record(self) -> dict:
        """The run's stored conformal calibration; a run without one says how to make it."""
        conformal.check_task(self.run.task.type)
        record = self.run.results.get(conformal.KEY)
        if not record or not record.get("val_scores"):
            raise ConfigError(
                f"run {self.run.path} has no conformal calibration (results.json "
                f"{conformal.KEY!r}); re-train it, or calibrate it on its validation split: "
                f"python scripts/conformal.py run={self.run.path}"
            )
        if record.get("temperature") != conformal.run_temperature(self.run.results):
            log.warning(
                "the conformal sets of %s were calibrated at temperature %s, the run now records "
                "%s; recalibrate: python scripts/conformal.py run=%s",
                self.run.path,
                record.get("temperature"),
                conformal.run_temperature(self.run.results),
                self.run.path,
            )
        return record

    def _choose(self, runtime: str) -> str:
        """``auto``: the fastest runtime that passed its checks here (:mod:`medlite.deploy.auto`)."""
        if runtime != "auto":
            if runtime != runtimes.PYTORCH:
                runtimes.require(runtime)
            return runtime
        chosen, why = choose_runtime(self.run, torch.get_num_threads())
        log.debug("runtime=auto: %s (%s)", runtimes.LABELS[chosen], why)
        self.runtime_reason = why
        return chosen

    def _load(self, runtime: str) -> nn.Module:
        if runtime == runtimes.PYTORCH:
            return calibration.scaled(self.run.torch_model(), self.run.results)
        path = self.run.export_dir / FILE_NAMES[runtime]
        if not path.is_file():
            raise ConfigError(
                f"runtime={runtime} needs {path}; export it first: "
                f"python scripts/export.py run={self.run.path} formats=[{runtime}]"
            )
        stated = runtimes.read_metadata(runtime, path)
        self._check_metadata(path, stated)
        model = runtimes.load(runtime, path)
        if calibration.ONNX_KEY in stated:  # exported with T in its graph
            return model
        return calibration.scaled(model, self.run.results)  # an older export

    def _check_metadata(self, path: Path, metadata: dict) -> None:
        """An ONNX file states the preprocessing it was exported with: refuse one that disagrees
        with the run's (a file copied from another run), rather than predict with the wrong
        size or normalisation. Files exported before medlite wrote metadata pass."""
        stated = metadata.get(META_PREPROCESS)
        if not stated:
            return
        spec = self.run.data["preprocess"]
        want = json.loads(model_metadata(spec, self.run.task.record())[META_PREPROCESS])
        keys = ("input_size", "fit", "mean", "std", "channels", "spatial_dims")
        differ = [k for k in keys if stated.get(k) != want[k]]
        if differ:
            raise ConfigError(
                f"{path} was exported with another preprocessing than run {self.run.path} "
                f"records ({', '.join(f'{k}: {stated.get(k)} vs {want[k]}' for k in differ)}); "
                f"re-export it: python scripts/export.py run={self.run.path}"
            )

    def preprocess(self, path: Path) -> tuple[torch.Tensor, tuple[int, ...]]:
        """File -> the (1, C, H, W) tensor the model was trained on, and the file's own shape
        ((1, C, D, H, W) for a volume model)."""
        if self.run.spatial_dims == 3:
            pre = self.run.preprocess
            array, shape = volumes.read_fitted(path, pre.load_size or pre.input_size, pre.fit)
            return pre(array).unsqueeze(0), shape
        image = read_image(path, self.max_pixels)
        shape = tuple(image.shape)
        image = conform_channels(image, self.run.in_chans, path)
        return self.run.preprocess(np.ascontiguousarray(image)).unsqueeze(0), shape

    def predict_file(
        self, path: str | Path, out_dir: str | Path | None = None, name: Path | None = None
    ) -> Prediction:
        """One file. Segmentation: with ``out_dir``, the mask, overlay (and NIfTI mask) are
        written there as ``<name>_mask.png`` ... (``name``: a relative path without suffix,
        default the file's stem) and the in-memory mask is dropped."""
        path = Path(path)
        if self.task.kind == "segmentation":
            return self._segment(path, out_dir, name)
        try:
            x, shape = self.preprocess(path)
        except InputError as err:
            return Prediction(path=path, error=str(err))
        with torch.inference_mode():
            scores = self.task.scores(self.model(x).float()).cpu().numpy()
        labels = self.task.labels
        predicted = self.task.predicted_labels(scores)[0]
        chosen = None
        if self.conformal is not None:  # calibrated on these same (temperature-scaled) scores
            chosen = conformal.sets_from_record(self.conformal, scores, self.coverage, labels)[0]
        return Prediction(
            path=path,
            probabilities={lab: float(p) for lab, p in zip(labels, scores[0], strict=True)},
            predicted=predicted,
            original_shape=shape,
            set=chosen,
        )

    def _segment(self, path: Path, out_dir: str | Path | None, name: Path | None) -> Prediction:
        try:
            image = read_image(path, self.max_pixels)
            shape = tuple(image.shape)
            x = self.run.preprocess(
                np.ascontiguousarray(conform_channels(image, self.run.in_chans, path))
            ).unsqueeze(0)
        except InputError as err:
            return Prediction(path=path, error=str(err))
        with torch.inference_mode():
            logits = self.model(x).float()
        if logits.ndim != 4:
            raise ConfigError(
                f"the model of {self.run.path} returns {tuple(logits.shape)}, not a per-pixel map "
                "(N, classes, H, W), though its task is segmentation"
            )
        classes = logits.argmax(dim=1)[0].cpu().numpy()
        mask = seg.restore_size(classes, shape, self.run.preprocess)
        fractions = self.task.foreground_fraction(mask)
        pred = Prediction(
            path=path,
            predicted=[lab for lab, share in fractions.items() if share > 0],
            original_shape=shape,
            mask=mask,
            fractions=fractions,
        )
        if out_dir is not None:
            try:
                self._write(pred, image, Path(out_dir), name or Path(seg.stem(path)))
            except InputError as err:  # the input's geometry can't be read: an error row
                pred.error = str(err)
            pred.mask = None
        return pred

    def _write(self, pred: Prediction, image: np.ndarray, out_dir: Path, name: Path) -> None:
        """The mask (class indices), the overlay and, for NIfTI/DICOM input, the NIfTI mask."""
        base = out_dir / name
        mask_png = seg.save_png(pred.mask, base.with_name(base.name + "_mask.png"))
        pred.files["mask"] = str(mask_png)
        overlay_png = base.with_name(base.name + "_overlay.png")
        pred.files["overlay"] = str(seg.save_png(seg.overlay(image, pred.mask), overlay_png))
        if seg.is_nifti(pred.path) or seg.is_dicom(pred.path):
            target = base.with_name(base.name + "_mask.nii.gz")
            try:
                pred.geometry = seg.save_nifti_mask(pred.path, pred.mask, target)
            except Exception as err:  # noqa: BLE001 - a header we can't use is the file's fault
                raise InputError(
                    f"{pred.path}: its geometry could not be read for the NIfTI mask "
                    f"({type(err).__name__}: {err}); the PNG mask and overlay were written"
                ) from err
            pred.files["mask_nifti"] = str(target)

    def predict(
        self, target: str | Path, progress: bool = True, out_dir: str | Path | None = None
    ) -> list[Prediction]:
        """A file or a folder (recursively); errors become rows, the rest still runs.

        Segmentation: with ``out_dir``, each file's outputs are written there as it is
        predicted, in the sub-folders the file has under ``target``
        (:func:`medlite.deploy.masks.output_names`).
        """
        target = Path(target)
        paths = (
            volumes.list_volume_inputs(target)
            if self.run.spatial_dims == 3
            else list_inputs(target)
        )
        names = seg.output_names(paths, target if target.is_dir() else target.parent)
        if progress and len(paths) > 20:
            from rich.progress import track

            paths_iter = track(paths, description="predicting", transient=True)
        else:
            paths_iter = paths
        rows = []
        for p in paths_iter:
            if self.task.kind == "segmentation":
                rows.append(self.predict_file(p, out_dir=out_dir, name=names[p]))
            else:
                rows.append(self.predict_file(p))
        return rows


def write_csv(
    rows: list[Prediction], labels: tuple[str, ...], path: str | Path, sets: bool = False
) -> Path:
    """One row per file: predicted label(s), one probability column per class, or the error;
    ``sets``: a ``set`` column too (the conformal prediction set, class names joined by |)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        extra = ["set"] if sets else []
        writer.writerow(["file", "predicted", *[f"p({lab})" for lab in labels], *extra, "error"])
        for r in rows:
            probs = [f"{r.probabilities[lab]:.6f}" if r.ok else "" for lab in labels]
            chosen = ["|".join(r.set or [])] if sets else []
            writer.writerow([str(r.path), ";".join(r.predicted), *probs, *chosen, r.error or ""])
    return path


def write_segmentation_csv(rows: list[Prediction], task, path: str | Path) -> Path:
    """One row per file: the foreground classes found, the share of the image each foreground
    class covers (``fraction(<class>)``, 0..1, at the file's own size), the image size, the
    files written (mask, overlay, NIfTI mask) and where the NIfTI geometry came from, or the
    error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    foreground = list(task.labels[1:])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "file",
                "predicted",
                *[f"fraction({lab})" for lab in foreground],
                "height",
                "width",
                "mask",
                "overlay",
                "mask_nifti",
                "geometry",
                "error",
            ]
        )
        for r in rows:
            ok = bool(r.fractions) and r.original_shape is not None  # predicted (maybe not saved)
            writer.writerow(
                [
                    str(r.path),
                    ";".join(r.predicted),
                    *[f"{r.fractions[lab]:.6f}" if ok else "" for lab in foreground],
                    r.original_shape[0] if ok else "",
                    r.original_shape[1] if ok else "",
                    r.files.get("mask", ""),
                    r.files.get("overlay", ""),
                    r.files.get("mask_nifti", ""),
                    r.geometry or "",
                    r.error or "",
                ]
            )
    return path
