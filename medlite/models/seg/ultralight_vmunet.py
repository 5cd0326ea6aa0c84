"""UltraLight VM-UNet (Wu et al., 2024): a ~50 K-parameter U-Net whose deep stages are
Parallel Vision Mamba (PVM) layers.

Why: a Mamba layer's parameters grow with the square of its width (in/out projections) and its
scan's state with the width too. The PVM layer cuts the channels into four groups and runs all
four through *one* small Mamba of a quarter of the width, so the mixing costs about 1/16 of the
parameters of a full-width Mamba while every group still gets a global (linear-time) scan over
the whole feature map. A learnable scalar (``skip_scale``) adds each group back around the
shared Mamba; a linear projection then mixes the groups and changes the width.

Layout (channels ``(8, 16, 24, 32, 48, 64)`` by default, as in the paper):

- encoder: three 3x3 conv stages, then three PVM stages; after each of the first five a
  GroupNorm, a 2x2 max-pool and GELU, so the bottleneck is at 1/32 of the input side;
- skips: the five pooled encoder maps pass a spatial-then-channel attention bridge (each gate
  residual): one shared dilated 7x7 conv on [channel mean, channel max] gives a per-pixel gate
  for every skip; the global averages of all five skips, concatenated, go through one shared
  3-tap conv1d and a per-skip linear layer to give a per-channel gate (the skips see each other);
- decoder: PVM (64 -> 48) at 1/32, PVM (48 -> 32), PVM (32 -> 24), then 3x3 convs
  (24 -> 16 -> 8), each followed by GroupNorm, a 2x bilinear upsampling (not after the first)
  and GELU, plus the matching skip; a 1x1 conv to the class logits at 1/2, upsampled 2x.

Input sides must be multiples of 32 (five poolings); 64/128/256 px all work.

Our Mamba is medlite's (:class:`~medlite.models.linear.vim.MultiScanSSM` with one direction:
Mamba's parameterisation and initialisation, the C scan kernel on CPU, the export path under
tracing); the scan runs in fp32 and every PVM layer is an ``fp32_island`` (the paper casts its
input to fp32 too). Mamba's projections keep their own initialisation; the rest follows the
paper (truncated normal linears, fan-out normal convs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from medlite.errors import ConfigError
from medlite.models.linear.vim import MultiScanSSM
from medlite.models.registry import register_model

#: the input side must be a multiple of this (five 2x poolings)
DIVISOR = 32


def check_side(name: str, img_size: int, divisor: int) -> None:
    """A ConfigError naming sizes that work when ``img_size`` is not a multiple of ``divisor``."""
    if img_size % divisor == 0:
        return
    examples = [s for s in (64, 128, 256) if s % divisor == 0] or [divisor, 2 * divisor]
    raise ConfigError(
        f"{name} needs an input side divisible by {divisor} (e.g. "
        f"{', '.join(map(str, examples))}), got {img_size}; set data.size (or "
        f"model.input_size) to a multiple of {divisor}"
    )


class Mamba(nn.Module):
    """A one-direction Mamba mixer on tokens (batch, L, dim) -> (batch, L, dim).

    in_proj -> (u, z); u -> causal depthwise conv1d -> SiLU -> selective SSM; y * SiLU(z) ->
    out_proj. The SSM's ``A_log``, ``D`` and ``dt_bias`` stay out of weight decay.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        d_inner = expand * dim
        self.d_inner = d_inner
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.ssm = MultiScanSSM(d_inner, d_state, math.ceil(dim / 16), directions=1)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        u = F.silu(self.conv1d(u)[..., :length])  # left padding + truncation: causal
        y = self.ssm(u.unsqueeze(1))[:, 0] * F.silu(z)
        return self.out_proj(y.transpose(1, 2))


