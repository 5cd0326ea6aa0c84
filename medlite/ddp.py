"""Data-parallel training of one run (``trainer=ddp``): N processes, one run directory.

Lightning starts the extra ranks by re-running ``train.py`` with the same arguments and the
parent's run directory (``hydra.run.dir``, ``hydra.output_subdir=null``). What medlite adds:

- Only rank 0 records the run. The other ranks train, then leave right after ``fit`` without
  writing results.json, checkpoints or logs of their own (Hydra gives them a
  ``train_ddp_process_<rank>.log`` in the same directory, nothing more).
- Rank 0 then validates and tests the best checkpoint **alone**: a distributed test pads the
  test split up to a multiple of the world size (repeating images), which shifts AUC slightly.
  The official split, each image once, is the number medlite reports.
- Inside a multirun every job stays one process (the Hydra/Lightning pain of DDP children
  re-launching into the wrong sweep directory never arises); a warning says so.
- Compression recipes (several phases, pruning, calibration) run on one process: refused.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from omegaconf import DictConfig, open_dict

from medlite.errors import ConfigError
from medlite.run_dirs import is_secondary_rank  # noqa: F401 - one torch-free definition

log = logging.getLogger(__name__)


def requested_processes(cfg: DictConfig) -> int:
    """Processes per node the trainer config asks for (1 unless ``strategy`` is DDP)."""
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy")
    target = (
        str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy)
    )
    if "ddp" not in target.lower():
        return 1
    devices = trainer.get("devices", 1)
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    try:
        return len(devices)
    except TypeError:
        return os.cpu_count() or 1  # "auto" / -1 on CPU: one process per core


def prepare(cfg: DictConfig, multirun: bool) -> int:
    """Check (and in a multirun, reduce to one process) a DDP config; returns the number of
    processes this run will use."""
    n = requested_processes(cfg)
    if n <= 1:
        return 1
    if multirun:
        log.warning(
            "trainer=ddp inside a multirun: each job runs as one process (devices=1); "
            "use launcher=joblib or launcher=slurm to run jobs side by side"
        )
        with open_dict(cfg):
            cfg.trainer.devices = 1
            cfg.trainer.strategy = "auto"
        return 1
    steps = (cfg.get("compress") or {}).get("steps") or []
    if steps:
        raise ConfigError(
            f"trainer=ddp trains plain runs (compress=none); compress={cfg.compress.name} runs "
            "its phases in one process: drop trainer=ddp for it"
        )
    return n


def leave_after_fit(trainer, threads: int) -> bool:
    """After a DDP ``fit``: ranks > 0 exit (True is never returned to them); rank 0 leaves the
    process group so that its single-process validation and test do not wait for the others,
    and takes back the ``threads`` Lightning divided among the ranks (the efficiency profile
    must not run on a share). Returns True when evaluation should use a fresh single-process
    trainer."""
    if trainer.world_size <= 1:
        return False
    trainer.strategy.barrier("medlite-fit-done")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if trainer.global_rank != 0:
        log.info(
            "rank %d: training done; rank 0 evaluates and records the run", trainer.global_rank
        )
        sys.exit(0)
    torch.set_num_threads(threads)
    return True


def single_process_overrides() -> dict:
    """Trainer arguments for rank 0's evaluation after a DDP fit."""
    return {"devices": 1, "num_nodes": 1, "strategy": "auto"}
