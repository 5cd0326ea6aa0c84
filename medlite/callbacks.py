"""Callbacks medlite always adds: stop cleanly on a non-finite loss, keeping the last good checkpoint."""

from __future__ import annotations

import math

import pytorch_lightning as pl

from medlite.errors import TrainingError


class NonFiniteLossError(TrainingError):
    """The training loss became NaN/inf; checkpoints written before it are kept."""


class NaNGuard(pl.Callback):
    """Raise (instead of silently training on) a NaN/inf loss, before any checkpoint can save it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"training loss became {float(loss)} at epoch {trainer.current_epoch}, step {trainer.global_step}. "
                "Training stopped; checkpoints saved before this point are kept. "
                "Try a lower optim.lr, gradient clipping (trainer.gradient_clip_val=1.0) or fp32 precision."
            )
