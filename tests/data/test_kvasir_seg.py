"""Kvasir-SEG (``data=kvasir_seg``): the real dataset reads complete with the official test split,
binary masks aligned with their images (also through paired augmentation); the download works
with the network mocked, and offline or incomplete folders fail once, clearly, leaving nothing
behind."""

from __future__ import annotations

import csv
import io
import json
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medlite.data.datamodule import MaskDataset
from medlite.data.readers import read_image, read_mask
from medlite.data.sources import kvasir_seg
from medlite.data.sources.kvasir_seg import URL, KvasirSegSource, official_split
from medlite.data.transforms import Preprocess, build_augment, fit_image, fit_mask
from medlite.errors import ConfigError, DataError
from tests.helpers import make_cfg

# the development copy of the dataset (never copied into the repo), as tests/conftest.py finds
# the shared MedMNIST files
KVASIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "seg" / "kvasir_seg"
SIZE = 64


@pytest.fixture(scope="module")
def kvasir_root() -> Path:
    if not (KVASIR / "images").is_dir():
        pytest.skip(f"Kvasir-SEG not found in {KVASIR} (only on dev machines)")
    return KVASIR


@pytest.fixture(scope="module")
def kvasir(kvasir_root) -> KvasirSegSource:
    """The real dataset at 64 px, read once for the module (~1000 JPEG pairs)."""
    source = KvasirSegSource(root=str(kvasir_root), size=SIZE)
    source.load()
    return source


def _stem(name: str) -> str:
    return Path(name).stem


# ------------------------------------------------------------------------------ real data
def test_counts_and_the_official_test_split(kvasir, kvasir_root):
    splits = kvasir.load()
    assert {s: len(v) for s, v in splits.items()} == {"train": 792, "val": 88, "test": 120}
    lines = (kvasir_root / "official_split" / "val.txt").read_text().split()
    train_lines = (kvasir_root / "official_split" / "train.txt").read_text().split()
    assert [_stem(i) for i in splits["test"].ids] == lines  # exactly the authors' held-out ids
    assert official_split() == {"train": train_lines, "test": lines}  # the shipped copy
    ours = {_stem(i) for s in ("train", "val") for i in splits[s].ids}
    assert ours == set(train_lines)
    for split in splits.values():
        assert split.images.shape == (len(split), SIZE, SIZE, 3) and split.images.dtype == np.uint8
        assert split.labels.shape == (len(split), SIZE, SIZE) and split.labels.dtype == np.uint8
    info = kvasir.info
    assert info.task.kind == "segmentation" and info.task.labels == ("background", "polyp")
    assert info.channels == 3 and info.size == SIZE and not info.synthetic


def test_masks_are_binary_with_a_plausible_polyp_share(kvasir):
    masks = np.concatenate([s.labels for s in kvasir.load().values()])
    assert set(np.unique(masks).tolist()) == {0, 1}
    share = masks.mean()
    assert 0.12 < share < 0.19  # 15.4 % at full resolution
    assert (masks.reshape(len(masks), -1).max(axis=1) == 1).all()  # every image has a polyp


def test_images_and_masks_are_fitted_alike(kvasir, kvasir_root):
    test = kvasir.load()["test"]
    for j in (0, 57, 119):
        name = test.ids[j]
        image = read_image(kvasir_root / "images" / name)
        mask = torch.from_numpy((read_mask(kvasir_root / "masks" / name) > 127).astype(np.uint8))
        assert np.array_equal(test.images[j], fit_image(image, SIZE, "resize"))
        assert np.array_equal(test.labels[j], fit_mask(mask, SIZE, "resize").numpy())


