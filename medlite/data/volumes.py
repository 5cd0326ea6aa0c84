"""Read one 3D volume (a NIfTI file or a folder holding one DICOM series) into a uint8 array.

The volume counterpart of :mod:`medlite.data.readers`: training from a user's folder and
``predict.py`` read volumes with :func:`read_volume`, so a scan that trains is a scan that
predicts. Every problem a user can fix raises :class:`~medlite.data.readers.InputError` naming
the file or folder, what is wrong and what to do.

Geometry (the same for every format). The array is ``(D, H, W)`` in the patient's anatomical
axes, so a scan saved in two orientations, or as DICOM and as NIfTI, reads the same array:

* **D** runs inferior -> superior (feet to head), **H** anterior -> posterior (the top row of a
  slice is the front of the patient), **W** patient right -> left. That is DICOM's LPS patient
  axes as ``(z, y, x)``: an axial series reads in its stored row/column order, slice by slice
  from the feet up, and ``array[k]`` shows as a viewer shows an axial slice (radiological).
* Oblique or sagittal/coronal acquisitions go to the *closest* of these axes (no resampling),
  as ``nib.as_closest_canonical`` does: NIfTI data is made RAS+ by it and then read as
  ``(z, y, x)`` with y and x reversed. A NIfTI round trip: save ``array.transpose(2, 1, 0)``
  with the affine ``np.diag([-sw, -sh, sd, 1])``; it reads back as ``array``.
* ``spacing`` is the voxel size in mm in the same ``(D, H, W)`` order, ``None`` when unknown.
* A DICOM series is ordered by position along the slice normal (``ImagePositionPatient`` .
  ``ImageOrientationPatient``) and must be complete and regular (no missing or duplicate
  positions, one orientation, one slice size). Without positions it falls back to
  ``InstanceNumber`` order, with a warning, and keeps its stored orientation.

Intensity (the whole volume at once, never per slice, so slices keep their relative contrast):

* uint8 data without a rescale or window is kept **bit-exact** (a MedMNIST 3D volume saved as
  NIfTI or 8-bit DICOM reads back identical).
* Otherwise a window maps to 0..255 (values outside clip): the ``window=(center, width)``
  argument if given (for CT in HU, e.g. ``(40, 400)`` soft tissue), else the VOI LUT or
  ``WindowCenter``/``WindowWidth`` of the series' first slice. DICOM rescale slope/intercept
  (the Modality LUT, i.e. HU for CT) is applied per slice first.
* Without a window: min-max over the whole volume to 0..255. Non-finite values become 0; a
  constant volume reads as all 0 (with a warning). MONOCHROME1 is inverted last.

:func:`fit_volume` brings a volume to ``size``³ by the rule of
:func:`medlite.data.transforms.fit_volume`, optionally resampling to isotropic voxels first.
pydicom (>= 3) and nibabel are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlite.data.readers import (
    _PIXEL_TAGS,
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    PILLOW_SUFFIXES,
    InputError,
    _apply_voi_lut_sequence,
    _check_file,
    _has_dicom_magic,
    _range_to_uint8,
    _valid_voi_lut,
    walk_visible,
)

log = logging.getLogger(__name__)

SOURCES = ("nifti", "dicom-series")
#: voxels processed at once when mapping intensities (a float64 CT would otherwise need GBs)
_SLAB_VOXELS = 1 << 24
#: direction cosines that differ by less than this are the same orientation
_ORIENTATION_TOL = 1e-3
#: slices closer than this (mm) along the normal share a position
_DUPLICATE_TOL = 1e-3
_FIX_INPUT = (
    "pass a NIfTI file (.nii, .nii.gz), a folder holding one DICOM series, or a multi-frame "
    "DICOM file"
)


@dataclass(frozen=True, eq=False)
class Volume:
    """A volume as read: ``array`` uint8 ``(D, H, W)``, ``spacing`` in mm in the same order
    (``None`` when the file does not say), ``source`` ``"nifti"`` or ``"dicom-series"``."""

    array: np.ndarray
    spacing: tuple[float, float, float] | None
    source: str
    path: Path


# ---------------------------------------------------------------------------------- dispatch
def read_volume(path: str | os.PathLike, *, window: tuple[float, float] | None = None) -> Volume:
    """Read a NIfTI file, a DICOM series folder or a multi-frame DICOM file as a :class:`Volume`.

    ``window=(center, width)`` maps that value range to 0..255 instead of the file's own window
    or min-max (see the module docstring for the geometry and intensity rules).
    """
    window = _check_window(window)
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: not found; check the path ({_FIX_INPUT})")
    if path.is_dir():
        volume = _read_series_folder(path, window)
    else:
        path = _check_file(path)
        name = path.name.lower()
        if name.endswith(NIFTI_SUFFIXES):
            volume = _read_nifti_volume(path, window)
        elif name.endswith(DICOM_SUFFIXES) or _has_dicom_magic(path):
            volume = _read_dicom_file(path, window)
        elif name.endswith(PILLOW_SUFFIXES):
            raise InputError(
                f"{path}: is a 2D image ({path.suffix}); this model takes 3D volumes: {_FIX_INPUT}"
            )
        else:
            raise InputError(
                f"{path}: unsupported file type {path.suffix or '(no suffix)'!r} for a volume; "
                f"{_FIX_INPUT}"
            )
    array = np.ascontiguousarray(volume.array)
    if not array.flags.writeable:  # torch.from_numpy warns on read-only arrays
        array = array.copy()
    log.debug("%s: volume %s, spacing %s", path, array.shape, volume.spacing)
    return Volume(array, volume.spacing, volume.source, path)


def _check_window(window) -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as err:
        raise ValueError(f"window must be (center, width), got {window!r}") from err
    if not (np.isfinite(center) and np.isfinite(width) and width > 0):
        raise ValueError(f"window must be (center, width) with width > 0, got {window!r}")
    return center, width


def _is_dicom_file(path: Path) -> bool:
    """A DICOM file in a series folder: a .dcm/.dicom suffix, or any other non-image, non-hidden
    file with the ``DICM`` marker (``IM0001``, UIDs, Siemens ``.IMA``); never a DICOMDIR."""
    name = path.name.lower()
    if name.startswith(".") or name == "dicomdir" or not path.is_file():
        return False
    if name.endswith(DICOM_SUFFIXES):
        return True
    return not name.endswith(PILLOW_SUFFIXES + NIFTI_SUFFIXES) and _has_dicom_magic(path)


def is_volume_input(path: str | os.PathLike) -> bool:
    """Whether ``path`` belongs to :func:`read_volume` rather than the 2D reader: a folder
    holding a cross-sectional series (2 or more DICOM files, the first with a slice position,
    so a folder of 2D radiographs is not taken for one), a NIfTI file with 3 or more axes
    longer than 1, a multi-frame DICOM."""
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            files = [p for p in sorted(path.iterdir()) if _is_dicom_file(p)]
            if len(files) < 2:
                return False
            import pydicom

            ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
            return "ImagePositionPatient" in ds or _frame_count(ds) > 1
        except Exception:  # noqa: BLE001 - unreadable: the reader says what is wrong with it
            return False
    if not path.is_file():
        return False
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        try:
            shape = nib.load(path).shape  # reads the header only
        except Exception:
            return False  # the reader says what is wrong with it
        return sum(int(s) > 1 for s in shape) >= 3
    if _is_dicom_file(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=name.endswith(DICOM_SUFFIXES))
            return _frame_count(ds) > 1
        except Exception:
            return False
    return False


def list_volume_inputs(path: str | os.PathLike) -> list[Path]:
    """The volumes to predict on, sorted: a file or series folder as given; in a folder
    (searched recursively, hidden names skipped) each NIfTI file and each folder that directly
    holds DICOM files (one series) is one volume."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: not found; {_FIX_INPUT}, or a folder of those")
    if not path.is_dir():
        return [path]
    found: list[Path] = []
    for folder, names in walk_visible(path):
        found += [folder / n for n in names if n.lower().endswith(NIFTI_SUFFIXES)]
        if any(_is_dicom_file(folder / n) for n in names):
            found.append(folder)
    if not found:
        raise InputError(
            f"{path}: no volumes in this folder (searched recursively); expected NIfTI files "
            "(.nii, .nii.gz) or folders each holding the DICOM files of one series"
        )
    log.debug("%s: %d input volumes", path, len(found))
    return sorted(found)


