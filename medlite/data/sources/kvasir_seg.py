"""Kvasir-SEG (``data=kvasir_seg``): 1,000 colonoscopy images with polyp masks, official split.

Dataset: D. Jha, P. H. Smedsrud, M. A. Riegler, P. Halvorsen, T. de Lange, D. Johansen,
H. D. Johansen, *Kvasir-SEG: A Segmented Polyp Dataset*, MMM 2020 (doi:10.1007/978-3-030-37734-2_37).
Terms: research and educational use; commercial use needs the authors' written permission; cite
the paper. medlite ships no image, only the published split ids (``kvasir_seg_split.json``).

What the source does, and why:

* **Layout.** The official zip's: ``<root>/images/<id>.jpg`` and ``<root>/masks/<id>.jpg``
  (same file names). The authors publish no checksum, so completeness is checked instead: all
  1,000 ids of the split files must have an image and a mask of the same size, or one
  :class:`~medlite.errors.DataError` lists what is missing.
* **Split.** The authors' split (880 train ids, 120 "val" ids) is the one published results use.
  Their 120 held-out ids are medlite's **test** split, never used for model selection; the
  validation split (checkpoint selection) is carved from the 880 with a seeded random draw
  (``val_fraction``, ``split_seed``) that depends only on the ids, so it is the same on every
  machine and for every training seed.
* **Masks** are JPEGs (values near 0 and 255 after compression): binarised at ``> 127`` into
  background (0) and polyp (1).
* **Sizes vary** (332 to 1920 px wide): each image is fitted to ``size`` by ``fit`` as it is read
  (the mask by the same geometry, nearest-neighbour) and kept in memory as uint8.
* **Download** only on request (``download=true``) and only when the folder is missing: the zip
  goes to a temporary folder next to ``root`` and is extracted there, and the finished folder is
  renamed into place, so an interrupted download never leaves a half-filled ``root``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from medlite.data.medmnist import _content_length, _progress_bar
from medlite.data.readers import read_image, read_mask
from medlite.data.sources.base import SPLITS, DataSource, SourceInfo, Split
from medlite.data.sources.folder import _progress
from medlite.data.splits import stratified_split
from medlite.data.transforms import FIT_MODES, fit_image, fit_mask
from medlite.errors import ConfigError, DataError
from medlite.tasks import SEGMENTATION, get_task

log = logging.getLogger(__name__)

URL = "https://datasets.simula.no/downloads/kvasir-seg.zip"
PAGE = "https://datasets.simula.no/kvasir-seg/"
LABELS = ("background", "polyp")
N_PAIRS = 1000
THRESHOLD = 127  # mask pixels above this are polyp
SPLIT_FILE = "kvasir_seg_split.json"
LICENSE = (
    "Kvasir-SEG terms of use: research and educational purposes only; commercial use is "
    "forbidden without prior written permission of the authors; publications using it must "
    "cite the dataset paper"
)
CITATION = (
    "D. Jha, P. H. Smedsrud, M. A. Riegler, P. Halvorsen, T. de Lange, D. Johansen, "
    "H. D. Johansen. Kvasir-SEG: A Segmented Polyp Dataset. MultiMedia Modeling (MMM 2020), "
    "LNCS 11962, pp. 451-462. doi:10.1007/978-3-030-37734-2_37"
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CHUNK = 1 << 20
MAX_LISTED = 10


def official_split() -> dict[str, list[str]]:
    """The authors' split ids, shipped with medlite: ``{"train": [880 ids], "test": [120 ids]}``
    (the authors call the 120 "val"; they are medlite's held-out test set)."""
    text = resources.files("medlite.data.sources").joinpath(SPLIT_FILE).read_text("utf-8")
    data = json.loads(text)
    return {"train": list(data["train"]), "test": list(data["test"])}


class KvasirSegSource(DataSource):
    """Kvasir-SEG from its official folder layout, with the official test split."""

    kind = "kvasir_seg"

    def __init__(
        self,
        root: str | None = None,
        data_dir: str = "~/.medmnist",
        size: int = 256,
        fit: str = "resize",
        val_fraction: float = 0.1,
        split_seed: int = 0,
        download: bool = False,
        timeout: float = 30.0,
    ) -> None:
        super().__init__()
        if root is not None and not str(root).strip():
            raise ConfigError("data.root must be the Kvasir-SEG folder (or null for the default)")
        self.root = Path(str(root) if root is not None else Path(data_dir) / "Kvasir-SEG")
        self.root = self.root.expanduser()
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
            raise ConfigError(f"data.size must be an integer >= 8, got {size!r}")
        self.size = int(size)
        if fit not in FIT_MODES:
            raise ConfigError(f"data.fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
        self.fit = fit
        ok = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
        if not ok or not 0 < val_fraction < 1:
            raise ConfigError(
                f"data.val_fraction must be a number in (0, 1): the share of the 880 official "
                f"training images kept for validation, e.g. 0.1; got {val_fraction!r}"
            )
        self.val_fraction = float(val_fraction)
        n_train = len(official_split()["train"])
        if round(n_train * self.val_fraction) < 1 or round(n_train * self.val_fraction) >= n_train:
            raise ConfigError(
                f"data.val_fraction={val_fraction} leaves no image for validation or for training "
                f"(of the {n_train} official training ids); e.g. 0.1"
            )
        if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)):
            raise ConfigError(f"data.split_seed must be an integer >= 0, got {split_seed!r}")
        if split_seed < 0:
            raise ConfigError(f"data.split_seed must be an integer >= 0, got {split_seed!r}")
        self.split_seed = int(split_seed)
        if not isinstance(download, bool):
            raise ConfigError(f"data.download must be true or false, got {download!r}")
        self.download = download
        self.timeout = float(timeout)
        self._split_of: dict[str, str] = {}  # id -> split, in the official files' order
        self._files: dict[str, tuple[str, str]] = {}  # id -> (image name, mask name)
        self._stats: dict[str, tuple[int, int]] = {}  # id -> (image bytes, mask bytes)

    # ------------------------------------------------------------------ DataSource
    def _read_info(self) -> SourceInfo:
        return SourceInfo(
            name="kvasir_seg",
            task=get_task(SEGMENTATION, LABELS),
            channels=3,
            size=self.size,
        )

    def _load(self) -> dict[str, Split]:
        self._ensure_folder()
        official = official_split()
        self._split_of = self.assign_splits(official)
        self._files = self._find_pairs(list(self._split_of))
        out = {}
        for split in SPLITS:
            ids = [i for i in self._split_of if self._split_of[i] == split]
            out[split] = Split(
                np.zeros((len(ids), self.size, self.size, 3), dtype=np.uint8),
                np.zeros((len(ids), self.size, self.size), dtype=np.uint8),
                ids=[self._files[i][0] for i in ids],
            )
        self._read_into(out)
        log.info(
            "Kvasir-SEG %s: %s (test: the authors' 120 held-out ids; val: %.0f%% of their 880 "
            "training ids, seed %d). %s",
            self.root,
            ", ".join(f"{s} {len(out[s])}" for s in SPLITS),
            100 * self.val_fraction,
            self.split_seed,
            LICENSE,
        )
        return out

    def original_masks(self, split: str) -> list[np.ndarray]:
        """The split's masks read again at their own size, binarised as when loading."""
        data = self.load()[split]
        mask_of = dict(self._files.values())
        return [
            (read_mask(self.root / "masks" / mask_of[name]) > THRESHOLD).astype(np.uint8)
            for name in data.ids
        ]

    def describe(self) -> dict:
        return {
            "root": str(self.root.resolve()),
            "url": URL,
            "license": LICENSE,
            "citation": CITATION,
            "n_pairs": len(self._split_of) or None,
            "mask_threshold": f"> {THRESHOLD}",
            "fit": self.fit,
            "splits": {
                "method": "official_test_seeded_val",
                "official": "DebeshJha/Kvasir-SEG Data-split: train.txt (880 ids), val.txt "
                "(120 ids, used as test)",
                "val_fraction": self.val_fraction,
                "seed": self.split_seed,
                "file": "splits.csv",
                "sha256": self._split_digest() if self._split_of else None,
            },
        }

    def fingerprint(self) -> str:
        """Settings, the split and each file's name and byte size (the authors publish no
        checksum; the sizes change when a file is replaced or re-encoded)."""
        self.load()
        h = hashlib.sha256()
        settings = {"size": self.size, "fit": self.fit, "threshold": THRESHOLD}
        h.update(json.dumps(settings, sort_keys=True).encode())
        for i, split in self._split_of.items():
            image, mask = self._files[i]
            h.update(
                f"{image}\t{mask}\t{split}\t{self._stats[i][0]}\t{self._stats[i][1]}\n".encode()
            )
        return h.hexdigest()[:16]

    def write_records(self, run_dir: Path) -> list[str]:
        """``splits.csv``: each image file name with its split (train / val / test)."""
        self.load()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "splits.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "split"])
            for i, split in self._split_of.items():
                writer.writerow([self._files[i][0], split])
        return ["splits.csv"]

    # ------------------------------------------------------------------ split
    def assign_splits(self, official: dict[str, list[str]]) -> dict[str, str]:
        """id -> split: official test ids are test; the training ids are split into train and
        val by a seeded draw that depends only on the ids (not their order) and the seed."""
        train_ids = official["train"]
        chosen = stratified_split(
            [0] * len(train_ids),
            (1 - self.val_fraction, self.val_fraction),
            seed=self.split_seed,
            groups=train_ids,
        )
        split_of = {i: ("train", "val")[k] for i, k in zip(train_ids, chosen, strict=True)}
        if "val" not in split_of.values():
            raise ConfigError(f"data.val_fraction={self.val_fraction} leaves no validation image")
        split_of |= {i: "test" for i in official["test"]}
        return split_of

    def _split_digest(self) -> str:
        h = hashlib.sha256()
        for i in sorted(self._split_of):
            h.update(f"{i}\t{self._split_of[i]}\n".encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ files
    def _ensure_folder(self) -> None:
        """The folder exists, or is downloaded (on request), or one error says how to get it."""
        if self.root.is_dir():
            return
        if self.root.exists():
            raise DataError(f"data.root={self.root} is a file; it must be the Kvasir-SEG folder")
        if not self.download:
            raise DataError(
                f"Kvasir-SEG not found: {self.root} does not exist. Download {URL} (page: {PAGE}) "
                f"and unzip it so that {self.root / 'images'} and {self.root / 'masks'} hold the "
                "1,000 images and masks, or point data.root (or paths.data_dir) at your copy, or "
                "set data.download=true to let medlite download it. Terms: " + LICENSE
            )
        self._download_and_extract()

    def _download_and_extract(self) -> None:
        """Download the official zip into a temporary folder next to ``root``, extract it there
        and rename the extracted folder to ``root``; on any failure nothing is left behind."""
        parent = self.root.parent
        fix = (
            f"Download {URL} by hand (page: {PAGE}) and unzip it so that {self.root}/images and "
            f"{self.root}/masks exist, or point data.root at a copy."
        )
        try:
            parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.part-", dir=parent))
        except OSError as err:
            raise DataError(
                f"cannot download Kvasir-SEG into {parent}: the folder cannot be created or "
                f"written ({err}). {fix}"
            ) from None
        try:
            archive = work / "kvasir-seg.zip"
            log.info("downloading Kvasir-SEG from %s to %s (%s)", URL, self.root, LICENSE)
            n_bytes = self._fetch(archive, fix)
            extracted = work / "extracted"
            try:
                with zipfile.ZipFile(archive) as zf:
                    bad = [n for n in zf.namelist() if _unsafe_member(n)]
                    if bad:
                        raise DataError(
                            f"the archive from {URL} has entries outside its folder ({bad[0]}); "
                            f"it was not extracted. {fix}"
                        )
                    zf.extractall(extracted)
            except zipfile.BadZipFile as err:
                raise DataError(
                    f"the file downloaded from {URL} ({n_bytes} bytes) is not a zip archive "
                    f"({err}); the server may have returned an error page. Nothing was saved. "
                    + fix
                ) from None
            found = _dataset_folder(extracted)
            if found is None:
                raise DataError(
                    f"the archive from {URL} has no images/ and masks/ folders; it may have "
                    f"changed. Nothing was saved. {fix}"
                )
            try:
                os.replace(found, self.root)
            except OSError as err:
                if not self.root.is_dir():  # (else another process finished first: use its copy)
                    raise DataError(
                        f"cannot move the extracted Kvasir-SEG into {self.root} ({err}). {fix}"
                    ) from None
            log.info("Kvasir-SEG saved in %s", self.root)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _fetch(self, target: Path, fix: str) -> int:
        """Stream the zip to ``target``; offline or cut off: one DataError naming URL and folder."""
        n_bytes = 0
        try:
            with (
                open(target, "wb") as out,
                urllib.request.urlopen(URL, timeout=self.timeout) as resp,
            ):
                total = _content_length(resp)
                with _progress_bar("Downloading Kvasir-SEG", total) as advance:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        out.write(chunk)
                        n_bytes += len(chunk)
                        advance(len(chunk))
        except Exception as err:  # URLError, HTTPError, timeouts, resets, a full disk ...
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            raise DataError(
                f"Kvasir-SEG is not in {self.root} and could not be downloaded from {URL}: "
                f"{reason} ({type(err).__name__}; no network, or the server is unreachable). "
                f"Nothing was saved. {fix}"
            ) from None
        if total is not None and n_bytes != total:
            raise DataError(
                f"the download from {URL} was cut off after {n_bytes} of {total} bytes. Nothing "
                f"was saved. {fix}"
            )
        return n_bytes

    def _find_pairs(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        """id -> (image file name, mask file name); every missing file in one DataError."""
        found = {}
        for sub in ("images", "masks"):
            folder = self.root / sub
            if not folder.is_dir():
                nested = [p.parent for p in self.root.glob(f"*/{sub}") if p.is_dir()]
                hint = f" (found {nested[0]}: set data.root={nested[0].parent})" if nested else ""
                raise DataError(
                    f"{self.root}: has no {sub}/ folder{hint}. data.root must be the unzipped "
                    f"Kvasir-SEG folder holding images/ and masks/ (from {URL})"
                )
            found[sub] = {
                p.stem: p.name
                for p in sorted(folder.iterdir())
                if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
            }
        missing = {sub: [i for i in ids if i not in found[sub]] for sub in found}
        if any(missing.values()):
            parts = [
                f"{len(miss)} {sub[:-1]}(s) missing from {self.root / sub}: "
                + ", ".join(miss[:MAX_LISTED])
                + (f" and {len(miss) - MAX_LISTED} more" if len(miss) > MAX_LISTED else "")
                for sub, miss in missing.items()
                if miss
            ]
            raise DataError(
                f"Kvasir-SEG in {self.root} is incomplete ({len(ids)} image/mask pairs expected, "
                "the ids of the official split): " + "; ".join(parts) + ". Unzip the official "
                f"archive again ({URL}) or set data.root to a complete copy"
            )
        extra = sorted(set(found["images"]) - set(ids))
        if extra:
            log.warning(
                "%s: %d image(s) not in the official split are ignored (e.g. %s)",
                self.root / "images",
                len(extra),
                ", ".join(extra[:3]),
            )
        return {i: (found["images"][i], found["masks"][i]) for i in ids}

    def _read_into(self, out: dict[str, Split]) -> None:
        """Read, check, binarise and fit every pair into its split's arrays (filled in place:
        no second copy of the dataset); unreadable or mismatched pairs are collected and
        reported together."""
        id_of = {image: i for i, (image, _) in self._files.items()}
        slot = {id_of[name]: (data, j) for data in out.values() for j, name in enumerate(data.ids)}
        problems = []
        with _progress() as progress:
            bar = progress.add_task("reading Kvasir-SEG", total=len(self._files))
            for i, (image_name, mask_name) in self._files.items():
                image_path = self.root / "images" / image_name
                mask_path = self.root / "masks" / mask_name
                try:
                    self._stats[i] = (image_path.stat().st_size, mask_path.stat().st_size)
                    image = read_image(image_path)
                    mask = read_mask(mask_path)
                except (DataError, OSError) as err:
                    problems.append(str(err))
                    progress.advance(bar)
                    continue
                if image.shape[:2] != mask.shape:
                    problems.append(
                        f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image "
                        f"is {image.shape[1]}x{image.shape[0]}"
                    )
                else:
                    if image.ndim == 2:
                        image = np.repeat(image[:, :, None], 3, axis=2)
                    data, j = slot[i]
                    data.images[j] = fit_image(image, self.size, self.fit)
                    binary = torch.from_numpy((mask > THRESHOLD).astype(np.uint8))
                    data.labels[j] = fit_mask(binary, self.size, self.fit).numpy()
                progress.advance(bar)
        if problems:
            more = len(problems) - MAX_LISTED
            raise DataError(
                f"Kvasir-SEG in {self.root}: {len(problems)} of {len(self._files)} pairs cannot "
                "be used:\n  "
                + "\n  ".join(problems[:MAX_LISTED])
                + (f"\n  ... and {more} more" if more > 0 else "")
                + f"\nreplace these files from the official archive ({URL})"
            )


def _unsafe_member(name: str) -> bool:
    """An archive entry that would land outside the extraction folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def _dataset_folder(folder: Path) -> Path | None:
    """The extracted folder holding images/ and masks/: ``folder`` itself or one level down."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / "images").is_dir() and (candidate / "masks").is_dir():
            return candidate
    return None
