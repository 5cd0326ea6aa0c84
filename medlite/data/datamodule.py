"""One Lightning datamodule over any data source: splits, preprocessing, augmentation, loaders.

The source (:mod:`medlite.data.sources`) finds and validates the files and reports the task; the
datamodule turns its stored uint8 images into normalised tensors at the model's input size and
serves the three splits. Preprocessing is recorded (``describe()["preprocess"]``) so export and
``predict.py`` apply exactly the same steps to a file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from medlite.data.sources.base import SPLITS, DataSource, Split
from medlite.data.transforms import Preprocess, build_augment, normalisation
from medlite.errors import ConfigError
from medlite.tasks import BINARY, MULTILABEL, Task

log = logging.getLogger(__name__)


class ArrayDataset(Dataset):
    """(image, label) pairs from uint8 arrays (possibly memory-mapped), transformed on access."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        preprocess: Preprocess,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.images, self.labels = images, torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.preprocess, self.augment = preprocess, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is None:
            return self.preprocess(self.images[i]), self.labels[i]
        x = self.augment(self.preprocess.prepare(self.images[i]))
        return self.preprocess.normalize(x), self.labels[i]


class MaskDataset(Dataset):
    """(image, mask) pairs for segmentation: the mask follows every geometric step of its image
    (fit to size with nearest-neighbour sampling, the same random flip/affine)."""

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        preprocess: Preprocess,
        augment: Callable | None = None,
    ) -> None:
        self.images, self.masks = images, masks
        self.preprocess, self.augment = preprocess, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess.prepare(self.images[i])
        m = self.preprocess.mask(self.masks[i])
        if self.augment is not None:
            x, m = self.augment(tv_tensors.Image(x), tv_tensors.Mask(m))
            x, m = x.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)
        return self.preprocess.normalize(x), m


