"""predict.py on real BreastMNIST test images written as PNG, DICOM and NIfTI files."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medlite.deploy.commands import main_predict
from medlite.deploy.onnx import OrtModel, read_metadata
from medlite.deploy.predict import Predictor
from medlite.deploy.run_dir import TrainedRun
from medlite.tasks import calibration
from tests.helpers import write_dicom

N = 6


@pytest.fixture(scope="module")
def test_images(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(shared_data / "breastmnist.npz") as f:
        return f["test_images"][:N], f["test_labels"][:N]


@pytest.fixture
def image_folder(tmp_path: Path, test_images) -> Path:
    images, _ = test_images
    folder = tmp_path / "patient_images"
    (folder / "dicom").mkdir(parents=True)
    for i, img in enumerate(images):
        if i % 3 == 0:
            Image.fromarray(img).save(folder / f"img{i}.png")
        elif i % 3 == 1:
            write_dicom(folder / "dicom" / f"img{i}.dcm", img)
        else:
            nib.save(nib.Nifti1Image(img.T, np.eye(4)), folder / f"img{i}.nii.gz")
    return folder


def _own_logits(model, run: TrainedRun, images: np.ndarray) -> torch.Tensor:
    """What the run's own evaluation path gives: the training transform, then the model."""
    x = torch.stack([run.preprocess(img) for img in images])
    with torch.no_grad():
        return model(x)


def _index(path: Path) -> int:
    return int(path.name.split(".")[0].removeprefix("img"))


@pytest.mark.parametrize("runtime", ["pytorch", "onnx_int8"])
def test_predictions_match_the_models_own(exported_run, image_folder, test_images, runtime):
    run = TrainedRun.load(exported_run)
    predictor = Predictor(run, runtime=runtime)
    rows = predictor.predict(image_folder)
    assert len(rows) == N and all(r.ok for r in rows), [r.error for r in rows]
    # calibrated probabilities: PyTorch's logits / T, or the int8 graph that has T baked in
    model = (
        calibration.scaled(run.torch_model(), run.results)
        if runtime == "pytorch"
        else OrtModel(run.export_dir / "model_int8.onnx")
    )
    want = torch.softmax(_own_logits(model, run, test_images[0]), dim=-1).numpy()
    for r in rows:
        got = np.array([r.probabilities[lab] for lab in run.task.labels])
        np.testing.assert_allclose(got, want[_index(r.path)], atol=1e-5)
        assert r.predicted == [run.task.labels[int(want[_index(r.path)].argmax())]]
        assert r.original_shape == (28, 28)


def test_auto_runtime_runs_the_fastest_format_that_passed(exported_run):
    """The export timed every runtime that passed its checks (in turns, in one process):
    runtime=auto runs the fastest of them here (which one depends on the machine)."""
    export = json.loads((exported_run / "export" / "export.json").read_text())
    median = export["latency"]["median_ms"]
    passed = {f for f, e in export["formats"].items() if (e.get("parity") or {}).get("ok")}
    fastest = min((f for f in median if f == "pytorch" or f in passed), key=median.get)
    predictor = Predictor(exported_run)
    assert predictor.runtime == fastest and "export.json" in predictor.runtime_reason


def test_bad_inputs_are_reported_and_the_rest_still_runs(
    exported_run, image_folder, capsys, tmp_path
):
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    nib.save(
        nib.Nifti1Image(np.zeros((28, 28, 9), np.uint8), np.eye(4)), image_folder / "ct.nii.gz"
    )
    colour = np.stack([np.zeros((28, 28)), np.full((28, 28), 120), np.full((28, 28), 255)], -1)
    Image.fromarray(colour.astype(np.uint8)).save(image_folder / "photo.png")
    out = tmp_path / "preds.csv"
    code = main_predict([f"run={exported_run}", f"input={image_folder}", f"out={out}"])
    printed = capsys.readouterr().out
    assert code == 1  # some files failed
    assert f"{N} of {N + 3} file(s) predicted" in " ".join(printed.split())
    with out.open() as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == N + 3
    assert "3D" in rows["ct.nii.gz"]["error"] and "(28, 28, 9)" in rows["ct.nii.gz"]["error"]
    assert "colour" in rows["photo.png"]["error"] or "color" in rows["photo.png"]["error"]
    assert rows["broken.png"]["error"]
    ok = [r for r in rows.values() if not r["error"]]
    for r in ok:
        assert float(r["p(malignant)"]) + float(r["p(normal, benign)"]) == pytest.approx(
            1, abs=1e-5
        )


