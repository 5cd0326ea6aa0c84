"""The distillation teacher: loaded from ``teacher.ckpt_path``, from medlite's teacher cache, or
trained first in the same run (and then cached, so the next run, or the next job of a sweep,
reuses it instead of training it again).

The cache key covers everything that changes the teacher's weights: its model config, the data
(flag, size, preprocessing, augmentation, epochs), optimiser, schedule and seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medlite.compress.evaluate import evaluate
from medlite.compress.kd import TeacherInput
from medlite.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TeacherPlan:
    """Where the teacher's weights will come from, decided (and checked) before any training."""

    source: str  # "ckpt" | "cache" | "train"
    path: Path | None


def _cache_key(cfg: DictConfig) -> str:
    t = OmegaConf.to_container(cfg.teacher, resolve=True)
    for k in ("ckpt_path", "cache"):
        t.pop(k, None)
    d = OmegaConf.to_container(cfg.data, resolve=True)
    keep = ("flag", "size", "as_rgb", "fit", "mean", "std", "augment", "epochs", "batch_size")
    recipe = {
        "teacher": t,
        "data": {k: d.get(k) for k in keep},
        "student_input": cfg.model.input_size,
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
        "seed": cfg.seed,
        "label_smoothing": cfg.label_smoothing,
    }
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cache_path(cfg: DictConfig) -> Path:
    root = Path(str(cfg.paths.cache_dir)).expanduser() / "teachers"
    return (
        root / f"{cfg.data.flag}_{cfg.data.size}px" / f"{cfg.teacher.name}-{_cache_key(cfg)}.ckpt"
    )


def plan_teacher(cfg: DictConfig) -> TeacherPlan:
    """Fail fast (before training anything) on a missing teacher config or checkpoint."""
    t = cfg.get("teacher")
    if t is None:
        raise ConfigError(
            f"compress={cfg.compress.name} distils from a teacher but no teacher is configured; "
            "choose one, e.g. teacher=resnet18"
        )
    if t.get("ckpt_path"):
        path = Path(str(t.ckpt_path)).expanduser()
        if not path.is_file():
            raise ConfigError(f"teacher.ckpt_path={path} does not exist")
        return TeacherPlan("ckpt", path)
    cached = cache_path(cfg)
    if t.get("cache", True) and cached.is_file():
        return TeacherPlan("cache", cached)
    return TeacherPlan("train", cached if t.get("cache", True) else None)


def load_weights(net: nn.Module, path: Path, arch: str) -> None:
    """Load a medlite checkpoint (Lightning ``best-*.ckpt`` or a teacher file) into ``net``."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    weights = weights or dict(state)
    if weights and all(k.startswith("teacher.") for k in weights):
        weights = {k.removeprefix("teacher."): v for k, v in weights.items()}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(
            f"teacher checkpoint {path} does not fit teacher model {arch}: {err}"
        ) from None


def save_weights(net: nn.Module, path: Path, meta: dict) -> None:
    """Atomically write ``net``'s weights in the format ``teacher.ckpt_path`` accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "medlite_teacher": meta}, tmp)
    os.replace(tmp, path)


def obtain_teacher(
    cfg: DictConfig,
    datamodule,
    plan: TeacherPlan,
    output_dir: Path,
    loggers: Sequence = (),
) -> tuple[nn.Module, dict]:
    """The frozen, eval-mode teacher (adapted to the student's input) and what to record about it."""
    from medlite.pipeline import build_model  # the pipeline imports this module
    from medlite.training import train_phase

    t = cfg.teacher
    student_size = datamodule.preprocess.input_size
    net = build_model(
        t, datamodule.task.num_outputs, datamodule.in_chans, t.input_size or student_size
    )
    norm = (list(t.mean), list(t.std)) if t.get("mean") and t.get("std") else None
    wrapped = TeacherInput(
        net,
        size=t.input_size if t.input_size and t.input_size != student_size else None,
        student_norm=(list(datamodule.preprocess.mean), list(datamodule.preprocess.std)),
        teacher_norm=norm,
    )
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
        meta = {"arch": t.arch, "data": cfg.data.flag, "size": cfg.data.size, "seed": cfg.seed}
        run_copy = output_dir / "teacher" / "teacher.ckpt"
        save_weights(net, run_copy, meta)
        info["path"] = str(run_copy)
        if plan.path is not None:
            save_weights(net, plan.path, meta)
            info["cached"] = str(plan.path)
        log.info(
            "teacher trained (val AUC %.3f); later runs reuse it from the cache, or pass "
            "teacher.ckpt_path=%s",
            phase.val.get("auc", float("nan")),
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
