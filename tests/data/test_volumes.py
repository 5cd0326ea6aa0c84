"""Volume readers: NIfTI and DICOM series read into the same (D, H, W) anatomy whatever the file
order or orientation; rescale and windows follow the stated policy; every broken series is an
InputError naming the folder and the problem; fit_volume's shapes."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medlite.data import transforms
from medlite.data.readers import InputError, _minmax_to_uint8
from medlite.data.volumes import (
    Volume,
    fit_volume,
    is_volume_input,
    list_volume_inputs,
    read_volume,
)
from tests.helpers import AXIAL, PIXEL_SPACING, SAGITTAL, ct_dataset, write_series


def ramp_stack(shape=(6, 5, 4), seed=0) -> np.ndarray:
    """int16 stored values; slice k offset by 100*k, so the slice order is visible."""
    rng = np.random.default_rng(seed)
    stack = rng.integers(0, 60, size=shape) + 100 * np.arange(shape[0])[:, None, None]
    return stack.astype(np.int16)


def minmax(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    return np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)


def raises(match_all: list[str]):
    """Context manager: an InputError whose message contains every string in ``match_all``."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(InputError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for part in match_all:
                assert part in message, f"{part!r} not in: {message}"
            return handled

    return _Check()


# ---------------------------------------------------------------------------------- NIfTI
def test_nifti_round_trip_is_bit_exact_with_spacing(tmp_path) -> None:
    vol = np.random.default_rng(1).integers(0, 256, size=(5, 6, 7), dtype=np.uint8)
    affine = np.diag([-0.7, -0.8, 2.5, 1.0])  # the recipe in the module docstring
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), affine), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0)[..., None], affine), tmp_path / "v4.nii")
    for name in ("v.nii.gz", "v4.nii"):  # (X, Y, Z, 1) is a volume too
        out = read_volume(tmp_path / name)
        assert isinstance(out, Volume) and out.source == "nifti" and out.path == tmp_path / name
        assert out.array.dtype == np.uint8 and out.array.flags.writeable
        np.testing.assert_array_equal(out.array, vol)
        assert out.spacing == pytest.approx((2.5, 0.8, 0.7))


def test_nifti_axes_are_superior_posterior_left(tmp_path) -> None:
    vol = np.random.default_rng(2).integers(0, 256, size=(5, 6, 7), dtype=np.uint8)
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.eye(4)), tmp_path / "ras.nii")
    # identity affine: data x runs right, y anterior -> W and H come back reversed
    np.testing.assert_array_equal(read_volume(tmp_path / "ras.nii").array, vol[:, ::-1, ::-1])


def test_same_scan_in_other_orientations_reads_equal(tmp_path) -> None:
    data = np.random.default_rng(3).normal(size=(7, 6, 5)).astype(np.float32)  # (x, y, z)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -1.5, 1.5 * 6  # x stored right-to-left
    swapped = affine[:, [1, 0, 2, 3]]  # y stored as the first axis
    variants = {
        "a.nii.gz": (data, affine),
        "flipped.nii.gz": (data[::-1], flipped),
        "swapped.nii.gz": (data.transpose(1, 0, 2), swapped),
    }
    reads = {}
    for name, (d, a) in variants.items():
        nib.save(nib.Nifti1Image(np.ascontiguousarray(d), a), tmp_path / name)
        reads[name] = read_volume(tmp_path / name)
    for name, vol in reads.items():
        np.testing.assert_array_equal(vol.array, reads["a.nii.gz"].array, err_msg=name)
        assert vol.spacing == pytest.approx((3.0, 2.0, 1.5)), name
    assert reads["a.nii.gz"].array.shape == (5, 6, 7)


