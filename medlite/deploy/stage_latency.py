"""Deployed latency of one stage of a compression recipe: what the before/after table ranks by.

Eager PyTorch latency is mostly per-operator overhead on a CPU, so a recipe's speed-up read from
it says little about the model a clinic would run: a pruned network can look no faster in eager
and be 2x faster in ONNX Runtime. Each stage that is still a PyTorch network is exported to ONNX
(in a scratch folder) and timed in ONNX Runtime in turns with its eager self; the faster of the
two is the stage's deployed latency. A stage that already runs on a runtime (the int8 file of
``ptq``) is deployed as it is.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from medlite.deploy.exported_model import ExportedModel
from medlite.deploy.onnx import OnnxExportError, OrtModel, export_onnx
from medlite.efficiency import interleaved_latency_ms

log = logging.getLogger(__name__)

_RUNTIMES = {"OrtModel": "onnxruntime", "OvModel": "openvino", "ExModel": "executorch"}


def stage_deployed_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    efficiency: dict,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
) -> dict:
    """``deployed_latency_ms`` and ``deployed_runtime`` (``pytorch`` or ``onnxruntime``) of a
    stage whose eager profile is ``efficiency``; ``deployed_error`` when it cannot be exported
    (its eager latency then stands)."""
    if isinstance(model, ExportedModel):  # already on its runtime
        return {
            "deployed_latency_ms": efficiency.get("latency_ms"),
            "deployed_runtime": _RUNTIMES.get(type(model).__name__, type(model).__name__),
        }
    example = torch.zeros(1, *input_shape)
    was_training = model.training  # the recipe trains this model further: leave it as it was
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with tempfile.TemporaryDirectory(prefix="medlite_stage_") as tmp:
            try:
                path = export_onnx(model, example, Path(tmp) / "stage.onnx")
            except OnnxExportError as err:
                log.warning("stage not exported to ONNX, its eager latency stands: %s", err)
                return {
                    "deployed_latency_ms": efficiency.get("latency_ms"),
                    "deployed_runtime": "pytorch",
                    "deployed_error": str(err),
                }
            runtime = OrtModel(path, threads=threads)
            times = interleaved_latency_ms(
                {"pytorch": model, "onnxruntime": runtime}, example, warmup=warmup, repeats=repeats
            )
    finally:
        torch.set_num_threads(old)
        model.train(was_training)
    median = {name: round(statistics.median(t), 4) for name, t in times.items()}
    fastest = min(median, key=median.get)
    return {"deployed_latency_ms": median[fastest], "deployed_runtime": fastest, "deployed": median}
