"""trainer=ddp: which configs ask for several processes, what is refused, and a real 2-process
CPU (gloo) run that must leave one run directory recorded by rank 0 alone."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medlite import ddp
from medlite.errors import ConfigError
from medlite.tasks.classification_metrics import compute_metrics
from tests.helpers import CONF_DIR, make_cfg, subprocess_env

REPO = CONF_DIR.parent


def test_only_a_ddp_strategy_asks_for_several_processes(tmp_path):
    assert ddp.requested_processes(make_cfg(tmp_path)) == 1
    assert ddp.requested_processes(make_cfg(tmp_path, ["trainer=ddp"])) == 2
    cfg = make_cfg(tmp_path, ["trainer=ddp", "trainer.devices=[0,1,2]"])
    assert ddp.requested_processes(cfg) == 3
    # devices=2 without a DDP strategy is Lightning's business (e.g. its own default), not ours
    assert ddp.requested_processes(make_cfg(tmp_path, ["trainer.devices=2"])) == 1


def test_ddp_refuses_compression_recipes_and_is_one_process_in_a_multirun(tmp_path):
    with pytest.raises(ConfigError, match="compress=none"):
        ddp.prepare(make_cfg(tmp_path, ["trainer=ddp", "compress=kd"]), multirun=False)
    assert ddp.prepare(make_cfg(tmp_path, ["trainer=ddp"]), multirun=False) == 2
    cfg = make_cfg(tmp_path, ["trainer=ddp"])
    assert ddp.prepare(cfg, multirun=True) == 1
    assert cfg.trainer.devices == 1 and cfg.trainer.strategy == "auto"


@pytest.mark.slow
def test_two_process_gloo_run_leaves_one_run_recorded_by_rank_zero(tmp_path):
    env = subprocess_env(tmp_path)
    cmd = [
        sys.executable, "train.py", "trainer=ddp", "trainer.devices=2", "debug=limit",
        "callbacks=none", f"paths.log_dir={tmp_path / 'outputs'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = list((tmp_path / "outputs").rglob("results.json"))
    assert len(runs) == 1, f"DDP must not create a second run directory: {runs}"
    run = runs[0].parent
    res = json.loads(runs[0].read_text())
    assert res["status"] == "ok"
    assert res["job"]["processes"] == 2 and res["job"]["world_size"] == 2
    # both ranks joined the gloo group; rank 1 only left its log, in the same directory
    assert "MEMBER: 1/2" in (run / "train.log").read_text()
    assert "MEMBER: 2/2" in (run / "train_ddp_process_1.log").read_text()
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [".hydra", "checkpoints"]

    # rank 0's test metrics are those of the best checkpoint on the whole test split, each
    # image once (a distributed test would pad the split): recompute them in this process
    from medlite.build import build_datamodule, build_model

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    dm = build_datamodule(cfg)
    dm.setup()
    model = build_model(cfg.model, dm.task.num_outputs, dm.in_chans, dm.preprocess.input_size)
    state = torch.load(run / res["best_checkpoint"], map_location="cpu", weights_only=True)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()})
    model.eval()
    ys, scores = [], []
    with torch.no_grad():
        for i, (x, y) in enumerate(dm.test_dataloader()):
            if i >= cfg.trainer.limit_test_batches:
                break
            ys.append(y)
            scores.append(dm.task.scores(model(x)))
    expected = compute_metrics(torch.cat(ys).numpy(), torch.cat(scores).numpy(), dm.task.type)
    assert res["test"]["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    assert np.isfinite(res["efficiency"]["latency_ms"])


@pytest.mark.slow
def test_a_ddp_run_resumes_with_both_ranks_in_its_own_directory(tmp_path):
    """A 2-process run stopped after its 2 epochs (its results.json removed, as a kill leaves
    it) and given a third epoch: resume=<run dir> trains on 2 processes again, in place."""
    env = subprocess_env(tmp_path)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "train.py", "trainer=ddp", "debug=limit", "callbacks=none",
        f"hydra.run.dir={run}", f"paths.log_dir={tmp_path / 'outputs'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run / "results.json").unlink()
    saved = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(saved)
    cfg.trainer.max_epochs = cfg.max_phase_epochs = 3
    OmegaConf.save(cfg, saved)

    cmd = [sys.executable, str(REPO / "train.py"), f"resume={run}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "ok" and res["job"]["world_size"] == 2
    assert res["resumed"][0]["epoch"] == 1  # continued after the 2nd epoch (0-based 1)
    epochs = {int(row.split(",")[0]) for row in (run / "metrics.csv").read_text().splitlines()[1:]}
    assert epochs == {0, 1, 2}
    assert "MEMBER: 2/2" in (run / "train_ddp_process_1.log").read_text()
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()], "no stray run dir"
