"""Your own images or volumes: a folder of PNG/JPEG/BMP/TIFF, DICOM or 2D NIfTI files, or of 3D
volumes (NIfTI files, DICOM series folders), with their labels.

Three layouts are recognised (``root`` is ``data.root``):

* **CSV** (``root/labels.csv``, or ``data.csv``): a header row with the columns ``image`` (the
  file's path relative to ``root``) and ``label``; optionally ``split`` (train / val / test;
  valid and validation mean val, any case) and ``patient_id``. Other columns are ignored, so a
  hospital export can be used as it is. Rows keep their order within each split.
* **Class folders**: no CSV; each (non-hidden) sub-folder of ``root`` is a class and holds its
  images, searched recursively. Files are taken in sorted path order.
* **Split folders**: the sub-folders of ``root`` are ``train``, ``val`` (or ``valid`` /
  ``validation``) and ``test``, each holding class folders; the split comes from the folders.

Labels are class names or integer indices; a multi-label row joins its positive labels with
``|`` (an empty label: no finding); ordinal grades are integers. Without a split (no ``split``
column, class folders), a seeded stratified split by ``data.split`` is made, grouped by patient
when the CSV has ``patient_id`` (:mod:`medlite.data.splits`); every run records it in its run
folder as ``splits.csv``, which is itself a valid labels CSV to freeze a split with.

Why the strictness: silent data problems are the costliest ones in medical imaging. A missing or
corrupt file, a label typo, a patient on both sides of the split or a class absent from training
all fail loudly, once, with every affected file listed; ``data.skip_bad=true`` turns the
per-file problems into a listed skip instead. Images are read once, fitted to ``data.size``
(``data.fit``) and kept in memory as one uint8 array per split, exactly like a MedMNIST file:
BreastMNIST saved as PNGs with a ``labels.csv`` trains bit-identically to the ``.npz``.

Volumes (``data.dims=3``, or found automatically when the listed entries are NIfTI volumes or
DICOM series folders): each entry is one volume read by :func:`medlite.data.volumes.read_volume`
(a CSV's ``image`` names the NIfTI file or the series folder; a class folder holds NIfTI files
and/or one folder per series), resampled to isotropic voxels for ``fit: pad`` and fitted to
``data.size``³ (default 64 for volumes, 128 for images).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from medlite.data import volumes
from medlite.data.readers import is_supported, read_image
from medlite.data.sources.base import SPLITS, DataSource, SourceInfo, Split
from medlite.data.splits import check_fractions, stratified_split
from medlite.data.transforms import FIT_MODES, fit_image
from medlite.errors import ConfigError, DataError
from medlite.tasks import BINARY, MULTICLASS, MULTILABEL, ORDINAL, get_task, parse_task_type

log = logging.getLogger(__name__)

DEFAULT_CSV = "labels.csv"
#: the split names users write (any case) -> medlite's split
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
MULTI_SEPARATOR = "|"
MAX_LISTED = 10  # problems listed in one error message
MAX_LOGGED_SKIPS = 100
_INT = re.compile(r"\d+(?:\.0*)?")  # "3" or "3.0" (spreadsheets turn integers into floats)
_LAYOUT_HELP = (
    "either a labels CSV in the folder (columns image,label[,split][,patient_id]; set data.csv "
    "if it has another name) or one sub-folder per class holding its images (optionally inside "
    "train/val/test folders)"
)


@dataclass(frozen=True)
class FolderSettings:
    """The settings both folder sources (images with labels, images with masks) share, each
    checked with its own ConfigError before anything is read."""

    root: Path
    csv: str | None
    fractions: tuple[float, ...]
    split_seed: int
    channels: int | None
    skip_bad: bool
    size: int | None  # None: the source's default
    fit: str

    @classmethod
    def check(
        cls, root, csv, split, split_seed, channels, skip_bad, size, fit, *, holds: str
    ) -> FolderSettings:
        """``holds``: what the folder holds, for the messages ("your images")."""
        if root is None or not str(root).strip():
            raise ConfigError(f"data.root is required: the folder holding {holds}")
        path = Path(str(root)).expanduser()
        if not path.exists():
            raise ConfigError(f"data.root={root}: no such folder (the folder holding {holds})")
        if not path.is_dir():
            raise ConfigError(
                f"data.root={root}: is a file, not a folder; pass the folder holding {holds}"
            )
        if csv is not None and (not isinstance(csv, str) or not csv.strip()):
            raise ConfigError(f"data.csv must be a file name (relative to data.root), got {csv!r}")
        try:
            fractions = tuple(float(f) for f in check_fractions(_as_list(split, "data.split")))
        except ValueError as err:
            raise ConfigError(f"data.split={split!r}: {err}; e.g. [0.7, 0.1, 0.2]") from None
        if len(fractions) != len(SPLITS):
            raise ConfigError(
                f"data.split={split!r}: needs 3 fractions (train, val, test), e.g. [0.7, 0.1, 0.2]"
            )
        if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
            raise ConfigError(
                f"data.channels must be null (as the images are), 1 or 3, got {channels!r}"
            )
        if not isinstance(skip_bad, bool):
            raise ConfigError(f"data.skip_bad must be true or false, got {skip_bad!r}")
        if fit not in FIT_MODES:
            raise ConfigError(f"data.fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
        return cls(
            root=path,
            csv=csv.strip() if csv else None,
            fractions=fractions,
            split_seed=_integer(split_seed, "data.split_seed", low=0),
            channels=None if channels is None else int(channels),
            skip_bad=skip_bad,
            size=None if size is None else _integer(size, "data.size", low=8),
            fit=fit,
        )


@dataclass
class _Entry:
    """One listed image, before anything is read."""

    image: str  # path relative to root, with "/" separators: the sample's id in records
    label: str  # the label as written
    where: str = ""  # "line 7" for CSV rows: where the user finds it
    split: str | None = None  # the split as written (CSV column or split folder)
    patient: str | None = None


class FolderSource(DataSource):
    """A study folder of image files with labels from a CSV or from class sub-folders."""

    kind = "folder"

    def __init__(
        self,
        root: str,
        csv: str | None = DEFAULT_CSV,
        task: str | None = None,
        classes: list[str] | None = None,
        split: list[float] | tuple[float, ...] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        channels: int | None = None,
        skip_bad: bool = False,
        size: int | None = None,
        fit: str = "resize",
        name: str | None = None,
        dims: int | None = None,
    ) -> None:
        super().__init__()
        settings = FolderSettings.check(
            root, csv, split, split_seed, channels, skip_bad, size, fit, holds="your images"
        )
        if dims is not None and (isinstance(dims, bool) or dims not in (2, 3)):
            raise ConfigError(
                f"data.dims must be null (found from the files), 2 (images) or 3 (volumes), "
                f"got {dims!r}"
            )
        self.dims = dims
        self.spatial_dims = dims or 2
        self.root, self.csv, self.fractions = settings.root, settings.csv, settings.fractions
        self.split_seed, self.channels = settings.split_seed, settings.channels
        self.skip_bad, self.size, self.fit = settings.skip_bad, settings.size, settings.fit
        try:
            self.task_type = parse_task_type(task) if task is not None else None
        except ConfigError as err:
            raise ConfigError(f"data.task={task}: {err}") from None
        self.classes = _check_classes(classes, self.task_type)
        self.name = str(name) if name else (self.root.resolve().name or "folder")
        self.layout = self._detect_layout()  # lists folders only; no file is opened

        # what loading finds out (see describe / fingerprint / write_records)
        self.task = None
        self.method: str | None = None
        self.n_listed = 0
        self.skipped: list[dict] = []
        self._records: list[tuple[str, str, str, str]] = []  # image, split, label, patient
        self._stats: list[tuple[str, int, int]] = []  # image, bytes, mtime_ns
        self._has_patients = False
        self._split_column = False
        self._folder_classes: list[str] = []  # class folder names (an empty one is a class too)
        self._n_patients: dict[str, int] = {}
        self._channels: int | None = None

    # ------------------------------------------------------------------ layout
    def _detect_layout(self) -> str:
        """The layout ("csv", "split_folders" or "class_folders"), from the top level only."""
        if self.csv and (self.root / self.csv).is_file():
            return "csv"
        if self.csv and self.csv != DEFAULT_CSV:
            raise ConfigError(
                f"data.csv={self.csv}: no such file in {self.root} (it is relative to data.root)"
            )
        subdirs = _subfolders(self.root)
        if not subdirs:
            raise ConfigError(
                f"data.root={self.root}: found neither {self.csv or 'a labels CSV'} nor class "
                f"sub-folders. Use {_LAYOUT_HELP}"
            )
        split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_ALIASES]
        named = Counter(SPLIT_ALIASES[d.name.lower()] for d in split_dirs)
        if named["train"] and named["test"]:
            twice = [s for s, n in named.items() if n > 1]
            if twice:
                raise ConfigError(
                    f"data.root={self.root}: more than one folder is the {' and '.join(twice)} "
                    f"split ({', '.join(d.name for d in split_dirs)}); keep one folder per split"
                )
            others = [d.name for d in subdirs if d not in split_dirs]
            if others:
                raise ConfigError(
                    f"data.root={self.root}: holds split folders "
                    f"({', '.join(d.name for d in split_dirs)}) and other folders "
                    f"({', '.join(others)}); keep only train/val/test (each with class "
                    "sub-folders), or only class folders"
                )
            for d in split_dirs:
                if not _subfolders(d):
                    raise ConfigError(
                        f"{d}: a split folder needs one sub-folder per class holding its images"
                    )
            return "split_folders"
        return "class_folders"

    # ------------------------------------------------------------------ DataSource
    def _read_info(self) -> SourceInfo:
        self.load()  # channels are only known once every image is read
        return SourceInfo(
            name=self.name,
            task=self.task,
            channels=int(self._channels),
            size=self.size,
            spatial_dims=self.spatial_dims,
        )

    def _load(self) -> dict[str, Split]:
        """List, check, split, read, check again, assemble.

        Everything that needs no image (CSV rows, labels, missing files, the split, leakage,
        classes without training images) is checked before the long read, so a wrong setting
        fails in seconds. Per-file problems are collected over the whole listing, read
        failures included, and reported together: one run tells the user everything to fix.
        """
        entries = self._list_entries()
        if self.dims is None and self._finds_volumes(entries):
            log.info(
                "folder %s: found volumes (NIfTI / DICOM series); data.dims=2 to read "
                "images instead",
                self.root,
            )
            self.spatial_dims = 3
            if self.layout != "csv":  # a series folder is one entry, not one per slice file
                entries = self._list_entries()
        if self.size is None:
            self.size = 64 if self.spatial_dims == 3 else 128
        self.n_listed = len(entries)
        if not entries:
            raise DataError(f"{self._where()}: no images listed; {_LAYOUT_HELP}")
        problems: dict[int, str] = {}  # entry index -> what is wrong with it
        self._check_rows(entries, problems)
        classes, task_type, targets = self._labels(entries, problems)
        self.task = get_task(task_type, classes)
        multilabel = task_type == MULTILABEL
        log.info(
            "folder %s: %s layout, %d %s listed; task %s; classes: %s",
            self.root,
            self.layout,
            len(entries),
            "volumes" if self.spatial_dims == 3 else "images",
            task_type,
            ", ".join(classes),
        )
        stats = self._check_files(entries, problems)
        split_of = self._assign_splits(entries, problems, targets, multilabel)
        if self.skip_bad or not problems:  # fail fast, before the long read
            alive = [i for i in range(len(entries)) if i not in problems]
            self._check_dataset(entries, alive, split_of, targets, classes, multilabel)

        images = self._read_images(entries, problems)
        self._handle_problems(entries, problems)
        alive = [i for i in range(len(entries)) if i not in problems]
        self._channels = self._decide_channels(entries, alive, images)
        self._check_dataset(entries, alive, split_of, targets, classes, multilabel)
        self._warn_missing_classes(alive, split_of, targets, classes, multilabel)
        return self._assemble(entries, alive, split_of, targets, classes, images, stats)

    def describe(self) -> dict:
        splits: dict = {"method": self.method, "file": "splits.csv"}
        if self.method in ("stratified", "stratified_by_patient"):
            splits |= {"fractions": list(self.fractions), "seed": self.split_seed}
        if self._records:
            splits["sha256"] = self._split_digest()
        if self._has_patients:
            splits["n_patients"] = dict(self._n_patients)
        return {
            "root": str(self.root.resolve()),
            "layout": self.layout,
            "csv": self.csv if self.layout == "csv" else None,
            "n_listed": self.n_listed,
            "splits": splits,
            "skipped": list(self.skipped),
        }

    def fingerprint(self) -> str:
        """Digest of what a model trained on this data depends on: each image's id, label, split,
        size and modification time, and how images were fitted (size, fit, channels)."""
        self.load()
        h = hashlib.sha256()
        settings = {
            "size": self.size,
            "fit": self.fit,
            "channels": self._channels,
            "task": self.task.type,
            "classes": list(self.task.labels),
        }
        if self.spatial_dims == 3:
            settings["dims"] = 3
        h.update(json.dumps(settings, sort_keys=True).encode())
        stats = {image: (size, mtime) for image, size, mtime in self._stats}
        for image, split, label, _ in self._records:
            size, mtime = stats[image]
            h.update(f"{image}\t{label}\t{split}\t{size}\t{mtime}\n".encode())
        return h.hexdigest()[:16]

    def write_records(self, run_dir: Path) -> list[str]:
        """``splits.csv``: each image with its split and label (and patient), in listing order;
        the file is a labels CSV itself (``data.csv=...``) to reuse exactly this split."""
        self.load()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        header = ["image", "split", "label"] + (["patient_id"] if self._has_patients else [])
        with open(run_dir / "splits.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for image, split, label, patient in self._records:
                writer.writerow([image, split, label, patient][: len(header)])
        return ["splits.csv"]

    # ------------------------------------------------------------------ listing
    def _where(self) -> str:
        return str(self.root / self.csv) if self.layout == "csv" else str(self.root)

    def _list_entries(self) -> list[_Entry]:
        self._folder_classes = []
        if self.layout == "csv":
            return self._read_csv()
        if self.layout == "split_folders":
            entries = []
            for split_dir in _subfolders(self.root):
                entries += self._class_folder_entries(split_dir, split=split_dir.name)
            return entries
        return self._class_folder_entries(self.root, split=None)

    def _finds_volumes(self, entries: list[_Entry]) -> bool:
        """Whether the first listed entries (or, for class folders, the first items of the first
        class folders) are volumes: NIfTI files with 3 axes, DICOM series folders."""
        probe = [self.root / e.image for e in entries[:20] if e.image]
        if self.layout != "csv":
            classes = [c for split in self._top_folders() for c in _subfolders(split)][:3]
            probe += [p for c in classes for p in sorted(c.iterdir())[:5]]
        return any(volumes.is_volume_input(p) for p in probe)

    def _top_folders(self) -> list[Path]:
        return _subfolders(self.root) if self.layout == "split_folders" else [self.root]

    def _items(self, class_dir: Path) -> list[Path]:
        """A class folder's images, or its volumes (NIfTI files, series folders)."""
        if self.spatial_dims == 2:
            return _walk_images(class_dir)
        try:
            return volumes.list_volume_inputs(class_dir)
        except DataError:  # an empty class folder
            return []

    def _class_folder_entries(self, folder: Path, split: str | None) -> list[_Entry]:
        """One entry per supported file under each class sub-folder, sorted by path."""
        loose = [p.name for p in _files(folder) if is_supported(p)]
        if loose:
            log.warning(
                "%s: %d image(s) directly in the folder belong to no class and are ignored "
                "(e.g. %s); put them in a class sub-folder",
                folder,
                len(loose),
                ", ".join(loose[:3]),
            )
        entries = []
        for class_dir in _subfolders(folder):
            self._folder_classes.append(class_dir.name)
            for path in self._items(class_dir):
                image = path.relative_to(self.root).as_posix()
                entries.append(_Entry(image=image, label=class_dir.name, split=split))
        return sorted(entries, key=lambda e: e.image)

    def _read_csv(self) -> list[_Entry]:
        """The CSV's rows as entries (delimiter ``,``, ``;`` or tab; UTF-8, BOM allowed)."""
        path = self.root / self.csv
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: not UTF-8 text ({err}); save the CSV as UTF-8 (e.g. 'CSV UTF-8' in "
                "a spreadsheet program)"
            ) from None
        except OSError as err:
            raise DataError(f"{path}: cannot be read ({err})") from None
        lines = text.splitlines()
        if not lines or not lines[0].strip():
            raise DataError(f"{path}: is empty; it needs a header row image,label[,split]")
        delimiter = max(",;\t", key=lambda d: _header_score(lines[0], d))
        reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
        header = [h.strip().lower() for h in next(reader)]
        missing = [c for c in ("image", "label") if c not in header]
        if missing:
            raise DataError(
                f"{path}: the header has no {' or '.join(repr(c) for c in missing)} column "
                f"(found: {', '.join(repr(h) for h in header)}); the CSV needs columns "
                "image (path relative to the folder) and label, optionally split and patient_id"
            )
        has = {name: name in header for name in ("split", "patient_id")}

        def cell(row: list[str], name: str) -> str:
            i = header.index(name)
            return row[i].strip() if i < len(row) else ""

        entries = []
        for row in reader:
            if not any(c.strip() for c in row):
                continue  # blank line
            image = cell(row, "image").replace("\\", "/")
            entries.append(
                _Entry(
                    image=str(PurePosixPath(image)) if image else "",
                    label=cell(row, "label"),
                    where=f"line {reader.line_num}",
                    split=cell(row, "split") if has["split"] else None,
                    patient=(cell(row, "patient_id") or None) if has["patient_id"] else None,
                )
            )
        self._has_patients = has["patient_id"]
        self._split_column = has["split"]
        return entries

    # ------------------------------------------------------------------ checks
    def _check_rows(self, entries: list[_Entry], problems: dict[int, str]) -> None:
        """Empty or repeated image paths and unknown split values."""
        first: dict[str, str] = {}
        for i, e in enumerate(entries):
            if not e.image:
                problems[i] = "no image path"
                continue
            if e.image in first:
                problems[i] = f"listed again (first at {first[e.image] or 'an earlier entry'})"
                continue
            first[e.image] = e.where
            if e.split is not None:
                value = SPLIT_ALIASES.get(e.split.strip().lower())
                if value is None:
                    shown = repr(e.split) if e.split else "(empty)"
                    problems[i] = f"split {shown} is not train, val (valid) or test"
                else:
                    e.split = value

    def _labels(self, entries: list[_Entry], problems: dict[int, str]):
        """Class names, task type and each entry's target (class index, or list for
        multi-label); label problems go into ``problems``."""
        rows = [i for i in range(len(entries)) if i not in problems]
        raw = {i: entries[i].label for i in rows}
        multilabel = self.task_type == MULTILABEL or (
            self.task_type is None and any(MULTI_SEPARATOR in v for v in raw.values())
        )
        tokens: dict[int, list[str]] = {}
        for i, text in raw.items():
            parts = [t.strip() for t in text.split(MULTI_SEPARATOR)] if multilabel else [text]
            tokens[i] = [t for t in parts if t]
            if not multilabel and not tokens[i]:
                problems[i] = "no label"
            elif not multilabel and MULTI_SEPARATOR in text:
                problems[i] = (
                    f"label {text!r} names several classes but data.task is {self.task_type}"
                )

        if self.classes is not None:
            classes = list(self.classes)
        else:
            seen = [t for i, ts in tokens.items() if i not in problems for t in ts]
            if self.layout != "csv":  # every class folder is a class, even an empty one
                seen += self._folder_classes
            classes = _infer_classes(seen, self.task_type, self._where())
        task_type = self._task_type(classes, multilabel)

        index = {name: k for k, name in enumerate(classes)}
        targets: dict[int, object] = {}
        for i, ts in tokens.items():
            if i in problems:
                continue
            found, unknown = [], []
            for t in ts:
                k = index.get(t)
                if k is None and _INT.fullmatch(t) and int(float(t)) < len(classes):
                    k = int(float(t))  # an integer that is not a name is an index
                (unknown if k is None else found).append(t if k is None else k)
            if unknown:
                problems[i] = (
                    f"label {', '.join(repr(u) for u in unknown)} is not one of the classes "
                    f"({_short_list(classes)})"
                )
            else:
                targets[i] = sorted(set(found)) if multilabel else found[0]
        return tuple(classes), task_type, targets

    def _task_type(self, classes: list[str], multilabel: bool) -> str:
        k, where = len(classes), self._where()
        if self.task_type == BINARY and k != 2:
            raise DataError(
                f"{where}: data.task=binary needs exactly 2 classes, found {k} "
                f"({_short_list(classes)}); use data.task=multi-class or fix the labels"
            )
        if self.task_type is not None:
            return self.task_type
        if multilabel:
            return MULTILABEL
        if k < 2:
            raise DataError(
                f"{where}: only one class ({_short_list(classes)}) found; a classifier needs "
                "at least 2 classes (for multi-label data, join labels with '|' or set "
                "data.task=multi-label)"
            )
        return BINARY if k == 2 else MULTICLASS

    def _check_files(self, entries: list[_Entry], problems: dict[int, str]) -> dict:
        """Missing files (a cheap stat, before any image is read); sizes and times kept for the
        fingerprint."""
        stats = {}
        for i, e in enumerate(entries):
            if i in problems:
                continue
            path = self.root / e.image
            try:
                st = path.stat()
            except FileNotFoundError:
                problems[i] = "file not found"
                continue
            except OSError as err:
                problems[i] = f"cannot be read ({err.strerror or err})"
                continue
            if path.is_dir() and self.spatial_dims == 2:
                problems[i] = "is a folder, not an image file"
                continue
            stats[i] = (st.st_size, st.st_mtime_ns)
        return stats

    def _assign_splits(self, entries, problems, targets, multilabel) -> dict[int, str]:
        """Each usable entry's split: as given (column, folders) or a seeded stratified split.

        The generated split is made over every entry with a valid label, including files that
        turn out missing or unreadable, so fixing or skipping a file moves no other image.
        """
        usable = [i for i in range(len(entries)) if i in targets]
        patients = {i: entries[i].patient for i in usable if entries[i].patient}
        if self.layout == "split_folders":
            self.method = "folders"
        elif self._split_column:
            self.method = "column"
        else:
            self.method = "stratified_by_patient" if patients else "stratified"
        if self.method in ("folders", "column"):
            split_of = {i: entries[i].split for i in usable}
            self._check_leakage(entries, split_of, patients)
            return split_of
        if multilabel:
            labels = np.zeros((len(usable), len(self.task.labels)), dtype=np.int64)
            for row, i in enumerate(usable):
                labels[row, targets[i]] = 1
        else:
            labels = np.asarray([targets[i] for i in usable], dtype=np.int64)
        # group keys: the patient, else the image itself, so the split does not depend on the
        # order of the CSV's rows
        groups = [f"p:{patients[i]}" if i in patients else f"i:{entries[i].image}" for i in usable]
        chosen = stratified_split(
            labels, self.fractions, seed=self.split_seed, groups=groups, multilabel=multilabel
        )
        return {i: SPLITS[k] for i, k in zip(usable, chosen, strict=True)}

    def _check_leakage(self, entries, split_of: dict[int, str], patients: dict) -> None:
        """A given split may not put one patient's images in two splits."""
        where: dict[str, set[str]] = {}
        for i, patient in patients.items():
            where.setdefault(patient, set()).add(split_of[i])
        leaked = {p: s for p, s in where.items() if len(s) > 1}
        if leaked:
            shown = [
                f"{p} ({', '.join(s for s in SPLITS if s in splits)})"
                for p, splits in list(leaked.items())[:MAX_LISTED]
            ]
            more = len(leaked) - len(shown)
            raise DataError(
                f"{self._where()}: patient leakage: {len(leaked)} patient(s) have images in "
                f"more than one split: {', '.join(shown)}{f' and {more} more' if more else ''}. "
                "A model tested on a patient it was trained on scores too well; put each "
                "patient's images in one split (or drop the split column for a split grouped "
                "by patient_id)"
            )

    def _check_dataset(self, entries, alive, split_of, targets, classes, multilabel) -> None:
        """Problems of the dataset as a whole (not fixed by skipping files): an empty split, a
        class without a training example."""
        counts = {s: np.zeros(len(classes), dtype=np.int64) for s in SPLITS}
        sizes = Counter(split_of[i] for i in alive)
        for i in alive:
            counts[split_of[i]][targets[i]] += 1
        empty = [s for s in SPLITS if sizes[s] == 0]
        if empty:
            why = {
                "column": f"no row of {self.csv} has split {' or '.join(empty)}",
                "folders": f"there is no (non-empty) {' or '.join(empty)} folder",
            }.get(
                self.method,
                f"{sum(sizes.values())} images are too few for data.split={list(self.fractions)}",
            )
            raise DataError(
                f"{self._where()}: the {' and '.join(empty)} "
                f"{'split is' if len(empty) == 1 else 'splits are'} empty ({why}). medlite "
                "needs train, val (checkpoint selection) and test images; add images or change "
                "the split"
            )
        absent = [c for k, c in enumerate(classes) if counts["train"][k] == 0]
        if absent:
            what = "label has no positive" if multilabel else "class has no"
            hint = ""
            if "0" in absent and all(_INT.fullmatch(c) for c in classes):
                hint = (
                    " Integer labels are class indices starting at 0; if yours start at 1, "
                    "list the classes with data.classes=[...]"
                )
            raise DataError(
                f"{self._where()}: {len(absent)} {what} training image: "
                f"{_short_list(absent)} (in val/test: "
                + ", ".join(
                    f"{c} {int(counts['val'][classes.index(c)] + counts['test'][classes.index(c)])}"
                    for c in absent[:MAX_LISTED]
                )
                + "). A model cannot learn a class it never sees in training; add training "
                f"images, or leave the class out of the labels (data.classes).{hint}"
            )

    def _warn_missing_classes(self, alive, split_of, targets, classes, multilabel) -> None:
        for s in ("val", "test"):
            present = set()
            for i in alive:
                if split_of[i] == s:
                    present.update(targets[i] if multilabel else [targets[i]])
            absent = [c for k, c in enumerate(classes) if k not in present]
            if absent:
                log.warning(
                    "the %s split has no example of %s; their per-class metrics are undefined there",
                    s,
                    _short_list(absent),
                )

    # ------------------------------------------------------------------ reading
    def _read_images(self, entries, problems: dict[int, str]) -> dict[int, np.ndarray]:
        """Read, check and fit every listed file still without a problem."""
        todo = [i for i in range(len(entries)) if i not in problems]
        images: dict[int, np.ndarray] = {}
        if self.spatial_dims == 3:
            return self._read_volumes(entries, todo, problems)
        with _progress() as progress:
            bar = progress.add_task("reading images", total=len(todo))
            for i in todo:
                path = self.root / entries[i].image
                try:
                    image = read_image(path)
                except DataError as err:  # InputError names the file; keep only the reason
                    problems[i] = str(err).removeprefix(f"{path}: ")
                    progress.advance(bar)
                    continue
                if image.ndim == 3 and image.shape[2] == 1:
                    image = image[:, :, 0]
                if image.ndim == 3 and _equal_channels(image):
                    image = np.ascontiguousarray(image[:, :, 0])  # gray saved as RGB
                if image.ndim == 3 and self.channels == 1:
                    problems[i] = "colour image, but data.channels=1"
                else:
                    images[i] = fit_image(image, self.size, self.fit)
                progress.advance(bar)
        return images

    def _read_volumes(self, entries, todo, problems: dict[int, str]) -> dict[int, np.ndarray]:
        """Read and fit every volume still without a problem (one channel, as CT/MRI)."""
        out: dict[int, np.ndarray] = {}
        with _progress() as progress:
            bar = progress.add_task("reading volumes", total=len(todo))
            for i in todo:
                path = self.root / entries[i].image
                try:
                    out[i], _ = volumes.read_fitted(path, self.size, self.fit)
                except DataError as err:
                    problems[i] = str(err).removeprefix(f"{path}: ")
                progress.advance(bar)
        return out

    def _handle_problems(self, entries, problems: dict[int, str]) -> None:
        """One DataError listing the per-file problems, or (skip_bad) a logged skip list."""
        if not problems:
            return
        listed = [
            f"{entries[i].where + ': ' if entries[i].where else ''}"
            f"{entries[i].image or '(empty)'}: {problems[i]}"
            for i in sorted(problems)
        ]
        if not self.skip_bad:
            more = len(listed) - MAX_LISTED
            raise DataError(
                f"{self._where()}: {len(problems)} of {len(entries)} images have problems:\n  "
                + "\n  ".join(listed[:MAX_LISTED])
                + (f"\n  ... and {more} more" if more > 0 else "")
                + "\nfix them, or set data.skip_bad=true to skip these files"
            )
        self.skipped = [
            {"image": entries[i].image, "reason": problems[i]} for i in sorted(problems)
        ]
        more = len(listed) - MAX_LOGGED_SKIPS
        log.warning(
            "data.skip_bad=true: skipped %d of %d images (listed in results.json, "
            "data.skipped):\n  %s%s",
            len(problems),
            len(entries),
            "\n  ".join(listed[:MAX_LOGGED_SKIPS]),
            f"\n  ... and {more} more" if more > 0 else "",
        )

    def _decide_channels(self, entries, alive, images) -> int:
        """1 or 3 channels: as asked, else as the images are (mixed is an error)."""
        if self.spatial_dims == 3:
            if self.channels == 3:
                raise ConfigError("data.channels=3: volumes are single-channel; use null or 1")
            return 1
        if self.channels is not None:
            return self.channels
        colour = [i for i in alive if images[i].ndim == 3]
        gray = [i for i in alive if images[i].ndim == 2]
        if colour and gray:
            raise DataError(
                f"{self._where()}: the images mix grayscale ({len(gray)}, e.g. "
                f"{', '.join(entries[i].image for i in gray[:3])}) and colour ({len(colour)}, "
                f"e.g. {', '.join(entries[i].image for i in colour[:3])}); set data.channels=3 "
                "to read all as RGB (grayscale repeated), or data.channels=1 with "
                "data.skip_bad=true to leave the colour images out"
            )
        return 3 if colour else 1

    def _assemble(self, entries, alive, split_of, targets, classes, images, stats):
        """One uint8 array per split (stored images are freed as they are copied), labels,
        ids, and the records splits.csv and the fingerprint are made of."""
        multilabel = self.task.type == MULTILABEL
        shape = (self.size,) * self.spatial_dims + ((3,) if self._channels == 3 else ())
        out = {}
        for s in SPLITS:
            idx = [i for i in alive if split_of[i] == s]
            arr = np.empty((len(idx), *shape), dtype=np.uint8)
            for j, i in enumerate(idx):
                image = images.pop(i)
                arr[j] = image if image.ndim == len(shape) else image[:, :, None]
            if multilabel:
                labels = np.zeros((len(idx), len(classes)), dtype=np.int64)
                for j, i in enumerate(idx):
                    labels[j, targets[i]] = 1
            else:
                labels = np.asarray([targets[i] for i in idx], dtype=np.int64).reshape(-1, 1)
            extra = {"patient_id": [entries[i].patient for i in idx]} if self._has_patients else {}
            out[s] = Split(arr, labels, ids=[entries[i].image for i in idx], extra=extra)

        def label_text(i: int) -> str:
            if multilabel:
                return MULTI_SEPARATOR.join(classes[k] for k in targets[i])
            return classes[targets[i]]

        self._records = [
            (entries[i].image, split_of[i], label_text(i), entries[i].patient or "") for i in alive
        ]
        self._stats = [(entries[i].image, *stats[i]) for i in alive]
        if self._has_patients:
            self._n_patients = {
                s: len(
                    {entries[i].patient for i in alive if split_of[i] == s and entries[i].patient}
                )
                for s in SPLITS
            }
        log.info(
            "folder %s: %s split (%s)%s",
            self.name,
            self.method,
            ", ".join(f"{s} {len(out[s])}" for s in SPLITS),
            f"; {len(self.skipped)} skipped" if self.skipped else "",
        )
        return out

    def _split_digest(self) -> str:
        """sha256 of the (image, split) pairs, sorted by image: compares two runs' splits."""
        h = hashlib.sha256()
        for image, split in sorted((r[0], r[1]) for r in self._records):
            h.update(f"{image}\t{split}\n".encode())
        return h.hexdigest()


