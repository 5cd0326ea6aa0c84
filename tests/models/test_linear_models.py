"""Vision Mamba, VMamba/MedMamba (SS2D) and Vision-RWKV: shapes and gradients at every MedMNIST
size, honest MAC counts for the scans, and property tests of what makes each one what it is --
Vim scans both ways, SS2D reaches every pixel from all four directions, WKV mixes globally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import medlite.models.linear  # noqa: F401  (registers vim, vmamba, vrwkv)
from medlite import efficiency
from medlite.models import count_parameters, create_model, get_entry
from medlite.models.linear.vim import BiMambaMixer, MultiScanSSM, patch_size_for, scan_macs
from medlite.models.linear.vmamba import (
    SS2D,
    SSConvBlock,
    channel_shuffle,
    cross_merge,
    cross_scan,
    stem_stride_for,
)
from medlite.models.linear.vrwkv import SpatialMix, q_shift, wkv_macs
from medlite.modules import LinearComplexityModule
from medlite.tasks import BINARY, ClassificationTask

MODELS = ("vim", "vmamba", "vrwkv")
SIZES = (28, 64, 128, 224)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _conf(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))


def _build(name: str, size: int = 28, in_chans: int = 1, num_classes: int = 3):
    torch.manual_seed(0)
    return create_model(
        name, num_classes=num_classes, in_chans=in_chans, img_size=size, **_conf(name)["kwargs"]
    )


def _check_forward_backward(model, size: int, in_chans: int) -> None:
    model.train()
    x = torch.randn(2, in_chans, size, size)
    out = model(x)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


# --------------------------------------------------------------------------- shapes, gradients


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_28px(name):
    _check_forward_backward(_build(name), 28, 1)


@pytest.mark.slow
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_every_size(name, size, in_chans):
    model = _build(name, size, in_chans)
    _check_forward_backward(model, size, in_chans)
    if name == "vmamba":
        assert model.stem_stride == stem_stride_for(size)
    else:
        assert model.patch_size == patch_size_for(size)
        assert 7 <= model.patch_embed.grid <= 14


def test_size_policies():
    assert [patch_size_for(s) for s in SIZES] == [4, 8, 16, 16]  # grids 7, 8, 8, 14
    assert [stem_stride_for(s) for s in SIZES] == [2, 4, 8, 16]  # first maps 14, 16, 16, 14


def test_explicit_patch_and_stem_override_the_policy():
    torch.manual_seed(0)
    vim = create_model("vim", num_classes=2, img_size=28, patch_size=2, embed_dim=32, depth=1)
    assert vim.num_tokens == 196 and vim(torch.randn(1, 1, 28, 28)).shape == (1, 2)
    vm = create_model("vmamba", num_classes=2, img_size=64, stem_stride=2, dims=[16], depths=[1])
    assert vm.forward_features(torch.randn(1, 1, 64, 64)).shape == (1, 32, 32, 16)
    with pytest.raises(ValueError, match="block"):
        create_model("vmamba", num_classes=2, block="nope")


def test_vss_block_variant_trains():
    torch.manual_seed(0)
    model = create_model(
        "vmamba", num_classes=3, img_size=28, block="vss", dims=[16, 32], depths=[1, 1]
    )
    _check_forward_backward(model, 28, 1)


def test_registry_and_configs():
    for name in MODELS:
        entry = get_entry(name)
        assert entry is not None and entry.paradigm == "linear" and entry.min_size == 28
        conf = _conf(name)
        assert conf["arch"] == name and conf["paradigm"] == "linear" and conf["input_size"] is None
        assert conf["pretrained"] is False
        assert 100_000 < count_parameters(_build(name)) < 2_000_000


@pytest.mark.parametrize("name", MODELS)
def test_state_space_parameters_skip_weight_decay(name):
    """A, D, dt biases, WKV decays and position embeddings must not be shrunk towards 0."""
    model = _build(name)
    module = LinearComplexityModule(
        model, ClassificationTask(BINARY, ("a", "b")), optim={"_target_": "torch.optim.AdamW"}
    )
    names = {n for n, p in model.named_parameters() if module.is_no_decay(n, p)}
    special = {
        "vim": ("A_log", "D", "dt_bias", "pos_embed"),
        "vmamba": ("A_log", "D", "dt_bias"),
        "vrwkv": ("time_decay", "time_first", "pos_embed"),
    }[name]
    for key in special:
        matches = [n for n, _ in model.named_parameters() if n.split(".")[-1] == key]
        assert matches and set(matches) <= names, key
    assert any(n.endswith("A_log") for n in names) or name == "vrwkv"  # A_log is 2-D


# --------------------------------------------------------------------------- MACs of the scans


@pytest.mark.parametrize("name", MODELS)
def test_scan_macs_are_counted(name, monkeypatch):
    model = _build(name).eval()
    x = torch.randn(1, 1, 28, 28)
    full = efficiency.count_macs(model, x)
    calls: list[int] = []
    monkeypatch.setattr(efficiency, "add_macs", calls.append)
    without = efficiency.count_macs(model, x)
    assert full > without > 0
    assert sum(calls) == full - without  # exactly what the scans reported
    kw = _conf(name)["kwargs"]
    if name == "vim":  # one 2-direction scan per block, 7x7 tokens at 28 px
        d_inner = kw["expand"] * kw["embed_dim"]
        assert calls == [scan_macs(1, 2 * d_inner, 49, kw["d_state"])] * kw["depth"]
    elif name == "vrwkv":
        assert calls == [wkv_macs(1, 49, kw["embed_dim"])] * kw["depth"]
    else:  # one 4-direction scan per block; stage maps 14x14, 7x7, 4x4 at 28 px
        expected = []
        for dim, depth, side in zip(kw["dims"], kw["depths"], (14, 7, 4), strict=False):
            d_inner = kw["expand"] * (dim // 2 if kw["block"] == "ssconv" else dim)
            expected += [scan_macs(1, 4 * d_inner, side * side, kw["d_state"])] * depth
        assert calls == expected


# --------------------------------------------------------------------------- Vim: both directions


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _influence(fn, x: torch.Tensor, src, dst) -> float:
    """How much ``fn(x)[dst]`` depends on ``x[src]``: the largest Jacobian entry from src to a
    random projection of dst, relative to the largest over all of x. Exactly 0 where no path
    exists, so even the weak long-range coupling of a freshly initialised scan shows."""
    x = x.clone().requires_grad_(True)
    out = fn(x)[dst]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return (x.grad[src].abs().max() / x.grad.abs().max()).item()


BOTTOM_RIGHT_PATCH = (..., slice(-4, None), slice(-4, None))


@torch.no_grad()
def test_vim_mixer_sees_both_ways():
    """Token 0 depends on the last token and vice versa: not a causal (one-way) scan."""
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=4).eval()
    x = torch.randn(2, 12, 16)
    base = mixer(x)
    last, first = x.clone(), x.clone()
    last[:, -1] += 1.0
    first[:, 0] += 1.0
    assert _changed(mixer(last)[:, 0], base[:, 0])
    assert _changed(mixer(first)[:, -1], base[:, -1])


@torch.no_grad()
def test_each_scan_direction_is_causal_in_its_own_order():
    torch.manual_seed(0)
    ssm = MultiScanSSM(8, 4, 2, directions=2).eval()
    xs = torch.randn(1, 2, 8, 10)
    base = ssm(xs)
    bumped = xs.clone()
    bumped[..., 6] += 1.0
    out = ssm(bumped)
    assert torch.allclose(out[..., :6], base[..., :6], atol=1e-6)  # the past is untouched
    assert _changed(out[..., 6:], base[..., 6:])


@torch.no_grad()
def test_vim_backward_direction_is_the_mirrored_forward_scan():
    """With the backward parameters set equal to the forward ones, reversing the tokens reverses
    the output exactly; with Vim's separate parameters, it does not (order matters)."""
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=4).eval()
    x = torch.randn(2, 12, 16)
    assert _changed(mixer(x.flip(1)), mixer(x).flip(1))
    d = mixer.d_inner
    mixer.conv1d.weight[d:] = mixer.conv1d.weight[:d]
    mixer.conv1d.bias[d:] = mixer.conv1d.bias[:d]
    ssm = mixer.ssm
    ssm.x_proj_weight[1] = ssm.x_proj_weight[0]
    ssm.dt_proj_weight[1] = ssm.dt_proj_weight[0]
    for p in (ssm.dt_bias, ssm.A_log, ssm.D):
        p[d:] = p[:d]
    torch.testing.assert_close(mixer(x.flip(1)), mixer(x).flip(1), atol=1e-5, rtol=1e-4)


