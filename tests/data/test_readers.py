"""Input readers for local inference: real MedMNIST images round-trip exactly through PNG, DICOM
and NIfTI; LUTs, inversion and channels behave; every bad input is an InputError naming the file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEGLSLossless,
)

from medlite.data.readers import (
    SUPPORTED_SUFFIXES,
    InputError,
    conform_channels,
    list_inputs,
    read_image,
)
from medlite.data.transforms import Preprocess
from medlite.errors import DataError
from tests.helpers import write_dicom


@pytest.fixture(scope="module")
def gray_images(shared_data: Path) -> np.ndarray:
    """Four official BreastMNIST test images, uint8 (4, 28, 28)."""
    with np.load(shared_data / "breastmnist.npz") as npz:
        images = npz["test_images"][:4]
    assert images.dtype == np.uint8 and images.shape == (4, 28, 28)
    return images


@pytest.fixture(scope="module")
def colour_image(shared_data: Path) -> np.ndarray:
    """One official RetinaMNIST test image, uint8 (28, 28, 3) with distinct channels."""
    path = shared_data / "retinamnist.npz"
    if not path.exists():
        pytest.skip(f"{path} not found (only on dev/CI machines)")
    with np.load(path) as npz:
        image = npz["test_images"][0]
    assert image.shape == (28, 28, 3) and not np.array_equal(image[..., 0], image[..., 1])
    return image


def write_nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


# ----------------------------------------------------------------- exact round trips
def test_png_dicom_nifti_read_back_bit_exact(gray_images, tmp_path) -> None:
    for k, img in enumerate(gray_images):
        Image.fromarray(img).save(tmp_path / f"{k}.png")
        write_dicom(tmp_path / f"{k}.dcm", img)
        write_nifti(tmp_path / f"{k}.nii.gz", img.T)  # the convention in the readers docstring
        write_nifti(tmp_path / f"{k}.nii", img.T[:, :, None])  # (X, Y, 1) is 2D too
        for name in (f"{k}.png", f"{k}.dcm", f"{k}.nii.gz", f"{k}.nii"):
            out = read_image(tmp_path / name)
            assert out.dtype == np.uint8 and out.flags.writeable, name
            np.testing.assert_array_equal(out, img, err_msg=name)


def test_read_image_feeds_the_training_preprocessing(gray_images, tmp_path) -> None:
    img = gray_images[0]
    path = write_dicom(tmp_path / "x.dcm", img)
    for in_chans in (1, 3):
        pre = Preprocess(28, as_rgb=in_chans == 3, mean=[0.5] * in_chans, std=[0.5] * in_chans)
        x = pre(conform_channels(read_image(path), in_chans, path))
        assert x.shape == (in_chans, 28, 28)
        assert np.allclose(x.numpy(), pre(img).numpy())


def test_dicom_without_suffix_is_found_by_its_marker(gray_images, tmp_path) -> None:
    img = gray_images[1]
    for name in ("IM0001", "1.2.826.0.1.3680043.8.498.1"):
        np.testing.assert_array_equal(read_image(write_dicom(tmp_path / name, img)), img)


def test_colour_png_and_rgb_dicom_keep_three_channels(colour_image, tmp_path) -> None:
    Image.fromarray(colour_image).save(tmp_path / "c.png")
    Image.fromarray(colour_image).convert("RGBA").save(tmp_path / "c_alpha.png")
    write_dicom(tmp_path / "c.dcm", colour_image, "RGB")
    for name in ("c.png", "c_alpha.png", "c.dcm"):
        np.testing.assert_array_equal(read_image(tmp_path / name), colour_image, err_msg=name)
    ybr = convert_color_space(colour_image, "RGB", "YBR_FULL")
    out = read_image(write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    assert out.shape == (28, 28, 3)
    assert np.abs(out.astype(int) - colour_image).max() <= 2  # YBR round trip is near-lossless


# -------------------------------------------------------------- intensity handling
def test_16bit_dicom_with_rescale_is_min_max_scaled_in_order(gray_images, tmp_path) -> None:
    img = gray_images[2]
    stored = img.astype(np.uint16) * 16 + 100  # 12-bit range
    out = read_image(
        write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024)
    )
    assert out.dtype == np.uint8 and (out.min(), out.max()) == (0, 255)
    order = np.argsort(stored, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)  # monotonic with the input
    expected = np.rint((img - img.min()) * (255.0 / (img.max() - img.min())))
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_dicom_window_clips_and_scales_its_range(tmp_path) -> None:
    stored = np.arange(0, 4000, 10, dtype=np.uint16).reshape(20, 20)
    path = write_dicom(
        tmp_path / "w.dcm",
        stored,
        BitsStored=12,
        RescaleSlope=1,
        RescaleIntercept=-1000,
        WindowCenter=40,
        WindowWidth=400,
    )
    out = read_image(path).astype(int)
    hu = stored.astype(int) - 1000
    assert np.all(out[hu <= 40 - 200] == 0) and np.all(out[hu > 40 + 200] == 255)
    inside = out[(hu > -150) & (hu < 230)]
    assert inside.size and np.all(np.diff(inside) >= 0) and 0 < inside.mean() < 255


def test_uint8_dicom_with_window_is_windowed_not_kept(gray_images, tmp_path) -> None:
    img = gray_images[0]
    out = read_image(write_dicom(tmp_path / "w8.dcm", img, WindowCenter=128, WindowWidth=64))
    assert np.all(out[img < 90] == 0) and np.all(out[img > 165] == 255)


def test_dicom_voi_lut_sequence_maps_its_entry_range(gray_images, tmp_path) -> None:
    stored = gray_images[0].astype(np.uint16) * 16  # 12-bit
    table = (np.sqrt(np.arange(4096) / 4095) * 60000 + 1000).astype(np.uint16)  # a gamma curve
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new("LUTData", "OW", table.astype("<u2").tobytes())
    out = read_image(write_dicom(tmp_path / "voi.dcm", stored, BitsStored=12, VOILUTSequence=[lut]))
    expected = (table[stored] - 1000.0) * 255 / (int(table[-1]) - 1000)  # entry range -> 0..255
    assert np.abs(out.astype(float) - expected).max() <= 1


def test_palette_colour_dicom_becomes_rgb(colour_image, tmp_path) -> None:
    index = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    palette = colour_image.reshape(-1, 3)[:256].astype(np.uint16) * 257  # 16-bit entries
    attrs = {}
    for k, colour in enumerate(("Red", "Green", "Blue")):
        attrs[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        attrs[f"{colour}PaletteColorLookupTableData"] = palette[:, k].astype("<u2").tobytes()
    out = read_image(write_dicom(tmp_path / "pal.dcm", index, "PALETTE COLOR", **attrs))
    np.testing.assert_array_equal(out, colour_image.reshape(-1, 3)[:256][index])


def test_monochrome1_is_inverted(gray_images, tmp_path) -> None:
    img = gray_images[3]
    out = read_image(write_dicom(tmp_path / "m1.dcm", img, "MONOCHROME1"))
    np.testing.assert_array_equal(out, 255 - img)


def test_pillow_modes_become_uint8(gray_images, tmp_path) -> None:
    img = gray_images[0]
    wide = img.astype(np.uint16) * 257  # 16-bit PNG: min-max over the image
    Image.fromarray(wide).save(tmp_path / "16.png")
    expected = np.rint((img - img.min()) * (255.0 / (img.max() - img.min())))
    assert np.abs(read_image(tmp_path / "16.png").astype(int) - expected).max() <= 1
    Image.fromarray(img.astype(np.float32) / 255).save(tmp_path / "f.tif")  # mode F
    assert np.abs(read_image(tmp_path / "f.tif").astype(int) - expected).max() <= 1
    Image.fromarray(img).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), img)
    Image.fromarray(img).convert("P").save(tmp_path / "p.png")  # gray palette -> RGB, equal
    pal = read_image(tmp_path / "p.png")
    assert pal.shape == (28, 28, 3)
    np.testing.assert_array_equal(conform_channels(pal, 1, "p.png"), img)
    Image.fromarray(img).save(tmp_path / "x.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "x.bmp"), img)


def test_nifti_int16_and_float_are_min_max_scaled(gray_images, tmp_path) -> None:
    img = gray_images[1]
    expected = np.rint((img - img.min()) * (255.0 / (img.max() - img.min())))
    for dtype in (np.int16, np.float32):
        data = (img.T.astype(dtype) * 3 - 200)[:, :, None, None]  # (X, Y, 1, 1)
        out = read_image(write_nifti(tmp_path / f"{np.dtype(dtype).name}.nii.gz", data))
        assert out.dtype == np.uint8 and np.abs(out.astype(int) - expected).max() <= 1


# ---------------------------------------------------------------------- channels
def test_rgb_with_equal_channels_conforms_to_one(gray_images, tmp_path) -> None:
    img = gray_images[0]
    Image.fromarray(img).convert("RGB").save(tmp_path / "g.png")
    rgb = read_image(tmp_path / "g.png")
    assert rgb.shape == (28, 28, 3)
    np.testing.assert_array_equal(conform_channels(rgb, 1, tmp_path / "g.png"), img)
    assert conform_channels(rgb, 3, "g.png") is rgb
    assert conform_channels(img, 3, "x") is img  # Preprocess(as_rgb=True) repeats it
    np.testing.assert_array_equal(conform_channels(img[:, :, None], 1, "x"), img)


def test_colour_image_for_a_grayscale_model_is_an_error(colour_image, tmp_path) -> None:
    path = tmp_path / "retina.png"
    Image.fromarray(colour_image).save(path)
    with pytest.raises(InputError, match="colour image.*grayscale") as info:
        conform_channels(read_image(path), 1, path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, DataError)
    with pytest.raises(InputError, match=r"\(28, 28, 4\)"):
        conform_channels(np.zeros((28, 28, 4), np.uint8), 3, path)
    with pytest.raises(ValueError, match="in_chans"):
        conform_channels(colour_image, 2, path)


# ---------------------------------------------------------------------- bad inputs
def test_multi_frame_dicom_is_an_error(gray_images, tmp_path) -> None:
    path = write_dicom(tmp_path / "cine.dcm", gray_images[:3], frames=3)
    with pytest.raises(InputError, match="multi-frame.*3 frames.*extract one frame") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_dicom_without_pixels_or_decoder_is_an_error(gray_images, tmp_path) -> None:
    path = tmp_path / "nopix.dcm"
    write_dicom(path, gray_images[0])
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(InputError, match="no pixel data"):
        read_image(path)
    jls = write_dicom(tmp_path / "jls.dcm", gray_images[0])
    ds = pydicom.dcmread(jls)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # compressed, and not valid JPEG-LS
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xf7" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(jls)
    with pytest.raises(InputError, match="could not be decoded.*JPEG-LS") as info:
        read_image(jls)
    assert info.value.__cause__ is not None


def test_three_d_nifti_names_its_shape(tmp_path) -> None:
    path = write_nifti(tmp_path / "vol.nii.gz", np.zeros((28, 28, 5), np.int16))
    with pytest.raises(InputError, match=r"\(28, 28, 5\).*2D") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_corrupt_empty_unknown_and_missing_files_are_input_errors(gray_images, tmp_path) -> None:
    Image.fromarray(gray_images[0]).save(tmp_path / "ok.png")
    blob = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "garbage.dcm").write_bytes(b"\x00\x01" * 50)
    (tmp_path / "garbage.nii.gz").write_bytes(b"\x1f\x8b" + bytes(100))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    cases = {
        "truncated.png": "not a readable PNG",
        "garbage.png": "not a readable PNG",
        "empty.dcm": "empty",
        "garbage.dcm": "DICOM",
        "garbage.nii.gz": "not a readable NIfTI",
        "notes.txt": "unsupported file type '.txt'",
        "folder": "is a folder",
        "missing.png": "not found",
    }
    for name, message in cases.items():
        with pytest.raises(InputError, match=message) as info:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value), name


# ------------------------------------------------------------------------ listing
def test_list_inputs_sorted_recursive_skipping_hidden_and_unsupported(
    gray_images, tmp_path
) -> None:
    img = gray_images[0]
    for rel in ("b.png", "a/z.PNG", "a/y.nii.gz", "c/deep/x.dcm", ".hidden.png", ".git/h.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / rel, format="PNG")
    write_dicom(tmp_path / "c" / "IM0001", img)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "README").write_text("extensionless, but not DICOM")
    found = list_inputs(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a/y.nii.gz", "a/z.PNG", "b.png", "c/IM0001", "c/deep/x.dcm"]
    assert list_inputs(tmp_path / "b.png") == [tmp_path / "b.png"]


def test_list_inputs_errors_name_the_path(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no supported images") as info:
        list_inputs(tmp_path / "empty")
    assert all(s in str(info.value) for s in SUPPORTED_SUFFIXES)
    with pytest.raises(InputError, match="not found"):
        list_inputs(tmp_path / "nowhere")
