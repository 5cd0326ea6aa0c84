"""Config checks that run before any work, so a typo costs seconds, not a training run.

This module imports neither torch nor Lightning at module level: the command line validates
with it before the heavy stack is loaded (a config mistake fails in about a second).
"""

from __future__ import annotations

import ast
import difflib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from medlite.errors import ConfigError

if TYPE_CHECKING:
    from medlite.tasks import Task

#: ``medlite.models.registry.PARADIGMS``, spelled out so that checking a config does not import
#: torch (a test keeps the two equal)
PARADIGMS = ("cnn", "transformer", "linear")


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


#: eval.conformal: the prediction-set method (medlite.tasks.conformal.METHODS), auto or off
CONFORMAL_CHOICES = ("auto", "aps", "raps", "lac", False, None)


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
    conformal = OmegaConf.select(cfg, "eval.conformal", default="auto")
    if conformal not in CONFORMAL_CHOICES:
        raise ConfigError(
            f"eval.conformal must be auto, aps, raps, lac or false, got {conformal!r}"
        )
    checkpoint_rule(cfg)
    check_trainer_keys(cfg)


def checkpoint_rule(cfg: DictConfig) -> str:
    """Which weights a phase keeps, tests and deploys (``eval.checkpoint``): ``best``, the epoch
    with the best validation score (the MedMNIST protocol), or ``last``, the final epoch (what
    a training script that forgets to copy its best model reports)."""
    rule = str(OmegaConf.select(cfg, "eval.checkpoint", default="best") or "best")
    if rule not in ("best", "last"):
        raise ConfigError(f"eval.checkpoint must be best or last, got {rule!r}")
    return rule


def check_trainer_keys(cfg: DictConfig) -> None:
    """Every ``trainer.*`` key must be an argument of the trainer class: a key added with ``+``
    (Hydra's hint for a typo, ``+trainer.max_epoch=3``) otherwise fails only when the trainer
    is built, after the data was loaded."""
    trainer = OmegaConf.select(cfg, "trainer")
    if not isinstance(trainer, DictConfig) or "_target_" not in trainer:
        return
    target = str(trainer._target_)
    found = _init_arguments(target)
    if found is None or found[1]:
        return  # unknown (fails, with its own message, when built) or takes **kwargs
    accepted = found[0]
    for key in trainer:
        if str(key).startswith("_") or key in accepted:
            continue
        close = difflib.get_close_matches(str(key), accepted, n=1)
        hint = f"; did you mean trainer.{close[0]}?" if close else ""
        raise ConfigError(f"trainer.{key} is not an argument of {target}{hint}")


def _init_arguments(target: str) -> tuple[list[str], bool] | None:
    """(argument names, takes ``**kwargs``) of class ``target``'s ``__init__``: read from its
    source (following re-exports) so that no 5 s import of Lightning comes first; imported
    when the source can't be read that way; None if the class can't be found."""
    found = _init_arguments_from_source(target)
    if found is not None:
        return found
    try:
        import hydra.utils

        params = inspect.signature(hydra.utils.get_class(target).__init__).parameters
    except Exception:  # noqa: BLE001 - a bad target fails, with its own message, when built
        return None
    names = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL]
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def _init_arguments_from_source(target: str, hops: int = 8) -> tuple[list[str], bool] | None:
    """:func:`_init_arguments` from the source alone: the class's module, or the module a
    ``from x import Name`` re-export points to (up to ``hops`` of them); nothing runs."""
    module, _, name = target.rpartition(".")
    for _ in range(hops):
        path = _module_source(module)
        if path is None:
            return None
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            return None
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        origin = None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                init = next(
                    (
                        f
                        for f in node.body
                        if isinstance(f, ast.FunctionDef) and f.name == "__init__"
                    ),
                    None,
                )
                if init is None:
                    return None  # inherited: let inspect find it
                args = init.args
                names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]][1:]
                return names, args.kwarg is not None
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        base = package.split(".")[: len(package.split(".")) - node.level + 1]
                        prefix = ".".join(base) if node.level else ""
                        origin = ".".join(p for p in (prefix, node.module or "") if p)
                        origin_name = alias.name
        if origin is None:
            return None
        module, name = origin, origin_name
    return None


def _module_source(module: str) -> Path | None:
    """The ``.py`` file of ``module``, found without importing it (or its packages)."""
    import importlib.util

    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for location in spec.submodule_search_locations or ():
        base = Path(location).joinpath(*rest)
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate
    return None


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
