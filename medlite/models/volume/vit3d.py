"""ViT-3D: MONAI's ``ViT`` (spatial_dims=3) at a small width, returning logits only.

Why: the plain-transformer baseline for volumes (the encoder of UNETR, Hatamizadeh et al., WACV
2022): non-overlapping cubic patches, a class token, global self-attention. Attention is
quadratic in the number of tokens, which grows with the cube of the side, so the patch grows
with the input instead.

Size policy (``patch_size_for``): the smallest patch >= 4 leaving at most 8 tokens per side:
28^3 -> patch 4 (7^3 = 343 tokens), 32 -> 4 (8^3), 48 -> 6 (8^3), 64 -> 8 (8^3). A side not
divisible by the patch is zero-padded (symmetrically) up to the next multiple.
``patch_size=`` overrides it. MONAI's ``post_activation`` Tanh is switched off: the head gives
raw logits, and the unused cross-attention LayerNorms MONAI's blocks carry are dropped.

Defaults (conf/model/vit3d.yaml): hidden 192, MLP 384, 6 layers, 6 heads -- 1.86 M parameters
at 28^3. Note MONAI names the position embedding ``position_embeddings``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medlite.models.registry import register_model


def patch_size_for(img_size: int, max_tokens_per_side: int = 8, min_patch: int = 4) -> int:
    """Smallest patch >= ``min_patch`` with ceil(img_size / patch) <= ``max_tokens_per_side``."""
    return max(min_patch, -(-img_size // max_tokens_per_side))


class ViT3d(nn.Module):
    """Pads the volume to a multiple of the patch, runs MONAI's ViT, drops its hidden states."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int = 28,
        patch_size: int | None = None,
        hidden_size: int = 192,
        mlp_dim: int = 384,
        num_layers: int = 6,
        num_heads: int = 6,
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        from monai.networks.nets import ViT

        self.patch_size = patch_size or patch_size_for(img_size)
        self.grid = -(-img_size // self.patch_size)
        self.img_size = img_size
        pad = self.grid * self.patch_size - img_size
        self.pad = (pad // 2, pad - pad // 2) * 3  # F.pad order: W, H, D (before, after)
        self.vit = ViT(
            in_channels=in_chans,
            img_size=(self.grid * self.patch_size,) * 3,
            patch_size=(self.patch_size,) * 3,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout_rate,
            spatial_dims=3,
            post_activation=None,
            qkv_bias=qkv_bias,
        )
        for block in self.vit.blocks:  # MONAI builds this LayerNorm even without cross-attention
            block.norm_cross_attn = nn.Identity()
        nn.init.trunc_normal_(self.vit.cls_token, std=0.02)
        self.num_features = hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        logits, _ = self.vit(x)
        return logits


@register_model("vit3d", paradigm="transformer", min_size=28, task="classification", dims=3)
def vit3d(num_classes: int, in_chans: int = 1, img_size: int = 28, **kwargs) -> ViT3d:
    """MONAI's 3D ViT at a small width: cubic patches, class token, global attention."""
    return ViT3d(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
