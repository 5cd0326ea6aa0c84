"""The plug-in points a compression technique uses, designed into the pipeline from the start.

A compression recipe is a list of :class:`CompressionStep` objects (``cfg.compress.steps``). The
pipeline calls, in order: ``prepare`` (before training: prune, factorise, insert fake-quant),
collects ``loss_terms`` (added to the task loss: distillation) and ``callbacks`` (iterative
pruning schedules), trains, then calls ``finalize`` (after training: int8 conversion) and
re-tests the returned model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

if TYPE_CHECKING:
    from medlite.modules.base import MedliteModule


@dataclass
class RunContext:
    """What a step may need besides the model: the run's config, data, folder and teacher."""

    cfg: DictConfig
    datamodule: pl.LightningDataModule
    output_dir: Path
    teacher: nn.Module | None = None


class LossTerm(nn.Module):
    """An extra training loss; a module so that what it holds (a frozen teacher) follows the device."""

    name = "extra"

    def forward(
        self, module: MedliteModule, x: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


class CompressionStep:
    """Base step: every hook is a no-op, so a step overrides only what it changes."""

    name = "step"

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model

    def loss_terms(self) -> list[LossTerm]:
        return []

    def callbacks(self) -> list[pl.Callback]:
        return []

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module | None:
        """Return a new model to re-test (e.g. int8), or None when training's model is final."""
        return None
