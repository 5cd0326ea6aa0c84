"""Low-rank factorisation: exact at full rank, the promised savings at lower rank, still trainable."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medlite.compress import RunContext, build_steps
from medlite.compress.lowrank import (
    CPConv2d,
    LowRankConv1x1,
    LowRankLinear,
    LowRankStep,
    TuckerConv2d,
    _svals,
    cp_conv,
    factorize_conv1x1,
    factorize_linear,
    rank_for_energy,
    tucker2_conv,
)
from medlite.efficiency import count_macs, count_parameters
from medlite.errors import ConfigError
from tests.helpers import make_cfg, model_and_context


@pytest.fixture(autouse=True)
def _seeded(one_thread):
    torch.manual_seed(0)


def _setup(tmp_path: Path, overrides: list[str]) -> tuple[nn.Module, RunContext]:
    return model_and_context(tmp_path, ["data.batch_size=16", *overrides])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# -- the building blocks -------------------------------------------------------------------------


def test_energy_rank_follows_the_spectrum() -> None:
    # squared spectrum 16, 4, 1, 1, 1, 1 (total 24): top-1 keeps 2/3, top-2 5/6, top-3 7/8
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 2 / 3) == 1  # reaching the threshold exactly is enough
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 0.85) == 3
    assert rank_for_energy(s, 1.0) == 6
    # the same through the step on a layer with that spectrum (random singular vectors)
    u, _ = torch.linalg.qr(torch.randn(48, 6))
    v, _ = torch.linalg.qr(torch.randn(40, 6))
    layer = nn.Linear(40, 48)
    layer.weight.data = u @ torch.diag(s) @ v.T
    for energy, expected in [(0.7, 2), (0.85, 3)]:
        assert LowRankStep(energy=energy)._matrix_rank(layer.weight) == expected


def test_full_rank_svd_reproduces_linear_and_pointwise_conv() -> None:
    lin = nn.Linear(24, 40)
    x = torch.randn(5, 7, 24)
    full = factorize_linear(lin, 24)
    assert isinstance(full, LowRankLinear) and full.up.bias is not None
    assert _rel(full(x), lin(x)) < 1e-4
    # the truncated one is the best rank-r approximation (Eckart-Young)
    s = torch.linalg.svdvals(lin.weight.detach())
    low = factorize_linear(nn.Linear(24, 40, bias=False).requires_grad_(True), 6)
    assert low.up.bias is None
    w_err = _rel(factorize_linear(lin, 6).dense_weight(), lin.weight)
    assert w_err == pytest.approx(float(s[6:].norm() / s.norm()), rel=1e-4)

    conv = nn.Conv2d(16, 32, 1, stride=2, padding=1)
    img = torch.randn(2, 16, 9, 9)
    pw = factorize_conv1x1(conv, 16)
    assert isinstance(pw, LowRankConv1x1)
    assert _rel(pw(img), conv(img)) < 1e-4


@pytest.mark.parametrize("geometry", [{}, {"stride": 2, "padding": 1, "dilation": 2}])
def test_full_rank_tucker_reproduces_conv(geometry: dict) -> None:
    conv = nn.Conv2d(12, 20, 3, **geometry)
    x = torch.randn(2, 12, 15, 15)
    tucker = tucker2_conv(conv, 12, 20)
    assert isinstance(tucker, TuckerConv2d) and list(tucker) == [
        tucker.reduce,
        tucker.core,
        tucker.expand,
    ]
    assert tucker.core.stride == conv.stride and tucker.core.dilation == conv.dilation
    assert _rel(tucker(x), conv(x)) < 1e-4
    assert _rel(tucker.dense_weight(), conv.weight) < 1e-4
    one_sided = tucker2_conv(conv, None, 20)  # input mode kept whole: no reduce 1x1
    assert "reduce" not in one_sided._modules and _rel(one_sided(x), conv(x)) < 1e-4


def test_cp_reproduces_a_conv_of_low_cp_rank() -> None:
    conv = nn.Conv2d(8, 10, 3, stride=2, padding=1)
    factors = [torch.randn(n, 3) for n in (10, 8, 3, 3)]
    conv.weight.data = torch.einsum("or,ir,hr,wr->oihw", *factors)
    cp = cp_conv(conv, 3)
    assert isinstance(cp, CPConv2d)
    x = torch.randn(2, 8, 11, 11)
    assert _rel(cp(x), conv(x)) < 1e-3


# -- the step on real models ---------------------------------------------------------------------


def _check_accounting(step: LowRankStep, model: nn.Module, before: nn.Module, ctx) -> None:
    """The report's numbers are measured, and the model shrinks by the sum of its layer plans."""
    r = step.report
    one = ctx.example_input(1)
    assert r["params_before"] == count_parameters(before)
    assert r["params_after"] == count_parameters(model) < r["params_before"]
    assert r["macs_before"] == count_macs(before, one)
    assert r["macs_after"] == count_macs(model, one) < r["macs_before"]
    saved_params = sum(f["params"][0] - f["params"][1] for f in r["factorised"])
    saved_macs = sum(f["macs"][0] - f["macs"][1] for f in r["factorised"])
    assert r["params_before"] - r["params_after"] == saved_params
    assert r["macs_before"] - r["macs_after"] == saved_macs
    assert r["n_factorised"] == len(r["factorised"]) > 0
    assert r["n_skipped"] == sum(r["skipped_reasons"].values()) == len(r["skipped"])
    assert 0 <= r["output_rel_error"] < float("inf")


