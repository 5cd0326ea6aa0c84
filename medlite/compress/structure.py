"""Compressed models saved without code: weights plus a small record of how the structure changed.

A pruned or factorised network no longer matches its model config, but it differs from the
network the config builds in a few describable ways: some layers have fewer channels (pruning
changes shape attributes such as ``out_channels`` and the weight shapes) and some layers were
replaced by low-rank chains of plain Linear/Conv layers. :func:`save_compressed` writes the
state_dict, the build arguments of the config's network and those differences (JSON values
only); :func:`load_compressed` builds the config's network, re-applies the differences and loads
the weights. Every part is read with ``weights_only=True``, so a model file can't run code, and
only classes listed in :data:`REBUILDABLE` can be created from a record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medlite.checkpoints import atomic_save, read_safely
from medlite.compress.lowrank import CPConv2d, LowRankConv1x1, LowRankLinear, TuckerConv2d
from medlite.errors import ConfigError

log = logging.getLogger(__name__)

#: format tag of :func:`save_compressed` files
FORMAT = "medlite-compressed-v2"
#: formats of older medlite versions: whole pickled modules, refused (they can run code)
PICKLED_FORMATS = ("medlite-module-v1", "medlite-pruned-v1")
_SIMPLE = (bool, int, float, str, type(None))
_CONV_ARGS = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")

RECREATE = (
    "re-create it from the run's base checkpoint with this medlite: python train.py "
    "<the run's overrides> compress.base_ckpt=<run dir>/checkpoints/best-<epoch>.ckpt"
)


class StructureError(ValueError):
    """A module the structural record can't describe (the model can't be saved this way)."""


# ------------------------------------------------------------------------------------------------
# Building the config's network


def build_args(
    model_cfg: DictConfig | dict, num_outputs: int, in_chans: int, img_size: int
) -> dict:
    """What :func:`build_reference` needs to build the config's network again (no weights are
    fetched: the saved state_dict replaces them)."""
    cfg = (
        model_cfg
        if isinstance(model_cfg, dict)
        else OmegaConf.to_container(model_cfg, resolve=True)
    )
    cfg = {**cfg, "pretrained": False, "pretrained_file": None}
    return {
        "model": cfg,
        "num_outputs": int(num_outputs),
        "in_chans": int(in_chans),
        "img_size": int(img_size),
    }


def context_build_args(ctx) -> dict:
    """:func:`build_args` of a compression step's RunContext."""
    dm = ctx.datamodule
    return build_args(ctx.cfg.model, dm.task.num_outputs, dm.in_chans, dm.preprocess.input_size)


def build_reference(args: dict) -> nn.Module:
    """The network a record's model config builds (see :func:`medlite.build.rebuild_model`)."""
    from medlite.build import rebuild_model  # the model zoo: only when a model is built

    return rebuild_model(args["model"], args["num_outputs"], args["in_chans"], args["img_size"])


# ------------------------------------------------------------------------------------------------
# Layers a record may create


def _conv_spec(m: nn.modules.conv._ConvNd) -> dict:
    args = {k: getattr(m, k) for k in _CONV_ARGS}
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "bias": m.bias is not None,
        **args,
    }


def _linear_spec(m: nn.Linear) -> dict:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    }


#: leaf layers: class -> (its constructor arguments, read from a module)
LEAVES: dict[type[nn.Module], Callable[[nn.Module], dict]] = {
    nn.Linear: _linear_spec,
    nn.Conv1d: _conv_spec,
    nn.Conv2d: _conv_spec,
    nn.Conv3d: _conv_spec,
}
#: containers built from named parts (the factorised layers of ``compress/lowrank.py``)
CONTAINERS: dict[type[nn.Module], tuple[str, ...]] = {
    LowRankLinear: ("down", "up"),
    LowRankConv1x1: ("down", "up"),
    TuckerConv2d: ("reduce", "core", "expand"),
    CPConv2d: ("reduce", "vertical", "horizontal", "expand"),
}
REBUILDABLE = {cls.__name__: cls for cls in (*LEAVES, *CONTAINERS)}


def module_spec(m: nn.Module) -> dict:
    """A JSON description of ``m`` from which :func:`build_module` makes the same layer."""
    cls = type(m)
    if cls in LEAVES:
        return {"type": cls.__name__, "args": _jsonable(LEAVES[cls](m))}
    if cls in CONTAINERS:
        parts = {n: module_spec(m._modules[n]) for n in CONTAINERS[cls] if n in m._modules}
        return {"type": cls.__name__, "parts": parts}
    raise StructureError(f"{cls.__name__} can't be described by a structural record")


