"""Int8 on ONNX Runtime: ptq / dynamic / qat steps, called directly as the pipeline calls them.

The invariants are the ones a results table relies on: the weights are really int8, the file is
really smaller, the int8 model predicts like the fp32 one, and failures say what to do.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from torch import nn

from medlite.build import build_datamodule, build_model
from medlite.compress import RunContext, build_steps
from medlite.compress.evaluate import evaluate, predict_scores
from medlite.compress.quantize import (
    DynamicQuantization,
    FakeQuantWrapper,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    strip_qat,
    wrap_for_qat,
)
from medlite.deploy import OrtModel, onnx_weight_dtypes
from medlite.efficiency import count_macs, count_parameters, profile_model
from medlite.errors import ConfigError, TrainingError
from medlite.models import create_model
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(tmp_path, recipe: str, **changes) -> list:
    """The steps of conf/compress/<recipe>.yaml, with some parameters changed."""
    raw = OmegaConf.to_container(make_cfg(tmp_path, [f"compress={recipe}"]).compress.steps)
    raw[0].update(changes)
    return build_steps(raw)


def _recalibrate_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Real BatchNorm statistics for an untrained model, so its logits are not degenerate."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def _fit_head(model: nn.Module, dm) -> None:
    """A classifier that has learned something, in seconds: logistic regression on the frozen
    random features of the training split (full training would not fit a unit-test budget).

    Random features are more int8-sensitive than trained ones (max |logit diff| ~15% of the
    logit range here, ~4% for a trained litecnn), hence the loose bounds below; a broken
    conversion (wrong scales, clipped activations) still fails them by far.
    """
    feats, labels = [], []
    with torch.no_grad():
        for x, y in dm.calibration_dataloader():
            feats.append(torch.flatten(model.pool(model.forward_features(x)), 1))
            labels.append(y.view(-1))
    f, y = torch.cat(feats), torch.cat(labels)
    lr = LogisticRegression(C=1.0, max_iter=3000).fit(f.numpy(), y.numpy())
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.weight[1] = torch.tensor(lr.coef_[0], dtype=torch.float32)
        model.classifier.bias[1] = float(lr.intercept_[0])


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """(cfg, datamodule, fp32 litecnn with a fitted head) on the embedded synthetic data."""
    out = tmp_path_factory.mktemp("lite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLITE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "medlite-cache"))
        cfg = make_cfg(out, ["data=synthetic", "model=litecnn"])
        dm = build_datamodule(cfg)
        dm.setup()
    torch.manual_seed(0)
    model = build_model(cfg.model, dm.task.num_outputs, dm.in_chans, dm.preprocess.input_size)
    _recalibrate_bn(model, [x for x, _ in dm.calibration_dataloader()][:4])
    _fit_head(model, dm)
    return cfg, dm, model


@pytest.fixture(scope="module")
def ptq_lite(lite, tmp_path_factory):
    cfg, dm, model = lite
    out = tmp_path_factory.mktemp("ptq")
    step = _steps(out, "ptq")[0]
    ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=out)
    return step, step.prepare(copy.deepcopy(model), ctx), ctx


def _agreement(fp32: nn.Module, int8: nn.Module, dm) -> tuple[dict, dict, float, float]:
    loader = dm.test_dataloader()
    m_fp32, m_int8 = evaluate(fp32, loader, dm.task), evaluate(int8, loader, dm.task)
    _, s_fp32 = predict_scores(fp32, loader, dm.task)
    _, s_int8 = predict_scores(int8, loader, dm.task)
    same = float(np.mean((s_fp32 > 0.5) == (s_int8 > 0.5)))
    rho = float(spearmanr(s_fp32.ravel(), s_int8.ravel()).statistic)
    return m_fp32, m_int8, same, rho


# ---------------------------------------------------------------- ptq
def test_ptq_gives_a_really_int8_ort_model_that_predicts_like_fp32(lite, ptq_lite) -> None:
    _, dm, model = lite
    step, int8, ctx = ptq_lite
    assert isinstance(int8, OrtModel) and step.terminal and step.epochs == 0
    rep = step.report
    assert rep["exporter"] == "dynamo"
    counts = onnx_weight_dtypes(rep["int8_onnx"])
    assert counts["int8"] > 50 * counts.get("float", 0)  # float left: scales only
    assert rep["int8_weight_fraction"] > 0.95 and rep["weight_dtypes_int8"] == counts
    assert onnx_weight_dtypes(rep["fp32_onnx"]).get("int8", 0) == 0
    assert rep["int8_onnx_mb"] < rep["fp32_onnx_mb"] / 2.5
    assert rep["calibration_batches"] == 8 and rep["calibration_images"] == 8 * 64
    assert rep["fp32_onnx_max_abs_diff"] < 1e-4
    assert rep["logit_range"] > 1.0  # the fitted head gives real logits to compare
    assert rep["int8_max_abs_diff"] < 0.3 * rep["logit_range"]
    assert ctx.notes["onnx_int8"] == int8.path
    m_fp32, m_int8, same, rho = _agreement(model, int8, dm)
    assert m_fp32["auc"] > 0.52  # the head learned something (the task is hard for random features)
    assert abs(m_int8["auc"] - m_fp32["auc"]) < 0.03
    assert same > 0.8 and rho > 0.9  # same predictions on most test images, same ranking


def test_ptq_model_takes_any_batch_size(ptq_lite, lite) -> None:
    _, dm, model = lite
    _, int8, _ = ptq_lite
    x, _ = next(iter(dm.test_dataloader()))
    for batch in (1, 7):
        out = int8(x[:batch])
        assert out.shape == (batch, dm.task.num_outputs) and out.dtype == torch.float32
    assert torch.allclose(int8(x[:7])[:1], int8(x[:1]), atol=1e-5)


def test_profile_of_the_int8_model_uses_its_overrides(ptq_lite, lite) -> None:
    _, dm, model = lite
    _, int8, _ = ptq_lite
    shape = (dm.in_chans, dm.preprocess.input_size, dm.preprocess.input_size)
    prof = profile_model(int8, shape, repeats=3, warmup=1, throughput_batch=8)
    assert prof.params == count_parameters(model)
    assert prof.macs == count_macs(model, torch.zeros(1, *shape))
    assert prof.size_mb == pytest.approx(int8.path.stat().st_size / 2**20, abs=1e-3)


def test_ptq_shrinks_resnet18_at_least_3x(tmp_path) -> None:
    cfg = make_cfg(tmp_path, ["data=synthetic", "model=resnet18"])
    dm = build_datamodule(cfg)
    dm.setup()
    torch.manual_seed(0)
    model = build_model(cfg.model, dm.task.num_outputs, dm.in_chans, dm.preprocess.input_size)
    ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path)
    _recalibrate_bn(model, ctx.calibration_batches(2))
    step = _steps(tmp_path, "ptq", calibration_batches=2)[0]
    int8 = step.prepare(model, ctx)
    rep = step.report
    assert rep["size_ratio"] >= 3.0
    assert rep["int8_weight_fraction"] > 0.99
    assert rep["int8_max_abs_diff"] < 0.15 * rep["logit_range"]
    assert int8.profile_overrides["params"] == count_parameters(model)
    assert (tmp_path / "compressed" / "model_int8.onnx").is_file()
    assert not (tmp_path / "compressed" / "model_fp32_pre.onnx").exists()


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        if h.sum().item() > 0:  # a data-dependent Python branch
            h = h * 2
        return torch.from_numpy(np.tanh(h.detach().numpy()))


def test_unexportable_model_raises_a_clear_error(lite, tmp_path) -> None:
    cfg, dm, _ = lite
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.model.arch = "untraceable_net"
    step = PostTrainingQuantization(calibration_batches=1)
    ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path)
    with pytest.raises(TrainingError, match=r"ptq: model untraceable_net could not be exported"):
        step.prepare(_Untraceable(), ctx)


def test_recipes_build_and_bad_values_are_config_errors(tmp_path) -> None:
    kinds = {r: [s.kind for s in _steps(tmp_path, r)] for r in ("ptq", "dynamic", "qat")}
    assert kinds == {"ptq": ["ptq"], "dynamic": ["dynamic"], "qat": ["qat"]}
    qat = _steps(tmp_path, "qat")[0]
    assert qat.terminal and qat.epochs == 5 and qat.lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="calibrate_method"):
        _steps(tmp_path, "ptq", calibrate_method="magic")
    with pytest.raises(ConfigError, match="activation_type"):
        _steps(tmp_path, "ptq", activation_type="int4")
    with pytest.raises(ConfigError, match="calibration_batches"):
        _steps(tmp_path, "ptq", calibration_batches=0)
    with pytest.raises(ConfigError, match="must be the last step"):
        build_steps([{"kind": "qat"}, {"kind": "ptq"}])


# ---------------------------------------------------------------- dynamic
class _TokenMLP(nn.Module):
    """Linear-heavy like a transformer: 4x4 patches -> tokens -> MLP -> mean -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, 7, 4, 7, 4).permute(0, 1, 3, 2, 4).reshape(-1, 49, 16)
        t = self.embed(t)
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def test_dynamic_quantizes_linear_weights_of_a_linear_heavy_model(lite, tmp_path, caplog) -> None:
    cfg, dm, _ = lite
    torch.manual_seed(0)
    model = _TokenMLP()
    step = _steps(tmp_path, "dynamic")[0]
    ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path)
    with caplog.at_level("WARNING"):
        int8 = step.prepare(model, ctx)
    assert "will not speed" not in caplog.text
    rep = step.report
    assert rep["linear_mac_fraction"] > 0.99
    token_weights = 16 * 64 + 64 * 128 + 128 * 64
    assert onnx_weight_dtypes(rep["int8_onnx"])["int8"] >= token_weights
    assert rep["int8_max_abs_diff"] < 0.1 * rep["logit_range"] + 1e-3
    assert int8(torch.randn(7, 1, 28, 28)).shape == (7, 2)


