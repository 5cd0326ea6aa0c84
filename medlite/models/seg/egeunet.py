"""EGE-UNet (Ruan et al., MICCAI 2023): a ~50 K-parameter U-Net for lesion segmentation.

Six encoder stages (three plain 3x3 convolutions, then three GHPA blocks) and a mirrored decoder
that *adds* (not concatenates) each skip. Two ideas keep it small:

- **GHPA**, grouped multi-axis Hadamard product attention: the channels are split into four
  groups; three of them are multiplied elementwise by a learned map over one pair of axes each
  (height x width, channel x height, channel x width), the map being a small learned tensor
  resized to the feature's size and refined by a depthwise + pointwise convolution; the fourth
  group goes through a plain depthwise convolution. Cost is linear in the number of pixels.
- **GAB**, the group aggregation bridge: each skip is rebuilt from the encoder feature, the
  (upsampled) bridge output of the level below and a one-channel coarse mask predicted by the
  decoder at that level; the three are split into four groups, each mixed by a depthwise 3x3
  convolution with its own dilation (1, 2, 5, 7), and fused by a pointwise convolution.

The paper trains the five coarse masks with deep supervision; medlite's segmentation task scores
only the final logits, so here they are learned end to end as one-channel guidance maps (they
still receive gradients through the bridges). The output is logits, not sigmoid probabilities,
with one channel per class (multi-class works too), upsampled to the input's size.

The input side must be divisible by 32 (five 2x poolings).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from medlite.errors import ConfigError
from medlite.models.registry import register_model
from medlite.models.seg._layers import ChannelNorm, GroupNorm2d, max_pool2

_POOLS = 5  # the first five encoder stages halve the resolution


def _refine(channels: int, conv: type[nn.Module]) -> nn.Sequential:
    """Depthwise 3-tap conv, GELU, pointwise conv (``conv`` is Conv1d or Conv2d)."""
    return nn.Sequential(
        conv(channels, channels, 3, padding=1, groups=channels),
        nn.GELU(),
        conv(channels, channels, 1),
    )


class HadamardAttention(nn.Module):
    """GHPA: grouped multi-axis Hadamard product attention, ``dim_in`` -> ``dim_out`` channels.

    (An attention-named class: structured pruning keeps token mixers like it whole.)
    """

    def __init__(self, dim_in: int, dim_out: int, grid: int = 8) -> None:
        super().__init__()
        if dim_in % 4:
            raise ConfigError(f"egeunet: GHPA needs channels divisible by 4, got {dim_in}")
        g = dim_in // 4
        # learned maps, resized to the feature's size at run time (initialised to identity: 1)
        self.map_hw = nn.Parameter(torch.ones(1, g, grid, grid))
        self.map_ch = nn.Parameter(torch.ones(1, 1, g, grid))
        self.map_cw = nn.Parameter(torch.ones(1, 1, g, grid))
        self.refine_hw = _refine(g, nn.Conv2d)
        self.refine_ch = _refine(g, nn.Conv1d)
        self.refine_cw = _refine(g, nn.Conv1d)
        self.local = nn.Sequential(
            nn.Conv2d(g, g, 1), nn.GELU(), nn.Conv2d(g, g, 3, padding=1, groups=g)
        )
        self.norm_in = ChannelNorm(dim_in)
        self.norm_out = ChannelNorm(dim_in)
        self.project = nn.Sequential(
            nn.Conv2d(dim_in, dim_in, 3, padding=1, groups=dim_in),
            nn.GELU(),
            nn.Conv2d(dim_in, dim_out, 1),
        )

    @staticmethod
    def _resize(param: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(param, size=size, mode="bilinear", align_corners=True)

    def _axis_map(self, param: torch.Tensor, refine: nn.Module, c: int, n: int) -> torch.Tensor:
        """A (1, 1, c, n) map over channel x one spatial axis, refined along that axis."""
        m = self._resize(param, (c, n))[0]  # (1, c, n): channels of the 1-D conv = c
        return refine(m).unsqueeze(0)  # (1, 1, c, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(x)
        a, b, c, d = torch.chunk(x, 4, dim=1)
        g, h, w = a.shape[1:]
        # height x width: one map per channel of the group
        a = a * self.refine_hw(self._resize(self.map_hw, (h, w)))
        # channel x height, shared over the width: (N, C, H, W) -> (N, W, C, H)
        b = b.permute(0, 3, 1, 2) * self._axis_map(self.map_ch, self.refine_ch, g, h)
        b = b.permute(0, 2, 3, 1)
        # channel x width, shared over the height: (N, C, H, W) -> (N, H, C, W)
        c = c.permute(0, 2, 1, 3) * self._axis_map(self.map_cw, self.refine_cw, g, w)
        c = c.permute(0, 2, 1, 3)
        d = self.local(d)
        x = self.norm_out(torch.cat([a, b, c, d], dim=1))
        return self.project(x)


class GAB(nn.Module):
    """Group aggregation bridge: encoder skip + deeper bridge output + coarse mask -> new skip."""

    def __init__(self, dim_deep: int, dim_skip: int, dilations=(1, 2, 5, 7)) -> None:
        super().__init__()
        if dim_skip % 4:
            raise ConfigError(f"egeunet: GAB needs channels divisible by 4, got {dim_skip}")
        self.align = nn.Conv2d(dim_deep, dim_skip, 1)
        width = dim_skip // 2 + 1  # a quarter of each input plus the mask
        self.groups = nn.ModuleList(
            nn.Sequential(
                ChannelNorm(width),
                nn.Conv2d(width, width, 3, padding=r, dilation=r, groups=width),
            )
            for r in dilations
        )
        self.fuse = nn.Sequential(
            ChannelNorm(width * len(dilations)), nn.Conv2d(width * len(dilations), dim_skip, 1)
        )

    def forward(self, deep: torch.Tensor, skip: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        deep = F.interpolate(
            self.align(deep), size=skip.shape[2:], mode="bilinear", align_corners=True
        )
        n = len(self.groups)
        parts = zip(torch.chunk(deep, n, dim=1), torch.chunk(skip, n, dim=1), strict=True)
        mixed = [
            group(torch.cat([h, s, mask], dim=1))
            for group, (h, s) in zip(self.groups, parts, strict=True)
        ]
        return self.fuse(torch.cat(mixed, dim=1))


class EGEUNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        channels: tuple[int, ...] = (8, 16, 24, 32, 48, 64),
        bridge: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != 6:
            raise ConfigError(f"egeunet: channels needs 6 widths, got {list(channels)}")
        c = list(channels)
        widths = [in_chans] + c
        # encoder: three plain convolutions, then three GHPA blocks (the last without pooling)
        self.encoder = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, padding=1)
            if i < 3
            else HadamardAttention(*widths[i : i + 2])
            for i in range(6)
        )
        self.enc_norm = nn.ModuleList(GroupNorm2d(4, w) for w in c[:5])
        # decoder, deepest first: c5 -> c4 -> ... -> c0; GHPA in the three deep stages
        self.decoder = nn.ModuleList(
            HadamardAttention(c[5 - i], c[4 - i])
            if i < 3
            else nn.Conv2d(c[5 - i], c[4 - i], 3, padding=1)
            for i in range(5)
        )
        self.dec_norm = nn.ModuleList(GroupNorm2d(4, c[4 - i]) for i in range(5))
        self.bridge = bridge
        if bridge:
            self.masks = nn.ModuleList(nn.Conv2d(c[4 - i], 1, 1) for i in range(5))
            self.bridges = nn.ModuleList(GAB(c[5 - i], c[4 - i]) for i in range(5))
        self.head = nn.Conv2d(c[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x)
            if i < 5:
                x = max_pool2(self.enc_norm[i](x))
            x = F.gelu(x)
            skips.append(x)
        # skips: 5 pooled encoder outputs (1/2 .. 1/32) and the bottleneck (1/32)
        deep = skips.pop()
        for i, block in enumerate(self.decoder):
            x = self.dec_norm[i](block(x))
            if i > 0:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
            x = F.gelu(x)
            skip = skips.pop()
            if self.bridge:
                skip = self.bridges[i](deep, skip, self.masks[i](x))
                deep = skip
            x = x + skip
        logits = self.head(x)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


@register_model("egeunet", paradigm="cnn", min_size=32, task="segmentation")
def egeunet(
    num_classes: int,
    in_chans: int = 1,
    img_size: int = 64,
    channels: tuple[int, ...] = (8, 16, 24, 32, 48, 64),
    bridge: bool = True,
) -> nn.Module:
    """EGE-UNet: GHPA blocks and group aggregation bridges (~50 K parameters)."""
    factor = 2**_POOLS
    if img_size % factor:
        raise ConfigError(
            f"egeunet needs an input side divisible by {factor} (e.g. 64, 128, 256), got "
            f"{img_size}; set data.size (or model.input_size) to a multiple of {factor}"
        )
    bad = [w for w in channels if int(w) % 4]
    if bad:
        raise ConfigError(f"egeunet: every width in channels must be divisible by 4, got {bad}")
    return EGEUNet(num_classes, in_chans, tuple(int(w) for w in channels), bridge)
