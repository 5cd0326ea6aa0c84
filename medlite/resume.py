"""Resuming a killed run (``python train.py resume=<run dir>``): its saved config, its last
checkpoint, its W&B run id, and its metrics.csv rows up to that checkpoint.

The pipeline calls :func:`begin_resume` before anything else, then :meth:`Resume.kept_metrics`
and :meth:`Resume.restore_metrics`: the small steps that make a resumed run end exactly like an
uninterrupted one.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from medlite.checkpoints import checkpoint_progress, relative_to_run
from medlite.errors import ConfigError
from medlite.outputs import remove_failed_start

log = logging.getLogger(__name__)

# The only overrides ``resume=<run dir>`` accepts: where this machine keeps data and caches, and
# how errors print. Everything else comes from the run's saved config.
RESUME_SAFE_OVERRIDES = ("show_traceback", "paths.data_dir", "paths.cache_dir")


@dataclass
class Resume:
    """Where a killed run is continued from."""

    run_dir: Path
    checkpoint: Path
    epoch: int  # last completed epoch in the checkpoint
    global_step: int  # logger step at that point: metrics logged from here on are redone
    wandb_id: str | None = None
    earlier: tuple = ()  # resume records of earlier attempts (a failed results.json)

    def record(self) -> dict:
        return {
            "checkpoint": relative_to_run(self.checkpoint, self.run_dir),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def kept_metrics(self) -> tuple[list[str], list[dict]] | None:
        """The rows of the interrupted run's metrics.csv logged up to its checkpoint (later ones
        are logged again); None when there is no file."""
        return _metrics_before(self.run_dir / "metrics.csv", self)

    def restore_metrics(self, loggers: list, kept: tuple[list[str], list[dict]] | None) -> None:
        """Put :meth:`kept_metrics` back after the CSV logger started (it deletes the file)."""
        if kept is not None:
            _restore_csv_metrics(loggers, self.run_dir / "metrics.csv", *kept)


def begin_resume(cfg: DictConfig, log_dir: Path) -> tuple[DictConfig, Resume]:
    """``cfg.resume`` -> the run's saved config and where to continue from; the fresh run
    directory Hydra made for this command is removed and logging moves to the resumed run."""
    cfg, resume = prepare_resume(cfg, _hydra_task_overrides())
    _leave_hydra_run_dir(resume.run_dir, log_dir)
    return cfg, resume


def _hydra_task_overrides() -> list[str] | None:
    """The command-line overrides of this Hydra job; None outside Hydra (in-process callers)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - no Hydra app, no overrides to check
        pass
    return None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def prepare_resume(
    cfg: DictConfig, overrides: Sequence[str] | None = None
) -> tuple[DictConfig, Resume]:
    """``cfg.resume`` (a run directory) -> (that run's saved config, pointed at that directory;
    where to continue from). Raises ConfigError, before any work, for an override other than
    :data:`RESUME_SAFE_OVERRIDES` (``overrides``: the command line's, when known), a missing or
    finished run, a run without ``checkpoints/last.ckpt``, or one with a compression recipe."""
    from medlite.results import read_json

    given = str(cfg.resume)
    extra = [
        o for o in overrides or () if _override_key(o) not in ("resume", *RESUME_SAFE_OVERRIDES)
    ]
    if extra:
        raise ConfigError(
            f"resume={given} continues a run with its own saved config; drop {', '.join(extra)} "
            f"(only {', '.join(RESUME_SAFE_OVERRIDES)} may be given with resume; to change "
            "anything else, start a new run)"
        )
    run_dir = Path(given).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"resume={given}: no such run directory")
    saved_path = run_dir / ".hydra" / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(
            f"resume={given} is not a medlite run directory (no .hydra/config.yaml in {run_dir})"
        )
    earlier: tuple = ()
    results_path = run_dir / "results.json"
    if results_path.is_file():
        try:
            previous = read_json(results_path)
        except ValueError:
            previous = {}
        if previous.get("status") == "ok":
            raise ConfigError(
                f"resume={given}: this run already finished (results.json status ok); "
                "nothing to resume"
            )
        earlier = tuple(previous.get("resumed") or ())
    saved = OmegaConf.load(saved_path)
    _check_targets(saved, given)
    if saved.get("resume"):
        raise ConfigError(
            f"{saved_path} is the config of a resume command, not of the run: was hydra.run.dir "
            "pointed at the run being resumed? Its original config is lost; start a new run"
        )
    compress = OmegaConf.select(saved, "compress.name", default="none")
    if compress != "none" or OmegaConf.select(saved, "compress.steps"):
        raise ConfigError(
            f"resume={given}: runs with a compression recipe (compress={compress}) can't be "
            "resumed (each phase has its own checkpoints); start the run again"
        )
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise ConfigError(
            f"resume={given}: no checkpoints/last.ckpt (the run stopped before its first epoch "
            "ended); start the run again"
        )
    try:  # read weights-only here, before Lightning loads it to continue the fit
        epoch, step = checkpoint_progress(checkpoint)
    except ConfigError as err:
        raise ConfigError(f"resume={given}: {err}") from None
    with open_dict(saved):
        saved.resume = None
        saved.paths.output_dir = str(run_dir)
        for key in RESUME_SAFE_OVERRIDES:
            if any(_override_key(o) == key for o in overrides or ()):
                OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    wandb_id = _wandb_run_id(saved, run_dir)
    if wandb_id:
        # A W&B service inherited from a parent process (WANDB_SERVICE, set by any Python
        # process that used wandb, e.g. a notebook or a test runner) may still hold the killed
        # run's stream open and would refuse its id ("run ID is in use"): start our own.
        os.environ.pop("WANDB_SERVICE", None)
    OmegaConf.set_struct(saved, True)  # as Hydra hands it over: a typo'd key raises
    return saved, Resume(run_dir, checkpoint, epoch, step, wandb_id, earlier)


