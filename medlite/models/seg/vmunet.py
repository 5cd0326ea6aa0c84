"""VM-UNet (Ruan & Xiang, 2024): a U-shaped encoder-decoder built only from VSS blocks, at a
small width.

Why: VMamba's VSS block (x + SS2D(LN(x)), medlite's :class:`~medlite.models.linear.vmamba.SS2D`)
gives every pixel a global receptive field in time linear in the number of pixels -- four
directional selective scans over the map -- which is what a segmentation decoder needs at high
resolution, where attention is quadratic. VM-UNet keeps the rest Swin-UNet-like, with no
convolutional stages:

- encoder: a 4x4 stride-4 patch embedding (+ LayerNorm), then four stages of VSS blocks with a
  patch merging (2x2 neighbours concatenated -> LayerNorm -> linear to twice the width) after
  each of the first three, so the bottleneck is at 1/32 of the input side;
- decoder: four stages mirroring the encoder; each (but the first) adds the map that entered
  the encoder stage of the same width, doubles the resolution with a patch expanding (linear to
  twice the width, rearranged into 2x2 sub-pixels of half the width, LayerNorm), then runs its
  VSS blocks;
- head: a final 4x patch expanding (linear to 4x the width, 4x4 sub-pixels of a quarter of the
  width) and a 1x1 conv to the class logits at the input's resolution.

The paper's network (dims 96..768, depths 2-2-2-2 / 2-2-2-1, ImageNet-pretrained VMamba
weights, d_state 16) has 27.4 M parameters; the default here keeps its depths at dims 16..128
with d_state 8 (0.92 M), from scratch. Input sides must be multiples of 32 (4 x 2 ** (stages -
1)); 64/128/256 px all work.

The VSS blocks are vmamba's own (:class:`~medlite.models.linear.vmamba.VSSBlock` with no MLP, as
in VM-UNet's v1 block): the scan runs in fp32 (C kernel on CPU, mamba_ssm on CUDA, export path
under tracing) and each SS2D is marked an ``fp32_island``.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from medlite.models.linear.vmamba import SS2D, VSSBlock
from medlite.models.registry import register_model
from medlite.models.seg.ultralight_vmunet import check_side

#: 4x patch embedding, then three 2x patch mergings
DIVISOR = 32


def to_subpixels(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(b, H, W, scale*scale*c) -> (b, scale*H, scale*W, c), channel-last (no batch named)."""
    c = x.shape[-1] // (scale * scale)
    x = x.unflatten(-1, (scale, scale, c)).permute(0, 1, 3, 2, 4, 5)  # (b, H, s, W, s, c)
    return x.flatten(1, 2).flatten(2, 3)


class PatchMerging(nn.Module):
    """2x2 neighbours -> channels (4c) -> LayerNorm -> linear to 2c; halves H and W."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, i::2, j::2] for j in (0, 1) for i in (0, 1)]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class PatchExpanding(nn.Module):
    """Linear to ``scale * out_dim * scale`` channels -> ``scale``x sub-pixels -> LayerNorm."""

    def __init__(self, dim: int, out_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_subpixels(self.expand(x), self.scale))


def vss_stage(dim: int, rates: list[float], d_state: int, expand: int) -> nn.Sequential:
    blocks = [VSSBlock(dim, r, mlp_ratio=0.0, d_state=d_state, expand=expand) for r in rates]
    for block in blocks:
        block.ss2d.fp32_island = True  # LinearComplexityModule runs it outside autocast
    return nn.Sequential(*blocks)


class VMUNet(nn.Module):
    """Patch embedding -> VSS encoder -> VSS decoder with additive skips -> 4x expand -> 1x1."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int = 256,
        dims: tuple[int, ...] = (16, 32, 64, 128),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        depths_decoder: tuple[int, ...] = (2, 2, 2, 1),
        d_state: int = 8,
        expand: int = 2,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if not len(dims) == len(depths) == len(depths_decoder) >= 2:
            raise ValueError("dims, depths and depths_decoder need one entry per stage (>= 2)")
        dims = tuple(int(d) for d in dims)
        if any(b != 2 * a for a, b in zip(dims, dims[1:], strict=False)):
            raise ValueError(f"VM-UNet doubles the width at every stage, got dims {dims}")
        check_side("vmunet", img_size, 4 * 2 ** (len(dims) - 1))
        self.patch_embed = nn.Conv2d(in_chans, dims[0], 4, stride=4)
        self.embed_norm = nn.LayerNorm(dims[0])

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.encoder = nn.ModuleList()
        self.merges = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            self.encoder.append(vss_stage(dim, rates[start : start + depth], d_state, expand))
            start += depth
            if i < len(dims) - 1:
                self.merges.append(PatchMerging(dim))

        # the decoder's stages mirror the encoder's: deepest first, rates falling
        rates = torch.linspace(0, drop_path_rate, sum(depths_decoder)).tolist()[::-1]
        self.decoder = nn.ModuleList()
        self.expands = nn.ModuleList()
        start = 0
        for i, depth in enumerate(depths_decoder):
            dim = dims[-1 - i]
            if i:
                self.expands.append(PatchExpanding(2 * dim, dim, 2))
            self.decoder.append(vss_stage(dim, rates[start : start + depth], d_state, expand))
            start += depth
        self.final_expand = PatchExpanding(dims[0], dims[0] // 4, 4)
        self.head = nn.Conv2d(dims[0] // 4, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # SS2D's linears keep Mamba's init (see vmamba); the rest as Swin-UNet / VM-UNet.
        in_ss2d = {id(m) for s in self.modules() if isinstance(s, SS2D) for m in s.modules()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in in_ss2d:
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.patch_embed(x).permute(0, 2, 3, 1))  # channel-last from here
        entering = []  # the map entering each encoder stage: the decoder's skips
        for i, stage in enumerate(self.encoder):
            entering.append(x)
            x = stage(x)
            if i < len(self.merges):
                x = self.merges[i](x)
        for i, stage in enumerate(self.decoder):
            if i:
                x = self.expands[i - 1](x + entering[-i])
            x = stage(x)
        x = self.final_expand(x).permute(0, 3, 1, 2)
        return self.head(x)


@register_model("vmunet", paradigm="linear", min_size=DIVISOR, task="segmentation")
def vmunet(num_classes: int, in_chans: int = 1, img_size: int = 256, **kwargs) -> VMUNet:
    """VM-UNet: VSS (SS2D) blocks in a U-shaped encoder-decoder, small width."""
    for key in ("dims", "depths", "depths_decoder"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return VMUNet(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
