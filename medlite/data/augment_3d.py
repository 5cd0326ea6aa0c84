"""Training augmentation for volumes, on MONAI's 3D array transforms.

The ``data.augment`` keys keep their 2D meaning, extended to a third axis, so one config schema
serves images and volumes: ``hflip``/``vflip``/``dflip`` flip the W/H/D axis with that
probability; ``rot90`` turns the volume a random quarter turn in the H-W plane with that
probability; ``rotate`` (degrees, about each axis), ``translate`` (fraction of the side) and
``scale`` ([lo, hi]) make one small random affine; ``brightness``/``contrast`` shift/scale the
intensities. Inputs and outputs are (C, D, H, W) float tensors in [0, 1]; borders fill with 0.

MONAI's random transforms draw from their own generator, not torch's: it is seeded from
``seed`` (the datamodule passes one drawn after ``seed_everything``), so runs repeat.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class _Clamp:
    """Back into [0, 1] after intensity changes, as a plain tensor (not a MONAI MetaTensor)."""

    def __call__(self, x):
        x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
        return x.clamp(0.0, 1.0)


def build_augment_3d(
    cfg: dict, seed: int | None = None, size: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The ``data.augment`` settings as a MONAI ``Compose`` over (C, D, H, W) tensors."""
    import monai.transforms as M

    ops: list = []
    for key, axis in (("dflip", 0), ("vflip", 1), ("hflip", 2)):
        if cfg.get(key, 0):
            ops.append(M.RandFlip(prob=float(cfg[key]), spatial_axis=axis))
    if cfg.get("rot90", 0):
        ops.append(M.RandRotate90(prob=float(cfg["rot90"]), max_k=3, spatial_axes=(1, 2)))
    degrees, translate = float(cfg.get("rotate", 0)), float(cfg.get("translate", 0))
    scale = cfg.get("scale")
    if degrees or translate or scale:
        side = float(size or 28)
        ops.append(
            M.RandAffine(
                prob=1.0,
                rotate_range=(math.radians(degrees),) * 3 if degrees else None,
                translate_range=(translate * side,) * 3 if translate else None,
                scale_range=((float(scale[0]) - 1.0, float(scale[1]) - 1.0),) * 3
                if scale
                else None,
                mode="bilinear",
                padding_mode="zeros",
            )
        )
    if cfg.get("contrast", 0):
        ops.append(M.RandScaleIntensity(factors=float(cfg["contrast"]), prob=1.0))
    if cfg.get("brightness", 0):
        ops.append(M.RandShiftIntensity(offsets=float(cfg["brightness"]), prob=1.0))
    if not ops:
        return None
    compose = M.Compose([*ops, _Clamp()])
    if seed is not None:
        compose.set_random_state(seed=int(seed) % (2**32))
    return compose
