"""Data sources: each finds and validates one kind of dataset (see :mod:`.base`)."""

from medlite.data.sources.base import SPLITS, DataSource, SourceInfo, Split

__all__ = ["SPLITS", "DataSource", "SourceInfo", "Split"]
