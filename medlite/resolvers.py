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


def smaller(a: int, b: int) -> int:
    """``${medlite.min:${data.size},64}``: the smaller of two sizes (a teacher's input size that
    follows the data's but stays affordable)."""
    return min(int(a), int(b))


OmegaConf.register_new_resolver("medlite.min", smaller, replace=True)
