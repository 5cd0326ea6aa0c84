"""Int8 quantisation, executed by ONNX Runtime (our CPU int8 and edge-deployment runtime).

Three step kinds, all ending in an int8 ONNX file wrapped as :class:`~medlite.deploy.OrtModel`:

``ptq``      post-training static int8: export fp32 ONNX, calibrate activation ranges on real
             training images (no augmentation), QDQ with per-channel int8 weights. The default.
``dynamic``  int8 MatMul weights, activations quantised on the fly: only Linear-heavy models
             (transformers) gain; on a CNN it was slower than fp32.
``qat``      quantisation-aware fine-tuning: fake-quantise every Conv2d/Linear (per-channel int8
             weights, per-tensor uint8 inputs) with core torch ops, train a few epochs through
             them (straight-through estimator), then the same static conversion as ``ptq``.

Why per-channel weights: exporting folds BatchNorm into the preceding conv, which scales each
output channel; a per-channel grid scales with it, so what QAT trained on is what ORT runs.
The eager ``torch.ao.quantization`` API is deprecated and not used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from medlite.atomic import atomic_path
from medlite.compress.base import CompressionStep, RunContext
from medlite.compress.registry import register_step
from medlite.compress.structure import StructureError, context_build_args, save_compressed
from medlite.deploy.onnx import (
    OnnxExportError,
    OrtModel,
    export_onnx,
    onnx_exporter,
    onnx_weight_dtypes,
)
from medlite.efficiency import count_macs, count_parameters
from medlite.errors import ConfigError, MedliteError, TrainingError

log = logging.getLogger(__name__)

_QUANT_TYPES = {"int8": "QInt8", "qint8": "QInt8", "uint8": "QUInt8", "quint8": "QUInt8"}
_CALIBRATION = {
    "minmax": "MinMax",
    "percentile": "Percentile",
    "entropy": "Entropy",
    "distribution": "Distribution",
}
_EIGHT_BIT = ("int8", "uint8")
#: smallest fake-quant scale: an all-zero channel or activation (e.g. a zero-initialised BN)
#: must not divide by zero
_EPS = 1e-8


@functools.cache
def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI int8 dot products (None: its flags can't be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_reduce_range(value: bool | str) -> bool:
    """``reduce_range: auto``: 7-bit weights on x86 CPUs without VNNI (or whose flags can't be
    read). There ONNX Runtime's uint8 x int8 kernels add pairs of products in 16 bits, which
    saturate with full 8-bit weights: a LiteCNN's int8 logits drifted by 3.4 on a range of 4.3
    on an AVX2-only CPU; with 7-bit weights it stays within the tests' bounds."""
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"reduce_range must be true, false or auto, got {value!r}")
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
            return False
        return not cpu_has_vnni()
    return bool(value)


def _choice(kind: str, key: str, value: str, options: dict[str, str]) -> str:
    name = str(value).lower()
    if name not in options:
        raise ConfigError(
            f"compress step {kind}: {key}={value!r} is not one of {', '.join(sorted(options))}"
        )
    return name


def _arch(ctx: RunContext, model: nn.Module) -> str:
    return ctx.arch or type(model).__name__


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 4)


def eight_bit_fraction(counts: dict[str, int]) -> float:
    """Share of stored weight elements that are 8-bit (int64 shape constants left out)."""
    total = sum(v for k, v in counts.items() if k != "int64")
    return sum(counts.get(k, 0) for k in _EIGHT_BIT) / total if total else 0.0


