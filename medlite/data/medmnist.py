"""The file layer for official MedMNIST v2 ``.npz`` files: find, verify, download and load them.

The datamodule calls these functions; they never touch torch. Metadata (task, labels, URLs, MD5s)
comes from ``medmnist.INFO`` so medlite downloads exactly the files users of the official package
get. Every problem a user can fix raises :class:`~medlite.errors.DataError` or
:class:`~medlite.errors.ConfigError` with a message that names the file and says what to do.

Design notes:

- ``import medlite.data.medmnist`` is cheap: numpy is imported at module level, but ``medmnist``'s
  package ``__init__`` (which imports torch, PIL, ...) is avoided by reading its stdlib-only
  ``medmnist/info.py`` directly when ``medmnist`` is not imported yet.
- Hashing a multi-GB 224 px file on every run is too slow, so successful MD5 checks are cached in
  ``$MEDLITE_CACHE_DIR/md5_verified.json`` (key: absolute path, size, mtime_ns). The data folder
  may be read-only; nothing is written next to a data file except when downloading it.
- ``np.load`` cannot memory-map arrays inside an ``.npz``; for large images each member is copied
  once (streamed, constant memory) to ``$MEDLITE_CACHE_DIR/extracted/<stem>-<tag>/<key>.npy`` and
  memory-mapped read-only from there.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import secrets
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

from medlite import atomic
from medlite.atomic import DiskFullError
from medlite.cache import cache_dir as medlite_cache_dir
from medlite.errors import ConfigError, DataError

__all__ = [
    "SIZES_2D",
    "SIZES_3D",
    "SPLITS",
    "ARRAY_KEYS",
    "flags_2d",
    "flags_3d",
    "get_info",
    "valid_sizes",
    "file_name",
    "expected_md5",
    "download_url",
    "ensure_file",
    "load_splits",
]

log = logging.getLogger(__name__)

SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)
SPLITS = ("train", "val", "test")
ARRAY_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
MULTILABEL_TASK = "multi-label, binary-class"

_CHUNK = 1 << 20  # 1 MiB: download / hash / copy chunk
_MD5_CACHE_NAME = "md5_verified.json"
_MMAP_MIN_SIDE = 128  # default: memory-map when images are at least this many pixels wide
_FIX_HINT_DOWNLOAD = "set data.download=true"

_INFO: dict[str, dict] | None = None


# --------------------------------------------------------------------------- metadata


def _medmnist_info() -> dict[str, dict]:
    """``medmnist.INFO`` without importing the whole ``medmnist`` package when avoidable.

    ``medmnist/__init__.py`` imports its torch datasets (seconds); ``medmnist/info.py`` only needs
    the stdlib, so it is loaded on its own unless ``medmnist`` is already imported.
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    module = sys.modules.get("medmnist")
    info = getattr(module, "INFO", None) if module is not None else None
    if info is None:
        try:
            spec = importlib.util.find_spec("medmnist")
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec else []
        info_py = pathlib.Path(locations[0]) / "info.py" if locations else None
        if info_py is not None and info_py.is_file():
            try:
                sub = importlib.util.spec_from_file_location("_medlite_medmnist_info", info_py)
                assert sub is not None and sub.loader is not None
                mod = importlib.util.module_from_spec(sub)
                sub.loader.exec_module(mod)
                info = mod.INFO
            except Exception as exc:  # fall back to the normal import below
                log.debug("could not read %s directly (%s); importing medmnist", info_py, exc)
                info = None
        if info is None:
            try:
                import medmnist
            except ImportError as exc:
                raise ConfigError(
                    "the 'medmnist' package is not installed, so medlite cannot look up MedMNIST "
                    "file names, URLs and MD5 checksums. Install it with `pip install medmnist`."
                ) from exc
            info = medmnist.INFO
    _INFO = info
    return info


def flags_2d() -> list[str]:
    """The 12 MedMNIST 2D dataset flags, in ``medmnist.INFO`` order."""
    return [flag for flag in _medmnist_info() if not flag.endswith("3d")]


def flags_3d() -> list[str]:
    """The 6 MedMNIST 3D (volume) dataset flags, in ``medmnist.INFO`` order."""
    return [flag for flag in _medmnist_info() if flag.endswith("3d")]


