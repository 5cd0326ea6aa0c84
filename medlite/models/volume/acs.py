"""ACS and 2.5D conversions of a 2D CNN to volumes, and MedMNIST v2's ResNet-18+ACS / +2.5D.

Why: MedMNIST v2 compares three ways of making ResNet-18 volumetric -- true 3D kernels, ACS
convolutions (Yang et al., "Reinforcing 2D CNNs for 3D medical image analysis", IEEE JBHI 2021)
and 2.5D -- and the two conversions keep the 2D net's parameters (and could take its 2D weights)
while costing a fraction of a 3D net's MACs.

:func:`convert_2d_to_3d` walks a module tree in place and swaps every 2D layer for a 3D one
that reuses its parameters, so the parameter count does not change:

- ``mode="acs"``: each Conv2d's output channels are split into three near-equal groups whose
  k x k kernels act as (1,k,k), (k,1,k) and (k,k,1) 3D kernels -- an axial, a coronal and a
  sagittal view -- one conv3d per group, concatenated along channels.
- ``mode="2.5d"``: each Conv2d's k x k kernel acts as a (1,k,k) kernel (``axis`` picks which
  axis gets the 1), i.e. the 2D filter slides over every slice.

In both, a 2D stride s becomes (s,s,s), as in the ``acsconv`` package MedMNIST used, so feature
maps shrink along all three axes; BatchNorm2d -> BatchNorm3d (statistics kept), max/avg pools ->
cubic 3D pools, adaptive pools and Dropout2d -> 3D. A layer the converter does not know that
still says "2d" in its type name raises, rather than silently running 2D code on volumes.

Size policy of the ResNet-18s: the stem of :mod:`.resnet3d` (timm's 7x7 stride-2 conv and max
pool replaced by a 3x3 stride-1 conv at 28^3, 5x5 stride 2 at 64^3; ``stem_stride=`` overrides),
so the three MedMNIST ResNet-18 variants differ only in their convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medlite.models.cnn.litecnn import stem_stride_for
from medlite.models.registry import register_model
from medlite.models.volume.resnet3d import stem_kernel

MODES = ("acs", "2.5d")


def _square(value, what: str) -> int:
    """A 2D layer's (a, a) or a -> a; the 3D versions here need equal sides."""
    if isinstance(value, str):
        raise ValueError(f"{what}={value!r}: only numeric padding converts to 3D")
    if isinstance(value, tuple | list):
        if len(set(value)) != 1:
            raise ValueError(f"{what}={tuple(value)}: only square 2D layers convert to 3D")
        return int(value[0])
    return int(value)


def _insert(value: int, axis: int, fill: int) -> tuple[int, int, int]:
    """(value, value, value) with ``fill`` on ``axis``: e.g. the padding of a (1,k,k) kernel."""
    out = [value] * 3
    out[axis] = fill
    return tuple(out)


def split_three(n: int) -> list[int]:
    """``n`` as three near-equal parts, the remainder to the first: 64 -> [22, 21, 21]."""
    base, rem = divmod(n, 3)
    return [base + (i < rem) for i in range(3)]


class _Conv2dAs3d(nn.Module):
    """Holds a Conv2d's own weight/bias Parameters and geometry; subclasses say how to apply them."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if type(conv) is not nn.Conv2d:  # e.g. timm's Conv2dSame pads in forward()
            raise TypeError(f"cannot convert {type(conv).__name__} (only plain nn.Conv2d)")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r}: only zero padding converts")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = _square(conv.kernel_size, "kernel_size")
        self.stride = _square(conv.stride, "stride")
        self.padding = _square(conv.padding, "padding")
        self.dilation = _square(conv.dilation, "dilation")
        self.groups = conv.groups
        self.weight = conv.weight  # the same Parameter: nothing is added or copied
        self.bias = conv.bias

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}"
        )


class ACSConv(_Conv2dAs3d):
    """A Conv2d applied to volumes as three orthogonal 2D views (ACS convolution).

    Channel groups (of ``groups`` > 1 convs: whole groups) 0/1/2 get the kernel as (1,k,k),
    (k,1,k) and (k,k,1); an unpadded 1x1 conv needs no split and runs as one 1x1x1 conv3d.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv)
        units = self.out_channels if self.groups == 1 else self.groups
        bounds = [0]
        for n in split_three(units):
            bounds.append(bounds[-1] + n)
        self.bounds = bounds  # view v covers units bounds[v] .. bounds[v + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, p, d = (self.stride,) * 3, self.padding, self.dilation
        if self.kernel_size == 1 and p == 0:  # the three views coincide
            w = self.weight.unsqueeze(2)
            return F.conv3d(x, w, self.bias, s, (p,) * 3, (d,) * 3, self.groups)
        out_per, in_per = self.out_channels // self.groups, self.in_channels // self.groups
        outs = []
        for view in range(3):
            lo, hi = self.bounds[view], self.bounds[view + 1]
            if lo == hi:
                continue
            if self.groups == 1:  # units are output channels; every view sees all inputs
                inp, groups, olo, ohi = x, 1, lo, hi
            else:  # units are groups: a view takes its groups' inputs and outputs
                inp, groups = x[:, lo * in_per : hi * in_per], hi - lo
                olo, ohi = lo * out_per, hi * out_per
            w = self.weight[olo:ohi].unsqueeze(2 + view)
            b = None if self.bias is None else self.bias[olo:ohi]
            outs.append(F.conv3d(inp, w, b, s, _insert(p, view, 0), _insert(d, view, 1), groups))
        return torch.cat(outs, dim=1)