@contextlib.contextmanager
def _ort_quiet() -> Iterator[None]:
    """ONNX Runtime's quantiser warns through the root logger (e.g. for every LayerNorm weight
    it cannot quantise per channel); keep that out of the run's log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    """Run in ``path`` as the working directory (``contextlib.chdir`` before Python 3.11)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _preprocess(src: Path, dst: Path) -> str:
    """ORT's recommended pre-processing (shape inference, graph optimisation) -> ``dst``.

    ``value_info`` from the dynamo exporter breaks ORT's shape inference, so it is dropped first.
    Falls back to ONNX-only shape inference, then to no pre-processing; returns what was done.
    Each attempt reads the file afresh: a failed attempt can leave an in-memory model rewritten
    to point at external data in a deleted temporary folder. ORT runs in a scratch working
    directory: when its symbolic shape inference is incomplete it dumps the model
    (``sym_shape_infer_temp.onnx`` and uuid-named ``.data`` files) into the current directory.
    """
    import tempfile

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    stripped = dst.with_name(dst.stem + "_in.onnx")
    onnx.save_model(proto, str(stripped))
    attempts = (("full", {}), ("onnx-shapes-only", {"skip_symbolic_shape": True}))
    try:
        for mode, kwargs in attempts:
            try:
                with _ort_quiet(), tempfile.TemporaryDirectory() as scratch, _cwd(scratch):
                    quant_pre_process(str(stripped), str(dst), **kwargs)
                unshare_norm_parameters(dst)
                return mode
            except Exception as err:  # noqa: BLE001  (the next, lighter attempt may work)
                log.warning("ORT pre-processing (%s) failed: %s: %s", mode, type(err).__name__, err)
        shutil.copyfile(stripped, dst)
        unshare_norm_parameters(dst)
        return "skipped"
    finally:
        stripped.unlink(missing_ok=True)


#: normalisations whose scale and bias ORT's QDQ quantiser treats as per-node parameters
_NORMS = {"InstanceNormalization", "LayerNormalization", "BatchNormalization", "GroupNormalization"}


def unshare_norm_parameters(path: Path) -> int:
    """Give every normalisation node its own copy of its scale/bias initializers; returns how
    many copies were made.

    The dynamo exporter writes a GroupNorm as InstanceNormalization over constant ones/zeros of
    length ``groups``, one pair shared by every such node; ORT's QDQ quantiser quantises a bias
    per consumer and, for a shared one, rewires nodes to another tensor's dequantised value (seen
    on UltraLight VM-UNet at 128/256 px: the int8 file failed to load with "Incompatible
    dimensions"). Private copies cost a few floats each."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    copies = 0
    for node in graph.node:
        if node.op_type not in _NORMS:
            continue
        for k, name in enumerate(node.input):
            if k == 0 or name not in inits or users.get(name, 0) < 2:
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}__{node.name or copies}"
            graph.initializer.append(copy)
            node.input[k] = copy.name
            copies += 1
    if copies:
        used = {name for node in graph.node for name in node.input}
        unused = [i for i in graph.initializer if i.name not in used and i.name in users]
        for init in unused:  # originals every consumer now has a copy of
            graph.initializer.remove(init)
        onnx.save_model(proto, str(path))
    return copies


def _calibration_reader(batches: list[torch.Tensor], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds the calibration batches once, in order."""

        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict | None:
            x = next(self._it, None)
            return None if x is None else {input_name: x.detach().cpu().float().numpy()}

        def rewind(self) -> None:
            self._it = iter(batches)

    return _Reader()


def classifier_name(model: nn.Module, example: torch.Tensor | None = None) -> str | None:
    """Qualified name of the layer that produces the logits.

    A classifier's final nn.Linear (timm's ``get_classifier()``, else the last Linear). A
    dense-prediction network (its output for ``example`` is an (N, K, H, W) map, e.g. a
    segmentation U-Net) has a conv head instead: the last Conv2d / Linear its forward pass runs.
    """
    if example is not None:
        head = _dense_head(model, example)
        if head is not None:
            return head
    names = {id(m): n for n, m in model.named_modules()}
    head = None
    if hasattr(model, "get_classifier"):
        with contextlib.suppress(Exception):
            head = model.get_classifier()
    if isinstance(head, nn.Module) and id(head) in names:
        linears = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            base = names[id(head)]
            return ".".join(p for p in (base, linears[-1]) if p)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return last[-1] if last else None


