"""Vim-3D: Vision Mamba's bidirectional selective-scan blocks over the tokens of a volume.

Why: self-attention over a volume's tokens costs O(L^2) with L growing as the cube of the side;
a selective scan (Mamba) costs O(L). Vim (Zhu et al., ICML 2024) scans the flattened tokens
forwards and backwards so every token sees every other one; here the tokens come from a 3D
conv stem and are flattened D-major (raster order). The blocks are :mod:`medlite.models.linear.vim`'s
own ``VimBlock`` (one grouped ``selective_scan`` for both directions), so the scan's MACs reach
:func:`medlite.efficiency.profile_model` through ``efficiency.add_macs`` exactly as 2D Vim's do.

Size policy (:func:`~medlite.models.volume.common.stride_for`): the stem stride (= patch) is the
smallest power of two >= 4 leaving at most 8 tokens per side: 28^3 -> 4 (7^3 = 343 tokens),
32 -> 4 (8^3), 48 -> 8 (6^3), 64 -> 8 (8^3 = 512). ``patch_size=`` overrides it. The stem is
``log2(patch)`` overlapping 3^3 stride-2 convs (:func:`~medlite.models.linear.vim.conv_stem` with ``dims=3``),
not one stride-p conv, as in 2D Vim. Mean-pooled tokens feed the head.

Defaults (conf/model/vim3d.yaml): dim 64, depth 4, d_state 8, expand 2 -- 0.22 M parameters.
"""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import nn

from medlite.models.linear.vim import VimBlock, conv_stem, stem_output_side
from medlite.models.registry import register_model
from medlite.models.volume.common import stride_for


class Vim3d(nn.Module):
    """Conv stem -> tokens + learned position embedding -> scan blocks -> mean pool -> head.

    Subclasses change the token mixer by overriding :meth:`make_block`.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int = 28,
        embed_dim: int = 64,
        depth: int = 4,
        patch_size: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        **block_kw,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size or stride_for(img_size, max_side=8, min_stride=4)
        side = stem_output_side(img_size, self.patch_size)
        self.grid = (side, side, side)
        self.stem = conv_stem(in_chans, embed_dim, self.patch_size, dims=3)
        self.stem_norm = nn.LayerNorm(embed_dim)
        self.num_tokens = side**3
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(self.make_block(embed_dim, r, **block_kw) for r in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self.num_features = embed_dim
        self._init_weights(depth)

    def make_block(
        self, dim: int, drop_path: float, d_state: int = 8, expand: int = 2, d_conv: int = 4
    ) -> nn.Module:
        return VimBlock(dim, drop_path, d_state=d_state, expand=expand, d_conv=d_conv)

    def _init_weights(self, depth: int) -> None:
        # As 2D Vim: mixer linears keep Mamba's default init; residual branches shrink by depth.
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        for block in self.blocks:
            block.mixer.out_proj.weight.data.div_(math.sqrt(depth))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token features (batch, tokens, dim) after the final norm, tokens D-major."""
        x = self.stem_norm(self.stem(x).flatten(2).transpose(1, 2)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x).mean(dim=1)))


@register_model("vim3d", paradigm="linear", min_size=28, task="classification", dims=3)
def vim3d(num_classes: int, in_chans: int = 1, img_size: int = 28, **kwargs) -> Vim3d:
    """Vision Mamba on volume tokens: bidirectional selective scans in raster order."""
    return Vim3d(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