def test_vim_first_token_sees_last_patch():
    """The conv stem's receptive field is 7 px, so only the backward scan can carry the
    bottom-right patch to the first (top-left) token -- and only the forward scan the first to
    the last."""
    model = _build("vim").eval()
    x = torch.randn(1, 1, 28, 28)
    assert _influence(model.forward_features, x, BOTTOM_RIGHT_PATCH, (slice(None), 0)) > 1e-8
    top_left = (..., slice(0, 4), slice(0, 4))
    assert _influence(model.forward_features, x, top_left, (slice(None), -1)) > 1e-8


# --------------------------------------------------------------------------- SS2D: four directions


def test_cross_scan_orders_and_merge():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    xs = cross_scan(x)
    assert xs.shape == (1, 4, 1, 12)
    assert xs[0, 0, 0].tolist() == list(range(12))  # row-major
    assert xs[0, 1, 0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]  # column-major
    assert xs[0, 2, 0].tolist() == list(range(11, -1, -1))
    assert xs[0, 3, 0].tolist() == [11, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0]
    torch.testing.assert_close(cross_merge(xs, 3, 4), 4 * x)


def test_channel_shuffle_interleaves_halves():
    x = torch.arange(6.0).reshape(1, 1, 1, 6)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def _ss2d(h: int = 6, w: int = 7):
    torch.manual_seed(0)
    return SS2D(8, d_state=4).eval(), torch.randn(1, h, w, 8)


