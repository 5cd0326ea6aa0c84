"""Running a compression recipe: base model, then each step, measuring every stage the same way.

Each stage (the base model before compression, the teacher when distilling from scratch, and the
model after every step) gets a row: validation and test metrics from one plain evaluation loop and
the same efficiency profile, all in this process, so before and after are directly comparable.

Compression can change trust as much as accuracy, so classification rows also carry the stage's
calibration after its own temperature scaling (the raw ECE is among the test metrics) and, with
``eval.robustness=true``, its mean metrics under the corruption suite (the final stage's come
from the run's own robustness report, measured once, after the recipe).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medlite.checkpoints import lightning_state, load_weights, relative_to_run
from medlite.compress.base import CompressionStep, RunContext, frozen_copy
from medlite.compress.evaluate import evaluate, split_logits
from medlite.compress.structure import StructureError, build_args, save_compressed
from medlite.efficiency import profile_model, profile_settings
from medlite.errors import ConfigError
from medlite.run_dirs import is_secondary_rank
from medlite.training import record_train_threads, train_phase

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


def _scores(model: nn.Module, datamodule) -> dict:
    """Validation and test metrics; for classification, from one pass of logits that also fits
    the stage's temperature (on val) and records its calibration after scaling (``calibrated``:
    T, and the val / test calibration metrics of logits / T)."""
    task = datamodule.task
    if task.kind != "classification":
        return {
            "val": evaluate(model, datamodule.val_dataloader(), task),
            "test": evaluate(model, datamodule.test_dataloader(), task),
        }
    from medlite.tasks.calibration import calibrate

    outputs = split_logits(model, datamodule)
    row: dict = {
        split: task.metrics(labels, task.eval_outputs(logits).numpy())
        for split, (logits, labels) in outputs.items()
    }
    record, _ = calibrate(task.type, outputs)
    row["calibrated"] = {"temperature": record["temperature"]} | {
        split: record[split]["after"] for split in outputs
    }
    return row


def _stage(
    cfg: DictConfig,
    name: str,
    model: nn.Module,
    datamodule,
    input_shape: tuple[int, ...],
    robustness_dir: Path | None = None,
) -> dict:
    """One row of the before/after table; ``robustness_dir``: also score the stage under the
    corruptions (its report goes to ``<dir>/robustness/stages/``). Measuring draws nothing from
    the run's random stream (each DataLoader pass takes a seed from it), so the steps after it
    train the same whatever is measured."""
    with torch.random.fork_rng(devices=[]):
        row = {"stage": name, **_scores(model, datamodule)}
        if robustness_dir is not None:
            from medlite.robustness.run import robustness_of_stage

            summary = robustness_of_stage(model, datamodule, robustness_dir, cfg, name)
            if summary is not None:
                row["robustness"] = summary
        if cfg.profile.enabled:
            settings = profile_settings(cfg.profile)
            row["efficiency"] = profile_model(model, input_shape, **settings).as_dict()
            if (cfg.get("export") or {}).get("formats"):  # a deployed run: rank stages deployed
                from medlite.deploy.stage_latency import stage_deployed_latency

                row["efficiency"] |= stage_deployed_latency(
                    model,
                    input_shape,
                    efficiency=row["efficiency"],
                    threads=settings.get("threads"),
                    warmup=settings.get("warmup", 5),
                    repeats=settings.get("repeats", 30),
                )
    task = datamodule.task
    log.info(
        "stage %s: %s",
        name,
        ", ".join(
            f"test {task.title(m)} {row['test'].get(m, float('nan')):.4f}" for m in task.headline
        ),
    )
    return row


def kd_recovery(teacher: dict | None, before: dict | None, after: dict, task) -> dict | None:
    """What distillation did, on the task's monitored metric: the teacher's value, the student's
    before and after the KD step, the teacher-student gap and the share of it KD recovered
    (1 = the student reached its teacher), on val (where choices are made) and test. Warns when
    the teacher is not better than the student it teaches on val: distilling from it can only
    pull the student towards a worse model. None without a teacher row to compare with."""
    if teacher is None:
        return None
    metric, sign = task.monitor_metric, (1.0 if task.monitor_mode == "max" else -1.0)
    out: dict = {"metric": metric}
    for split in ("val", "test"):
        t, a = (teacher.get(split) or {}).get(metric), (after.get(split) or {}).get(metric)
        b = (before.get(split) or {}).get(metric) if before is not None else None
        gap = None if b is None or t is None else sign * (t - b)
        share = None if gap is None or gap <= 0 or a is None else sign * (a - b) / gap
        out[split] = {"teacher": t, "student_before": b, "student_after": a, "gap": gap,
                      "recovered_share": share}  # fmt: skip
    val = out["val"]
    if before is None and val["teacher"] is not None and val["student_after"] is not None:
        # from scratch there is no student-alone row; a student that ends level with or above
        # its teacher says the teacher was no stronger than the student would have been
        if sign * (val["student_after"] - val["teacher"]) >= 0:
            log.warning(
                "kd: the distilled student (val %s %.4f) matches or beats its teacher (%.4f): "
                "the teacher is no stronger than the student, so distillation can only pull it "
                "towards a weaker model; choose a stronger teacher (teacher=...)",
                task.title(metric), val["student_after"], val["teacher"],
            )  # fmt: skip
    elif val["gap"] is not None and val["gap"] <= 0:
        log.warning(
            "kd: the teacher (val %s %.4f) is not better than the student it teaches (%.4f): "
            "distillation pulls towards a weaker model; choose a stronger teacher",
            task.title(metric), val["teacher"], val["student_before"],
        )  # fmt: skip
    elif val["recovered_share"] is not None:
        log.info(
            "kd: recovered %.0f%% of the teacher-student gap on val (%s %.4f -> %.4f, teacher "
            "%.4f)", 100 * val["recovered_share"], task.title(metric), val["student_before"],
            val["student_after"], val["teacher"],
        )  # fmt: skip
    return out


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
    wanted = OmegaConf.select(cfg, "eval.robustness", default=False)
    robust = out if wanted and not is_secondary_rank() else None  # rank 0 writes the reports
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
            record_train_threads(results, phase)
            model = phase.module.model
        comp["stages"].append(_stage(cfg, "before", model, datamodule, shape, robust))
        ctx.base_model = frozen_copy(model)
    elif ctx.teacher is not None:
        comp["stages"].append(_stage(cfg, "teacher", ctx.teacher, datamodule, shape, robust))

    for i, (step, prefix) in enumerate(zip(steps, _prefixes(steps), strict=True)):
        log.info("compression step %s", step.kind)
        student_before = comp["stages"][-1] if comp["stages"] else None
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
            record_train_threads(results, phase, prefix.rstrip("/"))
            model = phase.module.model
        model = step.finalize(model, ctx)
        comp["steps"].append({"kind": step.kind, "epochs": step.epochs, "report": step.report})
        for name, extra in step.extra_stages.items():  # e.g. fp32 on the runtime
            comp["stages"].append(_stage(cfg, f"{prefix}{name}", extra, datamodule, shape, robust))
        last = i == len(steps) - 1  # the final model: the run's own report scores it
        row = _stage(cfg, prefix.rstrip("/"), model, datamodule, shape, None if last else robust)
        comp["stages"].append(row)
        if step.kind == "kd":
            source = getattr(step, "teacher_source", "config")
            teacher_row = next(
                (
                    r
                    for r in comp["stages"]
                    if r["stage"] == ("before" if source == "base" else "teacher")
                ),
                None,
            )
            before = None if student_before is teacher_row else student_before
            step.report["recovery"] = kd_recovery(teacher_row, before, row, datamodule.task)

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
