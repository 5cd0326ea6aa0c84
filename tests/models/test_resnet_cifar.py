"""The CIFAR-style ResNets (MONAI) are MedMNIST v2's "ResNet-18 (28)" / "ResNet-50 (28)".

``Official*`` below is a plain-PyTorch copy of the ``ResNet18``/``ResNet50`` classes of the
official ``MedMNIST/experiments`` ``MedMNIST2D/models.py`` (adapted there from
kuangliu/pytorch-cifar); it lives only here, as the reference the MONAI build must equal: the same
parameters and buffers in the same order with the same shapes, and the same logits once the
official weights are loaded into it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from medlite.efficiency import count_macs
from medlite.models import count_parameters, create_model, get_entry, list_models

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
MODELS = ("resnet18_cifar", "resnet50_cifar")


class OfficialBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class OfficialBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class OfficialResNet(nn.Module):
    def __init__(self, block, num_blocks, in_channels: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


OFFICIAL = {
    "resnet18_cifar": lambda c, k: OfficialResNet(OfficialBasicBlock, [2, 2, 2, 2], c, k),
    "resnet50_cifar": lambda c, k: OfficialResNet(OfficialBottleneck, [3, 4, 6, 3], c, k),
}


def _monai_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official names in MONAI's spelling: ``shortcut`` is ``downsample``, ``linear`` ``fc``."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"\.shortcut\.", ".downsample.", key)
        renamed[re.sub(r"^linear\.", "fc.", key)] = value
    return renamed


@pytest.mark.parametrize("num_classes", [2, 11])
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_same_architecture_as_the_official_models(name, in_chans, num_classes):
    torch.manual_seed(0)
    ours = create_model(name, num_classes, in_chans=in_chans, img_size=28)
    official = OFFICIAL[name](in_chans, num_classes)
    assert count_parameters(ours) == count_parameters(official)
    shapes = [tuple(p.shape) for p in ours.parameters()]
    assert shapes == [tuple(p.shape) for p in official.parameters()]
    # every parameter and buffer, by name (conv biases, shortcut form and order included)
    expected = {k: tuple(v.shape) for k, v in _monai_names(official.state_dict()).items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected

    # with the official weights (and non-trivial BN statistics), the same logits
    for module in official.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, std=0.1)
            module.running_mean.normal_(std=0.1)
            module.running_var.uniform_(0.5, 1.5)
    ours.load_state_dict(_monai_names(official.state_dict()), strict=True)
    x = torch.randn(2, in_chans, 28, 28)
    ours.eval(), official.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_small_input_stem_and_8x_downsampling(name):
    """3x3 stride-1 stem, no max-pool: layer1 works at 28x28 and layer4 at 4x4 (timm's 1x1)."""
    model = create_model(name, 2, in_chans=1, img_size=28)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert model.no_max_pool
    sides = {}

    def record(stage):
        def hook(_module, _inputs, out):
            sides[stage] = tuple(out.shape[-2:])

        return hook

    for stage in ("layer1", "layer4"):
        getattr(model, stage).register_forward_hook(record(stage))
    model.eval()(torch.zeros(1, 1, 28, 28))
    assert sides == {"layer1": (28, 28), "layer4": (4, 4)}
    shortcuts = [m.downsample for m in model.modules() if getattr(m, "downsample", None)]
    assert shortcuts and all(s[0].bias is None for s in shortcuts)


def test_registry_entries_and_configs():
    assert set(MODELS) <= set(list_models())
    for name in MODELS:
        entry = get_entry(name)
        assert (entry.paradigm, entry.task, entry.dims, entry.min_size) == (
            "cnn",
            "classification",
            2,
            28,
        )
        conf = yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text())
        assert conf["name"] == conf["arch"] == name
        assert (conf["paradigm"], conf["input_size"], conf["pretrained"]) == ("cnn", None, False)


@pytest.mark.parametrize("name", MODELS)
def test_config_states_its_parameters_and_macs(name):
    """The header's 'X M params, Y G MACs at 28 px' (1 channel, 2 classes) is right within 1%."""
    text = (CONF_DIR / f"{name}.yaml").read_text()
    found = re.search(r"([\d.]+) M params, ([\d.]+) G MACs at 28 px", text)
    assert found, f"conf/model/{name}.yaml does not state its size"
    kwargs = yaml.safe_load(text)["kwargs"]
    model = create_model(name, 2, in_chans=1, img_size=28, **kwargs)
    params, macs = count_parameters(model), count_macs(model, torch.zeros(1, 1, 28, 28))
    assert params == pytest.approx(float(found.group(1)) * 1e6, rel=0.01)
    assert macs == pytest.approx(float(found.group(2)) * 1e9, rel=0.01)


def test_widen_factor_scales_the_widths():
    model = create_model("resnet18_cifar", 2, in_chans=1, img_size=28, widen_factor=0.5)
    assert model.conv1.out_channels == 32 and model.fc.in_features == 256
    assert model.train()(torch.randn(2, 1, 28, 28)).shape == (2, 2)
