"""The deployment formats and the runtimes that run them: one table, read by export, benchmark,
predict and the model card, so a new runtime is one entry here and one loader.

A *format* is one file a run can be exported to (``onnx_int8``: ``model_int8.onnx``); its
*runtime* is the library that runs it (``onnxruntime``, ``openvino``) at a *precision* (fp32 or
int8). Runtimes other than PyTorch are optional extras: :func:`installed` says whether one imports
here, :func:`require` turns a missing one into one line naming the ``pip install`` that adds it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from medlite.errors import ConfigError

PYTORCH = (
    "pytorch"  # the trained model itself, eager (the reference every format is checked against)
)


@dataclass(frozen=True)
class Format:
    name: str  # what export, benchmark and predict call it, e.g. onnx_int8
    runtime: str  # onnxruntime | openvino | pytorch
    precision: str  # fp32 | int8
    file: str  # its file name in <run>/export/
    label: str  # short, for tables and plots
    module: str  # the Python module the runtime needs
    extra: str | None  # the medlite extra that installs it (None: a core dependency)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx_fp32", "onnxruntime", "fp32", "model.onnx", "ORT fp32", "onnxruntime", None),
        Format("onnx_int8", "onnxruntime", "int8", "model_int8.onnx", "ORT int8", "onnxruntime", None),
        Format("openvino_fp32", "openvino", "fp32", "model_openvino.xml", "OpenVINO fp32", "openvino", "openvino"),
        Format("openvino_int8", "openvino", "int8", "model_openvino_int8.xml", "OpenVINO int8", "openvino", "openvino"),
        Format("executorch_fp32", "executorch", "fp32", "model_executorch.pte", "ExecuTorch fp32", "executorch", "executorch"),
        Format("executorch_int8", "executorch", "int8", "model_executorch_int8.pte", "ExecuTorch int8", "executorch", "executorch"),
        Format("torch_export", "pytorch", "fp32", "model.pt2", "torch.export", "torch", None),
    )
}  # fmt: skip
#: runtimes a user can name (``runtimes=[openvino]``), in the order tables show them
RUNTIMES = (PYTORCH, "onnxruntime", "openvino", "executorch")
PRECISIONS = ("fp32", "int8")
#: formats a benchmark or ``runtime=auto`` can run as a deployed model (torch.export is a
#: program for other tools to compile, not a runtime medlite times)
DEPLOYABLE = tuple(n for n, f in FORMATS.items() if f.runtime != PYTORCH)
LABELS = {PYTORCH: "PyTorch eager", **{n: f.label for n, f in FORMATS.items()}}


def installed(name: str) -> bool:
    """Whether the runtime of format (or runtime) ``name`` imports here, without importing it."""
    module = FORMATS[name].module if name in FORMATS else "torch" if name == PYTORCH else name
    return importlib.util.find_spec(module) is not None


def install_hint(name: str) -> str:
    fmt = FORMATS.get(name)
    runtime = fmt.runtime if fmt else name
    extra = fmt.extra if fmt else runtime
    return f"{runtime} is not installed; add it with: pip install 'medlite[{extra}]'"


def require(name: str) -> None:
    if not installed(name):
        raise ConfigError(f"{name} needs {install_hint(name)}")


def formats_of(runtimes: list[str], precisions: tuple[str, ...] = PRECISIONS) -> list[str]:
    """Format names for runtime names (``openvino`` -> openvino_fp32, openvino_int8), in table
    order; a format name passes through, ``all`` means every deployable format."""
    wanted = [PYTORCH, *DEPLOYABLE] if "all" in runtimes else []
    for r in runtimes:
        if r in DEPLOYABLE or r == PYTORCH:
            wanted.append(r)
        elif r in RUNTIMES:
            wanted += [n for n in DEPLOYABLE if FORMATS[n].runtime == r]
        elif r != "all":
            raise ConfigError(
                f"unknown runtime {r!r}: name runtimes ({', '.join(RUNTIMES)}), formats "
                f"({', '.join(DEPLOYABLE)}) or all"
            )
    keep = [
        n
        for n in dict.fromkeys(wanted)
        if n == PYTORCH or n in runtimes or FORMATS[n].precision in precisions
    ]
    order = [PYTORCH, *FORMATS]
    return sorted(keep, key=order.index)


def load(name: str, path: str | os.PathLike, **kwargs) -> nn.Module:
    """The exported file ``path`` of format ``name`` as an ``nn.Module`` (float32 logits, CPU).
    ``kwargs``: ``threads``, ``params``, ``macs`` (see :class:`~medlite.deploy.onnx.OrtModel`)."""
    require(name)
    runtime = FORMATS[name].runtime
    if runtime == "onnxruntime":
        from medlite.deploy.onnx import OrtModel

        return OrtModel(path, **kwargs)
    if runtime == "openvino":
        from medlite.deploy.openvino_runtime import OvModel

        return OvModel(path, **kwargs)
    if runtime == "executorch":
        from medlite.deploy.executorch_runtime import ExModel

        return ExModel(path, **kwargs)
    raise ConfigError(f"{name} is not a runtime medlite runs; deployable: {', '.join(DEPLOYABLE)}")


def read_metadata(name: str, path: str | os.PathLike) -> dict:
    """The preprocessing, labels and task an exported file states about itself."""
    if FORMATS[name].runtime == "openvino":
        from medlite.deploy.openvino_runtime import read_metadata as read

        return read(path)
    if FORMATS[name].runtime == "executorch":
        from medlite.deploy.executorch_runtime import read_metadata as read

        return read(path)
    from medlite.deploy.onnx import read_metadata as read

    return read(path)


def files_of(name: str, export_dir: Path) -> list[Path]:
    """Every file a format consists of (an OpenVINO model is an .xml graph and a .bin of weights;
    an ExecuTorch program has its metadata in a .json beside it)."""
    path = export_dir / FORMATS[name].file
    extra = {"openvino": ".bin", "executorch": ".json"}.get(FORMATS[name].runtime)
    return [path, path.with_suffix(extra)] if extra else [path]


def size_mb(name: str, export_dir: Path) -> float:
    return sum(p.stat().st_size for p in files_of(name, export_dir) if p.is_file()) / 2**20
