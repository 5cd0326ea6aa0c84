"""The folder source ("train on your own images"): BreastMNIST saved as PNGs reads and trains
identically to the official file; the three layouts; DICOM/NIfTI/PNG read alike; stratified and
patient-grouped splits; every bad input fails once with a clear message (or is skipped and
listed); multi-label and ordinal labels; records (splits.csv, describe, fingerprint)."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medlite.data.sources.folder import FolderSource
from medlite.data.transforms import fit_image
from medlite.errors import ConfigError, DataError
from medlite.pipeline import run
from medlite.tasks import BINARY, MULTICLASS, MULTILABEL, ORDINAL
from tests.helpers import make_cfg, subprocess_env, write_dicom

REPO = Path(__file__).resolve().parents[2]
SKIP_HINT = "fix them, or set data.skip_bad=true to skip these files"
FAST_RUN = ["trainer.max_epochs=2", "callbacks=none", "profile.enabled=false"]
# the CSV logger notes that splits.csv is already in the run folder (train.py silences it too)
pytestmark = pytest.mark.filterwarnings("ignore:.*Experiment logs directory.*")


# ---------------------------------------------------------------------------------- helpers
def _png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def _noise(rng: np.random.Generator, shape=(12, 12)) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _write_csv(root: Path, header: list[str], rows: list[list], name: str = "labels.csv"):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / name, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _csv_study(root: Path, labels: list[str], splits: list[str] | None = None, seed: int = 0):
    """PNG files img000.png ... with a labels.csv (and a split column when given)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, label in enumerate(labels):
        _png(root / "img" / f"img{k:03d}.png", _noise(rng))
        rows.append([f"img/img{k:03d}.png", label] + ([splits[k]] if splits else []))
    _write_csv(root, ["image", "label"] + (["split"] if splits else []), rows)
    return rows


