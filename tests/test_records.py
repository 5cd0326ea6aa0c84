"""Records tell the truth: a pruned run reports the parameters of the model it ends with, and
weights that turn NaN are stopped at validation with one message (not a metric's traceback)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from medlite.cli import train
from medlite.pipeline import run
from medlite.results import print_summary
from tests.helpers import make_cfg

FAST = ["debug=limit", "callbacks=none", "profile.repeats=1", "profile.warmup=0"]


class PoisonWeightsOnLastStep(pl.Callback):
    """Weights that turn NaN on an epoch's last step: the loss of that step was still finite,
    so only the validation that follows can see it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


def test_nan_weights_stop_at_validation_with_one_message(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    poison = "+callbacks.poison._target_=tests.test_records.PoisonWeightsOnLastStep"
    cfg = make_cfg(out, ["debug=fast_dev_run", "callbacks=none", poison])
    try:
        train(cfg)
    except SystemExit as exit_:
        assert exit_.code == 1
    else:
        raise AssertionError("a run with NaN weights finished")
    err = capsys.readouterr().err
    assert "NonFiniteOutputError" in err and "val outputs are NaN/inf" in err
    assert "Traceback" not in err and "Input contains NaN" not in err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and "NaN/inf" in results["error"]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_test_outputs_are_guarded_too() -> None:
    """Segmentation keeps hard masks, where NaN can't show: the guard reads the logits."""
    from medlite.modules.base import MedliteModule, NonFiniteOutputError
    from medlite.tasks import get_task

    task = get_task("binary-class", ("benign", "malignant"))
    net = torch.nn.Linear(4, task.num_outputs)
    module = MedliteModule(net, task, optim={"_target_": "torch.optim.AdamW"})
    batch = (torch.randn(2, 4), torch.tensor([[0], [1]]))
    module.test_step(batch, 0)
    with torch.no_grad():
        net.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteOutputError, match="test outputs are NaN/inf"):
        module.test_step(batch, 1)


def test_a_pruned_run_reports_the_pruned_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    run(make_cfg(out, [*FAST, "compress=prune", "compress.steps.0.recover_batches=1"]))
    results = json.loads((out / "results.json").read_text())
    before, after = (s["efficiency"]["params"] for s in results["compression"]["stages"])
    assert after < before
    assert results["model"]["params"] == after == results["efficiency"]["params"]
    capsys.readouterr()
    print_summary(results)
    shown = capsys.readouterr().out
    assert f"params {after:,}" in shown and f"{before:,} |" not in shown
    assert re.search(r"params ([\d,]+) \| wall time", shown).group(1) == f"{after:,}"