def test_nifti_float_min_max_over_the_volume_and_non_finite(tmp_path, caplog) -> None:
    data = np.random.default_rng(4).normal(size=(4, 5, 6)) * 300
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), tmp_path / "f.nii")
    with caplog.at_level(logging.WARNING):
        out = read_volume(tmp_path / "f.nii").array
    expected = _minmax_to_uint8(data.astype(np.float32).transpose(2, 1, 0)[:, ::-1, ::-1], "x")
    np.testing.assert_array_equal(out, expected)  # the 2D rule, over the whole volume
    assert out[0, -1, -1] == 0 and "non-finite" in caplog.text  # x=y=z=0: D first, H, W last
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 7, np.int16), np.eye(4)), tmp_path / "c.nii")
    assert not read_volume(tmp_path / "c.nii").array.any() and "constant volume" in caplog.text
    windowed = read_volume(tmp_path / "f.nii", window=(0, 600)).array  # -300..300 -> 0..255
    assert windowed[data.transpose(2, 1, 0)[:, ::-1, ::-1] <= -300].max(initial=0) == 0


def test_nifti_2d_and_4d_are_errors(tmp_path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 1), np.uint8), np.eye(4)), tmp_path / "flat.nii")
    with raises([str(tmp_path / "flat.nii"), "a 2D image", "takes volumes"]):
        read_volume(tmp_path / "flat.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.uint8), np.eye(4)), tmp_path / "t.nii.gz")
    with raises([str(tmp_path / "t.nii.gz"), "(4, 4, 4, 3)", "4D series", "pick one volume"]):
        read_volume(tmp_path / "t.nii.gz")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with raises([str(tmp_path / "x.png"), "2D image", "3D volumes"]):
        read_volume(tmp_path / "x.png")


# ----------------------------------------------------------------------------------- DICOM
def test_dicom_series_in_shuffled_files_reads_in_position_order(tmp_path) -> None:
    stack = ramp_stack()
    write_series(tmp_path / "s", stack, gap=2.5)
    vol = read_volume(tmp_path / "s")
    assert vol.source == "dicom-series" and vol.path == tmp_path / "s"
    np.testing.assert_array_equal(vol.array, minmax(stack))  # axial: stored rows/cols, feet up
    assert vol.spacing == pytest.approx((2.5, *PIXEL_SPACING))
    # a scanner numbering head-to-feet: positions, not InstanceNumber or file names, decide
    down = write_series(tmp_path / "d", stack[::-1], gap=-2.5, origin=(-40, -30, 112.5))
    assert len(down) == 6
    np.testing.assert_array_equal(read_volume(tmp_path / "d").array, minmax(stack))


def test_dicom_series_and_nifti_of_one_scan_read_the_same(tmp_path) -> None:
    stack = ramp_stack((5, 6, 4))
    rows, cols = PIXEL_SPACING
    write_series(tmp_path / "sag", stack, gap=3.0, orientation=SAGITTAL)
    dicom = read_volume(tmp_path / "sag")
    # canonical axes: D superior (rows reversed), H posterior (columns), W left (-normal)
    np.testing.assert_array_equal(dicom.array, minmax(stack)[::-1, ::-1, :].transpose(1, 2, 0))
    assert dicom.spacing == pytest.approx((rows, cols, 3.0))
    # the NIfTI a converter writes for it: voxel (i, j, k) -> RAS
    r, c = np.array(SAGITTAL[:3]), np.array(SAGITTAL[3:])
    lps = np.column_stack([r * cols, c * rows, np.cross(r, c) * 3.0])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1, -1, 1]) @ lps
    hu = stack.astype(np.int16) - 1024
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), affine), tmp_path / "sag.nii.gz")
    nifti = read_volume(tmp_path / "sag.nii.gz")
    np.testing.assert_array_equal(nifti.array, dicom.array)
    assert nifti.spacing == pytest.approx(dicom.spacing)


def hu_series(folder: Path, **attrs) -> None:
    """Four slices whose columns are HU -1000, 200, 40, 1000; slice 2 stores them with slope 2."""
    stored = np.tile(np.array([24, 1224, 1064, 2024], np.int16), (4, 2, 1))  # intercept -1024
    stored[2] = [0, 600, 520, 1000]  # 2 * value - 1000: the same HU
    per_slice = {2: {"RescaleSlope": 2, "RescaleIntercept": -1000}}
    write_series(folder, stored, per_slice=per_slice, **attrs)


