"""Compose medlite configs in-process (no subprocess start-up) for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import medlite
from medlite.compress import RunContext

CONF_DIR = medlite.CONF_DIR  # the repository's conf/ (or an installed medlite/conf)


def make_cfg(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def model_and_context(
    tmp_path: Path, overrides: list[str] = (), seed: int | None = None
) -> tuple[torch.nn.Module, RunContext]:
    """The configured model and the RunContext a compression step gets, on real config."""
    from medlite.build import build_datamodule, build_model

    cfg = make_cfg(tmp_path, list(overrides))
    dm = build_datamodule(cfg)
    dm.setup()
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(cfg.model, dm.task.num_outputs, dm.in_chans, dm.preprocess.input_size)
    return model, RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path)


def wandb_offline_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``), read from disk.

    wandb 0.31 writes no config.yaml or summary for offline runs and has no Python reader; the
    file is a LevelDB-style log (32 KiB blocks of crc/length/type-framed chunks) of ``Record``s.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pos, block, chunk = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(chunk)
            records.append(rec)
            chunk = b""
    return records


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    **attrs,
) -> Path:
    """A minimal Secondary Capture DICOM file as a user's tool would write it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    rgb = photometric in ("RGB", "YBR_FULL")
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------ DICOM series (volumes)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # columns run posterior, rows inferior
PIXEL_SPACING = (0.8, 0.7)  # between rows, between columns (mm)


def ct_dataset(pixels: np.ndarray, **attrs):
    """A CT Image Storage dataset as a scanner writes one (int16 or uint8 pixels)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def write_series(
    folder: Path,
    stack: np.ndarray,
    gap: float = 2.5,
    orientation=AXIAL,
    origin=(-40.0, -30.0, 100.0),
    series_uid: str | None = None,
    shuffle_seed: int | None = 0,
    per_slice: dict[int, dict] | None = None,
    **attrs,
) -> list[Path]:
    """One file per slice of ``stack`` ``(k, rows, cols)``, slice k at ``origin + k*gap*normal``,
    written in a shuffled order under names that do not sort by position."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    defaults = {"RescaleSlope": 1, "RescaleIntercept": -1024, "SliceThickness": gap}
    order = np.arange(len(stack))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(stack))
    paths = []
    for n, k in enumerate(order):
        position = np.asarray(origin) + k * gap * normal
        slice_attrs = defaults | {
            "SeriesInstanceUID": series_uid,
            "SeriesDescription": "chest",
            "InstanceNumber": int(k) + 1,
            "ImagePositionPatient": [round(float(v), 4) for v in position],
            "ImageOrientationPatient": list(orientation),
            "PixelSpacing": list(PIXEL_SPACING),
        }
        slice_attrs |= attrs | (per_slice or {}).get(int(k), {})
        path = folder / f"IM{n:04d}.dcm"
        ct_dataset(stack[k], **slice_attrs).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def subprocess_env(root: Path) -> dict[str, str]:
    """Environment for a ``train.py`` subprocess in tests: caches and W&B under ``root``, W&B
    offline, one thread per job (two threads thrash on a busy 2-core machine)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    # (this test process's W&B service, if an in-process test started one, is not theirs)
    return env | {
        "MEDLITE_CACHE_DIR": str(root / "cache"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CACHE_DIR": str(root / "wandb"),
        "WANDB_CONFIG_DIR": str(root / "wandb"),
        "OMP_NUM_THREADS": "1",
    }


def run_with_robustness_at_severity_1(cfg) -> None:
    """Train ``cfg`` (with ``eval.robustness=true``) scoring the corruptions at severity 1 only:
    the whole suite of 30 cells is the script's test; here one per corruption keeps runs short."""
    from functools import partial

    import pytest

    from medlite.pipeline import run
    from medlite.robustness import run as robustness_run
    from medlite.robustness.evaluate import RobustnessSettings

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            robustness_run, "RobustnessSettings", partial(RobustnessSettings, severities=[1])
        )
        run(cfg)


def optional_formats() -> tuple[str, ...]:
    """The formats of optional runtimes (OpenVINO, ExecuTorch) that ``export=all`` writes here:
    those whose extra is installed."""
    from medlite.deploy import runtimes

    return tuple(
        n for n, f in runtimes.FORMATS.items() if f.extra is not None and runtimes.installed(n)
    )
