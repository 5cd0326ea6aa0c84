"""medlite's C selective scan inside OpenVINO: one custom operation per scan.

Exported to standard ops, a selective scan is a chain of ~4 sqrt(L) small nodes (see
``selective_scan``'s export path); in OpenVINO that chain ran Vim 3-7x slower than eager
PyTorch with the C kernel. Here the scan is one ``medlite::SelectiveScan`` node
(``fused_scan_nodes`` in :mod:`medlite.models.ops.selective_scan`), and OpenVINO runs it through
:class:`SelectiveScanOp`, a Python operation that calls the same C kernel as eager PyTorch (or
its PyTorch fallback where the kernel cannot be built), on OpenVINO's input buffers. Everything
else in the graph is OpenVINO's own. The price: an OpenVINO file with this node loads only
where medlite is installed (:func:`add_scan_extension` registers it); medlite's OpenVINO loaders
always do.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medlite import efficiency
from medlite.deploy.openvino_import import import_openvino
from medlite.models.ops.selective_scan import (
    FUSED_NODE_DOMAIN,
    FUSED_NODE_TYPE,
    fused_scan_nodes,
    selective_scan,
)


def uses_selective_scan(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether one forward of ``model`` runs a selective scan (one batch-1 forward in eval
    mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        with efficiency.recording_implementations() as seen, torch.no_grad():
            model(example[:1])
    finally:
        model.train(was_training)
    return "selective_scan" in seen


def export_fused_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int | None = None
) -> int:
    """``model`` as ONNX with one custom node per selective scan (legacy exporter: the node comes
    from a ``symbolic``); returns how many nodes are fused. ONNX Runtime cannot run the file;
    OpenVINO converts it with :func:`scan_extensions`."""
    import onnx

    from medlite.deploy.onnx import export_legacy_graph

    x = example.detach().float()
    if x.shape[0] < 2:
        x = x.expand(2, *x.shape[1:]).clone()
    was_training = model.training
    model.eval()
    try:
        with fused_scan_nodes(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the traced value's ops
            export_legacy_graph(model, x, path, opset)
    finally:
        model.train(was_training)
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(n.domain == FUSED_NODE_DOMAIN for n in graph.node)


@functools.lru_cache(maxsize=1)
def _op_class() -> type:
    """The OpenVINO operation class, made once openvino is imported (it subclasses ``ov.Op``)."""
    ov = import_openvino()

    class SelectiveScanOp(ov.Op):
        """``selective_scan(u, delta, A, B, C, D, delta_bias=..., delta_softplus=True)`` on
        OpenVINO's tensors, through the C kernel where it runs here."""

        type_info = ov.DiscreteTypeInfo(FUSED_NODE_TYPE, FUSED_NODE_DOMAIN)

        def __init__(self, inputs=None) -> None:
            super().__init__(self, inputs)
            if inputs is not None:
                self.constructor_validate_and_infer_types()

        def validate_and_infer_types(self) -> None:  # output: u's type and shape
            self.set_output_type(0, self.get_input_element_type(0), self.get_input_partial_shape(0))

        def clone_with_new_inputs(self, new_inputs):
            return SelectiveScanOp(new_inputs)

        def get_type_info(self):
            return self.type_info

        def has_evaluate(self) -> bool:
            return True

        def visit_attributes(self, visitor) -> bool:  # no attributes: softplus is always on
            return True

        def evaluate(self, outputs, inputs) -> bool:
            u, delta, A, B, C, D, bias = (torch.from_numpy(t.data) for t in inputs)
            with torch.inference_mode():  # the C kernel where it runs, else the PyTorch scan
                y = selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
            shape = inputs[0].shape
            if outputs[0].shape != shape:  # set only when it changes: ~50 us a call otherwise
                outputs[0].shape = shape
            np.copyto(outputs[0].data, y.numpy())
            return True

    return SelectiveScanOp


def scan_extensions() -> list:
    """OpenVINO extensions for the operation: reading .xml files that hold it, and converting
    ONNX files with ``medlite::SelectiveScan`` nodes."""
    ov = import_openvino()
    from openvino.frontend.onnx import ConversionExtension

    op = _op_class()

    def convert(node):
        return op([node.get_input(i) for i in range(node.get_input_size())]).outputs()

    conversion = ConversionExtension(FUSED_NODE_TYPE, FUSED_NODE_DOMAIN, convert)
    return [ov.OpExtension(op), conversion]


def add_scan_extension(core) -> None:
    """Teach an ``ov.Core`` the operation (see :func:`scan_extensions`)."""
    for extension in scan_extensions():
        core.add_extension(extension)
