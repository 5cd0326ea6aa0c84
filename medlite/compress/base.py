"""The plug-in points a compression technique uses.

A compression recipe (``conf/compress/<name>.yaml``) is an ordered list of steps. The pipeline
first trains the model as usual (or loads ``compress.base_ckpt``; ``compress.base: scratch``
skips this, e.g. for distillation from scratch) and measures it: the "before" row. Then, for each
step in order, it calls ``prepare`` (prune, factorise, insert fake-quant, convert to int8), trains
for ``step.epochs`` epochs with the step's ``loss_terms`` and ``callbacks`` when that is > 0
(fine-tuning, distillation), calls ``finalize`` (e.g. QAT -> int8) and measures the result: one
row per step in the before/after table. Steps marked ``terminal`` return a model that cannot be
trained further (an int8 runtime session), so they must come last.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

if TYPE_CHECKING:
    from medlite.modules.base import MedliteModule


@dataclass
class RunContext:
    """What a step may need besides the model: config, data, run folder, teacher, the base model."""

    cfg: DictConfig
    datamodule: pl.LightningDataModule
    output_dir: Path
    teacher: nn.Module | None = None
    #: frozen copy of the trained model before the first step (e.g. KD from the unpruned model)
    base_model: nn.Module | None = None
    #: free-form notes steps leave for later steps (e.g. the fp32 model a quantizer started from)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str | None:
        """The configured model name, for messages (None for a bare context in a script)."""
        arch = OmegaConf.select(self.cfg, "model.arch", default=None) if self.cfg else None
        return None if arch is None else str(arch)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A real training batch (first ``batch_size`` images), for tracing and dependency graphs."""
        x, _ = next(iter(self.datamodule.train_dataloader()))
        return x[:batch_size]

    def capped_batches(self, n_batches: int) -> int:
        """``n_batches`` of a step's own loop (pruning recovery, calibration), at most the run's
        ``max_step_batches`` (set by smoke and debug configs to keep recipes quick)."""
        cap = OmegaConf.select(self.cfg, "max_step_batches", default=None) if self.cfg else None
        return int(n_batches) if cap is None else min(int(n_batches), max(1, int(cap)))

    def calibration_batches(self, n_batches: int) -> list[torch.Tensor]:
        """Input batches from the training split, without augmentation, for calibration."""
        n_batches = self.capped_batches(n_batches)
        loader = self.datamodule.calibration_dataloader()
        out = []
        for x, _ in loader:
            out.append(x)
            if len(out) >= n_batches:
                break
        return out


class LossTerm(nn.Module):
    """An extra training loss; a module so that what it holds (a frozen teacher, an adapter) follows
    the device and, when trainable, joins the optimiser."""

    name = "extra"

    def forward(
        self, module: MedliteModule, x: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


class CompressionStep:
    """Base step: every hook is a no-op, so a step overrides only what it changes.

    ``epochs`` and ``lr`` configure the training phase that follows ``prepare`` (0 epochs: none;
    ``lr`` None: the run's optimiser learning rate). What the recipe runner reads from a step is
    declared here: ``terminal``, ``needs_teacher``, ``task_loss_weight``, ``extra_stages`` and
    :meth:`artefact`.
    """

    kind = "step"  # set by @register_step
    #: the step returns a model that can't be changed or trained further (an int8 session)
    terminal = False
    #: the run must provide the ``teacher`` group's trained network (``RunContext.teacher``)
    needs_teacher = False
    #: weight of the task loss next to the step's own loss terms (``w_ce`` in distillation)
    task_loss_weight = 1.0

    def __init__(self, epochs: int = 0, lr: float | None = None) -> None:
        self.epochs = int(epochs)
        self.lr = None if lr is None else float(lr)
        #: facts worth recording in results.json (sparsity, ranks, skipped layers...)
        self.report: dict[str, Any] = {}
        #: other models the step made, measured as their own rows: ``{name: model}`` (e.g. the
        #: fp32 network on the int8 runtime)
        self.extra_stages: dict[str, nn.Module] = {}

    @property
    def name(self) -> str:
        return self.kind

    def check(self, model: nn.Module, example: torch.Tensor) -> None:
        """Called on the untrained model before any training: raise a ConfigError now for a model
        this step can't handle (e.g. one the int8 exporter can't trace), not after an hour."""

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model

    def loss_terms(self) -> list[LossTerm]:
        return []

    def callbacks(self) -> list[pl.Callback]:
        return []

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model

    def artefact(self, model: nn.Module) -> Path | None:
        """The file holding the step's final model when the step wrote one itself (an int8
        ONNX file); None: the runner saves the module."""
        return None


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off (a teacher or a reference that must not change)."""
    clone = copy.deepcopy(model)
    return clone.eval().requires_grad_(False)
