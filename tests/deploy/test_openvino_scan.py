"""The fused selective scan in OpenVINO: one medlite operation per scan, running the C kernel,
with the outputs of the reference scan and of eager Vim / VMamba."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medlite.deploy import runtimes
from medlite.models.factory import create_model
from medlite.models.ops.selective_scan import selective_scan, selective_scan_ref
from medlite.pipeline import run
from tests.helpers import make_cfg

pytestmark = pytest.mark.skipif(
    not runtimes.installed("openvino"),
    reason="OpenVINO not installed: pip install 'medlite[openvino]'",
)


def _to_openvino(model: nn.Module, example: torch.Tensor, tmp_path: Path):
    """``model`` exported with fused scans, converted, saved and loaded as a deployed model."""
    from medlite.deploy.openvino_runtime import OvModel, convert_onnx
    from medlite.deploy.openvino_scan import export_fused_onnx

    fused = tmp_path / "fused.onnx"
    nodes = export_fused_onnx(model, example, fused)
    convert_onnx(fused, tmp_path / "model_openvino.xml")
    return nodes, OvModel(tmp_path / "model_openvino.xml", threads=1)


class _GroupedScan(nn.Module):
    """One grouped scan as Vim and VMamba call it (B, C per group; D; softplus of delta + bias)."""

    def __init__(self, dim: int = 24, groups: int = 2, n: int = 6) -> None:
        super().__init__()
        self.groups, self.n = groups, n
        self.A_log = nn.Parameter(torch.log(torch.rand(dim, n) * 4 + 0.5))
        self.D = nn.Parameter(torch.randn(dim))
        self.bias = nn.Parameter(torch.randn(dim) * 0.5)
        self.proj = nn.Conv1d(dim, dim * 2 + 2 * groups * n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, dim, L)
        b, d, length = x.shape
        delta, u, bc = torch.split(self.proj(x), [d, d, 2 * self.groups * self.n], dim=1)
        B, C = bc.reshape(b, 2, self.groups, self.n, length).unbind(1)
        return self.scan(u, delta, -torch.exp(self.A_log), B, C)

    def scan(self, u, delta, A, B, C, fn=selective_scan):
        return fn(u, delta, A, B.contiguous(), C.contiguous(), self.D, delta_bias=self.bias,
                  delta_softplus=True)  # fmt: skip


def test_the_operation_computes_the_reference_scan(tmp_path: Path):
    torch.manual_seed(0)
    module = _GroupedScan().eval()
    x = torch.randn(3, 24, 37)
    nodes, deployed = _to_openvino(module, x, tmp_path)
    assert nodes == 1  # the whole scan is one node, not a chain of ~4 sqrt(L) ops
    xml = (tmp_path / "model_openvino.xml").read_text()
    assert 'type="SelectiveScan" version="medlite"' in xml
    with torch.no_grad():
        d, length = 24, 37
        delta, u, bc = torch.split(module.proj(x), [d, d, 2 * 2 * 6], dim=1)
        B, C = bc.reshape(3, 2, 2, 6, length).unbind(1)
        ref = module.scan(u, delta, -torch.exp(module.A_log), B, C, fn=selective_scan_ref)
    for batch in (3, 1):  # a static shape compiled per batch size, both right
        got = deployed(x[:batch])
        assert got.shape == ref[:batch].shape
        assert (got - ref[:batch]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["vim", "vmamba"])
def test_vim_and_vmamba_in_openvino_match_eager_on_real_images(arch, tmp_path, shared_data):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=2, in_chans=1, img_size=28).eval()
    images = np.load(shared_data / "breastmnist.npz")["test_images"][:8]
    x = torch.from_numpy(images).float().div(255).sub(0.5).div(0.5).unsqueeze(1)
    nodes, deployed = _to_openvino(model, x, tmp_path)
    scans = sum(isinstance(m, nn.Module) and hasattr(m, "A_log") for m in model.modules())
    assert nodes == scans > 0  # every scan fused
    with torch.no_grad():
        ref = model(x)
    for got in (deployed(x), torch.cat([deployed(x[i : i + 1]) for i in range(len(x))])):
        assert (got - ref).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def vim_run(tmp_path_factory) -> Path:
    """A Vim run (debug size) exported with export=openvino."""
    base = tmp_path_factory.getbasetemp()
    out = tmp_path_factory.mktemp("vim") / "run"
    with pytest.MonkeyPatch.context() as mp:  # conftest's isolation, for a module fixture
        mp.setenv("MEDLITE_CACHE_DIR", str(base / "medlite-cache"))
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(base / "wandb"))
        mp.setenv("WANDB_MODE", "offline")
        run(make_cfg(out, ["model=vim", "debug=limit", "callbacks=none", "threads=1",
                           "export=openvino"]))  # fmt: skip
    return out


def test_a_vim_run_exports_openvino_with_fused_scans(vim_run: Path):
    """export=openvino on a Vim run: the fp32 file holds the fused scans and passes the same
    parity checks as every format; NNCF's int8 quantises around them."""
    formats = json.loads((vim_run / "export" / "export.json").read_text())["formats"]
    fp32, int8 = formats["openvino_fp32"], formats["openvino_int8"]
    assert fp32["fused_scans"] == 4  # Vim's default depth
    assert fp32["parity"]["ok"] and fp32["parity"]["max_abs_diff"] <= 1e-4
    assert int8["parity"]["ok"]
    onnx = formats["onnx_fp32"]  # the portable ONNX file stays standard ops
    assert onnx["parity"]["ok"] and "fused_scans" not in onnx


@pytest.mark.slow  # a second export of the run (~15 s)
def test_a_failed_fused_trace_falls_back_to_standard_ops(vim_run: Path, tmp_path, monkeypatch):
    """Where the fused trace fails, the standard-op graph is converted instead, and the record
    says why."""
    from medlite.deploy import openvino_scan
    from medlite.deploy.export import ExportSettings, export_run

    out = tmp_path / "run"
    shutil.copytree(vim_run, out)  # the module's run keeps its fused file

    def broken(*args, **kwargs):
        raise RuntimeError("no symbolic for this scan")

    monkeypatch.setattr(openvino_scan, "export_fused_onnx", broken)
    again = export_run(out, ExportSettings(formats=["openvino_fp32"]))["formats"]["openvino_fp32"]
    assert again["fused_error"] == "RuntimeError: no symbolic for this scan"
    assert "fused_scans" not in again and again["parity"]["ok"]
    xml = (out / "export" / "model_openvino.xml").read_text()
    assert 'version="medlite"' not in xml