class PVMLayer(nn.Module):
    """Parallel Vision Mamba: LN -> four channel groups through one shared Mamba (plus a scaled
    skip) -> LN -> linear to ``out_dim``. (batch, in_dim, H, W) -> (batch, out_dim, H, W)."""

    fp32_island = True  # LinearComplexityModule runs it outside autocast

    def __init__(
        self, in_dim: int, out_dim: int, groups: int = 4, d_state: int = 16, d_conv: int = 4
    ) -> None:
        super().__init__()
        if in_dim % groups:
            raise ValueError(f"PVM layer: width {in_dim} is not divisible by {groups} groups")
        self.groups = groups
        self.norm = nn.LayerNorm(in_dim)
        self.mamba = Mamba(in_dim // groups, d_state=d_state, d_conv=d_conv)
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.norm_out = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        g = self.groups
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (b, L, c), row-major
        # The groups become extra batch entries: one call of the shared Mamba serves all four.
        grouped = tokens.unflatten(-1, (g, c // g)).transpose(1, 2).flatten(0, 1)  # (b*g, L, c/g)
        mixed = self.mamba(grouped) + self.skip_scale * grouped
        mixed = mixed.unflatten(0, (-1, g)).transpose(1, 2).flatten(2)  # (b, L, c)
        out = self.proj(self.norm_out(mixed))
        return out.transpose(1, 2).unflatten(-1, (h, w))


class AttentionBridge(nn.Module):
    """Spatial, then channel attention over all skip maps, each gate with a residual."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        # one per-pixel gate for every skip, from its channel mean and max (shared weights)
        self.spatial = nn.Conv2d(2, 1, 7, padding=9, dilation=3)
        # per-channel gates from the concatenated global averages of all skips
        total = sum(channels)
        self.channel_mix = nn.Conv1d(1, 1, 3, padding=1)
        self.channel_heads = nn.ModuleList(nn.Linear(total, c) for c in channels)

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        gated = []
        for t in skips:
            stats = torch.cat([t.mean(1, keepdim=True), t.amax(1, keepdim=True)], dim=1)
            gated.append(t + t * torch.sigmoid(self.spatial(stats)))
        pooled = torch.cat([t.mean((2, 3)) for t in gated], dim=1)  # (b, total)
        pooled = self.channel_mix(pooled.unsqueeze(1)).squeeze(1)
        out = []
        for t, head in zip(gated, self.channel_heads, strict=True):
            gate = torch.sigmoid(head(pooled))[:, :, None, None]
            out.append(t + t * gate)
        return out


class UltraLightVMUNet(nn.Module):
    """Conv + PVM encoder, attention bridge on the skips, PVM + conv decoder (see module doc)."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int = 256,
        channels: tuple[int, ...] = (8, 16, 24, 32, 48, 64),
        d_state: int = 16,
        d_conv: int = 4,
        groups: int = 4,
        bridge: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != 6:
            raise ValueError(f"UltraLight VM-UNet has six stages, got channels {channels}")
        check_side("ultralight_vmunet", img_size, DIVISOR)
        c = tuple(int(v) for v in channels)
        pvm = {"groups": groups, "d_state": d_state, "d_conv": d_conv}

        def conv(cin: int, cout: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, padding=1)

        self.encoder = nn.ModuleList(
            [
                conv(in_chans, c[0]),
                conv(c[0], c[1]),
                conv(c[1], c[2]),
                PVMLayer(c[2], c[3], **pvm),
                PVMLayer(c[3], c[4], **pvm),
                PVMLayer(c[4], c[5], **pvm),
            ]
        )
        self.encoder_norms = nn.ModuleList(nn.GroupNorm(4, v) for v in c[:5])
        self.bridge = AttentionBridge(c[:5]) if bridge else None
        self.decoder = nn.ModuleList(
            [
                PVMLayer(c[5], c[4], **pvm),
                PVMLayer(c[4], c[3], **pvm),
                PVMLayer(c[3], c[2], **pvm),
                conv(c[2], c[1]),
                conv(c[1], c[0]),
            ]
        )
        self.decoder_norms = nn.ModuleList(nn.GroupNorm(4, v) for v in reversed(c[:5]))
        self.head = nn.Conv2d(c[0], num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        in_mamba = {id(m) for s in self.modules() if isinstance(s, Mamba) for m in s.modules()}
        for m in self.modules():
            if id(m) in in_mamba:
                continue
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer, norm in zip(self.encoder[:5], self.encoder_norms, strict=True):
            x = F.gelu(F.max_pool2d(norm(layer(x)), 2))
            skips.append(x)
        x = F.gelu(self.encoder[5](x))
        if self.bridge is not None:
            skips = self.bridge(skips)
        for i, (layer, norm) in enumerate(zip(self.decoder, self.decoder_norms, strict=True)):
            x = norm(layer(x))
            if i:  # the first decoder stage stays at the bottleneck's resolution
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
            x = F.gelu(x) + skips[-1 - i]
        x = self.head(x)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


@register_model("ultralight_vmunet", paradigm="linear", min_size=DIVISOR, task="segmentation")
def ultralight_vmunet(
    num_classes: int, in_chans: int = 1, img_size: int = 256, **kwargs
) -> UltraLightVMUNet:
    """UltraLight VM-UNet: parallel Vision Mamba layers (channel groups share one small Mamba)."""
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    return UltraLightVMUNet(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
