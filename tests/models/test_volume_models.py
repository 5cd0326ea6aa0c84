"""Volume (3D) classifiers: every registered dims=3 model trains at 28^3 and 64^3, its config's
stated size is right, the ACS/2.5D converters keep the 2D net and compute what they claim, and
the linear models' scans are counted in the efficiency profile.

The fast tests shrink the costly models through their own kwargs (``SMALL``); the configs'
defaults at both sizes and with 3 channels are ``-m slow``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medlite import efficiency
from medlite.models import count_parameters, create_model, get_entry, list_models
from medlite.models.linear.vim import scan_macs
from medlite.models.volume.acs import ACSConv, SliceConv, convert_2d_to_3d, split_three
from medlite.models.volume.mobilevit3d import fold_patches, unfold_patches
from medlite.models.volume.trimamba3d import TriScanMixer, tri_merge, tri_scan

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
PARADIGM = {
    "resnet18_3d": "cnn",
    "resnet18_acs": "cnn",
    "resnet18_25d": "cnn",
    "mobilenetv2_3d": "cnn",
    "vit3d": "transformer",
    "mobilevit3d": "transformer",
    "vim3d": "linear",
    "trimamba3d": "linear",
}
MODELS = tuple(PARADIGM)
# kwargs that keep the fast tests fast: same code paths, fewer channels/layers or a coarser stem
SMALL = {
    "resnet18_3d": {"widen_factor": 0.25},
    "resnet18_acs": {"stem_stride": 2},
    "resnet18_25d": {"stem_stride": 2},
    "vit3d": {"hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 4},
    "vim3d": {"embed_dim": 32, "depth": 2},
    "trimamba3d": {"embed_dim": 32, "depth": 2},
}


def _conf(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"))


def _build(name, size=28, in_chans=1, num_classes=3, **kw):
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=size, **kw)


def _train_step(model: nn.Module, size: int, in_chans: int = 1, num_classes: int = 3) -> None:
    model.train()
    out = model(torch.randn(2, in_chans, size, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


def test_registry_entries_and_configs():
    volume = {n for n in list_models() if get_entry(n).dims == 3}
    assert volume == set(MODELS)
    for name, paradigm in PARADIGM.items():
        entry = get_entry(name)
        assert (entry.paradigm, entry.task, entry.dims) == (paradigm, "classification", 3)
        conf = _conf(name)
        assert conf["name"] == conf["arch"] == name
        assert (conf["paradigm"], conf["dims"], conf["input_size"]) == (paradigm, 3, None)
        assert conf["pretrained"] is False and conf["pretrained_file"] is None
        assert "size policy" in (CONF_DIR / f"{name}.yaml").read_text().lower()
    counts = {p: sum(v == p for v in PARADIGM.values()) for p in ("cnn", "transformer", "linear")}
    assert min(counts.values()) >= 2, counts


@pytest.mark.parametrize("name", MODELS)
def test_config_states_its_parameter_count(name):
    """The header's 'X M params ... at 28^3' (1 channel, 2 classes) is right within 5%."""
    text = (CONF_DIR / f"{name}.yaml").read_text()
    stated = float(re.search(r"([\d.]+) M params", text).group(1)) * 1e6
    actual = count_parameters(_build(name, num_classes=2, **_conf(name)["kwargs"]))
    assert abs(actual - stated) <= 0.05 * stated, (name, actual, stated)


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name, size):
    _train_step(_build(name, size, **SMALL.get(name, {})), size)


@pytest.mark.parametrize("name", ["mobilenetv2_3d", "vim3d"])
def test_three_channels(name):
    _train_step(_build(name, 28, in_chans=3, **SMALL.get(name, {})), 28, in_chans=3)


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("name", MODELS)
def test_other_sides(name, size):
    with torch.inference_mode():
        out = _build(name, size, **SMALL.get(name, {})).eval()(torch.randn(1, 1, size, size, size))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("name", MODELS)
def test_config_defaults_train(name, size, in_chans):
    _train_step(_build(name, size, in_chans, **_conf(name)["kwargs"]), size, in_chans)


def test_size_policies():
    assert _build("vim3d", 28).num_tokens == 7**3 and _build("vim3d", 64).num_tokens == 8**3
    assert _build("trimamba3d", 48).grid == (6, 6, 6)
    vit = {s: _build("vit3d", s, **SMALL["vit3d"]) for s in (28, 48, 64)}
    assert [vit[s].patch_size for s in (28, 48, 64)] == [4, 6, 8]
    assert _build("vit3d", 30, **SMALL["vit3d"]).pad == (1, 1) * 3  # 30 -> padded to 32
    assert _build("mobilenetv2_3d", 28).stem_stride == 2
    assert _build("mobilenetv2_3d", 64).stem_stride == 4
    r28, r64 = _build("resnet18_3d", 28), _build("resnet18_3d", 64)
    assert r28.conv1.stride == (1, 1, 1) and r28.no_max_pool
    assert r64.conv1.stride == (2, 2, 2)


def test_vit3d_gives_raw_logits():
    model = _build("vit3d", 28, **SMALL["vit3d"])
    assert not any(isinstance(m, nn.Tanh) for m in model.modules())


# ---------------------------------------------------------------- ACS / 2.5D converters
@pytest.mark.parametrize("mode", ["acs", "2.5d"])
def test_converter_keeps_the_2d_parameters(mode):
    net = timm.create_model("resnet18", num_classes=3, in_chans=1, zero_init_last=False)
    params_2d = {id(p) for p in net.parameters()}
    n_2d = count_parameters(net)
    net3d = convert_2d_to_3d(net, mode)
    assert count_parameters(net3d) == n_2d
    assert {id(p) for p in net3d.parameters()} == params_2d  # the very same Parameters
    kinds = {type(m) for m in net3d.modules()}
    assert not kinds & {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d}
    assert (ACSConv if mode == "acs" else SliceConv) in kinds
    out = net3d(torch.randn(2, 1, 28, 28, 28))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("name", ["resnet18_acs", "resnet18_25d"])
