"""``python -m medlite.taxonomy`` prints the taxonomy table from the real model configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_taxonomy_table_lists_models_with_costs(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlite.taxonomy",
            "--models",
            "litecnn,resnet18,unet",
            "--repeats",
            "2",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "litecnn" in proc.stdout and "resnet18" in proc.stdout
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert rows["litecnn"]["paradigm"] == "cnn"
    # LiteCNN's stem stride grows with the input, so 224 px costs far less than 64x the 28 px MACs
    assert rows["litecnn"]["macs_m@224"] < 8 * rows["litecnn"]["macs_m@28"]
    # ResNet-18 keeps its stem: MACs scale with the pixel count
    assert rows["resnet18"]["macs_m@224"] > 40 * rows["resnet18"]["macs_m@28"]
    # segmentation networks get their own table, at segmentation sizes: a U-Net's cost grows
    # with the pixel count (16x from 64 to 256 px)
    assert "segmentation models" in proc.stdout
    assert rows["unet"]["task"] == "segmentation" and "macs_m@28" not in rows["unet"]
    assert 15 < rows["unet"]["macs_m@256"] / rows["unet"]["macs_m@64"] < 17
