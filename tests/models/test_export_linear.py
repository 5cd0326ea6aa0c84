"""Vim, VMamba and Vision-RWKV export with a dynamic batch dimension: torch.export and ONNX (the
dynamo exporter, and the legacy one export_onnx falls back to), each checked against eager
PyTorch at batch sizes the exporter never saw. While exporting, the scan ops switch to their
export path (medlite.models.ops, ``backend="export"``); eager calls keep the fast paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import medlite.models.linear  # noqa: F401  (registers vim, vmamba, vrwkv)
from medlite.deploy import OrtModel, export_onnx, onnx_exporter
from medlite.models import create_model

MODELS = ("vim", "vmamba", "vrwkv")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Small enough to export in a few seconds; scans of 49 (vim, vrwkv) and 196 (vmamba) tokens.
TINY = {
    "vim": {"embed_dim": 16, "depth": 1, "d_state": 4},
    "vmamba": {"dims": (16,), "depths": (1,), "d_state": 4},
    "vrwkv": {"embed_dim": 16, "depth": 1},
}
TOL = 1e-4


def _conf_kwargs(name: str) -> dict:
    conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
    return conf["kwargs"]


def _build(name: str, size: int = 28, **kwargs) -> torch.nn.Module:
    """Eval-mode model whose logits are O(1) (the default head init makes them ~0.02, which
    would make an absolute tolerance meaningless)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1, img_size=size, **kwargs).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    return model


def _inputs(batch: int, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(batch))


def _check_torch_export(model: torch.nn.Module, size: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (_inputs(2, size),), dynamic_shapes=({0: batch},))
    exported = program.module()
    with torch.no_grad():
        for n in (1, 3):
            x = _inputs(n, size)
            want = model(x)
            assert torch.isfinite(want).all() and want.abs().max() > 0.1
            assert (exported(x) - want).abs().max().item() < TOL


def _check_onnx(model: torch.nn.Module, size: int, path: Path, exporter: str) -> None:
    export_onnx(model, _inputs(2, size), path, exporter=exporter)  # checks batch 1 and 3 itself
    expected = "dynamo" if exporter == "auto" else exporter
    assert onnx_exporter(path) == expected  # with "auto": dynamo did not fall back
    session = OrtModel(path, threads=1)
    with torch.no_grad():
        for n in (1, 5):
            x = _inputs(n, size)
            assert (session(x) - model(x)).abs().max().item() < TOL


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_dynamic_batch(name):
    _check_torch_export(_build(name, **TINY[name]), 28)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_legacy_export_dynamic_batch(name, tmp_path):
    _check_onnx(_build(name, **TINY[name]), 28, tmp_path / f"{name}.onnx", "legacy")


@pytest.mark.parametrize("name", MODELS)
def test_onnx_dynamo_export_dynamic_batch(name, tmp_path):
    _check_onnx(_build(name, **TINY[name]), 28, tmp_path / f"{name}.onnx", "auto")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_default_configs_export_at_28px(name, tmp_path):
    model = _build(name, **_conf_kwargs(name))
    _check_torch_export(model, 28)
    _check_onnx(model, 28, tmp_path / f"{name}.onnx", "auto")


@pytest.mark.slow
def test_default_config_exports_at_64px(tmp_path):
    """VMamba at 64 px scans 256 tokens in its first stage (16 chunks of 16)."""
    model = _build("vmamba", 64, **_conf_kwargs("vmamba"))
    _check_torch_export(model, 64)
    _check_onnx(model, 64, tmp_path / "vmamba64.onnx", "auto")
