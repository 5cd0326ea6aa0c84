"""Your own segmentation data (``data=folder_seg``): an ``images/`` folder and a ``masks/`` folder.

Layout (``root`` is ``data.root``)::

    root/images/case01.dcm        root/masks/case01.png
    root/images/sub/case02.png    root/masks/sub/case02.nii.gz
    root/splits.csv               (optional)

Images are PNG, JPEG, BMP/TIFF, DICOM or 2D NIfTI, searched recursively. Each image's mask is
the file in ``masks/`` with the same relative path and name stem; its format may differ (a DICOM
image with a PNG or NIfTI mask). Masks hold class values, read without any rescaling
(:func:`medlite.data.readers.read_mask`):

* **binary** (default, ``data.classes`` null or two names): 0/1 or 0/255 per file. JPEG masks,
  whose compression scatters values near 0 and 255, are binarised at ``> 127``.
* **multi-class** (``data.classes=[background, a, b, ...]``, background first): mask value ``i``
  is class ``i``; any other value is an error (a lossy JPEG cannot hold class indices).

The optional CSV (``data.csv``, default ``splits.csv`` in ``root``; absent is fine) lists the
images to use, one row each, with a header: ``image`` (path relative to ``images/``) and
optionally ``mask`` (path relative to ``masks/``; default: matched by name), ``split``
(train / val / test) and ``patient_id``. Other columns are ignored; images it does not list are
left out. Every run writes such a ``splits.csv`` into its run folder, so a split can be frozen by
copying that file into ``root``.

Without a ``split`` column a seeded split by ``data.split`` is made with
:func:`medlite.data.splits.stratified_split`, grouped by patient when the CSV has ``patient_id``
(no patient in two splits) and stratified by which foreground classes each mask contains (so
images without any lesion, and rare classes, are spread over the splits). Because the strata
come from the masks, the split is made after reading, over the usable pairs.

The bad-input rules are those of the classification folder source
(:mod:`medlite.data.sources.folder`): a missing mask, a mask of another size than its image, a
mask value that is not a class, an unreadable file: all are collected and reported in one
:class:`~medlite.errors.DataError`, or skipped and listed with ``data.skip_bad=true``. Images and
masks are fitted to ``data.size`` once when read (masks nearest-neighbour, by the same geometry)
and kept in memory as uint8.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from medlite.data.readers import LOSSY_SUFFIXES, SUPPORTED_SUFFIXES, read_image, read_mask
from medlite.data.sources.base import SPLITS, DataSource, SourceInfo, Split
from medlite.data.sources.folder import (
    MAX_LISTED,
    MAX_LOGGED_SKIPS,
    SPLIT_ALIASES,
    FolderSettings,
    _equal_channels,
    _progress,
    _short_list,
    _walk_images,
)
from medlite.data.splits import stratified_split
from medlite.data.transforms import fit_image, fit_mask
from medlite.errors import ConfigError, DataError
from medlite.tasks import SEGMENTATION, get_task

log = logging.getLogger(__name__)

DEFAULT_CSV = "splits.csv"
BINARY_CLASSES = ("background", "foreground")
CSV_COLUMNS = ("image", "mask", "split", "patient_id")
_LAYOUT_HELP = (
    "data.root must hold an images/ folder and a masks/ folder; each image's mask has the same "
    "relative path and name (its file type may differ)"
)


@dataclass
class _Pair:
    """One image and its mask, before anything is read."""

    image: str  # path relative to images/, "/" separators: the sample's id in records
    mask: str | None = None  # path relative to masks/; None: not found
    where: str = ""  # "line 7" for CSV rows: where the user finds it
    split: str | None = None  # as written (CSV column)
    patient: str | None = None
    candidates: tuple[str, ...] = ()  # the masks whose name matches (when not named in the CSV)


class FolderSegSource(DataSource):
    """A study folder of images with their segmentation masks."""

    kind = "folder_seg"

    def __init__(
        self,
        root: str,
        csv: str | None = DEFAULT_CSV,
        classes: list[str] | None = None,
        split: list[float] | tuple[float, ...] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        channels: int | None = None,
        skip_bad: bool = False,
        size: int = 256,
        fit: str = "resize",
        name: str | None = None,
    ) -> None:
        super().__init__()
        settings = FolderSettings.check(
            root, csv, split, split_seed, channels, skip_bad, size, fit, holds="images/ and masks/"
        )
        self.root, self.csv, self.fractions = settings.root, settings.csv, settings.fractions
        self.split_seed, self.channels = settings.split_seed, settings.channels
        self.skip_bad, self.fit = settings.skip_bad, settings.fit
        self.size = settings.size or 256
        self.images_dir = _child(self.root, "images")
        self.masks_dir = _child(self.root, "masks")
        if self.csv and self.csv != DEFAULT_CSV and not (self.root / self.csv).is_file():
            raise ConfigError(
                f"data.csv={self.csv}: no such file in {self.root} (it is relative to data.root)"
            )
        self.classes = _check_classes(classes)
        self.name = str(name) if name else (self.root.resolve().name or "folder_seg")

        # what loading finds out (see describe / fingerprint / write_records)
        self.method: str | None = None
        self.n_listed = 0
        self.skipped: list[dict] = []
        self._use_csv = False
        self._has_patients = False
        self._split_column = False
        self._channels: int | None = None
        self._records: list[tuple[str, str, str, str]] = []  # image, mask, split, patient
        self._stats: dict[str, tuple] = {}  # image -> (image bytes, mtime, mask bytes, mtime)
        self._n_patients: dict[str, int] = {}

    # ------------------------------------------------------------------ DataSource
    def _read_info(self) -> SourceInfo:
        self.load()  # channels are only known once every image is read
        return SourceInfo(
            name=self.name,
            task=get_task(SEGMENTATION, self.classes),
            channels=int(self._channels),
            size=self.size,
        )

    def _load(self) -> dict[str, Split]:
        """List and check the pairs, read them, report problems once, split, assemble.

        What needs no pixel (missing masks, CSV rows, a given split's leakage and empty
        splits) is checked before the long read, so a wrong setting fails in seconds.
        """
        pairs = self._list_pairs()
        self.n_listed = len(pairs)
        if not pairs:
            raise DataError(f"{self._where()}: no images listed; {_LAYOUT_HELP}")
        problems: dict[int, str] = {}
        self._check_rows(pairs, problems)
        stats = self._check_files(pairs, problems)
        self._split_column = self._use_csv and any(p.split is not None for p in pairs)
        if self._split_column:
            self._check_given_split(pairs, problems)
        log.info(
            "folder_seg %s: %d image/mask pairs listed; classes: %s",
            self.root,
            len(pairs),
            ", ".join(self.classes),
        )
        images, masks, present = self._read_pairs(pairs, problems)
        self._report(pairs, problems)
        alive = [i for i in range(len(pairs)) if i not in problems]
        self._channels = self._decide_channels(pairs, alive, images)
        split_of = self._assign_splits(pairs, alive, present)
        self._check_dataset(alive, split_of, present)
        return self._assemble(pairs, alive, split_of, images, masks, stats)

    def original_masks(self, split: str) -> list[np.ndarray]:
        """The split's masks read again at their own size, as class indices (as when loading)."""
        data = self.load()[split]
        mask_of = {image: mask for image, mask, _, _ in self._records}
        out = []
        for image in data.ids:
            classes = self._class_values(read_mask(self.masks_dir / mask_of[image]), mask_of[image])
            if isinstance(classes, str):  # the file changed since it was loaded
                raise DataError(f"masks/{mask_of[image]}: {classes}")
            out.append(classes)
        return out

    def describe(self) -> dict:
        splits: dict = {"method": self.method, "file": "splits.csv"}
        if self.method in ("stratified", "stratified_by_patient"):
            splits |= {"fractions": list(self.fractions), "seed": self.split_seed}
        if self._records:
            h = hashlib.sha256()
            for image, _, split, _ in sorted(self._records):
                h.update(f"{image}\t{split}\n".encode())
            splits["sha256"] = h.hexdigest()
        if self._has_patients:
            splits["n_patients"] = dict(self._n_patients)
        binary = len(self.classes) == 2
        return {
            "root": str(self.root.resolve()),
            "layout": "images+masks",
            "csv": self.csv if self._use_csv else None,
            "classes": list(self.classes),
            "mask_values": (
                "binary: 0/1 or 0/255 (JPEG masks: > 127)"
                if binary
                else f"class index 0..{len(self.classes) - 1}"
            ),
            "n_listed": self.n_listed,
            "splits": splits,
            "skipped": list(self.skipped),
        }

    def fingerprint(self) -> str:
        """Digest of what a model trained on this data depends on: each pair's files, split,
        sizes and modification times, and how they were fitted (size, fit, channels, classes)."""
        self.load()
        h = hashlib.sha256()
        settings = {
            "size": self.size,
            "fit": self.fit,
            "channels": self._channels,
            "classes": list(self.classes),
        }
        h.update(json.dumps(settings, sort_keys=True).encode())
        for image, mask, split, _ in self._records:
            stat = "\t".join(str(v) for v in self._stats[image])
            h.update(f"{image}\t{mask}\t{split}\t{stat}\n".encode())
        return h.hexdigest()[:16]

    def write_records(self, run_dir: Path) -> list[str]:
        """``splits.csv``: each image with its mask and split (and patient), in listing order;
        copied into data.root it is the CSV that reuses exactly this split."""
        self.load()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        header = ["image", "mask", "split"] + (["patient_id"] if self._has_patients else [])
        with open(run_dir / "splits.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for record in self._records:
                writer.writerow(list(record)[: len(header)])
        return ["splits.csv"]

    # ------------------------------------------------------------------ listing
    def _where(self) -> str:
        return str(self.root / self.csv) if self._use_csv else str(self.root)

    def _list_pairs(self) -> list[_Pair]:
        """The pairs from the CSV (when there is one) or from images/; masks matched by name."""
        image_files = [
            p.relative_to(self.images_dir).as_posix() for p in sorted(_walk_images(self.images_dir))
        ]
        masks_by_key: dict[str, list[str]] = {}
        for p in sorted(_walk_images(self.masks_dir)):
            rel = p.relative_to(self.masks_dir).as_posix()
            masks_by_key.setdefault(_key(rel), []).append(rel)
        self._use_csv = bool(self.csv) and (self.root / self.csv).is_file()
        if self._use_csv:
            pairs = self._read_csv()
            listed = {p.image for p in pairs}
            left_out = [f for f in image_files if f not in listed]
            if left_out:
                log.warning(
                    "%s lists %d images; %d other image(s) in %s are left out (e.g. %s)",
                    self._where(),
                    len(pairs),
                    len(left_out),
                    self.images_dir,
                    ", ".join(left_out[:3]),
                )
        else:
            pairs = [_Pair(image=f) for f in sorted(image_files)]
        used_keys = set()
        for p in pairs:
            if p.mask is None and p.image:
                used_keys.add(_key(p.image))
                p.candidates = tuple(masks_by_key.get(_key(p.image), []))
                p.mask = p.candidates[0] if len(p.candidates) == 1 else None
        orphans = sorted(k for k in masks_by_key if k not in used_keys)
        if orphans and not self._use_csv:
            log.warning(
                "%s: %d mask(s) have no image of the same name and are ignored (e.g. %s)",
                self.masks_dir,
                len(orphans),
                ", ".join(masks_by_key[k][0] for k in orphans[:3]),
            )
        return pairs

    def _read_csv(self) -> list[_Pair]:
        """The CSV's rows (delimiter ``,``, ``;`` or tab; UTF-8, BOM allowed)."""
        path = self.root / self.csv
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err}); save the CSV as UTF-8") from None
        except OSError as err:
            raise DataError(f"{path}: cannot be read ({err})") from None
        lines = text.splitlines()
        if not lines or not lines[0].strip():
            raise DataError(f"{path}: is empty; it needs a header row image[,mask][,split]")

        def score(delimiter: str) -> int:
            cells = [c.strip().strip('"').lower() for c in lines[0].split(delimiter)]
            return sum(c in CSV_COLUMNS for c in cells) * 10 + len(cells)

        reader = csv.reader(lines, delimiter=max(",;\t", key=score))
        header = [h.strip().lower() for h in next(reader)]
        if "image" not in header:
            raise DataError(
                f"{path}: the header has no 'image' column (found: "
                f"{', '.join(repr(h) for h in header)}); columns: image (path relative to "
                "images/), optionally mask, split, patient_id. Set data.csv=null to ignore the file"
            )
        has = {c: c in header for c in CSV_COLUMNS}

        def cell(row: list[str], name: str) -> str:
            i = header.index(name)
            return row[i].strip() if i < len(row) else ""

        pairs = []
        for line, row in enumerate(reader, start=2):
            if not any(c.strip() for c in row):
                continue
            image = cell(row, "image").replace("\\", "/")
            mask = cell(row, "mask").replace("\\", "/") if has["mask"] else ""
            pairs.append(
                _Pair(
                    image=str(PurePosixPath(image)) if image else "",
                    mask=str(PurePosixPath(mask)) if mask else None,
                    where=f"line {line}",
                    split=cell(row, "split") if has["split"] else None,
                    patient=(cell(row, "patient_id") or None) if has["patient_id"] else None,
                )
            )
        self._has_patients = has["patient_id"]
        return pairs

    # ------------------------------------------------------------------ checks
    def _check_rows(self, pairs: list[_Pair], problems: dict[int, str]) -> None:
        """Empty or repeated paths, two images of one name, missing/ambiguous masks, bad
        split values."""
        first: dict[str, str] = {}
        by_key = Counter(_key(p.image) for p in pairs if p.image)
        for i, p in enumerate(pairs):
            if not p.image:
                problems[i] = "no image path"
            elif p.image in first:
                problems[i] = f"listed again (first at {first[p.image] or 'an earlier entry'})"
            elif by_key[_key(p.image)] > 1 and (p.candidates or p.mask is None):
                problems[i] = (
                    f"another image has the same name ({_key(p.image)}.*), so its mask is "
                    "ambiguous; rename one (or name the masks in the CSV's mask column)"
                )
            elif len(p.candidates) > 1:
                problems[i] = f"several masks match: {', '.join(p.candidates)}; keep one"
            elif p.mask is None:
                problems[i] = f"no mask: masks/{_key(p.image)}.* not found"
            if i in problems:
                continue
            first[p.image] = p.where
            if p.split is not None:
                value = SPLIT_ALIASES.get(p.split.strip().lower())
                if value is None:
                    shown = repr(p.split) if p.split else "(empty)"
                    problems[i] = f"split {shown} is not train, val (valid) or test"
                else:
                    p.split = value

    def _check_files(self, pairs: list[_Pair], problems: dict[int, str]) -> dict[int, tuple]:
        """Missing image or mask files (a cheap stat, before any pixel is read)."""
        stats = {}
        for i, p in enumerate(pairs):
            if i in problems:
                continue
            found = []
            for label, path in (
                ("image", self.images_dir / p.image),
                ("mask", self.masks_dir / p.mask),
            ):
                try:
                    st = path.stat()
                except OSError as err:
                    missing = isinstance(err, FileNotFoundError)
                    problems[i] = f"{label} file {'not found' if missing else 'cannot be read'}" + (
                        f" (masks/{p.mask})" if label == "mask" else ""
                    )
                    break
                if path.is_dir():
                    problems[i] = f"{label} is a folder, not a file"
                    break
                found += [st.st_size, st.st_mtime_ns]
            if i not in problems:
                stats[i] = tuple(found)
        return stats

    def _check_given_split(self, pairs: list[_Pair], problems: dict[int, str]) -> None:
        """A split column: every split used, no patient in two splits (before the long read)."""
        ok = [i for i in range(len(pairs)) if i not in problems]
        used = {pairs[i].split for i in ok}
        empty = [s for s in SPLITS if s not in used]
        if empty and (self.skip_bad or not problems):
            raise DataError(
                f"{self._where()}: no row has split {' or '.join(empty)}. medlite needs train, "
                "val (checkpoint selection) and test images; add rows or drop the split column "
                "for a seeded split"
            )
        where: dict[str, set[str]] = {}
        for i in ok:
            if pairs[i].patient:
                where.setdefault(pairs[i].patient, set()).add(pairs[i].split)
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

    # ------------------------------------------------------------------ reading
    def _read_pairs(self, pairs, problems):
        """Read, check and fit every pair still without a problem; for each, which foreground
        classes its (full-resolution) mask contains."""
        todo = [i for i in range(len(pairs)) if i not in problems]
        images: dict[int, np.ndarray] = {}
        masks: dict[int, np.ndarray] = {}
        present: dict[int, np.ndarray] = {}
        with _progress() as progress:
            bar = progress.add_task("reading images and masks", total=len(todo))
            for i in todo:
                p = pairs[i]
                problem = None
                try:
                    image = read_image(self.images_dir / p.image)
                    mask = read_mask(self.masks_dir / p.mask)
                except DataError as err:  # InputError names the file: keep that
                    problem = str(err).replace(str(self.root) + "/", "")
                else:
                    image = self._conform(image)
                    if isinstance(image, str):
                        problem = image
                    elif mask.shape != image.shape[:2]:
                        problem = (
                            f"mask masks/{p.mask} is {mask.shape[1]}x{mask.shape[0]} px but the "
                            f"image is {image.shape[1]}x{image.shape[0]}; a mask must have its "
                            "image's size"
                        )
                    else:
                        classes = self._class_values(mask, p.mask)
                        if isinstance(classes, str):
                            problem = classes
                if problem is None:
                    counts = np.bincount(classes.reshape(-1), minlength=len(self.classes))
                    present[i] = counts[1:] > 0
                    images[i] = fit_image(image, self.size, self.fit)
                    masks[i] = fit_mask(torch.from_numpy(classes), self.size, self.fit).numpy()
                else:
                    problems[i] = problem
                progress.advance(bar)
        return images, masks, present

    def _conform(self, image: np.ndarray) -> np.ndarray | str:
        """Gray stays gray, gray saved as RGB becomes gray; a problem text otherwise."""
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 3 and _equal_channels(image):
            image = np.ascontiguousarray(image[:, :, 0])
        if image.ndim == 3 and self.channels == 1:
            return "colour image, but data.channels=1"
        return image

    def _class_values(self, mask: np.ndarray, name: str) -> np.ndarray | str:
        """The mask's class indices (uint8), or a problem text (see the module docstring)."""
        k = len(self.classes)
        top = int(mask.max()) if mask.size else 0
        if top < 1 << 16:
            values = np.flatnonzero(np.bincount(mask.reshape(-1)))
        else:
            values = np.unique(mask)
        lossy = name.lower().endswith(LOSSY_SUFFIXES)
        if k == 2:
            if top <= 1:
                return mask.astype(np.uint8)
            if set(values.tolist()) <= {0, 255}:
                return (mask == 255).astype(np.uint8)
            if lossy:
                return (mask > 127).astype(np.uint8)
            return (
                f"mask values {_short_list(values.tolist(), 6)} are not binary (0/1 or 0/255); "
                "for several classes, list them with data.classes=[background, ...] "
                "(mask value i = class i)"
            )
        bad = values[values >= k].tolist()
        if bad:
            hint = "; JPEG compression changes mask values, save masks as PNG" if lossy else ""
            return (
                f"mask value(s) {_short_list(bad, 6)} are not classes: data.classes has {k} "
                f"(values 0..{k - 1}: {_short_list(self.classes, 6)}){hint}"
            )
        return mask.astype(np.uint8)

    def _report(self, pairs: list[_Pair], problems: dict[int, str]) -> None:
        """One DataError listing the per-pair problems, or (skip_bad) a logged skip list."""
        if not problems:
            return
        listed = [
            f"{pairs[i].where + ': ' if pairs[i].where else ''}"
            f"{pairs[i].image or '(empty)'}: {problems[i]}"
            for i in sorted(problems)
        ]
        if not self.skip_bad:
            more = len(listed) - MAX_LISTED
            raise DataError(
                f"{self._where()}: {len(problems)} of {len(pairs)} image/mask pairs have "
                "problems:\n  "
                + "\n  ".join(listed[:MAX_LISTED])
                + (f"\n  ... and {more} more" if more > 0 else "")
                + "\nfix them, or set data.skip_bad=true to skip these pairs"
            )
        self.skipped = [{"image": pairs[i].image, "reason": problems[i]} for i in sorted(problems)]
        more = len(listed) - MAX_LOGGED_SKIPS
        log.warning(
            "data.skip_bad=true: skipped %d of %d image/mask pairs (listed in results.json, "
            "data.skipped):\n  %s%s",
            len(problems),
            len(pairs),
            "\n  ".join(listed[:MAX_LOGGED_SKIPS]),
            f"\n  ... and {more} more" if more > 0 else "",
        )

    def _decide_channels(self, pairs, alive, images) -> int:
        """1 or 3 channels: as asked, else as the images are (mixed is an error)."""
        if self.channels is not None:
            return self.channels
        colour = [i for i in alive if images[i].ndim == 3]
        gray = [i for i in alive if images[i].ndim == 2]
        if colour and gray:
            raise DataError(
                f"{self._where()}: the images mix grayscale ({len(gray)}, e.g. "
                f"{', '.join(pairs[i].image for i in gray[:3])}) and colour ({len(colour)}, "
                f"e.g. {', '.join(pairs[i].image for i in colour[:3])}); set data.channels=3 "
                "to read all as RGB (grayscale repeated), or data.channels=1 with "
                "data.skip_bad=true to leave the colour images out"
            )
        return 3 if colour else 1

    # ------------------------------------------------------------------ split
    def _assign_splits(self, pairs, alive, present) -> dict[int, str]:
        """Each usable pair's split: as given (CSV column) or seeded, stratified by the
        foreground classes present and grouped by patient."""
        patients = {i: pairs[i].patient for i in alive if pairs[i].patient}
        if self._split_column:
            self.method = "column"
            return {i: pairs[i].split for i in alive}
        self.method = "stratified_by_patient" if patients else "stratified"
        if not alive:
            return {}
        labels = np.stack([present[i] for i in alive]).astype(np.int64)
        # group keys: the patient, else the image, so the split ignores the listing order
        groups = [f"p:{patients[i]}" if i in patients else f"i:{pairs[i].image}" for i in alive]
        chosen = stratified_split(
            labels, self.fractions, seed=self.split_seed, groups=groups, multilabel=True
        )
        return {i: SPLITS[k] for i, k in zip(alive, chosen, strict=True)}

    def _check_dataset(self, alive, split_of, present) -> None:
        """Problems of the dataset as a whole: an empty split, a class never in training."""
        sizes = Counter(split_of[i] for i in alive)
        empty = [s for s in SPLITS if sizes[s] == 0]
        if empty:
            why = (
                f"no usable row of {self.csv} has split {' or '.join(empty)}"
                if self.method == "column"
                else f"{len(alive)} usable pairs are too few for data.split={list(self.fractions)}"
            )
            raise DataError(
                f"{self._where()}: the {' and '.join(empty)} "
                f"{'split is' if len(empty) == 1 else 'splits are'} empty ({why}). medlite "
                "needs train, val (checkpoint selection) and test images; add images or change "
                "the split"
            )
        foreground = self.classes[1:]
        seen = {s: np.zeros(len(foreground), dtype=bool) for s in SPLITS}
        for i in alive:
            seen[split_of[i]] |= present[i]
        absent = [c for k, c in enumerate(foreground) if not seen["train"][k]]
        if absent:
            raise DataError(
                f"{self._where()}: no training mask contains {_short_list(absent)} (in val/test: "
                + ", ".join(
                    f"{c} {'yes' if seen['val'][k] or seen['test'][k] else 'no'}"
                    for k, c in enumerate(foreground)
                    if c in absent
                )
                + "). A model cannot learn a class it never sees in training; add training "
                "masks with it, or leave it out of data.classes"
            )
        for s in ("val", "test"):
            missing = [c for k, c in enumerate(foreground) if not seen[s][k]]
            if missing:
                log.warning(
                    "no %s mask contains %s; its Dice there only scores false alarms",
                    s,
                    _short_list(missing),
                )

    def _assemble(self, pairs, alive, split_of, images, masks, stats) -> dict[str, Split]:
        """One uint8 array per split for images and for masks; the records."""
        shape = (self.size, self.size) + ((3,) if self._channels == 3 else ())
        out = {}
        for s in SPLITS:
            idx = [i for i in alive if split_of[i] == s]
            arr = np.empty((len(idx), *shape), dtype=np.uint8)
            lab = np.empty((len(idx), self.size, self.size), dtype=np.uint8)
            for j, i in enumerate(idx):
                image = images.pop(i)
                arr[j] = image if image.ndim == len(shape) else image[:, :, None]
                lab[j] = masks.pop(i)
            extra = {"patient_id": [pairs[i].patient for i in idx]} if self._has_patients else {}
            out[s] = Split(arr, lab, ids=[pairs[i].image for i in idx], extra=extra)
        self._records = [
            (pairs[i].image, pairs[i].mask, split_of[i], pairs[i].patient or "") for i in alive
        ]
        self._stats = {pairs[i].image: stats[i] for i in alive}
        if self._has_patients:
            self._n_patients = {
                s: len({pairs[i].patient for i in alive if split_of[i] == s and pairs[i].patient})
                for s in SPLITS
            }
        log.info(
            "folder_seg %s: %s split (%s)%s",
            self.name,
            self.method,
            ", ".join(f"{s} {len(out[s])}" for s in SPLITS),
            f"; {len(self.skipped)} skipped" if self.skipped else "",
        )
        return out


