"""Deploying a segmentation run: export parity in Dice, masks from predict.py in the input's own
size and geometry (PNG, NIfTI, DICOM), overlays, the class-area CSV and the model card."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medlite.data.transforms import Preprocess
from medlite.deploy.commands import main_predict
from medlite.deploy.masks import dicom_affine, overlay, restore_size
from medlite.deploy.onnx import OrtModel, onnx_weight_dtypes
from medlite.deploy.predict import Predictor
from medlite.deploy.run_dir import TrainedRun
from medlite.pipeline import run
from tests.helpers import make_cfg, optional_formats, write_dicom


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> Path:
    """A 12 K-parameter U-Net, 3 short epochs on synthseg, then ``export=all`` (ONNX fp32 +
    int8 + torch.export, checked on the 200 test images, model card): what train.py gives."""
    out = tmp_path_factory.mktemp("seg_run")
    cfg = make_cfg(
        out,
        [
            "data=synthseg",
            "model=unet",
            "model.kwargs.channels=[8,16,32]",
            "model.kwargs.strides=[2,2]",
            "model.kwargs.num_res_units=1",
            f"paths.cache_dir={out / 'cache'}",
            "debug=limit",
            "trainer.max_epochs=3",
            "trainer.limit_train_batches=8",
            "trainer.limit_test_batches=1.0",  # the whole test split, as the export measures it
            "callbacks=none",
            "export=all",
        ],
    )
    run(cfg)
    assert json.loads((out / "results.json").read_text())["status"] == "ok"
    return out


@pytest.fixture(scope="module")
def test_split(seg_run) -> tuple[np.ndarray, np.ndarray]:
    """The first test images and masks of the run's data (uint8, 64 px)."""
    dm = TrainedRun.load(seg_run).datamodule()
    test = dm.source.load()["test"]
    return np.asarray(test.images[:4]), np.asarray(test.labels[:4])


def _export(run_dir: Path) -> dict:
    return json.loads((run_dir / "export" / "export.json").read_text())


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- export
def test_export_parity_is_measured_in_dice(seg_run: Path) -> None:
    rec = _export(seg_run)
    results = json.loads((seg_run / "results.json").read_text())
    assert rec["status"] == "ok" and rec["problems"] == []
    assert rec["n_test_images"] == 200  # batches of 32: the last one (8) tests a dynamic batch
    assert rec["task"]["monitor"] == "val/dice" and rec["task"]["kind"] == "segmentation"
    assert rec["reference"]["test"]["dice"] == pytest.approx(results["test"]["dice"], abs=1e-6)
    fmts = rec["formats"]
    assert set(fmts) == {"onnx_fp32", "onnx_int8", "torch_export", *optional_formats()}
    for name in ("onnx_fp32", "torch_export"):
        parity = fmts[name]["parity"]
        assert parity["ok"] and parity["max_abs_diff"] < 1e-4  # over every logit of every pixel
        assert parity["label_agreement"] > 0.9999  # share of pixels with the same class
        assert fmts[name]["test"]["dice"] == pytest.approx(rec["reference"]["test"]["dice"])
    int8 = fmts["onnx_int8"]["parity"]
    assert int8["metric"] == "dice" and int8["tolerance"] == {"drop": 0.01} and int8["ok"]
    drop = rec["reference"]["test"]["dice"] - fmts["onnx_int8"]["test"]["dice"]
    assert int8["drop"] == pytest.approx(drop) and drop <= 0.01
    assert 0.9 < int8["label_agreement"] <= 1.0
    counts = onnx_weight_dtypes(seg_run / fmts["onnx_int8"]["path"])
    assert counts.get("int8", 0) > 0.9 * sum(counts.values())


def test_exported_files_return_logit_maps_for_any_batch(seg_run: Path, test_split) -> None:
    run_ = TrainedRun.load(seg_run)
    images, _ = test_split
    x = torch.stack([run_.preprocess(img) for img in images[:3]])
    with torch.no_grad():
        ref = run_.torch_model()(x)
    assert ref.shape == (3, 2, 64, 64)
    assert torch.allclose(OrtModel(run_.export_dir / "model.onnx")(x), ref, atol=1e-4)
    program = torch.export.load(str(run_.export_dir / "model.pt2")).module()
    assert torch.allclose(program(x), ref, atol=1e-5)


