"""The datamodule end to end over the MedMNIST and synthetic sources: official files (split sizes,
shapes, dtypes, normalisation, channels, input size and fit mode, task), train-only augmentation,
the embedded synthetic sets, source and config errors."""

from __future__ import annotations

import os
from pathlib import Path

import medmnist
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medlite.data import synthetic
from medlite.data.datamodule import DataModule
from medlite.data.sources.medmnist import MedMNISTSource
from medlite.data.sources.synthetic import SyntheticSource
from medlite.errors import ConfigError
from medlite.tasks import BINARY, MULTILABEL, ORDINAL

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# The augmentation every MedMNIST / synthetic data option trains with by default.
DEFAULT_AUGMENT = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data_base.yaml").augment)

REAL = {
    # flag: (channels, task type, number of outputs)
    "breastmnist": (1, BINARY, 2),
    "pneumoniamnist": (1, BINARY, 2),
    "retinamnist": (3, ORDINAL, 5),
}


def _real_dm(shared_data: Path, tmp_path: Path, flag: str, **kwargs) -> DataModule:
    kwargs.setdefault("augment", DEFAULT_AUGMENT)
    source = MedMNISTSource(
        flag, data_dir=str(shared_data), cache_dir=str(tmp_path), download=False
    )
    dm = DataModule(source, **kwargs)
    dm.setup()
    return dm


