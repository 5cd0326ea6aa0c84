"""The embedded segmentation dataset: deterministic, masks that match the drawn lesions, both
variants, served by the datamodule as aligned (image, mask) batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlite.data import synthetic_seg as seg
from medlite.data.datamodule import DataModule
from medlite.data.sources.synthseg import SynthSegSource
from medlite.errors import ConfigError

SMALL = {"train": 40, "val": 10, "test": 10}


def test_generation_is_deterministic_and_seeded():
    a = seg.generate("synthseg", 64, n_samples=SMALL)
    b = seg.generate("synthseg", 64, n_samples=SMALL)
    c = seg.generate("synthseg", 64, seed=1, n_samples=SMALL)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train_masks"], c["train_masks"])


def test_masks_mark_the_dark_lesions():
    """The lesion is hypoechoic: inside the mask the image is darker than around it, in every
    image that has a lesion; about a tenth of the images have none."""
    data = seg.generate("synthseg", 64, n_samples={"train": 200, "val": 1, "test": 1})
    images, masks = data["train_images"].astype(float), data["train_masks"]
    assert set(np.unique(masks)) == {0, 1}
    has = masks.reshape(len(masks), -1).any(axis=1)
    assert 0.03 < 1 - has.mean() < 0.2
    inside = np.array([img[m == 1].mean() for img, m in zip(images[has], masks[has], strict=True)])
    outside = np.array([img[m == 0].mean() for img, m in zip(images[has], masks[has], strict=True)])
    assert (inside < outside).mean() > 0.95


def test_multiclass_core_lies_inside_the_margin():
    data = seg.generate("synthseg_multiclass", 64, n_samples=SMALL)
    binary = seg.generate("synthseg", 64, n_samples=SMALL)
    masks = data["train_masks"]
    assert set(np.unique(masks)) == {0, 1, 2}
    # the same scenes' lesions (different flag, so only the class structure is compared)
    assert ((masks == 2).sum(axis=(1, 2)) <= (masks > 0).sum(axis=(1, 2))).all()
    assert binary["train_masks"].max() == 1


@pytest.mark.parametrize(("flag", "size"), [("synthseg", 63), ("nosuch", 64)])
def test_bad_settings_are_config_errors(tmp_path, flag, size):
    with pytest.raises(ConfigError):
        SynthSegSource(flag, size=size, cache_dir=str(tmp_path))


def test_datamodule_serves_aligned_image_mask_batches(tmp_path):
    dm = DataModule(
        SynthSegSource("synthseg", size=64, cache_dir=str(tmp_path)),
        batch_size=8,
        augment={"hflip": 1.0, "rotate": 0, "translate": 0.0},
    )
    dm.setup()
    assert dm.task.kind == "segmentation" and dm.task.labels == ("background", "lesion")
    assert dm.path == tmp_path / "synthetic" / "synthseg_64.npz"
    raw = dm.source.load()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (1, 64, 64) and y.shape[1:] == (64, 64) and y.dtype == torch.long
    assert torch.equal(y, torch.from_numpy(raw["val"].labels[: len(y)]).long())
    # training augmentation flips image and mask together: both equal the flipped originals
    img, mask = dm.splits["train"][0]
    want_img = dm.preprocess(raw["train"].images[0]).flip(-1)
    torch.testing.assert_close(img, want_img)
    assert torch.equal(mask, torch.from_numpy(raw["train"].labels[0]).long().flip(-1))
    counts = dm.class_counts("train")
    assert counts.sum() == 600 * 64 * 64 and counts[1] > 0
    assert "% px" in dm.balance_table()
