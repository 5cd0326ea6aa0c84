"""The folder source on volumes: NIfTI files in class folders and DICOM series folders named by a
labels CSV are found as volumes, read bit-exactly, fitted to data.size³, and a broken series is
listed with the other problems."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medlite.data.sources.folder import FolderSource
from medlite.errors import ConfigError, DataError
from tests.helpers import write_series


def save_nifti(array: np.ndarray, path: Path) -> Path:
    """Saved so that medlite reads ``array`` back as it is (see medlite.data.volumes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    return path


def lesion_volumes(n: int, size: int = 28, seed: int = 0):
    """Bright blobs of two sizes: class 1 volumes hold the larger one."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3).astype(np.float32) - size / 2
    radius = np.sqrt((grid**2).sum(0))
    vols, labels = [], []
    for i in range(n):
        label = i % 2
        r = 4 + 4 * label + rng.uniform(-1, 1)
        vol = np.clip(60 + 150 * (radius < r) + rng.normal(0, 10, radius.shape), 0, 255)
        vols.append(vol.astype(np.uint8))
        labels.append(label)
    return vols, labels


def test_class_folders_of_nifti_volumes_read_bit_exact(tmp_path):
    vols, labels = lesion_volumes(20)
    names = {}
    for i, (vol, label) in enumerate(zip(vols, labels, strict=True)):
        cls = ["small", "large"][label]
        names[f"{cls}/case{i:02d}.nii.gz"] = vol
        save_nifti(vol, tmp_path / cls / f"case{i:02d}.nii.gz")
    src = FolderSource(str(tmp_path), size=28, split=[0.6, 0.2, 0.2])
    splits = src.load()
    assert src.info.spatial_dims == 3 and src.info.channels == 1 and src.info.size == 28
    assert src.info.task.labels == ("large", "small")
    seen = 0
    for data in splits.values():
        assert data.images.shape[1:] == (28, 28, 28) and data.images.dtype == np.uint8
        for image, vol_id, label in zip(data.images, data.ids, data.labels, strict=True):
            assert np.array_equal(image, names[vol_id])  # no resampling at the stored size
            assert src.info.task.labels[int(label[0])] in vol_id
            seen += 1
    assert seen == 20


def test_volume_size_defaults_to_64_and_fits(tmp_path):
    vols, _ = lesion_volumes(10)
    for i, vol in enumerate(vols):
        save_nifti(vol, tmp_path / ("a" if i % 2 else "b") / f"v{i}.nii")
    src = FolderSource(str(tmp_path))
    splits = src.load()
    assert src.size == 64 and splits["train"].images.shape[1:] == (64, 64, 64)


def test_csv_of_dicom_series_folders_and_a_broken_series(tmp_path):
    rng = np.random.default_rng(1)
    rows = ["image,label"]
    for i in range(12):
        stack = rng.integers(0, 400, (8, 16, 16)).astype(np.int16)
        write_series(tmp_path / f"series{i:02d}", stack, gap=2.0)
        rows.append(f"series{i:02d},{'pos' if i % 2 else 'neg'}")
    # a series with a missing slice: the gap between two positions doubles
    stack = rng.integers(0, 400, (8, 16, 16)).astype(np.int16)
    paths = write_series(tmp_path / "broken", stack, gap=2.0, shuffle_seed=None)
    paths[4].unlink()
    rows.append("broken,pos")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")

    with pytest.raises(DataError) as err:
        FolderSource(str(tmp_path), size=28).load()
    assert "broken" in str(err.value) and "1 of 13" in str(err.value)

    src = FolderSource(str(tmp_path), size=28, skip_bad=True)
    splits = src.load()
    assert src.info.spatial_dims == 3
    assert sum(len(s) for s in splits.values()) == 12
    assert [s["image"] for s in src.skipped] == ["broken"]
    assert splits["train"].images.shape[1:] == (28, 28, 28)


def test_dims_setting_is_checked_and_2d_stays_2d(tmp_path):
    with pytest.raises(ConfigError, match="data.dims"):
        FolderSource(str(tmp_path), dims=4)
    from PIL import Image

    for i in range(10):
        folder = tmp_path / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 20), i * 20, np.uint8)).save(folder / f"{i}.png")
    src = FolderSource(str(tmp_path))
    src.load()
    assert src.info.spatial_dims == 2 and src.size == 128


def test_folders_of_2d_dicom_radiographs_stay_images(tmp_path):
    """Class/patient folders of 2D DICOM images (no slice positions) are not series."""
    from tests.helpers import write_dicom

    for i in range(8):
        folder = tmp_path / ("a" if i % 2 else "b") / f"patient{i}"
        folder.mkdir(parents=True)
        for j in range(2):
            write_dicom(folder / f"view{j}.dcm", np.full((16, 16), 30 * i + j, np.uint8))
    src = FolderSource(str(tmp_path), size=16)
    splits = src.load()
    assert src.info.spatial_dims == 2
    assert sum(len(s) for s in splits.values()) == 16