def _raw(shared_data: Path, flag: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(shared_data / f"{flag}.npz") as npz:
        return npz[f"{split}_images"], npz[f"{split}_labels"]


def _expected(raw: np.ndarray) -> torch.Tensor:
    """(N, H, W[, C]) uint8 -> what the default preprocessing must give: (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(raw.astype(np.float32))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return (x / 255.0 - 0.5) / 0.5


# --------------------------------------------------------------------------- official files


@pytest.mark.parametrize("flag", sorted(REAL))
def test_official_splits_shapes_and_task(shared_data, tmp_path, flag):
    channels, task_type, n_out = REAL[flag]
    dm = _real_dm(shared_data, tmp_path, flag, batch_size=16)

    assert {k: len(v) for k, v in dm.splits.items()} == medmnist.INFO[flag]["n_samples"]
    assert dm.describe()["n_samples"] == medmnist.INFO[flag]["n_samples"]
    assert dm.describe()["synthetic"] is False
    assert dm.path == shared_data / f"{flag}.npz"
    assert dm.in_chans == channels
    assert dm.task.type == task_type and dm.task.num_outputs == n_out

    torch.manual_seed(0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, channels, 28, 28) and x.dtype == torch.float32
    assert y.shape == (16, 1) and y.dtype == torch.long
    assert int(y.min()) >= 0 and int(y.max()) < n_out
    assert torch.isfinite(x).all()
    targets = dm.task.targets(y)
    assert targets.shape == (16,) and targets.dtype == torch.long


@pytest.mark.parametrize("flag", sorted(REAL))
def test_val_batch_is_exactly_normalised_raw_pixels(shared_data, tmp_path, flag):
    dm = _real_dm(shared_data, tmp_path, flag, eval_batch_size=64)
    x, y = next(iter(dm.val_dataloader()))  # no shuffle: the first 64 val samples, no augmentation
    raw_x, raw_y = _raw(shared_data, flag, "val")
    raw_x, raw_y = raw_x[:64], raw_y[:64]

    torch.testing.assert_close(x, _expected(raw_x), rtol=0, atol=1e-6)
    assert torch.equal(y, torch.from_numpy(raw_y).long())
    # [0, 255] maps onto [-1, 1]: the batch extremes are the raw extremes, mapped
    assert float(x.min()) == pytest.approx(raw_x.min() / 127.5 - 1, abs=1e-6)
    assert float(x.max()) == pytest.approx(raw_x.max() / 127.5 - 1, abs=1e-6)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_normalisation_hits_both_ends_of_the_range(shared_data, tmp_path):
    """Whole pneumonia val split (it has pure-black and pure-white pixels): 0 -> -1, 255 -> +1."""
    dm = _real_dm(shared_data, tmp_path, "pneumoniamnist", eval_batch_size=1000)
    raw_x, _ = _raw(shared_data, "pneumoniamnist", "val")
    x, _ = next(iter(dm.val_dataloader()))
    assert len(x) == len(raw_x)
    assert raw_x.min() == 0 and raw_x.max() == 255
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_as_rgb_repeats_grayscale(shared_data, tmp_path):
    dm = _real_dm(shared_data, tmp_path, "breastmnist", as_rgb=True, eval_batch_size=32)
    assert dm.in_chans == 3
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (32, 3, 28, 28)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    raw_x, _ = _raw(shared_data, "breastmnist", "val")
    torch.testing.assert_close(x[:, :1], _expected(raw_x[:32]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("flag", ["breastmnist", "retinamnist"])
def test_input_size_resize(shared_data, tmp_path, flag):
    channels = REAL[flag][0]
    dm = _real_dm(
        shared_data, tmp_path, flag, input_size=64, fit="resize", batch_size=8, eval_batch_size=8
    )
    assert dm.preprocess.describe()["input_size"] == 64
    xt, _ = next(iter(dm.train_dataloader()))
    xv, _ = next(iter(dm.val_dataloader()))
    assert xt.shape == (8, channels, 64, 64) and xv.shape == (8, channels, 64, 64)
    # bilinear upsampling stays inside the normalised range and keeps the image content
    assert float(xv.min()) >= -1.0 - 1e-6 and float(xv.max()) <= 1.0 + 1e-6
    raw_x, _ = _raw(shared_data, flag, "val")
    down = torch.nn.functional.interpolate(xv, size=(28, 28), mode="area")
    assert (down - _expected(raw_x[:8])).abs().mean() < 0.1


@pytest.mark.parametrize("flag", ["breastmnist", "retinamnist"])
def test_input_size_pad_centres_content_on_black(shared_data, tmp_path, flag):
    """fit="pad" pads the [0, 1] image with zeros *before* normalising, so the border is the
    normalised value of a black pixel: (0 - 0.5) / 0.5 = -1, and the 28 px content is untouched."""
    channels = REAL[flag][0]
    dm = _real_dm(shared_data, tmp_path, flag, input_size=64, fit="pad", eval_batch_size=8)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, channels, 64, 64)
    raw_x, _ = _raw(shared_data, flag, "val")
    lo = (64 - 28) // 2  # 18: centred
    torch.testing.assert_close(
        x[..., lo : lo + 28, lo : lo + 28], _expected(raw_x[:8]), rtol=0, atol=1e-6
    )
    border = x.clone()
    border[..., lo : lo + 28, lo : lo + 28] = float("nan")
    border = border[~torch.isnan(border)]
    assert border.numel() == 8 * channels * (64 * 64 - 28 * 28)
    assert torch.all(border == -1.0)


def test_pad_border_follows_custom_normalisation(shared_data, tmp_path):
    dm = _real_dm(
        shared_data, tmp_path, "breastmnist", input_size=32, fit="pad", mean=[0.2], std=[0.4]
    )
    x, _ = dm.splits["val"][0]
    assert x.shape == (1, 32, 32)
    black = torch.tensor((0 - 0.2) / 0.4)
    assert torch.allclose(x[:, :2, :], black) and torch.allclose(x[:, -2:, :], black)
    assert torch.allclose(x[:, :, :2], black) and torch.allclose(x[:, :, -2:], black)
    raw_x, _ = _raw(shared_data, "breastmnist", "val")
    want = (torch.from_numpy(raw_x[0].astype(np.float32)) / 255.0 - 0.2) / 0.4
    torch.testing.assert_close(x[0, 2:30, 2:30], want, rtol=0, atol=1e-5)


def test_augmentation_only_on_train_real(shared_data, tmp_path):
    dm = _real_dm(shared_data, tmp_path, "breastmnist")
    torch.manual_seed(0)
    train_reads = [dm.splits["train"][3][0] for _ in range(4)]
    assert any(not torch.equal(train_reads[0], r) for r in train_reads[1:])
    assert all(r.shape == (1, 28, 28) for r in train_reads)
    val_a, val_b = dm.splits["val"][3][0], dm.splits["val"][3][0]
    assert torch.equal(val_a, val_b)
    assert torch.equal(dm.splits["test"][5][0], dm.splits["test"][5][0])

    off = _real_dm(shared_data, tmp_path, "breastmnist", augment={"enabled": False})
    a, b = off.splits["train"][3][0], off.splits["train"][3][0]
    assert torch.equal(a, b)
    raw_x, _ = _raw(shared_data, "breastmnist", "train")
    torch.testing.assert_close(a, _expected(raw_x[3:4])[0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- synthetic sets


def _synth_dm(tmp_path: Path, flag: str = "synthlesion", size: int = 28, **kwargs) -> DataModule:
    kwargs.setdefault("augment", DEFAULT_AUGMENT)
    dm = DataModule(SyntheticSource(flag, size=size, cache_dir=str(tmp_path)), **kwargs)
    dm.setup()
    return dm


def test_synthetic_generated_into_cache_dir(tmp_path):
    target = tmp_path / "synthetic" / "synthlesion.npz"
    assert not target.exists()
    dm = _synth_dm(tmp_path, batch_size=32)
    assert dm.path == target and target.is_file()

    want = synthetic.SYNTHETIC_INFO["synthlesion"]["n_samples"]
    assert {k: len(v) for k, v in dm.splits.items()} == want
    info = dm.describe()
    assert info["synthetic"] is True
    assert info["n_samples"] == want and info["task"] == BINARY and info["file"] == str(target)
    assert dm.in_chans == 1 and dm.task.num_outputs == 2

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (32, 1) and y.dtype == torch.long and set(y.flatten().tolist()) <= {0, 1}

    # a second datamodule reuses the file rather than regenerating it
    mtime = target.stat().st_mtime_ns
    again = _synth_dm(tmp_path)
    assert again.path == target and target.stat().st_mtime_ns == mtime


def test_synthetic_augmentation_only_on_train(tmp_path):
    dm = _synth_dm(tmp_path)
    torch.manual_seed(0)
    reads = [dm.splits["train"][0][0] for _ in range(4)]
    assert any(not torch.equal(reads[0], r) for r in reads[1:])
    assert torch.equal(dm.splits["val"][0][0], dm.splits["val"][0][0])

    off = _synth_dm(tmp_path, augment={"enabled": False})
    assert off.splits["train"].augment is None
    assert torch.equal(off.splits["train"][0][0], off.splits["train"][0][0])
    none = _synth_dm(tmp_path, augment=None)
    assert none.splits["train"].augment is None


def test_synthetic_multilabel_targets(tmp_path):
    dm = _synth_dm(tmp_path, "synthlesion_multilabel", batch_size=16)
    n_labels = len(synthetic.SYNTHETIC_INFO["synthlesion_multilabel"]["label"])
    assert dm.task.type == MULTILABEL and dm.task.num_outputs == n_labels
    want = synthetic.SYNTHETIC_INFO["synthlesion_multilabel"]["n_samples"]
    assert {k: len(v) for k, v in dm.splits.items()} == want
    _, y = next(iter(dm.train_dataloader()))
    assert y.shape == (16, n_labels)
    t = dm.task.targets(y)
    assert t.shape == (16, n_labels) and t.dtype == torch.float32
    assert set(t.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(t, y.float())


def test_synthetic_size_64_served_at_64(tmp_path):
    dm = _synth_dm(tmp_path, size=64, batch_size=8, eval_batch_size=8)
    assert dm.path == tmp_path / "synthetic" / "synthlesion_64.npz" and dm.path.is_file()
    assert dm.describe()["size"] == 64 and dm.preprocess.input_size == 64
    xt, _ = next(iter(dm.train_dataloader()))
    xv, _ = next(iter(dm.val_dataloader()))
    assert xt.shape == (8, 1, 64, 64) and xv.shape == (8, 1, 64, 64)
    with np.load(dm.path) as npz:
        raw = npz["val_images"][:8]
    assert raw.shape == (8, 64, 64)
    torch.testing.assert_close(xv, _expected(raw), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": [0.5, 0.5, 0.5]}, "1 value"),
        ({"std": [0.5, 0.5]}, "1 value"),
        ({"as_rgb": True, "mean": [0.5]}, "3 value"),
        ({"as_rgb": True, "mean": [0.5] * 3, "std": [0.5] * 2}, "3 value"),
    ],
)
def test_mean_std_length_mismatch(tmp_path, kwargs, match):
    dm = DataModule(SyntheticSource(cache_dir=str(tmp_path)), **kwargs)
    with pytest.raises(ConfigError, match=match):
        dm.setup()


def test_bad_fit_mode(tmp_path):
    with pytest.raises(ConfigError, match="data.fit"):
        DataModule(SyntheticSource(cache_dir=str(tmp_path)), fit="crop").setup()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: MedMNISTSource("breastmnits", data_dir=d), "Did you mean 'breastmnist'"),
        (lambda d: MedMNISTSource("breastmnist", size=100, data_dir=d), "data.size=100"),
        (lambda d: MedMNISTSource("adrenalmnist3d", size=32, data_dir=d), "valid sizes: 28, 64"),
        (lambda d: SyntheticSource("synthlesion", size=27, cache_dir=d), "data.size=27"),
        (lambda d: SyntheticSource("nosuch", cache_dir=d), "unknown synthetic"),
    ],
)
def test_sources_check_their_settings_before_reading(tmp_path, make, match):
    """A bad flag or size is the source's to refuse, at once and without touching the disk."""
    with pytest.raises(ConfigError, match=match):
        make(str(tmp_path / "nothing-here"))
    assert not (tmp_path / "nothing-here").exists()


def test_synthetic_volumes_are_served_as_volumes():
    dm = DataModule(
        SyntheticSource("synthlesion3d", cache_dir=os.environ["MEDLITE_CACHE_DIR"]), batch_size=4
    )
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28, 28) and dm.input_shape == (1, 28, 28, 28)
    assert dm.describe()["spatial_dims"] == 3 and y.shape == (4, 1)


def test_class_counts_and_balance_table(shared_data, tmp_path):
    dm = _real_dm(shared_data, tmp_path, "breastmnist")
    _, raw_y = _raw(shared_data, "breastmnist", "train")
    assert dm.class_counts("train").tolist() == np.bincount(raw_y.reshape(-1)).tolist()
    table = dm.balance_table()
    for label in dm.task.labels:
        assert label in table
    record = dm.describe()
    assert record["source"] == "medmnist" and record["name"] == "breastmnist"
    assert record["class_counts"]["train"] == dm.class_counts("train").tolist()
    assert record["md5"] == medmnist.INFO["breastmnist"]["MD5"]


def test_preprocess_fits_other_sizes_to_the_stored_size_first(tmp_path):
    """predict.py gets files of any size: they are brought to the dataset's stored size as the
    training images were, then to the model's input size."""
    dm = DataModule(SyntheticSource(cache_dir=str(tmp_path)), input_size=64)
    pre = dm.preprocess
    assert pre.load_size == 28 and pre.input_size == 64
    big = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    from medlite.data.transforms import fit_image

    stored = fit_image(big, 28, "resize")
    torch.testing.assert_close(pre(big), pre(stored), rtol=0, atol=0)