def _normalize_flag(flag: str) -> str:
    """Look up a flag case-insensitively, or raise ConfigError with the closest valid name."""
    info = _medmnist_info()
    key = str(flag).strip().lower()
    if key in info:
        return key
    valid = list(info)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown MedMNIST dataset flag {flag!r}.{hint} Valid flags: "
        f"2D: {', '.join(flags_2d())}; 3D: {', '.join(flags_3d())}. "
        "Set data.flag=<one of these>."
    )


def get_info(flag: str) -> dict:
    """A copy of ``medmnist.INFO[flag]`` (task, labels, channels, split sizes, URLs, MD5s).

    Unknown flags raise :class:`ConfigError` listing the valid flags and the closest name.
    """
    return copy.deepcopy(_medmnist_info()[_normalize_flag(flag)])


def valid_sizes(flag: str) -> tuple[int, ...]:
    """Image sizes the official release offers for ``flag`` (28/64/128/224 for 2D, 28/64 for 3D)."""
    info = _medmnist_info()[_normalize_flag(flag)]
    candidates = SIZES_3D if _normalize_flag(flag).endswith("3d") else SIZES_2D
    return tuple(s for s in candidates if _url_key(s) in info and info.get(_md5_key(s)))


def _url_key(size: int) -> str:
    return "url" if size == 28 else f"url_{size}"


def _md5_key(size: int) -> str:
    return "MD5" if size == 28 else f"MD5_{size}"


def _check_size(flag: str, size: int) -> tuple[str, int]:
    key = _normalize_flag(flag)
    sizes = valid_sizes(key)
    size_int = -1
    if isinstance(size, str) and size.strip().isdigit():
        size_int = int(size)
    elif not isinstance(size, bool):
        with contextlib.suppress(TypeError, ValueError):
            size_int = int(size) if int(size) == size else -1
    if size_int not in sizes:
        raise ConfigError(
            f"invalid MedMNIST image size {size!r} for {key!r}; valid sizes: "
            f"{', '.join(map(str, sizes))}. Set data.size=<one of these>."
        )
    return key, size_int


def file_name(flag: str, size: int) -> str:
    """The official file name: ``{flag}.npz`` for 28 px, ``{flag}_{size}.npz`` otherwise."""
    key, size = _check_size(flag, size)
    return f"{key}.npz" if size == 28 else f"{key}_{size}.npz"


def expected_md5(flag: str, size: int) -> str:
    """The MD5 of the official file, as listed in ``medmnist.INFO``."""
    key, size = _check_size(flag, size)
    return str(_medmnist_info()[key][_md5_key(size)]).lower()


def download_url(flag: str, size: int) -> str:
    """The official (Zenodo) download URL of the file, as listed in ``medmnist.INFO``."""
    key, size = _check_size(flag, size)
    return str(_medmnist_info()[key][_url_key(size)])


# --------------------------------------------------------------------------- md5 + its cache


