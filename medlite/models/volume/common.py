"""Size policies and small layers the 3D models share.

A volume of side s has s^3 voxels, so the first feature map's side drives the cost cubically:
every model here picks its stem stride (or patch) from ``img_size`` so that 28^3 and 64^3 inputs
land on maps of similar side instead of costing 12x more at 64.
"""

from __future__ import annotations

from torch import nn


def stride_for(img_size: int, max_side: int, min_stride: int = 1) -> int:
    """Smallest power-of-two stride >= ``min_stride`` leaving a map of at most ``max_side``."""
    stride = min_stride
    while -(-img_size // stride) > max_side:
        stride *= 2
    return stride


def conv_bn_act(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv3d (no bias) + BatchNorm3d (+ SiLU)."""
    layers: list[nn.Module] = [
        nn.Conv3d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm3d(cout),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


def init_convs(model: nn.Module) -> None:
    """Kaiming fan-out init of every Conv3d (as LiteCNN's convs): stable from scratch with BN."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
