"""MedMNIST v2 (2D images and 3D volumes): the official ``.npz`` files, md5-checked, downloaded on request.

The file layer (find, verify, download, load) is :mod:`medlite.data.medmnist`; this source adds
what a run needs around it: settings checked up front, the task from ``medmnist.INFO``, and the
provenance results.json records.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medlite.data import medmnist
from medlite.data.sources.base import SPLITS, DataSource, SourceInfo, Split
from medlite.errors import ConfigError
from medlite.tasks import get_task

log = logging.getLogger(__name__)


class MedMNISTSource(DataSource):
    """One official MedMNIST dataset (2D, or 3D for the ``*mnist3d`` flags) at one size, with
    its official splits."""

    kind = "medmnist"

    def __init__(
        self,
        flag: str,
        size: int = 28,
        data_dir: str = "~/.medmnist",
        cache_dir: str = "~/.cache/medlite",
        download: bool = True,
        mmap: bool | None = None,
    ) -> None:
        super().__init__()
        if flag is None:
            raise ConfigError(
                "data.flag is required (choose a dataset option, e.g. data=breastmnist)"
            )
        self.meta = medmnist.get_info(flag)  # unknown flag -> ConfigError with suggestions
        self.flag = str(flag).strip().lower()
        self.spatial_dims = 3 if self.flag.endswith("3d") else 2
        sizes = medmnist.valid_sizes(self.flag)
        if isinstance(size, bool) or size not in sizes:
            raise ConfigError(
                f"data.size={size!r} is not available for {self.flag}; valid sizes: "
                f"{', '.join(map(str, sizes))}"
            )
        self.size = int(size)
        self.data_dir = Path(str(data_dir)).expanduser()
        self.cache_dir = Path(str(cache_dir)).expanduser()
        self.download, self.mmap = bool(download), mmap
        self.path: Path | None = None

    def _read_info(self) -> SourceInfo:
        return SourceInfo(
            name=self.flag,
            task=get_task(self.meta["task"], _label_names(self.meta)),
            channels=int(self.meta["n_channels"]),
            size=self.size,
            spatial_dims=self.spatial_dims,
        )

    def _load(self) -> dict[str, Split]:
        self.path = medmnist.ensure_file(
            self.flag, self.size, self.data_dir, download=self.download
        )
        arrays = medmnist.load_splits(
            self.path, self.meta, mmap=self.mmap, cache_dir=self.cache_dir, size=self.size
        )
        return {s: Split(*arrays[s]) for s in SPLITS}

    def describe(self) -> dict:
        return {
            "flag": self.flag,
            "file": str(self.path) if self.path else None,
            "md5": medmnist.expected_md5(self.flag, self.size),
            "url": medmnist.download_url(self.flag, self.size),
            "license": self.meta.get("license"),
            "splits": {"method": "official"},
        }

    def fingerprint(self) -> str:
        return f"{self.flag}-{self.size}-{medmnist.expected_md5(self.flag, self.size)[:8]}"


def _label_names(meta: dict) -> tuple[str, ...]:
    labels = meta["label"]
    return tuple(labels[str(i)] for i in range(len(labels)))
