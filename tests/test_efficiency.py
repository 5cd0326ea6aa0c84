"""The efficiency profile counts what it claims to count."""

from __future__ import annotations

import torch
from torch import nn

from medlite.efficiency import add_macs, count_macs, profile_model, size_on_disk_mb
from medlite.models import create_model


def test_macs_of_conv_and_linear_match_the_formula() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(8 * 28 * 28, 2, bias=False),
    )
    expected = 8 * 9 * 28 * 28 + 8 * 28 * 28 * 2
    assert count_macs(model, torch.zeros(1, 1, 28, 28)) == expected


class _ScanLike(nn.Module):
    """Elementwise work that flop counters can't see, reported through add_macs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        add_macs(x.numel() * 3)
        return x * 2 + 1


def test_custom_op_macs_are_added_only_while_counting() -> None:
    m = _ScanLike()
    m(torch.zeros(10))  # outside counting: ignored
    assert count_macs(m, torch.zeros(1, 100)) == 300


def test_attention_is_counted_on_cpu() -> None:
    model = create_model("mobilevit_xxs", 2, 1, 64)
    with_attn = count_macs(model, torch.zeros(1, 1, 64, 64))
    assert any(getattr(m, "fused_attn", None) is True for m in model.modules()), (
        "fused path restored"
    )
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as naive:
        model(torch.zeros(1, 1, 64, 64))
    assert with_attn > naive.get_total_flops() // 2, (
        "fused SDPA counts 0 FLOPs; the profile must not"
    )


def test_profile_fields_are_consistent() -> None:
    model = create_model("litecnn", 2, 1, 28)
    prof = profile_model(model, (1, 28, 28), repeats=3, warmup=1, throughput_batch=4)
    n = sum(p.numel() for p in model.parameters())
    assert prof.params == n
    assert (
        abs(size_on_disk_mb(model) - n * 4 / 2**20) < 0.5
    )  # fp32 weights + BN buffers + pickle overhead
    assert prof.latency_p90_ms >= prof.latency_ms > 0 and prof.throughput_ips > 0
    assert model.training, "train mode restored"
    assert prof.implementations == {}  # no custom ops


def test_profile_records_which_scan_implementation_was_timed(monkeypatch) -> None:
    """A linear model's latency says whether the C kernel or the PyTorch scan produced it."""
    import importlib

    ss = importlib.import_module("medlite.models.ops.selective_scan")
    kernel_here = ss.native_kernel() is not None
    for name, op in (("vim", "selective_scan"), ("vrwkv", "wkv")):
        model = create_model(name, 2, 1, 28)
        prof = profile_model(model, (1, 28, 28), repeats=2, warmup=1, throughput_batch=2)
        assert prof.implementations == {op: "native" if kernel_here else "fast"}
        with monkeypatch.context() as m:
            m.setattr(ss, "native_kernel", lambda: None)
            prof = profile_model(model, (1, 28, 28), repeats=2, warmup=1, throughput_batch=2)
        assert prof.implementations == {op: "fast"}
    model(torch.zeros(1, 1, 28, 28))  # outside profiling: nothing is recorded, nothing breaks
