"""TriMamba-3D: selective scans of the token volume in three axis orders (SegMamba's idea).

Why: one raster order puts only W-neighbours next to each other in the sequence; an H- or
D-neighbour is a whole row or slice away, and the scan's state has decayed by then. SegMamba
(Xing et al., MICCAI 2024) adds scans in other orders (its tri-orientated Mamba). Here the
token volume is flattened three times so that each axis is the fastest-varying once -- D-major
(D, H, W), H-major (H, W, D), W-major (W, D, H) -- and, by default, each order is also scanned
reversed (6 directions; ``bidirectional=False`` keeps 3). All directions run as one grouped
``selective_scan`` (:class:`~medlite.models.linear.vim.MultiScanSSM`, each with its own
parameters), which also reports their MACs to :func:`medlite.efficiency.profile_model`; the
outputs are put back in (D, H, W) order and summed.

Mixer, as VMamba's SS2D in 3D: in_proj (u, z) -> depthwise 3^3 conv (local context; a causal
1D conv would favour one order) -> SiLU -> 6-direction scan -> merge -> LayerNorm -> * SiLU(z)
-> out_proj. Everything else -- stem, size policy, pooling, defaults -- is :class:`.vim3d.Vim3d`'s,
so the two differ only in how tokens are scanned. ~0.30 M parameters at the defaults.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from medlite.models.linear.vim import MultiScanSSM
from medlite.models.registry import register_model
from medlite.models.volume.vim3d import Vim3d

# orders as permutations of the (D, H, W) axes of a (batch, d, D, H, W) tensor, and back
_ORDERS = ((2, 3, 4), (3, 4, 2), (4, 2, 3))


def tri_scan(u: torch.Tensor, bidirectional: bool = True) -> torch.Tensor:
    """(batch, d, D, H, W) -> (batch, K, d, D*H*W): D-, H-, W-major orders (then reversed)."""
    seqs = [u.permute(0, 1, *order).flatten(2) for order in _ORDERS]
    if bidirectional:
        seqs += [s.flip(-1) for s in seqs]
    return torch.stack(seqs, dim=1)


def tri_merge(ys: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`tri_scan`, summing the directions: (batch, K, d, L) -> (batch, d, L)."""
    n = len(_ORDERS)
    if ys.shape[1] == 2 * n:
        ys = ys[:, :n] + ys[:, n:].flip(-1)
    out = 0
    for k, order in enumerate(_ORDERS):
        shape = [grid[a - 2] for a in order]
        inverse = [order.index(a) + 2 for a in (2, 3, 4)]
        out = out + ys[:, k].unflatten(-1, shape).permute(0, 1, *inverse).flatten(2)
    return out


class TriScanMixer(nn.Module):
    """Token mixer on (batch, L, dim) tokens of a fixed (D, H, W) grid, L = D*H*W."""

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int, int],
        d_state: int = 8,
        expand: int = 2,
        d_conv: int = 3,
        dt_rank: int | None = None,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        d_inner = expand * dim
        self.grid, self.bidirectional = tuple(grid), bidirectional
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv3d = nn.Conv3d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner)
        directions = 6 if bidirectional else 3
        self.ssm = MultiScanSSM(d_inner, d_state, dt_rank or math.ceil(dim / 16), directions)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = u.transpose(1, 2).unflatten(-1, self.grid)  # (b, d, D, H, W)
        u = F.silu(self.conv3d(u))
        y = tri_merge(self.ssm(tri_scan(u, self.bidirectional)), self.grid).transpose(1, 2)
        return self.out_proj(self.out_norm(y) * F.silu(z))


class TriMambaBlock(nn.Module):
    """Pre-norm residual block: x + drop_path(mixer(norm(x)))."""

    def __init__(self, dim: int, grid, drop_path: float = 0.0, **mixer_kw) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = TriScanMixer(dim, grid, **mixer_kw)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


class TriMamba3d(Vim3d):
    """:class:`.vim3d.Vim3d` with tri-orientated scan blocks."""

    def make_block(
        self,
        dim: int,
        drop_path: float,
        d_state: int = 8,
        expand: int = 2,
        d_conv: int = 3,
        bidirectional: bool = True,
    ) -> nn.Module:
        return TriMambaBlock(
            dim,
            self.grid,
            drop_path,
            d_state=d_state,
            expand=expand,
            d_conv=d_conv,
            bidirectional=bidirectional,
        )


@register_model("trimamba3d", paradigm="linear", min_size=28, task="classification", dims=3)
def trimamba3d(num_classes: int, in_chans: int = 1, img_size: int = 28, **kwargs) -> TriMamba3d:
    """Selective scans of the token volume in D-, H- and W-major order, both ways, summed."""
    return TriMamba3d(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
