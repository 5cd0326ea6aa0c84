"""One briefly trained BreastMNIST run, exported by train.py itself, shared by the deploy tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlite.pipeline import run
from tests.helpers import make_cfg


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory, shared_data: Path) -> Path:
    """LiteCNN, 4 short epochs on real BreastMNIST, then ``export=all`` (ONNX fp32 + int8 +
    torch.export, parity-checked, model card): the path a user gets from ``train.py``."""
    out = tmp_path_factory.mktemp("exported_run")
    cfg = make_cfg(
        out,
        [
            "data=breastmnist",
            f"paths.data_dir={shared_data}",
            f"paths.cache_dir={out / 'cache'}",
            "trainer.max_epochs=4",
            "callbacks=none",
            "profile.repeats=3",
            "profile.warmup=1",
            "profile.throughput_batch=8",
            "export=all",
        ],
    )
    run(cfg)
    assert json.loads((out / "results.json").read_text())["status"] == "ok"
    return out
