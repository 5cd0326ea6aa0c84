"""Every config file composes, and what it describes can be built."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from medlite import config as config_checks
from medlite.build import build_datamodule, build_model, model_dims
from medlite.compress import build_steps
from medlite.errors import ConfigError
from medlite.training import instantiate_group
from tests.helpers import CONF_DIR, make_cfg

GROUPS = [
    "data",
    "model",
    "teacher",
    "compress",
    "optim",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
    "debug",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert _options(group), f"conf/{group} is empty"


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(group: str, option: str, tmp_path) -> None:
    override = f"{group}={option}"
    cfg = make_cfg(tmp_path, [override])
    node = cfg.teacher if group == "teacher" else cfg.model
    if group in ("model", "teacher") and node.get("task") == "segmentation":
        cfg = make_cfg(tmp_path, ["data=synthseg", override])  # on a dataset of its task
    elif group in ("model", "teacher") and model_dims(node) == 3:
        cfg = make_cfg(tmp_path, ["data=synthlesion3d", override])  # volumes
    needs = {  # options that are bases, or need the user's own setting
        "base": "no dataset chosen",
        "medmnist": "data.flag",
        "medmnist3d": "data.flag",
        "folder": "data.root",
        "folder_seg": "data.root",
    }
    if group == "data" and option in needs:
        with pytest.raises(ConfigError, match=needs[option]):
            config_checks.validate(cfg)
        return
    OmegaConf.resolve(cfg)  # every interpolation resolves
    config_checks.validate(cfg)
    dm = build_datamodule(cfg)
    assert dm.task.num_outputs >= 2
    if group in ("model", "experiment", "teacher"):
        node = cfg.teacher if group == "teacher" else cfg.model
        size = node.input_size or cfg.data.size
        model = build_model(node, dm.task.num_outputs, dm.in_chans, size)
        out = model(torch.zeros(2, dm.in_chans, *(size,) * dm.spatial_dims))
        spatial = (size, size) if dm.task.kind == "segmentation" else ()
        assert out.shape == (2, dm.task.num_outputs, *spatial)
    if group == "optim":
        opt = hydra.utils.get_class(cfg.optim._target_)(
            [torch.nn.Parameter(torch.zeros(1))],
            **{k: v for k, v in cfg.optim.items() if not k.startswith("_")},
        )
        assert opt.param_groups[0]["lr"] == cfg.optim.lr
    if group in ("trainer", "debug"):
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            pytest.skip("trainer=gpu needs a GPU")
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs
    if group == "compress":  # every recipe builds: known step kinds, valid parameters, order
        steps = build_steps(OmegaConf.to_container(cfg.compress.steps, resolve=True))
        assert [s.kind for s in steps] == [d["kind"] for d in cfg.compress.steps]
        assert cfg.compress.base in ("train", "scratch")
    if group in ("callbacks", "logger"):
        objs = instantiate_group(cfg[group])
        assert all(obj is not None for obj in objs)
        if group == "logger":
            assert any(type(o).__name__ == "CSVLogger" for o in objs), "CSV is always logged"


def test_model_recommended_lr_feeds_adamw_and_user_override_wins(tmp_path) -> None:
    assert make_cfg(tmp_path, []).optim.lr == 3e-3
    assert make_cfg(tmp_path, ["model=mobilevit"]).optim.lr == 1e-3
    assert make_cfg(tmp_path, ["model=mobilevit", "optim.lr=5e-4"]).optim.lr == 5e-4
