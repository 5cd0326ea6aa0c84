"""Every model config (``conf/model/*.yaml``, found by glob: configs added later are included)
composes, builds through ``medlite.build.build_model`` and trains: a batch of 2 in train mode
gives finite ``(2, num_classes)`` logits and every trainable parameter a finite gradient.

Inputs go through the run's own preprocessing (the datamodule's ``Preprocess``), so a config with a
fixed ``input_size`` is tested on the path it trains on: ``data.size`` images resized to
``input_size``. The fast subset runs each config at ``data.size=28`` with 1 channel; the full grid
(``data.size`` 28/64/128/224 x 1/3 channels) is ``-m slow``.

No timm model in the zoo has parameters that stay unused in train mode (timm's distilled models,
LeViT, EfficientFormer, RepViT, average their two heads unless ``distilled_training`` is set), so
every parameter with ``requires_grad`` must get a gradient; a config that needs an exception must
add it to ``UNUSED_PARAMS`` with the reason.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf

from medlite import config as config_checks
from medlite.build import build_datamodule, build_model, model_dims
from medlite.models import count_parameters, get_entry
from medlite.models.registry import PARADIGMS
from tests.helpers import CONF_DIR, make_cfg

MODEL_DIR = CONF_DIR / "model"
# classification models (segmentation networks have their own grid: tests/models/test_seg_*.py)
CONFIGS = sorted(
    p.stem
    for p in MODEL_DIR.glob("*.yaml")
    if (OmegaConf.load(p).get("task") or "classification") == "classification"
)
# the 2D ones train here; volume (dims 3) models train in tests/models/test_volume_models.py
CONFIGS_2D = [n for n in CONFIGS if model_dims(OmegaConf.load(MODEL_DIR / f"{n}.yaml")) == 2]
SIZES = (28, 64, 128, 224)
CHANS = (1, 3)
# config name -> parameter-name regex of parameters allowed to get no gradient (and why).
UNUSED_PARAMS: dict[str, str] = {}
REQUIRED_KEYS = ("name", "arch", "paradigm", "input_size", "pretrained", "kwargs")


def _raw(name: str):
    return OmegaConf.load(MODEL_DIR / f"{name}.yaml")


def _run_config(name: str, data_size: int, in_chans: int, tmp_path, overrides=()) -> dict:
    """Compose ``model=<name>`` at this data size/channels, build, and train one batch."""
    cfg = make_cfg(
        tmp_path,
        [f"model={name}", f"data.size={data_size}", f"data.as_rgb={in_chans == 3}", *overrides],
    )
    config_checks.validate(cfg)
    dm = build_datamodule(cfg)  # reads no data: only the preprocessing the run would use
    assert dm.in_chans == in_chans
    input_size = cfg.model.input_size or data_size
    assert dm.preprocess.input_size == input_size
    num_classes = dm.task.num_outputs

    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes, in_chans, input_size)
    shape = (2, data_size, data_size) + ((3,) if in_chans == 3 else ())
    images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    x = torch.stack([dm.preprocess(image) for image in images])
    assert x.shape == (2, in_chans, input_size, input_size)

    model.train()
    out = model(x)
    assert isinstance(out, torch.Tensor), f"{name}: forward returned {type(out).__name__}"
    assert out.shape == (2, num_classes), f"{name}: output {tuple(out.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite logits"
    out.sum().backward()

    allowed = UNUSED_PARAMS.get(name)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{name}: no trainable parameters"
    no_grad = [
        n for n, p in trainable if p.grad is None and not (allowed and re.search(allowed, n))
    ]
    assert not no_grad, f"{name} @ {input_size}px: parameters without a gradient: {no_grad}"
    bad = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name} @ {input_size}px: non-finite gradients: {bad}"
    return {"cfg": cfg, "model": model, "input_size": input_size}


@pytest.mark.parametrize("name", CONFIGS_2D)
def test_config_trains_at_default_policy(name, tmp_path):
    """Fast subset: each config at data.size=28, 1 channel (fixed-size models see input_size)."""
    _run_config(name, 28, 1, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("in_chans", CHANS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", CONFIGS_2D)
def test_config_trains_at_every_size(name, size, in_chans, tmp_path):
    _run_config(name, size, in_chans, tmp_path)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_fields(name):
    raw = _raw(name)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    assert not missing, f"conf/model/{name}.yaml lacks {missing}"
    cfg = _raw(name)  # the file on its own: `${.variant}` resolves within it
    assert cfg.paradigm in PARADIGMS, f"{name}: paradigm {cfg.paradigm!r}"
    assert cfg.input_size is None or (isinstance(cfg.input_size, int) and cfg.input_size >= 28)
    assert cfg.pretrained is False, f"{name}: configs default to training from scratch"
    assert isinstance(cfg.arch, str) and "${" not in cfg.arch
    text = (MODEL_DIR / f"{name}.yaml").read_text()
    assert "size policy" in text.lower(), f"conf/model/{name}.yaml: no size-policy comment"
    if get_entry(cfg.arch) is not None:  # medlite's own architecture (registry), not timm
        return
    assert "pretrained_file" in raw, f"{name}: timm configs carry pretrained_file: null"
    assert timm.is_model(cfg.arch), f"{name}: {cfg.arch!r} is neither registered nor a timm model"
    if "variant" in raw:
        assert re.search(r"^arch: .*\$\{\.variant\}", text, re.M), f"{name}: arch ignores variant"
        assert _documented_variants(name), f"{name}: no '# Variants: model.variant=a|b' comment"


def make_cfg_model(name: str, overrides=()):
    """The resolved ``model`` node of ``model=<name>``."""
    cfg = make_cfg(
        Path(tempfile.gettempdir()) / "medlite-test-unused", [f"model={name}", *overrides]
    )
    OmegaConf.resolve(cfg)
    return cfg.model


def _documented_variants(name: str) -> list[str]:
    match = re.search(
        r"^# Variants: model\.variant=(\S+)", (MODEL_DIR / f"{name}.yaml").read_text(), re.M
    )
    return match.group(1).split("|") if match else []


@pytest.mark.parametrize("name", [n for n in CONFIGS if _documented_variants(n)])
def test_documented_variants_are_timm_models(name):
    raw = _raw(name)
    for variant in _documented_variants(name):
        raw.variant = variant
        assert timm.is_model(raw.arch), (
            f"{name}: model.variant={variant} gives unknown {raw.arch!r}"
        )


def test_zoo_covers_the_three_paradigms():
    paradigms: dict[str, list[str]] = {p: [] for p in PARADIGMS}
    for name in CONFIGS:  # the timm part of the zoo (medlite's own models are counted elsewhere)
        cfg = _raw(name)
        if get_entry(cfg.arch) is None:
            paradigms[cfg.paradigm].append(name)
    assert len(paradigms["cnn"]) >= 6, paradigms
    assert len(paradigms["transformer"]) >= 6, paradigms
    assert len(paradigms["linear"]) >= 2, paradigms
    assert {"mobilevit", "resnet18", "litecnn", "efficientvit"} <= set(CONFIGS)


def test_mobilevit_variant_override(tmp_path):
    """``model=mobilevit`` stays the headline; ``model.variant=xs`` swaps the timm variant."""
    assert make_cfg_model("mobilevit").arch == "mobilevit_xxs"
    cfg = make_cfg(tmp_path, ["model=mobilevit", "model.variant=xs"])
    assert cfg.model.arch == "mobilevit_xs" and cfg.model.name == "mobilevit"
    model = build_model(cfg.model, 2, 1, cfg.model.input_size)
    assert count_parameters(model) > count_parameters(
        build_model(make_cfg_model("mobilevit"), 2, 1, 64)
    )
    assert model.eval()(torch.zeros(2, 1, 64, 64)).shape == (2, 2)


def test_variant_with_leading_zero_stays_a_string(tmp_path):
    cfg = make_cfg(tmp_path, ["model=mobilenetv2", "model.variant=050"])
    assert cfg.model.arch == "mobilenetv2_050"


def test_resnets_keep_last_bn_nonzero():
    """FACTS: QAT on timm ResNets NaNs with zero-initialised last BNs; the configs turn it off."""
    for name in ("resnet18", "resnet50"):
        cfg = make_cfg_model(name)
        assert cfg.kwargs.zero_init_last is False
        block = build_model(cfg, 2, 1, 28).layer1[0]
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        assert last_bn.weight.abs().min() > 0
