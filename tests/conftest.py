"""Shared fixtures: where the official MedMNIST files live, and isolated W&B/cache dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of official MedMNIST files next to the repo; skip when a machine lacks it."""
    if not (SHARED_DATA / "breastmnist.npz").exists():
        pytest.skip(f"official MedMNIST files not found in {SHARED_DATA} (only on dev/CI machines)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Keep tests off the user's caches and off the network-facing W&B defaults."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MEDLITE_CACHE_DIR", str(base / "medlite-cache"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(base / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny model tests are as fast and never thrash a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
