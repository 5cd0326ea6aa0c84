"""MobileNetV2-3D: inverted residuals with depthwise 3D convolutions, sized for 28^3-64^3.

Why: a full 3x3x3 conv costs 27 C^2 MACs per voxel, which is what makes 3D ResNets slow on a
CPU; MobileNetV2's block (Sandler et al., CVPR 2018) spends them as 1x1x1 expand -> depthwise
3x3x3 (27 C, not 27 C^2) -> 1x1x1 project, and Köpüklü et al. ("Resource efficient 3D
convolutional neural networks", ICCVW 2019) showed it carries over to volumes. medlite's default
3D student (conf/data_medmnist3d.yaml).

Size policy (:func:`~medlite.models.volume.common.stride_for`, first map <= 16 per side): the
stem stride is the smallest power of two >= 2 doing so: 28^3 -> stride 2 (14^3), 32 -> 2 (16^3),
48 -> 4 (12^3), 64 -> 4 (16^3). Three stride-2 stages follow, so the last map is 2^3 at 28^3
and 64^3 alike and the cost stays roughly flat in the input size. ``stem_stride=`` overrides it.
``width_mult`` scales every width (rounded to multiples of 8); 1.0 is 0.26 M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from medlite.models.registry import register_model
from medlite.models.volume.common import conv_bn_act, init_convs, stride_for

# (expansion t, channels c, repeats n, stride s) per stage, as in MobileNetV2's table 2
STAGES = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 2), (4, 96, 2, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a width to a multiple of ``divisor``, never below 90% of it (MobileNet's rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class InvertedResidual3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, hidden, 1))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            conv_bn_act(hidden, cout, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2_3d(nn.Module):
    """Stem, MobileNetV2 stages of depthwise-3D inverted residuals, 1x1x1 head, pool, linear."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int = 28,
        width_mult: float = 1.0,
        stem_width: int = 16,
        head_dim: int = 256,
        drop_rate: float = 0.2,
        stem_stride: int | None = None,
    ) -> None:
        super().__init__()
        self.stem_stride = stem_stride or stride_for(img_size, max_side=16, min_stride=2)
        cin = make_divisible(stem_width * width_mult)
        self.stem = conv_bn_act(in_chans, cin, 3, self.stem_stride)
        blocks: list[nn.Module] = []
        for t, c, n, s in STAGES:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual3d(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.stages = nn.Sequential(*blocks)
        head = make_divisible(head_dim * max(1.0, width_mult))
        self.head = conv_bn_act(cin, head, 1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(head, num_classes)
        self.num_features = head
        init_convs(self)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(self.forward_features(x)).flatten(1)))


@register_model("mobilenetv2_3d", paradigm="cnn", min_size=28, task="classification", dims=3)
def mobilenetv2_3d(
    num_classes: int, in_chans: int = 1, img_size: int = 28, **kwargs
) -> MobileNetV2_3d:
    """MobileNetV2 in 3D: depthwise 3x3x3 inverted residuals (medlite's default 3D student)."""
    return MobileNetV2_3d(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
