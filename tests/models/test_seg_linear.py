"""The linear-complexity (Mamba / state-space) segmentation networks: UltraLight VM-UNet and
VM-UNet. Their configs compose on ``data=synthseg``, build and train a batch; the scan gives
the same logits and gradients with medlite's C kernel and its PyTorch fallback, reports its
MACs, stays in fp32 under autocast and keeps its parameters out of weight decay; ONNX export
matches PyTorch; one short pipeline run. The full size x channel grid is ``-m slow``."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medlite import efficiency
from medlite.build import build_datamodule, build_model
from medlite.errors import ConfigError
from medlite.models import create_model, get_entry
from medlite.models.linear.vim import MultiScanSSM
from medlite.models.seg.ultralight_vmunet import Mamba, PVMLayer
from medlite.modules import LinearComplexityModule
from medlite.tasks import SEGMENTATION, get_task
from tests.helpers import CONF_DIR, make_cfg

MODELS = ("ultralight_vmunet", "vmunet")
# scans per forward pass: one per PVM layer / one per VSS block
SCANS = {"ultralight_vmunet": 6, "vmunet": 8 + 7}
ss_module = importlib.import_module("medlite.models.ops.selective_scan")


def _configured(name: str, tmp_path, size: int = 64, in_chans: int = 1):
    """The model as a run builds it from ``data=synthseg model=<name>``, and the datamodule."""
    cfg = make_cfg(
        tmp_path,
        ["data=synthseg", f"model={name}", f"data.size={size}", f"data.as_rgb={in_chans == 3}"],
    )
    dm = build_datamodule(cfg)  # reads no data: only the run's preprocessing
    torch.manual_seed(0)
    model = build_model(cfg.model, dm.task.num_outputs, dm.in_chans, dm.preprocess.input_size)
    return cfg, dm, model


def _train_one_batch(name: str, tmp_path, size: int = 64, in_chans: int = 1) -> None:
    cfg, dm, model = _configured(name, tmp_path, size, in_chans)
    assert cfg.model.paradigm == "linear" and cfg.model.task == "segmentation"
    k, side = dm.task.num_outputs, dm.preprocess.input_size
    assert dm.in_chans == in_chans and side == size
    images = np.random.default_rng(0).integers(0, 256, size=(2, size, size), dtype=np.uint8)
    x = torch.stack([dm.preprocess(image) for image in images])
    model.train()
    out = model(x)
    assert out.shape == (2, k, side, side) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    masks = torch.from_numpy(np.random.default_rng(1).integers(0, k, size=(2, side, side)))
    dm.task.loss(out, dm.task.targets(masks)).backward()
    params = list(model.named_parameters())
    assert all(p.requires_grad for _, p in params)
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    zero = [n for n, p in params if not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradients: {zero}"


def _build(name: str, size: int = 64, **kwargs) -> torch.nn.Module:
    conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
    torch.manual_seed(0)
    kw = {**conf["kwargs"], **kwargs}
    return create_model(name, num_classes=2, in_chans=1, img_size=size, **kw)


# --------------------------------------------------------------------------- configs, training


@pytest.mark.parametrize("name", MODELS)
def test_config_and_registry(name):
    raw = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    assert raw.name == raw.arch == name and raw.paradigm == "linear"
    assert raw.task == "segmentation" and raw.input_size is None and raw.pretrained is False
    header = (CONF_DIR / "model" / f"{name}.yaml").read_text()
    assert "Published:" in header and "Ours" in header  # the paper's size and ours
    entry = get_entry(name)
    assert entry.paradigm == "linear" and entry.task == "segmentation" and entry.min_size == 32


@pytest.mark.parametrize("name", MODELS)
def test_config_builds_and_trains_one_batch_at_64px(name, tmp_path):
    _train_one_batch(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("name", MODELS)
def test_every_size_and_channel_count(name, size, in_chans, tmp_path):
    _train_one_batch(name, tmp_path, size, in_chans)


@pytest.mark.parametrize("name", MODELS)
def test_indivisible_side_is_a_config_error_naming_sizes_that_work(name):
    with pytest.raises(ConfigError, match=r"divisible by 32 \(e\.g\. 64, 128, 256\)"):
        create_model(name, num_classes=2, in_chans=1, img_size=80)
    with pytest.raises(ConfigError, match="at least 32 px"):
        create_model(name, num_classes=2, in_chans=1, img_size=16)


def test_default_sizes_are_small():
    assert 45_000 < sum(p.numel() for p in _build("ultralight_vmunet").parameters()) < 55_000
    assert sum(p.numel() for p in _build("vmunet").parameters()) < 1_500_000


# --------------------------------------------------------------------------- the scan


@pytest.mark.parametrize("name", MODELS)
def test_c_kernel_and_pytorch_fallback_agree(name, native_kernel, monkeypatch):
    """Same logits and gradients whichever CPU scan runs (``auto`` picks the C kernel here)."""
    model = _build(name).eval()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    used: list[str] = []
    monkeypatch.setattr(efficiency, "note_implementation", lambda op, impl: used.append(impl))

    def run():
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_c, grads_c = run()
    assert set(used) == {"native"}
    used.clear()
    monkeypatch.setattr(ss_module, "native_kernel_for", lambda *args: None)
    out_py, grads_py = run()
    assert set(used) == {"fast"}
    torch.testing.assert_close(out_py, out_c, atol=1e-4, rtol=1e-4)
    for n, g in grads_c.items():
        torch.testing.assert_close(grads_py[n], g, atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize("name", MODELS)
def test_scan_macs_are_counted(name, monkeypatch):
    model = _build(name).eval()
    x = torch.randn(1, 1, 64, 64)
    full = efficiency.count_macs(model, x)
    calls: list[int] = []
    monkeypatch.setattr(efficiency, "add_macs", calls.append)
    without = efficiency.count_macs(model, x)
    assert len(calls) == SCANS[name] and sum(calls) == full - without > 0


@pytest.mark.parametrize("name", MODELS)
def test_scan_parameters_skip_weight_decay(name):
    model = _build(name)
    task = get_task(SEGMENTATION, ("background", "lesion"))
    module = LinearComplexityModule(model, task, optim={"_target_": "torch.optim.AdamW"})
    names = {n for n, p in model.named_parameters() if module.is_no_decay(n, p)}
    for key in ("A_log", "D", "dt_bias"):
        matches = [n for n, _ in model.named_parameters() if n.split(".")[-1] == key]
        assert len(matches) == SCANS[name] and set(matches) <= names, key
    # and the projections around the scan do decay
    assert any(n.endswith("x_proj_weight") for n, _ in model.named_parameters())
    assert not any(n.endswith("x_proj_weight") for n in names)


@pytest.mark.parametrize("name", MODELS)
def test_scan_runs_in_fp32_under_autocast(name):
    """The linear paradigm's fp32 islands: every scan's input is fp32 under bf16 autocast."""
    model = _build(name).eval()
    task = get_task(SEGMENTATION, ("background", "lesion"))
    LinearComplexityModule(model, task, optim={"_target_": "torch.optim.AdamW"}).on_fit_start()
    seen = []
    for m in model.modules():
        if isinstance(m, MultiScanSSM):
            m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 1, 64, 64))
    assert seen == [torch.float32] * SCANS[name]
    assert out.shape == (1, 2, 64, 64) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- what PVM is


@torch.no_grad()
def test_pvm_groups_share_one_mamba_scanning_row_major():
    """One Mamba of a quarter of the width serves all four groups; each group is scanned
    causally in row-major order (the last pixel sees the first, not the other way round)."""
    torch.manual_seed(0)
    layer = PVMLayer(16, 24, d_state=4).eval()
    assert layer.mamba.in_proj.in_features == 4  # 16 channels / 4 groups
    x = torch.randn(1, 16, 5, 6)
    base = layer(x)
    kick = torch.randn(16)  # not a constant over channels: LayerNorm would remove that
    bumped = x.clone()
    bumped[0, :, 0, 0] += kick
    assert not torch.allclose(layer(bumped)[0, :, -1, -1], base[0, :, -1, -1], atol=1e-6)
    bumped = x.clone()
    bumped[0, :, -1, -1] += kick
    assert torch.allclose(layer(bumped)[0, :, 0, 0], base[0, :, 0, 0], atol=1e-6)
    mamba_params = sum(p.numel() for p in layer.mamba.parameters())
    assert mamba_params == sum(p.numel() for p in Mamba(4, d_state=4).parameters())


# --------------------------------------------------------------------------- export, pipeline


def _check_onnx(name: str, size: int, path, exporter: str, **kwargs) -> None:
    """Export with a dynamic batch (export_onnx itself checks batch 1 and an unseen batch size
    against PyTorch), then compare at batch 3 with a tight tolerance. While exporting, the
    scans take their export path."""
    from medlite.deploy import OrtModel, export_onnx, onnx_exporter

    model = _build(name, size=size, **kwargs).eval()
    export_onnx(model, torch.randn(2, 1, size, size), path, exporter=exporter)
    assert onnx_exporter(path) == exporter
    x = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x)
    assert want.abs().max() > 0.1
    assert (OrtModel(path, threads=1)(x) - want).abs().max().item() < 1e-4


def test_ultralight_onnx_export_matches_pytorch(tmp_path):
    """The legacy (TorchScript) exporter, medlite.deploy's fallback: ~5 s where the dynamo
    exporter takes 20-40 s on this box; dynamo is checked under -m slow."""
    _check_onnx("ultralight_vmunet", 32, tmp_path / "m.onnx", "legacy")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size", "kwargs"),
    [
        ("ultralight_vmunet", 32, {}),
        # one VSS block per stage: the default's ops at half its export time (~4 min here)
        ("vmunet", 64, {"depths": (1, 1, 1, 1), "depths_decoder": (1, 1, 1, 1)}),
    ],
)
def test_dynamo_onnx_export_matches_pytorch(name, size, kwargs, tmp_path):
    """The dynamo exporter, which medlite.deploy tries first."""
    _check_onnx(name, size, tmp_path / f"{name}.onnx", "dynamo", **kwargs)


def test_ultralight_vmunet_pipeline_run(tmp_path):
    from medlite.pipeline import run

    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        [
            "data=synthseg",
            "model=ultralight_vmunet",
            "debug=limit",
            "trainer.max_epochs=1",
            "max_phase_epochs=1",
            "callbacks=none",
            "profile.enabled=false",
        ],
    )
    run(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "ok"
    assert res["model"]["paradigm"] == "linear" and res["model"]["params"] < 55_000
    assert 0.0 <= res["test"]["dice"] <= 1.0