def test_model_card_shows_segmentation_metrics_and_examples(seg_run: Path) -> None:
    card = json.loads((seg_run / "model_card.json").read_text())
    assert card["task"]["metrics"] == ["dice", "iou", "hd95"]
    assert card["task"]["kind"] == "segmentation" and card["task"]["classes"] == [
        "background",
        "lesion",
    ]
    assert set(card["metrics"]["test"]) >= {"dice", "iou", "hd95"}
    assert card["training_data"]["checkpoint_selection"] == "best validation Dice"
    assert card["output"]["logits"].startswith("(N, 2, 64, 64)")
    md = (seg_run / "model_card.md").read_text()
    assert "| runtime | Dice | IoU | HD95 (px) |" in md
    assert "| pixel agreement | Dice drop | check |" in md
    assert "This model segments 64x64 px synthseg images" in md
    assert "## Examples (test split)" in md and "](export/examples.png)" in md
    assert (seg_run / "export" / "examples.png").read_bytes()[:4] == b"\x89PNG"
    assert not (seg_run / "export" / "roc.png").exists() and "roc" not in card.get("plots", {})


# ---------------------------------------------------------------- predict
def test_mask_at_the_input_size_is_the_models_own_prediction(seg_run: Path, test_split, tmp_path):
    run_ = TrainedRun.load(seg_run)
    images, _ = test_split
    Image.fromarray(images[0]).save(tmp_path / "img.png")
    predictor = Predictor(run_, runtime="pytorch")
    (row,) = predictor.predict(tmp_path / "img.png", out_dir=tmp_path / "out")
    with torch.no_grad():
        own = run_.torch_model()(run_.preprocess(images[0])[None]).argmax(1)[0].numpy()
    mask = np.asarray(Image.open(row.files["mask"]))
    assert mask.dtype == np.uint8 and mask.shape == (64, 64)
    assert np.array_equal(mask, own)  # class indices: 0 background, 1 lesion
    assert row.fractions["lesion"] == pytest.approx(float((own == 1).mean()))


