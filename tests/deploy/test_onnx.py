"""ONNX export and the ONNX Runtime module: parity with PyTorch, any batch size, clear failures."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from medlite.deploy import (
    OnnxExportError,
    OrtModel,
    export_onnx,
    max_abs_diff,
    onnx_exporter,
    onnx_weight_dtypes,
)
from medlite.efficiency import count_parameters, profile_model
from medlite.models import create_model

SHAPE = (1, 28, 28)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def litecnn_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("litecnn", num_classes=3, in_chans=1, img_size=28).eval()
    _randomise_bn(model)
    path = export_onnx(model, torch.randn(2, *SHAPE), tmp_path_factory.mktemp("lite") / "m.onnx")
    return model, path


def _randomise_bn(model: nn.Module) -> None:
    """Give BatchNorm non-trivial statistics so parity is checked on realistic logits."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)


def test_export_is_one_self_contained_file_with_named_dynamic_io(litecnn_onnx) -> None:
    import onnx

    _, path = litecnn_onnx
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no external .data file
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch size
    assert onnx_exporter(path) == "dynamo"


def test_ort_model_matches_pytorch_at_any_batch_size(litecnn_onnx) -> None:
    model, path = litecnn_onnx
    ort = OrtModel(path)
    for batch in (1, 7):
        x = torch.randn(batch, *SHAPE)
        out = ort(x)
        assert out.shape == (batch, 3) and out.dtype == torch.float32
        assert max_abs_diff(model, ort, x) < 1e-4
    with torch.no_grad():
        assert float((model(x) - ort(x)).abs().max()) < 1e-4


def test_ort_model_survives_mode_switches_inference_mode_and_copies(litecnn_onnx) -> None:
    _, path = litecnn_onnx
    ort = OrtModel(path, threads=1)
    x = torch.randn(3, *SHAPE)
    ref = ort(x)
    ort.train()
    assert torch.equal(ort(x), ref)
    ort.eval()
    with torch.inference_mode():
        assert torch.equal(ort(x.clone()), ref)
    assert torch.equal(ort(x.requires_grad_()), ref)
    for clone in (copy.deepcopy(ort), pickle.loads(pickle.dumps(ort))):
        assert torch.equal(clone(x.detach()), ref)
        assert clone.path == path
    assert list(ort.parameters()) == []


def test_ort_model_follows_torch_threads_unless_fixed(litecnn_onnx) -> None:
    _, path = litecnn_onnx
    follow, fixed = OrtModel(path), OrtModel(path, threads=1)
    torch.set_num_threads(2)
    x = torch.randn(1, *SHAPE)
    follow(x)
    fixed(x)
    assert follow._session_threads == 2 and fixed._session_threads == 1


def test_profile_model_uses_profile_overrides(litecnn_onnx) -> None:
    model, path = litecnn_onnx
    ort = OrtModel(path, params=count_parameters(model), macs=12345)
    prof = profile_model(ort, SHAPE, repeats=3, warmup=1, throughput_batch=4)
    assert prof.params == count_parameters(model)
    assert prof.macs == 12345
    assert prof.size_mb == pytest.approx(path.stat().st_size / 2**20, abs=1e-3)
    assert prof.latency_ms > 0 and prof.throughput_ips > 0


def test_weight_dtypes_of_an_fp32_export_are_float(litecnn_onnx) -> None:
    model, path = litecnn_onnx
    counts = onnx_weight_dtypes(path)
    assert counts.get("int8", 0) == 0
    # BatchNorm is folded into the convs, so the float count is close to the parameter count
    assert 0.9 * count_parameters(model) < counts["float"] <= count_parameters(model)


def test_legacy_exporter_gives_the_same_logits(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("litecnn", num_classes=2, in_chans=1, img_size=28).eval()
    path = export_onnx(model, torch.randn(1, *SHAPE), tmp_path / "legacy.onnx", exporter="legacy")
    assert onnx_exporter(path) == "legacy"
    assert max_abs_diff(model, OrtModel(path), torch.randn(5, *SHAPE)) < 1e-4


def test_falls_back_to_the_legacy_exporter_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    from medlite.deploy import onnx as deploy_onnx

    def broken(*args, **kwargs):
        raise RuntimeError("dynamo cannot do this model")

    monkeypatch.setitem(deploy_onnx._EXPORTERS, "dynamo", broken)
    model = create_model("litecnn", num_classes=2, in_chans=1, img_size=28).eval()
    with caplog.at_level("WARNING"):
        path = export_onnx(model, torch.randn(2, *SHAPE), tmp_path / "m.onnx")
    assert onnx_exporter(path) == "legacy"
    assert "dynamo exporter failed for LiteCNN" in caplog.text and "dynamo cannot" in caplog.text


def test_timm_model_exports_with_parity(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2, in_chans=1, img_size=28).eval()
    _randomise_bn(model)
    model.train()  # export must switch to eval itself and restore the mode afterwards
    path = export_onnx(model, torch.randn(4, *SHAPE), tmp_path / "resnet18.onnx")
    assert model.training
    ort = OrtModel(path)
    for batch in (1, 7):
        assert max_abs_diff(model, ort, torch.randn(batch, *SHAPE)) < 1e-4


class Untraceable(nn.Module):
    """A data-dependent Python branch and a NumPy round trip: neither exporter can follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        if h.sum().item() > 0:
            h = h * 2
        return torch.from_numpy(np.tanh(h.detach().numpy()))


def test_unexportable_model_fails_clearly_and_leaves_no_file(tmp_path) -> None:
    with pytest.raises(OnnxExportError, match="Untraceable") as info:
        export_onnx(Untraceable(), torch.randn(2, *SHAPE), tmp_path / "bad.onnx")
    assert "dynamo" in str(info.value) and "legacy" in str(info.value)
    assert not list(tmp_path.iterdir())
