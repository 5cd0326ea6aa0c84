"""The segmentation folder source (``data=folder_seg``): image/mask pairs in PNG, DICOM and NIfTI
(mask values never rescaled), binary and multi-class masks, every bad pair reported once (or
skipped and listed), patient-grouped and given splits, records, and one tiny training run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medlite.data.readers import InputError, read_mask
from medlite.data.sources.folder_seg import FolderSegSource
from medlite.errors import ConfigError, DataError
from medlite.pipeline import run
from tests.helpers import make_cfg, write_dicom

pytestmark = pytest.mark.filterwarnings("ignore:.*Experiment logs directory.*")
SKIP_HINT = "fix them, or set data.skip_bad=true to skip these pairs"


# ---------------------------------------------------------------------------------- helpers
def _save(path: Path, array: np.ndarray) -> Path:
    """PNG/JPEG/TIFF through Pillow, NIfTI (rows along y, as read_image reads it), DICOM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(array.T, np.eye(4)), path)
    elif name.endswith(".dcm"):
        write_dicom(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def _blob(rng: np.random.Generator, shape=(16, 16), value: int = 1) -> np.ndarray:
    """A mask with one rectangle of ``value`` (never empty)."""
    mask = np.zeros(shape, dtype=np.uint8)
    h, w = shape
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[top : top + h // 3 + 1, left : left + w // 3 + 1] = value
    return mask


def _study(root: Path, n: int = 20, seed: int = 0, shape=(16, 16), scale: int = 255) -> Path:
    """Gray PNG images whose content is their mask (image = mask * 255), masks 0/scale."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        mask = _blob(rng, shape)
        _save(root / "images" / f"case{k:02d}.png", mask * 255)
        _save(root / "masks" / f"case{k:02d}.png", (mask * scale).astype(np.uint8))
    return root


def _write_csv(root: Path, header: list[str], rows: list[list], name: str = "splits.csv"):
    with open(root / name, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _error(source: FolderSegSource, exc=DataError) -> str:
    with pytest.raises(exc) as err:
        source.load()
    return str(err.value)


# ----------------------------------------------------------------------------- basic pairs
def test_png_pairs_binary_masks_aligned_and_split(tmp_path):
    root = _study(tmp_path / "study", n=20)
    for k in range(0, 20, 2):  # half the masks saved as 0/1 instead of 0/255
        path = root / "masks" / f"case{k:02d}.png"
        _save(path, (np.asarray(Image.open(path)) > 0).astype(np.uint8))
    source = FolderSegSource(root=str(root), size=16)
    splits = source.load()
    assert {s: len(v) for s, v in splits.items()} == {"train": 14, "val": 2, "test": 4}
    for split in splits.values():
        assert split.labels.dtype == np.uint8 and set(np.unique(split.labels)) <= {0, 1}
        assert split.images.shape == (len(split), 16, 16)
        assert np.array_equal(split.images > 127, split.labels.astype(bool))  # aligned
    info = source.info
    assert info.task.kind == "segmentation" and info.task.labels == ("background", "foreground")
    assert info.channels == 1 and info.name == "study"
    d = source.describe()
    assert d["splits"]["method"] == "stratified" and d["layout"] == "images+masks"
    assert d["csv"] is None and d["classes"] == ["background", "foreground"]


@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_non_square_pairs_fitted_alike(tmp_path, fit):
    root = _study(tmp_path / "wide", n=10, shape=(24, 40))
    splits = FolderSegSource(root=str(root), size=32, fit=fit, split=[0.6, 0.2, 0.2]).load()
    images = np.concatenate([s.images for s in splits.values()])
    masks = np.concatenate([s.labels for s in splits.values()])
    agree = ((images > 127) == masks.astype(bool)).mean()
    assert agree > 0.97  # bilinear image vs nearest mask: only edge pixels may differ
    if fit == "pad":  # black bars of the image are background bars of the mask
        assert (images[:, :4] == 0).all() and (masks[:, :4] == 0).all()


def test_dicom_nifti_and_16_bit_masks_keep_their_values(tmp_path):
    root = tmp_path / "mixed"
    rng = np.random.default_rng(1)
    classes = ["background", "liver", "tumour"]
    expected = {}
    for k in range(12):
        mask = _blob(rng, (16, 16), value=1)
        mask[rng.integers(0, 16), :] = 2  # a row of tumour in every mask
        image = (mask.astype(np.uint16) * 1500 + 100).astype(np.uint16)
        stem = f"c{k:02d}"
        if k % 3 == 0:  # DICOM image (16-bit), PNG mask
            _save(root / "images" / f"{stem}.dcm", image)
            _save(root / "masks" / f"{stem}.png", mask)
        elif k % 3 == 1:  # PNG image, NIfTI int16 mask
            _save(root / "images" / f"{stem}.png", (mask * 120 + 10).astype(np.uint8))
            _save(root / "masks" / f"{stem}.nii.gz", mask.astype(np.int16))
        else:  # NIfTI image (float), 16-bit PNG mask
            _save(root / "images" / f"{stem}.nii.gz", image.astype(np.float32))
            _save(root / "masks" / f"{stem}.png", mask.astype(np.uint16))
        expected[f"{stem}"] = mask
    source = FolderSegSource(root=str(root), classes=classes, size=16, split=[0.5, 0.25, 0.25])
    splits = source.load()
    for split in splits.values():
        for image, mask, name in zip(split.images, split.labels, split.ids, strict=True):
            assert np.array_equal(mask, expected[name.split(".")[0]])
            assert np.array_equal(image > 127, mask > 0)  # image and mask share orientation
    assert source.info.task.labels == tuple(classes)
    assert source.describe()["mask_values"] == "class index 0..2"


def test_read_mask_never_rescales(tmp_path):
    values = np.array([[0, 1, 2], [3, 2, 1]], dtype=np.uint16)
    assert np.array_equal(read_mask(_save(tmp_path / "m16.png", values)), values)
    assert np.array_equal(
        read_mask(_save(tmp_path / "m.nii.gz", values.astype(np.float32))), values
    )
    palette = Image.fromarray(values.astype(np.uint8), mode="L").convert("P")
    palette.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png").max() <= 3
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    with pytest.raises(InputError, match="colour mask"):
        read_mask(_save(tmp_path / "rgb.png", rgb))
    with pytest.raises(InputError, match="fractional"):
        read_mask(_save(tmp_path / "f.nii.gz", np.full((3, 3), 0.5, np.float32)))
    with pytest.raises(InputError, match="negative"):
        read_mask(_save(tmp_path / "n.nii.gz", np.full((3, 3), -1, np.int16)))


# -------------------------------------------------------------------------- bad inputs
def _bad_study(root: Path) -> None:
    """20 good pairs and one of each problem."""
    _study(root, n=20)
    _save(root / "images" / "nomask.png", np.zeros((16, 16), np.uint8))
    _save(root / "images" / "small.png", np.zeros((16, 16), np.uint8))
    _save(root / "masks" / "small.png", np.zeros((12, 16), np.uint8))
    _save(root / "images" / "gray.png", np.zeros((16, 16), np.uint8))
    _save(root / "masks" / "gray.png", np.full((16, 16), 128, np.uint8))
    (root / "images" / "broken.png").write_bytes(b"not a png at all")
    _save(root / "masks" / "broken.png", np.zeros((16, 16), np.uint8))
    _save(root / "images" / "twice.png", np.zeros((16, 16), np.uint8))
    _save(root / "masks" / "twice.png", np.zeros((16, 16), np.uint8))
    _save(root / "masks" / "twice.nii.gz", np.zeros((16, 16), np.uint8))


def test_every_bad_pair_is_reported_once(tmp_path):
    root = tmp_path / "bad"
    _bad_study(root)
    message = _error(FolderSegSource(root=str(root), size=16))
    assert "5 of 25 image/mask pairs have problems" in message and SKIP_HINT in message
    assert "nomask.png: no mask: masks/nomask.* not found" in message
    assert "small.png: mask masks/small.png is 16x12 px but the image is 16x16" in message
    assert "gray.png: mask values 128 are not binary (0/1 or 0/255)" in message
    assert "broken.png: images/broken.png: not a readable PNG image" in message
    assert "twice.png: several masks match: twice.nii.gz, twice.png" in message


def test_skip_bad_skips_and_lists(tmp_path):
    root = tmp_path / "bad"
    _bad_study(root)
    source = FolderSegSource(root=str(root), size=16, skip_bad=True)
    splits = source.load()
    assert sum(len(s) for s in splits.values()) == 20
    skipped = {s["image"] for s in source.describe()["skipped"]}
    assert skipped == {"nomask.png", "small.png", "gray.png", "broken.png", "twice.png"}


def test_multiclass_value_outside_the_classes(tmp_path):
    root = _study(tmp_path / "mc", n=10)  # masks 0/255
    message = _error(FolderSegSource(root=str(root), size=16, classes=["bg", "a", "b"]))
    assert "mask value(s) 255 are not classes: data.classes has 3 (values 0..2" in message


def test_jpeg_masks_are_binarised_at_127(tmp_path):
    root = _study(tmp_path / "jpg", n=10)
    for path in (root / "masks").glob("*.png"):
        Image.fromarray(np.asarray(Image.open(path))).convert("RGB").save(
            path.with_suffix(".jpg"), quality=70
        )
        path.unlink()
    splits = FolderSegSource(root=str(root), size=16, split=[0.6, 0.2, 0.2]).load()
    masks = np.concatenate([s.labels for s in splits.values()])
    images = np.concatenate([s.images for s in splits.values()])
    assert set(np.unique(masks)) == {0, 1}
    assert ((images > 127) == masks.astype(bool)).mean() > 0.98


def test_class_without_training_mask_fails(tmp_path):
    root = _study(tmp_path / "rare", n=10, scale=1)
    rng = np.random.default_rng(3)
    _save(root / "masks" / "case09.png", _blob(rng, value=2))  # the only "b" mask
    rows = [
        [f"case{k:02d}.png", "test" if k == 9 else ("val" if k == 8 else "train")]
        for k in range(10)
    ]
    _write_csv(root, ["image", "split"], rows)
    message = _error(FolderSegSource(root=str(root), size=16, classes=["bg", "a", "b"]))
    assert "no training mask contains 'b'" in message


@pytest.mark.parametrize(
    ("setup", "kwargs", "expected"),
    [
        ("no_masks", {}, "has no masks/ folder"),
        ("ok", {"classes": ["only"]}, "background and 1 to 254 classes"),
        ("ok", {"csv": "other.csv"}, "data.csv=other.csv: no such file"),
        ("ok", {"split": [0.5, 0.5]}, "needs 3 fractions"),
        ("ok", {"channels": 2}, "data.channels"),
        ("ok", {"fit": "crop"}, "data.fit"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, setup, kwargs, expected):
    root = _study(tmp_path / "s", n=4)
    if setup == "no_masks":
        shutil.rmtree(root / "masks")
    with pytest.raises(ConfigError, match=expected):
        FolderSegSource(root=str(root), **kwargs)


# -------------------------------------------------------------------------------- splits
def test_split_grouped_by_patient(tmp_path):
    root = _study(tmp_path / "patients", n=60)
    rows = [[f"case{k:02d}.png", f"p{k // 3:02d}"] for k in range(60)]
    _write_csv(root, ["image", "patient_id"], rows)
    source = FolderSegSource(root=str(root), size=16)
    splits = source.load()
    where: dict[str, set] = {}
    for name, split in splits.items():
        for patient in split.extra["patient_id"]:
            where.setdefault(patient, set()).add(name)
    assert len(where) == 20 and all(len(s) == 1 for s in where.values())
    d = source.describe()
    assert d["splits"]["method"] == "stratified_by_patient"
    assert sum(d["splits"]["n_patients"].values()) == 20


def test_given_split_with_leakage_fails_before_reading(tmp_path):
    root = _study(tmp_path / "leak", n=6)
    rows = [
        ["case00.png", "train", "p1"],
        ["case01.png", "test", "p1"],
        ["case02.png", "val", "p2"],
        ["case03.png", "train", "p3"],
    ]
    _write_csv(root, ["image", "split", "patient_id"], rows)
    assert "patient leakage: 1 patient(s)" in _error(FolderSegSource(root=str(root), size=16))


def test_csv_names_masks_and_records_reproduce_the_split(tmp_path):
    root = tmp_path / "named"
    rng = np.random.default_rng(5)
    for k in range(12):
        mask = _blob(rng)
        _save(root / "images" / f"img{k}.png", mask * 255)
        _save(root / "masks" / f"img{k}_seg.png", mask)  # another name: given in the CSV
    rows = [[f"img{k}.png", f"img{k}_seg.png", ("train", "val", "test")[k % 3]] for k in range(12)]
    _write_csv(root, ["image", "mask", "split"], rows)
    _save(root / "images" / "extra.png", np.zeros((16, 16), np.uint8))  # not listed: left out
    source = FolderSegSource(root=str(root), size=16)
    splits = source.load()
    assert {s: len(v) for s, v in splits.items()} == {"train": 4, "val": 4, "test": 4}
    assert source.describe()["splits"]["method"] == "column"
    out = tmp_path / "run"
    assert source.write_records(out) == ["splits.csv"]
    records = _rows(out / "splits.csv")
    assert records[0] == {"image": "img0.png", "mask": "img0_seg.png", "split": "train"}

    # a generated split, frozen by copying the run's splits.csv into the folder
    plain = _study(tmp_path / "plain", n=20)
    first = FolderSegSource(root=str(plain), size=16)
    first.load()
    first.write_records(tmp_path / "run1")
    shutil.copy(tmp_path / "run1" / "splits.csv", plain / "splits.csv")
    again = FolderSegSource(root=str(plain), size=16, split_seed=7)  # seed no longer matters
    again.load()
    assert again.describe()["splits"]["sha256"] == first.describe()["splits"]["sha256"]
    assert again.describe()["splits"]["method"] == "column"
    assert first.fingerprint() == again.fingerprint()  # same files, same split, same settings
    _save(plain / "masks" / "case03.png", np.zeros((16, 16), np.uint8))
    changed = FolderSegSource(root=str(plain), size=16)
    assert changed.fingerprint() != first.fingerprint()


# ------------------------------------------------------------------------ through training
def test_tiny_training_run(tmp_path, one_thread):
    root = _study(tmp_path / "tiny", n=20, shape=(40, 40))
    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        [
            "data=folder_seg",
            f"data.root={root}",
            "data.size=32",
            "model=unet",
            "model.kwargs.channels=[8,16,32]",
            "model.kwargs.strides=[2,2]",
            "trainer.max_epochs=1",
            "callbacks=none",
            "profile.enabled=false",
        ],
    )
    assert cfg.model.name == "unet" and cfg.teacher.name == "unet"  # set by the data option
    run(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["kind"] == "segmentation"
    assert "dice" in results["test"]
    assert results["data"]["source"] == "folder_seg" and results["data"]["records"] == [
        "splits.csv"
    ]
    assert len(_rows(out / "splits.csv")) == 20


# ---------------------------------------------------------------------------------- original size
class _Oracle(torch.nn.Module):
    """Predicts exactly the image's content (images here are their masks times 255)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = x.mean(dim=1, keepdim=True)  # normalised: -1 for background, +1 for foreground
        return torch.cat([-fg, fg], dim=1) * 10


@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_scoring_at_the_original_size_maps_predictions_back(tmp_path, fit):
    """Non-square 90x60 masks stored at 32 px: a model that is right at 32 px is right at the
    files' own size too (up to the resampling of thin edges) once its map goes back through the
    same resize or pad; scoring the 32 px map against the wrong region would not come close."""
    from medlite.compress.evaluate import evaluate_at_original_size
    from medlite.data.datamodule import DataModule

    root = _study(tmp_path / "study", n=30, shape=(90, 60))
    dm = DataModule(FolderSegSource(str(root), size=32, fit=fit), fit=fit)
    dm.setup()
    originals = dm.source.original_masks("test")
    assert [m.shape for m in originals] == [(90, 60)] * len(dm.splits["test"])
    assert all(set(np.unique(m)) <= {0, 1} for m in originals)
    scores = evaluate_at_original_size(_Oracle(), dm)
    assert scores["dice"] > 0.93 and scores["iou"] > 0.87
    shifted = [np.roll(m, 6, axis=1) for m in originals]  # what a misplaced map would score
    pairs = list(zip(originals, shifted, strict=True))
    assert dm.task.metrics_of_pairs(pairs)["dice"] < scores["dice"] - 0.1


def test_original_size_scores_land_in_results(tmp_path):
    root = _study(tmp_path / "study", n=20, shape=(48, 40))
    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        [
            "data=folder_seg",
            f"data.root={root}",
            "data.size=32",
            "model=unet",
            "model.kwargs.channels=[8,16,32]",
            "model.kwargs.strides=[2,2]",
            "trainer.max_epochs=1",
            "callbacks=none",
            "profile.enabled=false",
            "eval.original_size=true",
        ],
    )
    run(cfg)
    results = json.loads((out / "results.json").read_text())
    scores = results["test_original_size"]
    assert set(scores) == {"dice", "iou", "hd95"} and 0.0 <= scores["dice"] <= 1.0