# ---------------------------------------------------------------------------------- helpers
def _as_list(value, key: str) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(
            f"{key} must be a list of 3 fractions, e.g. [0.7, 0.1, 0.2]; got {value!r}"
        )
    return list(value)


def _integer(value, key: str, low: int) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_classes(classes, task_type: str | None) -> tuple[str, ...] | None:
    """``data.classes``: null, or unique class names in index order."""
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise ConfigError(
            f"data.classes must be a list of class names (in index order), got {classes!r}; "
            "e.g. data.classes=[benign,malignant]"
        )
    names = [str(c).strip() for c in classes]
    if any(not n for n in names):
        raise ConfigError(f"data.classes has an empty name: {list(classes)}")
    if any(MULTI_SEPARATOR in n for n in names):
        raise ConfigError(f"data.classes names may not contain '{MULTI_SEPARATOR}': {names}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"data.classes lists {', '.join(repeated)} more than once: {names}")
    if task_type != MULTILABEL and len(names) < 2:
        raise ConfigError(f"data.classes needs at least 2 classes, got {names}")
    if task_type == BINARY and len(names) != 2:
        raise ConfigError(f"data.task=binary needs exactly 2 data.classes, got {len(names)}")
    return tuple(names)


def _infer_classes(tokens: list[str], task_type: str | None, where: str) -> list[str]:
    """Class names from the labels seen: integers mean indices 0..max, else sorted names."""
    unique = sorted(set(tokens))
    if not unique:
        raise DataError(f"{where}: no labels found; every image needs a label")
    if all(_INT.fullmatch(t) for t in unique):
        return [str(k) for k in range(max(int(float(t)) for t in unique) + 1)]
    if task_type == ORDINAL:
        odd = [t for t in unique if not _INT.fullmatch(t)]
        raise DataError(
            f"{where}: data.task=ordinal needs integer grades as labels (0, 1, 2, ...), found "
            f"{_short_list(odd)}; write the grades as integers, or list the grades in order "
            "with data.classes=[...]"
        )
    return unique


def _header_score(line: str, delimiter: str) -> int:
    cells = [c.strip().strip('"').lower() for c in line.split(delimiter)]
    return sum(c in ("image", "label") for c in cells) * 10 + len(cells)


def _short_list(names, limit: int = MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _subfolders(folder: Path) -> list[Path]:
    """Non-hidden immediate sub-folders, sorted (``__MACOSX`` zip debris left out)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX"
    )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _walk_images(folder: Path) -> list[Path]:
    """Supported image files under ``folder`` (recursively), hidden files and folders skipped."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(here) / name
            if not name.startswith(".") and is_supported(path):
                found.append(path)
    return found


def _equal_channels(image: np.ndarray) -> bool:
    return bool(
        np.array_equal(image[:, :, 0], image[:, :, 1])
        and np.array_equal(image[:, :, 0], image[:, :, 2])
    )


def _progress():
    """A transient rich progress bar on stderr, shown only when stderr is a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not sys.stderr.isatty(),
    )