def test_rescale_is_applied_per_slice_before_one_volume_mapping(tmp_path) -> None:
    hu_series(tmp_path / "s")
    out = read_volume(tmp_path / "s").array  # min-max over the volume: HU -1000..1000
    np.testing.assert_array_equal(out, np.broadcast_to([0, 153, 133, 255], out.shape))
    out = read_volume(tmp_path / "s", window=(100, 400)).array  # HU -100..300 -> 0..255
    np.testing.assert_array_equal(out, np.broadcast_to([0, 191, 89, 255], out.shape))


def test_the_first_slices_window_maps_the_whole_volume(tmp_path) -> None:
    other = {3: {"WindowCenter": 500, "WindowWidth": 100}}  # ignored: slice 0's window rules
    stored = np.tile(np.array([24, 864, 1064, 1264, 2024], np.int16), (4, 2, 1))  # HU -1000..1000
    write_series(tmp_path / "s", stored, per_slice=other, WindowCenter=40, WindowWidth=400)
    out = read_volume(tmp_path / "s").array
    assert (out == out[0]).all()  # one mapping for every slice
    assert out[0, 0].tolist()[:2] == [0, 0] and out[0, 0, 2] in (127, 128)
    assert out[0, 0].tolist()[3:] == [255, 255]  # HU -160 and below -> 0, 240 and above -> 255
    override = read_volume(tmp_path / "s", window=(0, 2000)).array
    assert override[0, 0].tolist() == [0, 107, 133, 158, 255]


def test_8bit_series_is_bit_exact_and_monochrome1_inverted(tmp_path) -> None:
    stack = np.random.default_rng(5).integers(0, 256, size=(4, 5, 6), dtype=np.uint8)
    write_series(tmp_path / "u8", stack, RescaleSlope=1, RescaleIntercept=0)
    np.testing.assert_array_equal(read_volume(tmp_path / "u8").array, stack)
    write_series(
        tmp_path / "m1",
        stack,
        RescaleSlope=1,
        RescaleIntercept=0,
        PhotometricInterpretation="MONOCHROME1",
    )
    np.testing.assert_array_equal(read_volume(tmp_path / "m1").array, 255 - stack)


def test_without_positions_slices_follow_instance_number_with_a_warning(tmp_path, caplog) -> None:
    stack = ramp_stack()
    paths = write_series(tmp_path / "s", stack)
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    with caplog.at_level(logging.WARNING):
        vol = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, minmax(stack))
    assert vol.spacing == pytest.approx((2.5, *PIXEL_SPACING))  # SliceThickness, PixelSpacing
    assert "InstanceNumber" in caplog.text and str(tmp_path / "s") in caplog.text


def test_multiframe_dicom_frames_are_sorted_by_their_positions(tmp_path) -> None:
    stack = ramp_stack((5, 4, 3))
    per_frame = []
    for k in range(5):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, 10.0 - 2.0 * k]  # stored head-to-feet
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    orient, measures, shared = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = list(AXIAL)
    measures.PixelSpacing = list(PIXEL_SPACING)
    measures.SliceThickness = 2.0
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds = ct_dataset(
        stack,
        NumberOfFrames=5,
        PerFrameFunctionalGroupsSequence=Sequence(per_frame),
        SharedFunctionalGroupsSequence=Sequence([shared]),
    )
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    assert is_volume_input(tmp_path / "mf.dcm")
    vol = read_volume(tmp_path / "mf.dcm")
    np.testing.assert_array_equal(vol.array, minmax(stack[::-1]))
    assert vol.spacing == pytest.approx((2.0, *PIXEL_SPACING))
    legacy = ct_dataset(stack, NumberOfFrames=5)  # no geometry: frames in stored order
    legacy.save_as(tmp_path / "legacy.dcm", enforce_file_format=True)
    vol = read_volume(tmp_path / "legacy.dcm")
    np.testing.assert_array_equal(vol.array, minmax(stack))
    assert vol.spacing is None