def _md5_of_file(path: str | os.PathLike) -> str:
    """MD5 hex digest of a file, read in chunks (tests monkeypatch this to spy on hashing)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(path: pathlib.Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _read_md5_cache() -> dict[str, str]:
    cache_file = medlite_cache_dir() / _MD5_CACHE_NAME
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached_md5(path: pathlib.Path) -> str | None:
    """The MD5 recorded for this exact file version (path, size, mtime), if any."""
    key = _cache_key(path)
    value = _read_md5_cache().get(key) if key else None
    return value if isinstance(value, str) else None


def _remember_md5(path: pathlib.Path, md5: str) -> None:
    """Record a verified MD5; best effort (a read-only cache only costs re-hashing next time)."""
    key = _cache_key(path)
    if key is None:
        return
    cache_dir = medlite_cache_dir()
    cache = _read_md5_cache()
    # Drop stale entries for the same path (older size/mtime) so the file stays small.
    prefix = key.rsplit("|", 2)[0] + "|"
    cache = {k: v for k, v in cache.items() if not k.startswith(prefix)}
    cache[key] = md5
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(cache_dir / _MD5_CACHE_NAME, json.dumps(cache, indent=1).encode())
    except DiskFullError as exc:  # the old cache stays whole; only re-hashing is lost
        log.warning("%s", exc)
    except OSError as exc:
        log.debug("could not write the MD5 cache in %s: %s", cache_dir, exc)


def _open_part(target: pathlib.Path) -> tuple[BinaryIO, pathlib.Path]:
    """Create ``<target>.part-<random>`` next to ``target`` (umask permissions, unlike mkstemp)."""
    for _ in range(100):
        tmp = target.with_name(f"{target.name}.part-{secrets.token_hex(6)}")
        try:
            return open(tmp, "xb"), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a unique temporary file next to {target}")


# --------------------------------------------------------------------------- ensure_file


def _manual_fix(name: str, path: pathlib.Path, url: str, *, downloading: bool = False) -> str:
    md5 = _expected_md5_by_name(name)
    last = (
        "  - try again later with network access (data.download=true retries the download)"
        if downloading
        else f"  - {_FIX_HINT_DOWNLOAD} to let medlite download and verify it"
    )
    return (
        "To fix it, do one of:\n"
        f"  - download it by hand: curl -L -o '{path}' '{url}' (its MD5 must be {md5})\n"
        f"  - point paths.data_dir=... (or env MEDLITE_DATA_DIR) at a folder that has {name}\n"
        + last
    )


def _expected_md5_by_name(name: str) -> str:
    """The official MD5 of a MedMNIST file name such as ``breastmnist_64.npz`` ('unknown' if none)."""
    stem = name.removesuffix(".npz")
    flag, _, size = stem.rpartition("_") if stem.rsplit("_", 1)[-1].isdigit() else (stem, "", "28")
    try:
        return expected_md5(flag, int(size))
    except (ConfigError, KeyError, ValueError):
        return "unknown"


def ensure_file(
    flag: str,
    size: int,
    root: str | os.PathLike,
    *,
    download: bool = True,
    timeout: float = 15.0,
) -> pathlib.Path:
    """Return the path of the verified official file ``root/file_name(flag, size)``.

    Existing files are MD5-checked (once per file version, thanks to the cache); missing files
    are downloaded from the official URL when ``download`` is true, else a DataError says how to
    get them. Invalid flags/sizes raise ConfigError before anything touches the disk.
    """
    name = file_name(flag, size)
    md5 = expected_md5(flag, size)
    url = download_url(flag, size)
    root_path = pathlib.Path(root).expanduser()
    path = root_path / name

    if path.exists():
        if not path.is_file():
            raise DataError(
                f"MedMNIST file {path} exists but is not a regular file. Remove or rename it, "
                f"then put the official {name} there (URL: {url}, MD5 {md5}) or "
                f"{_FIX_HINT_DOWNLOAD}."
            )
        _verify_existing(path, md5, url)
        return path

    if not download:
        raise DataError(
            f"MedMNIST file {name!r} not found: expected it at {path} "
            f"(MD5 {md5}, official URL {url}) and data.download=false.\n"
            + _manual_fix(name, path, url)
        )

    _download(url, path, md5, timeout=timeout)
    return path


def _verify_existing(path: pathlib.Path, md5: str, url: str) -> None:
    cached = _cached_md5(path)
    if cached is not None and cached == md5:
        log.debug("MD5 of %s already verified (cache)", path)
        return
    log.info("verifying MD5 of %s", path)
    try:
        actual = _md5_of_file(path)
    except OSError as exc:
        raise DataError(
            f"cannot read MedMNIST file {path}: {exc}. Check its permissions, or delete it and "
            f"{_FIX_HINT_DOWNLOAD} to re-download it from {url}."
        ) from exc
    if actual != md5:
        raise DataError(
            f"MedMNIST file {path} is corrupt or not the official version: its MD5 is {actual}, "
            f"expected {md5} (official URL {url}). Delete {path} and run again with "
            f"data.download=true to re-download it (or download it by hand from the URL)."
        )
    _remember_md5(path, md5)


@contextlib.contextmanager
def _progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar when stderr is a terminal; a no-op otherwise (logs stay clean)."""
    try:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
    except ImportError:
        yield lambda n: None
        return
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    if not interactive:
        yield lambda n: None
        return
    from rich.console import Console

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def _content_length(response: Any) -> int | None:
    headers = getattr(response, "headers", None)
    try:
        value = headers.get("Content-Length") if headers is not None else None
        return int(value) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None


def _space(folder: pathlib.Path, needed: int | None) -> str:
    """'It needs X MB, Y MB free there. ' for a disk-full message."""
    free = atomic.free_bytes(folder)
    need = f"{needed / 2**20:.1f} MB" if needed else "?"
    return f"It needs {need}, {'?' if free is None else f'{free / 2**20:.1f} MB'} free there. "


