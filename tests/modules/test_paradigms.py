"""The LightningModules: paradigm lookup, weight-decay groups, warm-up defaults, the learning-rate
schedule, fp32 islands under autocast, extra loss terms and epoch metrics, all without a Trainer."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medlite.compress.base import LossTerm
from medlite.errors import ConfigError
from medlite.modules import (
    CNNModule,
    LinearComplexityModule,
    MedliteModule,
    TransformerModule,
    module_class,
)
from medlite.modules.base import lr_factor
from medlite.tasks import BINARY, MULTICLASS, MULTILABEL, ClassificationTask, Task
from medlite.tasks.classification_metrics import compute_metrics
from tests.helpers import make_cfg

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# the composed default (adamw's lr interpolates the model's recommendation)
ADAMW = OmegaConf.to_container(make_cfg(Path("unused"), ["optim=adamw"]).optim, resolve=True)
BINARY_TASK = ClassificationTask(BINARY, ("neg", "pos"))


def _conf(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))


def _module(
    cls: type[MedliteModule], model: nn.Module, task: Task = BINARY_TASK, **kwargs
) -> MedliteModule:
    module = cls(model, task, optim=ADAMW, **kwargs)
    module.log = lambda *args, **kw: None  # no Trainer attached: Lightning's log() would only warn
    return module


# --------------------------------------------------------------------------- paradigm lookup


def test_module_class_lookup():
    assert module_class("cnn") is CNNModule
    assert module_class("transformer") is TransformerModule
    assert module_class("linear") is LinearComplexityModule
    for cls in (CNNModule, TransformerModule, LinearComplexityModule):
        assert issubclass(cls, MedliteModule)
    assert {module_class(p).paradigm for p in ("cnn", "transformer", "linear")} == {
        "cnn",
        "transformer",
        "linear",
    }


@pytest.mark.parametrize("name", ["mamba", "CNN", "", "base"])
def test_module_class_unknown(name):
    with pytest.raises(ConfigError, match="model.paradigm"):
        module_class(name)


# --------------------------------------------------------------------------- parameter groups


class _SSM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(8, 4))
        self.D = nn.Parameter(torch.ones(8))
        self.in_proj = nn.Linear(8, 8)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.ssm = _SSM()
        self.proj = nn.Parameter(torch.randn(8, 8))
        self.frozen = nn.Parameter(torch.randn(8, 8), requires_grad=False)


ONE_D = {"bn.weight", "bn.bias", "ssm.D", "ssm.in_proj.bias"}
EXPECTED_NO_DECAY = {
    CNNModule: ONE_D,
    TransformerModule: ONE_D | {"pos_embed"},
    LinearComplexityModule: ONE_D | {"pos_embed", "ssm.A_log"},
}
ALL_TRAINABLE = ONE_D | {"conv.weight", "pos_embed", "ssm.A_log", "ssm.in_proj.weight", "proj"}


def _names(model: nn.Module, params: list) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("cls", list(EXPECTED_NO_DECAY))
def test_param_groups(cls):
    model = _Toy()
    groups = _module(cls, model).param_groups()
    assert len(groups) == 2
    decay, no_decay = (_names(model, g["params"]) for g in groups)
    assert no_decay == EXPECTED_NO_DECAY[cls]
    assert decay == ALL_TRAINABLE - EXPECTED_NO_DECAY[cls]
    assert "frozen" not in decay | no_decay  # parameters that do not train are left out
    assert groups[0]["weight_decay"] == ADAMW["weight_decay"] == 0.05
    assert groups[1]["weight_decay"] == 0.0


def test_pos_embed_2d_is_also_excluded_by_name():
    model = nn.Module()
    model.pos_embed = nn.Parameter(torch.zeros(16, 8))
    model.weight = nn.Parameter(torch.zeros(8, 8))
    for cls, excluded in (
        (CNNModule, set()),
        (TransformerModule, {"pos_embed"}),
        (LinearComplexityModule, {"pos_embed"}),
    ):
        _, no_decay = _module(cls, model).param_groups()
        assert _names(model, no_decay["params"]) == excluded


def test_no_decay_names_match_whole_name_parts_only():
    model = nn.Module()
    model.A_log_gate = nn.Parameter(torch.zeros(4, 4))  # not an SSM A_log: a different name
    model.sub = nn.Module()
    model.sub.A_log = nn.Parameter(torch.zeros(4, 4))
    _, no_decay = _module(LinearComplexityModule, model).param_groups()
    assert _names(model, no_decay["params"]) == {"sub.A_log"}


@pytest.mark.parametrize("cls", list(EXPECTED_NO_DECAY))
def test_configure_optimizers(cls):
    model = _Toy()
    module = _module(cls, model, scheduler=_conf("scheduler", "cosine"))
    module.trainer = SimpleNamespace(estimated_stepping_batches=200)
    out = module.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    assert out["lr_scheduler"]["interval"] == "step"
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert _names(model, no_decay["params"]) == EXPECTED_NO_DECAY[cls]
    assert tuple(decay["betas"]) == (0.9, 0.999)
    # the scheduler starts at the first warm-up step: lr * 1 / warmup_steps
    warmup_steps = round(cls.default_warmup * 200)
    assert decay["lr"] == pytest.approx(ADAMW["lr"] / warmup_steps)
    assert decay["initial_lr"] == ADAMW["lr"]
    for _ in range(warmup_steps - 1):
        opt.step()
        sched["scheduler"].step()
    assert decay["lr"] == pytest.approx(ADAMW["lr"])  # end of warm-up: full lr
    for _ in range(200 - warmup_steps + 1):
        opt.step()
        sched["scheduler"].step()
    # the end of training: min_lr_ratio (0.01 in conf/scheduler/cosine.yaml) of the base lr
    assert decay["lr"] == pytest.approx(ADAMW["lr"] * 0.01)


# --------------------------------------------------------------------------- warm-up defaults


@pytest.mark.parametrize("cls", [CNNModule, TransformerModule, LinearComplexityModule])
def test_warmup_fraction(cls):
    model = nn.Linear(2, 2)
    assert (
        _module(cls, model, scheduler={"name": "cosine", "warmup": None}).warmup_fraction()
        == cls.default_warmup
    )
    assert _module(cls, model, scheduler={"name": "cosine"}).warmup_fraction() == cls.default_warmup
    assert _module(cls, model).warmup_fraction() == cls.default_warmup  # no scheduler config at all
    assert (
        _module(cls, model, scheduler={"name": "cosine", "warmup": 0.25}).warmup_fraction() == 0.25
    )
    assert _module(cls, model, scheduler={"name": "cosine", "warmup": 0}).warmup_fraction() == 0.0
    assert 0 < cls.default_warmup < 0.5


def test_cnn_warms_up_less_than_attention_models():
    assert CNNModule.default_warmup < TransformerModule.default_warmup
    assert CNNModule.default_warmup < LinearComplexityModule.default_warmup
    # the shipped cosine config defers to these defaults
    assert _conf("scheduler", "cosine")["warmup"] is None


# --------------------------------------------------------------------------- lr schedule


def test_cosine_schedule():
    total, min_ratio = 100, 0.05
    f = lr_factor({"name": "cosine", "min_lr_ratio": min_ratio}, total, warmup=0.1)
    ramp = [f(s) for s in range(10)]
    assert ramp == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up ...
    assert np.allclose(np.diff(ramp), 0.1)
    assert ramp[-1] == pytest.approx(1.0)  # ... reaching 1 on its last step
    assert f(10) == pytest.approx(1.0)  # decay starts from the full learning rate
    decay = [f(s) for s in range(10, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))  # strictly decreasing
    assert f(total) == pytest.approx(min_ratio)
    # halfway through the decay: the cosine midpoint
    assert f(10 + 45) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)
    assert f(total + 50) == pytest.approx(min_ratio)  # never below min_lr_ratio past the end
    assert all(min_ratio - 1e-12 <= v <= 1.0 for v in ramp + decay)


def test_cosine_without_warmup_starts_at_one():
    f = lr_factor({"name": "cosine"}, 50, warmup=0.0)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.0)  # min_lr_ratio defaults to 0


def test_multistep_schedule():
    cfg = _conf("scheduler", "multistep")  # milestones [0.5, 0.75], gamma 0.1, warmup 0
    f = lr_factor(cfg, 200, warmup=cfg["warmup"])
    assert [f(s) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert f(100) == pytest.approx(0.1) and f(149) == pytest.approx(0.1)
    assert f(150) == pytest.approx(0.01) and f(199) == pytest.approx(0.01)


def test_multistep_with_warmup_and_custom_gamma():
    f = lr_factor({"name": "multistep", "milestones": [0.5], "gamma": 0.5}, 40, warmup=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(19) == 1.0 and f(20) == pytest.approx(0.5) and f(39) == pytest.approx(0.5)


def test_none_schedule():
    f = lr_factor({"name": "none"}, 100, warmup=0.05)
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(f(s) == 1.0 for s in range(5, 150))
    g = lr_factor(_conf("scheduler", "none"), 100, warmup=0.0)
    assert all(g(s) == 1.0 for s in range(0, 101))


def test_schedule_factor_is_picklable_and_unknown_name_rejected():
    import pickle

    f = lr_factor({"name": "cosine", "min_lr_ratio": 0.1}, 30, warmup=0.1)
    g = pickle.loads(pickle.dumps(f))
    assert [g(s) for s in range(31)] == [f(s) for s in range(31)]
    with pytest.raises(ConfigError, match="scheduler.name"):
        lr_factor({"name": "linear"}, 10, warmup=0.0)


# --------------------------------------------------------------------------- fp32 islands


class _Recorder(nn.Module):
    """A stand-in for a recurrent scan: records the dtype of what it receives."""

    def __init__(self, island: bool) -> None:
        super().__init__()
        self.fp32_island = island
        self.inner = nn.Linear(8, 8)
        self.seen_in: list[torch.dtype] = []
        self.seen_inner: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_in.append(x.dtype)
        out = self.inner(x)
        self.seen_inner.append(out.dtype)
        return out


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.island = _Recorder(island=True)
        self.plain = _Recorder(island=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pre_dtype = self.pre(x).dtype
        return self.head(self.plain(self.island(self.pre(x))))


def test_fp32_island_under_bf16_autocast():
    net = _Net()
    module = _module(LinearComplexityModule, net)
    x = torch.randn(3, 8)

    # before on_fit_start nothing is wrapped: the island sees bf16 like everything else
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(x)
    assert net.island.seen_in == [torch.bfloat16] and net.island.seen_inner == [torch.bfloat16]

    module.on_fit_start()
    module.on_fit_start()  # idempotent: wrapping twice would be harmless but is skipped
    assert net.island._medlite_fp32 is True and not hasattr(net.plain, "_medlite_fp32")
    for seen in (
        net.island.seen_in,
        net.island.seen_inner,
        net.plain.seen_in,
        net.plain.seen_inner,
    ):
        seen.clear()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert net.pre_dtype == torch.bfloat16  # the unmarked Linear runs in bf16
    assert net.island.seen_in == [torch.float32]  # the island gets fp32 inputs ...
    assert net.island.seen_inner == [torch.float32]  # ... and autocast is off inside it
    assert net.plain.seen_in == [torch.bfloat16]  # its output is handed back in the caller's dtype
    assert net.plain.seen_inner == [torch.bfloat16]  # an unmarked module still runs in bf16
    assert out.dtype == torch.bfloat16

    # outside autocast the wrapper is transparent
    net.island.seen_in.clear()
    with torch.no_grad():
        ref = module(x)
    assert net.island.seen_in == [torch.float32] and ref.dtype == torch.float32


def test_fp32_island_survives_deepcopy():
    """A copied model (EMA, export, int8 conversion) must run its *own* island weights in fp32."""
    net = _Net()
    _module(LinearComplexityModule, net).on_fit_start()
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.island.inner.weight.zero_()
        twin.island.inner.bias.zero_()
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.count_nonzero(twin.island(x)) == 0  # the copy's weights, not the original's
        assert torch.count_nonzero(net.island(x)) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        twin(x)
    assert twin.island.seen_in[-1] == torch.float32 and twin.plain.seen_in[-1] == torch.bfloat16
    assert twin.island._medlite_fp32 is True


# --------------------------------------------------------------------------- loss terms and metrics


class _LogitPenalty(LossTerm):
    name = "penalty"

    def forward(self, module, x, logits, targets):
        return 0.5 * logits.pow(2).mean()


def test_loss_term_added_to_training_loss():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    task = ClassificationTask(MULTICLASS, ("a", "b", "c"))
    module = _module(CNNModule, model, task=task, loss_terms=[_LogitPenalty()], label_smoothing=0.1)
    logged = {}

    def log(name, value, **kw):
        logged[name] = float(torch.as_tensor(value).detach())

    module.log = log
    x, y = torch.randn(5, 6), torch.tensor([[0], [1], [2], [1], [0]])

    loss = module.training_step((x, y), 0)

    logits = model(x)
    task_loss = torch.nn.functional.cross_entropy(logits, y.flatten(), label_smoothing=0.1)
    penalty = 0.5 * (logits**2).mean()
    assert penalty > 0.01  # the term is not negligible, so the sum below really checks it
    assert loss.item() == pytest.approx((task_loss + penalty).item(), rel=1e-6)
    assert logged["train/loss_penalty"] == pytest.approx(penalty.item(), rel=1e-6)
    assert logged["train/loss"] == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert model.weight.grad is not None

    plain = _module(CNNModule, model, task=task, label_smoothing=0.1)
    assert plain.training_step((x, y), 0).item() == pytest.approx(task_loss.item(), rel=1e-6)


def test_multilabel_training_loss():
    model = nn.Linear(4, 3)
    task = ClassificationTask(MULTILABEL, ("p", "q", "r"))
    module = _module(CNNModule, model, task=task)
    x, y = torch.randn(4, 4), torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]])
    want = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y.float())
    assert module.training_step((x, y), 0).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("task", "make_y"),
    [
        (BINARY_TASK, lambda g, n: torch.randint(0, 2, (n, 1), generator=g)),
        (
            ClassificationTask(MULTICLASS, ("a", "b", "c")),
            lambda g, n: torch.randint(0, 3, (n, 1), generator=g),
        ),
        (
            ClassificationTask(MULTILABEL, ("a", "b", "c")),
            lambda g, n: torch.randint(0, 2, (n, 3), generator=g),
        ),
    ],
    ids=["binary", "multiclass", "multilabel"],
)
def test_validation_metrics_match_compute_metrics(task, make_y):
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(5, task.num_outputs)
    module = _module(CNNModule, model, task=task)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    batches = [(torch.randn(n, 5, generator=g), make_y(g, n)) for n in (16, 9)]

    module.eval()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            module.validation_step(batch, i)
        module.on_validation_epoch_end()

        y = torch.cat([b[1] for b in batches]).numpy()
        logits = model(torch.cat([b[0] for b in batches]))
    scores = (torch.sigmoid(logits) if task.multilabel else torch.softmax(logits, -1)).numpy()
    want = compute_metrics(y, scores, task.type)

    got = module.metrics["val"]
    assert set(got) == set(want)
    assert got["auc"] == pytest.approx(want["auc"], rel=1e-6)
    assert 0.0 <= got["auc"] <= 1.0 and not math.isnan(got["auc"])
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-6, nan_ok=True)
        assert f"val/{name}" in logged
    assert "val/loss" in logged
    assert module._scores["val"] == []  # buffers are cleared for the next epoch
    assert "test" not in module.metrics

    module.on_validation_epoch_end()  # an epoch with no batches leaves the last metrics alone
    assert module.metrics["val"] == got


def test_test_metrics_are_kept_apart_from_val():
    model = nn.Linear(3, 2)
    module = _module(CNNModule, model)
    x, y = torch.randn(8, 3), torch.tensor([[0], [1]] * 4)
    with torch.no_grad():
        module.test_step((x, y), 0)
        module.on_test_epoch_end()
        scores = torch.softmax(model(x), -1).numpy()
    assert "val" not in module.metrics
    assert module.metrics["test"]["auc"] == pytest.approx(
        compute_metrics(y.numpy(), scores, BINARY)["auc"]
    )
