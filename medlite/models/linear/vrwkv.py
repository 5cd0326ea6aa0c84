"""Vision-RWKV (VRWKV-style): RWKV's linear-complexity token mixing made bidirectional for images.

Why: Vision-RWKV (Duan et al., 2024) replaces attention by Bi-WKV, a global weighted average
of all tokens' values whose weights decay with token distance at a learned per-channel rate
(``time_decay``, w) plus a per-channel bonus for the token itself (``time_first``, u). It costs
O(T * C) instead of attention's O(T^2 * C), and Q-Shift -- mixing each channel group with the
neighbouring token to the left, right, above or below on the 2D grid -- adds the local 2D
structure a 1D recurrence lacks.

Size policy: the same as Vim (``patch_size_for``): the smallest power-of-two patch >= 4 that
leaves at most 14 tokens per side -- 28 px -> patch 4 (7x7), 64 -> 8 (8x8), 128 -> 16 (8x8),
224 -> 16 (14x14). No resizing; ``patch_size=`` overrides it. Tokens come from Vim's overlapping
conv stem (``PatchEmbed``), which trains far better from scratch than a single stride-p conv.

Block: x + SpatialMix(LN(x)), then x + ChannelMix(LN(x)).
SpatialMix: Q-Shift -> lerp with the shifted tokens -> key / value / receptance linears ->
Bi-WKV(w / T, u / T, k, v) -> LayerNorm ("key norm", stabilises the WKV scale) -> sigmoid(r) *
wkv -> output linear. ChannelMix: Q-Shift -> key -> squared ReLU -> value, gated by sigmoid of
the receptance. w and u are named ``time_decay`` / ``time_first`` so that
LinearComplexityModule keeps them out of weight decay. Mean pooling over tokens, like :mod:`.vim`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from medlite import efficiency
from medlite.models.linear.vim import PatchEmbed, patch_size_for
from medlite.models.ops import wkv_bidirectional
from medlite.models.registry import register_model


def wkv_macs(batch: int, tokens: int, channels: int) -> int:
    """Multiply-accumulates of Bi-WKV in its O(T) recurrent form, which flop counters see as 0.

    Per (batch, token, channel): a forward and a backward running state, each updating a
    numerator (decay * num + e^k * v: 2) and a denominator (decay * den + e^k: 1) -> 6; the
    token's own bonus term e^(u+k) * v (1) and the final division (1) -> 8. Exponentials are
    counted as zero MACs, as flop counters do for activations.
    """
    return 8 * batch * tokens * channels


def q_shift(x: torch.Tensor, grid: tuple[int, int], shift: int = 1) -> torch.Tensor:
    """Quad-directional token shift: each quarter of the channels takes the token ``shift``
    steps to the left, right, above and below on the 2D grid (zeros past the border); any
    remaining channels are unshifted. (batch, T, C) -> (batch, T, C)."""
    g = x.shape[2] // 4
    m = x.transpose(1, 2).unflatten(2, grid)  # (batch, C, H, W); no batch size baked in a trace
    parts = [
        F.pad(m[:, 0:g, :, :-shift], (shift, 0)),  # from the left neighbour
        F.pad(m[:, g : 2 * g, :, shift:], (0, shift)),  # from the right
        F.pad(m[:, 2 * g : 3 * g, :-shift, :], (0, 0, shift, 0)),  # from above
        F.pad(m[:, 3 * g : 4 * g, shift:, :], (0, 0, 0, shift)),  # from below
        m[:, 4 * g :],
    ]
    return torch.cat(parts, dim=1).flatten(2).transpose(1, 2)


def _ramp(channels: int) -> torch.Tensor:
    return torch.arange(channels, dtype=torch.float32) / channels


class SpatialMix(nn.Module):
    """Global token mixing by bidirectional WKV, gated by the receptance."""

    def __init__(self, dim: int, layer_id: int, depth: int, key_norm: bool = True) -> None:
        super().__init__()
        # RWKV's layer-dependent init: deeper layers mix more of the shifted tokens, and the
        # channels span slow to fast decays so some see the whole image and some stay local.
        depth_ratio = layer_id / max(1, depth - 1)  # 0 -> 1 over depth
        keep_ratio = 1.0 - layer_id / depth  # 1 -> ~0
        h = torch.arange(dim, dtype=torch.float32) / max(1, dim - 1)
        self.time_decay = nn.Parameter(-5 + 8 * h ** (0.7 + 1.3 * depth_ratio))
        zigzag = 0.5 * (torch.tensor([(i + 1) % 3 - 1 for i in range(dim)], dtype=torch.float32))
        self.time_first = nn.Parameter(torch.full((dim,), math.log(0.3)) + zigzag)
        ramp = _ramp(dim)
        self.time_mix_k = nn.Parameter(ramp**keep_ratio)
        self.time_mix_v = nn.Parameter(ramp**keep_ratio + 0.3 * depth_ratio)
        self.time_mix_r = nn.Parameter(ramp ** (0.5 * keep_ratio))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim) if key_norm else nn.Identity()
        self.output = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, c = x.shape
        xx = q_shift(x, grid)
        k = self.key(torch.lerp(xx, x, self.time_mix_k))
        v = self.value(torch.lerp(xx, x, self.time_mix_v))
        r = self.receptance(torch.lerp(xx, x, self.time_mix_r))
        # Vision-RWKV divides w and u by T so the decay spans the image at any token count.
        y = wkv_bidirectional(self.time_decay / t, self.time_first / t, k, v)
        efficiency.add_macs(wkv_macs(b, t, c))
        return self.output(torch.sigmoid(r) * self.key_norm(y))


class ChannelMix(nn.Module):
    """RWKV's feed-forward: squared-ReLU MLP on shifted tokens, gated by the receptance."""

    def __init__(self, dim: int, layer_id: int, depth: int, hidden_rate: float = 4.0) -> None:
        super().__init__()
        keep_ratio = 1.0 - layer_id / depth
        ramp = _ramp(dim)
        self.time_mix_k = nn.Parameter(ramp**keep_ratio)
        self.time_mix_r = nn.Parameter(ramp**keep_ratio)
        hidden = int(hidden_rate * dim)
        self.key = nn.Linear(dim, hidden, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        xx = q_shift(x, grid)
        k = torch.square(torch.relu(self.key(torch.lerp(xx, x, self.time_mix_k))))
        r = self.receptance(torch.lerp(xx, x, self.time_mix_r))
        return torch.sigmoid(r) * self.value(k)


class VRWKVBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        layer_id: int,
        depth: int,
        hidden_rate: float = 4.0,
        drop_path: float = 0.0,
        key_norm: bool = True,
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.att = SpatialMix(dim, layer_id, depth, key_norm)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = ChannelMix(dim, layer_id, depth, hidden_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.att(self.ln1(x), grid))
        return x + self.drop_path(self.ffn(self.ln2(x), grid))


class VRWKV(nn.Module):
    """Patch embedding + position embedding -> RWKV blocks (Bi-WKV + Q-Shift) -> mean pool."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int = 28,
        embed_dim: int = 96,
        depth: int = 4,
        hidden_rate: float = 4.0,
        patch_size: int | None = None,
        key_norm: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size or patch_size_for(img_size)
        self.patch_embed = PatchEmbed(in_chans, embed_dim, img_size, self.patch_size)
        self.grid = (self.patch_embed.grid, self.patch_embed.grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            VRWKVBlock(embed_dim, i, depth, hidden_rate, rates[i], key_norm) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self.num_features = embed_dim
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:  # shrink the residual branches' outputs by depth
            block.att.output.weight.data.div_(math.sqrt(2 * depth))
            block.ffn.value.weight.data.div_(math.sqrt(2 * depth))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token features (batch, tokens, dim) after the final norm."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x, self.grid)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x).mean(dim=1)))


@register_model("vrwkv", paradigm="linear", min_size=28)
def vrwkv(num_classes: int, in_chans: int = 1, img_size: int = 28, **kwargs) -> VRWKV:
    """Vision-RWKV: Q-Shift + bidirectional WKV token mixing, linear in the number of tokens."""
    return VRWKV(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