def _dense_head(model: nn.Module, example: torch.Tensor) -> str | None:
    """The last plain Conv2d / Linear run by a model whose output is a per-pixel map (else None)."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
        for name, m in model.named_modules()
        if name and type(m) in (nn.Conv2d, nn.Linear)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if isinstance(out, torch.Tensor) and out.ndim == 4 and order:
        return order[-1]
    return None


def _nodes_reading(onnx_path: Path, initializers: set[str]) -> list[str]:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in proto.graph.node if initializers & set(n.input)]


def _save_torch_model(model: nn.Module, path: Path, ctx: RunContext) -> None:
    """Keep the PyTorch model the int8 file came from (weights and structural record, no code):
    deployment benchmarks eager PyTorch against it, and a pruned or distilled network can't be
    rebuilt from the config's weights alone."""
    try:
        save_compressed(model, path, context_build_args(ctx), ctx.example_input(2))
    except StructureError as err:  # the int8 file is still the result
        path.unlink(missing_ok=True)
        log.warning("could not save the fp32 PyTorch model as %s: %s", path, err)


class _OrtInt8Step(CompressionStep):
    """Shared by ptq / dynamic / qat: export fp32 ONNX, quantise it, measure and report."""

    terminal = True
    #: which ORT conversion the subclass runs (for messages)
    conversion = "static"

    def artefact(self, model: nn.Module) -> Path | None:
        """The int8 ONNX file the step wrote (the model is its runtime session)."""
        return getattr(model, "path", None)

    def __init__(
        self,
        *,
        epochs: int = 0,
        lr: float | None = None,
        calibration_batches: int = 8,
        per_channel: bool = True,
        weight_type: str = "int8",
        reduce_range: bool | str = "auto",
        quantize_classifier: bool = True,
        threads: int | None = None,
        opset: int | None = None,
    ) -> None:
        super().__init__(epochs=epochs, lr=lr)
        self.reduce_range = resolve_reduce_range(reduce_range)
        if int(calibration_batches) < 1:
            raise ConfigError(
                f"compress step {self.kind}: calibration_batches must be >= 1, "
                f"got {calibration_batches}"
            )
        self.calibration_batches = int(calibration_batches)
        self.per_channel = bool(per_channel)
        self.weight_type = _choice(self.kind, "weight_type", weight_type, _QUANT_TYPES)
        self.quantize_classifier = bool(quantize_classifier)
        self.threads = None if threads is None else int(threads)
        self.opset = None if opset is None else int(opset)

    def check(self, model: nn.Module, example: torch.Tensor) -> None:
        """Export the untrained model once now, so an unexportable one fails before training."""
        import tempfile

        name = type(model).__name__
        with tempfile.TemporaryDirectory() as tmp:
            try:
                export_onnx(model, example, Path(tmp) / "check.onnx", opset=self.opset)
            except OnnxExportError as err:
                raise ConfigError(
                    f"compress step {self.kind}: model {name} can't be exported to ONNX, which "
                    f"int8 on ONNX Runtime needs ({err}); use compress=none or a PyTorch-side "
                    "recipe (prune_unstructured, lowrank, kd) for this model"
                ) from None

    # ------------------------------------------------------------------ shared pipeline
    def _export(self, model: nn.Module, ctx: RunContext, path: Path) -> Path:
        arch = _arch(ctx, model)
        try:
            return export_onnx(model, ctx.example_input(2), path, opset=self.opset)
        except OnnxExportError as err:
            raise TrainingError(
                f"{self.kind}: model {arch} could not be exported to ONNX: {err}. int8 "
                "(compress=ptq, qat, dynamic) runs on ONNX Runtime and needs an exportable "
                "graph; for this model use compress=none or a PyTorch-side recipe (pruning, "
                "low-rank, distillation)"
            ) from None

    def _excluded_nodes(
        self, model: nn.Module, onnx_path: Path, example: torch.Tensor | None = None
    ) -> list[str]:
        """ONNX nodes of the classifier (a segmentation network's conv head) when it stays fp32
        (``quantize_classifier: false``)."""
        if self.quantize_classifier:
            return []
        name = classifier_name(model, example)
        nodes = _nodes_reading(onnx_path, {f"{name}.weight"}) if name else []
        if not nodes:
            log.warning(
                "%s: quantize_classifier=false but the classifier (%s) was not found in the ONNX "
                "graph; it is quantised with the rest",
                self.kind,
                name,
            )
        return nodes

    def _quantize(
        self, src: Path, dst: Path, batches: list[torch.Tensor], exclude: list[str]
    ) -> None:
        raise NotImplementedError

    def _to_int8(self, model: nn.Module, ctx: RunContext) -> OrtModel:
        """fp32 model -> ``compressed/model_fp32.onnx`` -> ``compressed/model_int8.onnx``."""
        import onnxruntime

        arch = _arch(ctx, model)
        model = model.cpu()
        out = Path(ctx.output_dir) / "compressed"
        out.mkdir(parents=True, exist_ok=True)
        fp32_path = self._export(model, ctx, out / "model_fp32.onnx")
        _save_torch_model(model, out / "model_fp32.pt", ctx)
        batches = ctx.calibration_batches(self.calibration_batches)
        if not batches:
            raise TrainingError(f"{self.kind}: the training split gave no calibration images")
        pre_path = out / "model_fp32_pre.onnx"
        int8_path = out / "model_int8.onnx"
        int8_path.unlink(missing_ok=True)
        try:
            preprocess = _preprocess(fp32_path, pre_path)
            exclude = self._excluded_nodes(model, pre_path, batches[0][:1])
            with _ort_quiet(), atomic_path(int8_path) as tmp:  # never a half-written int8 file
                self._quantize(pre_path, tmp, batches, exclude)
        except MedliteError:  # a full disk included
            raise
        except Exception as err:  # noqa: BLE001  (ORT raises anything; say what to try)
            raise TrainingError(
                f"{self.kind}: ONNX Runtime could not quantise model {arch} ({self.conversion} "
                f"int8): {type(err).__name__}: {err}. Try calibrate_method=minmax, "
                "per_channel=false, or another compress recipe"
            ) from None
        finally:
            pre_path.unlink(missing_ok=True)
        counts = onnx_weight_dtypes(int8_path)
        if not any(counts.get(k, 0) for k in _EIGHT_BIT):
            raise TrainingError(
                f"{self.kind}: ONNX Runtime quantised no weights of model {arch} to int8 "
                f"({self.conversion} conversion); stored tensors: {counts}"
            )

        example = batches[0]
        try:
            macs = count_macs(model, example[:1])
        except Exception as err:  # noqa: BLE001  (the MAC count is a report nicety)
            log.warning("%s: could not count MACs of %s: %s", self.kind, arch, err)
            macs = None
        int8 = OrtModel(int8_path, threads=self.threads, params=count_parameters(model), macs=macs)
        fp32 = OrtModel(fp32_path, threads=self.threads, params=count_parameters(model), macs=macs)
        # measured as its own row: at small inputs much of the speed-up is the runtime, not int8
        self.extra_stages = {"onnx_fp32": fp32}
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            ref = model(example).float()
            out_fp32, out_int8 = fp32(example), int8(example)
        model.train(was_training)
        fp32_counts = onnx_weight_dtypes(fp32_path)
        self.report.update(
            {
                "runtime": f"onnxruntime {onnxruntime.__version__}",
                "exporter": onnx_exporter(fp32_path),
                "preprocess": preprocess,
                "fp32_onnx": str(fp32_path),
                "int8_onnx": str(int8_path),
                "fp32_onnx_mb": _size_mb(fp32_path),
                "int8_onnx_mb": _size_mb(int8_path),
                "size_ratio": round(_size_mb(fp32_path) / max(_size_mb(int8_path), 1e-9), 3),
                "weight_dtypes_fp32": fp32_counts,
                "weight_dtypes_int8": counts,
                "int8_weight_fraction": round(eight_bit_fraction(counts), 4),
                "calibration_batches": len(batches),
                "calibration_images": sum(len(b) for b in batches),
                "excluded_nodes": exclude,
                "logit_range": float(ref.max() - ref.min()),
                "fp32_onnx_max_abs_diff": float((out_fp32 - ref).abs().max()),
                "int8_max_abs_diff": float((out_int8 - ref).abs().max()),
                "int8_argmax_agreement": float(
                    (out_int8.argmax(1) == ref.argmax(1)).float().mean()
                ),
            }
        )
        ctx.notes.update({"fp32_model": model, "onnx_fp32": fp32_path, "onnx_int8": int8_path})
        log.info(
            "%s: %s int8 ONNX %.2f MB (fp32 %.2f MB), %.1f%% of weights 8-bit, max |logit diff| "
            "%.3g on a calibration batch",
            self.kind,
            arch,
            self.report["int8_onnx_mb"],
            self.report["fp32_onnx_mb"],
            100 * self.report["int8_weight_fraction"],
            self.report["int8_max_abs_diff"],
        )
        return int8