def test_dynamic_warns_on_a_conv_dominated_model(lite, tmp_path, caplog, monkeypatch) -> None:
    cfg, dm, model = lite
    step = DynamicQuantization()
    monkeypatch.setattr(step, "_to_int8", lambda m, ctx: m)  # only the check is under test
    with caplog.at_level("WARNING"):
        step.prepare(model, RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path))
    assert "will not speed" in caplog.text and "litecnn" in caplog.text
    assert step.report["linear_mac_fraction"] < 0.05


# ---------------------------------------------------------------- qat
def test_qat_wrappers_fake_quantise_weights_and_inputs(lite) -> None:
    _, dm, base = lite
    model = copy.deepcopy(base)
    plain = [n for n, m in base.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert wrap_for_qat(model, arch="litecnn") == plain
    layer = model.stages[1].block[0]
    assert isinstance(layer, FakeQuantWrapper)
    assert layer.in_channels == 32 and layer.weight is layer.module.weight  # passthrough
    eff = layer.fake_weight().detach().flatten(1)
    levels = [row.unique().numel() for row in eff]
    assert max(levels) <= 256 and min(levels) > 16  # really rounded, still informative
    assert not torch.equal(eff, layer.module.weight.detach().flatten(1))

    x, y = next(iter(dm.train_dataloader()))
    model.train()
    loss = dm.task.loss(model(x), dm.task.targets(y))
    loss.backward()
    assert torch.isfinite(loss)
    for w in (m for m in model.modules() if isinstance(m, FakeQuantWrapper)):
        assert bool(w.observed)
        g = w.module.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0

    model.eval()
    frozen = (layer.act_min.clone(), layer.act_max.clone())
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        model(x * 3)  # far outside the observed range: eval must not move it
    assert torch.equal(layer.act_min, frozen[0]) and torch.equal(layer.act_max, frozen[1])
    scale, zp = layer.input_qparams()
    xq = torch.fake_quantize_per_tensor_affine(seen["x"], scale, zp, 0, 255)
    assert xq.unique().numel() <= 256
    expect = layer.module._conv_forward(xq, layer.fake_weight(), layer.module.bias)
    assert torch.allclose(seen["y"], expect, atol=1e-5)


def test_qat_raises_on_non_finite_ranges_and_loss(lite) -> None:
    _, dm, base = lite
    model = copy.deepcopy(base)
    wrap_for_qat(model, arch="litecnn")
    with torch.no_grad():
        model.stages[0].block[0].module.weight[0, 0] = float("nan")
    x, _ = next(iter(dm.train_dataloader()))
    with pytest.raises(TrainingError, match=r"qat: fake-quant range of layer stages\.0\.block\.0"):
        model.train()(x)
    guard = QuantizationAwareTraining().callbacks()[0]
    trainer = types.SimpleNamespace(current_epoch=1, global_step=7)
    with pytest.raises(TrainingError, match="zero_init_last"):
        guard.on_before_backward(trainer, None, torch.tensor(float("nan")))


def test_qat_survives_zero_initialised_resnet_blocks() -> None:
    """timm's zero-init last BN gives all-zero channels: the scale floor keeps QAT finite."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2, in_chans=1, img_size=28, zero_init_last=True)
    wrap_for_qat(model, arch="resnet18")
    loss = model.train()(torch.randn(8, 1, 28, 28)).logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_qat_finalize_returns_an_int8_ort_model(lite, tmp_path) -> None:
    cfg, dm, base = lite
    step = _steps(tmp_path, "qat", calibration_batches=4)[0]
    ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path)
    model = step.prepare(copy.deepcopy(base), ctx)
    assert step.report["qat_layers"] == sum(
        isinstance(m, FakeQuantWrapper) for m in model.modules()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=step.lr)
    model.train()
    for _, (x, y) in zip(range(3), dm.train_dataloader(), strict=False):
        loss = dm.task.loss(model(x), dm.task.targets(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    int8 = step.finalize(model, ctx)
    assert isinstance(int8, OrtModel)
    assert not any(isinstance(m, FakeQuantWrapper) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    assert step.report["int8_weight_fraction"] > 0.95
    assert onnx_weight_dtypes(int8.path)["int8"] > 50 * step.report["weight_dtypes_int8"]["float"]
    m_fp32, m_int8, same, _ = _agreement(base, int8, dm)
    assert abs(m_int8["auc"] - m_fp32["auc"]) < 0.05 and same > 0.75


def test_strip_restores_plain_modules_with_trained_weights(lite) -> None:
    _, _, base = lite
    model = copy.deepcopy(base)
    wrap_for_qat(model, skip=("classifier",))
    assert type(model.classifier) is nn.Linear  # the skipped classifier stays plain
    with torch.no_grad():
        model.stem[0].module.weight.add_(1.0)
    assert strip_qat(model) == len([m for m in base.modules() if type(m) is nn.Conv2d])
    assert type(model.stem[0]) is nn.Conv2d
    assert torch.allclose(model.stem[0].weight, base.stem[0].weight + 1.0)


def test_int8_file_on_a_full_disk_is_one_error_and_no_file(lite, tmp_path, monkeypatch) -> None:
    """ONNX Runtime writes the int8 file itself: it goes through a temporary name too, so a
    full disk leaves no half-written model_int8.onnx and is reported as a full disk."""
    import errno
    import os

    from medlite.atomic import DiskFullError

    cfg, dm, model = lite
    step = _steps(tmp_path, "ptq")[0]

    def quantize(src, dst, batches, exclude) -> None:
        dst.write_bytes(b"\x08\x07half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(step, "_quantize", quantize)
    ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path)
    with pytest.raises(DiskFullError, match="model_int8.onnx"):
        step.prepare(copy.deepcopy(model), ctx)
    left = sorted(p.name for p in (tmp_path / "compressed").iterdir())
    assert "model_int8.onnx" not in left and not [n for n in left if ".tmp" in n]


def test_shared_normalisation_parameters_get_private_copies(tmp_path) -> None:
    """Two InstanceNormalization nodes reading one scale/bias pair (how the exporter writes
    GroupNorms) end with a pair each, the originals gone, and the same outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from medlite.compress.quantize import unshare_norm_parameters

    ones = helper.make_tensor("scale", TensorProto.FLOAT, [2], [1.0, 1.0])
    zeros = helper.make_tensor("bias", TensorProto.FLOAT, [2], [0.0, 0.5])
    nodes = [
        helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["h"], name="n1"),
        helper.make_node("InstanceNormalization", ["h", "scale", "bias"], ["y"], name="n2"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4])],
        initializer=[ones, zeros],
    )  # fmt: skip
    path = tmp_path / "norms.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.random.default_rng(0).normal(size=(1, 2, 4)).astype(np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert unshare_norm_parameters(path) == 4
    proto = onnx.load(str(path))
    names = [list(n.input[1:]) for n in proto.graph.node]
    assert len({name for pair in names for name in pair}) == 4  # no parameter shared any more
    assert {i.name for i in proto.graph.initializer} == {name for pair in names for name in pair}
    np.testing.assert_allclose(ort.InferenceSession(str(path)).run(None, {"x": x})[0], before)
    assert unshare_norm_parameters(path) == 0  # nothing left to do


