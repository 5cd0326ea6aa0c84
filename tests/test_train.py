"""End-to-end runs of the pipeline: results, determinism, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medlite import compress
from medlite.compress.base import CompressionStep, LossTerm
from medlite.errors import ConfigError, DataError, TrainingError
from medlite.pipeline import run
from tests.helpers import make_cfg

REPO = Path(__file__).resolve().parents[1]
FAST = ["debug=limit", "callbacks=none"]


def _run(tmp_path: Path, overrides: list[str]) -> tuple[float, dict]:
    out = tmp_path / "run"
    value = run(make_cfg(out, FAST + overrides))
    return value, json.loads((out / "results.json").read_text())


def test_run_records_results_checkpoint_and_csv(tmp_path: Path) -> None:
    value, res = _run(tmp_path, [])
    assert res["status"] == "ok"
    assert res["data"]["synthetic"] is True and res["data"]["flag"] == "synthlesion"
    assert set(res["test"]) >= {"auc", "acc", "f1", "sensitivity", "specificity"}
    assert value == pytest.approx(res["val"]["auc"])
    assert res["model"]["params"] > 10_000 and res["model"]["paradigm"] == "cnn"
    assert res["versions"]["torch"] and res["wall_time_s"] > 0 and res["seed"] == 42
    assert not Path(res["best_checkpoint"]).is_absolute()  # relative: the run folder can move
    assert (tmp_path / "run" / res["best_checkpoint"]).exists()
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") > 2
    eff = res["efficiency"]
    assert eff["params"] == res["model"]["params"] and eff["macs"] > 1e6
    assert eff["latency_ms"] > 0 and eff["throughput_ips"] > 0 and eff["size_mb"] > 0.5


def test_last_epoch_rule_keeps_tests_and_records_the_final_weights(tmp_path: Path) -> None:
    _, res = _run(tmp_path, ["eval.checkpoint=last", "trainer.max_epochs=3", "max_phase_epochs=3"])
    assert Path(res["best_checkpoint"]).name == "last.ckpt"
    state = torch.load(tmp_path / "run" / res["best_checkpoint"], map_location="cpu")
    assert state["epoch"] == 2  # the final epoch's weights, not the best validation epoch's
    rows = [line.split(",") for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("val/auc")
    per_epoch = [float(r[col]) for r in rows[1:] if r[col]]
    assert res["val"]["auc"] == pytest.approx(per_epoch[-1], abs=1e-6)


@pytest.mark.parametrize(
    "flag", ["synthlesion_multiclass", "synthlesion_multilabel", "synthlesion_ordinal"]
)
def test_every_task_type_trains(tmp_path: Path, flag: str) -> None:
    _, res = _run(tmp_path, [f"data.flag={flag}"])
    assert res["status"] == "ok"
    assert 0.0 <= res["test"]["auc"] <= 1.0
    if flag.endswith("ordinal"):
        assert "qwk" in res["test"] and "mae" in res["test"]


def test_same_seed_gives_identical_metrics(tmp_path: Path, shared_data: Path) -> None:
    # threads fixed: thread counts change float sums, and threads=auto follows the load
    args = ["data=breastmnist", f"paths.data_dir={shared_data}", "data.download=false", "seed=3"]
    args.append("threads=1")
    _, first = _run(tmp_path / "a", args)
    _, second = _run(tmp_path / "b", args)
    assert first["test"] == second["test"]
    assert first["val"] == second["val"]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.max_epochs=-1", "trainer.max_epochs"),
        ("data.size=100", "data.size"),
        ("optim.lr=0", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("label_smoothing=1.5", "label_smoothing"),
        ("model.arch=resnet81", "resnet18"),
        ("model.paradigm=rnn", "model.paradigm"),
        ("data.flag=breastmnst", "breastmnist"),
        ("eval.checkpoint=first", "eval.checkpoint"),
    ],
)
def test_invalid_values_fail_before_training(tmp_path: Path, override: str, needle: str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / ".hydra").mkdir()  # what Hydra writes before the task starts
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        run(make_cfg(out, FAST + [override]))
    assert not out.exists(), "a run that failed before training leaves nothing behind"


@pytest.mark.parametrize("group", ["model", "data", "compress"])
def test_unknown_option_lists_valid_choices(group: str) -> None:
    proc = subprocess.run(
        [sys.executable, "train.py", f"{group}=nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert f"Could not find '{group}/nope'" in err and "Available options" in err
    assert {"model": "litecnn", "data": "breastmnist", "compress": "none"}[group] in err


def test_missing_file_offline_is_one_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        FAST + ["data=breastmnist", f"paths.data_dir={tmp_path / 'empty'}", "data.download=false"],
    )
    with pytest.raises(DataError) as info:
        run(cfg)
    msg = str(info.value)
    assert "breastmnist.npz" in msg and "zenodo" in msg.lower() and "data.download" in msg
    assert not out.exists()


def test_corrupt_file_is_named(tmp_path: Path, shared_data: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    blob = (shared_data / "breastmnist.npz").read_bytes()
    (data_dir / "breastmnist.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="breastmnist.npz"):
        run(
            make_cfg(
                tmp_path / "run",
                FAST + ["data=breastmnist", f"paths.data_dir={data_dir}", "data.download=false"],
            )
        )
    assert not (tmp_path / "run").exists()


class _NaNAfter(LossTerm):
    name = "nan_after"

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, module, x, logits, targets):
        bad = module.global_step >= self.steps
        return logits.sum() * (torch.tensor(float("nan")) if bad else 0.0)


class _NaNStep(CompressionStep):
    kind = "nan_after"

    def __init__(self, steps: int) -> None:
        super().__init__(epochs=2)
        self.steps = steps

    def loss_terms(self):
        return [_NaNAfter(self.steps)]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(compress.STEP_TYPES, "nan_after", _NaNStep)
    out = tmp_path / "run"
    cfg = make_cfg(
        out, FAST + ["compress.base=scratch", "+compress.steps=[{kind: nan_after, steps: 4}]"]
    )
    with pytest.raises(TrainingError, match="NaN|nan"):
        run(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and "nan" in res["error"].lower()
    ckpts = list((out / "checkpoints" / "nan_after").glob("best-*.ckpt"))
    assert ckpts, "the checkpoint from before the NaN is kept"
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _train_py(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess with its own cache folder."""
    env = {**os.environ, "MEDLITE_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_train_py_end_to_end(tmp_path: Path) -> None:
    proc = _train_py(tmp_path, ["debug=limit", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run directory" in proc.stdout and "SYNTHETIC" in proc.stdout
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "ok" and res["test"]["auc"] is not None
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()


def test_train_py_segmentation_end_to_end(tmp_path: Path) -> None:
    """``python train.py data=synthseg``: the embedded masks, the default segmentation model
    (EGE-UNet, chosen by the dataset option), Dice in the summary."""
    proc = _train_py(
        tmp_path, ["data=synthseg", "debug=limit", f"hydra.run.dir={tmp_path / 'run'}"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dice" in proc.stdout and "SYNTHETIC" in proc.stdout
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "ok" and res["model"]["name"] == "egeunet"
    assert res["task"]["kind"] == "segmentation" and 0.0 <= res["test"]["dice"] <= 1.0
    assert res["config"]["teacher"]["name"] == "unet"


def test_a_classifier_on_segmentation_data_stops_before_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)
    with pytest.raises(ConfigError, match="model=litecnn is a classification model.*model=unet"):
        run(make_cfg(out, ["data=synthseg", "model=litecnn", *FAST]))
    assert not out.exists()


def test_multirun_goes_on_after_a_failing_job(tmp_path: Path) -> None:
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    proc = _train_py(tmp_path, ["-m", "debug=limit", "callbacks=none", "data.size=100,28", sweep])
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep ran on; a job failed
    assert "data.size=100" in proc.stderr  # the failing job's clear message
    status = {
        p.parent.name.split("_")[0]: json.loads(p.read_text())
        for p in (tmp_path / "sweep").glob("*/results.json")
    }
    assert status["1"]["status"] == "ok"
    # the failed job is recorded (for the sweep summary and aggregation), with its error
    assert status["0"]["status"] == "failed" and "data.size=100" in status["0"]["error"]


def test_failed_start_leaves_no_empty_run_folders(tmp_path: Path) -> None:
    log_dir = tmp_path / "outputs"
    out = log_dir / "train" / "runs" / "synthlesion" / "litecnn" / "none" / "seed42_now"
    (out / ".hydra").mkdir(parents=True)
    (log_dir / "keep.txt").write_text("other work")
    with pytest.raises(ConfigError):
        run(make_cfg(out, FAST + [f"paths.log_dir={log_dir}", "optim.lr=-1"]))
    assert sorted(p.name for p in log_dir.iterdir()) == ["keep.txt"]
