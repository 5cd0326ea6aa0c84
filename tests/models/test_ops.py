"""medlite.models.ops: the fast selective scan and Bi-WKV (PyTorch and C forward) against their
sequential / O(T^2) references (outputs and gradients), stability, dtypes, backend dispatch and
lazy mamba_ssm."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from medlite.models.ops import (
    mamba_ssm_available,
    selective_scan,
    selective_scan_ref,
    wkv_bidirectional,
    wkv_bidirectional_ref,
)

# The module, not the function of the same name that the package re-exports.
ss_module = importlib.import_module("medlite.models.ops.selective_scan")

TOL = 1e-4


@pytest.fixture(params=["fast", "native"])
def fast_backend(request):
    """Both fast paths: PyTorch, and the C forward (skipped where it cannot be built)."""
    if request.param == "native":
        request.getfixturevalue("native_kernel")  # skips where it cannot be built
    return request.param


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _scan_inputs(b, d, n, length, bc="var", groups=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if bc == "var":
        B, C = rnd(b, n, length), rnd(b, n, length)
    elif bc == "group":
        B, C = rnd(b, groups, n, length), rnd(b, groups, n, length)
    elif bc == "mixed":  # time-invariant B, per-step C
        B, C = rnd(d, n), rnd(b, n, length)
    else:
        B, C = rnd(d, n), rnd(d, n)
    return {
        "u": rnd(b, d, length),
        "delta": rnd(b, d, length, scale=0.5),
        "A": -torch.exp(rnd(d, n, scale=0.5)).to(dtype),
        "B": B,
        "C": C,
        "D": rnd(d),
        "z": rnd(b, d, length),
        "delta_bias": rnd(d, scale=0.3),
    }


def _run_scan(fn, inputs, opts, **kw):
    """Output and gradients of a fixed random projection of the output, for one backend."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    args = {k: leaves[k] for k in ("u", "delta", "A", "B", "C")}
    for name in ("D", "z", "delta_bias"):
        if opts.get(name):
            args[name] = leaves[name]
    y = fn(**args, delta_softplus=opts.get("softplus", False), **kw)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) / y.numel() ** 0.5
    weight = weight.to(y.device)  # the same projection on CPU and CUDA
    used = [leaves[k] for k in args]
    grads = torch.autograd.grad((y.float() * weight).sum(), used)
    return y, dict(zip(args, grads, strict=True))


def _assert_scan_close(inputs, opts, tol=TOL, backend="fast", **kw):
    y_ref, g_ref = _run_scan(selective_scan_ref, inputs, opts)
    y_fast, g_fast = _run_scan(selective_scan, inputs, opts, backend=backend, **kw)
    assert y_fast.shape == y_ref.shape
    assert _max_err(y_fast, y_ref) <= tol
    for name in g_ref:
        assert _max_err(g_fast[name], g_ref[name]) <= tol, name


ALL_OPTS = {"D": True, "z": True, "delta_bias": True, "softplus": True}


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 127, 200])
@pytest.mark.parametrize("bc", ["var", "group", "invariant", "mixed"])
def test_fast_scan_matches_ref_all_options(length, bc, fast_backend):
    _assert_scan_close(_scan_inputs(2, 4, 3, length, bc), ALL_OPTS, backend=fast_backend)


@pytest.mark.parametrize(
    "opts",
    [{}, {"D": True}, {"z": True}, {"delta_bias": True}, {"softplus": True}, {"D": 1, "z": 1}],
    ids=["plain", "D", "z", "bias", "softplus", "D+z"],
)
@pytest.mark.parametrize("length", [13, 97])
def test_fast_scan_matches_ref_option_subsets(opts, length, fast_backend):
    inputs = _scan_inputs(2, 4, 3, length, "var", seed=length)
    if not opts.get("softplus"):  # keep delta >= 0 as Mamba's discretisation assumes
        inputs["delta"] = inputs["delta"].abs()
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    _assert_scan_close(inputs, opts, backend=fast_backend)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64])
@pytest.mark.parametrize("block_elements", [1, 100, 1 << 20])
def test_fast_scan_chunking_and_blocks(chunk_size, block_elements, monkeypatch, fast_backend):
    """Many blocks (each carrying its state into the next) and any chunk length agree. With
    the C forward, the gradients check the block start states it hands to the backward."""
    monkeypatch.setattr(ss_module, "_BLOCK_ELEMENTS", block_elements)
    inputs = _scan_inputs(2, 4, 3, 131, "group")
    _assert_scan_close(inputs, ALL_OPTS, chunk_size=chunk_size, backend=fast_backend)


