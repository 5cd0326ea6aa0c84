"""W&B runs offline, one run per training run, with the resolved config, and always finished."""

from __future__ import annotations

import json
from pathlib import Path

import wandb

from medlite import pipeline
from tests.helpers import make_cfg


def test_wandb_offline_run_has_config_and_is_finished(tmp_path: Path, monkeypatch) -> None:
    seen = {}
    original = pipeline._finish_wandb

    def spy(loggers, results):
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger":
                run = lg.experiment
                seen.update(
                    name=run.name,
                    config=dict(run.config),
                    offline=run.settings.mode,
                    group=run.group,
                )
        original(loggers, results)

    monkeypatch.setattr(pipeline, "_finish_wandb", spy)
    out = tmp_path / "run"
    pipeline.run(make_cfg(out, ["debug=limit", "callbacks=none", "logger=wandb", "seed=7"]))
    assert seen["offline"] == "offline", "W&B must not touch the network by default"
    assert seen["name"] == "litecnn-synthlesion-none-s7" and seen["group"] == "train"
    assert seen["config"]["model"]["name"] == "litecnn" and seen["config"]["seed"] == 7
    assert seen["config"]["optim"]["lr"] == 3e-3  # resolved values, not interpolations
    assert wandb.run is None, "the run was finished"
    assert list((out / "wandb").glob("offline-run-*")), "offline run saved for `wandb sync`"
    assert json.loads((out / "results.json").read_text())["status"] == "ok"
