"""Read one medical image file into a uint8 array: for training and for local inference alike.

A folder source reads its images with :func:`read_image`, and ``predict.py`` reads the files it
is given with the same function, so a file that trains is a file that predicts. Both feed the
result through the training preprocessing (:class:`medlite.data.transforms.Preprocess`), which
takes uint8 ``(H, W)`` grayscale or ``(H, W, 3)`` RGB arrays. Every problem a user can fix (an
unsupported, corrupt or 3D file, a colour image for a grayscale model) raises :class:`InputError`
naming the file, what is wrong and what to do; library errors are chained, never shown as a raw
traceback.

Intensity rules (the same for every format):

* uint8 data is kept **bit-exact** (a MedMNIST image saved as PNG, 8-bit DICOM or uint8 NIfTI
  reads back identical), unless a DICOM file asks for a rescale or a VOI LUT / window.
* Any other data (16-bit, int32, float) is min–max scaled over the image to 0..255, because a
  MedMNIST model only ever saw 0..255 images and there is no shared intensity scale to use.
  Non-finite values become 0; a constant image becomes all 0 (with a warning).
* A DICOM VOI LUT or window maps its output range to 0..255 (values outside the window clip),
  so the image looks as the file's creator meant it to be displayed.

Memory: a file is refused (:class:`InputError`, per file) when its header declares more than
``max_pixels`` pixels (default :data:`MAX_PIXELS`), before any pixel is decoded, so a small
compressed file cannot expand into gigabytes. Pixels are converted strip by strip, never as a
full-size float64 copy: reading a grayscale 16-bit image peaks at about 3 bytes per pixel (the
decoded file plus the uint8 result), an 8-bit RGB one at about 7 (Pillow holds RGB as 4 bytes).

Segmentation masks are read with :func:`read_mask` instead, which keeps the stored values
(class indices) untouched.

pydicom (>= 3) and nibabel are imported inside the readers that need them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medlite.errors import DataError

log = logging.getLogger(__name__)

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: file name endings :func:`read_image` dispatches on (matched case-insensitively). DICOM files
#: without such a suffix (``IM0001``, UID-named files) are recognised by their ``DICM`` marker.
SUPPORTED_SUFFIXES = PILLOW_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES

_DICOM_MAGIC_OFFSET = 128
#: the largest image (height x width) :func:`read_image` decodes by default: 8192 x 8192, below
#: Pillow's own decompression-bomb warning (~89 MP); ``max_pixels=None`` lifts the bound
MAX_PIXELS = 8192 * 8192
#: elements converted at a time: bounds the float temporaries of intensity scaling (~8 MB)
_CHUNK_ELEMENTS = 1 << 20
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: colour encodings pydicom 3 returns as RGB (YBR_FULL* via ``as_rgb``, ICT/RCT by the decoder)
_RGB_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


class InputError(DataError):
    """An image file cannot be used; the message names the file and the fix."""


# ---------------------------------------------------------------------------------- dispatch
def _suffix(path: Path) -> str:
    """The supported suffix ``path`` ends with (lower case), or ``""``."""
    name = path.name.lower()
    return next(
        (s for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True) if name.endswith(s)), ""
    )


def _has_dicom_magic(path: Path) -> bool:
    """True when bytes 128..131 are ``DICM`` (the DICOM Part 10 file preamble marker)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def _may_be_bare_dicom(path: Path) -> bool:
    """Names DICOM exports use without a suffix: none (``IM0001``) or a numeric UID tail.

    Only these are sniffed when listing a folder, so listing never opens every file in it.
    """
    suffix = path.suffix
    return path.name != "DICOMDIR" and (not suffix or suffix[1:].isdigit())


def is_supported(path: Path) -> bool:
    """Whether :func:`read_image` would try this file (by suffix, or the DICOM marker)."""
    return bool(_suffix(path)) or (_may_be_bare_dicom(path) and _has_dicom_magic(path))


