"""One training run, end to end: the whole of what ``python train.py`` does.

validate config -> seed -> datamodule -> model -> [teacher] -> training phase(s) (one, or a
compression recipe: base, then each step) -> best-validation checkpoint tested -> efficiency
profile -> results.json -> [export with parity checks and the model card (``export=onnx``)].
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import medlite
from medlite import config as config_checks
from medlite import ddp
from medlite.atomic import disk_full_in
from medlite.build import build_datamodule, build_model, check_model_task
from medlite.checkpoints import relative_to_run
from medlite.compress import RunContext, build_steps
from medlite.compress.recipe import check_recipe, run_recipe
from medlite.compress.teacher import obtain_teacher, plan_teacher
from medlite.deploy.export import export_run, settings_from_config
from medlite.efficiency import profile_model, profile_settings
from medlite.errors import MedliteError, TrainingError
from medlite.models import count_parameters
from medlite.outputs import remove_failed_start
from medlite.results import git_revision, lookup, package_versions, print_summary, write_json
from medlite.resume import Resume, begin_resume
from medlite.sweeps.placement import place_job, placement_record
from medlite.threads import check_threads
from medlite.training import (
    instantiate_group,
    loss_class_weights,
    record_train_threads,
    train_phase,
)

log = logging.getLogger(__name__)


def _finish_wandb(loggers: list, results: dict) -> None:
    """Close every W&B run of this job (so the next sweep job starts its own), with the final numbers."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            summary = {"status": results["status"], "params": results["model"]["params"]}
            summary.update({f"final_test/{k}": v for k, v in (results.get("test") or {}).items()})
            lg.experiment.summary.update(summary)
            lg.experiment.finish(exit_code=0 if results["status"] == "ok" else 1)