class _StaticInt8(_OrtInt8Step):
    """Static QDQ conversion with calibrated activation ranges (ptq and qat)."""

    def __init__(
        self,
        *,
        activation_type: str = "uint8",
        calibrate_method: str = "minmax",
        percentile: float = 99.999,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.activation_type = _choice(self.kind, "activation_type", activation_type, _QUANT_TYPES)
        self.calibrate_method = _choice(
            self.kind, "calibrate_method", calibrate_method, _CALIBRATION
        )
        self.percentile = float(percentile)
        self.report["settings"] = {
            "format": "QDQ",
            "per_channel": self.per_channel,
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "calibrate_method": self.calibrate_method,
            "reduce_range": self.reduce_range,
        }

    def _quantize(
        self, src: Path, dst: Path, batches: list[torch.Tensor], exclude: list[str]
    ) -> None:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        from medlite.deploy.onnx import INPUT_NAME

        extra = {}
        if self.calibrate_method == "percentile":
            extra["CalibPercentile"] = self.percentile
        quantize_static(
            str(src),
            str(dst),
            _calibration_reader(batches, INPUT_NAME),
            quant_format=QuantFormat.QDQ,
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
            activation_type=getattr(QuantType, _QUANT_TYPES[self.activation_type]),
            weight_type=getattr(QuantType, _QUANT_TYPES[self.weight_type]),
            calibrate_method=getattr(CalibrationMethod, _CALIBRATION[self.calibrate_method]),
            nodes_to_exclude=exclude or None,
            extra_options=extra,
        )


@register_step("ptq")
class PostTrainingQuantization(_StaticInt8):
    """Static int8 of the trained model; no training (``epochs`` is always 0).

    Parameters: ``calibration_batches`` training batches (no augmentation) set the activation
    ranges; ``per_channel`` weight scales; ``activation_type`` uint8 / ``weight_type`` int8 (the
    U8S8 pair ORT's x86 kernels are fastest with); ``calibrate_method`` minmax | percentile
    (``percentile``) | entropy; ``reduce_range`` 7-bit weights (auto: on x86 CPUs without
    VNNI, whose int8 kernels saturate); ``quantize_classifier`` false keeps the last Linear
    fp32; ``threads`` of the ORT session (null: follow torch); ``opset`` of the export (null: the exporter's default).
    """

    def __init__(
        self,
        calibration_batches: int = 8,
        per_channel: bool = True,
        activation_type: str = "uint8",
        weight_type: str = "int8",
        calibrate_method: str = "minmax",
        percentile: float = 99.999,
        reduce_range: bool | str = "auto",
        quantize_classifier: bool = True,
        threads: int | None = None,
        opset: int | None = None,
    ) -> None:
        super().__init__(
            epochs=0,
            lr=None,
            calibration_batches=calibration_batches,
            per_channel=per_channel,
            activation_type=activation_type,
            weight_type=weight_type,
            calibrate_method=calibrate_method,
            percentile=percentile,
            reduce_range=reduce_range,
            quantize_classifier=quantize_classifier,
            threads=threads,
            opset=opset,
        )

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return self._to_int8(model, ctx)


def linear_mac_fraction(model: nn.Module, example: torch.Tensor) -> float:
    """Share of conv + linear multiply-accumulates spent in nn.Linear (what dynamic int8 speeds up)."""
    macs = {"linear": 0, "conv": 0}

    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Linear):
            macs["linear"] += output.numel() * module.in_features
        else:
            k = math.prod(module.kernel_size)
            macs["conv"] += output.numel() * (module.in_channels // module.groups) * k

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    total = macs["linear"] + macs["conv"]
    return macs["linear"] / total if total else 0.0


@register_step("dynamic")
class DynamicQuantization(_OrtInt8Step):
    """Int8 MatMul weights with activations quantised at run time; no calibration, no training.

    Only ``op_types`` (MatMul: Linear layers on token sequences) are converted; ORT has no dynamic
    int8 Gemm or fast int8 conv, so a CNN gains nothing (it was slower than fp32): a warning says
    so when under half of the model's MACs are in nn.Linear. ``MatMulConstBOnly`` keeps
    attention's activation x activation products fp32. A model without any nn.Linear (a fully
    convolutional segmentation network) has no MatMul at all: ``Conv`` is then added to the op
    types (ConvInteger), with a warning, so the step still produces an int8 model.
    """

    conversion = "dynamic"
    #: below this share of MACs in nn.Linear, dynamic int8 is not expected to help
    min_linear_fraction = 0.5

    def __init__(
        self,
        per_channel: bool = False,
        weight_type: str = "int8",
        op_types: list[str] | tuple[str, ...] = ("MatMul",),
        reduce_range: bool | str = "auto",
        quantize_classifier: bool = True,
        threads: int | None = None,
        opset: int | None = None,
    ) -> None:
        super().__init__(
            epochs=0,
            lr=None,
            calibration_batches=1,  # only to measure the logit difference
            per_channel=per_channel,
            weight_type=weight_type,
            reduce_range=reduce_range,
            quantize_classifier=quantize_classifier,
            threads=threads,
            opset=opset,
        )
        self.op_types = [str(t) for t in op_types]
        self.report["settings"] = {
            "per_channel": self.per_channel,
            "weight_type": self.weight_type,
            "op_types": self.op_types,
            "reduce_range": self.reduce_range,
        }

    def _quantize(
        self, src: Path, dst: Path, batches: list[torch.Tensor], exclude: list[str]
    ) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=self.op_types,
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
            weight_type=getattr(QuantType, _QUANT_TYPES[self.weight_type]),
            nodes_to_exclude=exclude or None,
            extra_options={"MatMulConstBOnly": True},
        )

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        arch = _arch(ctx, model)
        fraction = linear_mac_fraction(model.cpu(), ctx.example_input(1))
        self.report["linear_mac_fraction"] = round(fraction, 4)
        has_linear = any(isinstance(m, nn.Linear) for m in model.modules())
        if not has_linear and "Conv" not in self.op_types:
            # a fully convolutional network (e.g. a segmentation U-Net) has no MatMul to convert:
            # without Conv, ORT would quantise nothing and the step would fail
            self.op_types = [*self.op_types, "Conv"]
            self.report["settings"]["op_types"] = list(self.op_types)
            self.report["op_types_note"] = (
                "the model has no nn.Linear (no MatMul to convert): Conv added to op_types "
                "(ConvInteger, dynamic int8 convs)"
            )
            log.warning(
                "dynamic: model %s has no nn.Linear layer, so there is no MatMul to convert; "
                "converting its convs too (op_types %s). Dynamic int8 convs are usually slower "
                "than fp32 on CPU: compress=ptq is the int8 recipe for conv networks",
                arch,
                self.op_types,
            )
        elif fraction < self.min_linear_fraction:
            log.warning(
                "dynamic: model %s spends only %.0f%% of its conv/linear MACs in nn.Linear; "
                "dynamic int8 converts only MatMul weights, so it will not speed this model up "
                "(it was slower than fp32 on a CNN); use compress=ptq for conv-dominated models",
                arch,
                100 * fraction,
            )
        return self._to_int8(model, ctx)


