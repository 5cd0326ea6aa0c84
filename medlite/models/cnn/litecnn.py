"""LiteCNN: a small inverted-residual CNN sized for MedMNIST's 28-224 px inputs.

ImageNet lightweight CNNs downsample 32x, so at 28 px their last stages see a 1x1 map and they
train poorly from scratch on a few hundred images. LiteCNN keeps MobileNetV2/V3's building block
(expand -> depthwise -> squeeze-excite -> project, with a residual) but chooses the stem stride
from the input size so the first stage always works on a 28-56 px map, and downsamples only 8x
after it. About 0.5 M parameters at medlite's default widths (conf/model/litecnn.yaml).
"""

from __future__ import annotations

import torch
from torch import nn

from medlite.models.registry import register_model


def stem_stride_for(img_size: int) -> int:
    """The stem stride that brings an input of ``img_size`` to a 28-56 px first feature map."""
    stride = 1
    while img_size // (stride * 2) >= 28:
        stride *= 2
    return stride


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.SiLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(self.pool(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
            SqueezeExcite(hidden) if se else nn.Identity(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class LiteCNN(nn.Module):
    """Stem, three stages of inverted residuals (each halves the map), 1x1 head, pooling, linear."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int = 28,
        widths: tuple[int, ...] = (32, 48, 96, 160),
        depths: tuple[int, ...] = (2, 2, 2),
        expand: int = 4,
        se: bool = True,
        head_dim: int = 384,
        drop_rate: float = 0.2,
        stem_stride: int | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths) + 1:
            raise ValueError("widths needs one entry for the stem plus one per stage")
        self.stem_stride = stem_stride or stem_stride_for(img_size)
        stem_k = 3 if self.stem_stride == 1 else 2 * self.stem_stride - 1
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], stem_k, self.stem_stride, stem_k // 2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.SiLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        cin = widths[0]
        for cout, depth in zip(widths[1:], depths, strict=True):
            for i in range(depth):
                blocks.append(InvertedResidual(cin, cout, 2 if i == 0 else 1, expand, se))
                cin = cout
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(cin, head_dim, 1, bias=False), nn.BatchNorm2d(head_dim), nn.SiLU(inplace=True)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(head_dim, num_classes)
        self.num_features = head_dim
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(self.forward_features(x)), 1)))


@register_model("litecnn", paradigm="cnn", min_size=28)
def litecnn(num_classes: int, in_chans: int = 1, img_size: int = 28, **kwargs) -> LiteCNN:
    """Inverted-residual CNN with an input-size-aware stem (medlite's default model)."""
    return LiteCNN(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
