"""Knowledge distillation: the loss, the teacher's life cycle, feature layers, and whole runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from medlite.build import build_datamodule
from medlite.compress import RunContext, build_steps
from medlite.compress.kd import TeacherInput, attention_map, auto_feature_layer, distillation_loss
from medlite.errors import ConfigError
from medlite.models import create_model
from medlite.models.adapters import LogitEnsemble
from medlite.pipeline import run
from tests.helpers import make_cfg

FAST = ["debug=limit", "callbacks=none"]


def _run(out: Path, overrides: list[str]) -> dict:
    run(make_cfg(out, FAST + overrides))
    return json.loads((out / "results.json").read_text())


# ---------------------------------------------------------------- the loss itself
@pytest.mark.parametrize("multilabel", [False, True])
def test_distillation_loss_is_zero_only_when_student_matches_teacher(multilabel: bool) -> None:
    torch.manual_seed(0)
    teacher = torch.randn(16, 5)
    same = distillation_loss(teacher.clone(), teacher, 4.0, multilabel)
    other = distillation_loss(torch.randn(16, 5), teacher, 4.0, multilabel)
    if multilabel:  # soft BCE has the teacher's entropy as its minimum
        soft = torch.sigmoid(teacher / 4.0)
        entropy = nn.functional.binary_cross_entropy(soft, soft) * 16.0
        assert same == pytest.approx(float(entropy), abs=1e-5)
        assert other > same
    else:
        assert same == pytest.approx(0.0, abs=1e-6)
        assert other > 0.01


def test_distillation_gradient_pulls_student_towards_teacher() -> None:
    teacher = torch.tensor([[3.0, -1.0, 0.0]])
    student = torch.zeros(1, 3, requires_grad=True)
    distillation_loss(student, teacher, 2.0, False).backward()
    step = -student.grad[0]
    assert step.argmax() == 0 and step.argmin() == 1  # towards the teacher's ranking


def test_teacher_input_renormalises_and_resizes() -> None:
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean((2, 3))

    raw = torch.rand(2, 1, 28, 28)
    student_x = (raw - 0.5) / 0.5
    wrapped = TeacherInput(
        Probe(), size=56, student_norm=([0.5], [0.5]), teacher_norm=([0.2], [0.3])
    )
    wrapped(student_x)
    expected = nn.functional.interpolate((raw - 0.2) / 0.3, size=(56, 56), mode="bilinear")
    assert seen["x"].shape == (2, 1, 56, 56)
    assert torch.allclose(seen["x"], expected, atol=1e-5)


def test_attention_map_is_unit_norm_and_spatial() -> None:
    at = attention_map(torch.randn(3, 8, 7, 7))
    assert at.shape == (3, 49) and torch.allclose(at.norm(dim=1), torch.ones(3))


def test_auto_feature_layer_is_the_last_spatial_map() -> None:
    net = create_model("resnet18", num_classes=2, in_chans=1, img_size=64)
    assert (
        auto_feature_layer(net, torch.randn(1, 1, 64, 64)) == "layer4"
    )  # the last stage (hooks fire as modules finish)


# ---------------------------------------------------------------- config mistakes
def test_bad_kd_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        build_steps([{"kind": "kd", "temperature": 0, "epochs": 1}])
    with pytest.raises(ConfigError, match="teacher must be one of"):
        build_steps([{"kind": "kd", "teacher": "oracle", "epochs": 1}])
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_steps([{"kind": "kd", "alpha": 0.5, "epochs": 1}])


def test_wrong_feature_layer_names_the_nearest_valid_ones(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["model=litecnn"])
    dm = build_datamodule(cfg)
    dm.setup()
    student = create_model("litecnn", num_classes=2, in_chans=1, img_size=28)
    teacher = create_model("resnet18", num_classes=2, in_chans=1, img_size=28).eval()
    ctx = RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path, teacher=teacher)
    (step,) = build_steps(
        [{"kind": "kd", "epochs": 1, "features": [{"student": "auto", "teacher": "layer9"}]}]
    )
    with pytest.raises(ConfigError, match=r"'layer9' does not exist.*did you mean.*layer"):
        step.prepare(student, ctx)


def test_kd_without_a_teacher_group_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no teacher is configured"):
        run(make_cfg(tmp_path / "run", FAST + ["compress=kd", "~teacher"]))
    assert not (tmp_path / "run").exists()


def test_missing_teacher_checkpoint_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        run(make_cfg(tmp_path / "run", FAST + ["compress=kd", "teacher.ckpt_path=/nope.ckpt"]))


# ---------------------------------------------------------------- whole runs
def _metric_by_epoch(csv_path: Path, name: str) -> list[float]:
    with open(csv_path) as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


def test_kd_from_a_checkpoint_teacher_trains_student_and_leaves_teacher_unchanged(
    tmp_path: Path,
) -> None:
    first = _run(tmp_path / "teacher", ["model=resnet18"])
    ckpt = tmp_path / "teacher" / first["best_checkpoint"]  # recorded relative to the run
    before = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    res = _run(
        tmp_path / "student",
        [
            "compress=kd",
            "teacher=resnet18",
            f"teacher.ckpt_path={ckpt}",
            "max_phase_epochs=4",
            "data.augment.enabled=false",
        ],
    )
    assert res["status"] == "ok"
    comp = res["compression"]
    assert [s["stage"] for s in comp["stages"]] == ["teacher", "kd"]
    assert comp["teacher"]["source"] == "ckpt"
    assert comp["stages"][0]["efficiency"]["params"] > 10 * res["model"]["params"]
    after = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the teacher is not part of the student's checkpoints
    kd_ckpt = next((tmp_path / "student" / "checkpoints" / "kd").glob("best-*.ckpt"))
    state = torch.load(kd_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("teacher" in k for k in state)
    kd_loss = _metric_by_epoch(tmp_path / "student" / "metrics.csv", "kd/train/loss_kd")
    assert len(kd_loss) == 4 and kd_loss[-1] < kd_loss[0]


def test_teacher_is_trained_once_then_reused_from_the_cache(tmp_path: Path) -> None:
    from tests.compress.test_teacher_cache import TINY_TEACHER

    # no debug caps (a teacher trained under them is never cached): one short, whole epoch
    common = [
        "compress=kd",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "callbacks=none",
        "profile.enabled=false",
        "trainer.max_epochs=1",
        "compress.steps.0.epochs=1",
        *TINY_TEACHER,
    ]

    def full_run(out: Path, overrides: list[str]) -> dict:
        run(make_cfg(out, overrides))
        return json.loads((out / "results.json").read_text())

    first = full_run(tmp_path / "a", common)
    info = first["compression"]["teacher"]
    assert info["source"] == "train" and Path(info["cached"]).is_file()
    assert info["path"] == "teacher/teacher.ckpt"  # the run keeps its own copy, relative
    assert (tmp_path / "a" / info["path"]).is_file()
    second = full_run(tmp_path / "b", common)
    assert second["compression"]["teacher"]["source"] == "cache"
    assert second["compression"]["teacher"]["test"] == pytest.approx(info["test"])
    # a different seed is a different teacher
    third = full_run(tmp_path / "c", [*common, "seed=7"])
    assert third["compression"]["teacher"]["source"] == "train"


def test_logit_ensemble_averages_its_members() -> None:
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    assert torch.allclose(LogitEnsemble([a, b])(x), (a(x) + b(x)) / 2)


def test_an_ensemble_teacher_trains_each_member_and_is_cached_whole(tmp_path: Path) -> None:
    from tests.compress.test_teacher_cache import TINY_TEACHER

    common = [
        "compress=kd",
        "teacher.members=2",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "callbacks=none",
        "profile.enabled=false",
        "trainer.max_epochs=1",
        "compress.steps.0.epochs=1",
        *TINY_TEACHER,
    ]
    run(make_cfg(tmp_path / "a", common))
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    info = first["compression"]["teacher"]
    assert info["source"] == "train" and len(info["members_val"]["auc"]) == 2
    # each member trained as its own phase, from its own initialisation
    for k in (0, 1):
        assert list((tmp_path / "a" / f"teacher/member{k}/checkpoints").glob("best-*.ckpt"))
    state = torch.load(tmp_path / "a" / info["path"], map_location="cpu", weights_only=True)
    weights = state["state_dict"]
    w0, w1 = (weights[f"model.members.{k}.stem.0.weight"] for k in (0, 1))
    assert w0.shape == w1.shape and not torch.equal(w0, w1)
    run(make_cfg(tmp_path / "b", common))
    second = json.loads((tmp_path / "b" / "results.json").read_text())["compression"]["teacher"]
    assert second["source"] == "cache" and second["test"] == pytest.approx(info["test"])


def test_an_ensemble_teacher_with_feature_kd_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="teacher.members=2 averages 2 networks"):
        run(make_cfg(tmp_path / "run", FAST + ["compress=kd_feat", "teacher.members=2"]))
    assert not (tmp_path / "run" / "teacher").exists()
    with pytest.raises(ConfigError, match="teacher.members=0 must be a whole number"):
        run(make_cfg(tmp_path / "run0", FAST + ["compress=kd", "teacher.members=0"]))


def test_feature_kd_trains_the_adapter_with_the_student(tmp_path: Path) -> None:
    res = _run(tmp_path / "run", ["compress=kd_feat", "max_phase_epochs=1"])
    assert res["status"] == "ok"
    (step,) = res["compression"]["steps"]
    layers = step["report"]["features"]
    assert {f["kind"] for f in layers} == {"fitnet", "attention"}
    assert layers[0]["student"] and layers[0]["teacher"].startswith("layer")
    kd_ckpt = next((tmp_path / "run" / "checkpoints" / "kd").glob("last*.ckpt"))
    state = torch.load(kd_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    adapters = [k for k in state if "adapter" in k]
    assert adapters, "the FitNet adapter must be trained (and saved) with the student"


@pytest.mark.parametrize(
    "flag", ["synthlesion_multiclass", "synthlesion_multilabel", "synthlesion_ordinal"]
)
def test_kd_works_for_every_task_type(tmp_path: Path, flag: str) -> None:
    res = _run(tmp_path / "run", [f"data.flag={flag}", "compress=kd", "max_phase_epochs=1"])
    assert res["status"] == "ok" and 0.0 <= res["test"]["auc"] <= 1.0
    kd_loss = _metric_by_epoch(tmp_path / "run" / "metrics.csv", "kd/train/loss_kd")
    assert kd_loss and all(v == v and v >= 0 for v in kd_loss)  # finite, non-negative
