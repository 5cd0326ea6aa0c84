"""The distillation teacher: loaded from ``teacher.ckpt_path``, from medlite's teacher cache, or
trained first in the same run (and then cached, so the next run, or the next job of a sweep,
reuses it instead of training it again).

The cache key covers everything that changes the teacher's weights: its model config, the data
(its files and split, size, preprocessing, augmentation, epochs), optimiser, schedule and seed.
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

from medlite.build import build_teacher, check_model_task
from medlite.checkpoints import load_weights, save_weights
from medlite.compress.evaluate import evaluate
from medlite.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TeacherPlan:
    """Where the teacher's weights will come from, decided (and checked) before any training."""

    source: str  # "ckpt" | "cache" | "train"
    path: Path | None


#: data settings that change what is read or how, not the trained weights
_DATA_KEYS_IGNORED = ("name", "root", "download", "mmap", "num_workers", "eval_batch_size")


def _cache_key(cfg: DictConfig, data_id: str) -> str:
    t = OmegaConf.to_container(cfg.teacher, resolve=True)
    for k in ("ckpt_path", "cache"):
        t.pop(k, None)
    d = OmegaConf.to_container(cfg.data, resolve=True)
    recipe = {
        "teacher": t,
        "data": {k: v for k, v in d.items() if k not in _DATA_KEYS_IGNORED},
        "data_id": data_id,
        "student_input": cfg.model.input_size,
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
        "seed": cfg.seed,
        "label_smoothing": cfg.label_smoothing,
    }
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


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
            "choose one, e.g. teacher=resnet18"
        )
    check_model_task(t, datamodule.task, role="teacher", spatial_dims=datamodule.spatial_dims)
    if t.get("ckpt_path"):
        path = Path(str(t.ckpt_path)).expanduser()
        if not path.is_file():
            raise ConfigError(f"teacher.ckpt_path={path} does not exist")
        return TeacherPlan("ckpt", path)
    cached = cache_path(cfg, datamodule.name, datamodule.fingerprint(), datamodule.size)
    if t.get("cache", True) and cached.is_file():
        return TeacherPlan("cache", cached)
    return TeacherPlan("train", cached if t.get("cache", True) else None)


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
    info: dict = {"name": t.name, "arch": t.arch, "source": plan.source}
    if plan.source == "train":
        log.info("training the teacher %s first (no teacher.ckpt_path given)", t.name)
        phase = train_phase(
            cfg,
            wrapped,
            datamodule,
            ckpt_dir=output_dir / "teacher" / "checkpoints",
            loggers=loggers,
            prefix="teacher/",
            paradigm=t.paradigm,
            epochs=t.get("epochs"),
            lr=t.get("lr"),
            test=False,
        )
        meta = {"arch": t.arch, "data": datamodule.name, "size": datamodule.size, "seed": cfg.seed}
        run_copy = output_dir / "teacher" / "teacher.ckpt"
        save_weights(net, run_copy, meta)
        info["path"] = str(run_copy)
        if plan.path is not None:
            save_weights(net, plan.path, meta)
            info["cached"] = str(plan.path)
        monitored = datamodule.task.monitor_metric
        log.info(
            "teacher trained (val %s %.3f); later runs reuse it from the cache, or pass "
            "teacher.ckpt_path=%s",
            datamodule.task.title(monitored),
            phase.val.get(monitored, float("nan")),
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
