"""ExecuTorch: PyTorch's on-device runtime (phones, ARM boards), with the XNNPACK delegate.

A ``.pte`` program is lowered from ``torch.export`` of the calibrated model (the temperature is in
the graph, as in every format), for batch 1: what an edge device runs. int8 is PyTorch's pt2e
static quantisation with the XNNPACK quantiser (per-channel symmetric weights, per-tensor
activations), calibrated image by image on the same training batches as the other int8 formats.
A ``.pte`` file has no place for metadata, so the preprocessing, labels, task and temperature
medlite states in every exported file sit beside it in ``<name>.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from medlite.atomic import atomic_path, write_text
from medlite.deploy.exported_model import ExportedModel

#: calibration images for int8 (each runs at batch 1, the program's shape)
MAX_CALIBRATION_IMAGES = 256


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def read_metadata(path: str | os.PathLike) -> dict:
    from medlite.deploy.onnx import decode_metadata

    try:
        return decode_metadata(json.loads(sidecar(Path(path)).read_text()))
    except (OSError, ValueError):
        return {}


def _lower(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        program = torch.export.export(module, (example,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(lowered.to_executorch().buffer)


def export_program(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    metadata: dict[str, str] | None = None,
    calibration: Iterable[torch.Tensor] | None = None,
    per_channel: bool = True,
) -> dict:
    """``model`` as an ExecuTorch program at ``path`` (fp32, or int8 when ``calibration``
    batches are given); returns what the export record keeps of it."""
    example = example[:1]
    entry: dict = {"delegate": "XNNPACK", "batch": 1}
    if calibration is None:
        _lower(model, example, path)
        entry["source"] = "torch.export, lowered to ExecuTorch"
    else:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        with torch.no_grad():
            graph = torch.export.export(model, (example,)).module()
        config = get_symmetric_quantization_config(is_per_channel=per_channel)
        prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(config))
        seen = 0
        with torch.no_grad():
            for batch in calibration:
                for image in batch[: MAX_CALIBRATION_IMAGES - seen]:
                    prepared(image[None])
                    seen += 1
                if seen >= MAX_CALIBRATION_IMAGES:
                    break
        _lower(convert_pt2e(prepared), example, path)
        entry |= {
            "source": "post-training static quantisation (pt2e, XNNPACK quantiser)",
            "calibration_images": seen,
        }
    write_text(sidecar(path), json.dumps(metadata or {}, indent=1))
    return entry


#: bumped whenever the thread pool is resized: a program loaded before then is reloaded (one
#: still holding the old pool crashes the process when executed)
_pool = {"generation": 0}


def _set_threads(n: int) -> int:
    """XNNPACK's thread pool is one per process: resized only when it differs; returns the
    pool's generation."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)
        _pool["generation"] += 1
    return _pool["generation"]


class ExModel(ExportedModel):
    """An ExecuTorch program as an ``nn.Module`` (see :class:`ExportedModel`): float32 logits
    for any batch size (the program runs at batch 1, image by image, as on a device), on CPU."""

    _handles = {"_method": None, "_generation": -1}

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        params: int | None = None,
        macs: int | None = None,
    ) -> None:
        super().__init__(path, threads=threads, params=params, macs=macs, what="ExecuTorch program")

    def _open(self) -> None:
        from executorch.runtime import Runtime

        self._method = Runtime.get().load_program(str(self.path)).load_method("forward")
        self._generation = _pool["generation"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        generation = _set_threads(self._wanted_threads())
        if self._method is None or self._generation != generation:
            self._open()  # loaded after the pool's last resize
        x = x.detach().cpu().float().contiguous()
        outs = [self._method.execute([x[i : i + 1]])[0] for i in range(x.shape[0])]
        return torch.cat(outs).float()
