"""Speed of medlite's selective scan and Bi-WKV: the PyTorch ("torch") and C ("C") fast paths vs
the sequential / O(T^2) reference.

Same process, same inputs; each time is the median of several runs after a warm-up (the slow
references get fewer runs). Prints a Rich table per op with the speed-ups against the reference.
The C column is missing where the kernel cannot be built (the first line says why).

    python scripts/bench_scan.py            # L = 784 and 3136, D = 192 and 48, N = 16, batch 2
    python scripts/bench_scan.py --quick    # fewer repeats
    python scripts/bench_scan.py --threads 1 --chunk-size 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from medlite.models.ops import (
    selective_scan,
    selective_scan_ref,
    wkv_bidirectional,
    wkv_bidirectional_ref,
)
from medlite.models.ops.native import status as native_status
from medlite.models.ops.selective_scan import native_kernel


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scan_inputs(batch: int, dim: int, n: int, length: int, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(batch, dim, length, generator=g),  # u
        torch.randn(batch, dim, length, generator=g) - 2.0,  # delta (softplus -> ~0.13)
        -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1),  # A (S4D-real init)
        torch.randn(batch, n, length, generator=g),  # B
        torch.randn(batch, n, length, generator=g),  # C
        torch.ones(dim),  # D
    ]
    return [t.requires_grad_(grad) for t in tensors]


def wkv_inputs(batch: int, length: int, channels: int, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.rand(channels, generator=g) * 8 / length,  # w = decay / T as in Vision-RWKV
        torch.randn(channels, generator=g) / length,  # u = first / T
        torch.randn(batch, length, channels, generator=g),
        torch.randn(batch, length, channels, generator=g),
    ]
    return [t.requires_grad_(grad) for t in tensors]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def ratio(slow: float | None, fast: float | None) -> str:
    return "-" if slow is None or fast is None else f"{slow / fast:,.1f}x"


def bench_op(name, make, impls, sizes, args, ref_backward=True) -> Table:
    """One row per size: forward and forward+backward times of each implementation in ``impls``
    (name -> function; "ref" first), with speed-ups against "ref"."""
    table = Table(title=f"{name} (CPU, {torch.get_num_threads()} threads), times in ms")
    names = list(impls)
    fast = names[1:]
    table.add_column("shape")
    for kind in ("fwd", "fwd+bwd"):
        for impl in names:
            table.add_column(f"{impl} {kind}", justify="right")
        for impl in fast:
            table.add_column(f"{impl} {kind} speed-up", justify="right")
    table.add_column("max |diff|", justify="right")
    for label, shape, long in sizes:
        x = make(*shape, grad=False)
        fwd, bwd, diff = {}, {}, 0.0
        with torch.no_grad():
            expected = impls["ref"](*x)
            for impl in fast:
                diff = max(diff, (impls[impl](*x) - expected).abs().max().item())
                fwd[impl] = median_time(lambda f=impls[impl], x=x: f(*x), args.repeats)
            ref_runs = 1 if long else args.ref_repeats
            fwd["ref"] = median_time(lambda x=x: impls["ref"](*x), ref_runs, warmup=0)
        xg = make(*shape, grad=True)

        def step(fn, xg=xg):
            fn(*xg).sum().backward()
            for t in xg:
                t.grad = None

        for impl in fast:
            bwd[impl] = median_time(lambda f=impls[impl]: step(f), args.repeats)
        bwd["ref"] = None
        if ref_backward and not args.quick:
            bwd["ref"] = median_time(lambda: step(impls["ref"]), 1, warmup=0)
        row = [label]
        for times in (fwd, bwd):
            row += [ms(times[impl]) for impl in names]
            row += [ratio(times["ref"], times[impl]) for impl in fast]
        table.add_row(*row, f"{diff:.1e}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no ref backward")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--chunk-size", type=int, default=16, help="fast path chunk length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[784, 3136])
    parser.add_argument("--batch", type=int, default=2)
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    cli.repeats = 3 if cli.quick else 7
    cli.ref_repeats = 1 if cli.quick else 3

    console = Console(width=240)
    console.print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}, chunk_size {cli.chunk_size}"
    )

    def scan_with(backend):
        def run(u, delta, A, B, C, D):
            return selective_scan(
                u, delta, A, B, C, D, delta_softplus=True, backend=backend,
                chunk_size=cli.chunk_size,
            )  # fmt: skip

        return run

    def scan_ref(u, delta, A, B, C, D):
        return selective_scan_ref(u, delta, A, B, C, D, delta_softplus=True)

    def wkv_with(backend):
        def run(w, u, k, v):
            return wkv_bidirectional(w, u, k, v, backend=backend, chunk_size=cli.chunk_size)

        return run

    native = native_kernel() is not None
    console.print(f"C kernel: {native_status()}")
    scan_impls = {"ref": scan_ref, "torch": scan_with("fast")}
    wkv_impls = {"ref": wkv_bidirectional_ref, "torch": wkv_with("fast")}
    if native:
        scan_impls["C"] = scan_with("native")
        wkv_impls["C"] = wkv_with("native")

    b = cli.batch
    scan_sizes = [
        (f"b{b} D{dim} N16 L{length}", (b, dim, 16, length), length > 1000)
        for length in cli.lengths
        for dim in (192, 48)
    ]
    console.print(bench_op("selective_scan", scan_inputs, scan_impls, scan_sizes, cli))
    wkv_sizes = [
        (f"b{b} T{length} C192", (b, length, 192), length > 1000) for length in cli.lengths
    ]
    # No reference backward for WKV: autograd would keep every (batch, T, T, C) score block
    # (~1 GB per tensor at T = 784, ~15 GB at T = 3136).
    table = bench_op("wkv_bidirectional", wkv_inputs, wkv_impls, wkv_sizes, cli, False)
    console.print(table)


if __name__ == "__main__":
    main()