# -------------------------------------------------------------------------------- geometry
def _ras_to_dhw(data, zooms) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """RAS+ data ``(x, y, z)`` -> ``(D, H, W)`` = LPS ``(z, y, x)``; zooms in mm alike."""
    array = np.asarray(data).transpose(2, 1, 0)[:, ::-1, ::-1]
    spacing = None
    if zooms is not None:
        spacing = tuple(float(zooms[axis]) for axis in (2, 1, 0))
        if not all(np.isfinite(s) and s > 0 for s in spacing):
            spacing = None
    return array, spacing


def _reorient(
    stack: np.ndarray, affine_ras: np.ndarray, zooms_ijk: Sequence[float] | None
) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """A ``(k, j, i)`` stack with its voxel -> RAS affine, reoriented as NIfTI volumes are:
    the closest canonical axes (the transform ``nib.as_closest_canonical`` applies), then
    :func:`_ras_to_dhw`."""
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(affine_ras)
    ras = apply_orientation(stack.transpose(2, 1, 0), ornt)
    zooms_ras = None
    if zooms_ijk is not None:
        zooms_ras = [0.0, 0.0, 0.0]
        for axis, (target, _flip) in enumerate(ornt):
            zooms_ras[int(target)] = float(zooms_ijk[axis])
    return _ras_to_dhw(ras, zooms_ras)


