"""OpenVINO fp32 and int8 beside ONNX Runtime: parity on real test images, metadata, benchmark
rows, runtime=auto, and no telemetry ever sent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medlite.deploy import runtimes
from medlite.deploy.auto import choose_runtime
from medlite.deploy.benchmark import BenchmarkSettings, benchmark_run
from medlite.deploy.export import ExportSettings
from medlite.deploy.predict import Predictor
from medlite.deploy.run_dir import TrainedRun
from medlite.errors import ConfigError

needs_openvino = pytest.mark.skipif(
    not runtimes.installed("openvino"),
    reason="OpenVINO not installed: pip install 'medlite[openvino]'",
)


@needs_openvino
def test_openvino_files_pass_parity_on_the_test_split(exported_run: Path):
    """export=all wrote both OpenVINO files, converted from the checked ONNX file, and ran them
    over every BreastMNIST test image next to PyTorch."""
    export = json.loads((exported_run / "export" / "export.json").read_text())
    fp32, int8 = export["formats"]["openvino_fp32"], export["formats"]["openvino_int8"]
    assert fp32["runtime"] == int8["runtime"] == "openvino"
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    # fp32 means fp32 (OpenVINO would run bf16 on CPUs that have it): as close as ORT fp32
    assert fp32["parity"]["ok"] and fp32["parity"]["max_abs_diff"] < 1e-4
    assert fp32["parity"]["label_agreement"] == 1.0
    assert int8["parity"]["ok"] and int8["parity"]["drop"] <= 0.01
    assert "NNCF" in int8["source"] and int8["calibration_images"] > 0
    # LiteCNN's squeeze-excitation convolutions (after a global pooling) stay fp32 in NNCF's
    # quantisation; their weights are stored int8 all the same, so the file is > 2x smaller
    assert int8["weight_only_int8_layers"] == 10
    assert int8["size_mb"] < fp32["size_mb"] / 2
    for fmt in ("openvino_fp32", "openvino_int8"):  # an .xml graph and its .bin weights
        assert all(p.is_file() for p in runtimes.files_of(fmt, exported_run / "export"))
    # the IR explains itself like the ONNX file: same preprocessing, labels, task, temperature
    onnx_meta = runtimes.read_metadata("onnx_fp32", exported_run / "export" / "model.onnx")
    ov_meta = runtimes.read_metadata(
        "openvino_int8", exported_run / "export" / "model_openvino_int8.xml"
    )
    for key, value in onnx_meta.items():
        if key.startswith("medlite.") and key != "medlite.exporter":
            assert ov_meta[key] == value, key


@needs_openvino
def test_deployed_latency_is_recorded_with_the_eager_one(exported_run: Path):
    eff = json.loads((exported_run / "results.json").read_text())["efficiency"]
    latency = json.loads((exported_run / "export" / "export.json").read_text())["latency"]
    installed = [f for f in runtimes.DEPLOYABLE if runtimes.installed(f)]
    assert set(latency["median_ms"]) == {"pytorch", *installed}
    assert (
        eff["deployed_runtime"]
        == latency["fastest"]
        == min(latency["median_ms"], key=latency["median_ms"].get)
    )
    assert eff["deployed_latency_ms"] == latency["median_ms"][latency["fastest"]]
    assert eff["eager_latency_ms"] == latency["median_ms"]["pytorch"] > 0
    assert eff["deployed_threads"] == eff["threads"]
    assert "latency_ms" in eff  # the training profile's eager figure is kept as it was


@needs_openvino
def test_predictions_through_openvino_match_pytorch(exported_run: Path, shared_data: Path):
    with np.load(shared_data / "breastmnist.npz") as f:
        images = f["test_images"][:8]
    run = TrainedRun.load(exported_run)
    x = torch.stack([run.preprocess(img) for img in images])
    ref = Predictor(run, runtime="pytorch").model(x)
    for fmt, tol in (("openvino_fp32", 1e-4), ("openvino_int8", 0.1)):
        got = Predictor(run, runtime=fmt).model(x)
        assert torch.allclose(got, ref, atol=tol), fmt


@needs_openvino
def test_benchmark_names_runtimes_and_precisions(exported_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(exported_run, run_dir)
    settings = BenchmarkSettings(
        runtimes=["openvino"], threads=[1], repeats=4, warmup=1, throughput_batch=4
    )
    rec = benchmark_run(run_dir, settings)
    rows = {r["format"]: r for r in rec["rows"]}
    assert set(rows) == {"pytorch", "openvino_fp32", "openvino_int8"}
    assert {(r["runtime"], r["precision"]) for r in rows.values()} == {
        ("pytorch", "fp32"),
        ("openvino", "fp32"),
        ("openvino", "int8"),
    }
    peak = rec["machine"]["peak_gmacs"]["1"]
    assert peak["fp32"] > 0 and peak["int8"] > 0
    for r in rows.values():  # achieved MAC/s against the peak of the row's own precision
        achieved = r["macs"] / (r["latency_ms"] / 1000) / 1e9
        assert r["peak_fraction"] == pytest.approx(achieved / peak[r["precision"]], rel=1e-2)
    mem = rows["openvino_int8"]["process_memory"]  # a fresh process with OpenVINO only
    assert mem is not None and mem["peak_batch1_mb"] >= mem["loaded_mb"] > 0
    assert rec["fastest"]["1"] in rows
    card = (run_dir / "model_card.md").read_text()
    assert "OpenVINO int8" in card and "% of peak" in card


def test_runtime_auto_picks_the_fastest_measured_and_falls_back(
    exported_run: Path, tmp_path: Path, monkeypatch
):
    run_dir = tmp_path / "run"
    shutil.copytree(exported_run, run_dir)
    run = TrainedRun.load(run_dir)
    bench = {
        "rows": [
            {"format": "pytorch", "threads": 1, "latency_ms": 2.0},
            {"format": "onnx_fp32", "threads": 1, "latency_ms": 0.5},
            {"format": "onnx_int8", "threads": 1, "latency_ms": 0.3},
            {"format": "openvino_int8", "threads": 1, "latency_ms": 0.2},
            {"format": "pytorch", "threads": 2, "latency_ms": 1.0},
            {"format": "onnx_fp32", "threads": 2, "latency_ms": 0.25},
            {"format": "onnx_int8", "threads": 2, "latency_ms": 0.4},
        ]
    }
    (run_dir / "export" / "benchmark.json").write_text(json.dumps(bench))
    os.utime(run_dir / "export" / "benchmark.json")  # the newest measurement
    if runtimes.installed("openvino"):
        assert choose_runtime(run, 1)[0] == "openvino_int8"
    assert choose_runtime(run, 2)[0] == "onnx_fp32"  # per thread count
    assert choose_runtime(run, 8)[0] == "onnx_fp32"  # nearest measured count
    # the winner's runtime missing here (a run folder copied to another machine): next fastest
    real = runtimes.installed
    monkeypatch.setattr(runtimes, "installed", lambda n: False if "openvino" in n else real(n))
    fmt, why = choose_runtime(run, 1)
    assert fmt == "onnx_int8" and "openvino_int8 not installed" in why
    # a format that failed its checks is never chosen, however fast
    export = json.loads((run_dir / "export" / "export.json").read_text())
    export["formats"]["onnx_int8"]["parity"]["ok"] = False
    (run_dir / "export" / "export.json").write_text(json.dumps(export))
    os.utime(run_dir / "export" / "benchmark.json")
    assert choose_runtime(run, 1)[0] == "onnx_fp32"
    # no measurement at all: the checked ONNX file, by rule
    (run_dir / "export" / "benchmark.json").unlink()
    export.pop("latency")
    (run_dir / "export" / "export.json").write_text(json.dumps(export))
    fmt, why = choose_runtime(run, 1)
    assert fmt == "onnx_fp32" and "not benchmarked" in why


def test_a_runtime_that_is_not_installed_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(runtimes, "installed", lambda name: "openvino" not in name)
    with pytest.raises(ConfigError, match=r"pip install 'medlite\[openvino\]'"):
        ExportSettings(formats=["openvino_int8"])
    with pytest.raises(ConfigError, match=r"pip install 'medlite\[openvino\]'"):
        BenchmarkSettings(runtimes=["openvino"])
    # "all" skips it and says why, instead of failing
    wanted, skipped = ExportSettings(formats=["all"]).resolved()
    assert "openvino_fp32" not in wanted and "onnx_int8" in wanted
    assert "medlite[openvino]" in skipped["openvino_fp32"]
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        BenchmarkSettings(runtimes=["tensorrt"])
    with pytest.raises(ConfigError, match="unknown runtime 'torch_export'"):  # not a runtime
        BenchmarkSettings(runtimes=["torch_export"])


_PROBE = textwrap.dedent(
    """
    import socket, sys, urllib.request
    log = sys.argv[1]

    def blocked(*args, **kwargs):
        with open(log, "a") as f:  # a file: telemetry sends from forked processes
            f.write(repr(args[:1])[:200] + "\\n")
        raise OSError("network blocked by the test")

    socket.socket.connect = blocked
    socket.create_connection = blocked
    urllib.request.urlopen = blocked
    mode, onnx, out = sys.argv[2:5]
    if mode == "openvino":  # the library on its own, as a control
        import openvino as ov
        ov.save_model(ov.convert_model(onnx), out)
    else:  # medlite's whole OpenVINO path: convert, quantise (NNCF), load, infer
        import time
        from pathlib import Path
        import torch
        from medlite.deploy.openvino_runtime import OvModel, convert_onnx, quantize
        x = torch.randn(4, 1, 28, 28)
        convert_onnx(Path(onnx), Path(out))
        quantize(Path(out), [x], Path(out).with_name("int8.xml"))
        OvModel(Path(out).with_name("int8.xml"))(x)
        time.sleep(1)
    """
)


@needs_openvino
def test_openvino_sends_no_telemetry(exported_run: Path, tmp_path: Path):
    """On a fresh machine (no consent file) OpenVINO's converter sends usage telemetry by
    default; through medlite nothing is sent, even with consent given."""
    probe = tmp_path / "probe.py"
    probe.write_text(_PROBE)
    onnx = str(exported_run / "export" / "model.onnx")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env["HOME"] = str(tmp_path / "home")  # a user who never answered, then one who opted in
    (tmp_path / "home").mkdir()

    def attempts(mode: str) -> list[str]:
        log = tmp_path / f"{mode}.log"
        subprocess.run(
            [sys.executable, str(probe), str(log), mode, onnx, str(tmp_path / f"{mode}.xml")],
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        return log.read_text().splitlines() if log.is_file() else []

    if runtimes.installed("openvino_telemetry"):  # the control: the library alone does send
        assert attempts("openvino"), "expected OpenVINO's own telemetry to try to connect"
    (tmp_path / "home" / "intel").mkdir(exist_ok=True)
    (tmp_path / "home" / "intel" / "openvino_telemetry").write_text("1")  # opted in
    assert attempts("medlite") == []


class _OffsetHead(torch.nn.Module):
    """The trained model's logits carried through two linear layers on an offset of 1000: a
    per-tensor int8 activation scale of ~8 can't resolve them, so plain int8 loses the model."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base
        self.up, self.down = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        with torch.no_grad():
            for layer, offset in ((self.up, 1000.0), (self.down, -1000.0)):
                layer.weight.copy_(torch.eye(2))
                layer.bias.fill_(offset)

    def forward(self, x):
        return self.down(self.up(self.base(x)))


