"""predict.py within an edge box's memory: pixel bounds checked from the header, 16-bit images
scaled strip by strip, and an oversized file refused on its own while the others still predict."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlite.data.readers import MAX_PIXELS, InputError, read_image
from medlite.deploy.commands import PredictCommand, main_predict

REPO = Path(__file__).resolve().parents[2]
SIDE = 8000
#: the stated bound for one 16-bit 8000 x 8000 image (decoded file + uint8 image ~192 MB)
BOUND_MB = 300

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from medlite.data.transforms import Preprocess
    from medlite.deploy.predict import Predictor

    class Run:  # what Predictor.preprocess needs of a trained run: a 28 px grayscale model
        spatial_dims, in_chans = 2, 1
        preprocess = Preprocess(28, False, [0.5], [0.5], load_size=28)

    def status_mb(key):
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith(key))
        return int(line.split()[1]) / 1024

    def reset_peak():
        # the peak (VmHWM) restarts from the current RSS, so neither the imports' own peak nor
        # library pages the kernel dropped under memory pressure distort the difference
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    predictor = Predictor.__new__(Predictor)
    predictor.run, predictor.max_pixels = Run(), int(sys.argv[3])
    predictor.preprocess(sys.argv[2])  # warm-up: lazy imports and allocator pools
    reset = reset_peak()
    before = status_mb("VmRSS:")
    x, shape = predictor.preprocess(sys.argv[1])
    if reset:
        peak = status_mb("VmHWM:")
    else:  # no reset: the lifetime peak, which can only overstate the image's cost
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"extra_mb": peak - before, "shape": list(shape), "x": list(x.shape),
                      "lo": float(x.min()), "hi": float(x.max())}))
    """
)


def _gradient16(path: Path, side: int) -> Path:
    """A 16-bit grayscale gradient PNG: ~128 MB decoded, ~140 KB on disk."""
    row = (np.arange(side, dtype=np.uint32) * 65535 // (side - 1)).astype(np.uint16)
    Image.fromarray(np.broadcast_to(row, (side, side)).copy()).save(path, compress_level=1)
    return path


def test_a_16_bit_8000px_png_stays_under_the_bound(tmp_path: Path) -> None:
    big = _gradient16(tmp_path / "big16.png", SIDE)
    small = tmp_path / "small.png"
    Image.fromarray(np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80).save(small)
    assert big.stat().st_size < 2_000_000  # small on disk, 128 MB once decoded
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(big), str(small), str(MAX_PIXELS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["shape"] == [SIDE, SIDE] and got["x"] == [1, 1, 28, 28]
    assert got["lo"] == pytest.approx(-1, abs=0.05) and got["hi"] == pytest.approx(1, abs=0.05)
    assert got["extra_mb"] < BOUND_MB, f"peak {got['extra_mb']:.0f} MB above the baseline"


def test_the_header_size_is_checked_before_decoding(tmp_path: Path, monkeypatch) -> None:
    path = _gradient16(tmp_path / "wide.png", 300)
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InputError, match=r"300 x 300 = 90,000 pixels, more than max_pixels=50,000"):
        read_image(path, max_pixels=50_000)


def test_pillows_bomb_guard_stays_on_and_reads_as_one_line(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image as PILImage

    path = _gradient16(tmp_path / "bomb.png", 300)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 20_000)  # 90,000 > 2 x 20,000: an error
    with pytest.raises(InputError, match="refused as a possible decompression bomb"):
        read_image(path, max_pixels=None)


def test_nifti_size_is_checked_from_its_header(tmp_path: Path) -> None:
    import nibabel as nib

    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 30), np.int16), np.eye(4)), path)
    with pytest.raises(InputError, match="40 x 30 = 1,200 pixels, more than max_pixels=1,000"):
        read_image(path, max_pixels=1000)
    assert read_image(path).shape == (30, 40)


def test_strip_scaling_matches_whole_image_scaling(tmp_path: Path) -> None:
    """The strip-wise min-max scale gives what a whole-image float64 scale gives."""
    from medlite.data import readers

    rng = np.random.default_rng(0)
    values = rng.integers(100, 40000, size=(700, 500), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "v.png")
    lo, hi = float(values.min()), float(values.max())
    want = np.rint((values.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    old = readers._CHUNK_ELEMENTS
    try:
        readers._CHUNK_ELEMENTS = 1000  # many strips
        np.testing.assert_array_equal(read_image(tmp_path / "v.png"), want)
        floats = values.astype(np.float32)
        floats[3, 4] = np.nan
        got = readers._minmax_to_uint8(floats, tmp_path / "f")
    finally:
        readers._CHUNK_ELEMENTS = old
    assert got[3, 4] == 0
    finite = np.isfinite(floats)
    lo, hi = float(floats[finite].min()), float(floats[finite].max())
    want = np.rint((floats.astype(np.float64) - lo) * (255.0 / (hi - lo)))
    np.testing.assert_array_equal(got[finite], want[finite].astype(np.uint8))


def test_dicom_strips_give_what_one_chunk_gives(tmp_path: Path, monkeypatch) -> None:
    """Modality LUT, window and VOI LUT applied strip by strip == applied to the whole image."""
    from pydicom.dataset import Dataset

    from medlite.data import readers
    from tests.helpers import write_dicom

    stored = (np.arange(60 * 50, dtype=np.uint32) * 37 % 4096).astype(np.uint16).reshape(60, 50)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    table = (np.sqrt(np.arange(4096) / 4095) * 60000 + 1000).astype("<u2")
    lut.add_new("LUTData", "OW", table.tobytes())
    files = [
        write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024),
        write_dicom(
            tmp_path / "w.dcm",
            stored,
            BitsStored=12,
            RescaleIntercept=-1000,
            RescaleSlope=1,
            WindowCenter=40,
            WindowWidth=400,
        ),
        write_dicom(tmp_path / "voi.dcm", stored, BitsStored=12, VOILUTSequence=[lut]),
    ]
    whole = [read_image(f) for f in files]
    monkeypatch.setattr(readers, "_CHUNK_ELEMENTS", 120)  # strips of 2 rows
    for f, want in zip(files, whole, strict=True):
        np.testing.assert_array_equal(read_image(f), want)
    big = write_dicom(tmp_path / "big.dcm", stored)
    with pytest.raises(InputError, match="50 x 60 = 3,000 pixels, more than max_pixels=2,999"):
        read_image(big, max_pixels=2999)


def test_the_cli_default_is_the_readers_bound() -> None:
    assert PredictCommand.max_pixels == MAX_PIXELS == 8192 * 8192


def test_an_oversized_file_is_refused_and_the_rest_predict(exported_run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((28, 28), 60 * i, np.uint8)).save(folder / f"ok{i}.png")
    _gradient16(folder / "huge.png", 64)  # 4,096 pixels > max_pixels=1000
    out = tmp_path / "preds.csv"
    code = main_predict([f"run={exported_run}", f"input={folder}", f"out={out}", "max_pixels=1000"])
    printed = " ".join(capsys.readouterr().out.split())
    assert code == 1
    assert "2 of 3 file(s) predicted" in printed
    with out.open() as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    assert rows["ok0.png"]["error"] == "" and rows["ok1.png"]["error"] == ""
    assert "64 x 64 = 4,096 pixels, more than max_pixels=1,000" in rows["huge.png"]["error"]
