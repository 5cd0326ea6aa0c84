"""MedMNIST image arrays agree in size across splits and with ``data.size``: checked on what
was loaded, so also for a file whose MD5 passed and for arrays found in the extraction cache;
one DataError names the file and the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medlite.data import medmnist as mm
from medlite.errors import DataError

INFO = {"task": "binary-class", "label": {"0": "benign", "1": "malignant"}, "n_channels": 1}


def _arrays(sides: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for split in mm.SPLITS:
        out[f"{split}_images"] = rng.integers(0, 256, (3, sides[split], sides[split]), np.uint8)
        out[f"{split}_labels"] = rng.integers(0, 2, (3, 1), np.uint8)
    return out


def _npz(path: Path, sides: dict[str, int]) -> Path:
    np.savez_compressed(path, **_arrays(sides))
    return path


def test_a_split_of_another_size_is_named(tmp_path) -> None:
    path = _npz(tmp_path / "breastmnist.npz", {"train": 28, "val": 32, "test": 28})
    with pytest.raises(DataError) as err:
        mm.load_splits(path, INFO)
    msg = str(err.value)
    assert str(path) in msg and "split 'val'" in msg and "32x32" in msg and "28x28" in msg


def test_images_must_match_data_size(tmp_path) -> None:
    path = _npz(tmp_path / "breastmnist_64.npz", {s: 28 for s in mm.SPLITS})
    assert mm.load_splits(path, INFO)["train"][0].shape == (3, 28, 28)  # consistent: fine
    with pytest.raises(DataError, match=r"split 'train'.*data\.size=64"):
        mm.load_splits(path, INFO, size=64)


def test_checked_after_a_passing_md5(tmp_path, monkeypatch) -> None:
    """A file that passes the MD5 check (here: its MD5 made to match) is still checked."""
    from medlite.data.sources.medmnist import MedMNISTSource

    _npz(tmp_path / "breastmnist.npz", {"train": 28, "val": 28, "test": 30})
    monkeypatch.setattr(mm, "_md5_of_file", lambda p: mm.expected_md5("breastmnist", 28))
    source = MedMNISTSource("breastmnist", size=28, data_dir=str(tmp_path), download=False)
    with pytest.raises(DataError) as err:
        source._load()
    assert "breastmnist.npz" in str(err.value) and "split 'test'" in str(err.value)


def test_arrays_put_in_the_extraction_cache_are_checked(tmp_path) -> None:
    path = _npz(tmp_path / "breastmnist_128.npz", {s: 128 for s in mm.SPLITS})
    cache = tmp_path / "cache"
    first = mm.load_splits(path, INFO, mmap=True, cache_dir=cache, size=128)
    assert isinstance(first["val"][0], np.memmap)
    (cached,) = cache.glob("extracted/*/val_images.npy")
    np.save(cached, np.zeros((3, 64, 64), np.uint8))  # no MD5 covers this file
    with pytest.raises(DataError) as err:
        mm.load_splits(path, INFO, mmap=True, cache_dir=cache, size=128)
    assert str(cached) in str(err.value) and "split 'val'" in str(err.value)