@needs_openvino
def test_int8_that_loses_too_much_falls_back_to_mixed_precision(exported_run: Path, tmp_path):
    from sklearn.metrics import roc_auc_score

    from medlite.deploy.onnx import export_onnx
    from medlite.deploy.openvino_runtime import OvModel, convert_onnx, quantize

    run = TrainedRun.load(exported_run)
    model = _OffsetHead(run.torch_model()).eval()
    dm = run.datamodule()
    export_onnx(model, next(iter(dm.calibration_dataloader(batch_size=2)))[0], tmp_path / "m.onnx")
    convert_onnx(tmp_path / "m.onnx", tmp_path / "m.xml")
    val = [(x.numpy(), y.numpy()) for x, y in dm.val_dataloader()]

    def auc(compiled, items) -> float:
        scores = [np.diff(np.asarray(compiled(x)[0]), axis=1)[:, 0] for x, _ in items]
        return roc_auc_score(
            np.concatenate([y.reshape(-1) for _, y in items]), np.concatenate(scores)
        )

    batches = [x for x, _ in list(dm.calibration_dataloader())[:4]]
    plain = quantize(tmp_path / "m.xml", batches, tmp_path / "plain.xml")
    assert "mixed_precision" not in plain and "val" not in plain  # no validation: plain PTQ
    entry = quantize(
        tmp_path / "m.xml", batches, tmp_path / "q.xml", validation=(val, auc), max_drop=0.01
    )
    assert entry["val"]["drop"] > 0.05  # plain int8 really fails on this model
    mixed = entry["mixed_precision"]
    assert mixed["val_drop"] <= 0.01  # the fallback meets the tolerance...
    kept = mixed["fake_quantize_ops"]
    assert 0 < kept["plain_int8"] - kept["kept"] <= 4  # ...by returning a few layers to fp32
    x = torch.stack([dm.splits["test"][i][0] for i in range(16)])
    with torch.no_grad():
        ref = model(x)
    assert (OvModel(tmp_path / "q.xml")(x) - ref).abs().max() < 0.1


