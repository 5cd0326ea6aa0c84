"""U-Nets over a lightweight timm encoder, built by segmentation-models-pytorch (smp).

smp's ``Unet`` takes any timm backbone as a ``tu-<name>`` encoder (its ``features_only`` stages
at 1/2 .. 1/32, or 1/4 .. 1/32 for Transformer-style backbones, whose missing 1/2 skip smp leaves
empty) and adds a decoder of upsample + concatenate + two 3x3 conv-BN-ReLU blocks per stage. The
encoder is always built from scratch (``encoder_weights=None``): medlite never downloads weights.

Two registered defaults, one per paradigm; any timm backbone fits through ``model.kwargs.encoder``
(``tu-lcnet_050``, ``tu-edgenext_xx_small``; a plain timm name is given the ``tu-`` prefix).
The input side must be divisible by 2 ** encoder_depth (32 by default).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from medlite.errors import ConfigError
from medlite.models.registry import register_model

#: small decoder widths (smp's default 256/128/64/32/16 costs ~6x these MACs at 256 px)
DECODER_CHANNELS = (64, 32, 16, 12, 8)


def _encoder_name(encoder: str) -> str:
    """``tu-<timm name>`` (or one of smp's own encoders) -> the name smp takes; else ConfigError."""
    import segmentation_models_pytorch as smp
    import timm

    if encoder.startswith("tu-"):
        timm_name = encoder[3:]
    elif encoder in smp.encoders.get_encoder_names():
        return encoder
    else:
        timm_name = encoder
    if not timm.is_model(timm_name):
        raise ConfigError(
            f"model.kwargs.encoder={encoder!r}: {timm_name!r} is not a timm model "
            "(give a timm backbone, e.g. tu-mobilenetv3_small_100, tu-mobilevit_xxs)"
        )
    return f"tu-{timm_name}"


def timm_unet(
    num_classes: int,
    in_chans: int,
    img_size: int,
    encoder: str,
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] = DECODER_CHANNELS,
    decoder_attention: str | None = None,
    arch: str = "timm_unet",
) -> nn.Module:
    import segmentation_models_pytorch as smp

    factor = 2 ** int(encoder_depth)
    if img_size % factor:
        raise ConfigError(
            f"{arch} with encoder_depth={encoder_depth} needs an input side divisible by "
            f"{factor} (e.g. 64, 128, 256), got {img_size}; set data.size (or "
            f"model.input_size) to a multiple of {factor}"
        )
    if len(decoder_channels) != int(encoder_depth):
        raise ConfigError(
            f"{arch}: decoder_channels needs one width per encoder stage ({encoder_depth}), "
            f"got {list(decoder_channels)}"
        )
    return smp.Unet(
        encoder_name=_encoder_name(str(encoder)),
        encoder_depth=int(encoder_depth),
        encoder_weights=None,
        decoder_channels=[int(c) for c in decoder_channels],
        decoder_attention_type=decoder_attention,
        in_channels=in_chans,
        classes=num_classes,
    )


@register_model("unet_mobilenetv3", paradigm="cnn", min_size=32, task="segmentation")
def unet_mobilenetv3(
    num_classes: int,
    in_chans: int = 1,
    img_size: int = 64,
    encoder: str = "tu-mobilenetv3_small_100",
    **kwargs,
) -> nn.Module:
    """U-Net with a MobileNetV3-Small encoder (smp + timm, from scratch)."""
    return timm_unet(num_classes, in_chans, img_size, encoder, arch="unet_mobilenetv3", **kwargs)


@register_model("unet_mobilevit", paradigm="transformer", min_size=32, task="segmentation")
def unet_mobilevit(
    num_classes: int,
    in_chans: int = 1,
    img_size: int = 64,
    encoder: str = "tu-mobilevit_xxs",
    **kwargs,
) -> nn.Module:
    """U-Net with a MobileViT-XXS encoder (convolutions + Transformer blocks; smp + timm)."""
    return timm_unet(num_classes, in_chans, img_size, encoder, arch="unet_mobilevit", **kwargs)