class _LocalWriteError(Exception):
    """Writing the downloaded bytes to disk failed (disk full...), not the network."""


def _download(url: str, path: pathlib.Path, md5: str, *, timeout: float) -> None:
    """Stream ``url`` into ``path`` atomically, checking the MD5 on the way; fail fast offline."""
    name = path.name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out_file, tmp = _open_part(path)
    except OSError as exc:
        raise DataError(
            f"cannot download MedMNIST file {name!r}: the folder {path.parent} cannot be created "
            f"or written ({exc}). Point paths.data_dir=... (or env MEDLITE_DATA_DIR) at a "
            f"writable folder, or download the file by hand from {url} (MD5 {md5})."
        ) from exc
    log.info("downloading %s from %s to %s", name, url, path)
    done = False
    try:
        h = hashlib.md5(usedforsecurity=False)
        n_bytes = 0
        try:
            with out_file as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = _content_length(resp)
                with _progress_bar(f"Downloading {name}", total) as advance:
                    while True:
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        try:
                            out.write(chunk)
                        except OSError as exc:
                            raise _LocalWriteError(exc) from exc
                        h.update(chunk)
                        n_bytes += len(chunk)
                        advance(len(chunk))
                if total is not None and n_bytes != total:
                    raise DataError(
                        f"download of MedMNIST file {name!r} from {url} was cut off after "
                        f"{n_bytes} of {total} bytes. Nothing was saved.\n"
                        + _manual_fix(name, path, url, downloading=True)
                    )
        except DataError:
            raise
        except _LocalWriteError as exc:
            raise DataError(
                f"could not save MedMNIST file {name!r} into {path.parent}: {exc.__cause__}. "
                f"{_space(path.parent, total)}Free disk space there or point paths.data_dir=... "
                f"(or env MEDLITE_DATA_DIR) at another folder. Nothing was saved."
            ) from exc
        except Exception as exc:  # URLError, HTTPError, timeouts, IncompleteRead, resets...
            reason: object = exc
            if isinstance(exc, urllib.error.URLError) and not isinstance(
                exc, urllib.error.HTTPError
            ):
                reason = exc.reason
            raise DataError(
                f"could not download MedMNIST file {name!r} from {url}: {reason} "
                f"({type(exc).__name__}; no network, or the server is unreachable or refused). "
                f"Nothing was saved.\n" + _manual_fix(name, path, url, downloading=True)
            ) from exc
        actual = h.hexdigest()
        if actual != md5:
            raise DataError(
                f"downloaded MedMNIST file {name!r} from {url} has MD5 {actual}, expected {md5} "
                f"({n_bytes} bytes received; the download was corrupted, or the server returned "
                f"something else, e.g. an error page). Nothing was saved.\n"
                + _manual_fix(name, path, url, downloading=True)
            )
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            with contextlib.suppress(OSError):
                tmp.unlink()
    log.info("downloaded %s (%d bytes, MD5 ok)", path, n_bytes)
    _remember_md5(path, md5)


# --------------------------------------------------------------------------- load_splits

_READ_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error, KeyError)


def _corrupt(path: pathlib.Path, exc: BaseException) -> DataError:
    return DataError(
        f"MedMNIST file {path} is corrupt or truncated and cannot be read "
        f"({type(exc).__name__}: {exc}). Delete it and run again with data.download=true to "
        f"re-download it (or download it again by hand)."
    )