def _targets(node) -> list:
    """Every ``_target_`` value in a config tree (plain containers)."""
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _known_targets() -> set:
    """The classes medlite's own configs instantiate (``conf/**/*.yaml``)."""
    import medlite

    known: set = set()
    for path in Path(medlite.CONF_DIR).rglob("*.yaml"):
        try:
            known |= {t for t in _targets(OmegaConf.to_container(OmegaConf.load(path))) if t}
        except Exception:  # noqa: BLE001 - a file that is not a plain config names nothing
            continue
    return known


def _allowed_bases() -> tuple[type, ...]:
    """What a saved config may instantiate besides medlite's own config targets: trainer parts
    (callbacks, loggers, strategies), optimisers and data sources, by their base classes."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import Logger
    from pytorch_lightning.strategies import Strategy

    from medlite.data.sources import DataSource

    return (pl.Callback, Logger, pl.Trainer, Strategy, torch.optim.Optimizer, DataSource)


def _allowed(target: object, known: set) -> bool:
    if not isinstance(target, str):
        return False
    if target in known:
        return True
    import hydra

    try:
        cls = hydra.utils.get_class(target)
    except Exception:  # noqa: BLE001 - not a class (a function, a missing module): refused
        return False
    return isinstance(cls, type) and issubclass(cls, _allowed_bases())


def _check_targets(saved: DictConfig, given: str) -> None:
    """A run folder may come from someone else, and its saved config is instantiated (trainer,
    callbacks, loggers, optimiser): only the classes medlite's configs name, or classes of those
    kinds (a Callback, a Logger...), never an arbitrary callable."""
    known = _known_targets()
    found = _targets(OmegaConf.to_container(saved, resolve=False))
    refused = sorted({str(t) for t in found if not _allowed(t, known)})
    if refused:
        raise ConfigError(
            f"resume={given}: its saved config names _target_ {refused[0]}, which is not a "
            "class medlite instantiates (a callback, logger, strategy, optimiser or data "
            "source); resume does not run it"
        )


def _wandb_run_id(cfg: DictConfig, run_dir: Path) -> str | None:
    """Point the run's W&B logger (if any) at its earlier W&B run, whose id ends the name of
    the run folder W&B wrote: ``<run dir>/wandb/offline-run-<date>-<id>`` (or ``run-...``)."""
    group = cfg.get("logger") or {}
    for name, spec in group.items():
        if not spec or not str(spec.get("_target_", "")).endswith("WandbLogger"):
            continue
        run_id = spec.get("id")
        if not run_id:
            folders = sorted(
                (p for p in (run_dir / "wandb").glob("*run-*-*") if p.is_dir()),
                key=lambda p: p.name.split("run-", 1)[1],
            )
            run_id = folders[-1].name.rsplit("-", 1)[1] if folders else None
        if run_id:
            with open_dict(cfg):
                cfg.logger[name].id = run_id
                cfg.logger[name].resume = "allow"
        return run_id
    return None


def _leave_hydra_run_dir(run_dir: Path, log_dir: Path) -> None:
    """Hydra gave this ``resume`` command a fresh run directory (``.hydra/`` and ``train.log``):
    log to the resumed run's ``train.log`` instead, and remove the fresh one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        fresh = Path(HydraConfig.get().runtime.output_dir).resolve()
    except Exception:  # noqa: BLE001 - outside Hydra nothing was created
        return
    if fresh == run_dir:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == fresh:
            moved = logging.FileHandler(
                run_dir / Path(handler.baseFilename).name, mode="a", encoding=handler.encoding
            )
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)
            # its few lines so far are the start-up; a DDP rank's log is not train.log
            Path(handler.baseFilename).unlink(missing_ok=True)
    remove_failed_start(fresh, log_dir)


def _metrics_before(path: Path, resume: Resume) -> tuple[list[str], list[dict]] | None:
    """The rows of an interrupted run's metrics.csv logged up to its checkpoint (later ones are
    logged again); None when there is no file."""
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])

    def before(row: dict) -> bool:
        try:
            epoch, step = row.get("epoch") or "", row.get("step") or ""
            if epoch and int(float(epoch)) > resume.epoch:
                return False
            return not step or int(float(step)) < resume.global_step
        except ValueError:  # a line cut short by the kill
            return False

    return header, [r for r in rows if before(r)]


def _restore_csv_metrics(loggers: list, path: Path, header: list[str], rows: list[dict]) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv when it starts: put back the rows
    logged before the checkpoint so the resumed run appends to them."""
    from pytorch_lightning.loggers import CSVLogger

    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        writer = lg.experiment  # created now: the old file is gone
        if Path(writer.metrics_file_path).resolve() != path.resolve():
            continue
        keys = sorted(set(writer.metrics_keys) | set(header))  # the writer's column order
        with path.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=keys)
            out.writeheader()
            out.writerows({k: v for k, v in row.items() if k in keys} for row in rows)
        writer.metrics_keys = keys