class DataModule(pl.LightningDataModule):
    """Serves a source's train/val/test splits, preprocessed for the model."""

    def __init__(
        self,
        source: DataSource,
        input_size: int | None = None,
        as_rgb: bool = False,
        fit: str = "resize",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augment: dict | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pretrained_norm: tuple[list[float], list[float]] | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        #: the RGB (mean, std) of pretrained weights, used when data.mean/std are null
        self.pretrained_norm = pretrained_norm
        self.input_size, self.as_rgb, self.fit = input_size, bool(as_rgb), fit
        self.mean_cfg, self.std_cfg = mean, std
        self.augment_cfg = dict(augment) if augment else None
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.splits: dict[str, ArrayDataset] = {}
        self.skipped: list[dict] = []

    # ------------------------------------------------------------------ what the source says
    @property
    def info(self):
        return self.source.info

    @property
    def task(self) -> Task:
        return self.source.info.task

    @property
    def name(self) -> str:
        return self.source.info.name

    @property
    def size(self) -> int:
        return self.source.info.size

    @property
    def is_synthetic(self) -> bool:
        return self.source.info.synthetic

    @property
    def path(self) -> Path | None:
        """The data file a file-based source read (None before setup or for folders)."""
        return getattr(self.source, "path", None)

    @property
    def in_chans(self) -> int:
        return 3 if (self.as_rgb or self.source.info.channels == 3) else 1

    @cached_property
    def preprocess(self) -> Preprocess:
        info = self.source.info
        if info.spatial_dims == 3 and self.task.kind == "segmentation":
            raise ConfigError(
                f"{info.name} holds 3D masks; medlite segments 2D images so far (volumes are "
                "classified). Choose a 2D segmentation dataset"
            )
        n = self.in_chans
        mean, std = normalisation(self.mean_cfg, self.std_cfg, n, self.pretrained_norm)
        return Preprocess(
            self.input_size or info.size,
            as_rgb=n == 3,
            mean=mean,
            std=std,
            fit=self.fit,
            load_size=info.size,
            spatial_dims=info.spatial_dims,
        )

    @property
    def spatial_dims(self) -> int:
        return self.source.info.spatial_dims

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One model input without the batch axis: (C, S, S) or (C, S, S, S)."""
        return self.preprocess.input_shape

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Find, download or generate and validate the files (the source's job)."""
        self.source.load()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        loaded = self.source.load()
        self.preprocess  # noqa: B018 - checks the settings (channels, mean/std) now
        augment = build_augment(
            self.augment_cfg,
            spatial_dims=self.spatial_dims,
            seed=_augment_seed() if self.spatial_dims == 3 else None,
            size=self.preprocess.input_size,
        )
        for split, data in loaded.items():
            self.splits[split] = self._dataset(data, augment if split == "train" else None)
        log.info(
            "%s (%s, %d px%s): %s",
            self.name,
            self.task.type,
            self.size,
            " volumes" if self.spatial_dims == 3 else "",
            ", ".join(f"{k} {len(v)}" for k, v in self.splits.items()),
        )
        log.info("class balance per split:\n%s", self.balance_table())
        if self.task.type == BINARY:
            log.info(
                "binary task: %r (the second class) is the positive class of sensitivity, "
                "F1 and the ROC curve",
                self.task.labels[-1],
            )

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # a last batch of one sample would break BatchNorm in training
            drop_last=shuffle and len(self.splits[split]) % batch_size == 1,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def _dataset(self, data: Split, augment: Callable | None) -> Dataset:
        if self.task.kind == "segmentation":
            return MaskDataset(data.images, data.labels, self.preprocess, augment)
        return ArrayDataset(data.images, data.labels, self.preprocess, augment)

    def calibration_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Training images without augmentation, in a fixed order (int8 calibration, pruning)."""
        plain = self._dataset(self.source.load()["train"], None)
        return DataLoader(plain, batch_size=batch_size or self.batch_size, shuffle=False)

    # ------------------------------------------------------------------ records
    def class_counts(self, split: str = "train") -> np.ndarray:
        """Examples per class (positives per label for multi-label tasks) in a split."""
        return class_counts(self.source.load()[split], self.task)

    def balance_table(self) -> str:
        """Per split and class: count and share (of pixels, for segmentation), as fixed-width
        text for the console and log."""
        labels = list(self.task.labels)
        width = max(8, *(len(lab) for lab in labels))
        rows = [f"  {'class':<{width}}" + "".join(f"{s:>16}" for s in SPLITS)]
        counts = {s: self.class_counts(s) for s in SPLITS}
        pixels = self.task.kind == "segmentation"
        totals = {s: counts[s].sum() if pixels else len(self.source.load()[s]) for s in SPLITS}
        for i, lab in enumerate(labels):
            share = {s: 100 * counts[s][i] / max(1, totals[s]) for s in SPLITS}
            if pixels:
                cells = "".join(f"{share[s]:>12.1f}% px" for s in SPLITS)
            else:
                cells = "".join(f"{int(counts[s][i]):>9} ({share[s]:4.1f}%)" for s in SPLITS)
            rows.append(f"  {lab:<{width}}{cells}")
        return "\n".join(rows)

    def describe(self) -> dict:
        """What results.json records about the data."""
        info = self.source.info
        loaded = self.source._splits or {}
        return {
            "source": self.source.kind,
            "name": info.name,
            "size": info.size,
            "synthetic": info.synthetic,
            "task": self.task.type,
            "labels": list(self.task.labels),
            "channels": info.channels,
            "spatial_dims": info.spatial_dims,
            "n_samples": {k: len(v) for k, v in loaded.items()},
            "class_counts": {
                k: [int(c) for c in class_counts(v, self.task)] for k, v in loaded.items()
            },
            **self.source.describe(),
            "preprocess": self.preprocess.describe(),
        }

    def fingerprint(self) -> str:
        return self.source.fingerprint()

    def write_records(self, run_dir: Path) -> list[str]:
        """Let the source keep what makes the run auditable (e.g. ``splits.csv``)."""
        return self.source.write_records(Path(run_dir))


def _augment_seed() -> int:
    """A seed for augmentation that keeps its own generator (MONAI's): drawn from torch's, so
    it follows ``seed_everything``."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def class_counts(split: Split, task: Task) -> np.ndarray:
    """Examples per class; for multi-label tasks, positives per label; for segmentation, pixels
    per class."""
    labels = np.asarray(split.labels)
    if task.kind == "segmentation":
        return np.bincount(labels.reshape(-1).astype(np.int64), minlength=task.num_outputs)
    if task.type == MULTILABEL:
        return labels.sum(axis=0).astype(np.int64)
    return np.bincount(labels.reshape(-1).astype(np.int64), minlength=task.num_outputs)
