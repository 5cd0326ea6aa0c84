"""medlite's C scan kernel: its exp, every vector width against the reference, determinism across
thread counts, dispatch, and what happens where it cannot be built or disagrees."""

from __future__ import annotations

import importlib
import logging
import subprocess

import pytest
import torch

from medlite.models import create_model
from medlite.models.ops import native, selective_scan, selective_scan_ref

ss_module = importlib.import_module("medlite.models.ops.selective_scan")


def _reset_kernel_caches() -> None:
    native._load_once.cache_clear()
    ss_module.native_kernel.cache_clear()


@pytest.fixture
def kernel(native_kernel):
    return native_kernel


@pytest.fixture
def fresh_kernel(monkeypatch):
    """A kernel lookup that starts over, and is started over again after the test (with the
    environment restored), so no other test sees what this one changed."""
    _reset_kernel_caches()
    yield monkeypatch
    monkeypatch.undo()
    _reset_kernel_caches()


def _inputs(batch, dim, n, length, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g),
        "A": -torch.exp(torch.randn(dim, n, generator=g)),
        "B": torch.randn(batch, groups, n, length, generator=g),
        "C": torch.randn(batch, groups, n, length, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.randn(dim, generator=g) * 0.3,
    }


def _out_and_grads(inputs, **kw):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, **kw)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y * weight).sum(), list(leaves.values()))
    return y, last, grads


def _ref(inputs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, last = selective_scan_ref(**leaves, delta_softplus=True, return_last_state=True)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y * weight).sum(), list(leaves.values()))
    return y, last, grads


def _max_err(a, b):
    return (a - b).abs().max().item()


def test_exp_is_accurate_and_safe(kernel):
    x = torch.linspace(-87.0, 88.0, 1_000_001)
    exact = torch.exp(x.double())
    rel = ((kernel.exp(x).double() - exact) / exact).abs().max().item()
    assert rel <= 3e-7
    edge = kernel.exp(torch.tensor([0.0, -1e-30, -87.5, -1e4, float("-inf"), float("nan")]))
    assert edge[:2].tolist() == [1.0, 1.0]
    assert edge[2:5].tolist() == [0.0, 0.0, 0.0]  # exp < 1.6e-38: flushed to 0
    assert torch.isnan(edge[5])


@pytest.mark.parametrize(
    "dim, groups, lanes",
    [(48, 3, 16), (96, 2, 16), (24, 3, 8), (12, 3, 4), (15, 3, 1)],
    ids=["16-wide", "16-wide-3-per-group", "8-wide", "4-wide", "scalar"],
)
@pytest.mark.parametrize("n", [1, 16, 64])
def test_every_vector_width_matches_reference(kernel, dim, groups, lanes, n):
    assert native.pick_lanes(dim // groups) == lanes
    inputs = _inputs(2, dim, n, 53, groups, seed=n)
    y_ref, last_ref, g_ref = _ref(inputs)
    y, last, grads = _out_and_grads(inputs, backend="native")
    assert _max_err(y, y_ref) <= 1e-4 and _max_err(last, last_ref) <= 1e-4
    for name, a, b in zip(inputs, grads, g_ref, strict=True):
        assert _max_err(a, b) <= 1e-4 * max(1.0, b.abs().max().item()), name


def test_results_do_not_depend_on_the_thread_count(kernel):
    """Each channel's recurrence runs in one thread, in order, and the sums across channels are
    taken after the kernel: outputs and gradients are bit-identical for 1 or 2 threads."""
    inputs = _inputs(2, 64, 16, 300, 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _out_and_grads(inputs, backend="native")
        torch.set_num_threads(2)
        two = _out_and_grads(inputs, backend="native")
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one[:2] + one[2], two[:2] + two[2], strict=True))


