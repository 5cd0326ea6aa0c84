"""The MedMNIST file layer: lookup, MD5 verification (and its cache), download, loading, mmap.

Real official files come from the ``shared_data`` fixture (skipped where absent); the network is
always mocked (``urllib.request.urlopen``), so these tests run offline.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import medlite.data.medmnist as mm
from medlite.errors import ConfigError, DataError

REAL_FLAGS = ("breastmnist", "pneumoniamnist", "retinamnist")


# --------------------------------------------------------------------------- helpers


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.part-*")) if root.exists() else []


class FakeResponse:
    """Enough of ``http.client.HTTPResponse`` for the download loop."""

    def __init__(self, data: bytes, *, fail_after: int | None = None, length: int | None = None):
        self._buf = io.BytesIO(data)
        self._fail_after = fail_after
        self._sent = 0
        self.headers = {"Content-Length": str(len(data) if length is None else length)}
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        if self._fail_after is not None and self._sent >= self._fail_after:
            raise ConnectionResetError("connection reset by peer")
        chunk = self._buf.read(n if self._fail_after is None else min(n, 4096))
        self._sent += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fake_urlopen(monkeypatch, response_or_exc, calls: list | None = None):
    def fake(url, *args, **kwargs):
        if calls is not None:
            calls.append((url, args, kwargs))
        if isinstance(response_or_exc, BaseException):
            raise response_or_exc
        return response_or_exc

    monkeypatch.setattr(urllib.request, "urlopen", fake)


def _info(task: str = "multi-class", n_labels: int = 3, channels: int = 1) -> dict:
    """An INFO-like dict for synthetic files (no URL/MD5, like a generated dataset)."""
    return {
        "task": task,
        "label": {str(i): f"class{i}" for i in range(n_labels)},
        "n_channels": channels,
        "n_samples": {"train": 6, "val": 2, "test": 2},
        "url": None,
        "MD5": None,
    }


def _arrays(
    *, side: int = 28, channels: int = 1, n_labels: int = 3, multilabel: bool = False, seed=0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        shape = (n, side, side) if channels == 1 else (n, side, side, channels)
        out[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if multilabel:
            out[f"{split}_labels"] = rng.integers(0, 2, size=(n, n_labels), dtype=np.uint8)
        else:
            out[f"{split}_labels"] = rng.integers(0, n_labels, size=(n, 1), dtype=np.uint8)
    return out


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez_compressed(path, **arrays)
    return path


# --------------------------------------------------------------------------- metadata


def test_flags_and_names_follow_medmnist_info():
    import medmnist

    flags = mm.flags_2d()
    assert len(flags) == 12 and "breastmnist" in flags and "chestmnist" in flags
    assert not any(f.endswith("3d") for f in flags)
    for flag in flags:
        info = mm.get_info(flag)
        assert info == medmnist.INFO[flag]
        for size in mm.SIZES_2D:
            suffix = "" if size == 28 else f"_{size}"
            assert mm.file_name(flag, size) == f"{flag}{suffix}.npz"
            assert mm.expected_md5(flag, size) == medmnist.INFO[flag][f"MD5{suffix}"]
            assert mm.download_url(flag, size) == medmnist.INFO[flag][f"url{suffix}"]
            assert mm.file_name(flag, size) in mm.download_url(flag, size)
    # 3D flags can be looked up, but only at 28 / 64 px.
    assert mm.file_name("vesselmnist3d", 64) == "vesselmnist3d_64.npz"
    with pytest.raises(ConfigError, match="28, 64"):
        mm.file_name("vesselmnist3d", 128)


def test_get_info_returns_a_copy():
    info = mm.get_info("breastmnist")
    info["label"]["0"] = "changed"
    assert mm.get_info("breastmnist")["label"]["0"] == "malignant"


def test_unknown_flag_suggests_the_closest_name():
    with pytest.raises(ConfigError) as err:
        mm.get_info("breastmnst")
    msg = str(err.value)
    assert "'breastmnst'" in msg and "Did you mean 'breastmnist'" in msg
    assert "pathmnist" in msg and "organsmnist" in msg  # lists the valid flags
    with pytest.raises(ConfigError, match="Did you mean 'pneumoniamnist'"):
        mm.ensure_file("pneumonia_mnist", 28, "/nonexistent", download=False)


@pytest.mark.parametrize("size", [32, 0, 28.5, "big", True])
def test_invalid_size_lists_valid_sizes(size, tmp_path):
    with pytest.raises(ConfigError, match="valid sizes: 28, 64, 128, 224"):
        mm.ensure_file("breastmnist", size, tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []  # checked before touching disk or network


# --------------------------------------------------------------------------- real files


@pytest.mark.parametrize("flag", REAL_FLAGS)
def test_real_file_verifies_and_loads(flag, shared_data):
    info = mm.get_info(flag)
    before = sorted(os.listdir(shared_data))
    path = mm.ensure_file(flag, 28, shared_data, download=False)
    assert path == shared_data / f"{flag}.npz"

    splits = mm.load_splits(path, info)
    assert set(splits) == {"train", "val", "test"}
    n_classes = len(info["label"])
    for split, (images, labels) in splits.items():
        n = info["n_samples"][split]
        assert isinstance(images, np.ndarray) and not isinstance(images, np.memmap)
        assert images.dtype == np.uint8
        assert images.shape == ((n, 28, 28, 3) if info["n_channels"] == 3 else (n, 28, 28))
        assert labels.shape == (n, 1)
        assert labels.min() >= 0 and labels.max() <= n_classes - 1
    # retinamnist has all 5 grades in train; the binary sets have both classes.
    assert len(np.unique(splits["train"][1])) == n_classes
    # The data folder is never written to (it may be read-only / shared).
    assert sorted(os.listdir(shared_data)) == before


def test_md5_is_cached_per_file_version(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLITE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real_md5 = mm._md5_of_file

    def spy(path):
        calls.append(Path(path))
        return real_md5(path)

    monkeypatch.setattr(mm, "_md5_of_file", spy)
    path = mm.ensure_file("breastmnist", 28, shared_data, download=False)
    assert calls == [path]
    assert (tmp_path / "cache" / "md5_verified.json").is_file()

    def boom(path):
        raise AssertionError("hashed again although the MD5 was cached")

    monkeypatch.setattr(mm, "_md5_of_file", boom)
    assert mm.ensure_file("breastmnist", 28, shared_data, download=False) == path


def test_md5_cache_is_invalidated_when_the_file_changes(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLITE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data"
    root.mkdir()
    local = root / "breastmnist.npz"
    shutil.copyfile(shared_data / "breastmnist.npz", local)
    mm.ensure_file("breastmnist", 28, root, download=False)  # verified + cached

    # Same size, new content and new mtime: the cache entry must not vouch for it.
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0xFF
    local.write_bytes(bytes(data))
    st = local.stat()
    os.utime(local, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    with pytest.raises(DataError, match="MD5"):
        mm.ensure_file("breastmnist", 28, root, download=False)


def test_corrupted_existing_file_is_rejected(shared_data, tmp_path, monkeypatch):
    calls: list = []
    _fake_urlopen(monkeypatch, urllib.error.URLError("should not be called"), calls)
    local = tmp_path / "breastmnist.npz"
    data = bytearray((shared_data / "breastmnist.npz").read_bytes())
    data[1000] ^= 0x01
    local.write_bytes(bytes(data))
    expected = mm.expected_md5("breastmnist", 28)

    with pytest.raises(DataError) as err:
        mm.ensure_file("breastmnist", 28, tmp_path, download=True)
    msg = str(err.value)
    assert str(local) in msg
    assert expected in msg and _md5(local) in msg
    assert mm.download_url("breastmnist", 28) in msg
    assert "Delete" in msg and "data.download=true" in msg
    assert calls == []  # an existing bad file is reported, not silently replaced
    assert local.read_bytes() == bytes(data)


def test_missing_file_without_download_explains_how_to_fix(tmp_path, monkeypatch):
    calls: list = []
    _fake_urlopen(monkeypatch, urllib.error.URLError("should not be called"), calls)
    with pytest.raises(DataError) as err:
        mm.ensure_file("breastmnist", 128, tmp_path / "data", download=False)
    msg = str(err.value)
    assert "breastmnist_128.npz" in msg
    assert str(tmp_path / "data" / "breastmnist_128.npz") in msg
    assert mm.expected_md5("breastmnist", 128) in msg
    assert mm.download_url("breastmnist", 128) in msg
    assert "paths.data_dir" in msg and "MEDLITE_DATA_DIR" in msg and "data.download=true" in msg
    assert calls == []
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------- download (mocked)


def test_download_streams_verifies_and_installs(shared_data, tmp_path, monkeypatch):
    payload = (shared_data / "breastmnist.npz").read_bytes()
    calls: list = []
    _fake_urlopen(monkeypatch, FakeResponse(payload), calls)
    root = tmp_path / "new" / "root"  # created on demand

    path = mm.ensure_file("breastmnist", 28, root, download=True, timeout=3.0)

    assert path == root / "breastmnist.npz"
    assert path.read_bytes() == payload
    assert _md5(path) == mm.expected_md5("breastmnist", 28)
    assert _leftovers(root) == []
    assert sorted(os.listdir(root)) == ["breastmnist.npz"]
    assert len(calls) == 1
    url, args, kwargs = calls[0]
    assert url == mm.download_url("breastmnist", 28)
    assert kwargs.get("timeout", args[0] if args else None) == 3.0

    # Downloaded files are remembered as verified: no re-hash, no second download.
    monkeypatch.setattr(mm, "_md5_of_file", lambda p: pytest.fail("re-hashed"))
    assert mm.ensure_file("breastmnist", 28, root, download=True) == path
    assert len(calls) == 1
    splits = mm.load_splits(path, mm.get_info("breastmnist"))
    assert splits["train"][0].shape == (546, 28, 28)


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution")),
        urllib.error.URLError(TimeoutError("timed out")),
        TimeoutError("The read operation timed out"),
        ConnectionRefusedError(111, "Connection refused"),
        urllib.error.HTTPError("https://zenodo.org/x", 503, "Service Unavailable", {}, None),
    ],
    ids=["offline", "connect-timeout", "read-timeout", "refused", "http-503"],
)
def test_network_errors_fail_fast_and_leave_nothing(error, tmp_path, monkeypatch):
    calls: list = []
    _fake_urlopen(monkeypatch, error, calls)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        mm.ensure_file("pneumoniamnist", 64, tmp_path, download=True, timeout=1.0)
    assert time.monotonic() - start < 5.0
    assert len(calls) == 1  # no retry loop
    msg = str(err.value)
    assert "could not download" in msg and "no network" in msg
    assert "pneumoniamnist_64.npz" in msg and mm.download_url("pneumoniamnist", 64) in msg
    assert "curl" in msg and "paths.data_dir" in msg
    assert list(tmp_path.iterdir()) == []


def test_connection_dropped_mid_stream_leaves_nothing(shared_data, tmp_path, monkeypatch):
    payload = (shared_data / "breastmnist.npz").read_bytes()
    _fake_urlopen(monkeypatch, FakeResponse(payload, fail_after=100_000))
    with pytest.raises(DataError, match="ConnectionResetError"):
        mm.ensure_file("breastmnist", 28, tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_download_is_not_blamed_on_the_network(shared_data, tmp_path, monkeypatch):
    payload = (shared_data / "breastmnist.npz").read_bytes()
    _fake_urlopen(monkeypatch, FakeResponse(payload))
    real_open_part = mm._open_part

    class FullDisk:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def open_part(target):
        f, tmp = real_open_part(target)
        return FullDisk(f), tmp

    monkeypatch.setattr(mm, "_open_part", open_part)
    with pytest.raises(DataError) as err:
        mm.ensure_file("breastmnist", 28, tmp_path, download=True)
    assert "No space left" in str(err.value) and "no network" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_short_download_is_reported_as_cut_off(shared_data, tmp_path, monkeypatch):
    payload = (shared_data / "breastmnist.npz").read_bytes()
    _fake_urlopen(monkeypatch, FakeResponse(payload[:1000], length=len(payload)))
    with pytest.raises(DataError, match="cut off after 1000 of"):
        mm.ensure_file("breastmnist", 28, tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_wrong_bytes_are_rejected_by_md5(tmp_path, monkeypatch):
    _fake_urlopen(monkeypatch, FakeResponse(b"<html>Too many requests</html>" * 50))
    with pytest.raises(DataError) as err:
        mm.ensure_file("breastmnist", 28, tmp_path, download=True)
    msg = str(err.value)
    assert "MD5" in msg and mm.expected_md5("breastmnist", 28) in msg
    assert "breastmnist.npz" in msg
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- load_splits errors


def test_truncated_npz_names_the_file(shared_data, tmp_path):
    data = (shared_data / "breastmnist.npz").read_bytes()
    bad = tmp_path / "breastmnist.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        mm.load_splits(bad, mm.get_info("breastmnist"))
    msg = str(err.value)
    assert str(bad) in msg and "corrupt or truncated" in msg and "Delete" in msg


def test_garbage_and_corrupt_member_are_data_errors(tmp_path):
    junk = _write(tmp_path / "junk.npz", _arrays())
    raw = bytearray(junk.read_bytes())
    # Damage compressed payload bytes of the first member (after its local header).
    for i in range(200, 260):
        raw[i] ^= 0xFF
    junk.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="junk.npz"):
        mm.load_splits(junk, _info())
    text = tmp_path / "text.npz"
    text.write_text("not a zip file at all")
    with pytest.raises(DataError, match="text.npz"):
        mm.load_splits(text, _info())
    with pytest.raises(DataError, match="does not exist"):
        mm.load_splits(tmp_path / "absent.npz", _info())


def test_missing_keys_are_listed(tmp_path):
    arrays = _arrays()
    del arrays["val_labels"], arrays["test_images"]
    path = _write(tmp_path / "partial.npz", arrays)
    with pytest.raises(DataError) as err:
        mm.load_splits(path, _info())
    msg = str(err.value)
    assert str(path) in msg and "val_labels" in msg and "test_images" in msg
    assert "train_images" not in msg.split("(it has")[0]


def test_labels_out_of_range(tmp_path):
    arrays = _arrays(n_labels=3)
    arrays["val_labels"][0, 0] = 7
    arrays["val_labels"][1, 0] = 9
    path = _write(tmp_path / "range.npz", arrays)
    with pytest.raises(DataError) as err:
        mm.load_splits(path, _info(n_labels=3))
    msg = str(err.value)
    assert str(path) in msg and "'val'" in msg and "7, 9" in msg and "[0, 2]" in msg


def test_negative_and_non_integer_labels(tmp_path):
    arrays = _arrays()
    arrays["train_labels"] = arrays["train_labels"].astype(np.int64)
    arrays["train_labels"][0, 0] = -1
    with pytest.raises(DataError, match="-1"):
        mm.load_splits(_write(tmp_path / "neg.npz", arrays), _info())
    arrays = _arrays()
    arrays["test_labels"] = arrays["test_labels"].astype(np.float32) + 0.5
    with pytest.raises(DataError, match="not integer-valued"):
        mm.load_splits(_write(tmp_path / "frac.npz", arrays), _info())


def test_nan_pixels_in_float_images(tmp_path):
    arrays = _arrays()
    images = arrays["train_images"].astype(np.float32) / 255
    images[0, 3, 4] = np.nan
    images[2, 0, 0] = np.nan
    images[3, 1, 1] = np.inf
    arrays["train_images"] = images
    arrays["val_images"] = arrays["val_images"].astype(np.float32) / 255  # finite floats are fine
    path = _write(tmp_path / "nan.npz", arrays)
    with pytest.raises(DataError) as err:
        mm.load_splits(path, _info())
    msg = str(err.value)
    assert str(path) in msg and "'train'" in msg and "3 NaN/inf" in msg

    arrays["train_images"] = np.nan_to_num(images, nan=0.0, posinf=1.0)
    splits = mm.load_splits(_write(tmp_path / "ok.npz", arrays), _info())
    assert splits["train"][0].dtype == np.float32


def test_multilabel_shape_and_values(tmp_path):
    info = _info(task="multi-label, binary-class", n_labels=4)
    good = _write(tmp_path / "ml.npz", _arrays(n_labels=4, multilabel=True))
    splits = mm.load_splits(good, info)
    assert splits["train"][1].shape == (6, 4)

    arrays = _arrays(n_labels=3, multilabel=True)  # 3 columns but 4 labels
    with pytest.raises(DataError) as err:
        mm.load_splits(_write(tmp_path / "ml3.npz", arrays), info)
    assert "(6, 3)" in str(err.value) and "(N, 4)" in str(err.value)

    arrays = _arrays(n_labels=4)  # single-label (N, 1) file for a multi-label task
    with pytest.raises(DataError, match=r"expected \(N, 4\)"):
        mm.load_splits(_write(tmp_path / "ml1.npz", arrays), info)

    arrays = _arrays(n_labels=4, multilabel=True)
    arrays["test_labels"][0, 2] = 2
    with pytest.raises(DataError, match=r"outside \{0, 1\}"):
        mm.load_splits(_write(tmp_path / "ml2.npz", arrays), info)


def test_single_label_needs_n_by_1(tmp_path):
    arrays = _arrays()
    arrays["train_labels"] = arrays["train_labels"].reshape(-1)
    with pytest.raises(DataError, match=r"shape \(6,\), expected \(N, 1\)"):
        mm.load_splits(_write(tmp_path / "flat.npz", arrays), _info())


def test_count_and_channel_mismatches(tmp_path):
    arrays = _arrays()
    arrays["val_labels"] = arrays["val_labels"][:1]
    with pytest.raises(DataError, match="2 images but 1 labels"):
        mm.load_splits(_write(tmp_path / "count.npz", arrays), _info())

    rgb = _write(tmp_path / "rgb.npz", _arrays(channels=3))
    with pytest.raises(DataError, match=r"1 channel\(s\)"):
        mm.load_splits(rgb, _info(channels=1))
    gray = _write(tmp_path / "gray.npz", _arrays(channels=1))
    with pytest.raises(DataError, match=r"\(N, H, W, 3\)"):
        mm.load_splits(gray, _info(channels=3))
    assert mm.load_splits(rgb, _info(channels=3))["test"][0].shape == (2, 28, 28, 3)


# --------------------------------------------------------------------------- memory mapping


def test_mmap_extracts_once_and_matches_in_memory(tmp_path, monkeypatch):
    path = _write(tmp_path / "synthmnist_128.npz", _arrays(side=128, channels=3, seed=1))
    info = _info(channels=3)
    cache = tmp_path / "cache"

    in_memory = mm.load_splits(path, info, mmap=False)
    mapped = mm.load_splits(path, info, mmap=True, cache_dir=cache)
    for split in mm.SPLITS:
        assert not isinstance(in_memory[split][0], np.memmap)
        assert isinstance(mapped[split][0], np.memmap) and mapped[split][0].mode == "r"
        np.testing.assert_array_equal(mapped[split][0], in_memory[split][0])
        np.testing.assert_array_equal(mapped[split][1], in_memory[split][1])

    files = sorted((cache / "extracted").glob("synthmnist_128-*/*.npy"))
    assert [f.name for f in files] == sorted(f"{k}.npy" for k in mm.ARRAY_KEYS)
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    assert _leftovers(cache) == []

    # Second load reuses the extracted arrays (no rewrite).
    time.sleep(0.01)
    again = mm.load_splits(path, info, mmap=True, cache_dir=cache)
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    np.testing.assert_array_equal(again["train"][0], in_memory["train"][0])

    # Default (mmap=None) memory-maps >= 128 px, into $MEDLITE_CACHE_DIR.
    monkeypatch.setenv("MEDLITE_CACHE_DIR", str(tmp_path / "envcache"))
    default = mm.load_splits(path, info)
    assert isinstance(default["val"][0], np.memmap)
    assert list((tmp_path / "envcache" / "extracted").glob("synthmnist_128-*/train_images.npy"))
    # ... and keeps small images in memory.
    small = mm.load_splits(_write(tmp_path / "small.npz", _arrays()), _info())
    assert not isinstance(small["train"][0], np.memmap)


def test_mmap_validates_too(tmp_path):
    arrays = _arrays(side=128)
    arrays["train_labels"][0, 0] = 5
    path = _write(tmp_path / "bad_128.npz", arrays)
    with pytest.raises(DataError, match="outside"):
        mm.load_splits(path, _info(), mmap=True, cache_dir=tmp_path / "cache")


def test_mmap_real_3d_file(shared_data, tmp_path):
    """64 px 3D volumes load memory-mapped from the read-only shared folder."""
    info = mm.get_info("adrenalmnist3d")
    path = mm.ensure_file("adrenalmnist3d", 64, shared_data, download=False)
    splits = mm.load_splits(path, info, mmap=True, cache_dir=tmp_path / "cache")
    images, labels = splits["val"]
    assert isinstance(images, np.memmap)
    assert images.shape == (info["n_samples"]["val"], 64, 64, 64) and images.dtype == np.uint8
    assert labels.shape == (info["n_samples"]["val"], 1)
    # Verified files are extracted under their MD5.
    assert (
        tmp_path
        / "cache"
        / "extracted"
        / f"adrenalmnist3d_64-{mm.expected_md5('adrenalmnist3d', 64)}"
    ).is_dir()