# ---------------------------------------------------------------------------------- helpers
def _child(root: Path, name: str) -> Path:
    """``root/<name>`` (any case), or ConfigError explaining the layout."""
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.lower() == name:
            return p
    raise ConfigError(f"data.root={root}: has no {name}/ folder; {_LAYOUT_HELP}")


def _key(rel: str) -> str:
    """A file's path without its image suffix: what pairs an image with its mask
    (``a/b.dcm`` and ``a/b.nii.gz`` share ``a/b``)."""
    lower = rel.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return rel[: -len(suffix)]
    return rel  # a DICOM file without suffix


def _check_classes(classes) -> tuple[str, ...]:
    """``data.classes``: null (binary: background, foreground) or unique names, background
    first, at most 255 (masks are stored as uint8)."""
    if classes is None:
        return BINARY_CLASSES
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise ConfigError(
            f"data.classes must be a list of class names, background first (mask value i = "
            f"class i), got {classes!r}; e.g. data.classes=[background,benign,malignant]"
        )
    names = [str(c).strip() for c in classes]
    if any(not n for n in names):
        raise ConfigError(f"data.classes has an empty name: {list(classes)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"data.classes lists {', '.join(repeated)} more than once: {names}")
    if not 2 <= len(names) <= 255:
        raise ConfigError(
            f"data.classes needs the background and 1 to 254 classes, got {len(names)}: {names}"
        )
    return tuple(names)