def test_auto_runs_the_kernel_on_cpu_and_fast_does_not(kernel, monkeypatch):
    calls = []
    for method in ("forward", "backward"):
        original = getattr(native.ScanKernel, method)

        def counting(self, *args, _original=original, _name=method, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(native.ScanKernel, method, counting)
    inputs = _inputs(1, 8, 4, 20, 1)
    y_ref, _, g_ref = _ref(inputs)
    y_auto, _, g_auto = _out_and_grads(inputs)
    assert calls == ["forward", "backward"]
    y_fast, _, g_fast = _out_and_grads(inputs, backend="fast")
    assert calls == ["forward", "backward"]
    for y, grads in ((y_auto, g_auto), (y_fast, g_fast)):
        assert _max_err(y, y_ref) <= 1e-4
        assert all(_max_err(a, b) <= 1e-4 for a, b in zip(grads, g_ref, strict=True))


def test_state_beyond_the_kernel_falls_back_or_raises(kernel):
    inputs = _inputs(1, 4, native.MAX_STATE + 1, 9, 1)
    with torch.no_grad():
        expected = selective_scan_ref(**inputs, delta_softplus=True)
        assert _max_err(selective_scan(**inputs, delta_softplus=True), expected) <= 1e-4
        with pytest.raises(ss_module.NativeKernelUnavailable, match="N <= 64"):
            selective_scan(**inputs, delta_softplus=True, backend="native")


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"MEDLITE_NATIVE": "0"}, "switched off by MEDLITE_NATIVE=0"),
        ({"CC": "/nonexistent/cc"}, "no C compiler found"),
        ({"CC": "false"}, "did not compile"),  # a 'compiler' that always fails
    ],
    ids=["switched-off", "no-compiler", "failing-compiler"],
)
def test_without_the_kernel_everything_still_works(fresh_kernel, env, reason):
    for key, value in env.items():
        fresh_kernel.setenv(key, value)
    assert native.load() is None
    assert reason in native.status()
    inputs = _inputs(2, 8, 4, 30, 2)
    with torch.no_grad():
        expected = selective_scan_ref(**inputs, delta_softplus=True)
        assert _max_err(selective_scan(**inputs, delta_softplus=True), expected) <= 1e-4
        with pytest.raises(ss_module.NativeKernelUnavailable, match=reason):
            selective_scan(**inputs, delta_softplus=True, backend="native")


def test_first_use_inside_inference_mode(kernel, fresh_kernel):
    """Lightning validates under inference_mode before training: the self-check (which needs
    autograd) must still run there, and the kernel be used."""
    inputs = _inputs(1, 16, 4, 30, 1)
    with torch.inference_mode():
        assert ss_module.native_kernel() is not None
        y = selective_scan(**inputs, delta_softplus=True, backend="native")
    assert _max_err(y, selective_scan_ref(**inputs, delta_softplus=True)) <= 1e-4


def test_cache_is_reused_and_keyed_by_cpu(kernel, fresh_kernel, tmp_path):
    fresh_kernel.setenv("MEDLITE_CACHE_DIR", str(tmp_path))
    builds = []
    run = subprocess.run

    def spy(cmd, *args, **kwargs):
        if "-shared" in cmd:
            builds.append(cmd)
        return run(cmd, *args, **kwargs)

    fresh_kernel.setattr(native.subprocess, "run", spy)
    first = native.load()
    assert first.path.parent == tmp_path / "kernels" and len(builds) == 1
    _reset_kernel_caches()
    assert native.load().path == first.path and len(builds) == 1  # from the cache
    _reset_kernel_caches()
    fresh_kernel.setattr(native, "_cpu_identity", lambda: "some other CPU")
    other = native.load()
    assert other.path != first.path and len(builds) == 2
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == sorted(
        [first.path.name, other.path.name]
    )  # no temporary files left


def test_a_kernel_that_disagrees_with_the_reference_is_not_used(kernel, fresh_kernel, caplog):
    original = native.ScanKernel.forward

    def off_by_one_percent(self, *args, **kwargs):
        y, starts, last = original(self, *args, **kwargs)
        return y * 1.01, starts, last

    fresh_kernel.setattr(native.ScanKernel, "forward", off_by_one_percent)
    with caplog.at_level(logging.WARNING, logger=ss_module.__name__):
        assert ss_module.native_kernel() is None
    assert "disagrees with the reference" in caplog.text
    inputs = _inputs(1, 8, 4, 30, 1)
    with torch.no_grad():  # auto quietly runs the PyTorch scan instead
        expected = selective_scan_ref(**inputs, delta_softplus=True)
        assert _max_err(selective_scan(**inputs, delta_softplus=True), expected) <= 1e-4


@pytest.mark.parametrize("name", ["vim", "vmamba", "vrwkv"])
def test_models_give_the_same_logits_with_and_without_the_kernel(kernel, name, monkeypatch):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1, img_size=28).eval()
    x = torch.randn(2, 1, 28, 28)
    calls = []
    original = native.ScanKernel.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(native.ScanKernel, "forward", counting)
    with torch.no_grad():
        with_kernel = model(x)
        assert calls, "the model did not run the C kernel"
        monkeypatch.setattr(ss_module, "native_kernel", lambda: None)
        without = model(x)
    assert _max_err(with_kernel, without) <= 1e-4 * max(1.0, without.abs().max().item())


def test_unwritable_cache_builds_in_a_temporary_folder(kernel, fresh_kernel, tmp_path):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")  # mkdir fails, even as root
    fresh_kernel.setenv("MEDLITE_CACHE_DIR", str(blocked))
    built = native.load()
    assert built is not None and not built.path.is_relative_to(blocked)
    inputs = _inputs(1, 16, 4, 30, 1)
    with torch.no_grad():
        expected = selective_scan_ref(**inputs, delta_softplus=True)
        assert _max_err(selective_scan(**inputs, delta_softplus=True), expected) <= 1e-4