# ----------------------------------------------------------------------------- bad series
def test_empty_and_non_dicom_folders_are_errors(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with raises([str(tmp_path / "empty"), "no DICOM files", "one series"]):
        read_volume(tmp_path / "empty")
    write_series(tmp_path / "study" / "ct", ramp_stack())
    (tmp_path / "study" / "notes.txt").write_text("not dicom")
    with raises([str(tmp_path / "study"), "no DICOM files", str(tmp_path / "study" / "ct")]):
        read_volume(tmp_path / "study")  # the series is one level down: say where


def test_two_series_in_one_folder_are_listed(tmp_path) -> None:
    write_series(tmp_path / "s", ramp_stack(), series_uid="1.2.3.4")
    write_series(tmp_path / "tmp", ramp_stack((3, 5, 4)), series_uid="1.2.3.5")
    for n, path in enumerate(sorted((tmp_path / "tmp").iterdir())):
        path.rename(tmp_path / "s" / f"other{n}.dcm")
    with raises([str(tmp_path / "s"), "2 DICOM series", "1.2.3.4", "1.2.3.5", "6 file", "3 file"]):
        read_volume(tmp_path / "s")


def test_a_missing_slice_is_an_error_naming_the_gap(tmp_path) -> None:
    paths = write_series(tmp_path / "s", ramp_stack((8, 5, 4)), gap=1.25, shuffle_seed=None)
    paths[4].unlink()  # slices 0..3, 5..7: one gap of 2.5 mm
    with raises(
        [str(tmp_path / "s"), "2.5 mm", "IM0003.dcm and IM0005.dcm", "1.25", "1 slice(s) missing"]
    ):
        read_volume(tmp_path / "s")


def test_slices_of_different_sizes_are_an_error(tmp_path) -> None:
    write_series(tmp_path / "s", ramp_stack((4, 5, 4)), shuffle_seed=None)
    odd = ct_dataset(np.zeros((3, 3), np.int16), SeriesInstanceUID="9", InstanceNumber=9)
    import pydicom

    uid = pydicom.dcmread(tmp_path / "s" / "IM0000.dcm").SeriesInstanceUID
    odd.SeriesInstanceUID = uid
    odd.save_as(tmp_path / "s" / "scout.dcm", enforce_file_format=True)
    with raises([str(tmp_path / "s"), "different sizes", "5x4 (4 slice(s)", "3x3", "scout.dcm"]):
        read_volume(tmp_path / "s")


def test_duplicate_positions_and_mixed_orientations_are_errors(tmp_path) -> None:
    stack = ramp_stack((4, 5, 4))
    paths = write_series(tmp_path / "s", stack, series_uid="1.9", shuffle_seed=None)
    write_series(tmp_path / "echo2", stack[:1], series_uid="1.9")  # slice 0 again
    (tmp_path / "echo2" / "IM0000.dcm").rename(tmp_path / "s" / "echo2.dcm")
    with raises([str(tmp_path / "s"), "duplicate slice positions", "echo2.dcm", "IM0000.dcm"]):
        read_volume(tmp_path / "s")
    (tmp_path / "s" / "echo2.dcm").unlink()
    write_series(tmp_path / "t", stack[:1], series_uid="1.9", orientation=(1, 0, 0, 0, 0, -1))
    (tmp_path / "t" / "IM0000.dcm").rename(tmp_path / "s" / "tilted.dcm")
    with raises([str(tmp_path / "s"), "different orientations", "tilted.dcm"]):
        read_volume(tmp_path / "s")
    assert len(paths) == 4


def test_single_slices_are_not_volumes(tmp_path) -> None:
    write_series(tmp_path / "one", ramp_stack((1, 5, 4)))
    with raises([str(tmp_path / "one"), "single 2D DICOM slice", "all slices"]):
        read_volume(tmp_path / "one")
    with raises([str(tmp_path / "one" / "IM0000.dcm"), "single 2D DICOM slice"]):
        read_volume(tmp_path / "one" / "IM0000.dcm")
    assert not is_volume_input(tmp_path / "one" / "IM0000.dcm")
    with pytest.raises(ValueError, match="width > 0"):
        read_volume(tmp_path / "one", window=(40, 0))


# --------------------------------------------------------------------------------- listing
def test_list_volume_inputs_on_a_mixed_folder(tmp_path) -> None:
    vol = np.zeros((4, 5, 6), np.uint8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "b.nii.gz")
    nib.save(nib.Nifti1Image(vol[:, :, :1], np.eye(4)), tmp_path / "flat.nii")
    write_series(tmp_path / "p1" / "ct", ramp_stack((3, 5, 4)))
    bare = tmp_path / "p2" / "mr"
    write_series(bare, ramp_stack((3, 5, 4)))
    for path in bare.iterdir():  # UID-style names without a suffix: found by the DICM marker
        path.rename(bare / f"1.2.840.{path.stem[2:]}")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "slice.png").write_bytes(b"\x89PNG")
    (tmp_path / ".cache").mkdir()
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / ".cache" / "c.nii")
    found = list_volume_inputs(tmp_path)
    assert found == [tmp_path / "b.nii.gz", tmp_path / "flat.nii", tmp_path / "p1" / "ct", bare]
    assert list_volume_inputs(tmp_path / "b.nii.gz") == [tmp_path / "b.nii.gz"]
    assert [is_volume_input(p) for p in found] == [True, False, True, True]
    assert not is_volume_input(tmp_path / "slice.png") and not is_volume_input(tmp_path)
    np.testing.assert_array_equal(read_volume(bare).array, minmax(ramp_stack((3, 5, 4))))
    for path in (tmp_path / "p1" / "ct").iterdir():
        path.unlink()
    with raises([str(tmp_path / "p1"), "no volumes"]):
        list_volume_inputs(tmp_path / "p1")


