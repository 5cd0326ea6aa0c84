"""VMamba / MedMamba-style hierarchical model with SS2D (2D selective scan) blocks.

Why: a 1D scan over an image flattened row by row sees only what came before in that order.
SS2D (Liu et al., VMamba, 2024) scans the feature map in four directions -- row-major,
column-major and both reversed -- each with its own (dt, B, C) projections, and sums the four
outputs back onto the 2D grid, so every position receives information from the whole map.
MedMamba (Yue & Li, 2024) wraps SS2D in an SS-Conv-SSM block: half the channels go through a
small conv branch (local texture, which matters in medical images), the other half through
SS2D (global context); the halves are concatenated and channel-shuffled so the next block mixes
them.

Size policy (``stem_stride_for``): an overlapping conv stem of stride-2 3x3 convs whose total
stride is the smallest power of two >= 2 leaving a first map of at most 16 px per side:
28 px -> stride 2 (14x14), 64 -> 4 (16x16), 128 -> 8 (16x16), 224 -> 16 (14x14). Each later
stage halves the map (3x3 stride-2 conv + LayerNorm; odd sides round up: 7 -> 4), so at 28 px
the three default stages work on 14x14, 7x7 and 4x4 maps (scan lengths 196, 49, 16). No
resizing is needed; ``stem_stride=`` overrides the policy.

Blocks: ``block="ssconv"`` (default, MedMamba's SS-Conv-SSM) or ``block="vss"`` (VMamba's plain
block: x + SS2D(LN(x)), then x + MLP(LN(x)) when ``mlp_ratio > 0``). SS2D: in_proj (x, z) ->
depthwise 3x3 conv -> SiLU -> 4-direction selective scan (one grouped ``selective_scan`` call
with 4 x d_inner channels) -> merge -> LayerNorm -> * SiLU(z) -> out_proj.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from medlite.models.linear.vim import MultiScanSSM, conv_stem
from medlite.models.registry import register_model


def stem_stride_for(img_size: int, max_side: int = 16) -> int:
    """Smallest power-of-two stride >= 2 bringing ``img_size`` to <= ``max_side`` px."""
    stride = 2
    while img_size // stride > max_side:
        stride *= 2
    return stride


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(batch, d, H, W) -> (batch, 4, d, H*W): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`cross_scan` with summation: (batch, 4, d, H*W) -> (batch, d, H, W)."""
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    cols = cols.unflatten(-1, (width, height)).transpose(2, 3)
    return rows.unflatten(-1, (height, width)) + cols


class SS2D(nn.Module):
    """2D selective scan on a channel-last map (batch, H, W, dim) -> same shape."""

    def __init__(
        self,
        dim: int,
        d_state: int = 8,
        expand: int = 2,
        d_conv: int = 3,
        dt_rank: int | None = None,
    ) -> None:
        super().__init__()
        d_inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner)
        self.ssm = MultiScanSSM(d_inner, d_state, dt_rank or math.ceil(dim / 16), directions=4)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv2d(u.permute(0, 3, 1, 2)))
        y = cross_merge(self.ssm(cross_scan(u)), h, w).permute(0, 2, 3, 1)
        return self.out_proj(self.out_norm(y) * F.silu(z))


class ConvBranch(nn.Module):
    """MedMamba's local branch: two 3x3 convs and a 1x1, channel-last in and out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.SiLU(inplace=True),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.SiLU(inplace=True),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups (channel-last)."""
    c = x.shape[-1]
    return x.unflatten(-1, (groups, c // groups)).transpose(-1, -2).flatten(-2)


class SSConvBlock(nn.Module):
    """SS-Conv-SSM: split channels, conv branch || SS2D branch, concat, shuffle, residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, **ss2d_kw) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"ssconv blocks need an even width, got {dim}")
        half = dim // 2
        self.conv = ConvBranch(half)
        self.norm = nn.LayerNorm(half)
        self.ss2d = SS2D(half, **ss2d_kw)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=-1)
        out = torch.cat([self.conv(left), self.ss2d(self.norm(right))], dim=-1)
        return x + self.drop_path(channel_shuffle(out, 2))


class VSSBlock(nn.Module):
    """VMamba's plain block: x + SS2D(LN(x)), then x + MLP(LN(x)) if ``mlp_ratio`` > 0."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 2.0, **ss2d_kw) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ss2d = SS2D(dim, **ss2d_kw)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        hidden = int(dim * mlp_ratio)
        self.mlp = (
            nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
            )
            if hidden
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ss2d(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(x))
        return x


class Downsample(nn.Module):
    """3x3 stride-2 conv + LayerNorm between stages (odd sides round up), channel-last."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class VMamba(nn.Module):
    """Conv stem -> stages of SS2D blocks with downsampling between them -> mean pool -> linear."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int = 28,
        dims: tuple[int, ...] = (32, 64, 128),
        depths: tuple[int, ...] = (1, 2, 2),
        block: str = "ssconv",
        d_state: int = 8,
        expand: int = 2,
        mlp_ratio: float = 2.0,
        stem_stride: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError("dims and depths need one entry per stage")
        if block not in ("ssconv", "vss"):
            raise ValueError(f"block must be 'ssconv' or 'vss', got {block!r}")
        self.stem_stride = stem_stride or stem_stride_for(img_size)
        self.stem = conv_stem(in_chans, dims[0], self.stem_stride)

        rates = iter(torch.linspace(0, drop_path_rate, sum(depths)).tolist())
        self.stages = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            layers: list[nn.Module] = [Downsample(dims[i - 1], dim)] if i else []
            for _ in range(depth):
                kw = {"d_state": d_state, "expand": expand}
                if block == "ssconv":
                    layers.append(SSConvBlock(dim, next(rates), **kw))
                else:
                    layers.append(VSSBlock(dim, next(rates), mlp_ratio=mlp_ratio, **kw))
            self.stages.append(nn.Sequential(*layers))
        self.norm = nn.LayerNorm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes)
        self.num_features = dims[-1]
        self._init_weights()

    def _init_weights(self) -> None:
        # SS2D's linears keep PyTorch's default (Mamba's) init: B, C and u all come from in_proj,
        # so a std-0.02 init would shrink the scan path cubically at the start.
        in_ss2d = {id(m) for s in self.modules() if isinstance(s, SS2D) for m in s.modules()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in in_ss2d:
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and m.groups == 1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Channel-last final feature map (batch, H, W, dim) after the final norm."""
        x = self.stem(x).permute(0, 2, 3, 1)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x).mean(dim=(1, 2))))


@register_model("vmamba", paradigm="linear", min_size=28)
def vmamba(num_classes: int, in_chans: int = 1, img_size: int = 28, **kwargs) -> VMamba:
    """VMamba/MedMamba: hierarchical 4-direction 2D selective scan (SS2D), SS-Conv-SSM blocks."""
    if "dims" in kwargs:
        kwargs["dims"] = tuple(kwargs["dims"])
    if "depths" in kwargs:
        kwargs["depths"] = tuple(kwargs["depths"])
    return VMamba(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
