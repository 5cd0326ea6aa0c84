"""launcher=local|joblib|slurm: configs that compose into real launchers, job placement (threads,
one GPU per job), and two tiny jobs run side by side by the joblib launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.plugins.launcher import Launcher

from medlite.sweeps.placement import plan_placement
from tests.helpers import CONF_DIR, subprocess_env

REPO = CONF_DIR.parent


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("local", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launcher_configs_compose_into_installed_launchers(launcher, target):
    cfg = _compose(f"launcher={launcher}")
    assert cfg.hydra.launcher._target_ == target
    assert issubclass(hydra.utils.get_class(target), Launcher)
    if launcher != "local":  # the plugin accepts every key we set
        assert isinstance(hydra.utils.instantiate(cfg.hydra.launcher), Launcher)


def test_joblib_runs_parallel_jobs_as_one_knob_and_slurm_one_process_per_job():
    cfg = _compose("launcher=joblib", "parallel_jobs=3")
    assert cfg.hydra.launcher.n_jobs == 3 and cfg.parallel_jobs == 3
    search = _compose("sweep=optuna_kd", "launcher=joblib", "parallel_jobs=3")
    assert search.hydra.sweeper.n_jobs == 3  # Optuna proposes as many trials as run at once
    slurm = _compose("launcher=slurm", "hydra.launcher.partition=gpu")
    assert slurm.parallel_jobs == 1 and slurm.hydra.launcher.tasks_per_node == 1
    assert slurm.hydra.launcher.partition == "gpu"


def test_placement_splits_cores_and_gives_each_job_its_own_gpu():
    # 4 jobs at once on a 16-core, 4-GPU box: 4 threads each, jobs 0..7 round-robin on GPUs
    assert [plan_placement(4, k, 16, 4, True).gpu for k in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert plan_placement(4, 5, 16, 4, True).threads == 4
    # more jobs than cores: still one thread each; CPU jobs or a single GPU: no pinning
    assert plan_placement(8, 0, 2, 0, False).threads == 1
    assert plan_placement(2, 1, 8, 1, True).gpu is None
    assert plan_placement(2, 1, 8, 4, False).gpu is None


def test_two_jobs_run_side_by_side_with_joblib_each_in_one_process(tmp_path):
    """launcher=joblib with trainer=ddp: two worker processes, each job a single process with
    half the cores (DDP inside a multirun stays one process per job)."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "train.py", "-m", "launcher=joblib", "trainer=ddp", "seed=0,1",
        "debug=limit", "callbacks=none", "profile.enabled=false",
        f"paths.log_dir={tmp_path / 'outputs'}", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = subprocess_env(tmp_path)
    env.pop("OMP_NUM_THREADS")  # let the placement choose the threads
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    jobs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert sorted(jobs) == ["0_litecnn_synthlesion_none_seed0", "1_litecnn_synthlesion_none_seed1"]
    records = [r["job"] for r in jobs.values()]
    assert all(r["status"] == "ok" for r in jobs.values())
    assert len({r["pid"] for r in records}) == 2 and os.getpid() not in {r["pid"] for r in records}
    assert sorted(r["job_num"] for r in records) == [0, 1]
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(r["threads"] == threads and r["parallel_jobs"] == 2 for r in records)
    assert all(r["processes"] == 1 and r["world_size"] == 1 for r in records)
    assert not list(sweep.rglob("train_ddp_process_*.log"))
    assert json.loads((sweep / "sweep_summary.json").read_text())["n_ok"] == 2