# ----------------------------------------------------------------------------- fit_volume
def test_fit_volume_shapes_constant_cube_and_aspect() -> None:
    rng = np.random.default_rng(6)
    vol = rng.integers(0, 256, size=(10, 40, 20), dtype=np.uint8)
    for mode in ("resize", "pad"):
        out = fit_volume(vol, 16, mode)
        assert out.shape == (16, 16, 16) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, transforms.fit_volume(vol, 16, mode))
    cube = np.full((9, 50, 33), 77, np.uint8)
    for size in (8, 28, 64):
        assert (fit_volume(cube, size) == 77).all()
    box = fit_volume(np.full((10, 40, 20), 200, np.uint8), 32, "pad") > 0
    assert [int(box.any(axis=axes).sum()) for axes in ((1, 2), (0, 2), (0, 1))] == [8, 32, 16]


def test_fit_volume_pad_with_spacing_keeps_true_proportions() -> None:
    thick = np.full((10, 40, 40), 200, np.uint8)  # 4 mm slices, 1 mm pixels: a 40 mm cube
    box = fit_volume(thick, 32, "pad", spacing=(4.0, 1.0, 1.0)) > 0
    assert box.all()
    box = fit_volume(thick, 32, "pad") > 0  # voxel counts only: a flat slab
    assert int(box.any(axis=(1, 2)).sum()) == 8
    small = np.full((5, 12, 12), 200, np.uint8)  # 2 mm slices: upsampled to 10 x 12 x 12
    box = fit_volume(small, 16, "pad", spacing=(2.0, 1.0, 1.0)) > 0
    assert [int(box.any(axis=axes).sum()) for axes in ((1, 2), (0, 2), (0, 1))] == [10, 12, 12]
    same = fit_volume(thick, 16, "resize", spacing=(4.0, 1.0, 1.0))
    np.testing.assert_array_equal(same, fit_volume(thick, 16, "resize"))
    with pytest.raises(ValueError, match="uint8"):
        fit_volume(thick.astype(np.float32), 16)
    with pytest.raises(ValueError, match="spacing"):
        fit_volume(thick, 16, "pad", spacing=(0, 1, 1))
