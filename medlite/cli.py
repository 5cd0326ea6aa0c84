"""The command line's side of a run: the config checked before the heavy imports, user-facing
errors as one clear message (no traceback), and signals turned into a recorded stop with a
non-zero exit status (see :mod:`medlite.interrupts`)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from medlite import interrupts
from medlite.config import in_multirun, validate
from medlite.console import print_error, print_problem, quiet_third_party
from medlite.errors import MedliteError
from medlite.interrupts import RunInterrupted
from medlite.outputs import remove_failed_start
from medlite.run_dirs import is_secondary_rank

log = logging.getLogger("medlite")


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    """Leave a failed job's results.json in its run directory (a job that failed before
    training has none yet), so the sweep summary and aggregation can list it with its error."""
    from medlite.results import write_json

    out = Path(cfg.paths.output_dir)
    if (out / "results.json").exists():
        return  # the pipeline recorded it (a failure during training)

    def pick(key: str):
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable config is one way to fail
        config = None
    write_json(
        out / "results.json",
        {
            "status": "failed",
            "error": str(err)
            if isinstance(err, (MedliteError, RunInterrupted))
            else f"{type(err).__name__}: {err}",
            "failed_before_training": True,
            "run_dir": str(out),
            "model": {
                "name": pick("model.name"),
                "arch": pick("model.arch"),
                "paradigm": pick("model.paradigm"),
            },
            "compress": {"name": pick("compress.name")},
            "data": {"name": pick("data.name"), "size": pick("data.size")},
            "seed": pick("seed"),
            "config": config,
        },
    )


def _validate_early(cfg: DictConfig, secondary: bool) -> None:
    """The config checks, before torch, Lightning, timm and MONAI are imported: a config
    mistake costs about a second, and the run directory Hydra made for it goes."""
    try:
        validate(cfg)
    except MedliteError:
        if not secondary:
            remove_failed_start(Path(cfg.paths.output_dir), Path(cfg.paths.log_dir))
        raise


def _run_dir(cfg: DictConfig) -> Path:
    """The folder this command records into: the resumed run's, or Hydra's new one."""
    if cfg.get("resume"):
        return Path(str(cfg.resume)).expanduser().resolve()
    return Path(cfg.paths.output_dir)


def _expect_csv_logger(run_dir: Path) -> None:
    """The CSV logger writes metrics.csv into the run folder medlite claimed for this run
    (where Hydra's files already are): Lightning's "exists and is not empty" warning says
    nothing there. It stays on for any other folder."""
    folder = re.escape(str(run_dir).rstrip("/"))
    warnings.filterwarnings(
        "ignore", message=rf"Experiment logs directory {folder}/? exists and is not empty"
    )


def _continue_requeued(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """SLURM started this job again after medlite requeued it: the same command continues
    its run, as ``resume=<run dir>`` would (the command's other overrides are that run's)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    from medlite.resume import RESUME_SAFE_OVERRIDES

    with open_dict(cfg):
        cfg.resume = str(run_dir)
    if HydraConfig.initialized():
        overrides = HydraConfig.get().overrides
        keep = [o for o in overrides.task if o.split("=", 1)[0] in RESUME_SAFE_OVERRIDES]
        with read_write(overrides):
            overrides.task = [f"resume={run_dir}", *keep]
    log.info("SLURM job %s restarted: continuing %s", interrupts.slurm_job_id(), run_dir)
    return cfg


def _stopped(cfg: DictConfig, err: RunInterrupted, secondary: bool) -> None:
    """A signal stopped the run: record it (if the pipeline could not), requeue it under
    SLURM, say how to continue, and exit ``128 + signal``."""
    if secondary:
        _exit_now(err.exit_code)
    run_dir, log_dir = _run_dir(cfg), Path(cfg.paths.log_dir)
    if not cfg.get("resume") and run_dir.is_dir():
        _record_failure(cfg, err)  # stopped before training: no record yet
    message = f"{err}; results.json records the run as failed"
    job = interrupts.slurm_job_id()
    compress = OmegaConf.select(cfg, "compress.name", default=None)
    not_resumable = interrupts.resumable(run_dir, compress)
    requeued = False
    if job and err.signum != signal.SIGINT and cfg.get("requeue_on_preemption", True):
        if not_resumable:
            message += f". Not requeued: {not_resumable}"
        else:
            requeued, outcome = interrupts.requeue(run_dir, log_dir, job, err.signum)
            message += f". {outcome}"
    if not requeued:
        interrupts.forget_requeue(log_dir)
        if not not_resumable:
            message += f". Continue it: python train.py resume={run_dir}"
    print_problem("stopped", message)
    _exit_now(err.exit_code)


def _exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's clean-up: tearing down torch and
    Lightning's modules takes 2-5 s on a busy machine, which a stop must not wait for.
    Everything is on disk by now (the writes are atomic); exit handlers (logging, W&B,
    worker processes) still run. Called in-process (tests, notebooks): a plain SystemExit."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise SystemExit(code) from None
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def train(cfg: DictConfig) -> float | None:
    """Entry used by ``train.py``: run the pipeline; print MedliteErrors cleanly unless
    ``show_traceback``. In a multirun every failure (a bad combination, a NaN, a crash) is
    recorded in the job's results.json and the sweep goes on; a signal stops it all."""
    quiet_third_party()
    multirun, secondary = in_multirun(), is_secondary_rank()
    log_dir = Path(cfg.paths.log_dir)
    # (DDP ranks > 0 follow the marker too: every rank must continue the same run)
    requeued = None if cfg.get("resume") else interrupts.requeued_run(log_dir)
    if requeued is not None:
        cfg = _continue_requeued(cfg, requeued)
    _expect_csv_logger(_run_dir(cfg))
    try:
        with interrupts.stop_on_signals():
            if not cfg.get("resume"):
                _validate_early(cfg, secondary)
            from medlite.pipeline import run

            value = run(cfg)
        if requeued is not None and not secondary:
            interrupts.forget_requeue(log_dir)
        return value
    except RunInterrupted as err:
        _stopped(cfg, err, secondary)
        raise  # not reached: _stopped exits
    except MedliteError as err:
        if requeued is not None and not secondary:
            interrupts.forget_requeue(log_dir)
        if cfg.get("show_traceback") and not multirun:
            raise
        print_error(err)
        if multirun:  # one bad job must not stop the others
            _record_failure(cfg, err)
            return float("nan")
        raise SystemExit(1) from None
    except Exception as err:
        if requeued is not None and not secondary:
            interrupts.forget_requeue(log_dir)
        if not multirun:
            raise
        log.exception("job failed; the sweep goes on")
        _record_failure(cfg, err)
        return float("nan")
