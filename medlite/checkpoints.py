"""Saving and loading what training leaves: weights, whole compressed modules, checkpoint state.

One module for every file a run writes or a user points at, so how files are read (and how a
broken one is reported) is decided in one place. Weights and Lightning checkpoints are read with
``weights_only=True``: loading them never runs code from the file. Pruned and factorised networks
no longer match their model config, so they are stored as whole pickled modules
(:func:`save_module`); :func:`load_module` unpickles code and is only for a run's own files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlite.errors import ConfigError

log = logging.getLogger(__name__)

#: format tag of :func:`save_module` files
MODULE_FORMAT = "medlite-module-v1"
_LEGACY_MODULE_FORMATS = ("medlite-pruned-v1",)


def _read(path: Path, what: str, **kwargs) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - truncated, foreign or unsafe: the same user problem
        raise ConfigError(
            f"{what} {path} can't be read as a medlite checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def lightning_state(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (``best-*.ckpt``, ``last.ckpt``)."""
    state = _read(Path(path), what)
    return state["state_dict"] if isinstance(state, dict) and "state_dict" in state else state


def checkpoint_progress(path: str | Path) -> tuple[int, int]:
    """(last completed epoch, optimizer steps taken) recorded in a Lightning checkpoint."""
    state = _read(Path(path), "checkpoint", mmap=True)
    try:
        epoch = int(state["epoch"])
        loop = state.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        return epoch, int(loop.get("_batches_that_stepped", state["global_step"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path} is not a Lightning training checkpoint (no {err})") from None


def load_weights(net: nn.Module, path: str | Path, arch: str) -> None:
    """Load a medlite checkpoint (Lightning ``best-*.ckpt`` or a teacher file) into ``net``."""
    path = Path(path)
    state = _read(path, "checkpoint")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds no weights (state_dict) for {arch}")
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    weights = weights or dict(state)
    if weights and all(k.startswith("teacher.") for k in weights):
        weights = {k.removeprefix("teacher."): v for k, v in weights.items()}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {path} does not fit model {arch}: {err}") from None


def save_weights(net: nn.Module, path: str | Path, meta: dict) -> Path:
    """Atomically write ``net``'s weights in the format :func:`load_weights` reads."""
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    return _atomic_save({"state_dict": state, "medlite_weights": meta}, Path(path))


def save_module(model: nn.Module, path: str | Path, **meta: Any) -> Path:
    """Save a whole module (a pruned or factorised network whose layer shapes no longer match
    any config, so a state_dict alone can't rebuild it); ``meta`` is stored beside it."""
    return _atomic_save({"format": MODULE_FORMAT, "model": model, "meta": meta}, Path(path))


def load_module(path: str | Path) -> nn.Module:
    """Load a module written by :func:`save_module` (or a plain ``torch.save(model)``). It
    unpickles code: load only files your own runs wrote."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, dict) or obj.get("format") not in (
        MODULE_FORMAT,
        *_LEGACY_MODULE_FORMATS,
    ):
        raise ConfigError(f"{path} is not a model saved by medlite (save_module)")
    return obj["model"]


def _atomic_save(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
