"""The distillation teacher: loaded from ``teacher.ckpt_path``, from medlite's teacher cache, or
trained first in the same run (and then cached, so the next run, or the next job of a sweep,
reuses it instead of training it again). With ``teacher.members`` > 1 the teacher is an ensemble:
that many copies, each trained as its own phase, their logits averaged, cached as one file.

The cache key covers everything that changes the teacher's weights, fully resolved: its model
config, the data (its files and split, size, preprocessing, augmentation, epochs), optimiser,
schedule, seed, loss options, the trainer settings (epochs, precision, clipping, batch limits...),
``max_phase_epochs`` and the callbacks that act on training. A teacher trained under debug caps
(``fast_dev_run``, ``limit_*_batches``, ``overfit_batches``, ``max_phase_epochs``) is never cached:
a later full run must not distil from a teacher that saw three batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from medlite.build import build_teacher, check_model_task, teacher_members
from medlite.checkpoints import load_weights, save_weights
from medlite.compress.evaluate import evaluate
from medlite.errors import ConfigError
from medlite.models.adapters import LogitEnsemble

log = logging.getLogger(__name__)


@dataclass
class TeacherPlan:
    """Where the teacher's weights will come from, decided (and checked) before any training."""

    source: str  # "ckpt" | "cache" | "train"
    path: Path | None
    key: str | None = None  # the cache key of this run's teacher recipe (None: teacher.ckpt_path)
    not_cached: str | None = None  # why a teacher trained here is not cached (debug caps)


#: data settings that change what is read or how, not the trained weights
_DATA_KEYS_IGNORED = ("name", "root", "download", "mmap", "num_workers", "eval_batch_size")


#: trainer settings that change logging or where files go, not the trained weights
_TRAINER_KEYS_IGNORED = (
    "default_root_dir",
    "enable_progress_bar",
    "enable_model_summary",
    "enable_checkpointing",
    "log_every_n_steps",
    "logger",
    "num_sanity_val_steps",
    "profiler",
)
#: callbacks that only report (progress, learning-rate logging), by class name
_CALLBACKS_IGNORED = (
    "RichProgressBar",
    "TQDMProgressBar",
    "LearningRateMonitor",
    "ModelSummary",
    "RichModelSummary",
    "DeviceStatsMonitor",
)


def _container(cfg: DictConfig, key: str):
    node = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _trainer_recipe(cfg: DictConfig) -> dict:
    """The trainer settings that shape the weights; a multirun job's GPU index (``devices:
    [k]``) counts as one device, so the jobs of a sweep share their teacher."""
    node = cfg.get("trainer") or {}
    trainer = {k: _container(node, k) for k in node if k not in _TRAINER_KEYS_IGNORED}
    if isinstance(trainer.get("devices"), list):
        trainer["devices"] = len(trainer["devices"])
    return trainer


def _callbacks_recipe(cfg: DictConfig) -> dict:
    """Extra callbacks that act on training (early stopping, SWA...), not those that report."""
    group = _container(cfg, "callbacks") or {}
    return {
        name: spec
        for name, spec in group.items()
        if isinstance(spec, dict)
        and str(spec.get("_target_", "")).rsplit(".", 1)[-1] not in _CALLBACKS_IGNORED
    }


def teacher_recipe(cfg: DictConfig, data_id: str) -> dict:
    """Everything that changes the weights of a teacher trained in this run, fully resolved."""
    t = _container(cfg, "teacher") or {}
    for k in ("ckpt_path", "cache"):
        t.pop(k, None)
    if t.get("members") == 1:  # one network: the key of a teacher cached before ensembles
        t.pop("members")
    d = _container(cfg, "data") or {}
    return {
        "teacher": t,
        "data": {k: v for k, v in d.items() if k not in _DATA_KEYS_IGNORED},
        "data_id": data_id,
        "student_input": cfg.model.input_size,
        "optim": _container(cfg, "optim"),
        "scheduler": _container(cfg, "scheduler"),
        "seed": cfg.seed,
        "label_smoothing": cfg.get("label_smoothing"),
        "loss": _container(cfg, "loss"),
        "trainer": _trainer_recipe(cfg),
        "max_phase_epochs": cfg.get("max_phase_epochs"),
        "callbacks": _callbacks_recipe(cfg),
    }


