"""Model files that explain themselves: the ONNX metadata (preprocessing, labels, task), the model
card's Hugging Face header (licence, opset, no machine paths) and pretrained normalisation."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from medlite.data.transforms import Preprocess
from medlite.deploy.model_card import UNKNOWN_LICENCE, dataset_licence, hub_metadata
from medlite.deploy.onnx import (
    META_LABELS,
    META_PREPROCESS,
    META_TASK,
    export_onnx,
    model_metadata,
    onnx_opset,
    read_metadata,
)
from medlite.tasks import get_task
from tests.helpers import make_cfg

LABELS = ["nevus", "melanoma", "keratosis"]


def _front_matter(md: str) -> dict:
    found = re.match(r"---\n(.*?)\n---\n", md, re.S)
    assert found, "model_card.md has no YAML front matter"
    return yaml.safe_load(found.group(1))


# ------------------------------------------------------------------------------ ONNX metadata
def test_onnx_metadata_round_trip(tmp_path: Path) -> None:
    pre = Preprocess(32, True, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "pad", load_size=64)
    task = get_task("multi-class", LABELS)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    path = export_onnx(
        model,
        torch.randn(2, 3, 32, 32),
        tmp_path / "m.onnx",
        exporter="legacy",
        metadata=model_metadata(pre.describe(), task.record()),
    )
    meta = read_metadata(path)
    spec = meta[META_PREPROCESS]
    assert spec["input_size"] == 32 and spec["fit"] == "pad" and spec["load_size"] == 64
    assert spec["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert spec["channels"] == 3 and spec["spatial_dims"] == 2 and spec["as_rgb"] is True
    assert spec["input_shape"] == [3, 32, 32] and "/ 255" in spec["pixel_scaling"]
    assert meta[META_LABELS] == LABELS
    assert meta[META_TASK] == {
        "kind": "classification",
        "type": "multi-class",
        "scores": "softmax over classes",
    }
    assert meta["medlite.exporter"] == "legacy"
    assert onnx_opset(path) == 17
    import onnxruntime as ort  # any runtime sees the same keys

    custom = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    assert json.loads(custom[META_LABELS]) == LABELS


def test_multilabel_and_segmentation_say_how_scores_are_made() -> None:
    spec = Preprocess(28, False, [0.5], [0.5]).describe()
    multilabel = model_metadata(spec, get_task("multi-label, binary-class", LABELS).record())
    assert json.loads(multilabel[META_TASK])["scores"] == "sigmoid per class"
    seg = model_metadata(spec, get_task("segmentation", ["background", "polyp"]).record())
    assert "per pixel" in json.loads(seg[META_TASK])["scores"]


def test_exported_run_files_carry_the_runs_preprocessing(exported_run: Path) -> None:
    results = json.loads((exported_run / "results.json").read_text())
    export = json.loads((exported_run / "export" / "export.json").read_text())
    for fmt, name in (("onnx_fp32", "model.onnx"), ("onnx_int8", "model_int8.onnx")):
        meta = read_metadata(exported_run / "export" / name)
        assert meta[META_LABELS] == results["data"]["labels"]
        assert meta[META_PREPROCESS]["mean"] == results["data"]["preprocess"]["mean"]
        assert meta[META_PREPROCESS]["input_shape"] == [1, 28, 28]
        assert meta[META_TASK]["type"] == results["task"]["type"]
        assert export["formats"][fmt]["opset"] == onnx_opset(exported_run / "export" / name)


# -------------------------------------------------------------------------------- model card
def test_model_card_header_has_licence_opset_and_no_machine_path(exported_run: Path) -> None:
    from huggingface_hub import ModelCard

    md = (exported_run / "model_card.md").read_text()
    card_json = (exported_run / "model_card.json").read_text()
    header = _front_matter(md)
    assert header["license"] == "cc-by-4.0"  # BreastMNIST (medmnist.INFO)
    assert header["datasets"] == ["breastmnist"]
    assert header["pipeline_tag"] == "image-classification"
    assert header["medlite"]["labels"] == ["malignant", "normal, benign"]
    assert header["medlite"]["dataset_license"] == "CC BY 4.0"
    opset = onnx_opset(exported_run / "export" / "model.onnx")
    assert header["medlite"]["onnx_opset"] == opset and f"ONNX opset: {opset}" in md
    assert "Dataset licence: CC BY 4.0" in md
    assert ModelCard(md).data.license == "cc-by-4.0"  # what the hub itself reads
    for text in (md, card_json):
        assert str(exported_run) not in text and str(exported_run.parent) not in text
        assert not re.search(r"(?<![\w.])/(tmp|home|root|Users|work)/", text), "absolute path"


def test_dataset_licences() -> None:
    assert dataset_licence({"flag": "dermamnist"}) == "CC BY-NC 4.0"  # runs before sources said
    assert dataset_licence({"name": "my_study", "source": "folder"}) == UNKNOWN_LICENCE
    kvasir = "Kvasir-SEG terms of use: research and educational purposes only"
    assert dataset_licence({"license": kvasir}) == kvasir

    def header(licence: str, dataset: str) -> dict:
        card = {
            "task": {"dataset": dataset, "type": "multi-class", "classes": LABELS},
            "input": {"onnx_opset": 18},
            "model": {"name": "m", "paradigm": "cnn"},
        }
        card["task"]["license"] = licence
        return hub_metadata(card)

    assert header("CC BY-NC 4.0", "dermamnist")["license"] == "cc-by-nc-4.0"
    assert header(UNKNOWN_LICENCE, "folder")["license"] == "unknown"
    other = header(kvasir, "kvasir_seg")
    assert other["license"] == "other" and other["license_name"] == "kvasir-seg-terms"
    assert other["medlite"]["dataset_license"] == kvasir


# --------------------------------------------------------------- pretrained normalisation
def _datamodule(tmp_path: Path, overrides: list[str]):
    from medlite.build import build_datamodule

    cfg = make_cfg(tmp_path, ["data=synthetic", f"paths.cache_dir={tmp_path}", *overrides])
    return build_datamodule(cfg)


def test_pretrained_weights_bring_their_normalisation(tmp_path: Path) -> None:
    mean = list(timm.models.get_pretrained_cfg("resnet18").mean)
    std = list(timm.models.get_pretrained_cfg("resnet18").std)
    grey = _datamodule(tmp_path, ["model=resnet18", "model.pretrained=true"]).preprocess
    assert grey.mean.flatten().tolist() == pytest.approx([sum(mean) / 3])
    assert grey.std.flatten().tolist() == pytest.approx([sum(std) / 3])
    rgb = _datamodule(tmp_path, ["model=resnet18", "model.pretrained=true", "data.as_rgb=true"])
    assert rgb.preprocess.mean.flatten().tolist() == pytest.approx(mean)
    mine = _datamodule(
        tmp_path, ["model=resnet18", "model.pretrained=true", "data.mean=[0.3]", "data.std=[0.2]"]
    )
    assert mine.preprocess.mean.flatten().tolist() == pytest.approx([0.3])  # the user's wins
    scratch = _datamodule(tmp_path, ["model=resnet18"])
    assert scratch.preprocess.mean.flatten().tolist() == [0.5]


def test_missing_pretrained_normalisation_is_warned(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda arch: None)
    with caplog.at_level(logging.WARNING, logger="medlite.models.pretrained"):
        dm = _datamodule(tmp_path, ["model=resnet18", "model.pretrained=true"])
    assert dm.preprocess.mean.flatten().tolist() == [0.5]
    assert "records no input normalisation for 'resnet18'" in caplog.text


def test_a_pretrained_run_records_the_checkpoints_normalisation(tmp_path, monkeypatch) -> None:
    """One fast_dev_run with mocked ImageNet weights (no network): results.json carries timm's
    statistics for resnet18, so the model card and the ONNX metadata do too."""
    from medlite.models import pretrained as pt
    from medlite.pipeline import run

    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    monkeypatch.setattr(pt, "load_hub_weights", lambda arch: (weights, "mocked hub weights"))
    cfg = make_cfg(
        tmp_path,
        [
            "data=synthetic",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "model=resnet18",
            "model.pretrained=true",
            "debug=fast_dev_run",
            "callbacks=none",
            "profile.repeats=1",
            "profile.warmup=0",
            "profile.throughput_batch=2",
        ],
    )
    run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    mean = timm.models.get_pretrained_cfg("resnet18").mean
    assert results["data"]["preprocess"]["mean"] == pytest.approx([sum(mean) / 3])


def test_predict_refuses_an_onnx_file_of_another_preprocessing(exported_run, tmp_path) -> None:
    import shutil

    from medlite.deploy.onnx import write_metadata
    from medlite.deploy.predict import Predictor
    from medlite.errors import ConfigError

    run_dir = tmp_path / "copy"
    shutil.copytree(exported_run, run_dir)
    assert Predictor(run_dir, runtime="onnx_fp32").model is not None  # its own file: fine
    path = run_dir / "export" / "model.onnx"
    spec = read_metadata(path)[META_PREPROCESS] | {"mean": [0.25], "input_size": 64}
    write_metadata(path, {META_PREPROCESS: json.dumps(spec)})
    with pytest.raises(ConfigError, match=r"another preprocessing .*input_size: 64 vs 28"):
        Predictor(run_dir, runtime="onnx_fp32")