def test_litecnn_default_ratio_and_exactness_at_full_rank(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path, ["model=litecnn"])
    before = copy.deepcopy(model)
    step = LowRankStep(rank_ratio=0.5, min_params=2048)
    out = step.prepare(model.train(), ctx)
    assert out is model and model.training  # factorised in place, train mode restored
    _check_accounting(step, model, before, ctx)
    r = step.report
    names = {f["name"] for f in r["factorised"]}
    assert "classifier" not in names and isinstance(model.classifier, nn.Linear)
    assert r["skipped_reasons"]["classifier head (skip_head)"] == 1
    assert r["skipped_reasons"]["grouped or depthwise conv"] >= 1
    assert all(f["method"] == "svd" for f in r["factorised"])  # litecnn's 3x3s are depthwise
    # rank = half the full rank, exactly as the plan says
    for f in r["factorised"]:
        assert f["ranks"] == [round(0.5 * min(f["shape"][:2]))]

    # at full rank the whole model is unchanged (ratio 1.0 saves nothing, so force the layers)
    x = ctx.example_input(4)
    ref = before.eval()(x)
    for name, m in list(before.named_modules()):
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            parent, _, child = name.rpartition(".")
            full = factorize_conv1x1(m, min(m.in_channels, m.out_channels))
            setattr(before.get_submodule(parent), child, full)
    assert _rel(before(x), ref) < 1e-4


