"""Every compress config end to end on real data (BreastMNIST, debug-sized), and chain semantics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medlite.compress.structure import load_compressed
from medlite.errors import ConfigError
from medlite.pipeline import run
from tests.helpers import CONF_DIR, make_cfg

RECIPES = sorted(p.stem for p in (CONF_DIR / "compress").glob("*.yaml") if p.stem != "none")
FAST = ["debug=limit", "callbacks=none"]


def _run(out: Path, overrides: list[str], data: str = "breastmnist") -> dict:
    run(make_cfg(out, [*FAST, f"data={data}", *overrides]))
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, shared_data: Path) -> str:
    """One briefly trained LiteCNN on BreastMNIST, the base every recipe starts from."""
    out = tmp_path_factory.mktemp("base")
    res = _run(out, [f"paths.data_dir={shared_data}"])
    return str(out / res["best_checkpoint"])


def _stage(res: dict, name: str) -> dict:
    return next(s for s in res["compression"]["stages"] if s["stage"] == name)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_on_breastmnist(recipe: str, tmp_path: Path, shared_data, base_ckpt) -> None:
    quick = ["compress.steps.0.recover_batches=2"] if recipe.startswith("prune") else []
    res = _run(
        tmp_path / "run",
        [
            f"paths.data_dir={shared_data}",
            f"compress={recipe}",
            f"compress.base_ckpt={base_ckpt}",
            *quick,
        ],
    )
    assert res["status"] == "ok"
    comp = res["compression"]
    stages = comp["stages"]
    first = "teacher" if comp["base"] == "scratch" else "before"
    assert stages[0]["stage"] == first
    assert res["test"] == stages[-1]["test"] and 0.0 <= res["test"]["auc"] <= 1.0
    kinds = [s["kind"] for s in comp["steps"]]
    assert kinds == res["compress"]["steps"]
    before, after = stages[0]["efficiency"], stages[-1]["efficiency"]
    report = comp["steps"][-1]["report"]
    if kinds[-1] in ("ptq", "qat", "dynamic"):
        # the weights really are 8-bit (dynamic int8 converts only Linear weights: few in a CNN)
        assert report["int8_weight_fraction"] > (0.0 if kinds[-1] == "dynamic" else 0.9)
        assert res["compression"]["saved"].endswith("model_int8.onnx")
        # the fp32 ONNX export computes what the PyTorch model computes (a briefly trained
        # model has near-tied scores, so its AUC may move a little on 1e-6 differences)
        assert report["fp32_onnx_max_abs_diff"] < 1e-4
        names = [s["stage"] for s in stages]
        fp32_row = names.index(f"{kinds[-1]}/onnx_fp32")
        assert stages[fp32_row]["test"]["auc"] == pytest.approx(
            stages[fp32_row - 1]["test"]["auc"], abs=0.01
        )
        if kinds[-1] != "dynamic":  # a CNN has almost no Linear weights for dynamic int8
            assert before["size_mb"] / after["size_mb"] > 2.5
    if kinds[-1] in ("prune",):
        assert after["macs"] < 0.6 * before["macs"]  # ratio 0.5 of channels: ~4x fewer MACs
        model = load_compressed(tmp_path / "run" / res["compression"]["saved"])
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 2)  # saved and loads
    if kinds[-1] == "prune_unstructured":
        assert report["sparsity"] == pytest.approx(0.5, abs=0.02)
    if kinds[-1] == "lowrank":
        assert after["params"] < before["params"] and after["macs"] < before["macs"]
    if kinds[-1] == "kd":
        assert comp["teacher"]["source"] in ("train", "cache")


def test_chain_runs_its_steps_in_order(tmp_path: Path, shared_data, base_ckpt) -> None:
    res = _run(
        tmp_path / "run",
        [
            f"paths.data_dir={shared_data}",
            "compress=prune_kd_ptq",
            f"compress.base_ckpt={base_ckpt}",
            "compress.steps.0.recover_batches=2",
        ],
    )
    comp = res["compression"]
    assert [s["kind"] for s in comp["steps"]] == ["prune", "kd", "ptq"]
    assert [s["stage"] for s in comp["stages"]] == [
        "before",
        "prune",
        "kd",
        "ptq/onnx_fp32",
        "ptq",
    ]
    assert comp["steps"][1]["report"]["teacher"] == "base"  # distilled from the unpruned model
    # what KD recovered of the gap pruning opened, measured against the unpruned teacher
    recovery = comp["steps"][1]["report"]["recovery"]["val"]
    before, pruned, kd = (_stage(res, s)["val"]["auc"] for s in ("before", "prune", "kd"))
    assert (recovery["teacher"], recovery["student_before"], recovery["student_after"]) == (
        before,
        pruned,
        kd,
    )
    if before > pruned:
        assert recovery["recovered_share"] == pytest.approx((kd - pruned) / (before - pruned))
    pruned_macs = _stage(res, "prune")["efficiency"]["macs"]
    assert pruned_macs < 0.6 * _stage(res, "before")["efficiency"]["macs"]
    assert _stage(res, "kd")["efficiency"]["macs"] == pruned_macs  # KD fine-tunes, no rebuild
    assert (tmp_path / "run" / "checkpoints" / "kd").is_dir()


def test_a_user_chain_from_the_command_line(tmp_path: Path) -> None:
    res = _run(
        tmp_path / "run",
        [
            "compress.name=mine",
            "compress.steps=[{kind: prune_unstructured, amount: 0.3, epochs: 1}, {kind: ptq}]",
        ],
        data="synthetic",
    )
    assert [s["stage"] for s in res["compression"]["stages"]] == [
        "before",
        "prune_unstructured",
        "ptq/onnx_fp32",
        "ptq",
    ]


def test_int8_step_must_be_last(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be the last step"):
        run(make_cfg(tmp_path / "run", ["compress.steps=[{kind: ptq}, {kind: lowrank}]"]))
    assert not (tmp_path / "run").exists()


def test_unsupported_model_fails_before_training_naming_model_and_step(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"compress step prune.*Vim.*prune_unstructured"):
        run(make_cfg(tmp_path / "run", ["model=vim", "compress=prune"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_linear_complexity_model_quantises_to_int8(tmp_path: Path) -> None:
    """Vim exports (medlite's scan has an export path), so int8 on ONNX Runtime works for it."""
    res = _run(tmp_path / "run", ["model=vim", "compress=ptq"], data="synthetic")
    report = res["compression"]["steps"][0]["report"]
    assert report["int8_weight_fraction"] > 0.5
    assert abs(_stage(res, "ptq")["test"]["auc"] - _stage(res, "before")["test"]["auc"]) < 0.02


def test_headline_mobilevit_with_kd(tmp_path: Path) -> None:
    """`python train.py model=mobilevit compress=kd` works out of the box (here debug-sized)."""
    res = _run(tmp_path / "run", ["model=mobilevit", "compress=kd"], data="synthetic")
    assert res["status"] == "ok" and res["model"]["paradigm"] == "transformer"
    assert [s["stage"] for s in res["compression"]["stages"]] == ["teacher", "kd"]
