"""UNeXt (Valanarasu & Patel, MICCAI 2022): convolution stages, then tokenized MLP stages.

Encoder: three 3x3 convolution stages (each BatchNorm, 2x max-pool, ReLU), then two tokenized
MLP stages: an overlapping patch embedding (3x3 conv, stride 2) turns the map into tokens, and a
*shifted MLP* block mixes them. A shifted MLP shifts groups of channels by -2..2 pixels along the
height before its first linear layer and along the width before its second, so each token sees
its neighbours along both axes; a depthwise 3x3 convolution between the two linear layers adds
positional information. The decoder mirrors it (two shifted-MLP stages, then convolutions) and
*adds* each skip; every decoder stage upsamples 2x (bilinear).

The input side must be divisible by 32 (five 2x reductions).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from medlite.errors import ConfigError
from medlite.models.registry import register_model
from medlite.models.seg._layers import max_pool2

_REDUCTIONS = 5


def _shift(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Shift ``groups`` channel groups of an (N, C, H, W) map by -g//2 .. g//2 pixels along
    ``dim`` (2: height, 3: width), filling with zeros (not wrapping around)."""
    pad = groups // 2
    padded = F.pad(x, (pad, pad, pad, pad))
    chunks = torch.tensor_split(padded, groups, dim=1)  # exactly `groups` parts
    shifted = torch.cat(
        [
            torch.roll(chunk, s, dims=dim)
            for chunk, s in zip(chunks, range(-pad, pad + 1), strict=True)
        ],
        dim=1,
    )
    h, w = x.shape[2:]
    return shifted[:, :, pad : pad + h, pad : pad + w]


class ShiftedMLP(nn.Module):
    """Shift along H -> linear -> depthwise conv -> GELU -> shift along W -> linear."""

    def __init__(self, dim: int, hidden: int, shift_groups: int = 5, drop: float = 0.0) -> None:
        super().__init__()
        self.shift_groups = shift_groups
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    @staticmethod
    def _to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    @staticmethod
    def _to_tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = _shift(self._to_map(tokens, h, w), self.shift_groups, dim=2)
        x = self.fc1(self._to_tokens(x))
        x = self.act(self.dwconv(self._to_map(x, h, w)))
        x = self.drop(x)
        x = _shift(x, self.shift_groups, dim=3)
        return self.drop(self.fc2(self._to_tokens(x)))


class TokMLPBlock(nn.Module):
    """Pre-norm residual shifted-MLP block on tokens (N, H*W, C)."""

    def __init__(self, dim: int, mlp_ratio: float = 1.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = ShiftedMLP(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return tokens + self.mlp(self.norm(tokens), h, w)


class TokStage(nn.Module):
    """A tokenized MLP stage on an (N, C, H, W) map: blocks, then LayerNorm; returns a map."""

    def __init__(self, dim: int, depth: int, mlp_ratio: float, drop: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TokMLPBlock(dim, mlp_ratio, drop) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return self.norm(tokens).transpose(1, 2).reshape(n, c, h, w)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: 3x3 conv, stride 2, then LayerNorm over channels."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))


class UNeXt(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        conv_dims: tuple[int, int, int] = (16, 32, 128),
        token_dims: tuple[int, int] = (160, 256),
        depth: int = 1,
        mlp_ratio: float = 1.0,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        c1, c2, c3 = conv_dims
        t1, t2 = token_dims
        self.enc_convs = nn.ModuleList([_conv_bn(in_chans, c1), _conv_bn(c1, c2), _conv_bn(c2, c3)])
        self.embed1, self.embed2 = PatchEmbed(c3, t1), PatchEmbed(t1, t2)
        self.enc_tok1 = TokStage(t1, depth, mlp_ratio, drop)
        self.enc_tok2 = TokStage(t2, depth, mlp_ratio, drop)
        # decoder, deepest first: t2 -> t1 -> c3 -> c2 -> c1 -> c1
        self.dec_convs = nn.ModuleList(
            [_conv_bn(t2, t1), _conv_bn(t1, c3), _conv_bn(c3, c2), _conv_bn(c2, c1)]
            + [_conv_bn(c1, c1)]
        )
        self.dec_tok1 = TokStage(t1, depth, mlp_ratio, drop)
        self.dec_tok2 = TokStage(c3, depth, mlp_ratio, drop)
        self.head = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for conv in self.enc_convs:
            x = F.relu(max_pool2(conv(x)))
            skips.append(x)  # 1/2, 1/4, 1/8
        x = self.enc_tok1(self.embed1(x))
        skips.append(x)  # 1/16
        x = self.enc_tok2(self.embed2(x))  # 1/32: the bottleneck
        for i, conv in enumerate(self.dec_convs):
            x = F.interpolate(conv(x), scale_factor=2.0, mode="bilinear")
            x = F.relu(x)
            if skips:
                x = x + skips.pop()
            if i == 0:
                x = self.dec_tok1(x)
            elif i == 1:
                x = self.dec_tok2(x)
        return self.head(x)


@register_model("unext", paradigm="cnn", min_size=32, task="segmentation")
def unext(
    num_classes: int,
    in_chans: int = 1,
    img_size: int = 64,
    conv_dims: tuple[int, int, int] = (16, 32, 128),
    token_dims: tuple[int, int] = (160, 256),
    depth: int = 1,
    mlp_ratio: float = 1.0,
    drop: float = 0.0,
) -> nn.Module:
    """UNeXt: conv stages + tokenized (shifted) MLP stages (~1.5 M parameters)."""
    factor = 2**_REDUCTIONS
    if img_size % factor:
        raise ConfigError(
            f"unext needs an input side divisible by {factor} (e.g. 64, 128, 256), got "
            f"{img_size}; set data.size (or model.input_size) to a multiple of {factor}"
        )
    if len(conv_dims) != 3 or len(token_dims) != 2:
        raise ConfigError(
            f"unext: conv_dims needs 3 widths and token_dims 2, got {list(conv_dims)}, "
            f"{list(token_dims)}"
        )
    return UNeXt(
        num_classes,
        in_chans,
        tuple(int(c) for c in conv_dims),
        tuple(int(t) for t in token_dims),
        int(depth),
        float(mlp_ratio),
        float(drop),
    )
