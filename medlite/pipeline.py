"""One training run, end to end: the whole of what ``python train.py`` does.

validate config -> seed -> datamodule -> model (+ compression prepare) -> paradigm module ->
Trainer.fit -> test the best-validation checkpoint -> compression finalize -> results.json.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from medlite import config as config_checks
from medlite.callbacks import NaNGuard
from medlite.compress import RunContext, build_steps
from medlite.data.datamodule import MedMNISTDataModule
from medlite.efficiency import profile_model
from medlite.errors import ConfigError, MedliteError, TrainingError
from medlite.models import count_parameters, create_model
from medlite.modules import module_class
from medlite.results import git_revision, package_versions, print_summary, write_json

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> MedMNISTDataModule:
    d = cfg.data
    return MedMNISTDataModule(
        flag=d.flag,
        size=d.size,
        root=cfg.paths.data_dir,
        cache_dir=cfg.paths.cache_dir,
        download=d.download,
        input_size=cfg.model.input_size,
        as_rgb=d.as_rgb,
        fit=d.fit,
        mean=d.mean,
        std=d.std,
        augment=OmegaConf.to_container(d.augment, resolve=True) if d.augment else None,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        mmap=d.mmap,
    )


def build_model(
    model_cfg: DictConfig, num_classes: int, in_chans: int, img_size: int
) -> torch.nn.Module:
    """A model (or teacher) config -> nn.Module."""
    kwargs = (
        OmegaConf.to_container(model_cfg.kwargs, resolve=True) if model_cfg.get("kwargs") else {}
    )
    return create_model(
        model_cfg.arch,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        pretrained=model_cfg.pretrained,
        pretrained_file=model_cfg.get("pretrained_file"),
        **kwargs,
    )


def load_teacher(cfg: DictConfig, num_classes: int, in_chans: int) -> torch.nn.Module | None:
    """The frozen, eval-mode teacher of ``cfg.teacher`` with weights from its ``ckpt_path``."""
    if cfg.get("teacher") is None:
        return None
    t = cfg.teacher
    if not t.get("ckpt_path"):
        raise ConfigError(
            "teacher.ckpt_path is not set: point it at a trained medlite checkpoint "
            "(e.g. teacher.ckpt_path=outputs/.../checkpoints/best-029.ckpt from a run of model="
            f"{t.name})"
        )
    path = Path(str(t.ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"teacher.ckpt_path={path} does not exist")
    teacher = build_model(t, num_classes, in_chans, t.input_size or cfg.data.size)
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    weights = {
        k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")
    } or state
    try:
        teacher.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(
            f"teacher.ckpt_path={path} does not fit teacher model {t.arch}: {err}"
        ) from None
    teacher.eval().requires_grad_(False)
    log.info("teacher %s loaded from %s (frozen)", t.arch, path)
    return teacher


def _instantiate_dict(group: DictConfig | None) -> list:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group, skipping nulls."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(spec)
        for spec in group.values()
        if spec is not None and "_target_" in spec
    ]


def _clean_failed_start(output_dir: Path, log_dir: Path) -> None:
    """Remove what Hydra wrote for a run that failed before training: nothing half-written stays
    (the run directory and the parents it left empty, up to ``paths.log_dir``)."""
    for name in (".hydra", "train.log"):
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()
    log_dir, current = log_dir.resolve(), output_dir.resolve()
    while True:
        try:
            current.rmdir()  # only if empty
        except OSError:
            return
        current = current.parent
        if current == log_dir or log_dir not in current.parents:
            return


def _finish_wandb(loggers: list, results: dict) -> None:
    """Close every W&B run of this job (so the next sweep job starts its own), with the final numbers."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            summary = {"status": results["status"], "params": results["model"]["params"]}
            summary.update({f"final_test/{k}": v for k, v in (results.get("test") or {}).items()})
            lg.experiment.summary.update(summary)
            lg.experiment.finish(exit_code=0 if results["status"] == "ok" else 1)


def run(cfg: DictConfig) -> float:
    """Train, test and record one run; returns ``cfg.optimized_metric`` for sweepers."""
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    try:
        config_checks.validate(cfg)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg)
        dm.setup()  # fails now, not mid-training, on a missing or corrupt file
        in_chans, img_size = dm.in_chans, dm.preprocess.input_size
        model = build_model(cfg.model, dm.task.num_outputs, in_chans, img_size)
        teacher = load_teacher(cfg, dm.task.num_outputs, in_chans)
        steps = build_steps(
            OmegaConf.to_container(cfg.compress.steps, resolve=True) if cfg.compress.steps else []
        )
        if teacher is not None and not steps:
            log.warning(
                "a teacher is configured but compress=%s uses none; it is ignored",
                cfg.compress.name,
            )
        ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=output_dir, teacher=teacher)
        for step in steps:
            model = step.prepare(model, ctx)
        module = module_class(cfg.model.paradigm)(
            model,
            dm.task,
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
            label_smoothing=cfg.label_smoothing,
            loss_terms=[t for s in steps for t in s.loss_terms()],
        )
    except MedliteError:
        _clean_failed_start(output_dir, Path(cfg.paths.log_dir))
        raise

    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best-{epoch:03d}",
        monitor="val/auc",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    callbacks = [
        checkpoint,
        NaNGuard(),
        *_instantiate_dict(cfg.get("callbacks")),
        *(c for s in steps for c in s.callbacks()),
    ]
    loggers = _instantiate_dict(cfg.get("logger"))
    results: dict = {
        "status": "running",
        "run_dir": str(output_dir),
        "model": {
            "name": cfg.model.name,
            "arch": cfg.model.arch,
            "paradigm": cfg.model.paradigm,
            "params": count_parameters(model),
        },
        "compress": {"name": cfg.compress.name, "steps": [s.name for s in steps]},
        "data": dm.describe(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "git": git_revision(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    try:
        for lg in loggers:
            lg.log_hyperparams(results["config"])
        trainer: pl.Trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False
        )
        trainer.fit(module, datamodule=dm)
        best = checkpoint.best_model_path or None
        results["best_checkpoint"] = best
        if best:  # the MedMNIST protocol: test the checkpoint with the best validation AUC
            module.load_state_dict(
                torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
            )
            trainer.validate(module, datamodule=dm, verbose=False)
        results["val"] = dict(module.metrics.get("val", {}))
        trainer.test(module, datamodule=dm, verbose=False)
        results["test"] = dict(module.metrics.get("test", {}))
        for step in steps:
            final = step.finalize(module.model, ctx)
            if final is not None:
                module.model = final
                trainer.test(module, datamodule=dm, verbose=False)
                results.setdefault("finalized", {})[step.name] = dict(
                    module.metrics.get("test", {})
                )
        if cfg.profile.enabled:
            prof = {k: v for k, v in cfg.profile.items() if k != "enabled"}
            results["efficiency"] = profile_model(
                module.model, (in_chans, img_size, img_size), **prof
            ).as_dict()
        results["status"] = "ok"
    except MedliteError as err:
        results["status"] = "failed"
        results["error"] = str(err)
        raise
    except BaseException as err:  # keep a record of crashes and interrupts too
        results["status"] = "failed"
        results["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        results["wall_time_s"] = round(time.time() - start, 2)
        write_json(output_dir / "results.json", results)
        _finish_wandb(loggers, results)
    print_summary(results)
    return _optimized(results, cfg.optimized_metric)


def _optimized(results: dict, metric: str) -> float:
    split, name = metric.split("/")
    value = (results.get(split) or {}).get(name)
    if value is None:
        raise TrainingError(f"optimized_metric {metric} was not computed in this run")
    return float(value)
