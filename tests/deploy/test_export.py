"""Export of a trained run: every format checked against PyTorch on the real test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medlite.deploy import export as export_mod
from medlite.deploy import onnx as onnx_mod
from medlite.deploy.export import (
    ExportError,
    ExportSettings,
    _metric_drop,
    _torch_export,
    export_run,
    settings_from_config,
)
from medlite.deploy.onnx import OnnxExportError, OrtModel, export_onnx, onnx_weight_dtypes
from medlite.deploy.run_dir import TrainedRun
from medlite.errors import ConfigError
from medlite.tasks import BINARY, ORDINAL, ClassificationTask, calibration
from tests.helpers import model_and_context, optional_formats


def _export(run_dir: Path) -> dict:
    return json.loads((run_dir / "export" / "export.json").read_text())


def test_train_with_export_writes_checked_formats(exported_run: Path):
    rec = _export(exported_run)
    results = json.loads((exported_run / "results.json").read_text())
    assert rec["status"] == "ok" and rec["problems"] == []
    assert rec["n_test_images"] == 156  # the whole official BreastMNIST test split
    # the reference pass is the trained model itself: same metrics as training's test
    assert rec["reference"]["test"]["auc"] == pytest.approx(results["test"]["auc"], abs=1e-6)
    fmts = rec["formats"]
    assert set(fmts) == {"onnx_fp32", "onnx_int8", "torch_export", *optional_formats()}
    for name in ("onnx_fp32", "torch_export"):
        assert fmts[name]["parity"]["max_abs_diff"] < 1e-4
        assert fmts[name]["parity"]["label_agreement"] == 1.0
        assert fmts[name]["test"]["auc"] == pytest.approx(rec["reference"]["test"]["auc"], abs=1e-6)
    int8 = fmts["onnx_int8"]
    # the bar: int8 within one AUC point of fp32 on BreastMNIST
    assert abs(int8["test"]["auc"] - fmts["onnx_fp32"]["test"]["auc"]) <= 0.01
    # int8's check is on the task's monitored metric, named in the record
    assert rec["task"] == results["task"]
    metric = results["task"]["monitor"].split("/")[-1]
    assert int8["parity"]["metric"] == metric
    drop = rec["reference"]["test"][metric] - int8["test"][metric]
    assert int8["parity"]["drop"] == pytest.approx(drop)
    assert int8["parity"]["tolerance"] == {"drop": ExportSettings().int8_max_drop}
    assert int8["parity"]["ok"] is True
    counts = onnx_weight_dtypes(exported_run / int8["path"])
    assert counts.get("int8", 0) > 0.9 * sum(counts.values())
    assert int8["size_mb"] < 0.5 * fmts["onnx_fp32"]["size_mb"]
    for name, entry in fmts.items():
        assert not Path(entry["path"]).is_absolute(), name  # relative to the run directory
        assert (exported_run / entry["path"]).is_file(), name
    # no exporter debugging metadata (stack traces with local source paths) in shipped files
    assert b'.py", line' not in (exported_run / fmts["onnx_fp32"]["path"]).read_bytes()


def test_exported_files_run_on_their_own(exported_run: Path, shared_data: Path):
    """The files alone (no medlite model code) give the logits the run's model gives, divided
    by the temperature the run fitted (so their softmax is the calibrated probability)."""
    run = TrainedRun.load(exported_run)
    t = calibration.temperature_of(run.results)
    assert t is not None and float(t) != 1.0
    model = calibration.TemperatureScaled(run.torch_model(), t)
    test = np.load(shared_data / "breastmnist.npz")["test_images"][:5]
    x = torch.stack([run.preprocess(img) for img in test])
    with torch.no_grad():
        ref = model(x)
    ort = OrtModel(run.export_dir / "model.onnx")
    assert torch.allclose(ort(x), ref, atol=1e-4)
    program = torch.export.load(str(run.export_dir / "model.pt2")).module()
    assert torch.allclose(program(x), ref, atol=1e-5)


def test_model_card_is_complete(exported_run: Path):
    card = json.loads((exported_run / "model_card.json").read_text())
    task = json.loads((exported_run / "results.json").read_text())["task"]
    assert card["task"]["classes"] == ["malignant", "normal, benign"]
    assert card["task"]["dataset"] == "breastmnist"
    assert card["task"]["metrics"] == task["metrics"] and card["task"]["monitor"] == task["monitor"]
    assert card["input"]["shape"] == [1, 28, 28] and card["input"]["mean"] == [0.5]
    assert set(task["metrics"]) <= set(card["metrics"]["test"])
    monitored = task["monitor"].split("/")[-1]
    assert card["training_data"]["checkpoint_selection"] == (
        f"best validation {task['titles'][monitored]}"
    )
    assert set(card["metrics"]["test_by_runtime"]) == {
        "pytorch",
        "onnx_fp32",
        "onnx_int8",
        "torch_export",
        *optional_formats(),
    }
    assert card["export"]["formats"]["onnx_int8"]["parity"]["ok"] is True
    assert card["versions"]["onnxruntime"] and card["versions"]["torch"]
    md = (exported_run / "model_card.md").read_text()
    for heading in ("Intended use and limitations", "Input specification", "Export parity"):
        assert f"## {heading}" in md
    assert "not a medical device" in md
    titles = [task["titles"][m] for m in task["metrics"]]
    assert "| runtime | " + " | ".join(titles) + " |" in md  # metric columns: the task's
    assert f"| {task['titles'][monitored]} drop | check |" in md
    roc = exported_run / "export" / "roc.png"
    assert roc.read_bytes()[:4] == b"\x89PNG"
    assert "](export/roc.png)" in md


def test_parity_failure_is_loud_and_keeps_the_record(exported_run: Path, tmp_path, monkeypatch):
    """An exported model that drifts from PyTorch fails the export, after writing export.json."""
    run_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(exported_run, run_dir, ignore=shutil.ignore_patterns("export"))

    class Drifting(OrtModel):
        def forward(self, x):
            return super().forward(x) + 0.05

    monkeypatch.setattr(onnx_mod, "OrtModel", Drifting)  # what runtimes.load opens
    with pytest.raises(ExportError, match="onnx_fp32: logits differ"):
        export_run(run_dir, ExportSettings(formats=["onnx_fp32"]))
    rec = _export(run_dir)
    assert rec["status"] == "failed"
    assert rec["formats"]["onnx_fp32"]["parity"]["max_abs_diff"] == pytest.approx(0.05, abs=1e-3)


def test_unexportable_model_is_reported_and_other_formats_still_export(
    exported_run: Path, tmp_path, monkeypatch
):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(exported_run, run_dir, ignore=shutil.ignore_patterns("export"))

    def refuse(*args, **kwargs):
        raise OnnxExportError("cannot export LiteCNN to ONNX (dynamo exporter: custom op)")

    monkeypatch.setattr(export_mod, "export_onnx", refuse)
    with pytest.raises(ExportError, match="custom op"):
        export_run(run_dir, ExportSettings(formats=["onnx_fp32", "torch_export"]))
    rec = _export(run_dir)
    assert "error" in rec["formats"]["onnx_fp32"]
    assert rec["formats"]["torch_export"]["parity"]["ok"] is True
    assert (run_dir / "export" / "model.pt2").is_file()


def test_int8_too_far_below_pytorch_fails_naming_the_metric(
    exported_run: Path, tmp_path, monkeypatch
):
    """int8 may lose at most export.int8_max_drop of the task's monitored test metric; an int8
    model whose scores are reversed loses far more, and the message says which metric."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(exported_run, run_dir, ignore=shutil.ignore_patterns("export"))

    class Reversed(OrtModel):
        def forward(self, x):
            return -super().forward(x)

    monkeypatch.setattr(onnx_mod, "OrtModel", Reversed)
    task = TrainedRun.load(run_dir).task
    name = task.title(task.monitor_metric)
    with pytest.raises(ExportError, match=f"onnx_int8: test {name} .* worse than PyTorch"):
        export_run(run_dir, ExportSettings(formats=["onnx_int8"], int8_max_drop=0.0))
    parity = _export(run_dir)["formats"]["onnx_int8"]["parity"]
    assert parity["metric"] == task.monitor_metric and parity["drop"] > 0
    assert parity["ok"] is False and parity["tolerance"] == {"drop": 0.0}