@pytest.mark.slow  # ~35 s: the export of a Mamba U-Net at 128 px (the graph check above is fast)
def test_ultralight_vmunet_int8_loads_in_onnx_runtime_at_128_px(tmp_path) -> None:
    """Its GroupNorms share their exported scale/bias; ORT's quantiser then wired a node to the
    wrong tensor and the int8 file failed to load ("Incompatible dimensions") at 128/256 px."""
    from medlite.compress.quantize import _preprocess
    from medlite.deploy.onnx import export_onnx

    torch.manual_seed(0)
    model = create_model("ultralight_vmunet", num_classes=2, in_chans=3, img_size=128).eval()
    x = torch.randn(1, 3, 128, 128)
    export_onnx(model, x, tmp_path / "fp32.onnx")
    _preprocess(tmp_path / "fp32.onnx", tmp_path / "pre.onnx")
    step = PostTrainingQuantization()
    step._quantize(tmp_path / "pre.onnx", tmp_path / "int8.onnx", [torch.randn(2, 3, 128, 128)], [])
    int8 = OrtModel(tmp_path / "int8.onnx", threads=1)
    out = int8(x)
    assert out.shape == (1, 2, 128, 128) and torch.isfinite(out).all()


def test_reduce_range_auto_follows_the_cpu(monkeypatch) -> None:
    from medlite.compress import quantize as q

    monkeypatch.setattr(q.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(q, "cpu_has_vnni", lambda: False)  # AVX2 only: int8 kernels saturate
    assert q.resolve_reduce_range("auto") is True
    monkeypatch.setattr(q, "cpu_has_vnni", lambda: None)  # flags unreadable: the safe choice
    assert q.resolve_reduce_range("auto") is True
    monkeypatch.setattr(q, "cpu_has_vnni", lambda: True)
    assert q.resolve_reduce_range("auto") is False
    monkeypatch.setattr(q.platform, "machine", lambda: "aarch64")
    assert q.resolve_reduce_range("auto") is False
    assert q.resolve_reduce_range(True) is True and q.resolve_reduce_range(False) is False
    with pytest.raises(ConfigError, match="reduce_range"):
        q.resolve_reduce_range("sometimes")
