"""Every compression family on a volume model: a narrow 3D MobileNetV2 on the generated lesion
volumes (28³), at the step level on one briefly trained network (copied per test)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from medlite.compress import RunContext, build_steps
from medlite.compress.evaluate import evaluate
from medlite.errors import ConfigError
from medlite.models import create_model
from medlite.models.adapters import TeacherInput
from tests.helpers import model_and_context

SMALL = ["data=synthlesion3d", "model=mobilenetv2_3d", "data.augment.enabled=false",
         "max_step_batches=2"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vol_compress")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored below: later in-process runs must not inherit it
    model, ctx = model_and_context(out, SMALL, seed=0)
    task = ctx.datamodule.task
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for x, y in itertools.islice(itertools.cycle(ctx.datamodule.train_dataloader()), 12):
        loss = task.loss(model(x), task.targets(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    return model, ctx


@pytest.fixture
def net(trained, tmp_path, one_thread):
    model, ctx = trained
    return copy.deepcopy(model), RunContext(
        cfg=ctx.cfg, datamodule=ctx.datamodule, output_dir=tmp_path
    )


def _step(spec: dict):
    (step,) = build_steps([spec])
    return step


def _convs3d(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv3d) for m in model.modules())


def test_structured_pruning_removes_conv3d_channels(net) -> None:
    model, ctx = net
    step = _step({"kind": "prune", "ratio": 0.5, "iterative_steps": 1, "epochs": 0,
                  "recover_batches": 0, "round_to": None})  # fmt: skip
    pruned = step.prepare(model, ctx)
    rep = step.report
    assert rep["params_after"] < 0.7 * rep["params_before"]
    assert rep["macs_after"] < 0.7 * rep["macs_before"]
    with torch.no_grad():
        assert pruned(ctx.example_input(2)).shape == (2, 2)
    assert _convs3d(pruned) == _convs3d(model)  # narrower, not fewer, layers


def test_ptq_runs_conv3d_in_int8_on_onnx_runtime(net) -> None:
    model, ctx = net
    step = _step({"kind": "ptq", "calibration_batches": 2})
    int8 = step.prepare(model, ctx)
    rep = step.report
    assert rep["int8_weight_fraction"] > 0.5
    x = ctx.example_input(4)
    with torch.no_grad():
        ref, got = model(x), int8(x)
    assert got.shape == ref.shape == (4, 2)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.75
    assert (ctx.output_dir / "compressed" / "model_int8.onnx").is_file()


def test_unstructured_pruning_sparsifies_conv3d_weights(net) -> None:
    model, ctx = net
    step = _step({"kind": "prune_unstructured", "amount": 0.5, "epochs": 0})
    out = step.prepare(model, ctx)
    weights = [
        m.weight for m in out.modules() if isinstance(m, nn.Conv3d) and m.weight.numel() > 100
    ]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.3


def test_lowrank_refuses_a_3d_cnn_before_training_and_factorises_a_3d_transformer(
    net, tmp_path
) -> None:
    """3D kernels are not factorised: a 3D CNN is refused by the step's pre-training check with
    the reason; a volumetric ViT's Linear layers are factorised."""
    model, ctx = net
    step = _step({"kind": "lowrank", "min_params": 100, "epochs": 0})
    with pytest.raises(ConfigError, match="3D convolutions .Conv3d. is not supported"):
        step.check(model, ctx.example_input(1))
    vit = create_model("vit3d", num_classes=2, in_chans=1, img_size=28, num_layers=2).eval()
    step = _step({"kind": "lowrank", "min_params": 100, "epochs": 0, "rank_ratio": 0.25})
    step.check(vit, ctx.example_input(1))
    out = step.prepare(vit, RunContext(cfg=ctx.cfg, datamodule=ctx.datamodule, output_dir=tmp_path))
    assert step.report["n_factorised"] >= 4
    assert step.report["params_after"] < 0.7 * step.report["params_before"]
    with torch.no_grad():
        assert out(ctx.example_input(2)).shape == (2, 2)


def test_kd_term_from_a_3d_teacher(net) -> None:
    from medlite.compress.kd import LogitDistillation, TeacherRunner

    model, ctx = net
    teacher = create_model("vim3d", num_classes=2, in_chans=1, img_size=28).eval()
    term = LogitDistillation(TeacherRunner(TeacherInput(teacher)), ctx.datamodule.task, 1.0, 4.0)
    x = ctx.example_input(2)
    loss = term(None, x, model(x), None)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_evaluation_of_a_volume_model(net) -> None:
    model, ctx = net
    metrics = evaluate(model, ctx.datamodule.test_dataloader(), ctx.datamodule.task)
    assert 0.0 <= metrics["auc"] <= 1.0
