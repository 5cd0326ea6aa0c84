"""Small layers shared by medlite's own segmentation networks (no models are registered here)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling, computed in channels-last layout.

    PyTorch's CPU kernel for NCHW max-pooling is slow on wide maps with few channels (a fifth of
    EGE-UNet's and a quarter of UNeXt's batch-1 CPU time at 256 px); its channels-last kernel is
    ~5x faster, which more than pays for the two layout copies. Same values either way.
    """
    out = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2)
    return out.contiguous()


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) map, at every pixel.

    Written out rather than ``F.layer_norm`` on a permuted map: on CPU the permutes cost more
    than the normalisation for the wide, few-channel maps these networks have.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class GroupNorm2d(nn.Module):
    """GroupNorm written out in elementary ops (same values as ``nn.GroupNorm``).

    ``nn.GroupNorm`` exports to ONNX as InstanceNormalization between reshapes, a pattern ONNX
    Runtime's static int8 quantiser rejects ("quantization parameter shared mode is not
    supported for weight"); written out, the network quantises (compress=ptq).
    """

    def __init__(self, groups: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"{channels} channels can't be split into {groups} groups")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        g = x.reshape(shape[0], self.groups, -1)
        mean = g.mean(dim=2, keepdim=True)
        var = (g - mean).pow(2).mean(dim=2, keepdim=True)
        x = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(shape)
        return x * self.weight[:, None, None] + self.bias[:, None, None]