def test_last_state_matches_ref(fast_backend):
    inputs = _scan_inputs(2, 4, 3, 45, "var")
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    y_ref, h_ref = selective_scan_ref(*args, delta_softplus=True, return_last_state=True)
    y, h = selective_scan(*args, delta_softplus=True, return_last_state=True, backend=fast_backend)
    assert h.shape == (2, 4, 3)
    assert _max_err(y, y_ref) <= TOL and _max_err(h, h_ref) <= TOL


def test_bf16_in_bf16_out_computed_in_fp32(fast_backend):
    inputs = _scan_inputs(2, 4, 3, 50, "var", dtype=torch.bfloat16)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y = selective_scan(*args, True, backend=fast_backend)
    assert y.dtype == torch.bfloat16
    y_ref32 = selective_scan_ref(*[a.float() for a in args], True)
    y_fast32 = selective_scan(*[a.float() for a in args], True, backend=fast_backend)
    assert torch.equal(y, y_fast32.to(torch.bfloat16))  # same fp32 computation, cast at the end
    assert _max_err(y_fast32, y_ref32) <= TOL
    assert _max_err(y, y_ref32) <= 1e-2 * max(1.0, y_ref32.abs().max().item())
    assert selective_scan_ref(*args, True).dtype == torch.bfloat16


