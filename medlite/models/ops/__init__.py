"""Linear-complexity sequence ops in plain PyTorch (CPU or GPU), fp32 inside.

- :func:`selective_scan` — Mamba's S6 scan, ``selective_scan_fn``'s signature; dispatches to
  ``mamba_ssm``'s CUDA kernel for CUDA tensors when the ``[mamba]`` extra imports, else runs
  medlite's blocked chunked scan. :func:`selective_scan_ref` is the sequential reference.
- :func:`wkv_bidirectional` — Vision-RWKV's Bi-WKV in O(T*C); :func:`wkv_bidirectional_ref`
  is the O(T^2) reference.

Importing this package never imports ``mamba_ssm`` (see :func:`mamba_ssm_available`).
"""

from medlite.models.ops.selective_scan import (
    mamba_ssm_available,
    selective_scan,
    selective_scan_ref,
)
from medlite.models.ops.wkv import wkv_bidirectional, wkv_bidirectional_ref

__all__ = [
    "mamba_ssm_available",
    "selective_scan",
    "selective_scan_ref",
    "wkv_bidirectional",
    "wkv_bidirectional_ref",
]
