"""LightningModules: one shared base and a thin subclass per architecture paradigm."""

from medlite.modules.base import MedliteModule
from medlite.modules.paradigms import (
    CNNModule,
    LinearComplexityModule,
    TransformerModule,
    module_class,
)

__all__ = [
    "CNNModule",
    "LinearComplexityModule",
    "MedliteModule",
    "TransformerModule",
    "module_class",
]
