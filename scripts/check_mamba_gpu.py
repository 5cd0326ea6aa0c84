"""On a CUDA machine with the [mamba] extra: medlite's own selective scan against mamba_ssm's
kernel (outputs, gradients, time), and the Vim/VMamba models with the automatic backend
(mamba_ssm on CUDA) against medlite's scan forced. Prints Markdown tables.

    pip install -e ".[mamba]"        # on the CUDA machine
    python scripts/check_mamba_gpu.py
"""

from __future__ import annotations

import importlib
import sys
import time
from unittest import mock

import torch

from medlite.models import create_model
from medlite.models.ops.selective_scan import mamba_ssm_available, selective_scan

DEV = "cuda"
SHAPES = [(2, 192, 16, 784), (2, 192, 16, 3136), (8, 384, 16, 3136), (2, 48, 16, 785)]


def inputs(b: int, d: int, n: int, length: int, groups: int | None) -> dict:
    g = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=DEV, generator=g) * scale

    bc = (b, n, length) if groups is None else (b, groups, n, length)
    return {
        "u": rnd(b, d, length),
        "delta": rnd(b, d, length).abs() * 0.5,
        "A": -(rnd(d, n).abs() * 4 + 0.1),
        "B": rnd(*bc),
        "C": rnd(*bc),
        "D": rnd(d),
        "z": rnd(b, d, length),
        "delta_bias": rnd(d, scale=0.1),
    }


def run(backend: str, x: dict, grad: bool = True):
    x = {k: v.clone().requires_grad_(grad) for k, v in x.items()}
    y = selective_scan(**x, delta_softplus=True, backend=backend)
    if not grad:
        return y, {}
    weight = torch.linspace(-1, 1, y.numel(), device=DEV).view_as(y)
    (y * weight).sum().backward()
    return y.detach(), {k: v.grad for k, v in x.items()}


def time_ms(backend: str, x: dict, grad: int, repeats: int = 10) -> float:
    grad = bool(grad)
    for _ in range(3):
        run(backend, x, grad)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run(backend, x, grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def compare_ops() -> None:
    print("| batch, D, N, L | B/C | max rel. diff y | max rel. diff grads "
          "| fwd ms mamba_ssm / medlite | fwd+bwd ms mamba_ssm / medlite |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for b, d, n, length in SHAPES:
        for groups in (None, 4):
            x = inputs(b, d, n, length, groups)
            y_m, g_m = run("mamba_ssm", x)
            y_f, g_f = run("fast", x)
            dy = ((y_m - y_f).abs().max() / y_m.abs().max().clamp_min(1.0)).item()
            dg = max(((g_m[k] - g_f[k]).abs().max() / g_m[k].abs().max().clamp_min(1e-6)).item()
                     for k in g_m)  # fmt: skip
            t = {(be, gr): time_ms(be, x, gr) for be in ("mamba_ssm", "fast") for gr in (0, 1)}
            # (gr: 0 forward only, 1 forward and backward)
            print(f"| {b}, {d}, {n}, {length} | {'per group' if groups else 'shared'} | {dy:.1e} "
                  f"| {dg:.1e} | {t['mamba_ssm', 0]:.2f} / {t['fast', 0]:.2f} "
                  f"| {t['mamba_ssm', 1]:.2f} / {t['fast', 1]:.2f} |", flush=True)  # fmt: skip


def compare_models() -> None:
    # both models call the scan through medlite.models.linear.vim (VMamba reuses its SSM)
    for arch in ("vim", "vmamba"):
        torch.manual_seed(0)
        model = create_model(arch, num_classes=2, in_chans=1, img_size=28).to(DEV).eval()
        x = torch.randn(16, 1, 28, 28, device=DEV)
        with torch.no_grad():
            auto = model(x)
            mod = importlib.import_module("medlite.models.linear.vim")
            forced = lambda *a, **k: selective_scan(*a, **{**k, "backend": "fast"})  # noqa: E731
            with mock.patch.object(mod, "selective_scan", forced):
                fast = model(x)
        print(f"{arch}: max |logits auto (mamba_ssm) - medlite scan| = "
              f"{(auto - fast).abs().max().item():.1e}")  # fmt: skip


def main() -> int:
    if not torch.cuda.is_available() or not mamba_ssm_available():
        print("needs CUDA and mamba_ssm (pip install -e '.[mamba]' on a CUDA machine)")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    compare_ops()
    compare_models()
    return 0


if __name__ == "__main__":
    sys.exit(main())