@torch.no_grad()
def test_ss2d_every_pixel_sees_every_corner():
    ss2d, x = _ss2d()
    h, w = x.shape[1:3]
    base = ss2d(x)
    corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
    for src in corners:
        bumped = x.clone()
        bumped[0, src[0], src[1]] += 1.0
        out = ss2d(bumped)
        opposite = (h - 1 - src[0], w - 1 - src[1])
        assert _changed(out[0, opposite[0], opposite[1]], base[0, opposite[0], opposite[1]]), src
        assert _changed(out[0, h // 2, w // 2], base[0, h // 2, w // 2]), src


@pytest.mark.parametrize(
    ("keep", "src", "dst", "reaches"),
    [
        (0, (5, 6), (0, 0), False),  # row-major forward: (0, 0) comes first, sees nothing later
        (2, (5, 6), (0, 0), True),  # row-major reversed: (0, 0) comes last, sees everything
        (0, (5, 0), (0, 3), False),  # row-major: (5, 0) comes after (0, 3)
        (1, (5, 0), (0, 3), True),  # column-major: all of column 0 comes before (0, 3)
        (1, (0, 6), (5, 0), False),  # column-major: column 6 comes after (5, 0)
        (3, (0, 6), (5, 0), True),  # column-major reversed: it comes before
    ],
)
def test_ss2d_directions_are_row_and_column_scans(monkeypatch, keep, src, dst, reaches):
    """Keep one of the four scans: each is causal in its own order, so what reaches a pixel
    tells row-major from column-major and forward from reversed."""
    ss2d, x = _ss2d()
    scan = ss2d.ssm.forward
    mask = torch.zeros(1, 4, 1, 1)
    mask[0, keep] = 1.0
    monkeypatch.setattr(ss2d.ssm, "forward", lambda xs: scan(xs) * mask)
    influence = _influence(ss2d, x, (0, *src), (0, *dst))
    assert influence > 1e-6 if reaches else influence < 1e-9


def test_ssconv_block_is_global():
    """The conv branch reaches 2 pixels; the far corners are connected only through SS2D."""
    torch.manual_seed(0)
    block = SSConvBlock(16, d_state=4).eval()
    x = torch.randn(1, 8, 8, 16)
    assert _influence(block, x, (0, -1, -1), (0, 0, 0)) > 1e-8
    assert _influence(block, x, (0, 0, 0), (0, -1, -1)) > 1e-8
    assert _influence(block, x, (0, 0, -1), (0, -1, 0)) > 1e-8


def test_vmamba_first_stage_is_global():
    model = _build("vmamba").eval()

    def first_stage(img: torch.Tensor) -> torch.Tensor:
        return model.stages[0](model.stem(img).permute(0, 2, 3, 1))

    x = torch.randn(1, 1, 28, 28)
    assert _influence(first_stage, x, BOTTOM_RIGHT_PATCH, (0, 0, 0)) > 1e-8
    assert _influence(first_stage, x, (..., slice(0, 4), slice(0, 4)), (0, -1, -1)) > 1e-8


# --------------------------------------------------------------------------- Vision-RWKV


def test_q_shift_takes_each_quarter_from_one_neighbour():
    h, w, c = 3, 3, 4
    idx = torch.arange(1.0, h * w + 1)  # token ids 1..9, 0 means "past the border"
    x = idx[None, :, None].expand(1, h * w, c)
    out = q_shift(x, (h, w))[0].reshape(h, w, c)
    assert out[..., 0].tolist() == [[0, 1, 2], [0, 4, 5], [0, 7, 8]]  # left neighbour
    assert out[..., 1].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]  # right
    assert out[..., 2].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]  # above
    assert out[..., 3].tolist() == [[4, 5, 6], [7, 8, 9], [0, 0, 0]]  # below


