"""The LightningModule every medlite run trains: task-aware loss and metrics, optimiser, schedule.

What differs between architecture paradigms (which parameters skip weight decay, the default
warm-up, fp32 islands) is a class attribute or a small override in :mod:`medlite.modules.paradigms`.
Compression plugs in through ``loss_terms`` (e.g. distillation from a frozen teacher).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn

from medlite.compress.base import LossTerm
from medlite.errors import ConfigError, TrainingError
from medlite.tasks import Task, get_task

log = logging.getLogger(__name__)


class NonFiniteOutputError(TrainingError):
    """Validation or test outputs became NaN/inf (non-finite weights)."""


class MedliteModule(pl.LightningModule):
    """Shared training logic; subclasses per paradigm override the class attributes below."""

    paradigm = "base"
    #: fraction of training steps spent warming the learning rate up when ``scheduler.warmup`` is null
    default_warmup = 0.0
    #: parameter-name parts (besides every 1-D parameter: norms and biases) that get no weight decay
    no_decay_names: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module | None = None,
        task: Task | dict | None = None,
        optim: dict | None = None,
        scheduler: dict | None = None,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | Sequence[float] | None = None,
        loss_terms: Sequence[LossTerm] = (),
        task_loss_weight: float = 1.0,
        log_prefix: str = "",
        model_spec: dict | None = None,
    ) -> None:
        """``model=None`` with ``model_spec``, ``task`` as a dict and ``class_weights`` as a list
        is how ``load_from_checkpoint`` calls it, with the hyperparameters saved below."""
        super().__init__()
        if model is None:
            model = _rebuild(model_spec)
        else:
            model_spec = model_spec or _spec_of(model)
        if isinstance(task, dict):
            task = get_task(task["type"], task["labels"])
        if task is None or optim is None:
            raise ConfigError(f"{type(self).__name__} needs a task and optimiser settings")
        if class_weights is not None and not isinstance(class_weights, torch.Tensor):
            class_weights = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
        hparams = _hyperparameters(task, class_weights, model_spec)
        hparams.update(
            optim=_plain(optim),
            scheduler=_plain(scheduler) if scheduler else None,
            label_smoothing=float(label_smoothing),
            task_loss_weight=float(task_loss_weight),
            log_prefix=log_prefix,
        )
        # logger=False: the run's config is logged already; these are for load_from_checkpoint
        self.save_hyperparameters(hparams, logger=False)
        self.model = model
        self.task = task
        self.optim_cfg = dict(optim)
        self.sched_cfg = dict(scheduler or {"name": "none"})
        self.label_smoothing = float(label_smoothing)
        #: loss weights per class (``loss.class_weights``); a plain tensor, not in checkpoints
        self.class_weights = class_weights
        self.loss_terms = nn.ModuleList(loss_terms)
        #: weight of the task loss next to the extra terms (``w_ce`` in distillation)
        self.task_loss_weight = float(task_loss_weight)
        #: metric-name prefix of this training phase ("" for ordinary training, "kd/" ...), so the
        #: phases of one compressed run keep separate curves in the same logger
        self.log_prefix = log_prefix
        self.metrics: dict[str, dict[str, float]] = {}
        self._scores: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    # ------------------------------------------------------------------ forward and losses
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        targets = self.task.targets(y)
        loss = self.task.loss(logits, targets, self.label_smoothing, self.class_weights)
        if self.loss_terms:
            self._log("train/loss_task", loss, on_step=False, on_epoch=True, batch_size=len(x))
            loss = self.task_loss_weight * loss
        for term in self.loss_terms:
            extra = term(self, x, logits, targets)
            self._log(
                f"train/loss_{term.name}", extra, on_step=False, on_epoch=True, batch_size=len(x)
            )
            loss = loss + extra
        self._log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def _log(self, name: str, value, **kwargs) -> None:
        self.log(self.log_prefix + name, value, **kwargs)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        x, y = batch
        logits = self(x)
        self._check_finite(split, logits)
        loss = self.task.loss(logits, self.task.targets(y), class_weights=self.class_weights)
        self._log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        self._scores[split].append(
            (y.detach().cpu(), self.task.eval_outputs(logits.float()).detach().cpu())
        )

    def _check_finite(self, split: str, logits: torch.Tensor) -> None:
        """The training-loss guard (NaNGuard) sees the loss before a step; weights that step
        turns non-finite (e.g. an epoch's last) first show here, as NaN/inf outputs: stop with
        one message before any metric or checkpoint sees them."""
        bad = int(logits.numel() - torch.isfinite(logits).sum())
        if bad:
            epoch = self.current_epoch if self._trainer is not None else "?"
            raise NonFiniteOutputError(
                f"the model's {split} outputs are NaN/inf ({bad} of {logits.numel()} values in a "
                f"batch) at epoch {epoch}: its weights became non-finite. Training stopped; "
                "checkpoints saved before this point are kept. Try a lower optim.lr, gradient "
                "clipping (trainer.gradient_clip_val=1.0) or fp32 precision."
            )

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ------------------------------------------------------------------ epoch metrics
    def _gather(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        pairs, self._scores[split] = self._scores[split], []
        y = torch.cat([p[0] for p in pairs])
        s = torch.cat([p[1] for p in pairs])
        if self._trainer is not None and self._trainer.world_size > 1:
            y = self.all_gather(y).flatten(0, 1)
            s = self.all_gather(s).flatten(0, 1)
        return y.numpy(), s.numpy()

    def _epoch_metrics(self, split: str) -> None:
        if not self._scores[split]:
            return
        y, s = self._gather(split)
        metrics = self.task.metrics(y, s)
        self.metrics[split] = metrics
        monitored = self.task.monitor_metric
        for name, value in metrics.items():
            self._log(f"{split}/{name}", value, prog_bar=split == "val" and name == monitored)

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test")

    # ------------------------------------------------------------------ optimisation
    def is_no_decay(self, name: str, param: nn.Parameter) -> bool:
        if param.ndim <= 1:
            return True
        parts = name.split(".")
        return any(key in parts for key in self.no_decay_names)

    def param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        # trainable parts of loss terms (feature-distillation adapters) train with the model
        named = [*self.model.named_parameters(), *self.loss_terms.named_parameters()]
        for name, p in named:
            if p.requires_grad:
                (no_decay if self.is_no_decay(name, p) else decay).append(p)
        wd = float(self.optim_cfg.get("weight_decay", 0.0))
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    def warmup_fraction(self) -> float:
        warmup = self.sched_cfg.get("warmup")
        return self.default_warmup if warmup is None else float(warmup)

    def configure_optimizers(self):
        kwargs = {k: v for k, v in self.optim_cfg.items() if not k.startswith("_")}
        optimizer = hydra.utils.get_class(self.optim_cfg["_target_"])(self.param_groups(), **kwargs)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = lr_factor(self.sched_cfg, total, self.warmup_fraction())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _plain(settings) -> dict:
    """A settings mapping (dict or DictConfig) as a plain dict."""
    if OmegaConf.is_config(settings):
        return OmegaConf.to_container(settings, resolve=True)
    return dict(settings)


def _spec_of(model: nn.Module) -> dict | None:
    """The ``medlite_spec`` :func:`medlite.build.build_model` stamped on ``model``, or None when
    the network has since been pruned, factorised or quantised (its config no longer builds it)."""
    from medlite.build import network_fingerprint

    spec = getattr(model, "medlite_spec", None)
    if not isinstance(spec, dict) or spec.get("fingerprint") != network_fingerprint(model):
        return None
    return spec


def _rebuild(spec: dict | None) -> nn.Module:
    """The network of a checkpoint's ``model_spec`` (``load_from_checkpoint``)."""
    if not spec:
        raise ConfigError(
            "this checkpoint can't rebuild its network from a config (no model_spec: it was "
            "pruned, factorised or quantised during training, or saved before medlite kept "
            "one): load the run's compressed/model.pt with "
            "medlite.compress.structure.load_compressed"
        )
    from medlite.build import rebuild_model

    return rebuild_model(spec["config"], spec["num_classes"], spec["in_chans"], spec["img_size"])


def _hyperparameters(
    task: Task, class_weights: torch.Tensor | None, model_spec: dict | None
) -> dict:
    """The constructor arguments a checkpoint keeps that need converting to plain containers
    (loadable with ``weights_only=True``). Loss terms (a distillation teacher) are not kept: a
    loaded module evaluates and fine-tunes on the task loss alone."""
    return {
        "task": {"type": task.type, "labels": list(task.labels)},
        "class_weights": None if class_weights is None else class_weights.tolist(),
        "model_spec": model_spec,
    }


class _LRFactor:
    """Multiplier of the base learning rate at a given step (a picklable LambdaLR function)."""

    def __init__(
        self,
        name: str,
        total: int,
        warmup_steps: int,
        min_ratio: float,
        milestones: list[int],
        gamma: float,
    ):
        self.name, self.total, self.warmup_steps = name, total, warmup_steps
        self.min_ratio, self.milestones, self.gamma = min_ratio, milestones, gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.total - self.warmup_steps)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (
                1 + math.cos(math.pi * min(1.0, progress))
            )
        if self.name == "multistep":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


def lr_factor(cfg: dict, total_steps: int, warmup: float) -> _LRFactor:
    """Build the step-wise schedule: cosine, multistep (milestones as fractions of training) or none."""
    name = cfg.get("name", "none")
    if name not in ("cosine", "multistep", "none"):
        raise ConfigError(f"scheduler.name must be cosine, multistep or none, got {name!r}")
    milestones = [int(float(m) * total_steps) for m in cfg.get("milestones", [])]
    return _LRFactor(
        name,
        total_steps,
        int(round(warmup * total_steps)),
        float(cfg.get("min_lr_ratio", 0.0)),
        milestones,
        float(cfg.get("gamma", 0.1)),
    )
