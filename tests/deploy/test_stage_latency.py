"""Deployed latency of a compression stage: timed in turns with its ONNX Runtime export, and the
model handed back as it came (the recipe goes on training it)."""

from __future__ import annotations

import torch

from medlite.deploy.stage_latency import stage_deployed_latency
from medlite.models import create_model


def test_a_stage_is_timed_eager_and_in_onnx_runtime_and_left_in_train_mode(one_thread):
    torch.manual_seed(0)
    model = create_model("litecnn", num_classes=2, in_chans=1, img_size=28)
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    got = stage_deployed_latency(model, (1, 28, 28), efficiency={"latency_ms": 9.9}, repeats=5)
    assert set(got["deployed"]) == {"pytorch", "onnxruntime"}
    assert got["deployed_latency_ms"] == min(got["deployed"].values()) > 0
    assert got["deployed_runtime"] == min(got["deployed"], key=got["deployed"].get)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, stats)  # timed in eval mode: no statistics moved
