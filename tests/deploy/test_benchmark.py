"""scripts/benchmark.py: every runtime and thread count measured, recorded and drawn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medlite.deploy.benchmark import BenchmarkSettings, benchmark_run
from medlite.deploy.commands import (
    BenchmarkCommand,
    ExportCommand,
    main_benchmark,
    main_export,
    parse_args,
)
from medlite.errors import ConfigError


def test_benchmark_measures_every_runtime_and_updates_the_card(exported_run: Path, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(exported_run, run_dir)
    settings = BenchmarkSettings(
        runtimes=["onnxruntime"], threads=[1, 2], repeats=5, warmup=1, throughput_batch=8
    )
    rec = benchmark_run(run_dir, settings)
    rows = {(r["format"], r["threads"]): r for r in rec["rows"]}
    assert set(rows) == {(rt, t) for rt in ("pytorch", "onnx_fp32", "onnx_int8") for t in (1, 2)}
    assert {r["runtime"] for r in rec["rows"]} == {"pytorch", "onnxruntime"}
    for (_, t), r in rows.items():
        assert r["threads"] == t and 0 < r["latency_ms"] <= r["latency_p90_ms"]
        assert r["throughput_ips"] > 0
        ratio = rows[("pytorch", t)]["latency_ms"] / r["latency_ms"]
        assert r["speedup_vs_pytorch"] == pytest.approx(ratio, rel=1e-2)
    # sizes are the files a device would hold: int8 well under fp32
    assert rows[("onnx_int8", 1)]["size_mb"] < 0.5 * rows[("onnx_fp32", 1)]["size_mb"]
    mem = rows[("onnx_int8", 1)]["process_memory"]
    assert (
        mem is not None and mem["peak_batch1_mb"] >= mem["loaded_mb"] >= mem["after_import_mb"] > 0
    )
    # ONNX Runtime alone (no PyTorch in the process) is far lighter than eager PyTorch
    assert mem["peak_batch1_mb"] < rows[("pytorch", 1)]["process_memory"]["peak_batch1_mb"]
    saved = json.loads((run_dir / "export" / "benchmark.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rec["rows"]))
    assert (run_dir / "export" / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    card = json.loads((run_dir / "model_card.json").read_text())
    assert len(card["efficiency"]["rows"]) == 6
    assert "## Efficiency on" in (run_dir / "model_card.md").read_text()


def test_benchmark_exports_first_when_files_are_missing(exported_run: Path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(exported_run, run_dir, ignore=shutil.ignore_patterns("export"))
    argv = [f"run={run_dir}", "threads=[1]", "repeats=3", "warmup=0", "throughput_batch=4"]
    assert main_benchmark([*argv, "runtimes=[pytorch,onnx_fp32]"]) == 0
    assert (run_dir / "export" / "model.onnx").is_file()
    assert "ORT fp32" in capsys.readouterr().out


def test_export_cli(exported_run: Path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(exported_run, run_dir, ignore=shutil.ignore_patterns("export"))
    assert main_export([f"run={run_dir}", "formats=[onnx_fp32]"]) == 0
    out = capsys.readouterr().out
    assert "pass" in out
    task = json.loads((run_dir / "results.json").read_text())["task"]
    for metric in task["headline"]:  # the table's metric columns: the task's headline
        assert f"test {task['titles'][metric]}" in out
    # a format exported later joins the record instead of replacing it
    assert main_export([f"run={run_dir}", "formats=[torch_export]"]) == 0
    formats = json.loads((run_dir / "export" / "export.json").read_text())["formats"]
    assert set(formats) == {"onnx_fp32", "torch_export"}
    assert main_export([f"run={run_dir}", "fromats=[onnx_fp32]"]) == 1
    err = capsys.readouterr().err
    assert "fromats" in err and "formats" in err  # names the typo and lists the valid keys


def test_arguments_are_typed(tmp_path):
    with pytest.raises(ConfigError, match="calibration_batches"):
        parse_args(ExportCommand, [f"run={tmp_path}", "calibration_batches=many"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_args(ExportCommand, [str(tmp_path)])
    with pytest.raises(ConfigError, match="threads"):
        BenchmarkSettings(threads=[0])
    # one value where a list is expected, as the README writes it: runtimes=all, threads=1
    args = parse_args(BenchmarkCommand, [f"run={tmp_path}", "runtimes=all", "threads=1"])
    assert args.runtimes == ["all"] and args.threads == [1]
    args = parse_args(ExportCommand, [f"run={tmp_path}", "formats=onnx_fp32"])
    assert args.formats == ["onnx_fp32"]