def test_records_and_describe(kvasir, tmp_path):
    assert kvasir.write_records(tmp_path) == ["splits.csv"]
    with open(tmp_path / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1000 and list(rows[0]) == ["image", "split"]
    by_split = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert by_split == {"train": 792, "val": 88, "test": 120}
    d = kvasir.describe()
    assert "research and educational" in d["license"] and "Kvasir-SEG" in d["citation"]
    assert d["splits"]["val_fraction"] == 0.1 and d["splits"]["seed"] == 0
    assert d["url"] == URL and len(kvasir.fingerprint()) == 16


# ------------------------------------------------------------------------- split, settings
def test_validation_split_is_seeded_and_independent_of_order(tmp_path):
    source = KvasirSegSource(root=str(tmp_path / "none"))
    official = official_split()
    a = source.assign_splits(official)
    shuffled = dict(official, train=list(np.random.default_rng(1).permutation(official["train"])))
    assert source.assign_splits(shuffled) == a
    assert sum(v == "val" for v in a.values()) == 88
    other = KvasirSegSource(root=str(tmp_path / "none"), split_seed=1).assign_splits(official)
    assert other != a and {i for i, s in other.items() if s == "test"} == set(official["test"])
    bigger = KvasirSegSource(root=str(tmp_path / "none"), val_fraction=0.2)
    assert sum(v == "val" for v in bigger.assign_splits(official).values()) == 176


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"val_fraction": 0}, "data.val_fraction"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"val_fraction": 0.0001}, "leaves no image"),
        ({"size": 4}, "data.size"),
        ({"fit": "crop"}, "data.fit"),
        ({"download": "yes"}, "data.download"),
        ({"split_seed": -1}, "data.split_seed"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, kwargs, expected):
    with pytest.raises(ConfigError, match=expected):
        KvasirSegSource(root=str(tmp_path), **kwargs)


def test_config_option_picks_segmentation_networks(tmp_path):
    cfg = make_cfg(tmp_path, ["data=kvasir_seg", "paths.data_dir=/data"])
    assert cfg.model.name == "unet" and cfg.teacher.name == "unet"
    assert cfg.data.root == "/data/Kvasir-SEG" and cfg.data.size == 256
    assert cfg.data.augment.vflip == 0.5 and cfg.data.augment.hflip == 0.5  # merged with base
    assert make_cfg(tmp_path, ["data=kvasir_seg", "model=litecnn"]).model.name == "litecnn"


# -------------------------------------------------------------------- paired augmentation
def test_paired_augmentation_moves_mask_with_image():
    """An image whose content is its mask stays equal to it through random flips and affine."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 2, (8, 8), dtype=np.uint8)
    mask = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))  # 64 x 64, 8 px blocks
    image = np.repeat((mask * 255)[:, :, None], 3, axis=2)
    augment = build_augment(
        {"hflip": 0.5, "vflip": 0.5, "rotate": 30, "translate": 0.1, "scale": [0.8, 1.2]}
    )
    prep = Preprocess(64, as_rgb=False, mean=[0.0] * 3, std=[1.0] * 3, load_size=64)
    data = MaskDataset(image[None], mask[None], prep, augment)
    torch.manual_seed(0)
    changed = 0
    for _ in range(20):
        x, m = data[0]
        assert x.shape == (3, 64, 64) and m.shape == (64, 64) and m.dtype == torch.long
        agree = ((x[0] > 0.5).long() == m).float().mean().item()
        assert agree > 0.97  # only edge pixels differ (bilinear image, nearest mask)
        changed += not torch.equal(m, torch.from_numpy(mask).long())
    assert changed >= 15  # the augmentation did move things


# ----------------------------------------------------------------- fake official layouts
def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _pair_bytes() -> tuple[bytes, bytes]:
    image = np.full((10, 14, 3), 90, dtype=np.uint8)
    mask = np.zeros((10, 14, 3), dtype=np.uint8)
    mask[3:7, 4:10] = 255
    return _jpeg(image), _jpeg(mask)


def _fake_zip(ids: list[str]) -> bytes:
    """The official archive's layout (Kvasir-SEG/images, masks), tiny identical JPEGs."""
    image, mask = _pair_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("Kvasir-SEG/kavsir_bboxes.json", "{}")
        for i in ids:
            zf.writestr(f"Kvasir-SEG/images/{i}.jpg", image)
            zf.writestr(f"Kvasir-SEG/masks/{i}.jpg", mask)
    return buf.getvalue()


