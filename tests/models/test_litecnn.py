"""LiteCNN at every MedMNIST size and channel count, the size-aware stem, and the model factory
(registry first, timm fallback, helpful errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import medlite.models
from medlite.errors import ConfigError
from medlite.models import count_parameters, create_model, get_entry, list_models
from medlite.models.cnn.litecnn import LiteCNN, stem_stride_for

SIZES = (28, 64, 128, 224)


CONF_KWARGS = OmegaConf.to_container(
    OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / "litecnn.yaml").kwargs
)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", SIZES)
def test_litecnn_forward_backward(size, in_chans):
    torch.manual_seed(0)
    model = create_model("litecnn", num_classes=5, in_chans=in_chans, img_size=size)
    assert isinstance(model, LiteCNN)
    assert model.stem_stride == stem_stride_for(size)
    assert model.stem[0].in_channels == in_chans

    model.train()
    x = torch.randn(2, in_chans, size, size)
    out = model(x)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    assert torch.isfinite(out).all()

    first = model.stem(x)
    assert 28 <= first.shape[-1] <= 56 and first.shape[-2] == first.shape[-1]
    assert model.forward_features(x).shape[1] == model.num_features

    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)  # eval mode is deterministic (dropout off, BN running stats)


@pytest.mark.parametrize("size", SIZES)
def test_stem_stride_for(size):
    stride = stem_stride_for(size)
    assert stride & (stride - 1) == 0  # a power of two
    assert 28 <= size // stride <= 56
    assert size // (stride * 2) < 28  # the largest such stride: no more downsampling than needed


def test_stem_stride_values():
    assert [stem_stride_for(s) for s in SIZES] == [1, 2, 4, 8]
    assert stem_stride_for(32) == 1 and stem_stride_for(56) == 2 and stem_stride_for(512) == 16


def test_litecnn_with_shipped_config_kwargs():
    """conf/model/litecnn.yaml's narrower widths build, run, and give a smaller model."""
    small = create_model("litecnn", num_classes=2, in_chans=1, img_size=64, **CONF_KWARGS)
    default = create_model("litecnn", num_classes=2, in_chans=1, img_size=64)
    assert count_parameters(small) < count_parameters(default)
    assert small(torch.randn(2, 1, 64, 64)).shape == (2, 2)
    assert small.num_features == CONF_KWARGS["head_dim"]


def test_litecnn_explicit_stem_stride_and_bad_widths():
    model = create_model("litecnn", num_classes=3, in_chans=1, img_size=128, stem_stride=2)
    assert model.stem_stride == 2
    x = torch.randn(2, 1, 128, 128)
    assert model.stem(x).shape[-1] == 64 and model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="widths"):
        create_model("litecnn", num_classes=3, widths=(8, 16), depths=(1, 1))


def test_registry_entry():
    entry = medlite.models.get_entry("litecnn")
    assert entry is not None and entry.paradigm == "cnn" and entry.min_size == 28
    assert "litecnn" in list_models()
    assert get_entry("resnet18") is None  # timm models are not in medlite's own registry


def test_litecnn_refuses_pretrained_and_too_small_inputs():
    with pytest.raises(ConfigError, match="pretrained"):
        create_model("litecnn", num_classes=2, pretrained=True)
    with pytest.raises(ConfigError, match="at least 28"):
        create_model("litecnn", num_classes=2, img_size=16)


def test_timm_fallback_resnet18():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, in_chans=1, img_size=28)
    assert type(model).__module__.startswith("timm.")
    assert model.conv1.in_channels == 1
    out = model.eval()(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("typo", "suggestion"), [("litecnnn", "litecnn"), ("resnet_18", "resnet18")]
)
def test_unknown_model_suggests_close_name(typo, suggestion):
    with pytest.raises(ConfigError, match="unknown model") as err:
        create_model(typo, num_classes=2)
    message = str(err.value)
    assert "Did you mean" in message
    assert suggestion in message.split("Did you mean", 1)[1].split("?", 1)[0]


def test_unknown_model_without_close_name():
    with pytest.raises(ConfigError, match="unknown model") as err:
        create_model("zzqqxx-not-a-model", num_classes=2)
    assert "Did you mean" not in str(err.value)
    assert "litecnn" in str(err.value)  # the message lists medlite's own models
