"""Speed of medlite's selective scan and Bi-WKV: fast path vs the sequential / O(T^2) reference.

Same process, same inputs; forward time is the median of several runs after a warm-up (the slow
references get fewer runs). Prints a Rich table per op with the speed-up fast / reference.

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


def bench_op(name, make, fast, ref, sizes, args, ref_backward=True) -> Table:
    table = Table(title=f"{name} (CPU, {torch.get_num_threads()} threads)")
    for col in ("shape", "ref fwd ms", "fast fwd ms", "speed-up fwd", "max |diff|"):
        table.add_column(col, justify="right")
    for col in ("ref fwd+bwd ms", "fast fwd+bwd ms", "speed-up fwd+bwd"):
        table.add_column(col, justify="right")
    for label, shape, long in sizes:
        x = make(*shape, grad=False)
        with torch.no_grad():
            diff = (fast(*x) - ref(*x)).abs().max().item()
            t_fast = median_time(lambda x=x: fast(*x), args.repeats)
            t_ref = median_time(lambda x=x: ref(*x), 1 if long else args.ref_repeats, warmup=0)
        xg = make(*shape, grad=True)

        def step(fn, xg=xg):
            fn(*xg).sum().backward()
            for t in xg:
                t.grad = None

        t_fast_bwd = median_time(lambda: step(fast), args.repeats)
        t_ref_bwd = None
        if ref_backward and not args.quick:
            t_ref_bwd = median_time(lambda: step(ref), 1, warmup=0)
        table.add_row(
            label,
            ms(t_ref),
            ms(t_fast),
            ratio(t_ref, t_fast),
            f"{diff:.1e}",
            ms(t_ref_bwd),
            ms(t_fast_bwd),
            ratio(t_ref_bwd, t_fast_bwd),
        )
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

    console = Console(width=160)
    console.print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}, chunk_size {cli.chunk_size}"
    )

    def scan_fast(u, delta, A, B, C, D):
        return selective_scan(
            u, delta, A, B, C, D, delta_softplus=True, backend="fast", chunk_size=cli.chunk_size
        )

    def scan_ref(u, delta, A, B, C, D):
        return selective_scan_ref(u, delta, A, B, C, D, delta_softplus=True)

    b = cli.batch
    scan_sizes = [
        (f"b{b} D{dim} N16 L{length}", (b, dim, 16, length), length > 1000)
        for length in cli.lengths
        for dim in (192, 48)
    ]
    console.print(bench_op("selective_scan", scan_inputs, scan_fast, scan_ref, scan_sizes, cli))

    def wkv_fast(w, u, k, v):
        return wkv_bidirectional(w, u, k, v, backend="fast", chunk_size=cli.chunk_size)

    wkv_sizes = [
        (f"b{b} T{length} C192", (b, length, 192), length > 1000) for length in cli.lengths
    ]
    # No reference backward for WKV: autograd would keep every (batch, T, T, C) score block
    # (~1 GB per tensor at T = 784, ~15 GB at T = 3136).
    table = bench_op(
        "wkv_bidirectional", wkv_inputs, wkv_fast, wkv_bidirectional_ref, wkv_sizes, cli, False
    )
    console.print(table)


if __name__ == "__main__":
    main()
