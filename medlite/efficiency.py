"""Efficiency profile of a model: the cost side of every accuracy-vs-cost comparison.

Parameters, MACs (``torch.utils.flop_counter`` for matmuls/convs/attention, plus what custom
ops report through :func:`add_macs`, since flop counters don't see a selective scan's
elementwise recurrences), size on disk, CPU latency at batch 1 (median and p90 after warm-up),
throughput at a larger batch, and peak extra resident memory of one forward pass.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

_extra = threading.local()


def add_macs(n: int) -> None:
    """Custom ops call this with the multiply-accumulates they perform (counted only while profiling)."""
    if getattr(_extra, "active", False):
        _extra.macs += int(n)


def note_implementation(op: str, implementation: str) -> None:
    """Custom ops call this with the implementation they ran (recorded only while timing), so a
    profile says whether its latency came from, e.g., the C scan kernel or its PyTorch
    fallback: the two differ 2x, and which one runs depends on the machine."""
    seen = getattr(_extra, "implementations", None)
    if seen is not None:
        seen.setdefault(op, set()).add(implementation)


@contextlib.contextmanager
def recording_implementations() -> Iterator[dict[str, set[str]]]:
    """Within the block, the custom ops that ran and their implementations (op -> names)."""
    _extra.implementations = seen = {}
    try:
        yield seen
    finally:
        _extra.implementations = None


@contextlib.contextmanager
def _counting_extra() -> Iterator[list[int]]:
    _extra.active, _extra.macs = True, 0
    box = [0]
    try:
        yield box
    finally:
        box[0] = _extra.macs
        _extra.active = False


@contextlib.contextmanager
def _unfused_attention(model: nn.Module) -> Iterator[None]:
    """Flop counters see 0 FLOPs in fused CPU attention: use timm's explicit path while counting."""
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in switched:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in switched:
            m.fused_attn = True


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the number every table reports)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (batch included)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), _unfused_attention(model), _counting_extra() as extra, counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops() // 2 + extra[0]


def size_on_disk_mb(model: nn.Module) -> float:
    """Bytes of the serialised state_dict (what a checkpoint of the weights costs)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 2**20


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_forward_memory_mb(model: nn.Module, example: torch.Tensor) -> float | None:
    """Peak resident memory added by one forward pass (Linux: resets VmHWM first); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
    except OSError:
        return None
    before = _rss_kb("VmRSS")
    with torch.inference_mode():
        model(example)
    peak = _rss_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024


def _time_ms(model: nn.Module, example: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(example)
        for _ in range(repeats):
            start = time.perf_counter()
            model(example)
            times.append((time.perf_counter() - start) * 1000)
    return times


def interleaved_latency_ms(
    models: dict[str, nn.Module],
    example: torch.Tensor,
    *,
    warmup: int = 5,
    repeats: int = 30,
    rounds: int = 5,
) -> dict[str, list[float]]:
    """Batch-1 latencies of several models measured in turns (``rounds`` passes over all of
    them, ``repeats / rounds`` timings each time), so a burst of load elsewhere on the machine
    slows every model alike instead of whichever happened to be running: their ratios stay
    fair on a shared machine."""
    times: dict[str, list[float]] = {name: [] for name in models}
    per_round = max(1, -(-repeats // max(1, rounds)))
    for m in models.values():
        m.eval()
        _time_ms(m, example, warmup, 0)
    for _ in range(max(1, rounds)):
        for name, m in models.items():
            times[name] += _time_ms(m, example, 0, per_round)
    return times


@dataclass
class EfficiencyProfile:
    params: int
    macs: int
    size_mb: float
    input_shape: list[int]
    threads: int
    latency_ms: float  # batch 1, median
    latency_p90_ms: float
    throughput_batch: int
    throughput_ips: float  # images per second at throughput_batch
    peak_memory_mb: float | None  # extra RSS of one batch-1 forward (Linux)
    # custom ops' implementations during the timing, e.g. {"selective_scan": "native"}
    implementations: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def profile_settings(profile_cfg) -> dict:
    """``cfg.profile`` -> keyword arguments of :func:`profile_model` (without the on/off switch)."""
    return {k: v for k, v in profile_cfg.items() if k != "enabled"}


def profile_model(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    repeats: int = 30,
    warmup: int = 5,
    throughput_batch: int = 64,
    threads: int | None = None,
    latencies: list[float] | None = None,
) -> EfficiencyProfile:
    """Measure ``model`` on CPU for inputs of shape (C, H, W); restores train mode and threads.

    A model that torch can't inspect (an ONNX Runtime int8 session wrapped as a module) carries a
    ``profile_overrides`` dict with what it knows itself: ``params``, ``macs``, ``size_mb``.
    ``latencies``: batch-1 timings (ms) already taken, e.g. in turns with other runtimes by
    :func:`interleaved_latency_ms`, used instead of timing again.
    """
    known = dict(getattr(model, "profile_overrides", None) or {})
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    try:
        one = torch.randn(1, *input_shape)
        memory = peak_forward_memory_mb(model, one)  # first, before caches are warm
        macs = known["macs"] if "macs" in known else count_macs(model, one)
        with recording_implementations() as seen:
            lat = sorted(latencies or _time_ms(model, one, warmup, repeats))
            batch = torch.randn(throughput_batch, *input_shape)
            t_batch = _time_ms(model, batch, 1, max(3, repeats // 10))
        return EfficiencyProfile(
            params=known.get("params", count_parameters(model)),
            macs=macs,
            size_mb=round(known.get("size_mb", size_on_disk_mb(model)), 4),
            input_shape=list(input_shape),
            threads=torch.get_num_threads(),
            latency_ms=round(statistics.median(lat), 4),
            latency_p90_ms=round(lat[min(len(lat) - 1, int(0.9 * len(lat)))], 4),
            throughput_batch=throughput_batch,
            throughput_ips=round(throughput_batch / (statistics.median(t_batch) / 1000), 2),
            peak_memory_mb=None if memory is None else round(memory, 3),
            implementations={op: "+".join(sorted(names)) for op, names in seen.items()},
        )
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
