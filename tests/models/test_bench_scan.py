"""scripts/bench_scan.py runs end to end on tiny sizes and reports every implementation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_scan.py"


def test_bench_scan_prints_both_tables(native_kernel, tmp_path):
    env = {**os.environ, "COLUMNS": "240"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--lengths", "17", "--batch", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "C kernel: compiled with" in out
    for title in ("selective_scan (CPU", "wkv_bidirectional (CPU"):
        assert title in out
    for column in ("torch fwd speed-up", "C fwd speed-up", "C fwd+bwd"):
        assert column in out
    assert "b1 D192 N16 L17" in out and "b1 T17 C192" in out
