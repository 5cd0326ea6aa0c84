"""CIFAR-style ResNet-18/50: MONAI's ``ResNet`` as MedMNIST v2's "ResNet-18 (28)" / "ResNet-50 (28)".

Why: these are the 28 px baselines of the MedMNIST v2 paper (Yang et al., Scientific Data 2023),
the ``ResNet18``/``ResNet50`` classes of the official ``MedMNIST/experiments`` ``models.py``
(adapted from kuangliu/pytorch-cifar). timm's ``resnet18``/``resnet50`` (conf/model/resnet18.yaml)
are the ImageNet nets, with a 7x7 stride-2 stem and a max-pool, so they downsample 32x and end on
a 1x1 map at 28 px; these downsample 8x (layer4 sees 4x4 at 28 px), like the paper's.

Architecture: a 3x3 stride-1 conv stem (64 channels) + BN + ReLU and no max-pool, four stages of
BasicBlock [2, 2, 2, 2] (ResNet-18) or Bottleneck [3, 4, 6, 3] (ResNet-50, expansion 4) with
widths 64/128/256/512 (stages 2-4 stride 2), 1x1-conv + BN projection shortcuts ("B", without
bias, as in the official code) where the stride or width changes, global average pool, linear
head. tests/models/test_resnet_cifar.py checks it against a plain-PyTorch copy of the official
classes: same parameter shapes in the same order, and the same logits with the same weights.

Size policy: native (the stem does not adapt), so MACs grow with the square of the input side.
"""

from __future__ import annotations

from torch import nn

from medlite.models.registry import register_model

WIDTHS = [64, 128, 256, 512]


def cifar_resnet(
    block: str, layers: list[int], num_classes: int, in_chans: int, widen_factor: float = 1.0
) -> nn.Module:
    """MONAI ``ResNet`` with the official MedMNIST 28 px stem, stages and shortcuts."""
    from monai.networks.nets import ResNet

    return ResNet(
        block=block,
        layers=layers,
        block_inplanes=WIDTHS,
        spatial_dims=2,
        n_input_channels=in_chans,
        conv1_t_size=3,
        conv1_t_stride=1,
        no_max_pool=True,
        shortcut_type="B",
        bias_downsample=False,  # MONAI's default True adds a bias the official shortcuts lack
        widen_factor=widen_factor,
        num_classes=num_classes,
    )


@register_model("resnet18_cifar", paradigm="cnn", min_size=28)
def resnet18_cifar(
    num_classes: int, in_chans: int = 1, img_size: int = 28, widen_factor: float = 1.0
) -> nn.Module:
    """CIFAR-style ResNet-18 (MONAI): MedMNIST v2's "ResNet-18 (28)"."""
    return cifar_resnet("basic", [2, 2, 2, 2], num_classes, in_chans, widen_factor)


@register_model("resnet50_cifar", paradigm="cnn", min_size=28)
def resnet50_cifar(
    num_classes: int, in_chans: int = 1, img_size: int = 28, widen_factor: float = 1.0
) -> nn.Module:
    """CIFAR-style ResNet-50 (MONAI): MedMNIST v2's "ResNet-50 (28)"."""
    return cifar_resnet("bottleneck", [3, 4, 6, 3], num_classes, in_chans, widen_factor)
