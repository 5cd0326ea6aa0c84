"""Latency, throughput, memory and size of a run's model on this machine, per runtime and thread count.

Eager PyTorch and every exported format whose runtime is installed (ONNX Runtime, OpenVINO,
ExecuTorch; fp32 and int8) are measured in one process: batch-1 latency in turns (:func:`interleaved_latency_ms`,
so load elsewhere on the machine slows all of them alike), then throughput, with the thread count
fixed and recorded; memory in a fresh process per runtime. Each row also says what fraction of
this machine's peak it reaches: its MACs per second against a large matrix product timed in the
same process (fp32 for fp32 rows, int8 for int8 rows).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from medlite.atomic import atomic_path
from medlite.deploy import runtimes
from medlite.deploy.auto import passed_formats
from medlite.deploy.export import FILE_NAMES, ExportError, ExportSettings, export_run
from medlite.deploy.memory import measure_memory
from medlite.deploy.model_card import write_model_card
from medlite.deploy.run_dir import TrainedRun
from medlite.efficiency import (
    count_macs,
    count_parameters,
    interleaved_latency_ms,
    profile_model,
)
from medlite.errors import ConfigError
from medlite.results import write_json

log = logging.getLogger(__name__)

PYTORCH = runtimes.PYTORCH
LABELS = runtimes.LABELS
#: side of the square matrices whose product measures the machine's peak MACs per second
PEAK_GEMM_SIZE = 1024


@dataclass
class BenchmarkSettings:
    """How to measure (the same keys are accepted on ``scripts/benchmark.py``'s command line)."""

    #: runtimes (pytorch, onnxruntime, openvino, executorch), formats (onnx_int8, ...) or all:
    #: every one installed here, each at ``precisions``
    runtimes: list[str] = field(default_factory=lambda: ["all"])
    precisions: list[str] = field(default_factory=lambda: list(runtimes.PRECISIONS))
    #: CPU threads to measure at (one row per runtime and count)
    threads: list[int] = field(default_factory=lambda: [1, 2])
    repeats: int = 50  # timed batch-1 passes (median and p90 reported)
    warmup: int = 10
    throughput_batch: int = 64

    def __post_init__(self) -> None:
        if not self.runtimes:
            raise ConfigError("runtimes must name at least one runtime (or all)")
        unknown = [p for p in self.precisions if p not in runtimes.PRECISIONS]
        if unknown or not self.precisions:
            raise ConfigError(f"precisions must be a subset of {runtimes.PRECISIONS}")
        runtimes.formats_of(self.runtimes, tuple(self.precisions))  # unknown names: one line
        for name in self.runtimes:  # named explicitly: it must be installed
            if name != "all":
                runtimes.require(name)
        if not self.threads or any(int(t) < 1 for t in self.threads):
            raise ConfigError(f"threads must be a list of counts >= 1, got {self.threads}")
        if self.repeats < 3 or self.warmup < 0 or self.throughput_batch < 1:
            raise ConfigError("need repeats >= 3, warmup >= 0 and throughput_batch >= 1")

    def formats(self) -> tuple[list[str], dict[str, str]]:
        """What to measure (eager PyTorch always, as the baseline) and what ``all`` skipped."""
        wanted = runtimes.formats_of([PYTORCH, *self.runtimes], tuple(self.precisions))
        skipped = {f: runtimes.install_hint(f) for f in wanted if not runtimes.installed(f)}
        return [f for f in wanted if f not in skipped], skipped


def machine_info() -> dict:
    """Where the numbers were measured: they mean little without it."""
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def peak_gmacs(threads: int, size: int = PEAK_GEMM_SIZE, repeats: int = 5) -> dict[str, float]:
    """This machine's practical peak, in GMAC/s at ``threads``: the best of ``repeats`` square
    matrix products, fp32 (``torch.mm``) and int8 (``torch._int_mm``, int32 accumulation)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        a = torch.randint(-128, 128, (size, size), dtype=torch.int8)
        b = torch.randint(-128, 128, (size, size), dtype=torch.int8)
        for precision, fn, args in (
            ("fp32", torch.mm, (a.float(), b.float())),
            ("int8", getattr(torch, "_int_mm", None), (a, b)),
        ):
            if fn is None:
                continue
            try:
                fn(*args)
            except RuntimeError:  # no int8 matrix product on this build
                continue
            best = min(_seconds(fn, args) for _ in range(repeats))
            out[precision] = round(size**3 / best / 1e9, 2)
    finally:
        torch.set_num_threads(old)
    return out


def _seconds(fn, args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _models(run: TrainedRun, formats: list[str], data_dir: str | None) -> dict[str, nn.Module]:
    """The PyTorch model and the exported files (exported first if they are missing)."""
    missing = [
        f for f in formats if f != PYTORCH and not (run.export_dir / FILE_NAMES[f]).is_file()
    ]
    if missing:
        log.info("no %s in %s yet: exporting first", ", ".join(missing), run.export_dir)
        try:
            export_run(run, ExportSettings(formats=missing), data_dir=data_dir)
        except ExportError as err:  # measure what exported; export.json says why the rest not
            log.warning("%s", err)
        formats = [f for f in formats if f == PYTORCH or (run.export_dir / FILE_NAMES[f]).is_file()]
    model = run.torch_model()
    macs = count_macs(model, _example(run))
    params = count_parameters(model)
    out: dict[str, nn.Module] = {}
    for f in formats:
        if f == PYTORCH:
            out[f] = model
        else:
            out[f] = runtimes.load(f, run.export_dir / FILE_NAMES[f], params=params, macs=macs)
    return out


def _example(run: TrainedRun) -> torch.Tensor:
    return torch.zeros(1, *run.input_shape)


def _row(fmt: str) -> dict:
    spec = runtimes.FORMATS.get(fmt)
    return {
        "format": fmt,
        "runtime": spec.runtime if spec else PYTORCH,
        "precision": spec.precision if spec else "fp32",
    }


def benchmark_run(
    run: TrainedRun | str | Path,
    settings: BenchmarkSettings | None = None,
    *,
    data_dir: str | None = None,
    console: Console | None = None,
) -> dict:
    """Measure every runtime at every thread count; writes ``export/benchmark.json`` and a plot."""
    run = run if isinstance(run, TrainedRun) else TrainedRun.load(run)
    settings = settings or BenchmarkSettings()
    formats, skipped = settings.formats()
    for fmt, why in skipped.items():
        log.warning("benchmark: %s skipped (%s)", fmt, why)
    models = _models(run, formats, data_dir)
    formats = list(models)
    rows, peaks = [], {}
    example = torch.randn(1, *run.input_shape)
    with Progress(transient=True, console=console) as progress:
        task = progress.add_task("benchmarking", total=len(settings.threads) * (len(formats) + 1))
        for threads in map(int, settings.threads):
            progress.update(task, description=f"latency in turns, {threads} thread(s)")
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                lat = interleaved_latency_ms(
                    models, example, warmup=settings.warmup, repeats=settings.repeats
                )
            finally:
                torch.set_num_threads(old)
            peaks[threads] = peak_gmacs(threads)
            progress.advance(task)
            for fmt in formats:
                progress.update(task, description=f"{LABELS[fmt]}, {threads} thread(s)")
                prof = profile_model(
                    models[fmt],
                    run.input_shape,
                    repeats=settings.repeats,
                    warmup=settings.warmup,
                    throughput_batch=settings.throughput_batch,
                    threads=threads,
                    latencies=lat[fmt],
                ).as_dict()
                row = _row(fmt) | prof
                peak = peaks[threads].get(row["precision"])
                achieved = (
                    prof["macs"] / (prof["latency_ms"] / 1000) / 1e9 if prof["macs"] else None
                )
                row["achieved_gmacs"] = None if achieved is None else round(achieved, 3)
                row["peak_fraction"] = (
                    round(achieved / peak, 4) if achieved is not None and peak else None
                )
                rows.append(row)
                progress.advance(task)
    memory = {}
    for fmt in formats:  # a fresh process each: see medlite/deploy/memory.py
        target = run.path if fmt == PYTORCH else run.export_dir / FILE_NAMES[fmt]
        memory[fmt] = measure_memory(
            fmt, target, run.input_shape, settings.throughput_batch, min(settings.threads)
        )
    for row in rows:
        row["process_memory"] = memory[row["format"]]
    for row in rows:  # ratio to eager PyTorch at the same thread count, same process
        base = next(
            (b for b in rows if b["format"] == PYTORCH and b["threads"] == row["threads"]), None
        )
        row["speedup_vs_pytorch"] = (
            round(base["latency_ms"] / row["latency_ms"], 3) if base and row["latency_ms"] else None
        )
    record = {
        "run_dir": str(run.path),
        "model": run.results["model"]["name"],
        "input_shape": list(run.input_shape),
        "machine": machine_info() | {"peak_gmacs": {str(t): p for t, p in peaks.items()}},
        "settings": asdict(settings),
        "skipped": skipped,
        "rows": rows,
        "fastest": fastest_passing(rows, run),
    }
    try:
        plot = plot_latency(record, run.export_dir / "benchmark.png")
        record["plot"] = plot.name  # beside benchmark.json: the run folder may move
    except Exception as err:  # noqa: BLE001 - the numbers matter more than the picture
        log.warning("could not draw the benchmark plot: %s", err)
    write_json(run.export_dir / "benchmark.json", record)
    write_model_card(run)
    return record


def fastest_passing(rows: list[dict], run: TrainedRun) -> dict[str, str]:
    """Per thread count, the fastest format that passed parity (eager PyTorch when none did):
    what ``predict.py runtime=auto`` runs."""
    ok = passed_formats(run) | {PYTORCH}
    out = {}
    for t in sorted({r["threads"] for r in rows}):
        cands = [r for r in rows if r["threads"] == t and r["format"] in ok]
        if cands:
            out[str(t)] = min(cands, key=lambda r: r["latency_ms"])["format"]
    return out


def benchmark_table(record: dict) -> Table:
    table = Table(title=f"{record['model']} on {record['machine']['cpu']}")
    cols = (
        "runtime",
        "threads",
        "ms p50",
        "ms p90",
        "img/s",
        "peak RSS MB",
        "model MB",
        "size MB",
        "vs eager",
        "% of peak",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for r in record["rows"]:
        mem = r.get("process_memory") or {}
        table.add_row(
            LABELS[r.get("format", r["runtime"])],
            str(r["threads"]),
            f"{r['latency_ms']:.3f}",
            f"{r['latency_p90_ms']:.3f}",
            f"{r['throughput_ips']:.0f}",
            _mb(mem.get("peak_batch1_mb")),
            _mb(mem.get("model_mb")),
            f"{r['size_mb']:.2f}",
            "-" if r["speedup_vs_pytorch"] is None else f"{r['speedup_vs_pytorch']:.2f}x",
            "-" if r.get("peak_fraction") is None else f"{100 * r['peak_fraction']:.1f}",
        )
    peaks = record["machine"].get("peak_gmacs") or {}
    peak_text = "; ".join(
        f"{t} thread(s): fp32 {p.get('fp32', '-')}, int8 {p.get('int8', '-')} GMAC/s"
        for t, p in peaks.items()
    )
    table.caption = (
        f"batch-1 latency, runtimes timed in turns; throughput at batch "
        f"{record['settings']['throughput_batch']}; % of peak = MACs per second at batch 1 over "
        f"this machine's large-matrix-product peak ({peak_text}); "
        "peak RSS of a fresh process running one batch-1 forward, model MB = that peak minus the "
        "process after its imports"
    )
    return table


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def plot_latency(record: dict, path: Path) -> Path:
    """Grouped bars: median batch-1 latency per runtime at each thread count (p90 as whisker)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    threads = sorted({r["threads"] for r in record["rows"]})
    order = [PYTORCH, *runtimes.FORMATS]
    shown = sorted({r.get("format", r["runtime"]) for r in record["rows"]}, key=order.index)
    width = 0.8 / len(shown)
    fig = Figure(figsize=(5.5, 3.2), dpi=120)
    ax = fig.subplots()
    for i, rt in enumerate(shown):
        rows = {r["threads"]: r for r in record["rows"] if r.get("format", r["runtime"]) == rt}
        xs = [j + i * width for j, t in enumerate(threads) if t in rows]
        med = [rows[t]["latency_ms"] for t in threads if t in rows]
        p90 = [rows[t]["latency_p90_ms"] - rows[t]["latency_ms"] for t in threads if t in rows]
        ax.bar(xs, med, width, yerr=[[0] * len(p90), p90], capsize=3, label=LABELS[rt])
    ax.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(threads))])
    ax.set_xticklabels([f"{t} thread{'s' if t > 1 else ''}" for t in threads])
    ax.set_ylabel("latency, batch 1 (ms)")
    ax.set_title(f"{record['model']}: CPU latency per runtime (median, p90)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path