def _check_file(path: str | os.PathLike) -> Path:
    """The path, once it is known to be a non-empty, readable file (else InputError)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file; pass one image file")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err}); check its permissions") from err
    if size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes); re-export or re-copy it")
    return path


def read_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Read a PNG/JPEG/BMP/TIFF, DICOM or NIfTI file as uint8 ``(H, W)`` or ``(H, W, 3)``.

    The format follows the suffix (see :data:`SUPPORTED_SUFFIXES`); a file with another suffix
    is read as DICOM when it carries the ``DICM`` marker. See the module docstring for how
    intensities become uint8, and :func:`_read_nifti` for the NIfTI orientation convention.
    A file whose header declares more than ``max_pixels`` pixels is refused before decoding.
    """
    path = _check_file(path)
    suffix = _suffix(path)
    if suffix in PILLOW_SUFFIXES:
        image = _read_pillow(path, max_pixels)
    elif suffix in DICOM_SUFFIXES:
        image = _read_dicom(path, force=True, max_pixels=max_pixels)
    elif suffix in NIFTI_SUFFIXES:
        image = _read_nifti(path, max_pixels)
    elif _has_dicom_magic(path):
        image = _read_dicom(path, force=False, max_pixels=max_pixels)
    else:
        raise InputError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; supported: "
            f"{', '.join(SUPPORTED_SUFFIXES)} (or DICOM files with the 'DICM' marker)"
        )
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # torch.from_numpy warns on read-only arrays
        image = image.copy()
    log.debug("%s: read %s %s", path, image.shape, image.dtype)
    return image


# ----------------------------------------------------------------------------- intensities
def check_pixels(path: Path, height: int, width: int, max_pixels: int | None) -> None:
    """Refuse an image larger than ``max_pixels`` from its header, before decoding it: a small
    compressed file can declare billions of pixels (a decompression bomb)."""
    if max_pixels is not None and height * width > max_pixels:
        raise InputError(
            f"{path}: {width} x {height} = {height * width:,} pixels, more than max_pixels="
            f"{max_pixels:,}; downscale or crop the image, or raise max_pixels if this machine "
            "has the memory (about 3 bytes per pixel for grayscale, 7 for RGB)"
        )


def _row_chunks(a: np.ndarray) -> Iterator[slice]:
    """Slices along the first axis holding about :data:`_CHUNK_ELEMENTS` elements each."""
    per_row = max(1, int(np.prod(a.shape[1:], dtype=np.int64)))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, a.shape[0], step):
        yield slice(start, min(start + step, a.shape[0]))


def _finite_range(strips: Iterator[np.ndarray], path: Path) -> tuple[float, float]:
    """Min and max of the finite values over all strips (warns about non-finite ones)."""
    lo, hi, bad = np.inf, -np.inf, 0
    for strip in strips:
        if strip.dtype.kind in "fc":
            finite = np.isfinite(strip)
            bad += int(strip.size - np.count_nonzero(finite))
            strip = strip[finite]
        if strip.size:
            lo, hi = min(lo, float(strip.min())), max(hi, float(strip.max()))
    if lo > hi:
        raise InputError(f"{path}: has no finite pixel values (all NaN/inf); check the file")
    if bad:
        log.warning("%s: %d non-finite pixel values set to 0", path, bad)
    return lo, hi


def _scale_strip(strip: np.ndarray, out: np.ndarray, lo: float, hi: float) -> None:
    """``out[...] = rint((strip - lo) * 255 / (hi - lo))`` for one strip, non-finite -> 0."""
    scaled = np.asarray(strip, dtype=np.float64) - lo
    scaled *= 255.0 / (hi - lo)
    np.rint(scaled, out=scaled)
    if strip.dtype.kind in "fc":
        scaled[~np.isfinite(scaled)] = 0
    np.clip(scaled, 0.0, 255.0, out=scaled)
    out[...] = scaled.astype(np.uint8)


def _minmax_strips(strips, shape: tuple[int, ...], dtype, path: Path) -> np.ndarray:
    """Min–max scale to 0..255 from ``strips()`` (a callable giving ``(rows, array)`` pairs
    that tile the image along its first axis), one strip at a time."""
    lo, hi = _finite_range((a for _, a in strips()), path)
    out = np.zeros(shape, dtype=np.uint8)
    if hi == lo:
        log.warning("%s: constant image (every pixel %g); it reads as all 0", path, lo)
        return out
    log.debug("%s: %s data min-max scaled from [%g, %g] to 0..255", path, dtype, lo, hi)
    for rows, a in strips():
        _scale_strip(a, out[rows], lo, hi)
    return out


def _minmax_to_uint8(values: np.ndarray, path: Path) -> np.ndarray:
    """Min–max scale over the image to 0..255 (non-finite values -> 0), chunk by chunk."""
    a = np.asarray(values)
    if a.ndim == 0:
        a = a.reshape(1)

    def strips():
        return ((rows, a[rows]) for rows in _row_chunks(a))

    return _minmax_strips(strips, a.shape, a.dtype, path)