def run(cfg: DictConfig) -> float:
    """Train (and compress), test and record one run; returns ``cfg.optimized_metric``."""
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    resume: Resume | None = None
    secondary = ddp.is_secondary_rank()  # a DDP rank > 0: trains, records nothing
    try:
        if cfg.get("resume"):
            cfg, resume = begin_resume(cfg, Path(cfg.paths.log_dir))
            output_dir = resume.run_dir
            log.info(
                "Resuming %s from %s (epoch %d done, step %d)",
                output_dir,
                resume.checkpoint,
                resume.epoch,
                resume.global_step,
            )
        config_checks.validate(cfg)
        processes = ddp.prepare(cfg, multirun=config_checks.in_multirun())
        placement = place_job(cfg)  # parallel multirun jobs: threads, GPU
        fixed = check_threads(cfg.get("threads"))  # auto: follows the load while training
        if resume is not None and fixed == "auto":
            log.warning(
                "threads=auto: the resumed epochs train with as many threads as the load leaves "
                "free; where that differs from the uninterrupted run's, the numbers differ in the "
                "last digits (see results.json job.train_threads). A fixed threads=N resumes "
                "bit-identically."
            )
        if fixed != "auto":
            torch.set_num_threads(fixed if placement is None else min(fixed, placement.threads))
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg)
        dm.setup()  # fails now, not mid-training, on a missing or corrupt file
        task = dm.task
        check_model_task(cfg.model, task, spatial_dims=dm.spatial_dims)
        optimized_metric = config_checks.optimized_metric(cfg, task)
        class_weights = loss_class_weights(cfg, dm)
        in_chans, img_size = dm.in_chans, dm.preprocess.input_size
        model = build_model(cfg.model, task.num_outputs, in_chans, img_size)
        steps = build_steps(
            OmegaConf.to_container(cfg.compress.steps, resolve=True) if cfg.compress.steps else []
        )
        check_recipe(cfg)
        if steps:
            example = next(iter(dm.calibration_dataloader(batch_size=2)))[0]
            for step in steps:
                step.check(model, example)
        export_settings = settings_from_config(cfg.get("export"))
        needs_teacher = any(s.needs_teacher for s in steps)
        teacher_plan = plan_teacher(cfg, dm) if needs_teacher else None
    except MedliteError:
        target = resume.run_dir if resume else cfg.get("resume")
        if secondary:
            raise
        if not target or Path(str(target)).expanduser().resolve() != output_dir.resolve():
            remove_failed_start(output_dir, Path(cfg.paths.log_dir))  # never the resumed run
        raise

    data_records = [] if secondary else dm.write_records(output_dir)  # e.g. splits.csv
    kept_metrics = resume.kept_metrics() if resume else None
    loggers = instantiate_group(cfg.get("logger"))
    results: dict = {
        "status": "running",
        "run_dir": str(output_dir),
        "model": {
            "name": cfg.model.name,
            "arch": cfg.model.arch,
            "paradigm": cfg.model.paradigm,
            "params": count_parameters(model),
        },
        "compress": {"name": cfg.compress.name, "steps": [s.kind for s in steps]},
        "task": task.record(),
        "data": {**dm.describe(), "records": data_records},
        "loss": {
            "class_weights": None if class_weights is None else class_weights.tolist(),
            "label_smoothing": cfg.label_smoothing,
        },
        "seed": cfg.seed,
        "job": {**placement_record(placement), "processes": processes},
        "versions": package_versions(),
        "git": git_revision(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if resume is not None:
        results["resumed"] = [*resume.earlier, resume.record()]
    try:
        for lg in loggers:
            lg.log_hyperparams(results["config"])
        if resume is not None and not secondary:
            resume.restore_metrics(loggers, kept_metrics)
        if steps:
            ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=output_dir)
            teacher_info = None
            if teacher_plan is not None:
                ctx.teacher, teacher_info = obtain_teacher(
                    cfg, dm, teacher_plan, output_dir, loggers
                )
            model = run_recipe(cfg, model, dm, steps, ctx, loggers, results, teacher_info)
            results["model"]["params"] = final_params(model)  # the pruned / factorised network
        else:
            phase = train_phase(
                cfg,
                model,
                dm,
                ckpt_dir=output_dir / "checkpoints",
                loggers=loggers,
                ckpt_path=resume.checkpoint if resume else None,
            )
            model = phase.module.model
            results["job"]["world_size"] = phase.world_size
            record_train_threads(results, phase)
            best = relative_to_run(phase.best_checkpoint, output_dir)  # a moved run finds it
            results.update(best_checkpoint=best, val=phase.val, test=phase.test)
            if cfg.profile.enabled:
                results["efficiency"] = profile_model(
                    model, dm.input_shape, **profile_settings(cfg.profile)
                ).as_dict()
        if cfg.get("eval", {}).get("original_size") and task.kind == "segmentation":
            results["test_original_size"] = _original_size_metrics(model, dm)
        split_outputs = None  # classification: {"val"/"test": (logits, labels)}, computed once
        if task.kind == "classification" and not secondary:
            split_outputs = _calibration(model, dm, results, output_dir)
        elif task.kind == "segmentation" and not secondary:
            _pixel_calibration(model, dm, results)
        if cfg.get("eval", {}).get("robustness") and not secondary:
            results["robustness"] = _robustness(model, dm, output_dir, cfg)
            stages = results.get("compression", {}).get("stages")
            if stages and results["robustness"]:  # the final stage is the final model
                stages[-1]["robustness"] = results["robustness"]
        conformal_method = cfg.get("eval", {}).get("conformal", "auto")
        if conformal_method and not secondary:
            _conformal(model, dm, results, split_outputs, str(conformal_method))
        results["optimized"] = {  # what sweepers optimise, and which way
            "metric": optimized_metric,
            "mode": task.monitor_mode,
            "value": lookup(results, optimized_metric),
        }
        results["status"] = "ok"
    except MedliteError as err:
        results["status"] = "failed"
        results["error"] = str(err)
        raise
    except BaseException as err:  # keep a record of crashes and interrupts too
        results["status"] = "failed"
        results["error"] = f"{type(err).__name__}: {err}"
        full = disk_full_in(err, output_dir)  # e.g. a logger's ENOSPC after a checkpoint's
        if full is not None:
            results["error"] = str(full)
            raise full from err
        raise
    finally:
        results["wall_time_s"] = round(time.time() - start, 2)
        if not secondary:
            write_json(output_dir / "results.json", results)
            _finish_wandb(loggers, results)
    print_summary(results)
    if export_settings is not None:
        export_run(output_dir, export_settings)
    return _optimized(results, optimized_metric)


def _original_size_metrics(model, dm) -> dict | None:
    """``eval.original_size``: the test split scored at its images' own sizes."""
    from medlite.compress.evaluate import evaluate_at_original_size

    scores = evaluate_at_original_size(model, dm)
    if scores is None:
        log.info("eval.original_size: %s stores its masks at their own size already", dm.name)
    else:
        shown = ", ".join(f"{dm.task.title(k)} {v:.4f}" for k, v in scores.items())
        log.info("test split at the images' original sizes: %s", shown)
    return scores


def _calibration(model, dm, results: dict, output_dir: Path) -> dict:
    """Temperature scaling fitted on the validation logits; calibration before/after on val and
    test -> results.json ``calibration`` and ``calibration.png`` (the test split's reliability).
    Returns the splits' raw (logits, labels), for the steps after it (conformal sets)."""
    from medlite.compress.evaluate import split_logits
    from medlite.tasks import calibration

    outputs = split_logits(model, dm)
    record, t = calibration.calibrate(dm.task.type, outputs)
    results[calibration.RESULTS_KEY] = record
    try:
        labels, logits = outputs["test"][1], outputs["test"][0]
        calibration.plot_reliability(labels, logits, t, dm.task.type, output_dir / calibration.PLOT)
        record["plot"] = calibration.PLOT  # relative to the run directory
    except Exception as err:  # noqa: BLE001 - the numbers matter more than the picture
        log.warning("could not draw the reliability diagram: %s", err)
    log.info(calibration.summary_line(record))
    return outputs


def _pixel_calibration(model, dm, results: dict) -> None:
    """Segmentation: ECE, MCE, Brier and NLL of the per-pixel probabilities on val and test ->
    results.json ``pixel_calibration``."""
    from medlite.compress.evaluate import pixel_calibration
    from medlite.tasks import calibration

    record = pixel_calibration(model, dm)
    results[calibration.PIXEL_KEY] = record
    log.info(calibration.pixel_summary_line(record))


def _conformal(model, dm, results: dict, outputs: dict | None = None, method: str = "auto") -> None:
    """``eval.conformal``: prediction sets calibrated on val, coverage and size on test
    (single-label classification only) -> results.json ``conformal``."""
    from medlite.compress.evaluate import split_logits
    from medlite.errors import ConfigError
    from medlite.tasks import conformal

    if dm.task.kind != "classification" or dm.task.type == conformal.MULTILABEL:
        return
    outputs = outputs or split_logits(model, dm)  # the calibration step's, when it ran
    try:
        results[conformal.KEY] = conformal.calibrate_logits(outputs, dm.task.type, results, method)
    except ConfigError as err:  # e.g. an empty validation split: the run's numbers still stand
        log.warning("conformal prediction sets skipped: %s", err)
        return
    log.info(conformal.summary_line(results[conformal.KEY]))


def _robustness(model, dm, output_dir: Path, cfg) -> dict | None:
    """``eval.robustness``: the test split under corruptions x severities -> ``robustness/``
    in the run directory and its summary in results.json (2D classification and segmentation)."""
    from medlite.robustness.run import robustness_after_training

    summary = robustness_after_training(model, dm, output_dir, cfg)
    if summary is None:
        log.info("eval.robustness: measured for 2D classification and segmentation runs; skipped")
    return summary


def final_params(model) -> int:
    """Parameters of the model a run ends with, counted as its efficiency row counts them (an
    int8 runtime model reports the network it quantises)."""
    known = getattr(model, "profile_overrides", None) or {}
    return int(known.get("params", count_parameters(model)))


def _optimized(results: dict, metric: str) -> float:
    value = lookup(results, metric)
    if value is None:
        raise TrainingError(f"optimized_metric {metric} was not computed in this run")
    return float(value)


CONF_DIR = medlite.CONF_DIR  # conf/ in a clone, medlite/conf in an installed wheel


def run_with_overrides(output_dir: str | Path, overrides: list[str], reuse: bool = False) -> dict:
    """Compose ``conf/train.yaml`` with ``overrides`` and run it into ``output_dir``, in this
    process (benchmark scripts); returns its results.json. ``reuse``: keep a finished run."""
    from hydra import compose, initialize_config_dir

    from medlite.results import read_json

    done = Path(output_dir) / "results.json"
    if reuse and done.exists() and read_json(done).get("status") == "ok":
        return read_json(done)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    run(cfg)
    return read_json(done)
