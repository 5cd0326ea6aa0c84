"""Where a run writes: a folder of its own, claimed before Hydra writes anything into it.

A Hydra callback (registered in ``conf/hydra/default.yaml``) that runs before Hydra creates the
run directory (``on_run_start``) or the sweep directory (``on_multirun_start``):

- the folder is created with ``mkdir`` (atomic: of two processes, one gets it), so two runs
  started in the same second never share it: the second gets ``<name>_2`` (``_3``, ...);
- a ``hydra.run.dir`` given on the command line must be new or empty: medlite never writes
  into a folder holding files it did not create;
- a folder that can't be created (a file in the way, ``/proc``, no permission) is one line on
  stderr and exit status 1, not a traceback;
- a sweep that Hydra rejects before its first job (an unknown option, a bad sweep expression)
  leaves no empty multirun folder behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from medlite.errors import ConfigError

#: suffixes tried for a run folder whose name another run took in the same second
MAX_SUFFIX = 1000


def is_secondary_rank() -> bool:
    """A DDP rank > 0 (Lightning re-runs train.py into rank 0's folder, setting the rank
    variables): it claims nothing. Here rather than in :mod:`medlite.ddp` so that the command
    line can ask before importing torch."""
    return any(int(os.environ.get(k, 0) or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK"))


def _given(config: DictConfig, key: str) -> bool:
    """Whether ``key`` was set on the command line (not the pattern of conf/hydra/)."""
    overrides = OmegaConf.select(config, "hydra.overrides.hydra", default=None) or []
    return any(str(o).lstrip("+~").split("=", 1)[0] == key for o in overrides)


def _reason(err: OSError) -> str:
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        return "a file is in the way"
    return err.strerror or str(err)


def claim(
    path: Path, given: bool, marker: str | None = ".hydra", key: str = "hydra.run.dir"
) -> Path:
    """Create the run folder ``path`` (its parents too) and its ``marker`` subfolder (where
    Hydra saves the config; none for a sweep folder), and return it. Both ``mkdir`` calls are exclusive, so of two
    processes only one gets a folder. A name already taken gets a numbered suffix, unless the
    user named the folder: then it must be new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if given:
        try:
            path.mkdir(exist_ok=True)
            if marker:
                (path / marker).mkdir()
        except FileExistsError:
            raise ConfigError(_taken(path, key)) from None
        if len(list(path.iterdir())) > (1 if marker else 0):  # files besides ours: not ours
            if marker:
                (path / marker).rmdir()
            raise ConfigError(_taken(path, key))
        return path
    for n in range(1, MAX_SUFFIX):
        candidate = path if n == 1 else path.with_name(f"{path.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        if marker:
            (candidate / marker).mkdir()
        return candidate
    raise ConfigError(f"no free run folder next to {path} (tried {MAX_SUFFIX} names)")


def _taken(path: Path, key: str) -> str:
    if not path.is_dir():
        return f"{key}={path} is a file; give a new or empty folder"
    return (
        f"{key}={path} already holds files; medlite writes a run only into a new or "
        f"empty folder (to continue that run: resume={path})"
    )


def _fail(message: str) -> None:
    """One line on stderr and exit 1 (Hydra turns a callback's exception into a warning)."""
    from medlite.console import print_problem

    print_problem("ConfigError", message)
    raise SystemExit(1)


def _create_or_fail(key: str, path: Path, given: bool, marker: str | None) -> Path:
    try:
        return claim(path, given, marker, key)
    except ConfigError as err:
        _fail(str(err))
    except OSError as err:
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        _fail(f"{key}={path} can't be created: {_reason(err)}{where}")
    raise AssertionError("unreachable")


def _remove_if_unused(sweep_dir: Path, log_dir: Path) -> None:
    """At exit: a sweep folder this process created that holds no job (Hydra rejected the
    sweep before its first job) is removed, with the parents it leaves empty below
    ``paths.log_dir``."""
    if not sweep_dir.is_dir() or any(p.name != "multirun.yaml" for p in sweep_dir.iterdir()):
        return
    shutil.rmtree(sweep_dir, ignore_errors=True)
    parent = sweep_dir.parent
    while log_dir in parent.parents:
        try:
            parent.rmdir()  # only if empty
        except OSError:
            return
        parent = parent.parent


class RunDirectories(Callback):
    """Claim the run (or sweep) folder before Hydra writes into it; see the module docstring."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_secondary_rank():
            return
        path = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        marker = OmegaConf.select(config, "hydra.output_subdir", default=None) or ".hydra"
        given = _given(config, "hydra.run.dir")
        claimed = _create_or_fail("hydra.run.dir", path, given, marker)
        if claimed != path:
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.run.dir = str(claimed)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        given = _given(config, "hydra.sweep.dir")
        if given and path.is_dir():
            return  # continuing a sweep (an Optuna study) in its folder: its jobs are numbered
        claimed = _create_or_fail("hydra.sweep.dir", path, given, None)
        log_dir = Path(str(OmegaConf.select(config, "paths.log_dir", default=claimed.parent)))
        atexit.register(_remove_if_unused, claimed.resolve(), log_dir.resolve())
        if claimed != path:  # each job's config is composed again from the overrides
            quoted = "'" + str(claimed).replace("\\", "\\\\").replace("'", "\\'") + "'"
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.sweep.dir = str(claimed)
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quoted}")