def _range_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map a known output range [lo, hi] linearly to 0..255, clipping outside it."""
    a = np.asarray(values)
    out = np.zeros(a.shape, dtype=np.uint8)
    if hi > lo and a.ndim:
        for rows in _row_chunks(a):
            _scale_strip(a[rows], out[rows], lo, hi)
    return out


# ---------------------------------------------------------------------------------- Pillow
def _read_pillow(path: Path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """PNG/JPEG/BMP/TIFF through Pillow, EXIF orientation applied (as a viewer shows it).

    The size is checked from the header (``Image.open`` decodes nothing), and the decoded image
    is copied out strip by strip, so no second full-size copy is made.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            check_pixels(path, im.height, im.width, max_pixels)
            if getattr(im, "n_frames", 1) > 1:
                raise InputError(
                    f"{path}: has {im.n_frames} pages/frames (a stack); medlite models take 2D "
                    "images; save the one page you want as its own file"
                )
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return _pillow_to_array(im, path)
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(
            f"{path}: refused as a possible decompression bomb ({err}); downscale the image"
        ) from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        raise InputError(
            f"{path}: not a readable {path.suffix.lstrip('.').upper()} image "
            f"({type(err).__name__}: {err}); the file may be corrupt or truncated, re-export it"
        ) from err


def _pillow_strips(im, convert: str | None = None, keep: int | None = None):
    """The image's rows as numpy strips ``(rows, array)``: ``convert`` each strip to that mode,
    ``keep`` only its first channels. Bounds the copies to one strip at a time."""
    width, height = im.size
    per_row = max(1, width * len(im.getbands()))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    for top in range(0, height, step):
        bottom = min(top + step, height)
        strip = im.crop((0, top, width, bottom))
        if convert is not None:
            strip = strip.convert(convert)
        a = np.asarray(strip)
        yield slice(top, bottom), a if keep is None else a[:, :, :keep]