# ---------------------------------------------------------------------------------------- QAT
class FakeQuantWrapper(nn.Module):
    """A Conv2d / Linear that computes with int8-rounded weights and uint8-rounded inputs.

    Weights: symmetric int8 per output channel (scale = max|w| / 127, from the current weights).
    Input: asymmetric uint8 per tensor, range from an EMA of batch min/max that is updated in
    training mode (and while ``calibrating``) and frozen in eval. Both use core torch fake-quant
    ops whose backward is the straight-through estimator. Attribute reads the wrapper does not
    have (``weight``, ``in_channels``...) go to the wrapped module.
    """

    def __init__(
        self, module: nn.Module, name: str, momentum: float = 0.05, arch: str = ""
    ) -> None:
        super().__init__()
        if type(module) not in (nn.Conv2d, nn.Linear):
            raise TypeError(f"FakeQuantWrapper wraps nn.Conv2d / nn.Linear, got {type(module)}")
        self.module = module
        self.layer_name = name
        self.arch = arch
        self.momentum = float(momentum)
        self.calibrating = False
        self.register_buffer("act_min", torch.zeros(1))
        self.register_buffer("act_max", torch.zeros(1))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            return getattr(inner, name)

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.module.weight.detach()
        scale = (w.abs().flatten(1).amax(1).float() / 127).clamp_min(_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def fake_weight(self) -> torch.Tensor:
        """The weight as int8 inference sees it (<= 255 distinct values per output channel)."""
        scale, zp = self.weight_qparams()
        return torch.fake_quantize_per_channel_affine(self.module.weight, scale, zp, 0, -127, 127)

    def input_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self.act_min.clamp(max=0.0)
        hi = self.act_max.clamp(min=0.0)
        scale = ((hi - lo) / 255).clamp_min(_EPS)
        zp = torch.round(-lo / scale).clamp(0, 255).to(torch.int32)
        return scale, zp

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        if bool(self.observed):
            m = self.momentum
            self.act_min.mul_(1 - m).add_(m * lo)
            self.act_max.mul_(1 - m).add_(m * hi)
        else:
            self.act_min.fill_(lo)
            self.act_max.fill_(hi)
            self.observed.fill_(True)

    def _check_finite(self, w_scale: torch.Tensor) -> None:
        values = torch.cat([self.act_min, self.act_max, w_scale.sum().view(1)])
        if not bool(torch.isfinite(values).all()):
            raise TrainingError(
                f"qat: fake-quant range of layer {self.layer_name} of model {self.arch} became "
                f"non-finite (input range [{float(self.act_min):.3g}, {float(self.act_max):.3g}], "
                "weights NaN/inf). Known cause: timm ResNets with a zero-initialised last BN per "
                "block (set model.kwargs.zero_init_last=false) or QAT from an untrained model; "
                "otherwise lower the qat step's lr"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.calibrating:
            self._observe(x)
        w_scale, w_zp = self.weight_qparams()
        if self.training:
            self._check_finite(w_scale)
        if bool(self.observed):
            scale, zp = self.input_qparams()
            x = torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, 0, 255).to(x.dtype)
        w = torch.fake_quantize_per_channel_affine(self.module.weight, w_scale, w_zp, 0, -127, 127)
        if isinstance(self.module, nn.Conv2d):
            return self.module._conv_forward(x, w, self.module.bias)
        return F.linear(x, w, self.module.bias)

    def extra_repr(self) -> str:
        return f"layer={self.layer_name!r}, momentum={self.momentum}"


def wrap_for_qat(
    model: nn.Module, *, skip: tuple[str, ...] = (), momentum: float = 0.05, arch: str = ""
) -> list[str]:
    """Replace every plain nn.Conv2d / nn.Linear (not in ``skip``) with a FakeQuantWrapper, in
    place; returns the wrapped names. Subclasses (timm's Conv2dSame, parametrised layers) keep
    their own forward and are left alone."""
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) and name not in skip and name
    ]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FakeQuantWrapper(m, name, momentum=momentum, arch=arch))
    return [name for name, _ in targets]


