"""Every segmentation model config (``conf/model/*.yaml`` with ``task: segmentation``, found by
glob: configs added later are included) composes on ``data=synthseg``, builds through
``medlite.build.build_model`` and trains: a batch of 2 in train mode gives finite
``(2, num_classes, H, W)`` logits at the input's size and every trainable parameter a finite
gradient.

Inputs go through the run's own preprocessing (the datamodule's ``Preprocess``). The fast subset
runs each config at 64 px with 1 channel; the full grid (64/128/256 px x 1/3 channels) is
``-m slow``. Plus one short end-to-end run of ``egeunet`` (the default segmentation model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medlite import config as config_checks
from medlite.build import build_datamodule, build_model
from medlite.errors import ConfigError
from medlite.models import create_model
from medlite.models.registry import PARADIGMS
from tests.helpers import CONF_DIR, make_cfg

MODEL_DIR = CONF_DIR / "model"
CONFIGS = sorted(
    p.stem for p in MODEL_DIR.glob("*.yaml") if OmegaConf.load(p).get("task") == "segmentation"
)
SIZES = (64, 128, 256)
CHANS = (1, 3)
# config name -> parameter-name regex of parameters allowed to get no gradient (and why).
UNUSED_PARAMS: dict[str, str] = {}


def _run_config(name: str, size: int, in_chans: int, tmp_path: Path, classes: int = 2) -> None:
    """Compose ``model=<name>`` on synthseg at this size/channels, build, and train one batch."""
    flag = "synthseg" if classes == 2 else "synthseg_multiclass"
    cfg = make_cfg(
        tmp_path,
        [
            "data=synthseg",
            f"data.flag={flag}",
            f"model={name}",
            f"data.size={size}",
            f"data.as_rgb={in_chans == 3}",
        ],
    )
    config_checks.validate(cfg)
    dm = build_datamodule(cfg)  # reads no data: only the preprocessing the run would use
    assert dm.task.kind == "segmentation" and dm.in_chans == in_chans
    side = dm.preprocess.input_size
    k = dm.task.num_outputs
    assert k == classes

    torch.manual_seed(0)
    model = build_model(cfg.model, k, in_chans, side)
    images = np.random.default_rng(0).integers(0, 256, size=(2, size, size), dtype=np.uint8)
    x = torch.stack([dm.preprocess(image) for image in images])
    assert x.shape == (2, in_chans, side, side)

    model.train()
    out = model(x)
    assert isinstance(out, torch.Tensor), f"{name}: forward returned {type(out).__name__}"
    assert out.shape == (2, k, side, side), f"{name}: output {tuple(out.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite logits"
    masks = torch.from_numpy(np.random.default_rng(1).integers(0, k, size=(2, side, side)))
    dm.task.loss(out, dm.task.targets(masks)).backward()  # the loss the run trains on

    allowed = UNUSED_PARAMS.get(name)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{name}: no trainable parameters"
    no_grad = [
        n for n, p in trainable if p.grad is None and not (allowed and re.search(allowed, n))
    ]
    assert not no_grad, f"{name} @ {side}px: parameters without a gradient: {no_grad}"
    bad = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name} @ {side}px: non-finite gradients: {bad}"


def test_the_lightweight_segmentation_zoo_is_there():
    mine = {"egeunet", "unext", "unet_mobilenetv3", "unet_mobilevit", "swinunetr"}
    assert mine <= set(CONFIGS), sorted(mine - set(CONFIGS))
    paradigms = {OmegaConf.load(MODEL_DIR / f"{n}.yaml").paradigm for n in CONFIGS}
    assert {"cnn", "transformer"} <= paradigms


@pytest.mark.parametrize("name", CONFIGS)
def test_seg_config_fields(name):
    raw = OmegaConf.load(MODEL_DIR / f"{name}.yaml")
    for key in ("name", "arch", "paradigm", "task", "input_size", "pretrained", "kwargs"):
        assert key in raw, f"conf/model/{name}.yaml lacks {key}"
    assert raw.name == name and raw.paradigm in PARADIGMS
    assert raw.pretrained is False, f"{name}: configs train from scratch"


@pytest.mark.parametrize("name", CONFIGS)
def test_seg_config_trains_at_64px(name, tmp_path):
    """Fast subset: each segmentation config at 64 px, 1 channel."""
    _run_config(name, 64, 1, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("in_chans", CHANS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", CONFIGS)
def test_seg_config_trains_at_every_size(name, size, in_chans, tmp_path):
    _run_config(name, size, in_chans, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_seg_config_trains_multiclass(name, tmp_path):
    _run_config(name, 64, 3, tmp_path, classes=3)


@pytest.mark.parametrize("arch", ["egeunet", "unext", "unet_mobilenetv3", "swinunetr"])
def test_indivisible_size_is_a_config_error_naming_sizes_that_work(arch):
    with pytest.raises(ConfigError, match=r"divisible by 32 \(e\.g\. 64, 128, 256\)"):
        create_model(arch, num_classes=2, in_chans=1, img_size=80)


def test_timm_unet_takes_other_encoders_and_rejects_unknown_ones():
    model = create_model(
        "unet_mobilenetv3", num_classes=2, in_chans=1, img_size=64, encoder="lcnet_050"
    )
    assert model.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(ConfigError, match="not a timm model"):
        create_model("unet_mobilevit", num_classes=2, in_chans=1, img_size=64, encoder="nope_x")


def test_egeunet_end_to_end_on_synthseg(tmp_path):
    """egeunet, the default segmentation model, through the whole pipeline for one epoch."""
    from medlite.pipeline import run

    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        [
            "data=synthseg",
            "debug=limit",
            "trainer.max_epochs=1",
            "max_phase_epochs=1",
            "callbacks=none",
            "profile.enabled=false",
        ],
    )
    assert cfg.model.name == "egeunet"  # synthseg's default model
    run(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "ok"
    assert res["model"]["paradigm"] == "cnn" and res["model"]["params"] < 100_000
    assert 0.0 <= res["test"]["dice"] <= 1.0


def test_written_out_norms_match_torch():
    """egeunet's GroupNorm2d / ChannelNorm (written out so that ONNX Runtime can int8 them)."""
    from medlite.models.seg._layers import ChannelNorm, GroupNorm2d

    torch.manual_seed(0)
    x = torch.randn(3, 16, 8, 8) * 3 + 1
    ours, ref = GroupNorm2d(4, 16), torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
        ref.weight.copy_(ours.weight), ref.bias.copy_(ours.bias)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    norm = ChannelNorm(16)
    expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (16,), eps=1e-6)
    torch.testing.assert_close(norm(x), expected.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_egeunet_quantises_to_int8(tmp_path):
    """compress=ptq on the default segmentation model (nn.GroupNorm's ONNX form made ORT's static
    quantiser fail; egeunet writes its norms out)."""
    from medlite.pipeline import run

    out = tmp_path / "run"
    run(make_cfg(out, ["sweep=taxonomy_seg_smoke", "model=egeunet", "compress=ptq"]))
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "ok" and 0.0 <= res["test"]["dice"] <= 1.0
