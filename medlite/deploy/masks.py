"""What local inference writes for a segmentation run: masks in the input's own size and
geometry, and overlays for people.

Conventions (the same for every input format):

* **Mask values are class indices**: 0 = ``labels[0]`` (background), 1 = ``labels[1]``, ... in
  the order of the run's labels (results.json ``data.labels``), for binary and multi-class
  tasks alike, so a mask means the same whatever the number of classes (a binary mask is 0/1,
  not 0/255: open the overlay to look at it).
* **Masks have the input's original size**: the model's (S, S) class map is taken back through
  the run's preprocessing (the region the image occupies after ``resize``, or inside the
  padding after ``pad``) and resized to (H, W) with nearest-neighbour sampling, so class
  indices never blend.
* **NIfTI masks keep the input's geometry**: for a NIfTI input, its affine and header (qform /
  sform, voxel size, units), with the data in the input's own voxel order and shape; for a
  DICOM input, an affine built from PixelSpacing, ImagePositionPatient and
  ImageOrientationPatient (converted from DICOM's LPS to NIfTI's RAS), each missing attribute
  defaulting (1 mm spacing, origin 0, axial orientation) and named in the ``geometry`` note.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medlite.data.readers import DICOM_SUFFIXES, NIFTI_SUFFIXES, SUPPORTED_SUFFIXES
from medlite.data.transforms import Preprocess

log = logging.getLogger(__name__)

#: overlay colour of class 1, 2, ... (background is not drawn); repeats after eight classes
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


def class_colour(index: int) -> tuple[int, int, int]:
    """The overlay colour of foreground class ``index`` (>= 1)."""
    return PALETTE[(int(index) - 1) % len(PALETTE)]


def stem(path: Path) -> str:
    """The file name without its image suffix (``.nii.gz`` counts as one)."""
    name = path.name
    lower = name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def output_names(paths: list[Path], root: Path) -> dict[Path, Path]:
    """Where each input's outputs go, relative to the output folder: its sub-folder under
    ``root`` and its stem (``scans/a/img.png`` -> ``a/img``, then ``a/img_mask.png``). Inputs
    of one folder that share a stem (``s.dcm`` and ``s.nii.gz``) keep their whole file name
    instead, dots as underscores (``s_dcm``, ``s_nii_gz``), so no output overwrites another."""
    from collections import Counter

    def rel(p: Path) -> Path:
        try:
            return p.parent.relative_to(root)
        except ValueError:
            return Path()

    plain = {p: rel(p) / stem(p) for p in paths}
    taken = Counter(plain.values())
    return {
        p: name if taken[name] == 1 else rel(p) / p.name.replace(".", "_")
        for p, name in plain.items()
    }


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom(path: Path) -> bool:
    """A DICOM input: by suffix, or (a suffix-less file such as ``IM0001``) read as one."""
    lower = path.name.lower()
    return lower.endswith(DICOM_SUFFIXES) or not any(lower.endswith(s) for s in SUPPORTED_SUFFIXES)


# ---------------------------------------------------------------------------------- geometry
def restore_size(mask: np.ndarray, shape: tuple[int, ...], preprocess: Preprocess) -> np.ndarray:
    """A class map at the model's input size -> the same map at the file's (H, W) (see
    :meth:`medlite.data.transforms.Preprocess.restore_mask`)."""
    return preprocess.restore_mask(mask, shape)


# ---------------------------------------------------------------------------------- pictures
def boundary(region: np.ndarray) -> np.ndarray:
    """The pixels of a boolean region that touch (4-neighbourhood) a pixel outside it."""
    p = np.pad(np.asarray(region, dtype=bool), 1, constant_values=False)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return p[1:-1, 1:-1] & ~inner


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    alpha: float = 0.35,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` (gray or RGB uint8) with every foreground class of ``mask``
    tinted in its colour and outlined; ``reference`` (another mask, e.g. the ground truth) is
    outlined in white on top."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    rgb = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]
    out = rgb.astype(np.float32)
    mask = np.asarray(mask)
    for c in (int(v) for v in np.unique(mask) if v > 0):
        region = mask == c
        colour = np.array(class_colour(c), dtype=np.float32)
        out[region] = (1 - alpha) * out[region] + alpha * colour
        out[boundary(region)] = colour
    if reference is not None:
        out[boundary(np.asarray(reference) > 0)] = 255.0
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path


# ---------------------------------------------------------------------------------- NIfTI
def _nifti_like(source: Path, mask: np.ndarray):
    """The mask as a NIfTI image with ``source``'s affine, header and voxel layout."""
    import nibabel as nib

    img = nib.load(source)
    shape = tuple(int(s) for s in img.shape)
    data = np.ascontiguousarray(mask.T).reshape(shape)  # medlite reads data[i, j] as pixel [j, i]
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    klass = type(img) if isinstance(img, nib.Nifti1Image) else nib.Nifti1Image
    out = klass(data.astype(np.uint8), img.affine, header=header)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, max(1, int(mask.max()))
    out.header["descrip"] = b"medlite mask (class indices)"
    return out, "the input's NIfTI affine and header"


