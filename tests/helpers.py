"""Compose medlite configs in-process (no subprocess start-up) for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from medlite.compress import RunContext

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def make_cfg(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def model_and_context(
    tmp_path: Path, overrides: list[str] = (), seed: int | None = None
) -> tuple[torch.nn.Module, RunContext]:
    """The configured model and the RunContext a compression step gets, on real config."""
    from medlite.pipeline import build_datamodule, build_model

    cfg = make_cfg(tmp_path, list(overrides))
    dm = build_datamodule(cfg)
    dm.setup()
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(cfg.model, dm.task.num_outputs, dm.in_chans, dm.preprocess.input_size)
    return model, RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path)
