"""A real multirun: one run directory and one W&B run per job, failures recorded, sweep summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from medlite.build import model_dims
from tests.helpers import CONF_DIR, subprocess_env, wandb_offline_records

REPO = CONF_DIR.parent


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """model=litecnn,efficientvit_m x compress=none,prune on the embedded data, W&B offline:
    three jobs train; EfficientViT-M + structured pruning is a combination medlite refuses
    (Torch-Pruning breaks its cascaded attention) and must fail on its own."""
    root = tmp_path_factory.mktemp("sweep")
    env = subprocess_env(root)
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "model=litecnn,efficientvit_m",
        "compress=none,prune",
        "seed=3",
        "debug=limit",
        "callbacks=none",
        "logger=wandb",
        f"paths.log_dir={root / 'outputs'}",
        "hydra.sweep.dir=" + str(root / "outputs" / "sweep"),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return root / "outputs" / "sweep", done


def _jobs(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))}


def test_every_job_has_its_run_dir_and_a_failure_does_not_stop_the_sweep(failing_sweep):
    sweep, done = failing_sweep
    assert done.returncode == 1, done.stderr[-2000:]  # all jobs ran; a failed job fails the sweep
    jobs = _jobs(sweep)
    assert sorted(jobs) == [
        "0_litecnn_synthlesion_none_seed3",
        "1_litecnn_synthlesion_prune_seed3",
        "2_efficientvit_m_synthlesion_none_seed3",
        "3_efficientvit_m_synthlesion_prune_seed3",
    ]
    failed = jobs["3_efficientvit_m_synthlesion_prune_seed3"]
    assert failed["status"] == "failed" and "prune_unstructured" in failed["error"]
    assert failed["model"]["name"] == "efficientvit_m" and failed["compress"]["name"] == "prune"
    for name, res in jobs.items():
        if name != "3_efficientvit_m_synthlesion_prune_seed3":
            assert res["status"] == "ok" and res["test"]["auc"] is not None, name
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert (summary["n_jobs"], summary["n_ok"], summary["n_failed"]) == (4, 3, 1)
    assert "3 of 4 job(s) succeeded" in " ".join(done.stdout.split())


def test_one_wandb_run_per_job_named_and_grouped_by_the_sweep(failing_sweep):
    sweep, _ = failing_sweep
    seen = {}
    expected = {
        "0_litecnn_synthlesion_none_seed3": ("litecnn", "none"),
        "1_litecnn_synthlesion_prune_seed3": ("litecnn", "prune"),
        "2_efficientvit_m_synthlesion_none_seed3": ("efficientvit_m", "none"),
    }
    for job, (model, compress) in expected.items():
        files = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, f"{job}: expected its own single W&B run, found {files}"
        records = wandb_offline_records(files[0])
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        config = {
            u.key: json.loads(u.value_json)
            for r in records
            if r.WhichOneof("record_type") == "config"
            for u in r.config.update
        }
        exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
        seen[job] = run.run_id
        assert run.run_group == "train-sweep"  # <task>-<sweep dir name>
        assert run.display_name == f"{model}-synthlesion-{compress}-s3"
        assert config["model"]["name"] == model and config["compress"]["name"] == compress
        assert config["seed"] == 3 and config["paths"]["output_dir"] == str(sweep / job)
        assert exits == [0], "each job's run is finished before the next starts"
    assert len(set(seen.values())) == 3


@pytest.mark.parametrize(
    "sweep_cfg", sorted(p.stem for p in (CONF_DIR / "sweep").glob("taxonomy*.yaml"))
)
def test_sweep_configs_compose(sweep_cfg):
    """The grid presets (the Optuna presets are checked in test_optuna.py): the classification
    grid covers every 2D classification model config, the segmentation grid every segmentation
    one (the grids run on 2D data; volume models are not in them)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"sweep={sweep_cfg}"], return_hydra_config=True
        )
    params = cfg.hydra.sweeper.params
    models = [m.strip() for m in params.model.split(",")]
    task = "segmentation" if "_seg" in sweep_cfg else "classification"
    configs = [
        p.stem
        for p in (CONF_DIR / "model").glob("*.yaml")
        if (OmegaConf.load(p).get("task") or "classification") == task
        and model_dims(OmegaConf.load(p)) == 2
    ]
    assert sorted(models) == sorted(configs)
    assert [c.strip() for c in params.compress.split(",")] == ["none", "kd", "prune", "ptq"]
    if task == "segmentation":
        assert cfg.teacher.name == "unet" and cfg.data.name in ("kvasir_seg", "synthseg")
    if sweep_cfg.endswith("smoke"):
        size = 64 if task == "segmentation" else 28
        assert cfg.trainer.max_epochs == 1 and cfg.data.size == size and cfg.max_phase_epochs == 1
        assert cfg.max_step_batches == 2 and cfg.parallel_jobs == 2
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")


def test_the_command_line_launcher_wins_over_the_smoke_preset():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["sweep=taxonomy_smoke", "launcher=local"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher") and cfg.parallel_jobs == 1
