"""Latency, throughput, memory and size of a run's model on this machine, per runtime and thread count.

Every runtime (PyTorch eager, ONNX Runtime fp32, ONNX Runtime int8) is measured by the same
function as training's efficiency profile (:func:`medlite.efficiency.profile_model`), in the same
process, one after the other, so their ratios are fair on a noisy machine.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from medlite.atomic import atomic_path
from medlite.deploy.export import FILE_NAMES, ExportSettings, export_run
from medlite.deploy.memory import measure_memory
from medlite.deploy.model_card import write_model_card
from medlite.deploy.onnx import OrtModel
from medlite.deploy.run_dir import TrainedRun
from medlite.efficiency import count_macs, count_parameters, profile_model
from medlite.errors import ConfigError
from medlite.results import write_json

log = logging.getLogger(__name__)

RUNTIMES = ("pytorch", "onnx_fp32", "onnx_int8")
LABELS = {"pytorch": "PyTorch eager", "onnx_fp32": "ORT fp32", "onnx_int8": "ORT int8"}


@dataclass
class BenchmarkSettings:
    """How to measure (the same keys are accepted on ``scripts/benchmark.py``'s command line)."""

    runtimes: list[str] = field(default_factory=lambda: list(RUNTIMES))
    #: CPU threads to measure at (one row per runtime and count)
    threads: list[int] = field(default_factory=lambda: [1, 2])
    repeats: int = 50  # timed batch-1 passes (median and p90 reported)
    warmup: int = 10
    throughput_batch: int = 64

    def __post_init__(self) -> None:
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown or not self.runtimes:
            raise ConfigError(
                f"runtimes must be a non-empty subset of {RUNTIMES}, got {self.runtimes}"
            )
        if not self.threads or any(int(t) < 1 for t in self.threads):
            raise ConfigError(f"threads must be a list of counts >= 1, got {self.threads}")
        if self.repeats < 3 or self.warmup < 0 or self.throughput_batch < 1:
            raise ConfigError("need repeats >= 3, warmup >= 0 and throughput_batch >= 1")


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


def _models(run: TrainedRun, runtimes: list[str], data_dir: str | None) -> dict[str, nn.Module]:
    """The PyTorch model and the exported files (exported first if they are missing)."""
    wanted = [r for r in runtimes if r != "pytorch"]
    missing = [r for r in wanted if not (run.export_dir / FILE_NAMES[r]).is_file()]
    if missing:
        log.info("no %s in %s yet: exporting first", ", ".join(missing), run.export_dir)
        export_run(run, ExportSettings(formats=missing), data_dir=data_dir)
    model = run.torch_model()
    macs = count_macs(model, _example(run))
    params = count_parameters(model)
    out: dict[str, nn.Module] = {}
    for r in runtimes:
        if r == "pytorch":
            out[r] = model
        else:
            out[r] = OrtModel(run.export_dir / FILE_NAMES[r], params=params, macs=macs)
    return out


def _example(run: TrainedRun) -> torch.Tensor:
    return torch.zeros(1, *run.input_shape)


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
    models = _models(run, settings.runtimes, data_dir)
    rows = []
    jobs = [(r, int(t)) for t in settings.threads for r in settings.runtimes]
    with Progress(transient=True, console=console) as progress:
        task = progress.add_task("benchmarking", total=len(jobs))
        for runtime, threads in jobs:
            progress.update(task, description=f"{LABELS[runtime]}, {threads} thread(s)")
            prof = profile_model(
                models[runtime],
                run.input_shape,
                repeats=settings.repeats,
                warmup=settings.warmup,
                throughput_batch=settings.throughput_batch,
                threads=threads,
            ).as_dict()
            rows.append({"runtime": runtime, **prof})
            progress.advance(task)
    memory = {}
    for runtime in settings.runtimes:  # a fresh process each: see medlite/deploy/memory.py
        target = run.path if runtime == "pytorch" else run.export_dir / FILE_NAMES[runtime]
        memory[runtime] = measure_memory(
            runtime, target, run.input_shape, settings.throughput_batch, min(settings.threads)
        )
    for row in rows:
        row["process_memory"] = memory[row["runtime"]]
    for row in rows:  # ratio to eager PyTorch at the same thread count, same process
        base = next(
            (b for b in rows if b["runtime"] == "pytorch" and b["threads"] == row["threads"]), None
        )
        row["speedup_vs_pytorch"] = (
            round(base["latency_ms"] / row["latency_ms"], 3) if base and row["latency_ms"] else None
        )
    record = {
        "run_dir": str(run.path),
        "model": run.results["model"]["name"],
        "input_shape": list(run.input_shape),
        "machine": machine_info(),
        "settings": asdict(settings),
        "rows": rows,
    }
    try:
        plot = plot_latency(record, run.export_dir / "benchmark.png")
        record["plot"] = plot.name  # beside benchmark.json: the run folder may move
    except Exception as err:  # noqa: BLE001 - the numbers matter more than the picture
        log.warning("could not draw the benchmark plot: %s", err)
    write_json(run.export_dir / "benchmark.json", record)
    write_model_card(run)
    return record


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
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for r in record["rows"]:
        mem = r.get("process_memory") or {}
        table.add_row(
            LABELS[r["runtime"]],
            str(r["threads"]),
            f"{r['latency_ms']:.3f}",
            f"{r['latency_p90_ms']:.3f}",
            f"{r['throughput_ips']:.0f}",
            _mb(mem.get("peak_batch1_mb")),
            _mb(mem.get("model_mb")),
            f"{r['size_mb']:.2f}",
            "-" if r["speedup_vs_pytorch"] is None else f"{r['speedup_vs_pytorch']:.2f}x",
        )
    table.caption = (
        f"batch-1 latency; throughput at batch {record['settings']['throughput_batch']}; "
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
    runtimes = [rt for rt in RUNTIMES if any(r["runtime"] == rt for r in record["rows"])]
    width = 0.8 / len(runtimes)
    fig = Figure(figsize=(5.5, 3.2), dpi=120)
    ax = fig.subplots()
    for i, rt in enumerate(runtimes):
        rows = {r["threads"]: r for r in record["rows"] if r["runtime"] == rt}
        xs = [j + i * width for j, t in enumerate(threads) if t in rows]
        med = [rows[t]["latency_ms"] for t in threads if t in rows]
        p90 = [rows[t]["latency_p90_ms"] - rows[t]["latency_ms"] for t in threads if t in rows]
        ax.bar(xs, med, width, yerr=[[0] * len(p90), p90], capsize=3, label=LABELS[rt])
    ax.set_xticks([j + width * (len(runtimes) - 1) / 2 for j in range(len(threads))])
    ax.set_xticklabels([f"{t} thread{'s' if t > 1 else ''}" for t in threads])
    ax.set_ylabel("latency, batch 1 (ms)")
    ax.set_title(f"{record['model']}: CPU latency per runtime (median, p90)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path
