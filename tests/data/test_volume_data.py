"""Volumes as training data: MedMNIST 3D files (shared folder), the synthetic 3D default, 3D
preprocessing and augmentation, and the 2D/3D model-data check."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import medlite.data.medmnist as mm
from medlite.build import check_model_task
from medlite.data.augment_3d import build_augment_3d
from medlite.data.datamodule import ArrayDataset
from medlite.data.sources.medmnist import MedMNISTSource
from medlite.data.sources.synthetic import SyntheticSource
from medlite.data.transforms import Preprocess, fit_volume
from medlite.errors import ConfigError
from medlite.tasks import get_task

SHARED_3D = [
    ("adrenalmnist3d", 28),
    ("adrenalmnist3d", 64),
    ("vesselmnist3d", 28),
    ("vesselmnist3d", 64),
]


def _file(shared_data, flag: str, size: int):
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    path = shared_data / name
    if not path.exists():
        pytest.skip(f"{name} not in {shared_data}")
    return path


@pytest.mark.parametrize(("flag", "size"), SHARED_3D)
def test_medmnist_3d_files_load_with_official_splits(shared_data, tmp_path, flag, size):
    path = _file(shared_data, flag, size)
    assert hashlib.md5(path.read_bytes()).hexdigest() == mm.expected_md5(flag, size)
    src = MedMNISTSource(
        flag, size=size, data_dir=str(shared_data), cache_dir=str(tmp_path), download=False
    )
    splits = src.load()
    info = mm.get_info(flag)
    assert src.info.spatial_dims == 3 and src.info.channels == 1
    for split, data in splits.items():
        assert data.images.shape == (info["n_samples"][split], size, size, size)
        assert data.images.dtype == np.uint8
        labels = np.asarray(data.labels)
        assert labels.min() >= 0 and labels.max() < len(info["label"])
    assert src.info.task.type == "binary-class"


def test_medmnist_3d_size_checked():
    with pytest.raises(ConfigError, match="valid sizes: 28, 64"):
        MedMNISTSource("adrenalmnist3d", size=128)


def test_synthetic_3d_default_is_volumes():
    src = SyntheticSource("synthlesion3d", size=28, cache_dir=os.environ["MEDLITE_CACHE_DIR"])
    splits = src.load()
    assert src.info.spatial_dims == 3 and src.info.synthetic
    x = splits["train"].images
    assert x.ndim == 4 and x.shape[1:] == (28, 28, 28) and x.dtype == np.uint8
    y = np.asarray(splits["train"].labels).ravel()
    assert set(np.unique(y)) == {0, 1}  # both classes present


def test_preprocess_fits_volumes_to_input_size():
    pre = Preprocess(28, as_rgb=False, mean=[0.5], std=[0.5], load_size=28, spatial_dims=3)
    vol = np.zeros((64, 64, 64), np.uint8)
    vol[16:48, 16:48, 16:48] = 200  # a bright centred cube survives the shrink, centred
    x = pre(vol)
    assert x.shape == (1, 28, 28, 28) and pre.input_shape == (1, 28, 28, 28)
    inside, corner = x[0, 14, 14, 14].item(), x[0, 1, 1, 1].item()
    assert inside == pytest.approx(200 / 255 * 2 - 1, abs=0.02) and corner == pytest.approx(-1)
    # anisotropic input with pad: aspect kept, borders black
    pad = Preprocess(28, False, [0.5], [0.5], fit="pad", spatial_dims=3)
    flat = np.full((14, 28, 28), 255, np.uint8)
    y = pad(flat)
    assert y.shape == (1, 28, 28, 28)
    assert y[0, 0].max().item() == pytest.approx(-1) and y[0, 14].min().item() == pytest.approx(1)
    assert pre.describe()["spatial_dims"] == 3


def test_fit_volume_keeps_constant_volumes_constant():
    vol = np.full((40, 30, 50), 77, np.uint8)
    out = fit_volume(vol, 28, "resize")
    assert out.shape == (28, 28, 28) and out.dtype == np.uint8 and (out == 77).all()


def test_3d_augmentation_keeps_shape_range_and_labels_and_repeats_with_a_seed():
    cfg = {
        "hflip": 0.5,
        "dflip": 0.5,
        "rot90": 0.5,
        "rotate": 10,
        "translate": 0.05,
        "scale": [0.9, 1.1],
        "brightness": 0.1,
        "contrast": 0.1,
    }
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28, 28), dtype=np.uint8)
    labels = np.arange(6).reshape(-1, 1) % 2
    pre = Preprocess(28, False, [0.5], [0.5], spatial_dims=3)

    def batch(seed):
        ds = ArrayDataset(images, labels, pre, build_augment_3d(cfg, seed=seed, size=28))
        return [ds[i] for i in range(len(ds))]

    a, b, c = batch(1), batch(1), batch(2)
    for (x, y), label in zip(a, labels, strict=True):
        assert x.shape == (1, 28, 28, 28) and type(x) is torch.Tensor
        assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
        assert y.tolist() == label.tolist()
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))
    assert not all(torch.equal(x1, x3) for (x1, _), (x3, _) in zip(a, c, strict=True))
    # and the augmentation did something
    plain = [pre(im) for im in images]
    assert not all(torch.equal(x, p) for (x, _), p in zip(a, plain, strict=True))


def test_flip_only_augmentation_flips_the_named_axis():
    vol = np.zeros((28, 28, 28), np.uint8)
    vol[:, :, :5] = 255  # bright slab at the low end of W
    aug = build_augment_3d({"hflip": 1.0}, seed=0)
    pre = Preprocess(28, False, [0.5], [0.5], spatial_dims=3)
    x = aug(pre.prepare(vol))
    assert x[0, :, :, -5:].min() == 1.0 and x[0, :, :, :5].max() == 0.0


def test_2d_model_on_volumes_and_3d_model_on_images_are_refused():
    task = get_task("binary-class", ("a", "b"))
    two_d = OmegaConf.create({"name": "litecnn", "arch": "litecnn"})
    three_d = OmegaConf.create({"name": "cube", "arch": "cube", "dims": 3})
    with pytest.raises(ConfigError, match="2D model, but this dataset holds 3D volumes"):
        check_model_task(two_d, task, spatial_dims=3)
    with pytest.raises(ConfigError, match="3D model, but this dataset holds 2D images"):
        check_model_task(three_d, task, role="teacher", spatial_dims=2)
    check_model_task(three_d, task, spatial_dims=3)  # a match passes