def _cache_key(cfg: DictConfig, data_id: str) -> str:
    blob = json.dumps(teacher_recipe(cfg, data_id), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def debug_caps(cfg: DictConfig) -> list[str]:
    """The debug caps a teacher trained by this run would be trained under (``debug=...``
    configs set them): such a teacher is for seeing the pipeline run, never for the cache."""
    caps = []
    trainer = _trainer_recipe(cfg)
    if trainer.get("fast_dev_run"):
        caps.append(f"trainer.fast_dev_run={trainer['fast_dev_run']}")
    for k in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = trainer.get(k)  # a float is a fraction (1.0: all), an int a number of batches
        if value is not None and not (isinstance(value, float) and value == 1.0):
            caps.append(f"trainer.{k}={value}")
    if trainer.get("overfit_batches") not in (None, 0, 0.0):
        caps.append(f"trainer.overfit_batches={trainer['overfit_batches']}")
    if cfg.get("max_phase_epochs") is not None:
        caps.append(f"max_phase_epochs={cfg.max_phase_epochs}")
    return caps


def cache_path(cfg: DictConfig, data_name: str, data_id: str, size: int | None = None) -> Path:
    """Where a teacher trained by this run's recipe on this data is cached. ``data_id``: the
    datamodule's fingerprint (files and split), so two folders of the same name never share."""
    root = Path(str(cfg.paths.cache_dir)).expanduser() / "teachers"
    key = _cache_key(cfg, data_id)
    size = size or cfg.data.size
    return root / f"{data_name}_{size}px" / f"{cfg.teacher.name}-{key}.ckpt"


def plan_teacher(cfg: DictConfig, datamodule) -> TeacherPlan:
    """Fail fast (before training anything) on a missing teacher config or checkpoint."""
    t = cfg.get("teacher")
    if t is None:
        raise ConfigError(
            f"compress={cfg.compress.name} distils from a teacher but no teacher is configured; "
            "choose one, e.g. teacher=resnet18_cifar"
        )
    check_model_task(t, datamodule.task, role="teacher", spatial_dims=datamodule.spatial_dims)
    if teacher_members(t) > 1:
        featured = [
            i
            for i, step in enumerate(OmegaConf.to_container(cfg.compress, resolve=True).get("steps") or [])
            if step.get("kind") == "kd" and step.get("teacher", "config") == "config" and step.get("features")
        ]  # fmt: skip
        if featured:
            raise ConfigError(
                f"compress.steps[{featured[0]}] distils features, but teacher.members="
                f"{t.members} averages {t.members} networks' outputs and has no single layer to "
                "match; use teacher.members=1 for feature distillation"
            )
    if t.get("ckpt_path"):
        path = Path(str(t.ckpt_path)).expanduser()
        if not path.is_file():
            raise ConfigError(f"teacher.ckpt_path={path} does not exist")
        return TeacherPlan("ckpt", path)
    key = _cache_key(cfg, datamodule.fingerprint())
    cached = cache_path(cfg, datamodule.name, datamodule.fingerprint(), datamodule.size)
    if not t.get("cache", True):
        return TeacherPlan("train", None, key, "teacher.cache=false")
    caps = debug_caps(cfg)
    if caps:
        return TeacherPlan("train", None, key, f"trained under debug caps ({', '.join(caps)})")
    if cached.is_file():
        return TeacherPlan("cache", cached, key)
    return TeacherPlan("train", cached, key)


def obtain_teacher(
    cfg: DictConfig,
    datamodule,
    plan: TeacherPlan,
    output_dir: Path,
    loggers: Sequence = (),
) -> tuple[nn.Module, dict]:
    """The frozen, eval-mode teacher (adapted to the student's input) and what to record about it."""
    from medlite.training import train_phase  # training imports the compression package

    t = cfg.teacher
    wrapped = build_teacher(cfg, datamodule)
    net = wrapped.teacher
    info: dict = {"name": t.name, "arch": t.arch, "source": plan.source, "cache_key": plan.key}
    if plan.source == "train" and plan.not_cached:
        info["not_cached"] = plan.not_cached
        log.info("the teacher trained in this run is not cached: %s", plan.not_cached)
    if plan.source == "train":
        monitored = datamodule.task.monitor_metric
        members = list(net.members) if isinstance(net, LogitEnsemble) else [net]
        if len(members) > 1:
            log.info(
                "training the teacher first (no teacher.ckpt_path given): %d x %s, trained one "
                "after another and averaged", len(members), t.name,
            )  # fmt: skip
        else:
            log.info("training the teacher %s first (no teacher.ckpt_path given)", t.name)
        member_val = []
        for k, member in enumerate(members):
            # each member its own phase: its own initialisation (built in turn) and, through the
            # phase name, its own batch order; a single teacher keeps the name it always had
            where = "teacher" if len(members) == 1 else f"teacher/member{k}"
            phase = train_phase(
                cfg,
                wrapped if len(members) == 1 else wrapped.around(member),
                datamodule,
                ckpt_dir=output_dir / where / "checkpoints",
                loggers=loggers,
                prefix=f"{where}/",
                paradigm=t.paradigm,
                epochs=t.get("epochs"),
                lr=t.get("lr"),
                test=False,
            )
            member_val.append(phase.val.get(monitored))
        if len(members) > 1:
            info["members_val"] = {monitored: member_val}
        meta = {
            "arch": t.arch,
            "data": datamodule.name,
            "size": datamodule.size,
            "seed": cfg.seed,
            "cache_key": plan.key,
        }
        run_copy = output_dir / "teacher" / "teacher.ckpt"
        save_weights(net, run_copy, meta)
        info["path"] = str(run_copy)
        if plan.path is not None:
            save_weights(net, plan.path, meta)
            info["cached"] = str(plan.path)
        log.info(
            "teacher trained (val %s %s); later runs %s, or pass teacher.ckpt_path=%s",
            datamodule.task.title(monitored),
            ", ".join(f"{v:.3f}" if v is not None else "nan" for v in member_val)
            + (" for its members" if len(members) > 1 else ""),
            "reuse it from the cache" if plan.path is not None else "train their own",
            run_copy,
        )
    else:
        load_weights(net, plan.path, t.arch)
        info["path"] = str(plan.path)
        log.info("teacher %s loaded from %s", t.name, plan.path)
    wrapped.eval().requires_grad_(False)
    info["val"] = evaluate(wrapped, datamodule.val_dataloader(), datamodule.task)
    info["test"] = evaluate(wrapped, datamodule.test_dataloader(), datamodule.task)
    return wrapped, info