def test_autocast_does_not_lower_the_scan_precision(fast_backend):
    inputs = _scan_inputs(2, 4, 3, 40, "var")
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    expected = selective_scan_ref(*args, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(*args, True, backend=fast_backend)
    assert y.dtype == torch.float32 and _max_err(y, expected) <= TOL


def test_long_sequence_stability(fast_backend):
    """L = 3136 with A down to -150 and steps up to ~10: decays underflow to 0, never overflow."""
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 1, 2, 4, 3136
    u = torch.randn(b, d, length, generator=g)
    delta = torch.rand(b, d, length, generator=g) * 10 - 2  # softplus -> (0.13, 8)
    A = -torch.exp(torch.rand(d, n, generator=g) * 5)  # -1 .. -148
    B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    leaves = [t.requires_grad_(True) for t in (u, delta, A, B, C)]
    y = selective_scan(*leaves, delta_softplus=True, backend=fast_backend)
    assert torch.isfinite(y).all()
    grads = torch.autograd.grad(y.sum(), leaves)
    assert all(torch.isfinite(g_).all() for g_ in grads)
    with torch.no_grad():
        y_ref = selective_scan_ref(u, delta, A, B, C, delta_softplus=True)
    assert _max_err(y, y_ref) <= TOL


def test_mamba_backend_without_package_raises(monkeypatch):
    monkeypatch.setattr(ss_module, "mamba_ssm_available", lambda: False)
    inputs = _scan_inputs(1, 2, 2, 5)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(RuntimeError, match=r"medlite\[mamba\]"):
        selective_scan(*args, backend="mamba_ssm")


def test_mamba_backend_on_cpu_tensors_raises(monkeypatch):
    monkeypatch.setattr(ss_module, "mamba_ssm_available", lambda: True)
    inputs = _scan_inputs(1, 2, 2, 5)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(RuntimeError, match="CUDA"):
        selective_scan(*args, backend="mamba_ssm")


def test_auto_backend_uses_ours_for_cpu_tensors(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("mamba_ssm's kernel must not be used for CPU tensors")

    monkeypatch.setattr(ss_module, "mamba_ssm_available", lambda: True)
    monkeypatch.setattr(ss_module, "_selective_scan_mamba", no_kernel)
    inputs = _scan_inputs(1, 2, 2, 9)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    assert _max_err(selective_scan(*args), selective_scan_ref(*args)) <= TOL


def test_bad_arguments_raise_clear_errors():
    inputs = _scan_inputs(1, 4, 2, 5)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match="backend"):
        selective_scan(*args, backend="cuda")
    with pytest.raises(ValueError, match="G dividing D"):
        selective_scan(*args[:3], torch.randn(1, 3, 2, 5), args[4])
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(args[0], args[1], torch.randn(3, 2), args[3], args[4])
    per_group, invariant = torch.randn(1, 2, 2, 5), torch.randn(4, 2)
    for B, C in (
        (invariant, per_group),
        (per_group, torch.randn(1, 4, 2, 5)),
        (per_group, args[4]),
    ):
        for backend in ("fast", "native", "ref", "export"):
            with pytest.raises(ValueError, match="same number of groups"):
                selective_scan(*args[:3], B, C, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ones = torch.ones(1, 2, 3)
        wkv_bidirectional(torch.ones(3), torch.ones(3), ones, ones, backend="cuda")


def test_mamba_ssm_available_is_cached_bool():
    assert isinstance(mamba_ssm_available(), bool)
    assert mamba_ssm_available() is mamba_ssm_available()


def test_importing_ops_does_not_import_mamba_ssm(tmp_path):
    """A stand-in ``mamba_ssm`` records any import attempt; only mamba_ssm_available() makes one."""
    fake = tmp_path / "mamba_ssm"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import builtins\nbuiltins._mamba_import_attempted = True\n"
        "raise ImportError('stand-in without CUDA kernels')\n"
    )
    code = textwrap.dedent(
        """
        import builtins, sys
        import medlite.models.ops as ops
        assert "mamba_ssm" not in sys.modules
        assert not getattr(builtins, "_mamba_import_attempted", False), "imported at import time"
        assert ops.mamba_ssm_available() is False
        assert builtins._mamba_import_attempted
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# --------------------------------------------------------------------------------------------
# WKV
# --------------------------------------------------------------------------------------------


def _wkv_case(b, length, c, w_scale, k_scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(c, generator=g) * w_scale
    u = torch.randn(c, generator=g)
    k = torch.rand(b, length, c, generator=g) * k_scale
    v = torch.randn(b, length, c, generator=g)
    return w, u, k, v


def _run_wkv(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    y = fn(*leaves)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)) / y.numel() ** 0.5
    return y, torch.autograd.grad((y * weight).sum(), leaves)


@pytest.mark.parametrize("length", [1, 2, 7, 49, 100])
@pytest.mark.parametrize(
    "w_scale, k_scale",
    [(1.0, 1.0), (0.05, 30.0), (8.0, 30.0), (-0.02, 10.0)],
    ids=["mild", "large_k", "fast_decay", "negative_w"],
)
def test_wkv_fast_matches_ref(length, w_scale, k_scale, fast_backend):
    tensors = _wkv_case(2, length, 5, w_scale, k_scale, seed=length)
    y_ref, g_ref = _run_wkv(wkv_bidirectional_ref, tensors)
    y_fast, g_fast = _run_wkv(lambda *t: wkv_bidirectional(*t, backend=fast_backend), tensors)
    assert torch.isfinite(y_fast).all()
    assert _max_err(y_fast, y_ref) <= TOL
    for name, a, b in zip("wukv", g_fast, g_ref, strict=True):
        assert _max_err(a, b) <= TOL, name


def test_wkv_matches_formula_directly():
    """The documented formula, spelled out with explicit sums for a tiny case."""
    w, u, k, v = _wkv_case(1, 4, 2, 1.0, 1.0, seed=5)
    y = wkv_bidirectional(w, u, k, v)
    for t in range(4):
        num = torch.exp(u + k[0, t]) * v[0, t]
        den = torch.exp(u + k[0, t])
        for i in range(4):
            if i != t:
                wt = torch.exp(-(abs(t - i) - 1) * w + k[0, i])
                num, den = num + wt * v[0, i], den + wt
        assert _max_err(y[0, t], num / den) <= 1e-5


def test_wkv_long_sequence_and_dtype(fast_backend):
    w, u, k, v = _wkv_case(1, 3136, 4, 0.01, 30.0, seed=0)
    y = wkv_bidirectional(w, u, k.bfloat16(), v.bfloat16(), backend=fast_backend)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y32 = wkv_bidirectional(w, u, k, v, backend=fast_backend)
    assert _max_err(y32, wkv_bidirectional_ref(w, u, k, v)) <= TOL


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not mamba_ssm_available(),
    reason="needs CUDA and the mamba_ssm kernels (pip install 'medlite[mamba]')",
)
@pytest.mark.parametrize("bc", ["var", "group"])
def test_fast_scan_matches_mamba_ssm_on_cuda(bc):
    inputs = {k: v.cuda() for k, v in _scan_inputs(2, 64, 16, 300, bc).items()}
    y_mamba, g_mamba = _run_scan(selective_scan, inputs, ALL_OPTS, backend="mamba_ssm")
    y_fast, g_fast = _run_scan(selective_scan, inputs, ALL_OPTS, backend="fast")
    assert _max_err(y_fast, y_mamba) <= 1e-3
    for name in g_mamba:
        assert _max_err(g_fast[name], g_mamba[name]) <= 1e-3, name


# --------------------------------------------------------------------------------------------
# Export path: standard tensor ops only, no Python arithmetic on the batch size
# --------------------------------------------------------------------------------------------

wkv_module = importlib.import_module("medlite.models.ops.wkv")
BATCH = torch.export.Dim("batch", min=1)


def _assert_export_scan_close(inputs, opts, tol=TOL):
    y_ref, g_ref = _run_scan(selective_scan_ref, inputs, opts)
    y_exp, g_exp = _run_scan(selective_scan, inputs, opts, backend="export")
    assert y_exp.shape == y_ref.shape
    assert _max_err(y_exp, y_ref) <= tol
    for name in g_ref:
        assert _max_err(g_exp[name], g_ref[name]) <= tol, name


@pytest.mark.parametrize("length", [2, 3, 7, 49, 50, 65, 200])
@pytest.mark.parametrize("bc", ["var", "group", "invariant", "mixed"])
def test_export_scan_matches_ref_all_options(length, bc):
    _assert_export_scan_close(_scan_inputs(2, 4, 3, length, bc), ALL_OPTS)


@pytest.mark.parametrize(
    "opts",
    [{}, {"D": True}, {"z": True}, {"delta_bias": True}, {"softplus": True}],
    ids=["plain", "D", "z", "bias", "softplus"],
)
def test_export_scan_matches_ref_option_subsets(opts):
    inputs = _scan_inputs(2, 4, 3, 37, "group", seed=37)
    if not opts.get("softplus"):  # keep delta >= 0 as Mamba's discretisation assumes
        inputs["delta"] = inputs["delta"].abs()
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    _assert_export_scan_close(inputs, opts)


@pytest.mark.parametrize("length", [0, 1, 45])
def test_export_scan_last_state_and_tiny_lengths(length):
    inputs = _scan_inputs(2, 4, 3, length, "var")
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y_ref, h_ref = selective_scan_ref(*args, True, True)
    y, h = selective_scan(*args, True, True, backend="export")
    assert y.shape == (2, 4, length) and h.shape == (2, 4, 3)
    assert _max_err(y, y_ref) <= TOL and _max_err(h, h_ref) <= TOL


def test_export_scan_long_sequence_stability():
    """L = 3136, A down to -60 here, steps up to ~8: the log-decay summed over the sequence
    reaches -6e5, so a factorised exp(-cumsum) form would overflow; every exp here is <= 0."""
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 2, 4, 3136
    u = torch.randn(b, d, length, generator=g)
    delta = torch.rand(b, d, length, generator=g) * 10 - 2
    A = -torch.exp(torch.rand(d, n, generator=g) * 5)
    B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    log_decay = (torch.nn.functional.softplus(delta)[:, :, None] * A[..., None]).cumsum(-1)
    assert torch.isinf(torch.exp(-log_decay)).any()  # what a naive cumsum-exp would meet
    leaves = [t.requires_grad_(True) for t in (u, delta, A, B, C)]
    y, h = selective_scan(*leaves, delta_softplus=True, return_last_state=True, backend="export")
    assert torch.isfinite(y).all()
    grads = torch.autograd.grad(y.sum(), leaves)
    assert all(torch.isfinite(g_).all() for g_ in grads)
    with torch.no_grad():
        y_ref, h_ref = selective_scan_ref(
            u, delta, A, B, C, delta_softplus=True, return_last_state=True
        )
    assert _max_err(y, y_ref) <= TOL and _max_err(h, h_ref) <= TOL


def test_export_scan_dtype_and_autocast():
    inputs = _scan_inputs(2, 4, 3, 30, "group", dtype=torch.bfloat16)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y = selective_scan(*args, True, backend="export")
    assert y.dtype == torch.bfloat16
    y32 = selective_scan(*[a.float() for a in args], True, backend="export")
    assert torch.equal(y, y32.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = selective_scan(*[a.float() for a in args], True, backend="export")
    assert y_auto.dtype == torch.float32 and torch.equal(y_auto, y32)


@pytest.mark.parametrize("length", [1, 2, 7, 49, 50, 100])
@pytest.mark.parametrize(
    "w_scale, k_scale",
    [(1.0, 1.0), (0.05, 30.0), (8.0, 30.0), (-0.02, 10.0), (-1.0, 10.0)],
    ids=["mild", "large_k", "fast_decay", "negative_w", "strongly_negative_w"],
)
def test_wkv_export_matches_ref(length, w_scale, k_scale):
    tensors = _wkv_case(2, length, 5, w_scale, k_scale, seed=length)
    y_ref, g_ref = _run_wkv(wkv_bidirectional_ref, tensors)
    y_exp, g_exp = _run_wkv(lambda *t: wkv_bidirectional(*t, backend="export"), tensors)
    assert torch.isfinite(y_exp).all()
    assert _max_err(y_exp, y_ref) <= TOL
    for name, a, b in zip("wukv", g_exp, g_ref, strict=True):
        assert torch.isfinite(a).all() and _max_err(a, b) <= TOL, name


def test_wkv_export_long_sequence_no_overflow():
    """T = 3136 with keys up to 300: exp(k) alone overflows fp32; the chunk maxima keep every
    exp at <= 0. Also bf16 in, bf16 out."""
    w, u, k, v = _wkv_case(1, 3136, 4, 0.01, 300.0, seed=0)
    assert torch.isinf(torch.exp(k)).any()
    y = wkv_bidirectional(w, u, k, v, backend="export")
    assert torch.isfinite(y).all()
    assert _max_err(y, wkv_bidirectional_ref(w, u, k, v)) <= TOL
    y16 = wkv_bidirectional(w, u, k.bfloat16(), v.bfloat16(), backend="export")
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()
    assert wkv_bidirectional(w, u, k[:, :0], v[:, :0], backend="export").shape == (1, 0, 4)


class _ScanModule(torch.nn.Module):
    """selective_scan with Vim's call pattern (grouped B/C, bias + softplus, D skip)."""

    def __init__(self):
        super().__init__()
        inputs = _scan_inputs(1, 4, 3, 1, "group")
        self.A, self.D, self.bias = inputs["A"], inputs["D"], inputs["delta_bias"]

    def forward(self, u, delta, B, C, scan=selective_scan):
        return scan(u, delta, self.A, B, C, self.D, delta_bias=self.bias, delta_softplus=True)

    def reference(self, *args):
        return self.forward(*args, scan=selective_scan_ref)

    @staticmethod
    def example(batch, length=23):
        inputs = _scan_inputs(batch, 4, 3, length, "group", seed=batch)
        return tuple(inputs[k] for k in ("u", "delta", "B", "C"))


class _WkvModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.u, _, _ = _wkv_case(1, 1, 5, 1.0, 1.0, seed=2)

    def forward(self, k, v):
        return wkv_bidirectional(self.w, self.u, k, v)

    def reference(self, k, v):
        return wkv_bidirectional_ref(self.w, self.u, k, v)

    @staticmethod
    def example(batch, length=23):
        return _wkv_case(batch, length, 5, 1.0, 5.0, seed=batch)[2:]


@pytest.fixture
def no_fast_paths(monkeypatch):
    """Fail if the fast paths run (they cannot trace a symbolic batch)."""

    def fail(*args, **kwargs):
        raise AssertionError("a fast path ran while exporting")

    monkeypatch.setattr(ss_module, "_selective_scan_fast", fail)
    monkeypatch.setattr(wkv_module, "_scan_time_major", fail)


def test_eager_calls_use_the_fast_paths(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the export path ran in eager mode")

    monkeypatch.setattr(ss_module, "_selective_scan_export", fail)
    monkeypatch.setattr(wkv_module, "_wkv_export", fail)
    assert not ss_module.tracing_for_export(torch.ones(2, 3))
    for module in (_ScanModule(), _WkvModule()):
        args = module.example(2)
        assert _max_err(module(*args), module.reference(*args)) <= TOL


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("module_cls", [_ScanModule, _WkvModule], ids=["scan", "wkv"])
def test_ops_torch_export_with_dynamic_batch(module_cls, strict, no_fast_paths):
    module = module_cls()
    args = module.example(2)
    dynamic = tuple({0: BATCH} for _ in args)
    program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=strict)
    for batch in (1, 3):
        args = module.example(batch)
        assert _max_err(program.module()(*args), module.reference(*args)) <= TOL


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("module_cls", [_ScanModule, _WkvModule], ids=["scan", "wkv"])
def test_ops_jit_trace_bakes_in_no_batch_size(module_cls, no_fast_paths):
    """The legacy ONNX exporter traces with torch.jit: a batch size baked into the trace would
    show up as an error or a wrong result at another batch size."""
    module = module_cls()
    with torch.no_grad():
        traced = torch.jit.trace(module, module.example(2), check_trace=False)
    for batch in (1, 3):
        args = module.example(batch)
        assert _max_err(traced(*args), module.reference(*args)) <= TOL
