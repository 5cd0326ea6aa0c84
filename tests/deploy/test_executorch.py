"""ExecuTorch (XNNPACK) fp32 and int8 programs: parity on real test images, metadata beside the
program, predictions and benchmark rows. Skipped without ``pip install 'medlite[executorch]'``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medlite.deploy import runtimes
from medlite.deploy.benchmark import BenchmarkSettings, benchmark_run
from medlite.deploy.predict import Predictor
from medlite.deploy.run_dir import TrainedRun

pytestmark = pytest.mark.skipif(
    not runtimes.installed("executorch"),
    reason="ExecuTorch not installed: pip install 'medlite[executorch]'",
)


def test_executorch_programs_pass_parity_on_the_test_split(exported_run: Path):
    export = json.loads((exported_run / "export" / "export.json").read_text())
    fp32, int8 = export["formats"]["executorch_fp32"], export["formats"]["executorch_int8"]
    assert fp32["runtime"] == int8["runtime"] == "executorch"
    assert fp32["parity"]["ok"] and fp32["parity"]["max_abs_diff"] < 1e-4
    assert int8["parity"]["ok"] and int8["parity"]["drop"] <= 0.01
    assert int8["calibration_images"] > 0 and "XNNPACK" in int8["source"]
    assert int8["size_mb"] < 0.5 * fp32["size_mb"]
    # the program's metadata beside it, as the ONNX file states it
    onnx_meta = runtimes.read_metadata("onnx_fp32", exported_run / "export" / "model.onnx")
    et_meta = runtimes.read_metadata(
        "executorch_int8", exported_run / "export" / "model_executorch_int8.pte"
    )
    for key in ("medlite.preprocess", "medlite.labels", "medlite.task", "medlite.temperature"):
        if key in onnx_meta:
            assert et_meta[key] == onnx_meta[key], key


def test_predictions_through_executorch_match_pytorch(exported_run: Path, shared_data: Path):
    with np.load(shared_data / "breastmnist.npz") as f:
        images = f["test_images"][:8]
    run = TrainedRun.load(exported_run)
    x = torch.stack([run.preprocess(img) for img in images])
    ref = Predictor(run, runtime="pytorch").model(x)
    for fmt, tol in (("executorch_fp32", 1e-4), ("executorch_int8", 0.1)):
        got = Predictor(run, runtime=fmt).model(x)  # T stays in the graph, not applied twice
        assert torch.allclose(got, ref, atol=tol), fmt


def test_benchmark_rows_for_executorch(exported_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(exported_run, run_dir)
    settings = BenchmarkSettings(
        runtimes=["executorch"], threads=[1], repeats=4, warmup=1, throughput_batch=4
    )
    rows = {r["format"]: r for r in benchmark_run(run_dir, settings)["rows"]}
    assert set(rows) == {"pytorch", "executorch_fp32", "executorch_int8"}
    assert rows["executorch_int8"]["precision"] == "int8"
    mem = rows["executorch_int8"]["process_memory"]
    assert mem is not None and mem["peak_batch1_mb"] >= mem["loaded_mb"] > 0