def test_single_file_and_cli_errors(exported_run, image_folder, capsys):
    assert main_predict([f"run={exported_run}", f"input={image_folder / 'img0.png'}"]) == 0
    assert "1 of 1 file(s) predicted" in capsys.readouterr().out
    assert main_predict([f"run={exported_run}", "input=/no/such/folder"]) == 1
    assert "/no/such/folder: not found" in capsys.readouterr().err
    assert main_predict([f"run={exported_run}"]) == 1
    assert "missing argument(s): input=..." in capsys.readouterr().err
    assert main_predict([f"run={exported_run}", f"input={image_folder}", "runtime=tpu"]) == 1
    assert "runtime must be one of" in capsys.readouterr().err


def test_prediction_never_touches_the_network(exported_run, image_folder, monkeypatch):
    """Patient images stay local: any attempt to open a connection fails the test."""

    def no_network(*args, **kwargs):
        raise AssertionError("predict tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    rows = Predictor(exported_run).predict(image_folder)
    assert all(r.ok for r in rows)


def test_a_file_that_trains_is_a_file_that_predicts(tmp_path, shared_data):
    """A folder run on 100 px PNGs (stored at data.size=28): predict.py on those same files
    gives exactly the probabilities of the model on the images the run trained and tested on,
    because both go through the same reader and the same fit to the stored size."""
    import json

    from medlite.build import build_datamodule
    from medlite.pipeline import run
    from tests.helpers import make_cfg

    root = tmp_path / "classes"
    with np.load(shared_data / "breastmnist.npz") as f:
        images, labels = f["train_images"][:60], f["train_labels"][:60, 0]
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = root / ("malignant" if lab == 0 else "benign")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((100, 100), Image.BICUBIC).save(folder / f"img{i:03d}.png")
    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        [
            "data=folder",
            f"data.root={root}",
            "data.size=28",
            "model.input_size=32",  # a model input other than the stored size
            "trainer.max_epochs=1",
            "callbacks=none",
            "profile.enabled=false",
        ],
    )
    run(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["preprocess"]["load_size"] == 28
    trained = TrainedRun.load(out)
    predictor = Predictor(trained, runtime="pytorch")
    dm = build_datamodule(cfg)
    dm.setup()
    test = dm.source.load()["test"]
    model = calibration.scaled(trained.torch_model(), trained.results)  # what predict applies
    for image_id, stored in zip(test.ids, test.images, strict=True):
        x, shape = predictor.preprocess(root / image_id)
        assert shape == (100, 100)
        # the model input predict.py makes from the file is the one training made from it
        torch.testing.assert_close(x[0], trained.preprocess(stored), rtol=0, atol=0)
        row = predictor.predict_file(root / image_id)
        assert row.ok, row.error
        with torch.no_grad():
            want = torch.softmax(model(x), -1)[0]
        got = torch.tensor([row.probabilities[lab] for lab in trained.task.labels])
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)


def test_an_export_without_the_temperature_gets_it_applied(exported_run, tmp_path, test_images):
    """An ONNX file exported before calibration (raw logits, no ``medlite.temperature``): predict
    divides by the run's T itself, so its probabilities match the calibrated PyTorch model."""
    import shutil

    from medlite.deploy.onnx import export_onnx, model_metadata

    copy = tmp_path / "run"
    shutil.copytree(exported_run, copy, ignore=shutil.ignore_patterns("cache"))
    run = TrainedRun.load(copy)
    x = torch.stack([run.preprocess(img) for img in test_images[0]])
    metadata = model_metadata(run.data["preprocess"], run.task.record())
    assert calibration.ONNX_KEY not in metadata
    export_onnx(run.torch_model(), x, run.export_dir / "model.onnx", metadata=metadata)
    predictor = Predictor(run, runtime="onnx_fp32")
    with torch.no_grad():
        got = torch.softmax(predictor.model(x), -1)
        want = torch.softmax(calibration.scaled(run.torch_model(), run.results)(x), -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert calibration.ONNX_KEY in read_metadata(exported_run / "export" / "model.onnx")
