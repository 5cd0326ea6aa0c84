"""ONNX export and an ONNX Runtime session that behaves like an ``nn.Module``.

ONNX Runtime is where medlite's int8 models run (it is really faster than eager PyTorch on CPU,
and it is the edge-deployment runtime), so every quantised model is an ONNX file. ``OrtModel``
wraps such a file so that evaluation, the Lightning test loop and ``profile_model`` can treat it
like any other model.

Every file medlite exports explains itself: its ``metadata_props`` hold, as JSON strings, the
preprocessing (:data:`META_PREPROCESS`: input size, fit, mean/std, channels, spatial dims, how
pixels become the input), the class labels in output order (:data:`META_LABELS`) and the task
with how logits become probabilities (:data:`META_TASK`), next to the exporter and the torch
version. :func:`read_metadata` reads them back, with any ONNX tool or ONNX Runtime's
``get_modelmeta().custom_metadata_map``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medlite.atomic import DiskFullError, atomic_path
from medlite.deploy.exported_model import ExportedModel
from medlite.errors import TrainingError

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: metadata key recording which exporter wrote a file (see :func:`onnx_exporter`)
EXPORTER_KEY = "medlite.exporter"
#: metadata keys (JSON values) that make a file usable without its run folder
META_PREPROCESS, META_LABELS, META_TASK = "medlite.preprocess", "medlite.labels", "medlite.task"
#: how a uint8 image becomes the model's input (what :class:`~medlite.data.transforms.Preprocess`
#: does), recorded with the numbers
PIXEL_SCALING = (
    "uint8 image / 255, fitted to input_size (fit: resize = bilinear, antialiased when "
    "shrinking; pad = keep aspect ratio, black borders), then (x - mean) / std per channel; "
    "layout N, C, *spatial"
)
#: opset for the legacy (TorchScript) exporter when none is given; QDQ per-channel needs >= 13
LEGACY_OPSET = 17


class OnnxExportError(TrainingError):
    """A model could not be exported to ONNX (by either exporter); the message says why."""


def _reason(err: BaseException, limit: int = 400) -> str:
    """One line from the innermost cause: exporter errors are pages long."""
    seen = set()
    while True:
        nxt = err.__cause__ or err.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(err))
        err = nxt
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text if len(text) <= limit else text[: limit - 3] + "..."


_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def _fds_to_devnull() -> Iterator[None]:
    """The legacy exporter's C++ side prints whole graphs on failure straight to fds 1 and 2."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no real fds (an embedding host): Python-level redirection only
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress, log each graph pass and warn a lot; keep that out of the
    run's log (failures still surface through the exception)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            _fds_to_devnull(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def _export_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None) -> None:
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        external_data=False,
        verbose=False,
    )


def export_legacy_graph(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None) -> None:
    """The TorchScript exporter's graph of ``model`` at ``x`` (dynamic batch), unchecked."""
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset or LEGACY_OPSET,
        do_constant_folding=True,
    )


_EXPORTERS = {"dynamo": _export_dynamo, "legacy": export_legacy_graph}


def model_metadata(preprocess: dict, task: dict) -> dict[str, str]:
    """The self-describing metadata of an exported model, from a run's ``preprocess`` spec
    (:meth:`Preprocess.describe`) and ``task`` record (:meth:`Task.record`)."""
    mean = [float(m) for m in preprocess["mean"]]
    spatial = int(preprocess.get("spatial_dims") or 2)
    spec = {
        "input_size": int(preprocess["input_size"]),
        "fit": preprocess.get("fit", "resize"),
        "mean": mean,
        "std": [float(s) for s in preprocess["std"]],
        "channels": len(mean),
        "as_rgb": bool(preprocess.get("as_rgb")),
        "spatial_dims": spatial,
        "load_size": preprocess.get("load_size"),
        "input_shape": [len(mean)] + [int(preprocess["input_size"])] * spatial,
        "pixel_scaling": PIXEL_SCALING,
    }
    multilabel = "multi-label" in str(task.get("type"))
    kind = task.get("kind") or "classification"
    scores = "sigmoid per class" if multilabel else "softmax over classes"
    if kind == "segmentation":
        scores = "softmax over classes (axis 1), per pixel; argmax = the class-index mask"
    record = {"kind": kind, "type": task.get("type"), "scores": scores}
    return {
        META_PREPROCESS: json.dumps(spec),
        META_LABELS: json.dumps(list(task.get("labels") or [])),
        META_TASK: json.dumps(record),
    }


