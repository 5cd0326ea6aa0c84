"""Deploying a volume run: ONNX fp32/int8 and torch.export with parity on the test split, and
predict.py on a NIfTI file and on a DICOM series folder (one probability row per volume), with a
clear per-file error for a 2D image."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medlite.deploy.commands import main_predict
from medlite.deploy.predict import Predictor
from medlite.deploy.run_dir import TrainedRun
from medlite.pipeline import run
from medlite.tasks import calibration
from tests.helpers import make_cfg, optional_formats, write_series


@pytest.fixture(scope="module")
def vol_run(tmp_path_factory, shared_data) -> Path:
    """A 3D MobileNetV2, 3 short epochs on AdrenalMNIST3D (28³), then ``export=all`` (its int8
    AUC may drop by 5 points here: the briefly trained model is not what is being checked)."""
    if not (shared_data / "adrenalmnist3d.npz").exists():
        pytest.skip(f"adrenalmnist3d.npz not in {shared_data}")
    out = tmp_path_factory.mktemp("vol_run")
    cfg = make_cfg(
        out,
        [
            "data=adrenalmnist3d",
            f"paths.data_dir={shared_data}",
            "data.download=false",
            "model=mobilenetv2_3d",
            "export.int8_max_drop=0.05",
            f"paths.cache_dir={out / 'cache'}",
            "debug=limit",
            "trainer.max_epochs=3",
            "trainer.limit_train_batches=16",
            "trainer.limit_test_batches=1.0",  # the export measures the whole test split
            "callbacks=none",
            "export=all",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(cfg)
    finally:
        torch.set_num_threads(threads)  # later in-process runs must not inherit it
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "ok", res.get("error")
    return out


def test_run_records_volume_input_and_profile(vol_run: Path) -> None:
    res = json.loads((vol_run / "results.json").read_text())
    assert res["data"]["spatial_dims"] == 3
    assert res["data"]["preprocess"]["spatial_dims"] == 3
    run_dir = TrainedRun.load(vol_run)
    assert run_dir.input_shape == (1, 28, 28, 28)
    eff = res["efficiency"]
    assert eff["macs"] > 1e6 and eff["latency_ms"] > 0


def test_export_parity_on_the_test_split(vol_run: Path) -> None:
    rec = json.loads((vol_run / "export" / "export.json").read_text())
    assert rec["status"] == "ok" and rec["problems"] == []
    assert rec["n_test_images"] == 298
    fmts = rec["formats"]
    assert set(fmts) == {"onnx_fp32", "onnx_int8", "torch_export", *optional_formats()}
    for name in ("onnx_fp32", "torch_export"):
        parity = fmts[name]["parity"]
        assert parity["ok"] and parity["max_abs_diff"] < 1e-4
        assert fmts[name]["test"]["auc"] == pytest.approx(rec["reference"]["test"]["auc"], abs=1e-3)
    int8 = fmts["onnx_int8"]["parity"]
    assert int8["metric"] == "auc" and int8["ok"] and int8["label_agreement"] > 0.9
    assert rec["reference"]["test"]["auc"] > 0.7  # a model that learned, so parity means something


def _nifti(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    return path


def test_predict_on_nifti_and_dicom_series(vol_run: Path, tmp_path: Path) -> None:
    run_dir = TrainedRun.load(vol_run)
    test = run_dir.datamodule().source.load()["test"]
    volume = np.asarray(test.images[0])
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _nifti(volume, inputs / "scan.nii.gz")
    # the same volume at 56^3 (a scan of another size is fitted like the training data)
    big = volume.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    _nifti(big, inputs / "scan_56.nii.gz")
    stack = (volume.astype(np.int16) * 4 - 200)[::-1]  # HU-like; series slices run feet -> head
    write_series(inputs / "series", stack.copy(), gap=1.0)
    Image.fromarray(volume[14]).save(inputs / "slice.png")

    predictor = Predictor(vol_run, runtime="pytorch")
    rows = {p.path.name: p for p in predictor.predict(inputs, progress=False)}
    assert set(rows) == {"scan.nii.gz", "scan_56.nii.gz", "series"}  # a PNG is not a volume
    for name in ("scan.nii.gz", "scan_56.nii.gz", "series"):
        assert rows[name].ok, rows[name].error
        assert sum(rows[name].probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    # the NIfTI copy of a test volume scores what the test split scores
    model = calibration.scaled(run_dir.torch_model().eval(), run_dir.results)  # predict's T
    with torch.no_grad():
        ref = torch.softmax(model(run_dir.preprocess(volume).unsqueeze(0)), 1)[0]
    got = list(rows["scan.nii.gz"].probabilities.values())
    assert got == pytest.approx(ref.tolist(), abs=1e-5)
    assert rows["scan.nii.gz"].original_shape == (28, 28, 28)
    assert rows["scan_56.nii.gz"].original_shape == (56, 56, 56)

    png = predictor.predict_file(inputs / "slice.png")
    assert not png.ok and "2D image" in png.error and "slice.png" in png.error


def test_predict_command_writes_one_row_per_volume(vol_run: Path, tmp_path: Path) -> None:
    run_dir = TrainedRun.load(vol_run)
    test = run_dir.datamodule().source.load()["test"]
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        _nifti(np.asarray(test.images[i]), folder / f"case{i}.nii.gz")
    out_csv = tmp_path / "pred.csv"
    code = main_predict(
        [f"run={vol_run}", f"input={folder}", f"out={out_csv}", "runtime=onnx_int8"]
    )
    assert code == 0
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).name for r in rows] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert all(r["error"] == "" for r in rows)


def test_a_2d_run_refuses_a_volume_per_file(tmp_path: Path) -> None:
    """The other way round: the 2D reader names a NIfTI volume given to an image model."""
    from medlite.data.readers import InputError, read_image

    path = _nifti(np.zeros((28, 28, 28), np.uint8), tmp_path / "ct.nii.gz")
    with pytest.raises(InputError, match="3D volume.*2D .image. model"):
        read_image(path)
