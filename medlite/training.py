"""One Lightning training phase: the unit every run is made of.

An ordinary run has one phase. A compressed run may have several (train the teacher, train the
base model, fine-tune after pruning, distil), each with its own checkpoints folder and metric
prefix, all logged to the same loggers, each ending on the checkpoint with the best value of the
task's monitored metric (validation AUC for classification, the MedMNIST protocol), or on
the final epoch with ``eval.checkpoint=last``.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from medlite import ddp
from medlite.callbacks import NaNGuard
from medlite.checkpoint_io import AtomicCheckpointIO
from medlite.checkpoints import lightning_state
from medlite.compress.base import LossTerm
from medlite.config import checkpoint_rule
from medlite.errors import ConfigError
from medlite.modules import MedliteModule, module_class
from medlite.threads import ThreadsFollowLoad, check_threads


@dataclass
class Phase:
    """What a phase leaves: the trained module (the kept checkpoint loaded) and its metrics."""

    module: MedliteModule
    best_checkpoint: str | None
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    world_size: int = 1  # processes that trained it (trainer=ddp)
    threads: dict[int, int] = field(default_factory=dict)  # threads=auto: epoch -> torch threads


def record_train_threads(results: dict, phase: Phase, name: str = "train") -> None:
    """``threads=auto``: the torch threads each epoch of a phase trained with, in
    ``results["job"]["train_threads"][name]``. Different counts change float sums, so two runs
    (or a run and its resumed copy) that trained under different loads can differ in the last
    digits; this record says whether they did."""
    if phase.threads:
        per_phase = results.setdefault("job", {}).setdefault("train_threads", {})
        per_phase[name] = {str(epoch): n for epoch, n in sorted(phase.threads.items())}


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group, skipping nulls."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(spec)
        for spec in group.values()
        if spec is not None and "_target_" in spec
    ]


class EpochSeed(pl.Callback):
    """Seed Python, NumPy and torch for every training epoch from (seed, phase, epoch): the
    shuffling, augmentation and dropout of an epoch depend on nothing that came before it, so a
    run resumed from an end-of-epoch checkpoint trains exactly as the uninterrupted run would.
    (Exact with ``data.num_workers=0``; persistent worker processes keep their own generators.)

    Lightning creates the train iterator of a fit's first epoch (epoch 0, or the first epoch
    after the checkpoint) early (when the optimizers are configured, which may count the train
    batches), the later ones just after ``on_train_epoch_start``: seed the first epoch in
    ``setup`` / ``on_load_checkpoint`` (both come before that), the others at their start."""

    def __init__(self, seed: int, phase: str = "") -> None:
        self.seed, self.phase = int(seed), phase
        self._seeded: int | None = None  # the epoch the generators were last seeded for

    def epoch_seed(self, epoch: int) -> int:
        entropy = [self.seed, zlib.crc32(self.phase.encode()), int(epoch)]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def _seed(self, epoch: int) -> None:
        seed = self.epoch_seed(epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self._seeded = epoch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._seed(0)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Resuming: the next epoch is the number of epochs the checkpoint had processed."""
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        processed = progress.get("current", {}).get("processed")
        self._seed(int(processed if processed is not None else checkpoint["epoch"] + 1))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self._seeded:
            self._seed(trainer.current_epoch)


def loss_class_weights(cfg: DictConfig, datamodule) -> torch.Tensor | None:
    """``loss.class_weights``: null (none), ``auto`` (inverse training-split frequency, see the
    task's ``class_weights``) or one positive number per class."""
    setting = OmegaConf.select(cfg, "loss.class_weights", default=None)
    if setting is None:
        return None
    task = datamodule.task
    if setting == "auto":
        return task.class_weights(datamodule.class_counts("train"), len(datamodule.splits["train"]))
    values = list(setting) if OmegaConf.is_list(setting) or isinstance(setting, list) else None
    if (
        values is None
        or len(values) != task.num_outputs
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values
        )
    ):
        raise ConfigError(
            f"loss.class_weights must be null, auto, or {task.num_outputs} positive numbers "
            f"(one per class: {', '.join(task.labels)}); got {setting!r}"
        )
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


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
    ckpt_path: str | Path | None = None,
) -> Phase:
    """Fit ``model`` (epochs: ``trainer.max_epochs`` unless given), reload the checkpoint with the
    best value of the task's monitored metric (``eval.checkpoint=last``: keep the final epoch),
    validate it and (``test``) test it. ``ckpt_path``: resume the fit from
    this checkpoint (weights, optimizer, LR scheduler, epoch/step counters, best-checkpoint
    tracking)."""
    rule = checkpoint_rule(cfg)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if lr is not None:
        optim["lr"] = float(lr)
    module = module_class(paradigm or cfg.model.paradigm)(
        model,
        datamodule.task,
        optim=optim,
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        label_smoothing=cfg.label_smoothing,
        class_weights=loss_class_weights(cfg, datamodule),
        loss_terms=loss_terms,
        task_loss_weight=task_loss_weight,
        log_prefix=prefix,
    )
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-{epoch:03d}",
        monitor=datamodule.task.monitor(prefix),
        mode=datamodule.task.monitor_mode,
        auto_insert_metric_name=False,
    )
    # last.ckpt after every epoch, what ``resume=<run dir>`` continues from. (Lightning 2.6
    # writes ``save_last`` only when a top-k checkpoint was saved, i.e. on a new best.) After
    # ``checkpoint`` in the list, so it records that callback's updated best-model state.
    last = ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False
    )
    cap = cfg.get("max_phase_epochs")
    if epochs and cap:
        epochs = min(int(epochs), int(cap))
    overrides = {"max_epochs": int(epochs)} if epochs else {}
    follow = ThreadsFollowLoad() if check_threads(cfg.get("threads")) == "auto" else None
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[
            checkpoint,
            last,
            NaNGuard(),
            EpochSeed(cfg.seed, prefix),
            *([follow] if follow else []),
            *instantiate_group(cfg.get("callbacks")),
            *callbacks,
        ],
        logger=list(loggers) or False,
        plugins=[AtomicCheckpointIO()],  # checkpoints never left half-written (full disk, kill)
        **overrides,
    )
    threads = torch.get_num_threads()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    world_size = trainer.world_size
    best = checkpoint.best_model_path or None
    if ddp.leave_after_fit(trainer, threads):  # rank 0 only from here: evaluate on one process
        trainer = hydra.utils.instantiate(
            cfg.trainer, logger=list(loggers) or False, **ddp.single_process_overrides()
        )
    if rule == "last":  # the module holds the final epoch's weights; last.ckpt has them too
        best = last.best_model_path or best
        trainer.validate(module, datamodule=datamodule, verbose=False)
    elif best:  # keep the checkpoint with the best validation score (the MedMNIST protocol)
        module.load_state_dict(lightning_state(best))
        trainer.validate(module, datamodule=datamodule, verbose=False)
    phase = Phase(
        module,
        best,
        val=dict(module.metrics.get("val", {})),
        world_size=world_size,
        threads=dict(follow.history) if follow else {},
    )
    if test:
        trainer.test(module, datamodule=datamodule, verbose=False)
        phase.test = dict(module.metrics.get("test", {}))
    return phase