def test_predict_png_dicom_and_nifti_write_masks_in_the_inputs_geometry(
    seg_run: Path, test_split, tmp_path: Path
) -> None:
    images, _ = test_split
    folder = tmp_path / "scans"
    (folder / "ct").mkdir(parents=True)
    big = np.asarray(Image.fromarray(images[1]).resize((100, 80)))  # (H, W) = (80, 100)
    Image.fromarray(big).save(folder / "us.png")
    affine = np.array([[-0.7, 0, 0, 10.0], [0, 0.7, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    nib.save(
        nib.Nifti1Image(big.T[:, :, None].astype(np.int16), affine), folder / "ct" / "s.nii.gz"
    )
    write_dicom(
        folder / "ct" / "s.dcm",
        big,
        PixelSpacing=[0.5, 0.25],
        ImagePositionPatient=[1.0, 2.0, 3.0],
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],  # a coronal slice
    )
    write_dicom(folder / "bare.dcm", big)  # no geometry at all (Secondary Capture)
    (folder / "broken.png").write_bytes(b"not a png")
    out_csv = tmp_path / "results" / "preds.csv"
    code = main_predict([f"run={seg_run}", f"input={folder}", f"out={out_csv}"])
    assert code == 1  # the broken file is an error row; the others are predicted
    rows = {Path(r["file"]).relative_to(folder).as_posix(): r for r in _read_csv(out_csv)}
    assert set(rows) == {"us.png", "ct/s.nii.gz", "ct/s.dcm", "bare.dcm", "broken.png"}
    assert rows["broken.png"]["error"] and not rows["broken.png"]["mask"]
    out = out_csv.parent  # masks go next to the CSV, in the input folder's sub-folders
    for name, stem in (
        ("us.png", "us"),
        ("ct/s.nii.gz", "ct/s_nii_gz"),
        ("ct/s.dcm", "ct/s_dcm"),
        ("bare.dcm", "bare"),
    ):
        r = rows[name]
        mask_png = out / f"{stem}_mask.png"
        assert r["mask"] == str(mask_png) and r["overlay"] == str(out / f"{stem}_overlay.png")
        mask = np.asarray(Image.open(mask_png))
        assert mask.shape == (80, 100) and set(np.unique(mask)) <= {0, 1}
        assert (r["height"], r["width"]) == ("80", "100")
        assert float(r["fraction(lesion)"]) == pytest.approx(float((mask == 1).mean()), abs=1e-6)
        assert r["predicted"] == ("lesion" if (mask == 1).any() else "")
        assert np.asarray(Image.open(r["overlay"])).shape == (80, 100, 3)
    assert rows["us.png"]["mask_nifti"] == ""
    # NIfTI in: the mask has the input's affine, voxel layout and shape
    nii = nib.load(rows["ct/s.nii.gz"]["mask_nifti"])
    assert nii.shape == (100, 80, 1) and np.allclose(nii.affine, affine)
    assert nii.get_data_dtype() == np.uint8
    png = np.asarray(Image.open(out / "ct" / "s_nii_gz_mask.png"))
    assert np.array_equal(np.asarray(nii.dataobj)[:, :, 0].T, png)
    # DICOM in: an affine from its spacing, position and orientation (LPS -> RAS)
    dcm = nib.load(rows["ct/s.dcm"]["mask_nifti"])
    assert dcm.shape == (100, 80)
    lps = dcm.affine * np.array([[-1], [-1], [1], [1]])
    assert np.allclose(lps[:3, 0], [0.25, 0, 0])  # next column: along the row, 0.25 mm
    assert np.allclose(lps[:3, 1], [0, 0, -0.5])  # next row: down the column, 0.5 mm
    assert np.allclose(lps[:3, 3], [1, 2, 3])
    assert "defaulted" not in rows["ct/s.dcm"]["geometry"]
    bare = rows["bare.dcm"]["geometry"]
    assert "PixelSpacing" in bare and "ImagePositionPatient" in bare and "defaulted" in bare


def test_predict_without_out_writes_into_the_run_folder(seg_run: Path, test_split, tmp_path):
    images, _ = test_split
    Image.fromarray(images[2]).save(tmp_path / "one.png")
    assert main_predict([f"run={seg_run}", f"input={tmp_path / 'one.png'}"]) == 0
    folder = seg_run / "predictions"
    (row,) = _read_csv(folder / "predictions.csv")
    assert row["mask"] == str(folder / "one_mask.png") and Path(row["overlay"]).is_file()


# ---------------------------------------------------------------- conventions
def test_masks_go_back_through_padding_and_resizing() -> None:
    pre = Preprocess(64, as_rgb=False, mean=[0.5], std=[0.5], fit="pad", load_size=64)
    truth = np.zeros((32, 64), np.uint8)  # a wide image: padded above and below to 64 x 64
    truth[8:20, 10:30] = 1
    fitted = pre.mask(truth).numpy()
    assert fitted[:16].sum() == 0  # the padding band
    assert np.array_equal(restore_size(fitted, truth.shape, pre), truth)
    pre = Preprocess(64, as_rgb=False, mean=[0.5], std=[0.5], fit="resize", load_size=64)
    big = np.kron(truth, np.ones((4, 2), np.uint8))  # (128, 128): stretched back exactly
    assert np.array_equal(restore_size(pre.mask(big).numpy(), big.shape, pre), big)


def test_dicom_affine_defaults_and_overlay_colours() -> None:
    from pydicom.dataset import Dataset

    affine, missing = dicom_affine(Dataset())
    assert missing == ["PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient"]
    assert np.allclose(affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 1
    pic = overlay(np.full((8, 8), 100, np.uint8), mask)
    assert pic.shape == (8, 8, 3) and tuple(pic[0, 0]) == (100, 100, 100)
    assert tuple(pic[2, 2]) == (230, 25, 75)  # class 1's outline
    assert pic[3, 3, 0] > pic[3, 3, 1]  # inside: tinted
