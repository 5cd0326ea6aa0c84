"""Deployment: export to ONNX and run through ONNX Runtime (our CPU int8 and edge runtime).

onnx and onnxruntime are imported inside the functions that need them, so importing this
package (and ``import medlite``) stays fast.
"""

from medlite.deploy.onnx import (
    OnnxExportError,
    OrtModel,
    export_onnx,
    max_abs_diff,
    onnx_exporter,
    onnx_weight_dtypes,
)

__all__ = [
    "OnnxExportError",
    "OrtModel",
    "export_onnx",
    "max_abs_diff",
    "onnx_exporter",
    "onnx_weight_dtypes",
]
