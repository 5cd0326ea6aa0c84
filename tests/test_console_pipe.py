"""Output that survives a pipe: redirected to a file or a pipe (CI logs, nohup, SLURM), a run's
summary keeps its run directory on one line and its tables' values whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = "/scratch/" + "/".join(f"a_rather_long_folder_name_{i}" for i in range(6)) + "/run"

_SUMMARY = f"""
from medlite.results import print_summary

stage = {{"efficiency": {{"params": 11171234, "macs": 1.8e9, "size_mb": 42.7,
          "latency_ms": 12.5, "throughput_ips": 2345.0}}, "test": {{"auc": 0.9}}}}
print_summary({{
    "model": {{"name": "resnet18", "params": 11171234}},
    "data": {{"name": "dermamnist", "size": 28, "task": "multi-class",
              "labels": ["a", "b", "c"]}},
    "test": {{"auc": 0.91, "acc": 0.8}}, "val": {{"auc": 0.92, "acc": 0.81}},
    "compress": {{"name": "prune_kd_ptq"}},
    "compression": {{"stages": [dict(stage, stage="baseline (before compression)"),
                               dict(stage, stage="pruned, distilled and quantised")]}},
    "status": "ok", "wall_time_s": 12.0, "run_dir": {RUN_DIR!r},
}})
"""


def _piped(code: str) -> str:
    # a COLUMNS inherited from the shell that started the job squeezes nothing either
    env = dict(os.environ) | {"COLUMNS": "80"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,  # stdout is a pipe, as under nohup, CI or SLURM
        text=True,
        cwd=REPO,
        env=env | {"PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_piped_summary_keeps_paths_and_table_values_whole() -> None:
    out = _piped(_SUMMARY)
    assert f"run directory: {RUN_DIR}\n" in out  # one line, nothing wrapped
    assert "11,171,234" in out and "…" not in out
    assert "throughput (img/s)" in out and "pruned, distilled and quantised" in out
    assert "\x1b[" not in out  # no colour codes in a log file


def test_a_terminal_keeps_rich_own_width(monkeypatch) -> None:
    from medlite.console import make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("rich.console.Console.is_terminal", property(lambda self: True))
    assert make_console().width < 4000
