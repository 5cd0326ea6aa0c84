"""medlite's cache folder, shared by the data files' records and the compiled CPU kernels."""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    """``$MEDLITE_CACHE_DIR``, default ``~/.cache/medlite`` (not created here)."""
    return pathlib.Path(os.environ.get("MEDLITE_CACHE_DIR", "~/.cache/medlite")).expanduser()
