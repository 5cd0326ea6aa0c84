"""Every compression family on a segmentation network: a small MONAI U-Net on synthseg.

The steps run on one briefly trained U-Net (shared by the module, copied per test) at the step
level, so each test checks what its technique promises on (N, K, H, W) outputs without a whole
training run; one chained recipe (prune -> kd -> ptq) and the distillation teacher's life cycle
run end to end through the pipeline.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from medlite.compress import RunContext, build_steps
from medlite.compress.evaluate import evaluate
from medlite.compress.kd import (
    FeatureDistillation,
    LogitDistillation,
    TeacherRunner,
    auto_feature_layer,
    distillation_loss,
)
from medlite.compress.quantize import FakeQuantWrapper
from medlite.errors import ConfigError
from medlite.models import create_model
from medlite.models.adapters import TeacherInput
from medlite.pipeline import run
from tests.helpers import make_cfg, model_and_context

#: a 12 K-parameter U-Net (two strided stages) on the 64 px synthetic lesion masks
TINY = [
    "data=synthseg",
    "model=unet",
    "model.kwargs.channels=[8,16,32]",
    "model.kwargs.strides=[2,2]",
    "model.kwargs.num_res_units=1",
    "data.augment.enabled=false",
    "max_step_batches=2",
]
#: the U-Net's last layer: a 3x3 conv to one logit map per class
HEAD = "model.2.1.conv.unit0.conv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny U-Net after 30 AdamW batches (val Dice ~0.7) and its context."""
    out = tmp_path_factory.mktemp("seg_compress")
    model, ctx = model_and_context(out, TINY, seed=0)
    task = ctx.datamodule.task
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for x, y in itertools.islice(itertools.cycle(ctx.datamodule.train_dataloader()), 30):
        loss = task.loss(model(x), task.targets(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, ctx


@pytest.fixture
def unet(trained, tmp_path, one_thread):
    """A fresh copy of the trained U-Net, and a context writing into this test's folder."""
    model, ctx = trained
    return copy.deepcopy(model), RunContext(
        cfg=ctx.cfg, datamodule=ctx.datamodule, output_dir=tmp_path
    )


def _dice(model: nn.Module, ctx: RunContext) -> float:
    return evaluate(model, ctx.datamodule.test_dataloader(), ctx.datamodule.task)["dice"]


def _step(spec: dict):
    (step,) = build_steps([spec])
    return step


# ---------------------------------------------------------------- distillation
def test_pixel_distillation_is_the_mean_per_pixel_kl_over_classes() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    t = 2.0
    got = distillation_loss(student, teacher, t, multilabel=False)
    p_t = F.softmax(teacher / t, dim=1)
    per_pixel = (p_t * (F.log_softmax(teacher / t, dim=1) - F.log_softmax(student / t, dim=1))).sum(
        1
    )
    assert per_pixel.shape == (2, 5, 4)
    assert got == pytest.approx(float(per_pixel.mean() * t * t), rel=1e-5)
    assert distillation_loss(teacher.clone(), teacher, t, False) == pytest.approx(0.0, abs=1e-6)
    # a class permutation of the teacher is a different target, a spatial shift of both is not
    assert distillation_loss(student, teacher[:, [2, 0, 1]], t, False) != pytest.approx(float(got))
    assert distillation_loss(student.roll(1, -1), teacher.roll(1, -1), t, False) == pytest.approx(
        float(got), rel=1e-5
    )


def test_logit_kd_term_follows_a_teacher_at_another_resolution(unet) -> None:
    """A dense teacher trained at 128 px gives the student's 64 px maps back (TeacherInput), and
    the loss term compares (N, K, H, W) maps pixel by pixel."""
    model, ctx = unet
    teacher = create_model(
        "unet_monai", num_classes=2, in_chans=1, img_size=128, channels=[8, 16], strides=[2]
    )
    wrapped = TeacherInput(teacher.eval(), size=128).eval()
    x = ctx.example_input(3)
    with torch.no_grad():
        assert wrapped(x).shape == (3, 2, 64, 64)
    term = LogitDistillation(TeacherRunner(wrapped), ctx.datamodule.task, 1.0, 4.0)
    logits = model(x)
    loss = term(None, x, logits, None)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_auto_feature_layer_of_a_unet_is_its_bottleneck(trained) -> None:
    model, ctx = trained
    x = ctx.example_input(1)
    name = auto_feature_layer(model, x)
    assert name == "model.1.submodule.1"  # the deepest stage, as the decoder receives it
    out = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert out["o"].shape[-2:] == (16, 16)  # 64 px after two stride-2 stages
    # a classifier keeps the old rule (the last spatial map before pooling)
    net = create_model("resnet18", num_classes=2, in_chans=1, img_size=64)
    assert auto_feature_layer(net, torch.randn(1, 1, 64, 64)) == "layer4"


def test_auto_feature_layer_without_a_lower_resolution_says_what_to_name() -> None:
    flat = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(ConfigError, match=r"name the layers explicitly.*features\[i\]"):
        auto_feature_layer(flat, torch.randn(1, 1, 16, 16))


def test_kd_step_distils_logit_maps_and_bottleneck_features(unet) -> None:
    model, ctx = unet
    teacher = create_model(
        "unet_monai",
        num_classes=2,
        in_chans=1,
        img_size=64,
        channels=[8, 16, 32, 32],
        strides=[2, 2, 2],
        num_res_units=1,
    ).eval()
    ctx.teacher = TeacherInput(teacher)
    step = _step(
        {
            "kind": "kd",
            "epochs": 1,
            "features": [{"kind": "fitnet"}, {"kind": "attention", "weight": 10.0}],
        }
    )
    step.prepare(model, ctx)
    feats = step.report["features"]
    assert feats[0]["student"] == "model.1.submodule.1"
    assert feats[0]["teacher"] == "model.1.submodule.1.submodule.1"  # one stage deeper
    assert feats[0]["teacher_shape"][1:] == [8, 8] and feats[0]["student_shape"][1:] == [16, 16]
    x, y = next(iter(ctx.datamodule.train_dataloader()))
    model.train()
    logits = model(x)
    assert logits.shape == (len(x), 2, 64, 64)
    terms = step.loss_terms()
    values = [term(None, x, logits, y) for term in terms]
    assert all(v.ndim == 0 and torch.isfinite(v) for v in values)
    sum(values).backward()
    fitnet = next(t for t in terms if isinstance(t, FeatureDistillation) and t.kind == "fitnet")
    assert fitnet.adapter.weight.grad is not None  # the 1x1 adapter trains with the student
    step.finalize(model, ctx)


# ---------------------------------------------------------------- pruning
def test_structured_pruning_shrinks_the_unet_and_keeps_its_head(unet) -> None:
    model, ctx = unet
    dice_before = _dice(model, ctx)
    step = _step(
        {"kind": "prune", "ratio": 0.5, "iterative_steps": 2, "recover_batches": 2, "epochs": 0}
    )
    pruned = step.prepare(model, ctx)
    rep = step.report
    assert rep["classifier"] == [HEAD]
    assert rep["macs_after"] < 0.75 * rep["macs_before"]
    assert rep["params_after"] < rep["params_before"]
    head = pruned.get_submodule(HEAD)
    assert head.out_channels == 2  # one logit map per class, as before
    with torch.no_grad():
        assert pruned(ctx.example_input(3)).shape == (3, 2, 64, 64)
    # a pruned network still segments (two recovery batches, no fine-tuning yet)
    assert 0.0 <= _dice(pruned, ctx) <= 1.0 and dice_before > 0.3


def test_pruning_through_skip_concatenations_removes_the_same_channels_everywhere(unet) -> None:
    """Channels of the first encoder stage that carry nothing (zero producers and consumers,
    the decoder's skip-concatenation included) are the ones pruned, and the network computes
    exactly what it computed before: the concatenation's channel bookkeeping is right."""
    model, ctx = unet
    dead = [1, 3, 5, 6]
    with torch.no_grad():
        for name in ("model.0.conv.unit0.conv", "model.0.residual"):  # added by the residual
            layer = model.get_submodule(name)
            layer.weight[dead] = 0
            layer.bias[dead] = 0
        for name in ("model.1.submodule.0.conv.unit0.conv", "model.1.submodule.0.residual"):
            model.get_submodule(name).weight[:, dead] = 0
        up = model.get_submodule("model.2.0.conv")  # ConvTranspose2d over cat([skip, decoder])
        assert up.in_channels == 16
        up.weight[dead] = 0  # (in, out, k, k): the skip's channels come first
    x = ctx.example_input(4)
    with torch.no_grad():
        before = model(x)
    kept_up = model.get_submodule("model.2.0.conv").weight[[0, 2, 4, 7, *range(8, 16)]].clone()
    step = _step(
        {
            "kind": "prune",
            "ratio": 0.5,
            "iterative_steps": 1,
            "recover_batches": 0,
            "round_to": None,
            "ignore": ["model.1", "model.2"],  # only the first stage's channels may go
            "epochs": 0,
        }
    )
    pruned = step.prepare(model, ctx)
    assert pruned.get_submodule("model.0.conv.unit0.conv").out_channels == 4
    up = pruned.get_submodule("model.2.0.conv")
    assert up.in_channels == 12  # 4 skip channels + 8 decoder channels
    assert torch.equal(up.weight, kept_up)
    with torch.no_grad():
        after = pruned(x)
    assert torch.allclose(after, before, atol=1e-5)


def test_the_default_unet_prunes(tmp_path, one_thread) -> None:
    """The full-size config (5 levels, 2 residual units each, PReLU everywhere) builds its
    dependency graph and prunes."""
    model, ctx = model_and_context(tmp_path, ["data=synthseg", "model=unet"], seed=0)
    step = _step(
        {"kind": "prune", "ratio": 0.5, "iterative_steps": 1, "recover_batches": 0, "epochs": 0}
    )
    step.prepare(model, ctx)
    assert step.report["speedup"] > 2.0 and step.report["classifier"] == [HEAD]


def test_unstructured_pruning_leaves_the_head_dense(unet) -> None:
    model, ctx = unet
    step = _step({"kind": "prune_unstructured", "amount": 0.5, "recover_batches": 1, "epochs": 0})
    pruned = step.finalize(step.prepare(model, ctx), ctx)
    rep = step.report
    assert rep["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert rep["kept_dense"] == [HEAD]
    assert int((pruned.get_submodule(HEAD).weight == 0).sum()) == 0
    assert 0.0 <= _dice(pruned, ctx) <= 1.0


# ---------------------------------------------------------------- low rank
def test_lowrank_factorises_the_unet_convs_but_not_its_head(unet) -> None:
    model, ctx = unet
    step = _step({"kind": "lowrank", "min_params": 1000, "epochs": 0})
    out = step.prepare(model, ctx)
    rep = step.report
    assert rep["n_factorised"] >= 2
    assert rep["params_after"] < rep["params_before"] and rep["macs_after"] < rep["macs_before"]
    assert {"name": HEAD, "reason": "classifier head (skip_head)"} in rep["skipped"]
    with torch.no_grad():
        assert out(ctx.example_input(2)).shape == (2, 2, 64, 64)


# ---------------------------------------------------------------- int8
def test_ptq_gives_int8_weights_and_keeps_the_dice(unet) -> None:
    model, ctx = unet
    dice = _dice(model, ctx)
    step = _step({"kind": "ptq", "calibration_batches": 2})
    int8 = step.prepare(model, ctx)
    rep = step.report
    assert rep["int8_weight_fraction"] > 0.9
    # calibration read (x, mask) batches of images: max_step_batches=2 batches of 16
    assert rep["calibration_images"] == 2 * ctx.datamodule.batch_size
    assert rep["int8_argmax_agreement"] > 0.9  # per pixel
    with torch.no_grad():
        assert int8(ctx.example_input(3)).shape == (3, 2, 64, 64)  # dynamic batch
    assert abs(_dice(int8, ctx) - dice) < 0.05
    assert (ctx.output_dir / "compressed" / "model_int8.onnx").is_file()


def test_ptq_can_keep_the_conv_head_in_fp32(unet) -> None:
    model, ctx = unet
    step = _step({"kind": "ptq", "calibration_batches": 1, "quantize_classifier": False})
    step.prepare(model, ctx)
    assert len(step.report["excluded_nodes"]) == 1  # the head conv's node, found by its weight


def test_qat_fake_quantises_the_unet_then_converts(unet) -> None:
    model, ctx = unet
    step = _step({"kind": "qat", "epochs": 1, "calibration_batches": 2})
    model = step.prepare(model, ctx)
    assert step.report["qat_layers"] == sum(
        isinstance(m, FakeQuantWrapper) for m in model.modules()
    )
    task = ctx.datamodule.task
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for x, y in itertools.islice(ctx.datamodule.train_dataloader(), 2):  # what training does
        loss = task.loss(model(x), task.targets(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    int8 = step.finalize(model, ctx)
    assert step.report["int8_weight_fraction"] > 0.9
    assert 0.0 <= _dice(int8, ctx) <= 1.0


def test_dynamic_int8_of_a_convolutional_unet_converts_its_convs(unet, caplog) -> None:
    model, ctx = unet
    step = _step({"kind": "dynamic"})
    int8 = step.prepare(model, ctx)
    rep = step.report
    assert (
        rep["settings"]["op_types"] == ["MatMul", "Conv"] and "no nn.Linear" in rep["op_types_note"]
    )
    assert rep["weight_dtypes_int8"].get("int8", 0) > 0
    assert "no nn.Linear" in caplog.text
    with torch.no_grad():
        assert int8(ctx.example_input(2)).shape == (2, 2, 64, 64)


# ---------------------------------------------------------------- whole recipes
FAST = ["debug=limit", "callbacks=none", *TINY]


def _run(out: Path, overrides: list[str], tiny_unet: bool = True) -> dict:
    base = FAST if tiny_unet else ["debug=limit", "callbacks=none", "data=synthseg"]
    run(make_cfg(out, [*base, *overrides]))
    return json.loads((out / "results.json").read_text())


def test_prune_kd_ptq_chain_on_segmentation(tmp_path: Path, one_thread) -> None:
    res = _run(
        tmp_path / "run",
        [
            "compress=prune_kd_ptq",
            "compress.steps.0.recover_batches=2",
        ],
    )
    assert res["status"] == "ok"
    comp = res["compression"]
    assert [s["stage"] for s in comp["stages"]] == ["before", "prune", "kd", "ptq/onnx_fp32", "ptq"]
    # every stage is measured with the task's metrics: Dice and IoU head the table
    assert res["task"]["headline"] == ["dice", "iou"]
    for stage in comp["stages"]:
        assert {"dice", "iou", "hd95"} <= set(stage["test"])
        assert 0.0 <= stage["test"]["dice"] <= 1.0
    assert comp["stages"][1]["efficiency"]["macs"] < comp["stages"][0]["efficiency"]["macs"]
    assert comp["steps"][1]["report"]["teacher"] == "base"
    ptq = comp["steps"][2]["report"]
    assert ptq["int8_weight_fraction"] > 0.9
    fp32_row, int8_row = comp["stages"][3]["test"], comp["stages"][4]["test"]
    assert abs(fp32_row["dice"] - int8_row["dice"]) < 0.1  # a barely trained net: loose
    assert res["test"] == int8_row


def test_synthseg_distils_from_a_unet_teacher_by_default(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["data=synthseg"])
    assert cfg.teacher.name == "unet" and cfg.teacher.task == "segmentation"


@pytest.mark.slow
def test_segmentation_teacher_is_trained_once_then_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    common = [
        "compress=kd",
        f"paths.cache_dir={cache}",
        "max_phase_epochs=1",
        "teacher.kwargs.channels=[8,16,32,32]",
        "teacher.kwargs.strides=[2,2,2]",
        "teacher.kwargs.num_res_units=1",
    ]
    first = _run(tmp_path / "a", common)
    info = first["compression"]["teacher"]
    assert info["source"] == "train" and info["name"] == "unet" and Path(info["cached"]).is_file()
    assert {"dice", "iou"} <= set(info["test"])
    assert [s["stage"] for s in first["compression"]["stages"]] == ["teacher", "kd"]
    second = _run(tmp_path / "b", common)
    assert second["compression"]["teacher"]["source"] == "cache"
    assert second["compression"]["teacher"]["test"] == pytest.approx(info["test"])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["prune", "prune_unstructured", "lowrank", "qat", "kd_feat"])
def test_recipe_runs_on_segmentation(recipe: str, tmp_path: Path) -> None:
    extra = {
        "prune": ["compress.steps.0.recover_batches=2"],
        "prune_unstructured": ["compress.steps.0.recover_batches=2"],
        "lowrank": ["compress.steps.0.min_params=1000"],
        "kd_feat": [
            "teacher.kwargs.channels=[8,16,32,32]",
            "teacher.kwargs.strides=[2,2,2]",
            "max_phase_epochs=1",
        ],
    }.get(recipe, [])
    res = _run(tmp_path / "run", [f"compress={recipe}", *extra])
    assert res["status"] == "ok"
    assert all("dice" in s["test"] for s in res["compression"]["stages"])


@pytest.mark.slow  # two ONNX exports per model: 40-65 s each on 2 busy cores
@pytest.mark.parametrize(
    ("model", "paradigm"),
    [("egeunet", "cnn"), ("unet_mobilevit", "transformer"), ("ultralight_vmunet", "linear")],
)
def test_int8_on_one_small_model_per_paradigm(model, paradigm, tmp_path: Path, one_thread):
    """Static int8 through ONNX Runtime on a segmentation network of each paradigm: quantised
    weights, Dice and IoU measured on the int8 session like every other stage."""
    res = _run(
        tmp_path / "run",
        [f"model={model}", "compress=ptq", "max_step_batches=2", "data.augment.enabled=false"],
        tiny_unet=False,
    )
    assert res["status"] == "ok" and res["model"]["paradigm"] == paradigm
    assert res["compression"]["steps"][-1]["report"]["int8_weight_fraction"] > 0.5
    before, after = res["compression"]["stages"][0], res["compression"]["stages"][-1]
    assert after["stage"] == "ptq" and {"dice", "iou", "hd95"} <= set(after["test"])
    # (no size check: for a 50 K-parameter network the graph and its quantisation scales weigh
    # more than the 150 KB int8 saves)
    assert before["stage"] == "before" and after["efficiency"]["params"] == res["model"]["params"]


def test_ultralight_vmunet_distils_from_a_unet_teacher(tmp_path: Path, one_thread) -> None:
    """The issue's example: a linear-complexity student distilled per pixel from the U-Net."""
    res = _run(
        tmp_path / "run",
        [
            "model=ultralight_vmunet",
            "compress=kd",
            "max_phase_epochs=1",
            "teacher.kwargs.channels=[8,16,32,32]",
            "teacher.kwargs.strides=[2,2,2]",
            "teacher.kwargs.num_res_units=1",
        ],
        tiny_unet=False,
    )
    comp = res["compression"]
    assert comp["teacher"]["name"] == "unet" and comp["teacher"]["source"] == "train"
    assert [s["stage"] for s in comp["stages"]] == ["teacher", "kd"]
    assert comp["steps"][0]["report"]["w_kd"] > 0 and 0.0 <= res["test"]["dice"] <= 1.0