def write_metadata(path: str | os.PathLike, props: dict[str, str]) -> None:
    """Add (or replace) ``metadata_props`` of an ONNX file, keeping the others."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    merged = {p.key: p.value for p in proto.metadata_props} | dict(props)
    onnx.helper.set_model_props(proto, merged)
    with atomic_path(Path(path)) as tmp:
        onnx.save_model(proto, str(tmp))


def read_metadata(path: str | os.PathLike) -> dict:
    """An ONNX file's ``metadata_props``, medlite's JSON values decoded."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return decode_metadata({p.key: p.value for p in proto.metadata_props})


def decode_metadata(props: dict[str, str]) -> dict:
    """medlite's JSON-valued keys decoded, the others as they are (strings)."""
    out: dict = dict(props)
    for key in (META_PREPROCESS, META_LABELS, META_TASK):
        if key in out:
            out[key] = json.loads(out[key])
    return out


def onnx_opset(path: str | os.PathLike) -> int | None:
    """The default-domain (``ai.onnx``) opset a file was written for."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    found = [int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    return found[0] if found else None


def _embed_and_tag(
    path: Path, exporter: str, model: nn.Module, metadata: dict[str, str] | None = None
) -> None:
    """One self-contained file (no ``.data`` next to it) that records how it was made, without
    the exporter's per-node debugging metadata."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    external = {
        entry.value
        for t in proto.graph.initializer
        for entry in t.external_data
        if entry.key == "location"
    }
    if external:
        onnx.load_external_data_for_model(proto, str(path.parent))
        for t in proto.graph.initializer:
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    for node in proto.graph.node:
        # the dynamo exporter records each node's Python stack trace and FX name: ~40% of a small
        # model's file, and local source paths have no business in a file shipped to a device
        del node.metadata_props[:]
        node.doc_string = ""
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(
        {EXPORTER_KEY: exporter, "medlite.model": type(model).__name__, "torch": torch.__version__}
    )
    props.update(metadata or {})
    onnx.helper.set_model_props(proto, props)
    onnx.save_model(proto, str(path))
    for name in external:
        (path.parent / name).unlink(missing_ok=True)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check_export(path: Path, x: torch.Tensor, ref: torch.Tensor, model: nn.Module) -> None:
    """Run the file at two batch sizes against PyTorch: catches a batch size or a branch baked in
    by tracing, which would otherwise surface only at deployment."""
    sess = _session(path, torch.get_num_threads())
    if [i.name for i in sess.get_inputs()] != [INPUT_NAME]:
        raise RuntimeError(
            "the exported graph does not read its input (the forward pass was recorded as "
            "constants, e.g. through NumPy or .item())"
        )
    probe = torch.cat([x, x[:1]])  # batch n+1, a size the exporter never saw
    with torch.no_grad():
        ref_probe = torch.cat([ref, ref[:1]])
    for inp, want in ((x[:1], ref[:1]), (probe, ref_probe)):
        got = sess.run(None, {INPUT_NAME: inp.cpu().numpy()})[0]
        want = want.float().cpu().numpy()
        if got.shape != want.shape:
            raise RuntimeError(
                f"ONNX output has shape {tuple(got.shape)} for input {tuple(inp.shape)}, "
                f"PyTorch {tuple(want.shape)} (a traced batch size or branch)"
            )
        tol = 1e-3 * max(1.0, float(np.abs(want).max()))
        diff = float(np.abs(got - want).max())
        if not diff <= tol:
            raise RuntimeError(
                f"ONNX logits differ from PyTorch by {diff:.3g} (> {tol:.1g}) for "
                f"{type(model).__name__}"
            )


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    exporter: str = "auto",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` (in eval mode) to one self-contained ONNX file; returns its path.

    Input ``image`` (N, C, H, W) with a dynamic batch dimension, output ``logits``. The dynamo
    exporter is tried first (it handles more modern models); if it fails, or its graph does not
    match PyTorch at batch 1 and at an unseen batch size, the legacy TorchScript exporter is
    tried, with a warning. ``exporter="dynamo"`` or ``"legacy"`` forces one. ``metadata``
    (:func:`model_metadata`) is stored in the file's ``metadata_props``. Raises
    :class:`OnnxExportError` (a TrainingError) naming the model class when both fail.
    """
    order = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
    if any(name not in _EXPORTERS for name in order):
        raise ValueError(f"exporter must be auto, dynamo or legacy, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = type(model).__name__
    param = next(model.parameters(), None)
    x = example.detach().float()
    if param is not None:
        x = x.to(param.device)
    if x.shape[0] < 2:  # a batch of 1 would be specialised as a constant by torch.export
        x = x.expand(2, *x.shape[1:]).clone()
    was_training = model.training
    model.eval()
    errors: dict[str, str] = {}
    try:
        with torch.no_grad():
            ref = model(x)
        if not isinstance(ref, torch.Tensor):
            raise OnnxExportError(
                f"cannot export {name} to ONNX: its forward returns {type(ref).__name__}, "
                "not one logits tensor"
            )
        for i, which in enumerate(order):
            _remove(path)
            try:
                with atomic_path(path) as tmp:  # checked before it takes the final name
                    try:
                        with _quiet(), torch.no_grad():
                            _EXPORTERS[which](model, x, tmp, opset)
                        _embed_and_tag(tmp, which, model, metadata)
                        _check_export(tmp, x, ref, model)
                    finally:
                        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
            except DiskFullError:
                raise
            except Exception as err:  # noqa: BLE001  (any exporter failure: try the next)
                errors[which] = _reason(err)
                _remove(path)
                if i + 1 < len(order):
                    log.warning(
                        "%s exporter failed for %s (%s); falling back to the %s exporter",
                        which,
                        name,
                        errors[which],
                        order[i + 1],
                    )
                continue
            log.info("exported %s to %s (%s exporter)", name, path, which)
            return path
    finally:
        model.train(was_training)
    details = "; ".join(f"{k} exporter: {v}" for k, v in errors.items())
    raise OnnxExportError(f"cannot export {name} to ONNX ({details})")


def onnx_exporter(path: str | os.PathLike) -> str | None:
    """Which exporter wrote a file made by :func:`export_onnx` ("dynamo" / "legacy")."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}.get(EXPORTER_KEY)


def onnx_weight_dtypes(path: str | os.PathLike) -> dict[str, int]:
    """Stored tensor elements per data type ("float", "int8", ...): proof that weights are int8.

    Counts graph initializers and Constant-node tensors (where small weights can end up), so a
    float weight cannot hide from the count.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()

    def add(t) -> None:
        counts[onnx.TensorProto.DataType.Name(t.data_type).lower()] += int(np.prod(t.dims))

    for t in proto.graph.initializer:
        add(t)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    add(attr.t)
    return dict(counts)


class OrtModel(ExportedModel):
    """An ONNX Runtime session as an ``nn.Module`` (see :class:`ExportedModel`): float32 logits
    for any batch size, on CPU; the session is rebuilt when the wanted thread count changes."""

    _handles = {"_session": None, "_session_threads": 0}

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        params: int | None = None,
        macs: int | None = None,
    ) -> None:
        super().__init__(path, threads=threads, params=params, macs=macs, what="ONNX model")
        self._open()

    def _open(self) -> None:
        n = self._wanted_threads()
        self._session = _session(self.path, n)
        self._session_threads = n
        self.input_name = self._session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._session is None or self._session_threads != self._wanted_threads():
            self._open()
        arr = np.ascontiguousarray(x.detach().cpu().float().numpy())
        out = self._session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


def max_abs_diff(torch_model: nn.Module, ort_model: nn.Module, x: torch.Tensor) -> float:
    """Largest |logit difference| between two models on ``x`` (both in eval mode, no grad)."""
    modes = [(m, m.training) for m in (torch_model, ort_model)]
    try:
        for m, _ in modes:
            m.eval()
        param = next(torch_model.parameters(), None)
        with torch.inference_mode():
            a = torch_model(x if param is None else x.to(param.device)).float().cpu()
            b = ort_model(x).float().cpu()
        return float((a - b).abs().max())
    finally:
        for m, mode in modes:
            m.train(mode)
