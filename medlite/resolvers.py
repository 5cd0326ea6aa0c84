"""OmegaConf resolvers medlite's configs use (registered when ``medlite`` is imported)."""

from __future__ import annotations

from pathlib import PurePath

from omegaconf import OmegaConf


def basename(path: str | None) -> str:
    """``${medlite.basename:${.root}}``: a folder's own name (a dataset named after its folder)."""
    if not path:
        return "folder"
    return PurePath(str(path).rstrip("/\\")).name or "folder"


OmegaConf.register_new_resolver("medlite.basename", basename, replace=True)
