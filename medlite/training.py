"""One Lightning training phase: the unit every run is made of.

An ordinary run has one phase. A compressed run may have several (train the teacher, train the
base model, fine-tune after pruning, distil), each with its own checkpoints folder and metric
prefix, all logged to the same loggers, each ending on its best-validation-AUC checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from medlite.callbacks import NaNGuard
from medlite.compress.base import LossTerm
from medlite.modules import MedliteModule, module_class


@dataclass
class Phase:
    """What a phase leaves: the trained module (best checkpoint loaded) and its metrics."""

    module: MedliteModule
    best_checkpoint: str | None
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group, skipping nulls."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(spec)
        for spec in group.values()
        if spec is not None and "_target_" in spec
    ]


def train_phase(
    cfg: DictConfig,
    model: nn.Module,
    datamodule: pl.LightningDataModule,
    *,
    ckpt_dir: Path,
    loggers: Sequence = (),
    prefix: str = "",
    paradigm: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    loss_terms: Sequence[LossTerm] = (),
    task_loss_weight: float = 1.0,
    callbacks: Sequence[pl.Callback] = (),
    test: bool = True,
) -> Phase:
    """Fit ``model`` (epochs: ``trainer.max_epochs`` unless given), reload the checkpoint with the
    best validation AUC, validate it and (``test``) test it."""
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if lr is not None:
        optim["lr"] = float(lr)
    module = module_class(paradigm or cfg.model.paradigm)(
        model,
        datamodule.task,
        optim=optim,
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        label_smoothing=cfg.label_smoothing,
        loss_terms=loss_terms,
        task_loss_weight=task_loss_weight,
        log_prefix=prefix,
    )
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-{epoch:03d}",
        monitor=f"{prefix}val/auc",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    cap = cfg.get("max_phase_epochs")
    if epochs and cap:
        epochs = min(int(epochs), int(cap))
    overrides = {"max_epochs": int(epochs)} if epochs else {}
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[checkpoint, NaNGuard(), *instantiate_group(cfg.get("callbacks")), *callbacks],
        logger=list(loggers) or False,
        **overrides,
    )
    trainer.fit(module, datamodule=datamodule)
    best = checkpoint.best_model_path or None
    if best:  # the MedMNIST protocol: keep the checkpoint with the best validation AUC
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    phase = Phase(module, best, val=dict(module.metrics.get("val", {})))
    if test:
        trainer.test(module, datamodule=datamodule, verbose=False)
        phase.test = dict(module.metrics.get("test", {}))
    return phase