# ----------------------------------------------------------------------------- intensities
def _slabs(values: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (values -> uint8) over the volume a few slices at a time; non-finite -> -inf."""
    out = np.empty(values.shape, dtype=np.uint8)
    plane = max(1, int(np.prod(values.shape[1:])))
    step = max(1, _SLAB_VOXELS // plane)
    floating = np.issubdtype(values.dtype, np.floating)
    for start in range(0, values.shape[0], step):
        slab = values[start : start + step]
        if floating:
            slab = np.where(np.isfinite(slab), slab, -np.inf)
        out[start : start + step] = fn(slab)
    return out


def _minmax_volume(values: np.ndarray, where: Path) -> np.ndarray:
    """``readers._minmax_to_uint8`` over the whole volume, a slab at a time (same numbers)."""
    lo, hi, bad = np.inf, -np.inf, 0
    plane = max(1, int(np.prod(values.shape[1:])))
    step = max(1, _SLAB_VOXELS // plane)
    for start in range(0, values.shape[0], step):
        slab = values[start : start + step]
        if np.issubdtype(slab.dtype, np.floating):
            finite = np.isfinite(slab)
            bad += int(slab.size - np.count_nonzero(finite))
            slab = slab[finite]
        if slab.size:
            lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    if not np.isfinite(lo):
        raise InputError(f"{where}: has no finite voxel values (all NaN/inf); check the file")
    if bad:
        log.warning("%s: %d non-finite voxel values set to 0", where, bad)
    if hi == lo:
        log.warning("%s: constant volume (every voxel %g); it reads as all 0", where, lo)
        return np.zeros(values.shape, dtype=np.uint8)
    log.debug("%s: %s data min-max scaled from [%g, %g] to 0..255", where, values.dtype, lo, hi)
    return _slabs(values, lambda slab: _range_to_uint8(slab, lo, hi))


def _window_volume(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    center, width = window
    lo, hi = center - width / 2, center + width / 2
    return _slabs(values, lambda slab: _range_to_uint8(slab, lo, hi))


# ----------------------------------------------------------------------------------- NIfTI
def _read_nifti_volume(path: Path, window: tuple[float, float] | None) -> Volume:
    """A 3D NIfTI volume, made RAS+ by ``nib.as_closest_canonical`` and read as (D, H, W)."""
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
    except Exception as err:
        raise InputError(
            f"{path}: not a readable NIfTI file ({type(err).__name__}: {err}); the file may "
            "be corrupt or truncated, re-export it"
        ) from err
    spatial = (shape + (1, 1, 1))[:3]
    if any(s != 1 for s in shape[3:]):
        raise InputError(
            f"{path}: has shape {shape}, a 4D series (time points or channels); this model takes "
            "one 3D volume: pick one volume (e.g. nibabel's four_to_three or fslsplit) and pass "
            "that file"
        )
    if sum(s > 1 for s in spatial) < 3:
        raise InputError(
            f"{path}: has shape {shape}, a 2D image; this model takes volumes (3D, shape "
            "(X, Y, Z)): pass the whole scan, or use a 2D model for 2D images"
        )
    if img.get_data_dtype().names:
        raise InputError(
            f"{path}: voxel type {img.get_data_dtype()} (e.g. RGB NIfTI) is not supported; "
            "save the volume as grayscale NIfTI"
        )
    try:
        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj)  # applies scl_slope / scl_inter when set
    except Exception as err:
        raise InputError(
            f"{path}: its voxel data could not be read ({type(err).__name__}: {err}); the "
            "file may be truncated, re-export it"
        ) from err
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise InputError(f"{path}: voxel type {data.dtype} is not supported; save it as numbers")
    data = data.reshape(data.shape[:3])
    zooms = _nifti_zooms_mm(canonical.header, path)
    ras = _nifti_intensity(data, path, window)
    array, spacing = _ras_to_dhw(ras, zooms)
    return Volume(array, spacing, "nifti", path)


def _nifti_zooms_mm(header, path: Path) -> tuple[float, ...] | None:
    """The first three zooms in mm; NIfTI may store metres or microns (unknown: mm, as tools do)."""
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    unit = header.get_xyzt_units()[0]
    scale = {"meter": 1000.0, "micron": 1e-3}.get(unit, 1.0)
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        log.debug("%s: no usable voxel size in the header (%s); spacing unknown", path, zooms)
        return None
    return tuple(z * scale for z in zooms)


def _nifti_intensity(data: np.ndarray, path: Path, window) -> np.ndarray:
    if window is not None:
        return _window_volume(data, window)
    if data.dtype == np.uint8:
        return data
    return _minmax_volume(data, path)


# ----------------------------------------------------------------------------------- DICOM
@dataclass
class _Slice:
    """One 2D image of a series: a file, or one frame of a multi-frame file."""

    name: str  # for messages: the file name (or "name frame k")
    ds: object  # pydicom Dataset holding this slice's attributes
    pixels: Callable[[], np.ndarray]


def _frame_count(ds) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _dcmread(path: Path, **kwargs):
    import pydicom

    try:
        return pydicom.dcmread(path, force=path.name.lower().endswith(DICOM_SUFFIXES), **kwargs)
    except Exception as err:
        raise InputError(
            f"{path}: not a readable DICOM file ({type(err).__name__}: {err}); the file may be "
            "corrupt or not DICOM at all: remove it from the folder or re-export it"
        ) from err


def _pixel_array(ds, name: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as err:
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        syntax = f"transfer syntax {ts.name}" if ts else "no transfer syntax"
        raise InputError(
            f"{name}: its pixel data could not be decoded ({syntax}; {type(err).__name__}: "
            f"{err}); install the decoder pydicom asks for (e.g. pylibjpeg, pyjpegls, gdcm) "
            "or export the series uncompressed"
        ) from err


def _read_series_folder(folder: Path, window) -> Volume:
    """All DICOM images directly in ``folder``: one series (or one multi-frame file)."""
    files = sorted(p for p in folder.iterdir() if _is_dicom_file(p))
    if not files:
        inner = [p for p in sorted(folder.rglob("*")) if p.is_dir() and is_volume_input(p)]
        hint = (
            f"; its sub-folders hold {len(inner)} DICOM series folder(s) (e.g. {inner[0]}): "
            "pass one of them"
            if inner
            else ""
        )
        raise InputError(
            f"{folder}: no DICOM files in this folder (looked for .dcm/.dicom files and files "
            f"with the 'DICM' marker, not in sub-folders){hint}; pass the folder that holds the "
            "slice files of one series"
        )
    images = []
    for file in files:
        ds = _dcmread(file, defer_size="1 KB")  # pixel data is read later, for one series only
        if any(tag in ds for tag in _PIXEL_TAGS):
            images.append((file, ds))
        else:
            log.info("%s: skipped, a DICOM object without pixel data", file)
    if not images:
        raise InputError(
            f"{folder}: its {len(files)} DICOM file(s) hold no images (reports, presentation "
            "states or index files); pass the folder that holds the image slices of one series"
        )
    series: dict[str, list] = {}
    for file, ds in images:
        series.setdefault(
            str(ds.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)"), []
        ).append((file, ds))
    if len(series) > 1:
        lines = "\n".join(
            f"  - {uid} {str(members[0][1].get('SeriesDescription', '') or '(no description)')!r}"
            f": {len(members)} file(s), e.g. {members[0][0].name}"
            for uid, members in sorted(series.items())
        )
        raise InputError(
            f"{folder}: holds {len(series)} DICOM series; a volume is one series: move each "
            f"series into its own folder and pass one of them (series UID, description, files):\n"
            f"{lines}"
        )
    multi = [(file, ds) for file, ds in images if _frame_count(ds) > 1]
    if multi:
        if len(images) > 1:
            raise InputError(
                f"{folder}: mixes a multi-frame DICOM file ({multi[0][0].name}, "
                f"{_frame_count(multi[0][1])} frames) with {len(images) - 1} other image file(s); "
                "pass the multi-frame file on its own, or a folder of single-frame slices"
            )
        return _read_dicom_file(multi[0][0], window)
    slices = [
        _Slice(file.name, ds, lambda ds=ds, f=file: _pixel_array(ds, str(f))) for file, ds in images
    ]
    if len(slices) < 2:
        raise InputError(
            f"{folder}: holds a single 2D DICOM slice ({files[0].name}); this model takes "
            "volumes: pass the folder that holds all slices of the series"
        )
    return _assemble(slices, folder, window, fallback_warning=True)


def _read_dicom_file(path: Path, window) -> Volume:
    """A multi-frame DICOM file (enhanced CT/MR or legacy): its frames are the slices."""
    ds = _dcmread(path)
    frames = _frame_count(ds)
    if frames < 2:
        raise InputError(
            f"{path}: is a single 2D DICOM slice; this model takes volumes: pass the folder that "
            "holds all slices of its series"
        )
    cache: list[np.ndarray] = []

    def frame(k: int) -> np.ndarray:
        if not cache:
            arr = _pixel_array(ds, str(path))
            if arr.ndim != 3 or arr.shape[0] != frames:
                raise InputError(
                    f"{path}: {frames} frames of pixel shape {arr.shape}; a grayscale volume "
                    "needs (frames, rows, columns); re-export it"
                )
            cache.append(arr)
        return cache[0][k]

    slices = [
        _Slice(f"{path.name} frame {k + 1}", _frame_header(ds, k), lambda k=k: frame(k))
        for k in range(frames)
    ]
    return _assemble(slices, path, window, fallback_warning=False)


#: functional group sequences of an enhanced multi-frame file -> the attributes they carry
_FUNCTIONAL_GROUPS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}
_FRAME_KEYWORDS = (
    "Rows",
    "Columns",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "Modality",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)


def _frame_header(ds, k: int):
    """Frame ``k``'s attributes as a single-frame slice would carry them (top level, then the
    shared and per-frame functional groups). Positions only come from per-frame groups: a
    top-level ImagePositionPatient is the first frame's, so such frames keep their order."""
    from pydicom.dataset import Dataset

    header = Dataset()
    for keyword in _FRAME_KEYWORDS:
        if keyword in ds:
            header.add(ds.data_element(keyword))
    header.InstanceNumber = k + 1
    groups = []
    for seq_name, index in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", k),
    ):
        seq = ds.get(seq_name)
        if seq and len(seq) > index:
            groups.append(seq[index])
    for group in groups:
        for seq_name, keywords in _FUNCTIONAL_GROUPS.items():
            items = group.get(seq_name)
            if not items:
                continue
            for keyword in keywords:
                if keyword in items[0]:
                    header.add(items[0].data_element(keyword))
    return header


