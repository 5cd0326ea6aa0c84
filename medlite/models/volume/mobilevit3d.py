"""MobileViT-3D: depthwise-3D inverted residuals, then MobileViT blocks on the coarse maps.

Why: MobileViT (Mehta & Rastegari, ICLR 2022) lets convolutions do the local work and a small
transformer the global work, on patches instead of pixels, so attention stays cheap. In 3D this
matters more: a 7^3 map is 343 positions, but with 2x2x2 patches each attention runs over
ceil(7/2)^3 = 64 patches (one sequence per position inside the patch, 8 of them).

MobileViT block (3D): depthwise 3^3 conv -> 1x1x1 to ``dim`` (local) -> unfold into 2x2x2
patches -> transformer layers across patches -> fold -> 1x1x1 back to C -> concatenate with the
block's input -> 1x1x1 + depthwise 3^3 fusion. Maps whose side is not a multiple of the patch
are zero-padded for the transformer and cropped after.

Size policy: :mod:`.mobilenet3d`'s stem (first map <= 16 per side: 28^3 -> 14^3, 64^3 -> 16^3),
then two stride-2 stages, each followed by a MobileViT block: at 28^3 they see 7^3 and 4^3, at
64^3 8^3 and 4^3. ``stem_stride=`` overrides it. ~0.29 M parameters at the defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from medlite.models.registry import register_model
from medlite.models.volume.common import conv_bn_act, init_convs, stride_for
from medlite.models.volume.mobilenet3d import InvertedResidual3d


def unfold_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, D, H, W), sides multiples of p -> (B * p^3, patches, C): one sequence per offset."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    x = x.permute(0, 3, 5, 7, 2, 4, 6, 1)  # B, pd, ph, pw, nD, nH, nW, C
    return x.reshape(b * p**3, (d // p) * (h // p) * (w // p), c)


def fold_patches(x: torch.Tensor, p: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`unfold_patches`: (B * p^3, patches, C) -> (B, C, D, H, W)."""
    d, h, w = shape
    c = x.shape[-1]
    x = x.reshape(-1, p, p, p, d // p, h // p, w // p, c)
    x = x.permute(0, 7, 4, 1, 5, 2, 6, 3)  # B, C, nD, pd, nH, ph, nW, pw
    return x.reshape(-1, c, d, h, w)


class MobileViTBlock3d(nn.Module):
    def __init__(
        self,
        channels: int,
        dim: int,
        depth: int,
        num_heads: int = 4,
        patch_size: int = 2,
        mlp_ratio: float = 2.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.local = nn.Sequential(
            conv_bn_act(channels, channels, 3, groups=channels),
            nn.Conv3d(channels, dim, 1, bias=False),
        )
        self.transformer = nn.Sequential(
            *(
                Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path)
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.proj = conv_bn_act(dim, channels, 1)
        self.fuse = nn.Sequential(
            conv_bn_act(2 * channels, channels, 1),
            conv_bn_act(channels, channels, 3, groups=channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        y = self.local(x)
        d, h, w = y.shape[2:]
        pads = [(-s) % p for s in (d, h, w)]
        if any(pads):
            y = F.pad(y, (0, pads[2], 0, pads[1], 0, pads[0]))
        padded = tuple(y.shape[2:])
        y = self.norm(self.transformer(unfold_patches(y, p)))
        y = fold_patches(y, p, padded)[:, :, :d, :h, :w]
        return self.fuse(torch.cat([x, self.proj(y)], dim=1))


class MobileViT3d(nn.Module):
    """Stem, inverted residuals, and per stride-2 stage one MobileViT block; pool, linear."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int = 28,
        widths: tuple[int, ...] = (16, 32, 64),
        dims: tuple[int, ...] = (64, 96),
        depths: tuple[int, ...] = (2, 2),
        num_heads: int = 4,
        patch_size: int = 2,
        expand: int = 4,
        head_dim: int = 256,
        drop_rate: float = 0.1,
        drop_path_rate: float = 0.0,
        stem_stride: int | None = None,
    ) -> None:
        super().__init__()
        if not len(widths) == len(dims) + 1 == len(depths) + 1:
            raise ValueError(
                "widths needs one entry for the stem plus one per stage (dims, depths)"
            )
        self.stem_stride = stem_stride or stride_for(img_size, max_side=16, min_stride=2)
        cin = widths[0]
        self.stem = nn.Sequential(
            conv_bn_act(in_chans, cin, 3, self.stem_stride), InvertedResidual3d(cin, cin, 1, 2)
        )
        stages: list[nn.Module] = []
        for cout, dim, depth in zip(widths[1:], dims, depths, strict=True):
            stages += [
                InvertedResidual3d(cin, cout, 2, expand),
                MobileViTBlock3d(cout, dim, depth, num_heads, patch_size, 2.0, drop_path_rate),
            ]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = conv_bn_act(cin, head_dim, 1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(head_dim, num_classes)
        self.num_features = head_dim
        self._init_weights()

    def _init_weights(self) -> None:
        init_convs(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # ViT's init for the transformer and the classifier
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(self.forward_features(x)).flatten(1)))


@register_model("mobilevit3d", paradigm="transformer", min_size=28, task="classification", dims=3)
def mobilevit3d(num_classes: int, in_chans: int = 1, img_size: int = 28, **kwargs) -> MobileViT3d:
    """MobileViT in 3D: depthwise-3D inverted residuals plus transformers over 2x2x2 patches."""
    return MobileViT3d(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