def _pillow_copy(im, channels: int, convert: str | None = None) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) from the image, strip by strip."""
    shape = (im.height, im.width) if channels == 1 else (im.height, im.width, channels)
    out = np.empty(shape, dtype=np.uint8)
    for rows, a in _pillow_strips(im, convert, keep=channels if channels > 1 else None):
        out[rows] = a
    return out


def _pillow_to_array(im, path: Path) -> np.ndarray:
    """One Pillow image -> uint8 (H, W) or (H, W, 3): alpha dropped, palette expanded."""
    mode = im.mode
    if mode == "L":
        return _pillow_copy(im, 1)
    if mode in ("1", "LA", "La"):  # bilevel -> 0/255; gray + alpha -> gray
        return _pillow_copy(im, 1, convert="L")
    if mode == "RGB":
        return _pillow_copy(im, 3)
    if mode in ("RGBA", "RGBa", "RGBX", "P", "PA"):  # transparency is dropped, not composited
        return _pillow_copy(im, 3, convert="RGBA")
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float gray
        return _minmax_strips(lambda: _pillow_strips(im), (im.height, im.width), mode, path)
    log.debug("%s: Pillow mode %s converted to RGB", path, mode)
    return _pillow_copy(im, 3, convert="RGB")


# ----------------------------------------------------------------------------------- DICOM
def _read_dicom(path: Path, force: bool, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A single-frame DICOM image: Modality LUT, VOI LUT/window, MONOCHROME1 inverted.

    ``force`` reads files without the DICOM preamble (only when the user named a .dcm file).
    Stored 8-bit data with no rescale and no VOI LUT/window is returned bit-exact.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=force)
    except Exception as err:
        raise InputError(
            f"{path}: not a readable DICOM file ({type(err).__name__}: {err}); the file may "
            "be corrupt or not DICOM at all"
        ) from err
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise InputError(
            f"{path}: has no pixel data (not DICOM, a corrupt file, or a DICOM report/DICOMDIR "
            "index rather than an image); pass a DICOM image file"
        )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise InputError(
            f"{path}: is a 3D/multi-frame DICOM ({frames} frames); this is a 2D "
            "(image) model: extract one frame (e.g. with pydicom or dcmtk) and pass that, or "
            "use a model trained on volumes"
        )
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        rows, cols = 0, 0
    check_pixels(path, rows, cols, max_pixels)
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        ds.pixel_array_options(as_rgb=True)  # YBR_FULL(_422) decoded as RGB
        arr = ds.pixel_array
    except Exception as err:
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        syntax = f"transfer syntax {ts.name}" if ts else "no transfer syntax"
        raise InputError(
            f"{path}: its pixel data could not be decoded ({syntax}; {type(err).__name__}: "
            f"{err}); install the decoder pydicom asks for (e.g. pylibjpeg, pyjpegls, gdcm) "
            "or export the image uncompressed"
        ) from err

    if pi in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise InputError(f"{path}: unexpected {pi} pixel array shape {arr.shape}; re-export it")
        image = _dicom_gray(arr, ds, path)
        return 255 - image if pi == "MONOCHROME1" else image  # 0 = white in MONOCHROME1
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as err:  # missing or malformed palette tables
            raise InputError(
                f"{path}: its PALETTE COLOR lookup tables are invalid ({type(err).__name__}: "
                f"{err}); export the image as RGB or PNG"
            ) from err
        if rgb.dtype == np.uint16:  # 16-bit palette entries: full-range to 8-bit
            rgb = ((rgb.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return rgb
    if pi in _RGB_PHOTOMETRICS:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise InputError(f"{path}: unexpected {pi} pixel array shape {arr.shape}; re-export it")
        return arr if arr.dtype == np.uint8 else _minmax_to_uint8(arr, path)
    raise InputError(
        f"{path}: unsupported PhotometricInterpretation {pi or '(missing)'!r}; export it as "
        "MONOCHROME2 or RGB (or as PNG)"
    )


def _dicom_gray(arr: np.ndarray, ds, path: Path) -> np.ndarray:
    """Grayscale DICOM pixels -> uint8 (the caller inverts MONOCHROME1)."""
    from pydicom.pixels import apply_modality_lut

    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    identity = "ModalityLUTSequence" not in ds and slope == 1.0 and intercept == 0.0
    voi_lut = _valid_voi_lut(ds)
    window = "WindowCenter" in ds and "WindowWidth" in ds
    stored_8bit = arr.dtype == np.uint8 and int(ds.get("BitsStored", 8) or 8) == 8
    if stored_8bit and identity and not (voi_lut or window):
        return arr

    def strips():  # the Modality LUT strip by strip: no full-size float64 copy of the image
        return ((rows, apply_modality_lut(arr[rows], ds)) for rows in _row_chunks(arr))

    try:
        if not (voi_lut or window):
            return _minmax_strips(strips, arr.shape, arr.dtype, path)
        out = np.empty(arr.shape, dtype=np.uint8)
        if voi_lut:
            for rows, values in strips():
                out[rows] = _apply_voi_lut_sequence(values, ds)
            return out
        from pydicom.pixels import apply_windowing

        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)  # the window's output range
        log.debug("%s: window applied, output range [%g, %g]", path, lo, hi)
        for rows, values in strips():
            out[rows] = _range_to_uint8(apply_windowing(values, ds), float(lo), float(hi))
        return out
    except InputError:
        raise
    except Exception as err:  # malformed LUT / window attributes
        raise InputError(
            f"{path}: its Modality LUT / VOI LUT / window attributes are invalid "
            f"({type(err).__name__}: {err}); fix or remove them, or export the image as PNG"
        ) from err


def _valid_voi_lut(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _apply_voi_lut_sequence(values: np.ndarray, ds) -> np.ndarray:
    """First VOI LUT, its own entry range mapped to 0..255.

    Input values are rounded and clipped to the LUT's domain first: pydicom's lookup wants
    integers and wraps values beyond 2**16 above the first mapped value.
    """
    from pydicom.pixels import apply_voi

    n, first, _ = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
    n = n or 2**16
    domain = np.arange(first, first + n, dtype=np.int64)
    table = apply_voi(domain, ds)
    idx = np.clip(np.rint(np.asarray(values, dtype=np.float64)), first, first + n - 1)
    out = apply_voi(idx.astype(np.int64), ds)
    return _range_to_uint8(out, float(table.min()), float(table.max()))


# ----------------------------------------------------------------------------------- NIfTI
def _read_nifti(path: Path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A 2D NIfTI image; the data array is ``(x, y)`` and comes back as ``(rows, cols) = (y, x)``.

    Convention: voxel ``data[i, j]`` becomes pixel ``image[j, i]`` (a plain transpose; the affine
    and any flips it implies are ignored). So an ``(H, W)`` image saved as
    ``nib.save(nib.Nifti1Image(image.T, np.eye(4)), "x.nii.gz")`` reads back identical, and a
    slice saved by most tools (x along the width) keeps its width along the columns. Trailing axes
    of length 1 are dropped: ``(X, Y)``, ``(X, Y, 1)`` and ``(X, Y, 1, 1)`` are all 2D.
    """
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
    except Exception as err:
        raise InputError(
            f"{path}: not a readable NIfTI file ({type(err).__name__}: {err}); the file may "
            "be corrupt or truncated, re-export it"
        ) from err
    if len(shape) < 2 or any(s != 1 for s in shape[2:]):
        raise InputError(
            f"{path}: has shape {shape}, a 3D volume (or a series); this is a 2D "
            "(image) model: save the one slice you want as a 2D NIfTI (shape (X, Y)) or as PNG, "
            "or use a model trained on volumes"
        )
    check_pixels(path, shape[1], shape[0], max_pixels)
    try:
        data = np.asanyarray(img.dataobj)  # applies scl_slope / scl_inter when set
    except Exception as err:
        raise InputError(
            f"{path}: its voxel data could not be read ({type(err).__name__}: {err}); the "
            "file may be truncated, re-export it"
        ) from err
    if data.dtype.names or not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise InputError(
            f"{path}: voxel type {data.dtype} (e.g. RGB NIfTI) is not supported; save the image "
            "as grayscale NIfTI or as PNG"
        )
    image = data.reshape(shape[:2]).T
    return image if image.dtype == np.uint8 else _minmax_to_uint8(image, path)