def _npz_members(path: pathlib.Path) -> set[str]:
    with zipfile.ZipFile(path) as zf:
        return {n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")}


def _member_header(path: pathlib.Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in the .npz, reading only its header (cheap)."""
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), np.dtype(dtype)


def _extract_tag(path: pathlib.Path) -> str:
    cached = _cached_md5(path)
    if cached:
        return cached
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


class _CacheWriteError(Exception):
    """Writing an extracted array into the cache failed (disk full...), not reading the .npz."""


def _extract_and_mmap(path: pathlib.Path, cache_dir: pathlib.Path) -> dict[str, np.ndarray] | None:
    """Copy each .npy member once into the cache and memory-map it; None if the cache is unusable."""
    target = cache_dir / "extracted" / f"{path.stem}-{_extract_tag(path)}"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("cannot create %s (%s); loading %s into memory instead", target, exc, path)
        return None
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf:
        for key in ARRAY_KEYS:
            out = target / f"{key}.npy"
            if out.is_file():
                try:
                    arrays[key] = np.load(out, mmap_mode="r", allow_pickle=False)
                    continue
                except (ValueError, OSError, EOFError) as exc:
                    log.warning("re-extracting unreadable cached array %s (%s)", out, exc)
            log.info("extracting %s/%s to %s for memory mapping", path.name, key, out)
            try:
                dst_file, tmp = _open_part(out)
            except OSError as exc:
                log.warning("cannot write to %s (%s); loading %s into memory", target, exc, path)
                return None
            try:
                with dst_file as dst, zf.open(key + ".npy") as src:
                    # zipfile checks the CRC at the end; read errors mean a corrupt .npz
                    for chunk in iter(lambda: src.read(_CHUNK), b""):
                        try:
                            dst.write(chunk)
                        except OSError as exc:
                            raise _CacheWriteError(exc) from exc
                os.replace(tmp, out)
            except _CacheWriteError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise DataError(
                    f"cannot extract {path.name}/{key} into the cache folder {target} for memory "
                    f"mapping ({exc.__cause__}). {_space(target, zf.getinfo(key + '.npy').file_size)}"
                    f"Free disk space there, point env MEDLITE_CACHE_DIR at a folder with room, "
                    f"or load without mmap."
                ) from exc
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            arrays[key] = np.load(out, mmap_mode="r", allow_pickle=False)
    return arrays


def _load_in_memory(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: np.asarray(npz[key]) for key in ARRAY_KEYS}


def _count_nonfinite(images: np.ndarray) -> int:
    """Number of NaN/inf pixels, scanned in bounded-memory chunks (works on memmaps)."""
    per_item = max(1, int(np.prod(images.shape[1:])) * images.dtype.itemsize)
    step = max(1, (64 << 20) // per_item)
    total = 0
    for start in range(0, images.shape[0], step):
        block = np.asarray(images[start : start + step])
        total += int(block.size - np.count_nonzero(np.isfinite(block)))
    return total


def _is_3d(info: dict) -> bool:
    return str(info.get("python_class", "")).endswith("3D")


def _validate_split(
    path: pathlib.Path, split: str, images: np.ndarray, labels: np.ndarray, info: dict
) -> None:
    where = f"MedMNIST file {path}, split {split!r}"
    fix = "Delete the file and re-download it (data.download=true), or regenerate it."
    # --- images
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(
            f"{where}: images have dtype {images.dtype}, expected uint8 (or float). {fix}"
        )
    if np.issubdtype(images.dtype, np.floating):
        bad = _count_nonfinite(images)
        if bad:
            raise DataError(f"{where}: images contain {bad} NaN/inf pixel values. {fix}")
    channels = int(info.get("n_channels", 1))
    spatial = 3 if _is_3d(info) else 2
    if channels == 1:
        ok = images.ndim == 1 + spatial
        expected = "(N, D, H, W)" if spatial == 3 else "(N, H, W)"
    else:
        ok = images.ndim == 2 + spatial and images.shape[-1] == channels
        expected = "(N, D, H, W, C)" if spatial == 3 else f"(N, H, W, {channels})"
    if not ok:
        raise DataError(
            f"{where}: images have shape {images.shape}, but the dataset has {channels} "
            f"channel(s), so {expected} was expected. The file does not belong to this dataset "
            f"or is damaged. {fix}"
        )
    # --- labels
    if labels.shape[:1] != images.shape[:1]:
        raise DataError(
            f"{where}: {images.shape[0]} images but {labels.shape[0] if labels.ndim else 0} "
            f"labels. {fix}"
        )
    n_classes = len(info.get("label", {}))
    multilabel = info.get("task") == MULTILABEL_TASK
    want_cols = n_classes if multilabel else 1
    if labels.ndim != 2 or labels.shape[1] != want_cols:
        kind = f"multi-label with {n_classes} labels" if multilabel else "single-label"
        raise DataError(
            f"{where}: labels have shape {labels.shape}, expected (N, {want_cols}) for a "
            f"{kind} task ({info.get('task')!r}). {fix}"
        )
    if np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        values = labels
    elif np.issubdtype(labels.dtype, np.floating):
        lab = np.asarray(labels)
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            bad = np.unique(lab[~np.isfinite(lab) | (lab != np.round(lab))])[:10]
            raise DataError(f"{where}: labels are not integer-valued (e.g. {bad.tolist()}). {fix}")
        values = lab
    else:
        raise DataError(f"{where}: labels have dtype {labels.dtype}, expected integers. {fix}")
    values = np.asarray(values)
    high = 1 if multilabel else n_classes - 1
    bad_mask = (values < 0) | (values > high)
    if bad_mask.any():
        bad = np.unique(values[bad_mask])
        shown = ", ".join(str(v) for v in bad[:10].tolist()) + (" ..." if bad.size > 10 else "")
        allowed = "{0, 1}" if multilabel else f"[0, {high}]"
        raise DataError(
            f"{where}: {int(bad_mask.sum())} label value(s) outside {allowed} "
            f"({n_classes} labels, task {info.get('task')!r}): {shown}. {fix}"
        )


def _array_file(path: pathlib.Path, images: np.ndarray) -> str:
    """The file an array was read from: the cached ``.npy`` of a memory map, else the .npz."""
    filename = getattr(images, "filename", None)
    return str(filename) if filename else str(path)


def _check_image_sizes(
    path: pathlib.Path, images: dict[str, np.ndarray], info: dict, size: int | None
) -> None:
    """Every split's images have the same spatial shape, ``size`` per side if given: a wrong
    array would otherwise fail mid-training (a collate error) or be silently resized."""
    spatial = 3 if _is_3d(info) else 2
    shapes = {split: tuple(a.shape[1 : 1 + spatial]) for split, a in images.items()}
    reference = (int(size),) * spatial if size is not None else shapes[SPLITS[0]]
    side = "x".join(map(str, reference))
    wanted = f"data.size={size} means {side}" if size is not None else f"{SPLITS[0]} has {side}"
    for split, shape in shapes.items():
        if shape != reference:
            raise DataError(
                f"MedMNIST file {_array_file(path, images[split])}, split {split!r}: images are "
                f"{'x'.join(map(str, shape))} px, but {wanted} px. The file (or a "
                f"cached extraction of it) does not belong to this dataset and size; delete it "
                f"and re-download it (data.download=true), or set data.size to the file's size."
            )


def load_splits(
    path: str | os.PathLike,
    info: dict,
    *,
    mmap: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    size: int | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load and validate ``{"train": (images, labels), "val": ..., "test": ...}`` from an .npz.

    ``info`` is ``medmnist.INFO[flag]`` or a dict shaped like it (synthetic files). With
    ``mmap`` (default: when images are >= 128 px) arrays are extracted once into the cache and
    returned as read-only ``np.memmap``; otherwise they are loaded into memory. Unreadable,
    incomplete or inconsistent files raise DataError naming the file and what to do; the image
    sizes of all splits must agree (and equal ``size``, the configured ``data.size``, if given):
    checked on what was loaded, so also for a file whose MD5 was right and for arrays found in
    the extraction cache.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"MedMNIST file {path} does not exist. Call ensure_file() first, point "
            f"paths.data_dir=... (or env MEDLITE_DATA_DIR) at the folder holding it, or set "
            f"data.download=true."
        )
    try:
        members = _npz_members(path)
    except _READ_ERRORS as exc:
        raise _corrupt(path, exc) from exc
    missing = [key for key in ARRAY_KEYS if key not in members]
    if missing:
        raise DataError(
            f"MedMNIST file {path} lacks the arrays {', '.join(missing)} (it has: "
            f"{', '.join(sorted(members)) or 'none'}). It is not a MedMNIST v2 file or is "
            f"incomplete; delete it and re-download it (data.download=true)."
        )
    try:
        shape, _ = _member_header(path, "train_images")
        if mmap is None:
            mmap = len(shape) >= 3 and shape[1] >= _MMAP_MIN_SIDE
        arrays = None
        if mmap:
            root = (
                pathlib.Path(cache_dir).expanduser()
                if cache_dir is not None
                else medlite_cache_dir()
            )
            arrays = _extract_and_mmap(path, root)
        if arrays is None:
            arrays = _load_in_memory(path)
    except _READ_ERRORS as exc:
        raise _corrupt(path, exc) from exc

    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        _validate_split(path, split, images, labels, info)
        splits[split] = (images, labels)
    _check_image_sizes(path, {s: splits[s][0] for s in SPLITS}, info, size)
    log.debug(
        "loaded %s: %s",
        path,
        ", ".join(
            f"{s}={splits[s][0].shape}{' mmap' if isinstance(splits[s][0], np.memmap) else ''}"
            for s in SPLITS
        ),
    )
    return splits