def test_registered_conversions_match_their_2d_net(name):
    from medlite.models.volume.acs import resnet18_2d_for_volumes

    model = _build(name, 28)
    assert count_parameters(model) == count_parameters(resnet18_2d_for_volumes(3, 1, 28))
    assert not any(isinstance(m, nn.Conv2d | nn.BatchNorm2d) for m in model.modules())


def _acs_reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """ACS as one dense conv3d: each view's k x k kernel embedded in the middle plane of k^3."""
    w2, k, g = conv.weight, conv.kernel_size[0], conv.groups
    units = conv.out_channels if g == 1 else g
    per = 1 if g == 1 else conv.out_channels // g
    w3 = torch.zeros(*w2.shape[:2], k, k, k)
    start = 0
    for view, n in enumerate(split_three(units)):
        sl = slice(start * per, (start + n) * per)
        index = [sl, slice(None), slice(None), slice(None), slice(None)]
        index[2 + view] = k // 2
        w3[tuple(index)] = w2[sl]
        start += n
    p, s = conv.padding[0], conv.stride[0]
    return F.conv3d(x, w3, conv.bias, s, p, 1, g)


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "groups"),
    [(4, 8, 3, 1, 1), (4, 7, 3, 2, 1), (6, 6, 3, 1, 6), (6, 12, 5, 2, 3), (4, 8, 1, 2, 1)],
)
def test_acs_conv_is_three_orthogonal_views(cin, cout, k, stride, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)
    x = torch.randn(2, cin, 9, 10, 11)
    torch.testing.assert_close(ACSConv(conv)(x), _acs_reference(conv, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_conv_is_the_2d_conv_on_every_slice(axis):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, 1, 1)
    x = torch.randn(2, 3, 6, 7, 8)
    out = SliceConv(conv, axis)(x)
    for i in range(x.shape[2 + axis]):
        torch.testing.assert_close(
            out.select(2 + axis, i), conv(x.select(2 + axis, i)), atol=1e-5, rtol=1e-4
        )


def test_converter_keeps_batchnorm_statistics_and_refuses_unknown_2d_layers():
    bn = nn.BatchNorm2d(4)
    bn.running_mean.fill_(0.5)
    bn3 = convert_2d_to_3d(nn.Sequential(bn))[0]
    assert isinstance(bn3, nn.BatchNorm3d) and bn3.weight is bn.weight
    assert torch.equal(bn3.running_mean, bn.running_mean)
    with pytest.raises(TypeError, match="LPPool2d"):
        convert_2d_to_3d(nn.Sequential(nn.LPPool2d(2, 2)))
    with pytest.raises(ValueError, match="mode"):
        convert_2d_to_3d(nn.Sequential(), "3d")


# ---------------------------------------------------------------- token layouts
def test_tri_scan_orders_and_merge():
    d, h, w = 2, 3, 4
    u = torch.arange(d * h * w, dtype=torch.float32).reshape(1, 1, d, h, w)
    seqs = tri_scan(u)
    assert seqs.shape == (1, 6, 1, d * h * w)
    # each order makes a different axis the fastest-varying one: W, then D, then H
    assert seqs[0, 0, 0, 1] == u[0, 0, 0, 0, 1]
    assert seqs[0, 1, 0, 1] == u[0, 0, 1, 0, 0]
    assert seqs[0, 2, 0, 1] == u[0, 0, 0, 1, 0]
    torch.testing.assert_close(tri_merge(seqs, (d, h, w)), 6 * u.flatten(2))
    torch.testing.assert_close(tri_merge(tri_scan(u, False), (d, h, w)), 3 * u.flatten(2))


def test_trimamba_mixer_reaches_every_token():
    torch.manual_seed(0)
    grid = (3, 3, 3)
    mixer = TriScanMixer(8, grid, d_state=4)
    x = torch.randn(1, 27, 8, requires_grad=True)
    mixer(x)[0, 0].sum().backward()  # the first token in every forward order
    reach = x.grad[0].abs().sum(-1)
    assert (reach > 0).all(), "some tokens do not reach token (0, 0, 0)"


def test_mobilevit_patches_fold_back():
    x = torch.randn(2, 5, 4, 6, 8)
    seqs = unfold_patches(x, 2)
    assert seqs.shape == (2 * 8, 2 * 3 * 4, 5)
    torch.testing.assert_close(fold_patches(seqs, 2, (4, 6, 8)), x)


# ---------------------------------------------------------------- efficiency profile
@pytest.mark.parametrize("name", ["vim3d", "trimamba3d"])
def test_scan_macs_are_in_the_profile(name):
    model = _build(name, 28, num_classes=2, **_conf(name)["kwargs"]).eval()
    prof = efficiency.profile_model(
        model, (1, 28, 28, 28), repeats=1, warmup=0, throughput_batch=1, threads=1
    )
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(1, 1, 28, 28, 28))
    kw = _conf(name)["kwargs"]
    directions = 2 if name == "vim3d" else 6
    d_inner = kw["expand"] * kw["embed_dim"]
    scans = kw["depth"] * scan_macs(1, directions * d_inner, 7**3, kw["d_state"])
    assert prof.macs == counter.get_total_flops() // 2 + scans
    assert scans > 0.05 * prof.macs  # the scan is a visible share, not a rounding error