class _Scored(ClassificationTask):
    """A classification task whose monitored metric is better when lower (as a loss would be)."""

    monitor_metric = "mae"
    monitor_mode = "min"


def test_metric_drop_follows_the_direction_of_the_monitored_metric():
    settings = ExportSettings(int8_max_drop=0.05)
    task = ClassificationTask(BINARY, ("a", "b"))
    metric = task.monitor_metric
    worse = _metric_drop({metric: 0.9}, {metric: 0.8}, task, settings)
    assert worse["metric"] == metric and worse["drop"] == pytest.approx(0.1) and not worse["ok"]
    assert _metric_drop({metric: 0.9}, {metric: 0.95}, task, settings)["ok"]
    lower = _Scored(ORDINAL, ("0", "1", "2"))
    up = _metric_drop({"mae": 0.5}, {"mae": 0.6}, lower, settings)  # higher error: worse
    assert up["drop"] == pytest.approx(0.1) and not up["ok"]
    down = _metric_drop({"mae": 0.5}, {"mae": 0.4}, lower, settings)
    assert down["drop"] == pytest.approx(-0.1) and down["ok"]


def test_only_classification_tasks_get_a_roc_plot(exported_run: Path, tmp_path, monkeypatch):
    """ROC curves are drawn for classifiers only; another kind of task exports without one."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(exported_run, run_dir, ignore=shutil.ignore_patterns("export"))

    class OtherKind(ClassificationTask):
        kind = "segmentation"

    def other_task(self):
        return OtherKind(self.data["task"], tuple(self.data["labels"]))

    monkeypatch.setattr(TrainedRun, "task", property(other_task))
    export_run(run_dir, ExportSettings(formats=["onnx_fp32"]))
    assert not (run_dir / "export" / "roc.png").exists()
    assert "roc.png" not in (run_dir / "model_card.md").read_text()


def test_bad_settings_and_runs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="subset"):
        ExportSettings(formats=["tflite"])
    with pytest.raises(ConfigError, match="tolerances must be positive"):
        ExportSettings(int8_max_drop=-0.01)
    from omegaconf import OmegaConf

    old = OmegaConf.create({"formats": ["onnx_int8"], "int8_max_auc_drop": 0.01})  # renamed
    with pytest.raises(ConfigError, match="did you mean int8_max_drop"):
        settings_from_config(old)
    with pytest.raises(ConfigError, match="not a medlite run directory"):
        TrainedRun.load(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"status": "failed", "error": "NaN loss"}))
    with pytest.raises(ConfigError, match="did not finish.*NaN loss"):
        TrainedRun.load(tmp_path)


@pytest.mark.parametrize("model", ["litecnn", "mobilevit", "efficientvit", "vim"], ids=lambda m: m)
def test_every_paradigm_exports_with_parity(model, tmp_path, shared_data, one_thread):
    """One model per paradigm (CNN, Transformer, linear attention, state space) exports to ONNX
    and torch.export, and matches PyTorch on real test images."""
    net, ctx = model_and_context(
        tmp_path, [f"model={model}", "data=breastmnist", f"paths.data_dir={shared_data}"], seed=0
    )
    net.eval()
    x, _ = next(iter(ctx.datamodule.test_dataloader()))
    x = x[:16]
    with torch.no_grad():
        ref = net(x)
    path = export_onnx(net, x[:2], tmp_path / "m.onnx")
    assert torch.allclose(OrtModel(path)(x), ref, atol=1e-3 * max(1.0, ref.abs().max().item()))
    program = _torch_export(net, x[:2], tmp_path / "m.pt2")
    assert torch.allclose(program(x), ref, atol=1e-4)


@pytest.mark.parametrize("recipe", ["ptq", "prune"])
def test_compressed_runs_export_their_compressed_model(recipe, exported_run, tmp_path, shared_data):
    """A pruned run exports the pruned network; an int8 run ships its own int8 file, and its
    PyTorch reference is the fp32 model that file was made from (saved by the recipe)."""
    from medlite.pipeline import run as train_run
    from tests.helpers import make_cfg

    base = exported_run / json.loads((exported_run / "results.json").read_text())["best_checkpoint"]
    out = tmp_path / recipe
    cfg = make_cfg(
        out,
        [
            "data=breastmnist",
            f"paths.data_dir={shared_data}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "debug=limit",
            "callbacks=none",
            f"compress={recipe}",
            f"compress.base_ckpt={base}",
            "export=onnx",
        ],
    )
    train_run(cfg)
    rec = _export(out)
    assert rec["status"] == "ok"
    compressed = out / "compressed"
    if recipe == "ptq":
        assert "compression recipe (ptq)" in rec["formats"]["onnx_int8"]["source"]
        assert (compressed / "model_fp32.pt").is_file()
    else:
        assert "post-training" in rec["formats"]["onnx_int8"]["source"]
        results = json.loads((out / "results.json").read_text())
        assert (
            rec["reference"]["params"] == results["model"]["params"]
            or rec["reference"]["params"] < results["model"]["params"]
        )  # the pruned network, not the dense config model
        assert rec["reference"]["params"] < TrainedRun.load(exported_run).results["model"]["params"]
    assert rec["formats"]["onnx_fp32"]["parity"]["max_abs_diff"] < 1e-4
    card = (out / "model_card.md").read_text()
    assert "## Compression stages" in card and f"`{recipe}`" in card
    # a run that exports ranks its stages by deployed latency: each PyTorch stage timed in turns
    # with its ONNX Runtime export, the faster one kept; the int8 stage is on its runtime already
    stages = json.loads((out / "results.json").read_text())["compression"]["stages"]
    for stage in stages:
        eff = stage["efficiency"]
        assert eff["deployed_latency_ms"] > 0, stage["stage"]
        if "deployed" in eff:
            assert set(eff["deployed"]) == {"pytorch", "onnxruntime"}
            assert eff["deployed_latency_ms"] == min(eff["deployed"].values())
            assert eff["deployed_runtime"] == min(eff["deployed"], key=eff["deployed"].get)
    if recipe == "ptq":
        int8 = next(s["efficiency"] for s in stages if s["stage"] == "ptq")
        assert int8["deployed_runtime"] == "onnxruntime" and "deployed" not in int8
