"""``resume=<run dir>``: a killed run continues in its own directory and ends exactly where the
uninterrupted run ends (metrics, metrics.csv, W&B run); bad resumes fail before any work."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from medlite.errors import ConfigError
from medlite.pipeline import run
from medlite.resume import prepare_resume
from tests.helpers import make_cfg

REPO = Path(__file__).resolve().parents[1]
# 4 short epochs (3 batches) of a small CNN on the synthetic default data; the trainer default is
# deterministic. Threads fixed: a different thread count changes float sums (threads=auto would
# follow the machine's load, which differs between the reference and the resumed run)
ARGS = [
    "threads=1",
    "debug=limit",
    "callbacks=none",
    "trainer.max_epochs=4",
    "max_phase_epochs=4",
    "seed=5",
]
CRASH = "+callbacks.crash={_target_: tests.test_resume.CrashAt, epoch: 2, batches: 2}"


class SimulatedCrash(RuntimeError):
    pass


class CrashAt(pl.Callback):
    """Test-only: kill a fresh (not resumed) fit after ``batches`` training batches of epoch
    ``epoch`` (0-based): raise, or (``sigkill``) SIGKILL the whole process."""

    def __init__(self, epoch: int, batches: int, sigkill: bool = False) -> None:
        self.epoch, self.batches, self.sigkill = epoch, batches, sigkill

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.ckpt_path is not None:  # the resumed fit runs to the end
            return
        if trainer.current_epoch == self.epoch and batch_idx + 1 == self.batches:
            if self.sigkill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise SimulatedCrash(f"killed in epoch {self.epoch} after {self.batches} batches")


def _start(out: Path, overrides: list[str]):
    """Compose like train.py and save the config where Hydra saves it."""
    cfg = make_cfg(out, overrides)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return cfg


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _metrics(out: Path) -> list[dict]:
    with (out / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_run(resumed: Path, reference: Path) -> None:
    res, ref = _results(resumed), _results(reference)
    assert res["status"] == "ok"
    assert set(res) == set(ref) | {"resumed"}, "results.json as complete as an uninterrupted run's"
    for split in ("val", "test"):
        assert res[split].keys() == ref[split].keys()
        for key, value in ref[split].items():
            assert res[split][key] == pytest.approx(value, abs=1e-6), f"{split}/{key}"
    assert Path(res["best_checkpoint"]).name == Path(ref["best_checkpoint"]).name
    assert (resumed / res["best_checkpoint"]).parent == resumed / "checkpoints"
    assert res["run_dir"] == str(resumed)
    assert res["resumed"][-1]["epoch"] == 1  # last.ckpt: end of epoch 1; killed in epoch 2
    # metrics.csv: every epoch once, same numbers as the uninterrupted run's (nothing doubled)
    rows, ref_rows = _metrics(resumed), _metrics(reference)
    assert len(rows) == len(ref_rows)
    for row, ref_row in zip(rows, ref_rows, strict=True):
        assert row.keys() == ref_row.keys()
        for key, value in ref_row.items():
            if value == "":
                assert row[key] == "", key
            else:
                assert float(row[key]) == pytest.approx(float(value), abs=1e-6), (key, row)
    val_epochs = [int(r["epoch"]) for r in rows if r.get("val/auc") and not r.get("test/auc")]
    assert val_epochs == [0, 1, 2, 3, 4]  # 4 training epochs + the best checkpoint's validation


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (same env isolation as conftest's autouse fixture)."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDLITE_CACHE_DIR", str(base / "medlite-cache"))
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(base / "wandb"))
        mp.setenv("WANDB_MODE", "offline")
        out = tmp_path_factory.mktemp("reference") / "run"
        run(_start(out, ARGS))
    return out


def test_killed_run_resumes_to_identical_metrics(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        run(_start(out, [*ARGS, CRASH]))
    assert _results(out)["status"] == "failed"
    assert (out / "checkpoints" / "last.ckpt").exists()

    run(make_cfg(tmp_path / "unused", [f"resume={out}"]))
    _assert_same_run(out, reference)
    assert not (tmp_path / "unused").exists()


def test_a_resumed_threads_auto_run_says_which_threads_each_epoch_used(tmp_path, caplog):
    """threads=auto cannot promise the uninterrupted run's numbers (the load decides the thread
    count); the resume says so, and results.json records the epochs this process trained."""
    out = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("threads=")] + ["threads=auto"]
    with pytest.raises(SimulatedCrash):
        run(_start(out, [*args, CRASH]))
    with caplog.at_level("WARNING", logger="medlite.pipeline"):
        run(make_cfg(tmp_path / "unused", [f"resume={out}"]))
    assert "threads=auto" in caplog.text and "threads=N resumes bit-identically" in caplog.text
    used = _results(out)["job"]["train_threads"]["train"]
    assert list(used) == ["2", "3"]  # killed in epoch 2: epochs 2 and 3 trained after the resume
    assert all(1 <= n <= (os.cpu_count() or 1) for n in used.values())


def _train_py(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # the crash callback lives in tests/
    )


def test_sigkilled_cli_run_resumes_in_place_with_its_wandb_run(
    tmp_path: Path, reference: Path
) -> None:
    """As from a notebook or test runner that used W&B: the runs inherit this process's W&B
    service (WANDB_SERVICE), where the killed run's stream stays open; the resumed run must
    still get its id back (not "run ID is in use")."""
    import wandb

    wandb.setup()
    assert "WANDB_SERVICE" in os.environ
    out = tmp_path / "run"
    crash = CRASH.replace("batches: 2}", "batches: 2, sigkill: true}")
    proc = _train_py(tmp_path, [*ARGS, crash, "logger=wandb", f"hydra.run.dir={out}"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "results.json").exists() and (out / "checkpoints" / "last.ckpt").exists()
    (before,) = (out / "wandb").glob("offline-run-*")
    saved = (out / ".hydra" / "config.yaml").read_text()

    # anything but the run itself on the command line is refused, before any work
    proc = _train_py(tmp_path, [f"resume={out}", "seed=3"])
    assert proc.returncode == 1
    assert "seed=3" in proc.stderr and "ConfigError" in proc.stderr
    assert (out / ".hydra" / "config.yaml").read_text() == saved
    assert not any((tmp_path / "outputs").rglob("*")), "the refused command left no run folder"

    proc = _train_py(tmp_path, [f"resume={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any((tmp_path / "outputs").rglob("*")), "Hydra's fresh folder for it is gone"
    _assert_same_run(out, reference)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and before in runs
    run_id = before.name.rsplit("-", 1)[1]
    assert all(p.name.endswith(f"-{run_id}") for p in runs), "W&B continues the same run id"
    log = (out / "train.log").read_text()
    assert "Resuming" in log and str(out) in log
    assert _results(out)["config"]["logger"]["wandb"]["id"] == run_id


def _fake_run(out: Path, overrides: list[str] = (), ckpt: bool = True) -> Path:
    """A run directory as a killed run leaves it (without training)."""
    _start(out, [*ARGS, *overrides])
    if ckpt:
        (out / "checkpoints").mkdir()
        state = {"epoch": 1, "global_step": 10, "loops": {}}
        torch.save(state, out / "checkpoints" / "last.ckpt")
    return out


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "no such run directory"),
        ("not_a_run", "not a medlite run directory"),
        ("no_ckpt", "no checkpoints/last.ckpt"),
        ("finished", "already finished"),
        ("compressed", "compression recipe"),
        ("corrupt_ckpt", "can't be read"),
    ],
)
def test_bad_resume_fails_before_any_work(tmp_path: Path, case: str, needle: str) -> None:
    out = tmp_path / "run"
    if case == "not_a_run":
        out.mkdir()
    elif case == "no_ckpt":
        _fake_run(out, ckpt=False)
    elif case == "finished":
        _fake_run(out)
        (out / "results.json").write_text(json.dumps({"status": "ok"}))
    elif case == "compressed":
        _fake_run(out, ["compress=ptq"])
    elif case == "corrupt_ckpt":
        _fake_run(out)
        (out / "checkpoints" / "last.ckpt").write_bytes(b"cut short")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=needle):
        # the output dir a failed start is cleaned out of is the run itself here: kept
        run(make_cfg(out, [f"resume={out}"]))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_resume_takes_only_harmless_overrides(tmp_path: Path) -> None:
    out = _fake_run(tmp_path / "run")
    cfg = make_cfg(tmp_path / "fresh", [f"resume={out}", "paths.data_dir=/elsewhere"])
    with pytest.raises(ConfigError, match=r"drop seed=3, model=resnet18"):
        prepare_resume(cfg, [f"resume={out}", "seed=3", "model=resnet18"])
    saved, resume = prepare_resume(cfg, [f"resume={out}", "paths.data_dir=/elsewhere"])
    assert saved.paths.data_dir == "/elsewhere" and saved.paths.output_dir == str(out)
    assert saved.seed == 5 and saved.trainer.max_epochs == 4 and saved.resume is None
    assert resume.checkpoint == out / "checkpoints" / "last.ckpt" and resume.epoch == 1
    # without the command line (in-process callers) the saved config is used as it is
    saved, _ = prepare_resume(cfg)
    assert saved.paths.data_dir != "/elsewhere"