def strip_qat(model: nn.Module) -> int:
    """Put the plain modules (with their QAT-trained weights) back, in place; returns how many."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantWrapper)]
    for name, m in wrapped:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, m.module)
    return len(wrapped)


class _QATLossGuard(pl.Callback):
    """Stops on a NaN/inf QAT loss before backward, with QAT's known causes in the message."""

    def __init__(self, arch: str) -> None:
        self.arch = arch

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingError(
                f"qat: training loss of model {self.arch} became {float(loss)} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}. Known cause: timm ResNets "
                "with a zero-initialised last BN per block (set model.kwargs.zero_init_last="
                "false) or QAT from an untrained model; otherwise lower the qat step's lr"
            )


@register_step("qat")
class QuantizationAwareTraining(_StaticInt8):
    """Fake-quantised fine-tuning, then the same ORT static int8 conversion as ``ptq``.

    ``prepare`` wraps the layers and sets their input ranges on ``calibration_batches`` training
    batches (eval mode, so BatchNorm statistics are untouched); the pipeline then trains
    ``epochs`` (default 5) at ``lr`` (default 1e-4: a fine-tune of a trained model, ~1/30 of the
    usual AdamW rate, small enough that weights move within their int8 grid rather than away
    from what was learned). ``observer_momentum`` 0.05 lets the EMA input ranges follow the
    weights within ~20 steps of a short fine-tune. ``finalize`` strips the wrappers and converts.
    """

    def __init__(
        self,
        epochs: int = 5,
        lr: float | None = 1e-4,
        calibration_batches: int = 8,
        observer_momentum: float = 0.05,
        per_channel: bool = True,
        activation_type: str = "uint8",
        weight_type: str = "int8",
        calibrate_method: str = "minmax",
        percentile: float = 99.999,
        reduce_range: bool | str = "auto",
        quantize_classifier: bool = True,
        threads: int | None = None,
        opset: int | None = None,
    ) -> None:
        super().__init__(
            epochs=epochs,
            lr=lr,
            calibration_batches=calibration_batches,
            per_channel=per_channel,
            activation_type=activation_type,
            weight_type=weight_type,
            calibrate_method=calibrate_method,
            percentile=percentile,
            reduce_range=reduce_range,
            quantize_classifier=quantize_classifier,
            threads=threads,
            opset=opset,
        )
        if not 0.0 < float(observer_momentum) <= 1.0:
            raise ConfigError(
                f"compress step qat: observer_momentum must be in (0, 1], got {observer_momentum}"
            )
        self.observer_momentum = float(observer_momentum)
        self._arch = "model"

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self._arch = arch = _arch(ctx, model)
        example = ctx.example_input(1).to(next(model.parameters()).device)
        skip = () if self.quantize_classifier else (classifier_name(model, example) or "",)
        wrapped = wrap_for_qat(model, skip=skip, momentum=self.observer_momentum, arch=arch)
        if not wrapped:
            raise TrainingError(
                f"qat: model {arch} has no plain nn.Conv2d / nn.Linear layers to fake-quantise; "
                "use compress=ptq"
            )
        wrappers = [m for m in model.modules() if isinstance(m, FakeQuantWrapper)]
        param = next(model.parameters(), None)
        was_training = model.training
        model.eval()
        for w in wrappers:
            w.calibrating = True
        try:
            with torch.no_grad():
                for x in ctx.calibration_batches(self.calibration_batches):
                    model(x if param is None else x.to(param.device))
        finally:
            for w in wrappers:
                w.calibrating = False
            model.train(was_training)
        self.report.update(
            {
                "qat_layers": len(wrapped),
                "qat_skipped": list(skip),
                "qat_epochs": self.epochs,
                "qat_lr": self.lr,
            }
        )
        log.info("qat: fake-quantising %d Conv2d/Linear layers of %s", len(wrapped), arch)
        return model

    def callbacks(self) -> list[pl.Callback]:
        return [_QATLossGuard(self._arch)]

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        strip_qat(model)
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingError(
                f"qat: model {_arch(ctx, model)} has non-finite weights after QAT ({bad[:3]}); "
                "lower the qat step's lr"
            )
        return self._to_int8(model, ctx)
