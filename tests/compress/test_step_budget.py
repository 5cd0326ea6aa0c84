"""max_step_batches: the cap smoke and debug configs put on a compression step's own loops."""

from __future__ import annotations

from medlite.compress.prune import recover
from tests.helpers import model_and_context


def _forward_counter(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_recovery_and_calibration_obey_the_cap(tmp_path):
    model, ctx = model_and_context(tmp_path, ["max_step_batches=2"], seed=0)
    calls = _forward_counter(model)
    assert recover(model, ctx, 20, 1e-3, what="test") is not None
    assert len(calls) == 2
    batches = ctx.calibration_batches(8)
    assert len(batches) == 2 and batches[0].shape[0] == ctx.datamodule.batch_size


def test_without_a_cap_steps_run_as_configured(tmp_path):
    model, ctx = model_and_context(tmp_path, [], seed=0)
    calls = _forward_counter(model)
    recover(model, ctx, 3, 1e-3, what="test")
    assert len(calls) == 3
    assert len(ctx.calibration_batches(4)) == 4
