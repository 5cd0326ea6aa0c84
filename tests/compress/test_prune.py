"""Pruning steps: channels really go (MACs drop by the ratio or to the target), what must stay
whole stays whole, sparsity is what was asked and survives fine-tuning, pruned models round-trip
through a file, and bad settings or unsupported models are one clear ConfigError."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medlite.compress import RunContext, build_steps
from medlite.compress.prune import StructuredPruneStep, UnstructuredPruneStep
from medlite.compress.structure import context_build_args, load_compressed, save_compressed
from medlite.efficiency import count_macs, count_parameters
from medlite.errors import ConfigError
from medlite.pipeline import run
from tests.helpers import make_cfg, model_and_context

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(tmp_path: Path, model: str = "litecnn") -> tuple[nn.Module, RunContext]:
    return model_and_context(tmp_path, [f"model={model}"], seed=0)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------- structured (Torch-Pruning)
def test_ratio_halves_channels_and_quarters_macs(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path)
    x = ctx.example_input(8)
    macs0 = count_macs(model, x[:1])
    step = StructuredPruneStep(ratio=0.5, iterative_steps=2, recover_batches=2)
    pruned = step.prepare(model, ctx)
    r = step.report
    assert r["macs_before"] == macs0
    assert r["macs_after"] == count_macs(pruned, x[:1])  # the report is the model's real count
    # half the channels on both sides of most convs: about a quarter of the MACs remain
    assert 0.15 < r["macs_after"] / r["macs_before"] < 0.4
    assert r["params_after"] == count_parameters(pruned) < 0.4 * r["params_before"]
    assert r["speedup"] == pytest.approx(r["macs_before"] / r["macs_after"], rel=1e-3)
    assert [h["iteration"] for h in r["history"]] == [1, 2]
    assert "recover_loss" in r["history"][0]  # a recovery fine-tune between the iterations
    assert r["classifier"] == ["classifier"]
    assert pruned.classifier.out_features == ctx.datamodule.task.num_outputs
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)  # round_to=8
    out = _logits(pruned, x)
    assert out.shape == (8, ctx.datamodule.task.num_outputs) and torch.isfinite(out).all()


def test_target_speedup_is_reached_without_pruning_much_more(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path)
    step = StructuredPruneStep(ratio=None, target_speedup=2.0, iterative_steps=2, recover_batches=1)
    pruned = step.prepare(model, ctx)
    r = step.report
    assert r["target_reached"] and 2.0 <= r["speedup"] < 3.0
    assert r["macs_before"] / count_macs(pruned, ctx.example_input(1)) >= 2.0
    assert r["ratio"] < 0.5  # a ratio of 0.5 gives ~4x: the search stopped early
    assert r["speedup_search"][-1]["speedup"] >= 2.0


def test_pruned_model_round_trips_through_a_file(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path)
    fresh = copy.deepcopy(model)
    step = StructuredPruneStep(ratio=0.5, iterative_steps=1, recover_batches=0)
    pruned = step.prepare(model, ctx)
    x = ctx.example_input(4)
    path = save_compressed(pruned, tmp_path / "pruned.pt", context_build_args(ctx), x)
    loaded = load_compressed(path)
    assert torch.equal(_logits(pruned, x), _logits(loaded, x))
    assert count_parameters(loaded) == count_parameters(pruned)
    with pytest.raises(RuntimeError, match="size mismatch"):  # why weights alone can't do it
        fresh.load_state_dict(loaded.state_dict())
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a compressed model saved by medlite"):
        load_compressed(tmp_path / "other.pt")


@pytest.mark.parametrize(
    ("model", "mixer_class"),
    [("mobilevit", "Attention"), ("efficientvit", "LiteMLA")],
    ids=["transformer-mobilevit", "linear-efficientvit"],
)
def test_attention_modules_are_kept_whole_and_reported(
    tmp_path: Path, caplog, model: str, mixer_class: str
) -> None:
    net, ctx = _setup(tmp_path, model)
    arch = ctx.cfg.model.arch
    mixers = {n: m for n, m in net.named_modules() if type(m).__name__ == mixer_class}
    shapes = {n: [p.shape for p in m.parameters()] for n, m in mixers.items()}
    step = StructuredPruneStep(ratio=0.3, iterative_steps=1, recover_batches=0)
    with caplog.at_level(logging.INFO, logger="medlite.compress.prune"):
        pruned = step.prepare(net, ctx)
    r = step.report
    reported = {d["name"] for d in r["ignored_modules"] if d["why"] == "attention"}
    assert reported == set(mixers) and r["n_ignored_modules"] >= len(mixers) > 0
    assert f"not pruning {len(mixers)} attention modules in {arch}" in caplog.text
    after = dict(pruned.named_modules())
    for name, before in shapes.items():  # not one of their weights changed shape
        assert [p.shape for p in after[name].parameters()] == before
    assert r["macs_after"] < 0.85 * r["macs_before"]
    out = _logits(pruned, ctx.example_input(2))
    assert out.shape == (2, ctx.datamodule.task.num_outputs) and torch.isfinite(out).all()


def test_ignore_keeps_named_modules_whole(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path)
    stem_width = model.stem[0].out_channels
    step = StructuredPruneStep(ratio=0.5, iterative_steps=1, recover_batches=0, ignore=["stem"])
    pruned = step.prepare(model, ctx)
    assert pruned.stem[0].out_channels == stem_width
    assert {"name": "stem", "class": "Sequential", "why": "ignore"} in step.report[
        "ignored_modules"
    ]
    assert step.report["speedup"] > 2


def test_torch_pruning_time_limit_is_a_config_error(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path)
    step = StructuredPruneStep(ratio=0.5, iterative_steps=1, timeout_s=1e-6)
    with pytest.raises(ConfigError, match=r"litecnn: Torch-Pruning did not finish .*\(timeout_s\)"):
        step.prepare(model, ctx)


@pytest.mark.parametrize("model", ["vim", "vrwkv"])
def test_unsupported_model_is_one_clear_error(tmp_path: Path, model: str) -> None:
    net, ctx = _setup(tmp_path, model)
    with pytest.raises(ConfigError, match=rf"model {model}\b.*prune_unstructured or"):
        StructuredPruneStep(ratio=0.3, iterative_steps=1).prepare(net, ctx)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"kind": "prune", "ratio": 1.5}, "ratio=1.5"),
        ({"kind": "prune", "ratio": 0}, "ratio=0"),
        ({"kind": "prune", "ratio": None}, "ratio .* or target_speedup"),
        ({"kind": "prune", "target_speedup": 0.8}, "target_speedup=0.8 must be > 1"),
        ({"kind": "prune", "importance": "hessian"}, "importance='hessian'"),
        ({"kind": "prune", "iterative_steps": 0}, "iterative_steps must be >= 1"),
        ({"kind": "prune", "sparsity": 0.5}, "unexpected keyword argument 'sparsity'"),
        ({"kind": "prune_unstructured", "amount": 1.0}, "amount=1.0"),
        ({"kind": "prune_unstructured", "recover_batches": -1}, "recover_batches must be >= 0"),
    ],
)
def test_bad_settings_are_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_steps([params])


def test_unreachable_target_speedup_says_how_far_it_gets(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path)
    step = StructuredPruneStep(target_speedup=1000.0, iterative_steps=1, recover_batches=0)
    with pytest.raises(ConfigError, match=r"target_speedup=1000 is out of reach.*\d+\.\d+x"):
        step.prepare(model, ctx)


# ---------------------------------------------------------------- unstructured
def test_unstructured_sparsity_is_reached_kept_through_training_and_made_permanent(
    tmp_path: Path,
) -> None:
    model, ctx = _setup(tmp_path)
    step = UnstructuredPruneStep(amount=0.6, iterative_steps=2, recover_batches=2)
    model = step.prepare(model, ctx)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    assert "classifier" not in layers and len(layers) == step.report["n_layers"]
    masks = {n: m.weight_mask.clone() for n, m in layers.items()}
    copy.deepcopy(model)  # masks active: the model can still be copied (teachers, EMA)
    # the fine-tuning phase: an optimiser on the parameters, as Lightning runs it
    task = ctx.datamodule.task
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for x, y in list(ctx.datamodule.train_dataloader())[:3]:
        opt.zero_grad()
        task.loss(model(x), task.targets(y)).backward()
        opt.step()
    model = step.finalize(model, ctx)
    r = step.report
    assert not any(hasattr(m, "weight_orig") or hasattr(m, "weight_mask") for m in model.modules())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    assert r["sparsity"] == pytest.approx(zeros / total, abs=1e-6)  # measured, not assumed
    assert r["sparsity"] == pytest.approx(0.6, abs=0.005)
    for name, m in layers.items():  # every masked weight is still exactly zero
        assert isinstance(m.weight, nn.Parameter)
        assert (m.weight[masks[name] == 0] == 0).all(), name
    assert (model.classifier.weight != 0).all()  # the classifier stays dense by default
    assert set(r["layer_sparsity"]) == set(layers) and 0 < r["model_sparsity"] < r["sparsity"]
    assert "not faster" in r["note"]
    out = _logits(model, ctx.example_input(4))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- recipes and whole runs
@pytest.mark.parametrize(
    ("recipe", "cls"),
    [("prune", StructuredPruneStep), ("prune_unstructured", UnstructuredPruneStep)],
)
def test_recipe_yaml_builds_the_step(tmp_path: Path, recipe: str, cls: type) -> None:
    cfg = make_cfg(tmp_path, [f"compress={recipe}"])
    [step] = build_steps(OmegaConf.to_container(cfg.compress.steps, resolve=True))
    assert type(step) is cls and step.kind == recipe
    assert step.epochs == 10 and step.lr is None


def test_unstructured_recipe_runs_end_to_end(tmp_path: Path) -> None:
    run(
        make_cfg(
            tmp_path,
            [
                "debug=limit",
                "callbacks=none",
                "compress=prune_unstructured",
                "compress.steps.0.epochs=1",
                "profile.enabled=false",
                "compress.steps.0.recover_batches=0",
            ],
        )
    )
    results = json.loads((tmp_path / "results.json").read_text())
    [step] = results["compression"]["steps"]
    assert step["kind"] == "prune_unstructured"
    assert step["report"]["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert step["report"]["masks_removed"] == step["report"]["n_layers"]


def test_prune_recipe_runs_end_to_end_and_saves_the_pruned_model(tmp_path: Path) -> None:
    run(
        make_cfg(
            tmp_path,
            [
                "debug=limit",
                "callbacks=none",
                "compress=prune",
                "compress.steps.0.iterative_steps=1",
                "compress.steps.0.epochs=1",
            ],
        )
    )
    results = json.loads((tmp_path / "results.json").read_text())
    report = results["compression"]["steps"][0]["report"]
    assert report["speedup"] > 2.5 and report["macs_final"] == report["macs_after"]
    before, after = (s["efficiency"] for s in results["compression"]["stages"])
    assert after["macs"] == report["macs_after"] < before["macs"]
    saved = results["compression"]["saved"]  # weights + structural record, relative to the run
    model = load_compressed(tmp_path / saved)
    assert count_parameters(model) == report["params_after"] == after["params"]