@needs_openvino
def test_int8_layer_profile_says_which_kernels_ran_int8(exported_run: Path, capsys):
    """scripts/profile_int8.py on the exported LiteCNN: the fp32 file runs no int8 kernel, the
    NNCF int8 file spends most of its layer time in int8 kernels, and the record names layers."""
    from medlite.deploy.layer_profile import kernel_precision, main

    assert kernel_precision("brgconv_avx512_1x1_I8") == "int8"
    assert kernel_precision("jit_avx512_f32") == "fp32"
    assert main([str(exported_run), "--repeats", "5"]) == 0
    assert "time by precision" in capsys.readouterr().out
    record = json.loads((exported_run / "export" / "layer_profile.json").read_text())
    fp32, int8 = record["formats"]["openvino_fp32"], record["formats"]["openvino_int8"]
    assert "int8" not in fp32["precision_shares"]
    assert int8["precision_shares"]["int8"] > 0.5
    assert any(
        row["type"] == "Convolution" and row["precision"] == "int8" for row in int8["by_type"]
    )
    assert all(layer["us"] >= 0 for layer in int8["layers"]) and int8["total_us"] > 0


def test_int8_layer_profile_without_openvino_files_is_one_clear_line(exported_run, tmp_path):
    from medlite.deploy.layer_profile import main

    run_copy = tmp_path / "run"
    shutil.copytree(exported_run, run_copy, ignore=shutil.ignore_patterns("model_openvino*"))
    assert main([str(run_copy)]) == 2