class SliceConv(_Conv2dAs3d):
    """A Conv2d applied to volumes slice by slice (2.5D): a (1,k,k) kernel, ``axis`` the 1."""

    def __init__(self, conv: nn.Conv2d, axis: int = 0) -> None:
        super().__init__(conv)
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 (D, H, W), got {axis}")
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.axis
        return F.conv3d(
            x,
            self.weight.unsqueeze(2 + a),
            self.bias,
            (self.stride,) * 3,
            _insert(self.padding, a, 0),
            _insert(self.dilation, a, 1),
            self.groups,
        )


def _batchnorm3d(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    new = nn.BatchNorm3d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    if bn.affine:  # keep the very Parameters (shared with optimisers, pruning masks, ...)
        new.weight, new.bias = bn.weight, bn.bias
    return new.train(bn.training)


def _convert_leaf(m: nn.Module, mode: str, axis: int) -> nn.Module | None:
    """The 3D replacement of one 2D layer, or None to recurse into its children."""
    if isinstance(m, nn.Conv2d):
        return ACSConv(m) if mode == "acs" else SliceConv(m, axis)
    if type(m) is nn.BatchNorm2d:
        return _batchnorm3d(m)
    if type(m) is nn.MaxPool2d:
        return nn.MaxPool3d(
            _square(m.kernel_size, "kernel_size"),
            _square(m.stride, "stride"),
            _square(m.padding, "padding"),
            _square(m.dilation, "dilation"),
            m.return_indices,
            m.ceil_mode,
        )
    if type(m) is nn.AvgPool2d:
        return nn.AvgPool3d(
            _square(m.kernel_size, "kernel_size"),
            _square(m.stride, "stride"),
            _square(m.padding, "padding"),
            m.ceil_mode,
            m.count_include_pad,
            m.divisor_override,
        )
    if type(m) is nn.AdaptiveAvgPool2d:
        return nn.AdaptiveAvgPool3d(_square(m.output_size, "output_size"))
    if type(m) is nn.AdaptiveMaxPool2d:
        return nn.AdaptiveMaxPool3d(_square(m.output_size, "output_size"), m.return_indices)
    if type(m) is nn.Dropout2d:
        return nn.Dropout3d(m.p, m.inplace)
    if not any(True for _ in m.children()) and "2d" in type(m).__name__.lower():
        raise TypeError(f"convert_2d_to_3d does not know how to make {type(m).__name__} 3D")
    return None


def convert_2d_to_3d(module: nn.Module, mode: str = "acs", axis: int = 0) -> nn.Module:
    """Make a 2D network take (N, C, D, H, W) volumes, in place; returns the converted module.

    ``mode`` "acs" or "2.5d" (see the module docstring); ``axis`` (0/1/2 = D/H/W) is the axis a
    2.5D kernel does not span. Every Parameter of the 2D net is kept, none is added.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    new = _convert_leaf(module, mode, axis)
    if new is not None:
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_2d_to_3d(child, mode, axis))
    return module


def resnet18_2d_for_volumes(
    num_classes: int, in_chans: int, img_size: int, stem_stride: int | None = None, **kwargs
) -> nn.Module:
    """timm's 2D ResNet-18 with :mod:`.resnet3d`'s stem policy, ready for conversion."""
    import timm

    kwargs.setdefault("zero_init_last", False)  # a zero last BN makes QAT NaN (resnet18.yaml)
    net = timm.create_model("resnet18", num_classes=num_classes, in_chans=in_chans, **kwargs)
    stride = stem_stride or stem_stride_for(img_size)
    k = stem_kernel(stride)
    net.conv1 = nn.Conv2d(in_chans, net.conv1.out_channels, k, stride, k // 2, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


@register_model("resnet18_acs", paradigm="cnn", min_size=28, task="classification", dims=3)
def resnet18_acs(
    num_classes: int, in_chans: int = 1, img_size: int = 28, stem_stride: int | None = None, **kw
) -> nn.Module:
    """ResNet-18 + ACS convolutions (MedMNIST v2): 2D kernels over three orthogonal views."""
    net = resnet18_2d_for_volumes(num_classes, in_chans, img_size, stem_stride, **kw)
    return convert_2d_to_3d(net, "acs")


@register_model("resnet18_25d", paradigm="cnn", min_size=28, task="classification", dims=3)
def resnet18_25d(
    num_classes: int, in_chans: int = 1, img_size: int = 28, stem_stride: int | None = None, **kw
) -> nn.Module:
    """ResNet-18 + 2.5D convolutions (MedMNIST v2): 2D kernels slice by slice."""
    net = resnet18_2d_for_volumes(num_classes, in_chans, img_size, stem_stride, **kw)
    return convert_2d_to_3d(net, "2.5d")
