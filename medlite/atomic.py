"""Files a run must never leave half-written (checkpoints, results.json, exports, the MD5 cache).

Every writer goes through :func:`atomic_path`: the bytes go to a temporary file in the same
folder, which is renamed over the final name only once complete (``os.replace`` is atomic
within a file system) and removed on any failure. A reader therefore sees the old file or the
new one, never a truncated one. Temporary files are created like any other file (mode 0666
minus the umask), so the final files get the same permissions as everything else a run writes.

A full disk (ENOSPC, or a quota: EDQUOT) becomes one :class:`DiskFullError` naming the folder,
the space the file needed and the space left there.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medlite.errors import MedliteError

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
#: how C++ writers (torch's zip writer, protobuf) report ENOSPC when they don't raise OSError
_DISK_FULL_TEXT = os.strerror(errno.ENOSPC)


class DiskFullError(MedliteError):
    """The disk filled up while a file was written; no half-written file was left behind."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    return _DISK_FULL_TEXT in str(err)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a full disk or quota."""
    return any(_is_full(e) for e in _chain(err))


def disk_full_in(err: BaseException, folder: str | os.PathLike) -> DiskFullError | None:
    """The DiskFullError behind ``err`` (Lightning's clean-up after a failed checkpoint write
    may raise again, e.g. a logger that can't write either), or one for an ENOSPC that another
    library's writer raised (``folder``: where, if it doesn't say); None if the disk is fine."""
    chain = list(_chain(err))
    for e in chain:
        if isinstance(e, DiskFullError):
            return e
    for e in chain:
        if _is_full(e):
            name = getattr(e, "filename", None)
            path = Path(name) if name else None
            return disk_full_error(path, None, folder=Path(folder), atomic=False)
    return None


def _mb(n: int | None) -> str:
    """A size as people read it (``2.9 MB``, ``40 KB``)."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{max(1, round(n / 2**10))} KB"


def free_bytes(folder: Path) -> int | None:
    """Free space of the file system holding ``folder`` (its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def disk_full_error(
    path: Path | None,
    needed: int | None,
    *,
    folder: Path | None = None,
    atomic: bool = True,
) -> DiskFullError:
    """The one message a full disk gives: which file, which folder, space needed and free.
    ``atomic``: the file was written through :func:`atomic_path` (so nothing was left of it)."""
    folder = Path(path).parent if path is not None else Path(folder or ".")
    what = Path(path).name if path is not None else "a file"
    need = f"at least {_mb(needed)}" if needed else "more space"
    left = "; nothing half-written was left" if atomic else ""
    return DiskFullError(
        f"disk full: could not write {what} into {folder} ({need} needed, "
        f"{_mb(free_bytes(folder))} free there){left}. Free space on that disk (or point "
        "paths.log_dir / paths.cache_dir at one with room) and run again."
    )


def _temp_path(path: Path) -> Path:
    """A fresh hidden name next to ``path`` that keeps its suffix (exporters look at it)."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer to fill; on success it replaces
    ``path``, on failure it is removed. ``size``: the bytes the file will need, if known (for the
    disk-full message; otherwise what was written before the disk filled)."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        written = _size(tmp)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(err):
            raise disk_full_error(path, max(size or 0, written) or None) from err
        raise


def _write(f: io.BufferedWriter, data: bytes | memoryview) -> None:
    """The one place bytes hit the disk (tests make it fail with ENOSPC)."""
    f.write(data)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically, with the umask's permissions."""
    path = Path(path)
    with atomic_path(path, size=len(data)) as tmp, open(tmp, "xb") as f:
        _write(f, data)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically: serialised in memory first, so the size is known and a full
    disk is an OSError from Python, not an opaque error from torch's C++ zip writer."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getbuffer())


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically (a copy across file systems is not a rename)."""
    src = Path(src)
    with atomic_path(dst, size=src.stat().st_size) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)