def _floats(ds, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        values = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    except (TypeError, ValueError):
        return None
    return values if values.shape == (n,) and np.isfinite(values).all() else None


def _assemble(slices: list[_Slice], where: Path, window, fallback_warning: bool) -> Volume:
    """Check, order and stack the slices of one series, then map intensities and reorient."""
    _check_slices_match(slices, where)
    ordered, affine, zooms = _order(slices, where, fallback_warning)
    first = ordered[0].ds
    rows, cols = int(first.Rows), int(first.Columns)
    stack = np.empty((len(ordered), rows, cols), dtype=np.float32)
    file_window = "WindowCenter" in first and "WindowWidth" in first
    exact = window is None and not _valid_voi_lut(first) and not file_window
    for k, s in enumerate(ordered):
        arr = s.pixels()
        if arr.shape != (rows, cols):
            raise InputError(
                f"{where}: slice {s.name} has pixel shape {arr.shape}, not ({rows}, {cols}) as "
                "its header says; re-export the series"
            )
        values, identity = _modality(arr, s.ds, where, s.name)
        exact = exact and identity and arr.dtype == np.uint8
        exact = exact and int(s.ds.get("BitsStored", 8) or 8) == 8
        stack[k] = values
    if exact:
        out = stack.astype(np.uint8)
    elif window is not None:
        out = _window_volume(stack, window)
    else:
        out = _dicom_voi(stack, first, where)
    if str(first.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 255 - out  # 0 = white in MONOCHROME1
    if affine is None:
        array, spacing = out, zooms
    else:
        array, spacing = _reorient(out, affine, zooms)
    return Volume(array, spacing, "dicom-series", where)


def _modality(arr: np.ndarray, ds, where: Path, name: str) -> tuple[np.ndarray, bool]:
    """Stored values -> Modality LUT output (HU for CT); and whether that was the identity."""
    from pydicom.pixels import apply_modality_lut

    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    if "ModalityLUTSequence" not in ds and slope == 1.0 and intercept == 0.0:
        return arr, True
    try:
        return apply_modality_lut(arr, ds), False
    except Exception as err:
        raise InputError(
            f"{where}: slice {name}: its rescale / Modality LUT attributes are invalid "
            f"({type(err).__name__}: {err}); fix or remove them and re-export the series"
        ) from err


def _dicom_voi(values: np.ndarray, ds, where: Path) -> np.ndarray:
    """The first slice's VOI LUT or window over the whole volume, else min-max."""
    try:
        if _valid_voi_lut(ds):
            return _slabs(values, lambda slab: _apply_voi_lut_sequence(slab, ds))
        if "WindowCenter" in ds and "WindowWidth" in ds:
            from pydicom.pixels import apply_windowing

            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)  # the window's output range
            log.debug("%s: window applied, output range [%g, %g]", where, lo, hi)
            return _slabs(
                values,
                lambda slab: _range_to_uint8(apply_windowing(slab, ds), float(lo), float(hi)),
            )
    except InputError:
        raise
    except Exception as err:  # malformed LUT / window attributes
        raise InputError(
            f"{where}: the VOI LUT / window attributes of its first slice are invalid "
            f"({type(err).__name__}: {err}); fix or remove them, or pass window=(center, width)"
        ) from err
    return _minmax_volume(values, where)


def _check_slices_match(slices: list[_Slice], where: Path) -> None:
    """One slice size and one grayscale encoding across the series."""
    sizes: dict[tuple[int, int], list[str]] = {}
    for s in slices:
        try:
            size = (int(s.ds.Rows), int(s.ds.Columns))
        except (AttributeError, TypeError, ValueError) as err:
            raise InputError(
                f"{where}: slice {s.name} has no valid Rows/Columns; re-export it"
            ) from err
        sizes.setdefault(size, []).append(s.name)
    if len(sizes) > 1:
        listed = ", ".join(
            f"{r}x{c} ({len(names)} slice(s), e.g. {names[0]})"
            for (r, c), names in sorted(sizes.items(), key=lambda kv: -len(kv[1]))
        )
        raise InputError(
            f"{where}: slices of different sizes (rows x columns): {listed}; a volume needs "
            "equal-sized slices: remove the odd ones (e.g. a localizer) or pass the right series"
        )
    kinds = Counter(str(s.ds.get("PhotometricInterpretation", "")).strip().upper() for s in slices)
    bad = [k for k in kinds if k not in ("MONOCHROME1", "MONOCHROME2")]
    if bad or len(kinds) > 1:
        raise InputError(
            f"{where}: PhotometricInterpretation {', '.join(sorted(kinds))}; volumes are read as "
            "grayscale (MONOCHROME1/MONOCHROME2, one of them for the whole series); colour "
            "series are not supported"
        )


def _order(slices: list[_Slice], where: Path, fallback_warning: bool):
    """Slices in position order, with the voxel -> RAS affine and (i, j, k) zooms.

    Without positions: InstanceNumber order, no affine (stored orientation kept) and the zooms
    from SpacingBetweenSlices/SliceThickness and PixelSpacing when present.
    """
    n = len(slices)
    positions = [_floats(s.ds, "ImagePositionPatient", 3) for s in slices]
    orientations = [_floats(s.ds, "ImageOrientationPatient", 6) for s in slices]
    pixel = [_floats(s.ds, "PixelSpacing", 2) for s in slices]
    if any(p is None for p in positions) or any(o is None for o in orientations):
        return _order_by_instance(slices, where, fallback_warning, pixel[0])

    ref = orientations[0]
    for s, o in zip(slices, orientations, strict=True):
        if np.abs(o - ref).max() > _ORIENTATION_TOL:
            raise InputError(
                f"{where}: slices have different orientations (ImageOrientationPatient "
                f"{np.round(ref, 3).tolist()} in {slices[0].name}, {np.round(o, 3).tolist()} in "
                f"{s.name}); a volume is one stack: remove the other images (e.g. a localizer) "
                "or pass the right series"
            )
    known = [p for p in pixel if p is not None]
    if known and any(np.abs(p - known[0]).max() > 1e-3 * known[0].max() for p in known):
        raise InputError(
            f"{where}: slices have different PixelSpacing ({sorted({tuple(p) for p in known})}); "
            "a volume needs one pixel grid: pass one series of equal slices"
        )
    row_dir, col_dir = ref[:3], ref[3:]
    normal = np.cross(row_dir, col_dir)
    if not 0.9 < np.linalg.norm(normal) < 1.1:
        raise InputError(
            f"{where}: ImageOrientationPatient {ref.tolist()} is not two unit directions at a "
            "right angle; the files are malformed, re-export the series"
        )
    normal /= np.linalg.norm(normal)
    pos = np.stack(positions)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    ordered = [slices[i] for i in order]
    along = along[order]
    gaps = np.diff(along)
    _check_gaps(ordered, along, gaps, where)
    gap = float((along[-1] - along[0]) / (n - 1))
    step = (pos[order[-1]] - pos[order[0]]) / (n - 1)
    if np.linalg.norm(step - gap * normal) > 0.01 * gap:
        log.warning(
            "%s: the slices are offset within their plane from one to the next (a tilted gantry "
            "or a sheared stack); read as a straight stack",
            where,
        )
    if known and len(known) == n:
        row_spacing, col_spacing = (float(v) for v in known[0])
        zooms = (col_spacing, row_spacing, gap)
    else:
        log.debug("%s: no PixelSpacing; spacing unknown", where)
        row_spacing = col_spacing = 1.0
        zooms = None
    lps = np.column_stack([row_dir * col_spacing, col_dir * row_spacing, normal * gap])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps  # DICOM LPS -> NIfTI RAS
    return ordered, affine, zooms


def _check_gaps(ordered: list[_Slice], along: np.ndarray, gaps: np.ndarray, where: Path) -> None:
    """No two slices at one position; all gaps within 10% (at least 0.1 mm) of the median."""
    n = len(ordered)
    dup = np.flatnonzero(gaps < _DUPLICATE_TOL)
    if dup.size:
        i = int(dup[0])
        raise InputError(
            f"{where}: duplicate slice positions ({dup.size} slice(s) at the position of "
            f"another; e.g. {ordered[i].name} and {ordered[i + 1].name} both at {along[i]:.3f} mm "
            "along the slice normal): the series holds several images per position (echoes, time "
            "points, b-values or duplicate files); split it so each position appears once, or "
            "remove the duplicates"
        )
    median = float(np.median(gaps))
    tol = min(max(0.1 * median, 0.1), 0.5 * median)
    bad = np.flatnonzero(np.abs(gaps - median) > tol)
    if not bad.size:
        return
    i = int(bad[0])
    ratio = gaps[i] / median
    missing = int(round(ratio)) - 1
    why = (
        f"about {missing} slice(s) missing there"
        if missing >= 1 and abs(ratio - round(ratio)) < 0.2
        else "uneven slice spacing"
    )
    more = f" (and {bad.size - 1} more irregular gap(s))" if bad.size > 1 else ""
    raise InputError(
        f"{where}: inconsistent slice spacing: {gaps[i]:.3g} mm between {ordered[i].name} and "
        f"{ordered[i + 1].name} (slices {i + 1} and {i + 2} of {n} in position order, at "
        f"{along[i]:.2f} and {along[i + 1]:.2f} mm along the slice normal), where the usual gap "
        f"is {median:.3g} mm{more}: {why}; re-export the complete series"
    )


def _order_by_instance(slices: list[_Slice], where: Path, warn: bool, pixel: np.ndarray | None):
    numbers = []
    for s in slices:
        try:
            numbers.append(int(s.ds.get("InstanceNumber")))
        except (TypeError, ValueError):
            raise InputError(
                f"{where}: slice {s.name} has neither a position (ImagePositionPatient and "
                "ImageOrientationPatient) nor an InstanceNumber, so the slice order is unknown; "
                "re-export the series with its geometry"
            ) from None
    counts = Counter(numbers)
    if len(counts) < len(numbers):
        number = next(k for k, c in counts.items() if c > 1)
        names = [s.name for s, m in zip(slices, numbers, strict=True) if m == number]
        raise InputError(
            f"{where}: slices {', '.join(names)} share InstanceNumber {number} and there are no "
            "positions to order them by; pass one series with one image per slice"
        )
    order = np.argsort(numbers, kind="stable")
    ordered = [slices[i] for i in order]
    if warn:
        log.warning(
            "%s: slices without ImagePositionPatient/ImageOrientationPatient; ordered by "
            "InstanceNumber, stored orientation kept (not made canonical)",
            where,
        )
    steps = np.diff(np.sort(numbers))
    if steps.size and steps.max() > 1:
        log.warning(
            "%s: InstanceNumbers jump (by up to %d); a slice may be missing", where, steps.max()
        )
    first = ordered[0].ds
    thickness = _floats(first, "SpacingBetweenSlices", 1)
    if thickness is None:
        thickness = _floats(first, "SliceThickness", 1)
    zooms = None
    if thickness is not None and pixel is not None and thickness[0] > 0:
        zooms = (float(thickness[0]), float(pixel[0]), float(pixel[1]))  # already (D, H, W)
    return ordered, None, zooms


# ------------------------------------------------------------------------------ fitting
def read_fitted(path: str | os.PathLike, size: int, mode: str) -> tuple[np.ndarray, tuple]:
    """A volume as a dataset stores it: read, then fitted to ``size``³ with its spacing (the
    one rule the folder source and ``predict.py`` share); also its shape as read."""
    vol = read_volume(path)
    return fit_volume(vol.array, size, mode, spacing=vol.spacing), tuple(vol.array.shape)


def fit_volume(
    array: np.ndarray,
    size: int,
    mode: str = "resize",
    *,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """A uint8 ``(D, H, W)`` volume at ``size``³, by :func:`medlite.data.transforms.fit_volume`.

    ``resize`` stretches each axis to ``size`` (trilinear; area-averaged when any axis shrinks
    by more than 2x, since 3D interpolation has no antialiasing); ``pad`` keeps the aspect ratio
    (the longest side shrunk to ``size`` if larger) and centres the volume on zeros.

    With ``spacing`` (mm, ``(D, H, W)``) and ``pad``, the volume is first resampled to isotropic
    voxels, at its finest spacing but no larger than ``size`` on its longest side (one
    interpolation), so the padded cube keeps the anatomy's true proportions. ``resize`` ignores
    ``spacing``: stretching every axis to ``size`` gives the same cube with or without it.
    """
    import torch

    from medlite.data.transforms import FIT_MODES, _resize, to_tensor
    from medlite.data.transforms import fit_volume as fit_cube

    array = np.asarray(array)
    if array.ndim != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"fit_volume takes a uint8 (D, H, W) array, got {array.dtype} {array.shape}"
        )
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if mode not in FIT_MODES:
        raise ValueError(f"mode must be one of {FIT_MODES}, got {mode!r}")
    if spacing is not None:
        s = np.asarray(spacing, dtype=np.float64)
        if s.shape != (3,) or not (np.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"spacing must be three positive sizes in mm, got {spacing!r}")
    if spacing is not None and mode == "pad":
        extent = np.asarray(array.shape) * s / s.min()  # voxels at the finest spacing
        scale = min(1.0, size / extent.max())
        shape = tuple(max(1, round(float(e) * scale)) for e in extent)
        if shape != array.shape:
            x = _resize(to_tensor(array, as_rgb=False, spatial_dims=3), shape)
            array = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)[0].numpy()
    return fit_cube(array, size, mode)
