"""Model zoo: a registry of medlite's own models plus every timm model, behind one factory."""

from medlite.models import cnn, linear, seg, volume  # noqa: F401  (registers medlite's models)
from medlite.models.factory import count_parameters, create_model
from medlite.models.registry import PARADIGMS, get_entry, list_models, register_model

__all__ = [
    "PARADIGMS",
    "count_parameters",
    "create_model",
    "get_entry",
    "list_models",
    "register_model",
]
