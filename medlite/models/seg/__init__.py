"""Segmentation networks: a per-pixel logit map (N, classes, H, W) for an (N, C, H, W) image.

Every module of this package is imported (and so registers its models) when the package is: a
new network is one file here plus a ``conf/model/<name>.yaml`` with ``task: segmentation``.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
