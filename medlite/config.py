"""Config checks that run before any work, so a typo costs seconds, not a training run."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from medlite.errors import ConfigError
from medlite.models.registry import PARADIGMS
from medlite.tasks import Task


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra (tests, scripts) there is no multirun
        return False


def run_group(task_name: str) -> str:
    """W&B group of a run: its sweep (``<task>-<sweep dir name>``) for a multirun job, so a
    sweep's jobs sit together; the task name for a single run."""
    if in_multirun():
        from hydra.core.hydra_config import HydraConfig

        return f"{task_name}-{Path(HydraConfig.get().sweep.dir).name}"
    return task_name


OmegaConf.register_new_resolver("medlite.run_group", run_group, replace=True)


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        hint = " (choose a dataset option, e.g. data=breastmnist)" if key == "data.flag" else ""
        if key == "data.root":
            hint = " (the folder of your images: data.root=/path/to/study)"
        raise ConfigError(f"config value '{key}' is required but not set{hint}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config value '{key}' could not be resolved: {err}") from None


def _number(
    cfg: DictConfig,
    key: str,
    *,
    low: float | None = None,
    strict: bool = False,
    integer: bool = False,
):
    value = _get(cfg, key)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{key} must be {'>' if strict else '>='} {low}, got {value}")
    return value


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key and the valid values for the first problem found.

    What a dataset option may hold (flag, size, folder) is its source's to check, when the
    datamodule is built; here are the settings every run shares.
    """
    data = _get(cfg, "data")
    if data is None or ("_target_" not in data and "flag" not in data):
        raise ConfigError("no dataset chosen; pick a data option, e.g. data=breastmnist")
    for key in data:  # required source settings (flag, root) fail here, with a hint
        if OmegaConf.is_missing(data, key):
            _get(cfg, f"data.{key}")
    if _get(cfg, "data.size") is not None:  # null: the source's default (folders)
        _number(cfg, "data.size", low=8, integer=True)
    input_size = _get(cfg, "model.input_size")
    if input_size is not None:
        _number(cfg, "model.input_size", low=8, integer=True)
    _number(cfg, "data.batch_size", low=1, integer=True)
    _number(cfg, "data.eval_batch_size", low=1, integer=True)
    _number(cfg, "data.num_workers", low=0, integer=True)
    _number(cfg, "trainer.max_epochs", low=1, integer=True)
    _number(cfg, "optim.lr", low=0, strict=True)
    _number(cfg, "optim.weight_decay", low=0)
    smoothing = _number(cfg, "label_smoothing", low=0)
    if smoothing >= 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {smoothing}")
    _number(cfg, "seed", low=0, integer=True)
    paradigm = _get(cfg, "model.paradigm")
    if paradigm not in PARADIGMS:
        raise ConfigError(f"model.paradigm must be one of {PARADIGMS}, got {paradigm!r}")
    sched = _get(cfg, "scheduler.name")
    if sched not in ("cosine", "multistep", "none"):
        raise ConfigError(f"scheduler.name must be cosine, multistep or none, got {sched!r}")
    warmup = _get(cfg, "scheduler.warmup")
    if warmup is not None and not (isinstance(warmup, (int, float)) and 0 <= warmup < 1):
        raise ConfigError(
            f"scheduler.warmup is a fraction of training in [0, 1) or null, got {warmup!r}"
        )
    weights = _get(cfg, "loss.class_weights") if OmegaConf.select(cfg, "loss") else None
    if isinstance(weights, str) and weights != "auto":
        raise ConfigError(f"loss.class_weights must be null, auto or a list, got {weights!r}")


def optimized_metric(cfg: DictConfig, task: Task) -> str:
    """``optimized_metric`` (what the run returns to sweepers): null means the task's monitored
    metric; otherwise ``val/<metric>`` or ``test/<metric>`` of the task's metrics."""
    metric = _get(cfg, "optimized_metric")
    if metric is None:
        return task.monitor()
    valid = [f"{split}/{m}" for split in ("val", "test") for m in task.metric_names]
    if metric not in valid:
        raise ConfigError(
            f"optimized_metric={metric!r} is not a metric of this {task.type} task; "
            f"choose one of {', '.join(valid)} (or null: {task.monitor()})"
        )
    return str(metric)
