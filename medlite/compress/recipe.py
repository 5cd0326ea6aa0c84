"""Running a compression recipe: base model, then each step, measuring every stage the same way.

Each stage (the base model before compression, the teacher when distilling from scratch, and the
model after every step) gets a row: validation and test metrics from one plain evaluation loop and
the same efficiency profile, all in this process, so before and after are directly comparable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from medlite.checkpoints import lightning_state, load_weights, relative_to_run
from medlite.compress.base import CompressionStep, RunContext, frozen_copy
from medlite.compress.evaluate import evaluate
from medlite.compress.structure import StructureError, build_args, save_compressed
from medlite.efficiency import profile_model, profile_settings
from medlite.errors import ConfigError
from medlite.training import train_phase

log = logging.getLogger(__name__)

BASES = ("train", "scratch")


def check_recipe(cfg: DictConfig) -> None:
    """Config mistakes a recipe can make, found before any training."""
    base = cfg.compress.get("base", "train")
    if base not in BASES:
        raise ConfigError(f"compress.base must be one of {BASES}, got {base!r}")
    ckpt = cfg.compress.get("base_ckpt")
    if ckpt:  # read now (weights only): a missing, broken or unsafe file fails before any work
        lightning_state(Path(str(ckpt)).expanduser(), "compress.base_ckpt")


def _stage(
    cfg: DictConfig, name: str, model: nn.Module, datamodule, input_shape: tuple[int, ...]
) -> dict:
    row = {
        "stage": name,
        "val": evaluate(model, datamodule.val_dataloader(), datamodule.task),
        "test": evaluate(model, datamodule.test_dataloader(), datamodule.task),
    }
    if cfg.profile.enabled:
        row["efficiency"] = profile_model(
            model, input_shape, **profile_settings(cfg.profile)
        ).as_dict()
    task = datamodule.task
    log.info(
        "stage %s: %s",
        name,
        ", ".join(
            f"test {task.title(m)} {row['test'].get(m, float('nan')):.4f}" for m in task.headline
        ),
    )
    return row


def _prefixes(steps: Sequence[CompressionStep]) -> list[str]:
    kinds = [s.kind for s in steps]
    return [f"{k}/" if kinds.count(k) == 1 else f"{k}{i}/" for i, k in enumerate(kinds)]


def run_recipe(
    cfg: DictConfig,
    model: nn.Module,
    datamodule,
    steps: Sequence[CompressionStep],
    ctx: RunContext,
    loggers: Sequence,
    results: dict,
    teacher_info: dict | None = None,
) -> nn.Module:
    """Base -> steps; fills ``results['compression']``, ``results['val']``/``['test']`` (the final
    model's) and returns the final model."""
    out = ctx.output_dir
    shape = datamodule.input_shape
    comp = results.setdefault("compression", {})
    comp.update(
        base=cfg.compress.get("base", "train"),
        base_ckpt=cfg.compress.get("base_ckpt"),
        steps=[],
        stages=[],
    )
    if teacher_info:  # a teacher trained in this run is recorded relative to it
        comp["teacher"] = {**teacher_info, "path": relative_to_run(teacher_info.get("path"), out)}
    if comp["base"] == "train":
        if comp["base_ckpt"]:
            load_weights(model, Path(str(comp["base_ckpt"])).expanduser(), cfg.model.arch)
            log.info("base model loaded from %s (not retrained)", comp["base_ckpt"])
        else:
            phase = train_phase(
                cfg, model, datamodule, ckpt_dir=out / "checkpoints", loggers=loggers
            )
            results["best_checkpoint"] = relative_to_run(phase.best_checkpoint, out)
            model = phase.module.model
        comp["stages"].append(_stage(cfg, "before", model, datamodule, shape))
        ctx.base_model = frozen_copy(model)
    elif ctx.teacher is not None:
        comp["stages"].append(_stage(cfg, "teacher", ctx.teacher, datamodule, shape))

    for step, prefix in zip(steps, _prefixes(steps), strict=True):
        log.info("compression step %s", step.kind)
        model = step.prepare(model, ctx)
        if step.epochs > 0:
            phase = train_phase(
                cfg,
                model,
                datamodule,
                ckpt_dir=out / "checkpoints" / prefix.rstrip("/"),
                loggers=loggers,
                prefix=prefix,
                epochs=step.epochs,
                lr=step.lr,
                loss_terms=step.loss_terms(),
                task_loss_weight=step.task_loss_weight,
                callbacks=step.callbacks(),
                test=False,
            )
            model = phase.module.model
        model = step.finalize(model, ctx)
        comp["steps"].append({"kind": step.kind, "epochs": step.epochs, "report": step.report})
        for name, extra in step.extra_stages.items():  # e.g. fp32 on the runtime
            comp["stages"].append(_stage(cfg, f"{prefix}{name}", extra, datamodule, shape))
        comp["stages"].append(_stage(cfg, prefix.rstrip("/"), model, datamodule, shape))

    final = comp["stages"][-1]
    results["val"], results["test"] = final["val"], final["test"]
    if "efficiency" in final:
        results["efficiency"] = final["efficiency"]
    task, size = datamodule.task, datamodule.preprocess.input_size
    build = build_args(cfg.model, task.num_outputs, datamodule.in_chans, size)
    example = next(iter(datamodule.calibration_dataloader(batch_size=2)))[0]
    saved = save_final(model, out / "compressed", steps[-1] if steps else None, build, example)
    comp["saved"] = relative_to_run(saved, out)
    return model


def save_final(
    model: nn.Module,
    folder: Path,
    step: CompressionStep | None = None,
    build: dict | None = None,
    example=None,
) -> str | None:
    """Keep the compressed model: the file the last step wrote (an int8 runtime file), or its
    weights with a structural record (a pruned or factorised network no longer matches its
    config; ``build``: how to build that config's network), checked to rebuild the same model."""
    artefact = step.artefact(model) if step is not None else None
    if artefact is not None:
        return str(artefact)
    target = folder / "model.pt"
    if build is None:
        log.warning("no model config given: the compressed model is not saved")
        return None
    try:
        save_compressed(model, target, build, example)
    except StructureError as err:
        log.warning("could not save the compressed model (%s); the run's results stand", err)
        return None
    return str(target)