@torch.no_grad()
def test_wkv_spatial_mix_is_global():
    """Q-Shift reaches one token; the far end of the sequence changes only through Bi-WKV."""
    torch.manual_seed(0)
    mix = SpatialMix(16, layer_id=1, depth=4).eval()
    grid = (6, 6)
    x = torch.randn(2, 36, 16)
    base = mix(x, grid)
    first, last = x.clone(), x.clone()
    first[:, 0] += 1.0
    last[:, -1] += 1.0
    assert _changed(mix(first, grid)[:, -1], base[:, -1])
    assert _changed(mix(last, grid)[:, 0], base[:, 0])


def test_vrwkv_first_token_sees_last_patch():
    model = _build("vrwkv").eval()
    x = torch.randn(1, 1, 28, 28)
    assert _influence(model.forward_features, x, BOTTOM_RIGHT_PATCH, (slice(None), 0)) > 1e-4


# --------------------------------------------------------------------------- quality smoke


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", MODELS)
def test_trains_on_breastmnist(name, tmp_path, shared_data):
    """Default config, BreastMNIST 28 px, 30 epochs: the paradigm's bar is >= 0.80 test AUC."""
    from medlite.pipeline import run
    from tests.helpers import make_cfg

    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        [
            f"model={name}",
            "data=breastmnist",
            f"paths.data_dir={shared_data}",
            "data.download=false",
            "trainer.max_epochs=30",
            "callbacks=none",
        ],
    )
    run(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "ok"
    assert res["test"]["auc"] >= 0.80, res["test"]