def _class_folders(root: Path, counts: dict[str, int], shape=(12, 12), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        for k in range(n):
            _png(root / name / f"{name}_{k:03d}.png", _noise(rng, shape))


def _splits_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _error(source: FolderSource, exc=DataError) -> str:
    with pytest.raises(exc) as info:
        source.load()
    return str(info.value)


# ------------------------------------------------------------------- BreastMNIST as PNG files
@pytest.fixture(scope="module")
def breast_pngs(shared_data: Path, tmp_path_factory) -> Path:
    """BreastMNIST written as PNGs in official order with labels.csv (integer labels, split)."""
    root = tmp_path_factory.mktemp("breast_study")
    rows = []
    with np.load(shared_data / "breastmnist.npz") as npz:
        for split in ("train", "val", "test"):
            for k, (image, label) in enumerate(
                zip(npz[f"{split}_images"], npz[f"{split}_labels"], strict=True)
            ):
                name = f"{split}/{k:04d}.png"
                _png(root / name, image)
                rows.append([name, int(label[0]), split])
    _write_csv(root, ["image", "label", "split"], rows)
    return root


def test_breastmnist_pngs_read_identical_to_the_official_arrays(breast_pngs, shared_data):
    source = FolderSource(str(breast_pngs), size=28)
    splits = source.load()
    assert {s: len(v) for s, v in splits.items()} == {"train": 546, "val": 78, "test": 156}
    with np.load(shared_data / "breastmnist.npz") as npz:
        for s, data in splits.items():
            assert data.images.dtype == np.uint8 and data.images.shape[1:] == (28, 28)
            assert np.array_equal(data.images, npz[f"{s}_images"])
            assert np.array_equal(data.labels, npz[f"{s}_labels"])
            assert data.ids[:2] == [f"{s}/0000.png", f"{s}/0001.png"]
    info = source.info
    assert (info.task.type, info.task.labels) == (BINARY, ("0", "1"))
    assert (info.channels, info.size, info.name) == (1, 28, breast_pngs.name)
    record = source.describe()
    assert record["layout"] == "csv" and record["csv"] == "labels.csv"
    assert record["splits"]["method"] == "column" and "seed" not in record["splits"]
    assert record["skipped"] == []


def test_breastmnist_pngs_train_like_the_official_file(
    breast_pngs, shared_data, tmp_path, one_thread
):
    folder_out, official_out = tmp_path / "folder", tmp_path / "official"
    run(
        make_cfg(folder_out, ["data=folder", f"data.root={breast_pngs}", "data.size=28", *FAST_RUN])
    )
    run(
        make_cfg(
            official_out,
            [
                "data=breastmnist",
                f"paths.data_dir={shared_data}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                *FAST_RUN,
            ],
        )
    )
    folder = json.loads((folder_out / "results.json").read_text())
    official = json.loads((official_out / "results.json").read_text())
    assert folder["status"] == official["status"] == "ok"
    assert folder["test"] == official["test"]  # bit-identical training: equal test metrics
    assert folder["data"]["source"] == "folder" and folder["data"]["records"] == ["splits.csv"]
    assert folder["data"]["n_samples"] == official["data"]["n_samples"]

    rows = _splits_csv(folder_out / "splits.csv")
    with open(breast_pngs / "labels.csv", newline="") as f:
        listed = [
            {"image": r["image"], "split": r["split"], "label": r["label"]}
            for r in csv.DictReader(f)
        ]
    assert len(rows) == 780 and list(rows[0]) == ["image", "split", "label"]
    assert rows == listed  # the official split and labels, in the CSV's order


# ------------------------------------------------------------------------------- layouts
def test_class_folder_layout(tmp_path, caplog):
    root = tmp_path / "derm"
    _class_folders(root, {"benign": 20, "malignant": 10, "nevus": 8})
    _png(root / "benign" / "deeper" / "more" / "x.png", np.full((12, 12), 7, np.uint8))
    _png(root / "benign" / ".hidden.png", np.zeros((12, 12), np.uint8))  # ignored
    _png(root / ".cache" / "y.png", np.zeros((12, 12), np.uint8))  # not a class
    (root / "benign" / "notes.txt").write_text("not an image")  # ignored
    _png(root / "stray.png", np.zeros((12, 12), np.uint8))  # in no class: ignored, warned

    caplog.set_level(logging.INFO, logger="medlite.data.sources.folder")
    source = FolderSource(str(root), size=16)
    splits = source.load()
    assert source.info.task.type == MULTICLASS
    assert source.info.task.labels == ("benign", "malignant", "nevus")
    assert sum(len(s) for s in splits.values()) == 39
    assert all(s.images.shape[1:] == (16, 16) for s in splits.values())
    for s in splits.values():
        assert s.ids == sorted(s.ids)  # sorted paths within a split
    ids = [i for s in splits.values() for i in s.ids]
    assert "benign/deeper/more/x.png" in ids
    assert not any("hidden" in i or ".cache" in i or "stray" in i for i in ids)
    labels = np.concatenate([splits[s].labels.ravel() for s in ("train", "val", "test")])
    which = np.repeat([0, 1, 2], [len(splits[s]) for s in ("train", "val", "test")])
    for c, n in enumerate((21, 10, 8)):  # each class within one image of 70/10/20
        counts = np.bincount(which[labels == c], minlength=3)
        assert counts.sum() == n and np.all(np.abs(counts - np.array([0.7, 0.1, 0.2]) * n) < 1)
    record = source.describe()
    assert record["layout"] == "class_folders" and record["csv"] is None
    assert record["splits"] | {"sha256": None} == {
        "method": "stratified",
        "fractions": [0.7, 0.1, 0.2],
        "seed": 0,
        "file": "splits.csv",
        "sha256": None,
    }
    assert "class_folders layout" in caplog.text and "benign, malignant, nevus" in caplog.text
    assert "stray.png" in caplog.text  # the loose file is named in a warning


def test_split_folder_layout(tmp_path):
    root = tmp_path / "xray"
    for split, n in (("train", 6), ("Valid", 2), ("test", 3)):
        _class_folders(root / split, {"normal": n, "pneumonia": n + 1}, seed=n)
    source = FolderSource(str(root), size=12)
    splits = source.load()
    assert {s: len(v) for s, v in splits.items()} == {"train": 13, "val": 5, "test": 7}
    assert splits["val"].ids[0] == "Valid/normal/normal_000.png"
    assert source.describe()["layout"] == "split_folders"
    assert source.describe()["splits"]["method"] == "folders"
    assert source.info.task.type == BINARY


def test_integer_class_folders_sort_as_numbers(tmp_path):
    root = tmp_path / "grades"
    _class_folders(root, {str(k): 5 for k in range(11)})
    source = FolderSource(str(root), size=12, split=[0.6, 0.2, 0.2])
    assert source.info.task.labels == tuple(str(k) for k in range(11))  # not 0, 1, 10, 2, ...
    train = source.load()["train"]
    names = [i.split("/")[0] for i in train.ids]
    assert [int(n) for n in names] == train.labels.ravel().tolist()


# --------------------------------------------------------------------------- file formats
def test_dicom_nifti_and_png_read_identically(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "formats"
    originals = {}
    for cls in ("a", "b"):
        for k in range(6):
            image = _noise(rng, (16, 16))
            stem = root / cls / f"{cls}{k}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            kind = k % 4
            if kind == 0:
                path = _png(stem.with_suffix(".png"), image)
            elif kind == 1:
                path = write_dicom(stem.with_suffix(".dcm"), image)
            elif kind == 2:
                path = stem.with_suffix(".nii.gz")
                nib.save(nib.Nifti1Image(image.T, np.eye(4)), path)
            else:
                path = write_dicom(stem.parent / f"IM000{k}", image)  # bare DICOM export name
            originals[path.relative_to(root).as_posix()] = image
    splits = FolderSource(str(root), size=16).load()
    seen = 0
    for data in splits.values():
        for image, id_ in zip(data.images, data.ids, strict=True):
            assert np.array_equal(image, originals[id_]), id_
            seen += 1
    assert seen == len(originals) == 12


def test_images_of_other_sizes_are_fitted(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "sizes"
    big = {f"{c}/{k}.png": _noise(rng, (40, 30)) for c in "ab" for k in range(5)}
    for name, image in big.items():
        _png(root / name, image)
    for fit in ("resize", "pad"):
        splits = FolderSource(str(root), size=20, fit=fit).load()
        for data in splits.values():
            for image, id_ in zip(data.images, data.ids, strict=True):
                assert np.array_equal(image, fit_image(big[id_], 20, fit))


def test_channels_inferred_forced_and_mixed(tmp_path):
    rng = np.random.default_rng(3)
    colour = tmp_path / "colour"
    for c in "ab":
        for k in range(5):
            _png(colour / c / f"c{k}.png", _noise(rng, (12, 12, 3)))
    source = FolderSource(str(colour), size=12)
    assert source.info.channels == 3 and source.load()["train"].images.shape[1:] == (12, 12, 3)

    # gray saved as RGB (equal channels) counts as gray
    gray_rgb = tmp_path / "grayrgb"
    for c in "ab":
        for k in range(5):
            _png(gray_rgb / c / f"g{k}.png", np.repeat(_noise(rng)[:, :, None], 3, axis=2))
    source = FolderSource(str(gray_rgb), size=12)
    assert source.info.channels == 1 and source.load()["train"].images.shape[1:] == (12, 12)

    # one colour file among gray ones: mixed
    mixed = tmp_path / "mixed"
    grays = {}
    for c in "ab":
        for k in range(10):
            grays[f"{c}/g{k}.png"] = _png(mixed / c / f"g{k}.png", _noise(rng))
    _png(mixed / "a" / "colour.png", _noise(rng, (12, 12, 3)))
    message = _error(FolderSource(str(mixed), size=12))
    assert "grayscale (20, e.g. a/g0.png" in message and "colour (1, e.g. a/colour.png)" in message
    assert "set data.channels=3" in message

    forced = FolderSource(str(mixed), size=12, channels=3)
    splits = forced.load()
    assert forced.info.channels == 3
    for data in splits.values():
        assert data.images.shape[1:] == (12, 12, 3)
        for image, id_ in zip(data.images, data.ids, strict=True):
            if id_ in grays:
                gray = np.asarray(Image.open(grays[id_]))
                assert np.array_equal(image, np.repeat(gray[:, :, None], 3, axis=2))

    message = _error(FolderSource(str(mixed), size=12, channels=1))
    assert "a/colour.png: colour image, but data.channels=1" in message and SKIP_HINT in message
    only_gray = FolderSource(str(mixed), size=12, channels=1, skip_bad=True)
    assert sum(len(s) for s in only_gray.load().values()) == 20
    assert only_gray.describe()["skipped"] == [
        {"image": "a/colour.png", "reason": "colour image, but data.channels=1"}
    ]


# ----------------------------------------------------------------------------- splits
def _patient_study(root: Path, n_patients: int = 60, seed: int = 0, split: bool = False):
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    for p in range(n_patients):
        label = "malignant" if p % 3 == 0 else "benign"
        for _ in range(int(rng.integers(1, 5))):
            name = f"scans/{k:04d}.png"
            _png(root / name, _noise(rng))
            rows.append([name, label, f"PT-{p:03d}", "ignored column"])
            k += 1
    _write_csv(root, ["image", "label", "patient_id", "comment"], rows)
    return rows


def test_split_grouped_by_patient(tmp_path):
    root = tmp_path / "patients"
    rows = _patient_study(root)
    source = FolderSource(str(root), size=12)
    splits = source.load()
    where: dict[str, set] = {}
    for s, data in splits.items():
        for patient in data.extra["patient_id"]:
            where.setdefault(patient, set()).add(s)
    assert all(len(s) == 1 for s in where.values())  # no patient in two splits
    assert len(where) == 60 and sum(len(s) for s in splits.values()) == len(rows)
    sizes = np.array([len(splits[s]) for s in ("train", "val", "test")]) / len(rows)
    assert np.all(np.abs(sizes - [0.7, 0.1, 0.2]) < 0.06), sizes
    for c in (0, 1):
        per_class = [int((splits[s].labels == c).sum()) for s in ("train", "val", "test")]
        assert np.all(np.abs(np.array(per_class) / sum(per_class) - [0.7, 0.1, 0.2]) < 0.1)
    record = source.describe()["splits"]
    assert record["method"] == "stratified_by_patient"
    assert sum(record["n_patients"].values()) == 60

    out = tmp_path / "run"
    assert source.write_records(out) == ["splits.csv"]
    written = _splits_csv(out / "splits.csv")
    assert list(written[0]) == ["image", "split", "label", "patient_id"]
    assert [r["image"] for r in written] == [r[0] for r in rows]  # listing order
    assert all(r["patient_id"].startswith("PT-") for r in written)


def test_split_is_seeded_and_leaves_the_global_random_state_alone(tmp_path):
    root = tmp_path / "seeded"
    _class_folders(root, {"a": 30, "b": 20})

    def ids(seed: int) -> dict:
        src = FolderSource(str(root), size=12, split_seed=seed)
        return {s: d.ids for s, d in src.load().items()}, src.describe()["splits"]["sha256"]

    np.random.seed(0)
    torch.manual_seed(0)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first, digest = ids(0)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert ids(0) == (first, digest)
    other, other_digest = ids(1)
    assert other != first and other_digest != digest
    assert {s: len(v) for s, v in other.items()} == {s: len(v) for s, v in first.items()}


def test_csv_row_order_kept_and_split_independent_of_it(tmp_path):
    labels = ["x", "y"] * 15
    root = tmp_path / "ordered"
    rows = _csv_study(root, labels)
    first = FolderSource(str(root), size=12).load()
    for s, data in first.items():  # within a split, rows keep their CSV order
        positions = [[r[0] for r in rows].index(i) for i in data.ids]
        assert positions == sorted(positions), s
    _write_csv(root, ["image", "label"], rows[::-1])
    second = FolderSource(str(root), size=12).load()
    for s in first:
        assert sorted(first[s].ids) == sorted(second[s].ids)  # same split, rows reordered


# ------------------------------------------------------------------------------ labels
def test_multilabel_with_pipes(tmp_path):
    labels = ["effusion|nodule", "", "nodule", "effusion", "mass|nodule", "mass"] * 6
    root = tmp_path / "chest"
    _csv_study(root, labels)
    source = FolderSource(str(root), size=12)
    splits = source.load()
    assert source.info.task.type == MULTILABEL
    assert source.info.task.labels == ("effusion", "mass", "nodule")
    y = np.concatenate([splits[s].labels for s in splits])
    assert y.shape == (36, 3) and y.sum(axis=0).tolist() == [12, 12, 18]
    assert (y.sum(axis=1) == 0).sum() == 6  # "" = no finding
    out = tmp_path / "run"
    source.write_records(out)
    texts = {r["image"]: r["label"] for r in _splits_csv(out / "splits.csv")}
    assert texts["img/img000.png"] == "effusion|nodule" and texts["img/img001.png"] == ""


def test_multilabel_label_without_training_positive(tmp_path):
    labels = ["a|b"] * 6 + ["c|a"]
    splits = ["train"] * 4 + ["val", "test", "test"]
    _csv_study(tmp_path / "ml", labels, splits)
    message = _error(FolderSource(str(tmp_path / "ml"), size=12))
    assert "label has no positive training image: 'c'" in message


def test_ordinal_integer_grades(tmp_path):
    labels = [str(k % 4) for k in range(40)]
    _csv_study(tmp_path / "retina", labels)
    source = FolderSource(str(tmp_path / "retina"), size=12, task="ordinal")
    splits = source.load()
    assert source.info.task.type == ORDINAL
    assert source.info.task.labels == ("0", "1", "2", "3")
    assert sorted(np.unique(splits["train"].labels).tolist()) == [0, 1, 2, 3]

    _csv_study(tmp_path / "words", ["mild", "severe"] * 10)
    message = _error(FolderSource(str(tmp_path / "words"), size=12, task="ordinal"))
    assert "needs integer grades" in message and "'mild'" in message
    graded = FolderSource(
        str(tmp_path / "words"), size=12, task="ordinal", classes=["mild", "severe"]
    )
    assert graded.info.task.labels == ("mild", "severe")


def test_given_classes_fix_the_index_order_and_accept_indices(tmp_path):
    _csv_study(tmp_path / "s", ["malignant", "1", "benign", "0"] * 6)
    source = FolderSource(str(tmp_path / "s"), size=12, classes=["malignant", "benign"])
    splits = source.load()
    assert source.info.task.labels == ("malignant", "benign")
    for data in splits.values():
        for id_, label in zip(data.ids, data.labels.ravel(), strict=True):
            k = int(id_[-7:-4])
            assert label == (0 if k % 4 in (0, 3) else 1)


@pytest.mark.parametrize(
    "labels, kwargs, expected",
    [
        (["a", "b", "c"] * 8, {"task": "binary"}, "data.task=binary needs exactly 2 classes"),
        (["a"] * 10, {}, "only one class ('a') found"),
        (["1", "2"] * 10, {}, "labels are class indices starting at 0"),
    ],
)
def test_label_set_problems(tmp_path, labels, kwargs, expected):
    _csv_study(tmp_path / "s", labels)
    assert expected in _error(FolderSource(str(tmp_path / "s"), size=12, **kwargs))


# -------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"root": "missing_folder"}, "no such folder"),
        ({"root": "a_file.txt"}, "is a file, not a folder"),
        ({"root": None}, "data.root is required"),
        ({"split": [0.7, 0.3, 0.2]}, "sum to 1"),
        ({"split": [0.8, 0.2]}, "needs 3 fractions"),
        ({"split": [0.9, 0.1, 0.0]}, "> 0"),
        ({"split": 0.7}, "must be a list of 3 fractions"),
        ({"size": 4}, "data.size must be an integer >= 8"),
        ({"size": 28.5}, "data.size must be an integer >= 8"),
        ({"size": True}, "data.size must be an integer >= 8"),
        ({"channels": 2}, "data.channels must be null"),
        ({"task": "regression"}, "data.task=regression: unknown task type"),
        ({"classes": "benign"}, "data.classes must be a list"),
        ({"classes": ["a", "b", "a"]}, "lists a more than once"),
        ({"classes": ["a", "b", "c"], "task": "binary"}, "exactly 2 data.classes"),
        ({"fit": "crop"}, "data.fit must be one of resize, pad"),
        ({"skip_bad": "yes"}, "data.skip_bad must be true or false"),
        ({"split_seed": -1}, "data.split_seed must be an integer >= 0"),
        ({"csv": "mine.csv"}, "data.csv=mine.csv: no such file"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, kwargs, expected):
    root = tmp_path / "study"
    _class_folders(root, {"a": 2, "b": 2})
    (tmp_path / "a_file.txt").write_text("x")
    kwargs = {"root": str(root), **kwargs}
    if kwargs["root"] in ("missing_folder", "a_file.txt"):
        kwargs["root"] = str(tmp_path / kwargs["root"])
    with pytest.raises(ConfigError) as info:
        FolderSource(**kwargs)
    assert expected in str(info.value)


def test_neither_layout_explains_both(tmp_path):
    (tmp_path / "empty").mkdir()
    _png(tmp_path / "empty" / "loose.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ConfigError) as info:
        FolderSource(str(tmp_path / "empty"))
    message = str(info.value)
    assert "labels CSV" in message and "one sub-folder per class" in message


def test_split_folders_mixed_with_other_folders(tmp_path):
    for d in ("train/a", "test/a", "extra"):
        (tmp_path / "r" / d).mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"split folders \(test, train\) and other folders"):
        FolderSource(str(tmp_path / "r"))


def test_two_folders_for_one_split(tmp_path):
    for d in ("train/a", "val/a", "valid/a", "test/a"):
        (tmp_path / "r" / d).mkdir(parents=True)
    with pytest.raises(ConfigError, match="more than one folder is the val split"):
        FolderSource(str(tmp_path / "r"))


def test_csv_without_required_columns(tmp_path):
    _write_csv(tmp_path / "s", ["file", "diagnosis"], [["a.png", "x"]])
    message = _error(FolderSource(str(tmp_path / "s"), size=12))
    assert "no 'image' or 'label' column" in message and "'file', 'diagnosis'" in message


def _bad_study(root: Path) -> None:
    """A CSV study with one of each per-file problem among 24 good rows (29 rows in all)."""
    rng = np.random.default_rng(5)
    rows = []
    for k in range(24):
        name = f"ok/{k:02d}.png"
        _png(root / name, _noise(rng))
        rows.append([name, "a" if k % 2 else "b", ["train", "train", "val", "test"][k // 2 % 4]])
    (root / "ok" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _png(root / "ok" / "unknown_label.png", _noise(rng))
    _png(root / "ok" / "holdout.png", _noise(rng))
    rows.insert(3, ["ok/missing.png", "a", "train"])  # line 5
    rows.insert(7, ["ok/corrupt.png", "b", "train"])  # line 9
    rows.insert(10, ["ok/00.png", "a", "test"])  # line 12: listed again
    rows.append(["ok/unknown_label.png", "tumour", "train"])  # line 29
    rows.append(["ok/holdout.png", "a", "holdout"])  # line 30
    _write_csv(root, ["image", "label", "split"], rows)


def test_per_file_problems_fail_once_listing_each(tmp_path):
    root = tmp_path / "bad"
    _bad_study(root)
    message = _error(FolderSource(str(root), size=12, classes=["a", "b"]))
    assert message.count("\n") >= 6
    assert "5 of 29 images have problems" in message
    assert "line 5: ok/missing.png: file not found" in message
    assert "line 9: ok/corrupt.png: not a readable PNG image" in message
    assert "line 12: ok/00.png: listed again (first at line 2)" in message
    assert "line 29: ok/unknown_label.png: label 'tumour' is not one of the classes" in message
    assert "line 30: ok/holdout.png: split 'holdout' is not train, val (valid) or test" in message
    assert message.rstrip().endswith(SKIP_HINT)


def test_skip_bad_skips_and_lists(tmp_path, caplog):
    root = tmp_path / "bad"
    _bad_study(root)
    caplog.set_level(logging.WARNING)
    source = FolderSource(str(root), size=12, classes=["a", "b"], skip_bad=True)
    splits = source.load()
    assert sum(len(s) for s in splits.values()) == 24
    skipped = source.describe()["skipped"]
    assert [s["image"] for s in skipped] == [
        "ok/missing.png",
        "ok/corrupt.png",
        "ok/00.png",
        "ok/unknown_label.png",
        "ok/holdout.png",
    ]
    assert skipped[0]["reason"] == "file not found"
    assert skipped[1]["reason"].startswith("not a readable PNG image")
    for s in skipped:
        assert s["image"] in caplog.text
    assert "skipped 5 of 29 images" in caplog.text
    out = tmp_path / "run"
    source.write_records(out)
    assert len(_splits_csv(out / "splits.csv")) == 24


def test_many_problems_are_counted_not_all_listed(tmp_path):
    rows = [[f"gone/{k}.png", "a" if k % 2 else "b", "train"] for k in range(25)]
    _write_csv(tmp_path / "s", ["image", "label", "split"], rows)
    message = _error(FolderSource(str(tmp_path / "s"), size=12))
    assert "25 of 25 images have problems" in message and "... and 15 more" in message
    assert message.count("file not found") == 10


def test_class_without_training_example_fails_even_with_skip_bad(tmp_path):
    labels = ["a", "b"] * 6 + ["c", "c"]
    splits = ["train", "train", "val", "val", "test", "test"] * 2 + ["val", "test"]
    _csv_study(tmp_path / "s", labels, splits)
    for skip in (False, True):
        message = _error(FolderSource(str(tmp_path / "s"), size=12, skip_bad=skip))
        assert "1 class has no training image: 'c' (in val/test: c 2)" in message


def test_empty_split_from_the_column(tmp_path):
    _csv_study(tmp_path / "s", ["a", "b"] * 6, ["train", "train", "test", "test"] * 3)
    message = _error(FolderSource(str(tmp_path / "s"), size=12))
    assert "the val split is empty" in message and "no row of labels.csv has split val" in message


def test_split_folders_without_val(tmp_path):
    for split in ("train", "test"):
        _class_folders(tmp_path / "s" / split, {"a": 3, "b": 3})
    message = _error(FolderSource(str(tmp_path / "s"), size=12))
    assert "the val split is empty" in message and "no (non-empty) val folder" in message


def test_too_few_images_for_the_fractions(tmp_path):
    _class_folders(tmp_path / "s", {"a": 1, "b": 1})
    assert "the val and test splits are empty" in _error(FolderSource(str(tmp_path / "s"), size=12))


def test_patient_leakage_in_a_given_split(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "s"
    rows = []
    for p, split in enumerate(["train"] * 6 + ["val"] * 2 + ["test"] * 2):
        for k in range(2):
            name = f"p{p}_{k}.png"
            _png(root / name, _noise(rng))
            rows.append([name, "ab"[p % 2], f"PT-{p:03d}", split])
    rows[1][3] = "test"  # PT-000's second image in test, its first in train
    rows[19][3] = "val"  # PT-009: test and val
    _write_csv(root, ["image", "label", "patient_id", "split"], rows)
    message = _error(FolderSource(str(root), size=12))
    assert "patient leakage: 2 patient(s)" in message
    assert "PT-000 (train, test)" in message and "PT-009 (val, test)" in message


def test_warns_when_val_or_test_lacks_a_class(tmp_path, caplog):
    labels = ["a", "b"] * 6
    splits = ["train", "train", "val", "train", "test", "test"] * 2
    _csv_study(tmp_path / "s", labels, splits)
    caplog.set_level(logging.WARNING)
    FolderSource(str(tmp_path / "s"), size=12).load()
    assert "the val split has no example of 'b'" in caplog.text


# ------------------------------------------------------------------------------ records
def test_fingerprint_follows_files_and_settings(tmp_path):
    root = tmp_path / "s"
    _class_folders(root, {"a": 5, "b": 5})
    first = FolderSource(str(root), size=12).fingerprint()
    assert FolderSource(str(root), size=12).fingerprint() == first
    assert FolderSource(str(root), size=16).fingerprint() != first
    assert FolderSource(str(root), size=12, fit="pad").fingerprint() != first
    assert FolderSource(str(root), size=12, channels=3).fingerprint() != first
    path = root / "a" / "a_000.png"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert FolderSource(str(root), size=12).fingerprint() != first


# ------------------------------------------------------------------------------ pipeline
def test_class_weights_auto_recorded(tmp_path, one_thread):
    root = tmp_path / "imbalanced"
    _class_folders(root, {"a": 24, "b": 12, "c": 6}, shape=(28, 28))
    out = tmp_path / "run"
    run(
        make_cfg(
            out,
            [
                "data=folder",
                f"data.root={root}",
                "data.size=28",
                "loss.class_weights=auto",
                "trainer.max_epochs=1",
                "callbacks=none",
                "profile.enabled=false",
            ],
        )
    )
    results = json.loads((out / "results.json").read_text())
    rows = _splits_csv(out / "splits.csv")
    counts = np.array([sum(r["split"] == "train" and r["label"] == c for r in rows) for c in "abc"])
    assert counts.tolist() == results["data"]["class_counts"]["train"]
    assert counts[0] > counts[1] > counts[2] > 0
    expected = counts.sum() / (3 * counts)
    assert results["loss"]["class_weights"] == pytest.approx(expected.tolist(), rel=1e-6)
    assert results["data"]["splits"]["method"] == "stratified"


def test_pipeline_fails_on_bad_data_before_writing_anything(tmp_path):
    root = tmp_path / "bad"
    _bad_study(root)
    out = tmp_path / "run"
    with pytest.raises(DataError, match="5 of 29 images have problems"):
        run(
            make_cfg(
                out,
                [
                    "data=folder",
                    f"data.root={root}",
                    "data.classes=[a,b]",
                    "data.size=12",
                    *FAST_RUN,
                ],
            )
        )
    assert not (out / "splits.csv").exists() and not (out / "results.json").exists()


def test_train_py_on_bad_data_prints_one_error_and_leaves_no_run_dir(tmp_path):
    root = tmp_path / "bad"
    _bad_study(root)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "data=folder",
            f"data.root={root}",
            "data.size=12",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.log_dir={tmp_path}",
            *FAST_RUN,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(tmp_path),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("medlite: DataError") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ok/missing.png: file not found" in proc.stderr
    assert not (tmp_path / "run").exists()
