"""The plain U-Net baseline (and default distillation teacher) of segmentation: MONAI's ``UNet``.

Residual units in every encoder and decoder stage, strided convolutions instead of pooling; the
input side must be divisible by 2 ** (number of strides).
"""

from __future__ import annotations

from torch import nn

from medlite.errors import ConfigError
from medlite.models.registry import register_model


@register_model("unet_monai", paradigm="cnn", min_size=32, task="segmentation")
def unet_monai(
    num_classes: int,
    in_chans: int = 1,
    img_size: int = 64,
    channels: tuple[int, ...] = (16, 32, 64, 128, 256),
    strides: tuple[int, ...] = (2, 2, 2, 2),
    num_res_units: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI's residual U-Net in 2D."""
    from monai.networks.nets import UNet

    factor = 1
    for s in strides:
        factor *= int(s)
    if img_size % factor:
        raise ConfigError(
            f"unet_monai with strides {list(strides)} needs an input side divisible by {factor}, "
            f"got {img_size}; set data.size (or model.input_size) to a multiple of {factor}"
        )
    return UNet(
        spatial_dims=2,
        in_channels=in_chans,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        dropout=dropout,
    )
