"""Pretrained weights for timm models (``medlite.models.pretrained``): local files adapted to
medlite's channels/classes/input size, the local hub cache, and failing fast without network."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from medlite.errors import ConfigError
from medlite.models import create_model
from medlite.models import pretrained as pt
from tests.helpers import CONF_DIR


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No network and empty weight caches; any hub download attempt is recorded and fails."""
    import huggingface_hub
    import timm.models._hub as timm_hub

    def refuse(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known (network disabled by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    downloads: list = []

    def download(*args, **kwargs):
        downloads.append((args, kwargs))
        raise OSError("download attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(timm_hub, "hf_hub_download", download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return downloads


def _randomised(arch: str, **kw) -> torch.nn.Module:
    """timm's model as ImageNet weights would come: 3 channels, 1000 classes, non-default values."""
    torch.manual_seed(1)
    model = timm.create_model(arch, pretrained=False, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
    return model


def _save(model: torch.nn.Module, path, fmt: str):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def _as_tuple(names) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


@pytest.mark.parametrize(
    ("arch", "img_size", "fmt"),
    [
        ("lcnet_050", 64, "pth"),
        ("lcnet_050", 64, "safetensors"),
        ("resnet18", 28, "pth"),
        # attention biases sized by the token grid: 224 px tables resized to the 128 px grid
        ("levit_128s", 128, "safetensors"),
    ],
)
def test_local_file_adapted_to_one_channel_and_new_classes(tmp_path, arch, img_size, fmt):
    src = _randomised(arch)
    path = _save(src, tmp_path / f"weights.{fmt}", fmt)
    saved = src.state_dict()

    model = create_model(
        arch, num_classes=2, in_chans=1, img_size=img_size, pretrained=True, pretrained_file=path
    )
    got = model.state_dict()
    first = _as_tuple(model.pretrained_cfg["first_conv"])
    heads = _as_tuple(model.pretrained_cfg["classifier"])
    for conv in first:  # timm's rule: RGB kernels summed for a grey input
        key = f"{conv}.weight"
        assert got[key].shape[1] == 1
        torch.testing.assert_close(got[key], saved[key].sum(dim=1, keepdim=True))
    for head in heads:  # a fresh classifier of the right shape, not a slice of the saved one
        w = got[f"{head}.weight"]
        assert w.shape[0] == 2 and w.shape[1:] == saved[f"{head}.weight"].shape[1:]
        assert not torch.equal(w, saved[f"{head}.weight"][:2])
        assert torch.isfinite(w).all()
    skip = {f"{c}.weight" for c in first} | {f"{h}.{s}" for h in heads for s in ("weight", "bias")}
    resized = [k for k in got if k not in skip and got[k].shape != saved[k].shape]
    assert all(k.endswith("attention_biases") for k in resized), resized
    assert bool(resized) == arch.startswith("levit")
    differ = [
        k for k in got if k not in skip and k not in resized and not torch.equal(got[k], saved[k])
    ]
    assert not differ, f"backbone tensors not loaded as saved: {differ[:5]}"

    out = model.eval()(torch.randn(2, 1, img_size, img_size))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    assert model.pretrained_cfg.get("state_dict") is None  # no second reference to the tensors


def test_matching_classifier_and_channels_load_unchanged(tmp_path):
    """Weights of a medlite run (1 channel, 2 classes; here inside a Lightning checkpoint) load
    as they are, classifier included."""
    src = _randomised("lcnet_050", num_classes=2, in_chans=1)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "run.ckpt")
    model = create_model(
        "lcnet_050",
        2,
        in_chans=1,
        img_size=64,
        pretrained=True,
        pretrained_file=tmp_path / "run.ckpt",
    )
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_three_channel_load_keeps_rgb_kernels(tmp_path):
    src = _randomised("lcnet_050")
    path = _save(src, tmp_path / "w.pth", "pth")
    model = create_model(
        "lcnet_050", 5, in_chans=3, img_size=64, pretrained=True, pretrained_file=path
    )
    assert torch.equal(model.conv_stem.weight, src.conv_stem.weight)
    assert model.classifier.weight.shape[0] == 5


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(
        ConfigError, match=r"model\.pretrained_file=.*nope\.safetensors.*does not exist"
    ):
        create_model("lcnet_050", 2, img_size=64, pretrained=True, pretrained_file=missing)
    with pytest.raises(ConfigError, match="is a directory"):
        create_model("lcnet_050", 2, img_size=64, pretrained=True, pretrained_file=tmp_path)


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read weights"):
        create_model("lcnet_050", 2, img_size=64, pretrained=True, pretrained_file=bad)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = _save(_randomised("lcnet_050"), tmp_path / "lcnet.pth", "pth")
    with pytest.raises(ConfigError, match=r"do not fit timm's 'lcnet_075'.*another shape"):
        create_model("lcnet_075", 2, img_size=64, pretrained=True, pretrained_file=path)
    with pytest.raises(ConfigError, match=r"do not fit timm's 'resnet18'.*missing.*unexpected"):
        create_model("resnet18", 2, img_size=28, pretrained=True, pretrained_file=path)


def test_file_without_pretrained_flag_and_own_models(tmp_path):
    path = _save(_randomised("lcnet_050"), tmp_path / "w.pth", "pth")
    with pytest.raises(ConfigError, match="model.pretrained=false"):
        create_model("lcnet_050", 2, img_size=64, pretrained_file=path)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_model("litecnn", 2, pretrained=True)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_model("litecnn", 2, pretrained=True, pretrained_file=path)


def test_hub_weights_without_network_fail_fast(no_network):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        create_model("lcnet_050", 2, img_size=64, pretrained=True)
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert "model.pretrained_file=" in message and "cannot be reached" in message
    assert "timm/lcnet_050" in message  # names what to download
    assert not no_network, "a download was attempted without network"


def test_hub_weights_when_dns_hangs(no_network, monkeypatch):
    """A DNS lookup that never answers does not hold the run: the probe gives up after its timeout."""
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(60)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(pt, "PROBE_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match="cannot be reached within 0.5 s"):
            create_model("lcnet_050", 2, img_size=64, pretrained=True)
    finally:
        release.set()
    assert time.perf_counter() - start < 10
    assert not no_network


def test_hub_offline_env_fails_at_once(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        create_model("levit_128s", 2, img_size=128, pretrained=True)
    assert time.perf_counter() - start < 10
    assert not no_network


def test_cached_hub_weights_load_offline(no_network, tmp_path):
    """Weights already in the Hugging Face cache are used without any network access."""
    import huggingface_hub

    hf_id = timm.models.get_pretrained_cfg("lcnet_050").hf_hub_id
    repo = huggingface_hub.constants.HF_HUB_CACHE + "/models--" + hf_id.replace("/", "--")
    snapshot = tmp_path / "hf" / ("models--" + hf_id.replace("/", "--")) / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    assert str(snapshot).startswith(repo)
    src = _randomised("lcnet_050")
    _save(src, snapshot / "model.safetensors", "safetensors")

    model = create_model("lcnet_050", 3, in_chans=1, img_size=64, pretrained=True)
    assert torch.equal(model.blocks[2][0].conv_dw.weight, src.blocks[2][0].conv_dw.weight)
    torch.testing.assert_close(model.conv_stem.weight, src.conv_stem.weight.sum(1, keepdim=True))
    assert model.classifier.weight.shape[0] == 3
    assert not no_network


def test_arch_without_pretrained_weights(no_network):
    assert timm.is_model("efficientnet_b0_gn") and not timm.list_models(
        "efficientnet_b0_gn", pretrained=True
    )
    with pytest.raises(
        ConfigError, match="timm has no pretrained weights for 'efficientnet_b0_gn'"
    ):
        create_model("efficientnet_b0_gn", 2, img_size=64, pretrained=True)
    assert not no_network


def test_build_model_forwards_pretrained_file(tmp_path, no_network):
    from omegaconf import OmegaConf

    from medlite.build import build_model

    src = _randomised("lcnet_050")
    path = _save(src, tmp_path / "w.safetensors", "safetensors")
    cfg = OmegaConf.load(CONF_DIR / "model" / "lcnet.yaml")
    cfg.pretrained, cfg.pretrained_file = True, str(path)
    model = build_model(cfg, 2, 1, 64)
    assert torch.equal(model.blocks[2][0].conv_dw.weight, src.blocks[2][0].conv_dw.weight)
