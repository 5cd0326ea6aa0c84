"""Saving and loading what training leaves: weights and Lightning checkpoint state.

One module for every file a run writes or a user points at, so how files are read (and how a
broken or unsafe one is reported) is decided in one place. Every file is read with
``weights_only=True``: loading a checkpoint, a teacher or a model file from someone else never
runs code from it (a file holding pickled objects other than tensors and plain values is refused
with one line). Pruned and factorised networks are saved as weights plus a structural record
(:mod:`medlite.compress.structure`), not as pickled modules.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlite import atomic
from medlite.errors import ConfigError

log = logging.getLogger(__name__)

_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def read_safely(path: Path, what: str, hint: str | None = None, **kwargs) -> Any:
    """``torch.load`` with ``weights_only=True``; any failure is one ConfigError line. A file
    that holds pickled objects (code could run if it were unpickled) is named as such, with
    ``hint`` (how to get a safe file) after it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        named = f" ({found.group(1)})" if found else ""
        raise ConfigError(
            f"{what} {path} holds pickled Python objects{named}, not just weights; medlite does "
            "not load it, since unpickling can run code from the file"
            + (f"; {hint}" if hint else "")
        ) from None
    except Exception as err:  # noqa: BLE001 - truncated or foreign: the same user problem
        raise ConfigError(
            f"{what} {path} can't be read as a medlite checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def lightning_state(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (``best-*.ckpt``, ``last.ckpt``)."""
    state = read_safely(Path(path), what)
    return state["state_dict"] if isinstance(state, dict) and "state_dict" in state else state


def checkpoint_progress(path: str | Path) -> tuple[int, int]:
    """(last completed epoch, optimizer steps taken) recorded in a Lightning checkpoint."""
    state = read_safely(Path(path), "checkpoint", mmap=True)
    try:
        epoch = int(state["epoch"])
        loop = state.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        return epoch, int(loop.get("_batches_that_stepped", state["global_step"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path} is not a Lightning training checkpoint (no {err})") from None


def load_weights(net: nn.Module, path: str | Path, arch: str) -> None:
    """Load a medlite checkpoint (Lightning ``best-*.ckpt`` or a teacher file) into ``net``."""
    path = Path(path)
    state = read_safely(path, "checkpoint")
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
    return atomic_save({"state_dict": state, "medlite_weights": meta}, Path(path))


def relative_to_run(path: str | Path | None, run_dir: str | Path) -> str | None:
    """``path`` as recorded in a run's results: relative to the run directory when it lies
    inside it (a copied or moved run then finds its own files), else unchanged."""
    if path is None:
        return None
    p, root = Path(path), Path(run_dir)
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def run_file(recorded: str | Path, run_dir: str | Path, old_run_dir: str | None = None) -> Path:
    """The file a run's record names, inside ``run_dir``: a relative record is joined to it; an
    absolute one (older runs) is taken relative to the run directory recorded then
    (``old_run_dir``). A path that leads outside the run directory is refused."""
    root = Path(run_dir).resolve()
    p = Path(recorded)
    if p.is_absolute() and old_run_dir:
        try:
            p = p.relative_to(old_run_dir)
        except ValueError:
            pass
    target = (root / p).resolve()  # an absolute p stays absolute: checked below
    if not target.is_relative_to(root):
        raise ConfigError(
            f"the run's record points to {recorded}, outside its run directory {root}; "
            "medlite only loads a run's own files"
        )
    return target


def atomic_save(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: never half a file."""
    return atomic.torch_save(obj, path)