def _fake_folder(root: Path, ids: list[str]) -> Path:
    image, mask = _pair_bytes()
    for sub, data in (("images", image), ("masks", mask)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            (root / sub / f"{i}.jpg").write_bytes(data)
    return root


def _all_ids() -> list[str]:
    official = official_split()
    return official["train"] + official["test"]


class _Response(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_extracts_atomically_and_loads(tmp_path, monkeypatch):
    payload = _fake_zip(_all_ids())
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return _Response(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    parent = tmp_path / "data"
    root = parent / "Kvasir-SEG"
    source = KvasirSegSource(root=str(root), size=8, download=True)
    splits = source.load()
    assert calls == [URL]
    assert sorted(p.name for p in parent.iterdir()) == ["Kvasir-SEG"]  # no .part leftovers
    assert len(list((root / "images").iterdir())) == 1000
    assert (root / "kavsir_bboxes.json").is_file()
    assert {s: len(v) for s, v in splits.items()} == {"train": 792, "val": 88, "test": 120}
    assert splits["train"].labels.max() == 1
    # present now: a second source does not download again
    KvasirSegSource(root=str(root), size=8, download=True)._ensure_folder()
    assert calls == [URL]


def test_offline_download_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    parent = tmp_path / "data"
    root = parent / "Kvasir-SEG"
    with pytest.raises(DataError) as err:
        KvasirSegSource(root=str(root), download=True).load()
    message = str(err.value)
    assert URL in message and str(root) in message and "Nothing was saved" in message
    assert "name resolution" in message
    assert list(parent.iterdir()) == []


def test_not_a_zip_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout=None: _Response(b"<html>error</html>")
    )
    parent = tmp_path / "data"
    with pytest.raises(DataError, match="not a zip archive"):
        KvasirSegSource(root=str(parent / "Kvasir-SEG"), download=True).load()
    assert list(parent.iterdir()) == []


def test_missing_folder_without_download_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download"))
    root = tmp_path / "Kvasir-SEG"
    with pytest.raises(DataError) as err:
        KvasirSegSource(root=str(root)).load()
    message = str(err.value)
    assert URL in message and str(root / "images") in message
    assert "data.download=true" in message and not root.exists()


def test_missing_pairs_are_listed_in_one_error(tmp_path):
    root = _fake_folder(tmp_path / "Kvasir-SEG", _all_ids())
    official = official_split()
    (root / "masks" / f"{official['test'][0]}.jpg").unlink()
    for i in official["train"][:12]:
        (root / "images" / f"{i}.jpg").unlink()
    with pytest.raises(DataError) as err:
        KvasirSegSource(root=str(root), size=8).load()
    message = str(err.value)
    assert "12 image(s) missing" in message and "and 2 more" in message
    assert f"1 mask(s) missing from {root / 'masks'}: {official['test'][0]}" in message


def test_nested_folder_hint_and_mask_of_another_size(tmp_path):
    outer = tmp_path / "download"
    _fake_folder(outer / "Kvasir-SEG", _all_ids())
    with pytest.raises(DataError, match="set data.root="):
        KvasirSegSource(root=str(outer), size=8).load()
    root = outer / "Kvasir-SEG"
    victim = official_split()["train"][5]
    Image.fromarray(np.zeros((11, 14), dtype=np.uint8)).save(root / "masks" / f"{victim}.jpg")
    with pytest.raises(DataError, match=rf"(?s)1 of 1000 pairs.*{victim}.jpg: mask is 14x11 px"):
        KvasirSegSource(root=str(root), size=8).load()


def test_split_file_is_package_data():
    """The split ships inside the package (pyproject package-data), not only in the repo."""
    path = Path(kvasir_seg.__file__).with_name(kvasir_seg.SPLIT_FILE)
    data = json.loads(path.read_text())
    assert len(data["train"]) == 880 and len(data["test"]) == 120
    assert not set(data["train"]) & set(data["test"])
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"medlite.data.sources" = ["*.json"]' in pyproject
