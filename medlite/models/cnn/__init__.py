"""Lightweight CNNs written in medlite (timm supplies the rest)."""

from medlite.models.cnn import litecnn  # noqa: F401  (registers the model)
