"""OpenVINO: Intel's CPU runtime (also fast on AMD x86), fp32 and int8.

The fp32 model is converted from the run's exported ONNX file (so it is the same graph, with
the temperature and metadata already in it; a model with selective scans from a trace with one
fused node per scan, see :mod:`.openvino_scan`); int8 is NNCF's post-training quantisation of
that model, calibrated on training images like ONNX Runtime's, with int8 weights also for the
layers it leaves fp32, or the run's own QDQ int8 file, which OpenVINO runs as int8 directly (a
QAT run keeps what it learned). Models are compiled per input shape (static shapes run faster). An OpenVINO model is two
files, ``<name>.xml`` (graph, with medlite's metadata in its ``rt_info``) and ``<name>.bin``
(weights); both are written under temporary names and renamed, the weights first.

Privacy: nothing is sent to Intel (see :mod:`.openvino_import`).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from medlite.atomic import DiskFullError
from medlite.deploy.exported_model import ExportedModel
from medlite.deploy.openvino_import import import_openvino
from medlite.deploy.openvino_scan import add_scan_extension, scan_extensions

log = logging.getLogger(__name__)

#: rt_info section holding the same metadata keys as an ONNX file's metadata_props
RT_SECTION = "medlite"


def _save(model, path: Path) -> None:
    """``model`` as ``path`` (.xml) and its .bin, never a half-written pair under final names."""
    ov = import_openvino()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp_openvino_") as tmp:
        staged = Path(tmp) / path.name
        try:
            ov.save_model(model, str(staged), compress_to_fp16=False)
        except RuntimeError as err:
            if "No space left" in str(err):
                raise DiskFullError(f"disk full while writing {path} in {path.parent}") from err
            raise
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)


@functools.lru_cache(maxsize=1)
def core():
    """The process's one ``ov.Core``, which also reads medlite's fused selective scan. One,
    never destroyed: cores destroyed out of order leave the thread a freed alternate signal
    stack (see :mod:`medlite.signal_stack`)."""
    ov = import_openvino()
    made = ov.Core()
    add_scan_extension(made)
    return made


def _set_metadata(model, metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        model.set_rt_info(str(value), [RT_SECTION, key])


def _raw_metadata(model) -> dict[str, str]:
    if not model.has_rt_info([RT_SECTION]):
        return {}
    section = model.get_rt_info([RT_SECTION]).astype(dict)
    return {k: v.astype(str) if hasattr(v, "astype") else str(v) for k, v in section.items()}


def read_metadata(path: str | os.PathLike) -> dict:
    """The medlite metadata of an OpenVINO .xml file, JSON values decoded (as for ONNX files)."""
    from medlite.deploy.onnx import decode_metadata

    return decode_metadata(_raw_metadata(core().read_model(str(path))))


def convert_onnx(
    onnx_path: Path,
    path: Path,
    metadata: dict[str, str] | None = None,
    *,
    metadata_from: Path | None = None,
) -> None:
    """An ONNX file as an OpenVINO model (same graph, same outputs, dynamic batch kept), with
    the metadata the file (or ``metadata_from``) states and ``metadata``."""
    import onnx

    ov = import_openvino()
    model = ov.convert_model(str(onnx_path), extension=scan_extensions())
    proto = onnx.load(str(metadata_from or onnx_path), load_external_data=False)
    _set_metadata(model, {p.key: p.value for p in proto.metadata_props} | dict(metadata or {}))
    _save(model, path)


#: validation items and their score: ``score(compiled_model, items) -> float``, higher is better
Validation = tuple[list, Callable[[object, Iterable], float]]


def _fake_quantize_count(model) -> int:
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def _compress_fp32_weights(model) -> tuple[object, int]:
    """Int8 weights (per channel, dequantised when compiled) for the layers NNCF's quantisation
    left fp32 because their inputs are not worth quantising (e.g. the 1x1 convolutions of
    squeeze-excitation blocks, which follow a global pooling): the file shrinks, the
    activations stay as quantised. LiteCNN at 224 px: 1.27 -> 0.71 MB. Returns the model and
    how many layers were compressed."""
    import nncf

    before = _weight_constants(model)
    level = logging.getLogger("nncf").level
    nncf.set_log_level(logging.WARNING)  # its statistics table is not ours to print
    try:
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    finally:
        nncf.set_log_level(level)
    return model, max(0, before - _weight_constants(model))


def _weight_constants(model) -> int:
    """fp32 constants feeding convolutions and matrix products: the weights left fp32."""
    kinds = {"Convolution", "GroupConvolution", "MatMul"}
    count = 0
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "f32":
            consumers = op.output(0).get_target_inputs()
            count += any(c.get_node().get_type_name() in kinds for c in consumers)
    return count


def quantize(
    fp32_path: Path,
    batches: Iterable[torch.Tensor],
    path: Path,
    *,
    transformer: bool = False,
    metadata: dict[str, str] | None = None,
    validation: Validation | None = None,
    max_drop: float = 0.01,
) -> dict:
    """NNCF post-training int8 of an OpenVINO fp32 model, calibrated on ``batches``; returns what
    the export record keeps of it.

    With ``validation`` (the run's validation split, never its test split), int8 is scored
    against fp32; when it loses more than ``max_drop``, NNCF's accuracy control takes over: it
    ranks the quantised layers by how much each one costs and returns them to fp32, most
    harmful first, until the drop is within ``max_drop`` (mixed precision, chosen by measured
    sensitivity), instead of the export failing.
    """
    import_openvino()  # before nncf: no telemetry
    import nncf

    arrays = [np.ascontiguousarray(b.float().numpy()) for b in batches]
    model = core().read_model(str(fp32_path))
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    subset = max(1, len(arrays))
    quantized = nncf.quantize(model, nncf.Dataset(arrays), subset_size=subset, **kwargs)
    entry: dict = {
        "source": "post-training static quantisation (NNCF, OpenVINO)",
        "calibration_images": int(sum(len(a) for a in arrays)),
        "model_type": "transformer" if transformer else "default",
    }
    if validation is not None:
        items, score = validation
        runtime = core()
        exact = {"INFERENCE_PRECISION_HINT": "f32"}
        ref = float(score(runtime.compile_model(model, "CPU", exact), items))
        got = float(score(runtime.compile_model(quantized, "CPU", exact), items))
        entry["val"] = {"fp32": ref, "int8": got, "drop": ref - got, "max_drop": max_drop}
        if ref - got > max_drop:
            log.info(
                "int8 loses %.4f on the validation split (> %.4f): accuracy control returns the "
                "most sensitive layers to fp32",
                ref - got,
                max_drop,
            )
            plain = _fake_quantize_count(quantized)
            quantized = nncf.quantize_with_accuracy_control(
                runtime.read_model(str(fp32_path)),
                nncf.Dataset(arrays),
                nncf.Dataset(items),
                validation_fn=score,
                max_drop=max_drop,
                subset_size=subset,
                **kwargs,
            )
            after = float(score(runtime.compile_model(quantized, "CPU", exact), items))
            entry["source"] = "NNCF quantisation with accuracy control (mixed int8/fp32)"
            entry["mixed_precision"] = {
                "fake_quantize_ops": {"plain_int8": plain, "kept": _fake_quantize_count(quantized)},
                "val_int8": after,
                "val_drop": ref - after,
            }
    if "mixed_precision" not in entry:  # layers kept fp32 for accuracy keep fp32 weights
        quantized, entry["weight_only_int8_layers"] = _compress_fp32_weights(quantized)
    _set_metadata(quantized, _raw_metadata(model) | dict(metadata or {}))
    _save(quantized, path)
    return entry


def compile_config(threads: int) -> dict:
    """How medlite compiles for the CPU: latency, one stream, threads not pinned, f32."""
    return {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
        # OpenVINO's default on CPUs with bf16 instructions is bf16: fp32 means fp32
        "INFERENCE_PRECISION_HINT": "f32",
    }


class OvModel(ExportedModel):
    """An OpenVINO model as an ``nn.Module`` (see :class:`ExportedModel`): float32 logits for any
    batch size, on CPU.

    Compiled for the input shape it is given (a few shapes kept; a new thread count recompiles):
    OpenVINO's CPU plugin runs a static shape faster than the file's dynamic batch, measured at
    224 px, 1 thread: LiteCNN 0.55 -> 0.48 ms (int8 0.49 -> 0.41), Vim 56 -> 32 ms. Compiled for
    latency, one stream, threads not pinned to cores (on a shared machine pinning fights the
    other processes for the same cores), and at f32 wherever a layer is not int8: OpenVINO would
    otherwise run "fp32" models in bf16 on CPUs that have it, and the parity checks would be
    checking another model.
    """

    _handles = {"_core": None, "_model": None, "_requests": None, "_compiled_threads": 0}
    #: compiled shapes kept at once (a benchmark alternates batch 1 and its batch size)
    SHAPES_KEPT = 4

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        params: int | None = None,
        macs: int | None = None,
    ) -> None:
        path = Path(path)
        files = [path, path.with_suffix(".bin")]
        super().__init__(
            path, files=files, threads=threads, params=params, macs=macs,
            what="OpenVINO model (.xml and its .bin)",
        )  # fmt: skip
        self._open()

    def _open(self) -> None:
        self._core = core()
        self._model = self._core.read_model(str(self.path))  # a broken file fails here
        self._requests = {}
        self._compiled_threads = self._wanted_threads()

    def _request_for(self, shape: tuple[int, ...]):
        n = self._wanted_threads()
        if self._model is None or n != self._compiled_threads:
            self._open()
        request = self._requests.get(shape)
        if request is None:
            if len(self._requests) >= self.SHAPES_KEPT:
                self._requests.clear()
            model = self._model.clone()
            model.reshape({0: list(shape)})
            compiled = self._core.compile_model(model, "CPU", compile_config(n))
            request = self._requests[shape] = compiled.create_infer_request()
        return request

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().float().numpy())
        out = self._request_for(tuple(arr.shape)).infer({0: arr})[0]
        return torch.from_numpy(np.array(out, dtype=np.float32)).to(x.device)
