"""Swin UNETR (Hatamizadeh et al., BrainLes 2021) in 2D: MONAI's ``SwinUNETR``, spatial_dims=2.

A Swin Transformer encoder (2x2 patches, four stages of shifted-window attention with patch
merging) whose five scales (plus the image itself) feed a convolutional U-Net decoder of residual
blocks. At ``feature_size`` 12 it is ~1.6 M parameters, 1/40 of the published 3D model.
The input side must be divisible by 32 (patch 2, then four 2x mergings).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from medlite.errors import ConfigError
from medlite.models.registry import register_model

_FACTOR = 32


@register_model("swinunetr", paradigm="transformer", min_size=32, task="segmentation")
def swinunetr(
    num_classes: int,
    in_chans: int = 1,
    img_size: int = 64,
    feature_size: int = 12,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    drop_path: float = 0.0,
    use_v2: bool = False,
) -> nn.Module:
    """MONAI's Swin UNETR in 2D at a small feature size."""
    from monai.networks.nets import SwinUNETR

    if img_size % _FACTOR:
        raise ConfigError(
            f"swinunetr needs an input side divisible by {_FACTOR} (e.g. 64, 128, 256), got "
            f"{img_size}; set data.size (or model.input_size) to a multiple of {_FACTOR}"
        )
    if feature_size % 12:
        raise ConfigError(f"swinunetr: feature_size must be a multiple of 12, got {feature_size}")
    return SwinUNETR(
        in_channels=in_chans,
        out_channels=num_classes,
        feature_size=int(feature_size),
        depths=tuple(int(d) for d in depths),
        num_heads=tuple(int(h) for h in num_heads),
        window_size=int(window_size),
        dropout_path_rate=float(drop_path),
        spatial_dims=2,
        use_v2=bool(use_v2),
    )