def build_module(spec: dict) -> nn.Module:
    """The (untrained) layer a :func:`module_spec` describes; only :data:`REBUILDABLE` classes."""
    cls = REBUILDABLE.get(spec.get("type")) if isinstance(spec, dict) else None
    if cls is None:
        raise StructureError(
            f"unknown layer type {spec.get('type') if isinstance(spec, dict) else spec!r}"
        )
    if cls in LEAVES:
        args = {k: _from_json(v) for k, v in dict(spec.get("args") or {}).items()}
        return cls(**args)
    parts = dict(spec.get("parts") or {})
    unknown = set(parts) - set(CONTAINERS[cls])
    if unknown:
        raise StructureError(f"{cls.__name__} has no part(s) {sorted(unknown)}")
    return cls(**{n: build_module(parts[n]) if n in parts else None for n in CONTAINERS[cls]})


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _from_json(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# ------------------------------------------------------------------------------------------------
# The structural record


def _simple(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return all(isinstance(v, _SIMPLE) for v in value)
    return isinstance(value, _SIMPLE)


def _attribute_changes(m: nn.Module, ref: nn.Module) -> dict:
    """Plain attributes (channel counts, shapes, groups...) that differ from the fresh layer's."""
    changed = {}
    for key, value in vars(m).items():
        if key.startswith("_") or key == "training" or not _simple(value):
            continue
        old = vars(ref).get(key, value)
        if _simple(old) and old != value:
            changed[key] = _jsonable(value)
    return changed


def describe(model: nn.Module, reference: nn.Module) -> dict:
    """How ``model`` differs in structure from ``reference`` (the config's fresh network):
    ``replaced`` layers (by spec) and changed ``attributes`` of the others."""
    fresh = dict(reference.named_modules())
    replaced: dict[str, dict] = {}
    attributes: dict[str, dict] = {}
    for name, m in model.named_modules():
        if any(name.startswith(f"{r}.") for r in replaced):
            continue
        ref = fresh.get(name)
        if ref is None or type(ref) is not type(m):
            if not name:
                raise StructureError("the whole model was replaced")
            replaced[name] = module_spec(m)
            continue
        changes = _attribute_changes(m, ref)
        if changes:
            attributes[name] = changes
    return {"replaced": replaced, "attributes": attributes}


def _set_attributes(m: nn.Module, changes: dict, where: str) -> None:
    for key, value in changes.items():
        old = vars(m).get(key)
        value = _from_json(value) if isinstance(old, tuple) else value
        if key.startswith("_") or key not in vars(m) or not _simple(value) or not _simple(old):
            raise StructureError(f"{where}: attribute {key!r} can't be set from a record")
        if old is not None and value is not None and type(old) is not type(value):
            raise StructureError(f"{where}: attribute {key!r} changes type")
        setattr(m, key, value)


def _resize(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every parameter and buffer the shape it has in ``state`` (pruned channels)."""
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        try:
            m = model.get_submodule(owner)
        except AttributeError:
            continue  # reported by load_state_dict
        if leaf in m._parameters and m._parameters[leaf] is not None:
            old = m._parameters[leaf]
            if old.shape != tensor.shape:
                m._parameters[leaf] = nn.Parameter(
                    torch.empty(tensor.shape, dtype=old.dtype), requires_grad=old.requires_grad
                )
        elif leaf in m._buffers and m._buffers[leaf] is not None:
            if m._buffers[leaf].shape != tensor.shape:
                m._buffers[leaf] = torch.empty(tensor.shape, dtype=m._buffers[leaf].dtype)


def apply(model: nn.Module, record: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """Re-apply a :func:`describe` record to the config's fresh network and load ``state``."""
    for name, spec in (record.get("replaced") or {}).items():
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        if child not in holder._modules:
            raise StructureError(f"the model has no layer {name!r} to replace")
        holder._modules[child] = build_module(spec)
    modules = dict(model.named_modules())
    for name, changes in (record.get("attributes") or {}).items():
        if name not in modules:
            raise StructureError(f"the model has no layer {name!r}")
        _set_attributes(modules[name], dict(changes), name or "model")
    _resize(model, state)
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------------------------
# Files


def save_compressed(
    model: nn.Module,
    path: str | Path,
    build: dict,
    example: torch.Tensor | None = None,
    **meta: Any,
) -> Path:
    """Write ``model`` as weights + structural record. With ``example``, the record is first
    rebuilt and must compute what ``model`` computes. Any reason the model can't be saved this
    way is a StructureError (and no file); a failing write (a full disk) raises as it is."""
    try:
        reference = build_reference(build)
        record = describe(model, reference)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if example is not None:
            _check_rebuild(model, apply(reference, record, state), example)
    except StructureError:
        raise
    except (ConfigError, RuntimeError, TypeError, AttributeError, KeyError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise StructureError(f"{type(err).__name__}: {first}") from err
    blob = {
        "format": FORMAT,
        "build": json.dumps(build),
        "structure": json.dumps(record),
        "state_dict": state,
        "meta": json.dumps(meta, default=str),
    }
    return atomic_save(blob, Path(path))


def _check_rebuild(model: nn.Module, rebuilt: nn.Module, example: torch.Tensor) -> None:
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    rebuilt.eval()
    try:
        with torch.no_grad():
            want = model(example.to(device)).float().cpu()
            got = rebuilt(example.cpu()).float()
    finally:
        model.train(was_training)
    tol = 1e-6 if device.type == "cpu" else 1e-4
    if want.shape != got.shape or not torch.allclose(want, got, rtol=tol, atol=tol):
        raise StructureError("the model rebuilt from its record computes something else")


def load_compressed(path: str | Path) -> nn.Module:
    """A model written by :func:`save_compressed`: the config's network with the recorded
    structural changes and the saved weights, in eval mode. Nothing in the file is code."""
    path = Path(path)
    blob = read_safely(path, "model file", hint=RECREATE)
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt != FORMAT:
        raise ConfigError(
            f"{path} is not a compressed model saved by medlite ({fmt or 'no format tag'})"
        )
    try:
        build, record = json.loads(blob["build"]), json.loads(blob["structure"])
        model = build_reference(build)
        return apply(model, record, blob["state_dict"]).eval()
    except (StructureError, KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model file {path} can't be rebuilt: {first}") from None


def file_meta(path: str | Path) -> dict:
    """The ``meta`` a :func:`save_compressed` file was written with."""
    blob = read_safely(Path(path), "model file", hint=RECREATE)
    return json.loads(blob.get("meta") or "{}") if isinstance(blob, dict) else {}