# ----------------------------------------------------------------------------------- masks
#: suffixes whose compression changes pixel values (a mask saved so has values near 0 and 255)
LOSSY_SUFFIXES = (".jpg", ".jpeg")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a segmentation mask as its stored integer values, ``(H, W)`` int64.

    Unlike :func:`read_image`, nothing is rescaled: a mask's pixel values are class indices
    (or 0/255 for a binary mask), and min-max scaling a 16-bit or NIfTI label map would turn
    class 2 of 0..2 into 255. So: grayscale and palette (``P``: the palette index) PNGs keep
    their values; 16-bit and integer-valued float images keep theirs; DICOM masks keep their
    stored values (no Modality LUT, window or MONOCHROME1 inversion); NIfTI masks keep their
    voxel values in :func:`_read_nifti`'s orientation, so an image and its mask saved the same
    way line up. An RGB mask whose three channels are equal becomes one channel; a colour JPEG
    mask is decoded as its luma (JPEG stores a grey mask as luma plus near-neutral chroma noise);
    other colour masks, non-integer or negative values raise :class:`InputError`. EXIF
    orientation is applied as for images.
    """
    path = _check_file(path)
    suffix = _suffix(path)
    if suffix in PILLOW_SUFFIXES:
        values = _mask_pillow(path)
    elif suffix in DICOM_SUFFIXES or (suffix == "" and _has_dicom_magic(path)):
        values = _mask_dicom(path, force=suffix != "")
    elif suffix in NIFTI_SUFFIXES:
        values = _mask_nifti(path)
    else:
        raise InputError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r} for a mask; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    return _integer_mask(values, path)


def _mask_pillow(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise InputError(
                    f"{path}: has {im.n_frames} pages/frames; a mask is one 2D image, save the "
                    "page that belongs to the image as its own file"
                )
            if im.format == "JPEG" and im.mode == "RGB":
                im.draft("L", im.size)  # decode the luma only: a grey mask's values, faster
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("1", "L", "P") or mode.startswith("I") or mode == "F":
                return np.asarray(im)
            if mode in ("LA", "La", "PA"):
                return np.asarray(im)[:, :, 0]  # the value (or palette index); alpha dropped
            rgb = np.asarray(im if mode == "RGB" else im.convert("RGB"))
            if _equal_rgb(rgb):
                return rgb[:, :, 0]
            if path.name.lower().endswith(LOSSY_SUFFIXES):
                return np.asarray(im.convert("L"))
    except InputError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        raise InputError(
            f"{path}: not a readable {path.suffix.lstrip('.').upper()} mask "
            f"({type(err).__name__}: {err}); the file may be corrupt or truncated, re-export it"
        ) from err
    raise InputError(
        f"{path}: is a colour mask (its red, green and blue differ); save masks as single-channel "
        "images whose values are the class indices (or black/white for one class)"
    )


def _mask_dicom(path: Path, force: bool) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=force)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        arr = ds.pixel_array
    except Exception as err:
        raise InputError(
            f"{path}: not a readable DICOM mask ({type(err).__name__}: {err}); the file may be "
            "corrupt, not DICOM, or use a compression pydicom cannot decode here"
        ) from err
    if frames > 1 or arr.ndim == 3 and arr.shape[-1] != 3:
        raise InputError(
            f"{path}: is a multi-frame DICOM ({arr.shape}); a mask is one 2D image, extract the "
            "frame that belongs to the image"
        )
    if arr.ndim == 3:
        if not _equal_rgb(arr):
            raise InputError(f"{path}: is a colour DICOM mask; store class indices in one channel")
        arr = arr[:, :, 0]
    return arr


def _mask_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise InputError(
            f"{path}: not a readable NIfTI mask ({type(err).__name__}: {err}); the file may be "
            "corrupt or truncated, re-export it"
        ) from err
    if len(shape) < 2 or any(s != 1 for s in shape[2:]):
        raise InputError(
            f"{path}: has shape {shape}, a 3D volume; a mask here is one 2D slice (shape (X, Y)) "
            "matching its 2D image; save that slice on its own"
        )
    if data.dtype.names or not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise InputError(f"{path}: voxel type {data.dtype} cannot hold class indices")
    return data.reshape(shape[:2]).T  # the orientation _read_nifti gives its image


def _integer_mask(values: np.ndarray, path: Path) -> np.ndarray:
    """Class values as int64, or InputError for values that cannot be class indices."""
    a = np.asarray(values)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise InputError(f"{path}: the mask has NaN or infinite values; class indices needed")
        rounded = np.rint(a)
        if np.abs(a - rounded).max(initial=0.0) > 1e-3:
            raise InputError(
                f"{path}: the mask has fractional values (e.g. {a[a != rounded].flat[0]:g}); a mask "
                "holds whole class indices (a resampled or probability map is not a mask)"
            )
        a = rounded
    if a.size and a.min() < 0:
        raise InputError(
            f"{path}: the mask has negative values ({a.min():g}); class indices are >= 0"
        )
    return np.ascontiguousarray(a, dtype=np.int64)


def _equal_rgb(rgb: np.ndarray) -> bool:
    return bool(
        np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])
    )


# -------------------------------------------------------------------------------- channels
def conform_channels(image: np.ndarray, in_chans: int, path: str | os.PathLike) -> np.ndarray:
    """Match an image from :func:`read_image` to a model's ``in_chans`` (1 or 3).

    Grayscale ``(H, W)`` is returned unchanged for either: when ``in_chans`` is 3 the training
    preprocessing (``Preprocess`` with ``as_rgb``) repeats it to RGB itself. An RGB image whose
    three channels are equal (a grayscale image saved as RGB) becomes one channel; a real colour
    image for a grayscale model is an error rather than a silent, lossy conversion.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if image.ndim == 2:
        return image
    channels = image.shape[2] if image.ndim == 3 else None
    if channels == 1:
        return image[:, :, 0]
    if channels != 3:
        raise InputError(
            f"{path}: image shape {image.shape} is neither grayscale nor RGB; medlite models "
            "take (H, W) grayscale or (H, W, 3) RGB images; convert it to one of those"
        )
    if in_chans == 3:
        return image
    if np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(
        image[:, :, 0], image[:, :, 2]
    ):
        log.debug("%s: RGB with equal channels read as grayscale", path)
        return np.ascontiguousarray(image[:, :, 0])
    raise InputError(
        f"{path}: is a colour image but the model was trained on grayscale (1-channel) images; "
        "convert it to grayscale deliberately (the way the training images were made) and pass "
        "that file"
    )


# --------------------------------------------------------------------------------- listing
def walk_visible(path: Path) -> Iterator[tuple[Path, list[str]]]:
    """Each folder under ``path`` (recursively; callers sort) with its file names, hidden files
    and folders (names starting with ".") left out."""
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield Path(root), [n for n in files if not n.startswith(".")]


def list_inputs(path: str | os.PathLike) -> list[Path]:
    """The image files to predict on: a file as given, or a folder's supported files.

    A folder is searched recursively, hidden files and folders (names starting with ".") are
    skipped, and the result is sorted so runs are reproducible.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: not found; pass an image file or a folder of images")
    if not path.is_dir():
        return [path]
    found: list[Path] = []
    for folder, names in walk_visible(path):
        for name in names:
            file = folder / name
            if file.is_file() and is_supported(file):
                found.append(file)
    if not found:
        raise InputError(
            f"{path}: no supported images in this folder (searched recursively); supported: "
            f"{', '.join(SUPPORTED_SUFFIXES)} (or DICOM files with the 'DICM' marker)"
        )
    log.debug("%s: %d input files", path, len(found))
    return sorted(found)