def dicom_affine(ds) -> tuple[np.ndarray, list[str]]:
    """The NIfTI (RAS) affine of a DICOM image, for a mask stored as ``data[i, j] = mask[j, i]``
    (i along a row, j down the columns); and the attributes that were missing (defaulted)."""
    missing: list[str] = []

    def floats(key: str, n: int, default: list[float]) -> np.ndarray:
        value = ds.get(key)
        try:
            values = [float(v) for v in value] if value is not None else []
        except (TypeError, ValueError):
            values = []
        if len(values) != n:
            missing.append(key)
            return np.asarray(default, dtype=np.float64)
        return np.asarray(values, dtype=np.float64)

    spacing = floats("PixelSpacing", 2, [1.0, 1.0])  # (between rows, between columns)
    position = floats("ImagePositionPatient", 3, [0.0, 0.0, 0.0])
    orientation = floats("ImageOrientationPatient", 6, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    along_row, along_col = orientation[:3], orientation[3:]
    normal = np.cross(along_row, along_col)
    try:
        thickness = float(ds.get("SliceThickness") or ds.get("SpacingBetweenSlices") or 1.0)
    except (TypeError, ValueError):
        thickness = 1.0
    lps = np.eye(4)
    lps[:3, 0] = along_row * spacing[1]  # i: next column
    lps[:3, 1] = along_col * spacing[0]  # j: next row
    lps[:3, 2] = normal * thickness
    lps[:3, 3] = position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, missing


def _nifti_from_dicom(source: Path, mask: np.ndarray):
    import nibabel as nib
    import pydicom

    ds = pydicom.dcmread(source, stop_before_pixels=True, force=True)
    affine, missing = dicom_affine(ds)
    out = nib.Nifti1Image(np.ascontiguousarray(mask.T).astype(np.uint8), affine)
    # scanner coordinates when the file says where the image is; "aligned" when guessed
    code = "aligned" if missing else "scanner"
    out.set_qform(affine, code=code)
    out.set_sform(affine, code=code)
    out.header.set_xyzt_units("mm")
    out.header["descrip"] = b"medlite mask (class indices)"
    note = "DICOM PixelSpacing / ImagePositionPatient / ImageOrientationPatient (LPS -> RAS)"
    if missing:
        note += f"; missing, defaulted: {', '.join(missing)}"
    return out, note


def save_nifti_mask(source: Path, mask: np.ndarray, path: Path) -> str:
    """Write ``mask`` (the file's (H, W), class indices) as NIfTI with ``source``'s geometry;
    returns a note on where the geometry came from."""
    import nibabel as nib

    out, note = (_nifti_like if is_nifti(source) else _nifti_from_dicom)(source, mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(path))
    return note