def test_factorised_model_still_trains(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path, ["model=litecnn"])
    LowRankStep(rank_ratio=0.25, min_params=0, skip_head=False).prepare(model, ctx)
    assert isinstance(model.classifier, LowRankLinear)
    x, y = next(iter(ctx.datamodule.train_dataloader()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    loss = nn.functional.cross_entropy(model(x), y.view(-1).long())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resnet18_tucker(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path, ["model=resnet18"])
    before = copy.deepcopy(model)
    step = LowRankStep(rank_ratio=0.5, tucker_iters=0)
    step.prepare(model, ctx)
    _check_accounting(step, model, before, ctx)
    r = step.report
    assert isinstance(model.layer1[0].conv1, TuckerConv2d)
    assert isinstance(model.fc, nn.Linear)  # the head stays dense
    tucker = [f for f in r["factorised"] if f["method"] == "tucker"]
    assert (
        len(tucker) == 16
    )  # every 3x3 conv of the four stages (the 7x7 stem is tiny at 1 channel)
    for f in tucker:
        cout, cin = f["shape"][:2]
        assert f["ranks"] == [cin // 2, cout // 2]
        k = f["shape"][2] * f["shape"][3]
        assert f["params"] == [
            cout * cin * k,
            cin * cin // 2 + cin * cout // 4 * k + cout * cout // 2,
        ]
    # stride-2 convs see their first 1x1 at the input resolution: still fewer MACs, by less
    assert all(f["macs"][1] < f["macs"][0] for f in r["factorised"])


def test_exactly_low_rank_weights_are_found_and_reproduced(tmp_path: Path) -> None:
    """End to end through the step: layers whose weights have low (multilinear) rank get exactly
    that rank from ``energy``, are replaced where they sit, and the logits do not change."""
    model, ctx = _setup(tmp_path, ["model=resnet18"])
    expected = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, nn.Conv2d) or m.in_channels < 64:
                continue
            cout, cin, kh, kw = m.weight.shape
            r_out, r_in = cout // 4, cin // 8
            if kh == 1:  # a 1x1 downsample: a rank-r_in matrix
                m.weight.copy_((torch.randn(cout, r_in) @ torch.randn(r_in, cin))[..., None, None])
                expected[name] = [r_in]
            else:  # multilinear rank (r_out, r_in) over the channel modes
                core = torch.randn(r_out, r_in, kh, kw)
                w = torch.einsum(
                    "abhw,oa,ib->oihw", core, torch.randn(cout, r_out), torch.randn(cin, r_in)
                )
                m.weight.copy_(w / w.std() * 0.05)
                expected[name] = [r_in, r_out]
    step = LowRankStep(energy=1 - 1e-6, tucker_iters=0)
    step.prepare(model, ctx)
    got = {f["name"]: f["ranks"] for f in step.report["factorised"]}
    assert got == expected
    assert step.report["output_rel_error"] < 1e-4


def test_energy_on_resnet18_keeps_each_layers_spectrum(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path, ["model=resnet18"])
    ref = copy.deepcopy(model.layer3[0].conv1.weight.detach())
    step = LowRankStep(energy=0.5, tucker_iters=0, exclude=["layer4", "layer1", "layer2"])
    step.prepare(model, ctx)
    names = {f["name"] for f in step.report["factorised"]}
    assert names and all(n.startswith("layer3.") for n in names)
    f = next(f for f in step.report["factorised"] if f["name"] == "layer3.0.conv1")
    s_in = _svals(ref.transpose(0, 1).reshape(ref.shape[1], -1))
    assert f["ranks"][0] == rank_for_energy(s_in, 0.5) < ref.shape[1]
    assert step.report["skipped_reasons"]["excluded by pattern"] > 0


@pytest.mark.parametrize(
    ("overrides", "linear_names"),
    [
        (["model=vim"], ["blocks.0.mixer.in_proj", "blocks.0.mixer.out_proj"]),
        (
            ["model=mobilevit", "model.input_size=28"],
            ["stages.2.1.transformer.0.attn.qkv", "stages.2.1.transformer.0.mlp.fc1"],
        ),
    ],
    ids=["vim", "mobilevit"],
)
def test_transformers_get_their_linears_factorised(tmp_path, overrides, linear_names) -> None:
    model, ctx = _setup(tmp_path, overrides)
    before = copy.deepcopy(model)
    step = LowRankStep(tucker_iters=0)
    step.prepare(model, ctx)
    _check_accounting(step, model, before, ctx)
    for name in linear_names:
        assert isinstance(model.get_submodule(name), LowRankLinear), name
    # a square Linear at rank 0.5 would not shrink: left alone, and said so
    if "mobilevit" in overrides[0]:
        assert isinstance(model.get_submodule("stages.2.1.transformer.0.attn.proj"), nn.Linear)
        assert step.report["skipped_reasons"]["no reduction at the chosen rank"] > 0
        assert isinstance(model.head.fc, nn.Linear)


def test_cp_on_mobilevit_convs(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path, ["model=mobilevit", "model.input_size=28"])
    before = copy.deepcopy(model)
    step = LowRankStep(conv="cp", linear=False, pointwise=False, min_params=0)
    step.prepare(model, ctx)
    _check_accounting(step, model, before, ctx)  # the CP MAC formula matches the counter
    cp = [f for f in step.report["factorised"] if f["method"] == "cp"]
    assert {f["name"] for f in cp} >= {"stages.2.1.conv_kxk.conv", "stages.4.1.conv_fusion.conv"}
    assert isinstance(model.get_submodule("stages.2.1.conv_kxk.conv"), CPConv2d)
    for f in cp:
        assert f["ranks"] == [max(1, round(min(f["shape"][:2]) / 2))]
        assert f["weight_rel_error"] < 1.0


# -- config and errors ---------------------------------------------------------------------------


def test_recipe_yaml_builds_the_step(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["compress=lowrank"])
    assert cfg.compress.name == "lowrank"
    (step,) = build_steps(OmegaConf.to_container(cfg.compress.steps, resolve=True))
    assert isinstance(step, LowRankStep) and step.kind == "lowrank"
    assert step.rank_ratio == 0.5 and step.energy is None and step.conv == "tucker"
    assert step.tucker_iters == 0 and step.min_params == 4096 and step.exclude == []
    assert step.epochs == 10 and step.lr is None and step.skip_head
    with pytest.raises(ConfigError, match="lowrank.*no_such"):
        build_steps([{"kind": "lowrank", "no_such": 1}])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank_ratio": 0}, "rank_ratio must be in"),
        ({"rank_ratio": 1.5}, "rank_ratio must be in"),
        ({"energy": 0.0}, "energy must be in"),
        ({"energy": 1.2}, "energy must be in"),
        ({"rank_ratio": 0.5, "energy": 0.9}, "both set"),
        ({"conv": "svd"}, "not a method"),
        ({"conv": "cp", "energy": 0.9}, "CP"),
        ({"linear": False, "pointwise": False, "conv": "none"}, "nothing to do"),
        ({"min_params": -1}, "min_params"),
        ({"rank_ratio": "half"}, "rank_ratio must be in"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=f"compress step lowrank: .*{match}"):
        LowRankStep(**kwargs)


def test_nothing_to_factorise_names_the_model(tmp_path: Path) -> None:
    model, ctx = _setup(tmp_path, ["model=litecnn"])
    with pytest.raises(ConfigError, match="lowrank.*'litecnn'.*excluded by pattern"):
        LowRankStep(exclude=["*"]).prepare(model, ctx)
