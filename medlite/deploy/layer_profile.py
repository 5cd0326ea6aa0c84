"""Where an OpenVINO model's time goes, layer by layer: which kernels ran int8 and which fp32.

"Int8 barely pays" is a sum over layers: a network is as fast as its slowest layers in the
precision they actually ran. OpenVINO's CPU plugin reports, per executed layer, its kernel
(``exec_type``, e.g. ``brgconv_avx512_1x1_I8``: the precision is in the name) and its time; this
module times a compiled model at batch 1 and groups those reports, so an int8 file can be read
as "82 % of its time in int8 kernels; the stem convolution alone is a third of it".
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medlite.deploy import runtimes
from medlite.deploy.run_dir import TrainedRun
from medlite.errors import MedliteError
from medlite.results import write_json


@dataclass(frozen=True)
class LayerTime:
    name: str
    type: str  # OpenVINO operation, e.g. Convolution, GroupConvolution, Subgraph
    kernel: str  # the CPU plugin's implementation, e.g. brgconv_avx512_1x1_I8
    precision: str  # int8 | fp32 | bf16 | fp16 | other (read from the kernel's name)
    us: float  # median microseconds per batch-1 inference


def kernel_precision(kernel: str) -> str:
    """The precision a CPU-plugin kernel ran in, from its name (``..._I8``, ``..._f32``)."""
    tail = kernel.lower().rsplit("_", 1)[-1]
    return {"i8": "int8", "u8": "int8", "f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(
        tail, "other"
    )


def layer_times(
    path: str | Path, input_shape: tuple[int, ...], *, threads: int = 1, repeats: int = 50
) -> list[LayerTime]:
    """Per executed layer of the OpenVINO model ``path`` at batch 1 (the shape ``(1,
    *input_shape)``, compiled static as medlite runs it): median time over ``repeats``."""
    from medlite.deploy.openvino_runtime import compile_config, core

    runtime = core()
    model = runtime.read_model(str(path))
    model.reshape({0: [1, *input_shape]})
    config = compile_config(threads) | {"PERF_COUNT": True}  # as medlite runs it, counted
    request = runtime.compile_model(model, "CPU", config).create_infer_request()
    x = np.zeros((1, *input_shape), dtype=np.float32)
    samples: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, tuple[str, str]] = {}
    old = torch.get_num_threads()
    torch.set_num_threads(threads)  # medlite's fused scan operation runs on torch's threads
    try:
        for _ in range(5):  # warm-up
            request.infer({0: x})
        for _ in range(repeats):
            request.infer({0: x})
            for info in request.profiling_info:
                if info.status.name == "NOT_RUN":
                    continue  # folded into a neighbour's kernel
                samples[info.node_name].append(info.real_time.total_seconds() * 1e6)
                kinds[info.node_name] = (info.node_type, info.exec_type)
    finally:
        torch.set_num_threads(old)
    return [
        LayerTime(name, kinds[name][0], kinds[name][1], kernel_precision(kinds[name][1]),
                  statistics.median(times))
        for name, times in samples.items()
    ]  # fmt: skip


def by_type(layers: list[LayerTime]) -> list[dict]:
    """Totals per (operation type, precision), slowest first, with each one's share of time."""
    total = sum(layer.us for layer in layers) or 1.0
    groups: dict[tuple[str, str], list[LayerTime]] = defaultdict(list)
    for layer in layers:
        groups[(layer.type, layer.precision)].append(layer)
    rows = [
        {"type": t, "precision": p, "layers": len(g), "us": sum(x.us for x in g),
         "share": sum(x.us for x in g) / total}
        for (t, p), g in groups.items()
    ]  # fmt: skip
    return sorted(rows, key=lambda r: -r["us"])


def precision_shares(layers: list[LayerTime]) -> dict[str, float]:
    """Share of the summed layer time spent in each precision."""
    total = sum(layer.us for layer in layers) or 1.0
    shares: dict[str, float] = defaultdict(float)
    for layer in layers:
        shares[layer.precision] += layer.us / total
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


# Command line (scripts/profile_int8.py)

FORMATS = ("openvino_fp32", "openvino_int8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", type=Path, help="a run directory with export/model_openvino*.xml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--top", type=int, default=8, help="slowest int8 layers to list")
    args = p.parse_args(argv)
    console = Console()
    try:
        runtimes.require("openvino_fp32")
        run = TrainedRun.load(args.run)
        files = {f: run.export_dir / runtimes.FORMATS[f].file for f in FORMATS}
        missing = [f for f, path in files.items() if not path.is_file()]
        if missing:
            raise MedliteError(
                f"{run.export_dir} has no {', '.join(missing)}: export them first with "
                f"python scripts/export.py run={args.run} formats=[{','.join(FORMATS)}]"
            )
    except MedliteError as err:
        console.print(f"[red]{err}[/red]")
        return 2
    record = {"threads": args.threads, "input_shape": list(run.input_shape), "formats": {}}
    layers = {}
    for fmt, path in files.items():
        layers[fmt] = layer_times(path, run.input_shape, threads=args.threads,
                                  repeats=args.repeats)  # fmt: skip
        total = sum(x.us for x in layers[fmt])
        record["formats"][fmt] = {
            "total_us": total,
            "precision_shares": precision_shares(layers[fmt]),
            "by_type": by_type(layers[fmt]),
            "layers": [asdict(x) for x in layers[fmt]],
        }
        table = Table(title=f"{run.name}: {runtimes.LABELS[fmt]}, {total / 1000:.3f} ms in layers "
                      f"({args.threads} thread(s), batch 1)")  # fmt: skip
        for col in ("operation", "precision", "layers", "us", "share"):
            table.add_column(col, justify="left" if col == "operation" else "right")
        for row in record["formats"][fmt]["by_type"]:
            table.add_row(row["type"], row["precision"], str(row["layers"]), f"{row['us']:.0f}",
                          f"{row['share']:.0%}")  # fmt: skip
        console.print(table)
        shares = ", ".join(
            f"{k} {v:.0%}" for k, v in record["formats"][fmt]["precision_shares"].items()
        )
        console.print(f"time by precision: {shares}")
    slow = sorted(layers["openvino_int8"], key=lambda x: -x.us)[: args.top]
    table = Table(title=f"slowest layers of the int8 file (top {args.top})")
    for col in ("layer", "operation", "kernel", "us"):
        table.add_column(col, justify="right" if col == "us" else "left")
    for x in slow:
        table.add_row(x.name, x.type, x.kernel, f"{x.us:.0f}")
    console.print(table)
    fp32, int8 = (record["formats"][f]["total_us"] for f in FORMATS)
    console.print(f"layer time fp32 / int8: {fp32 / int8:.2f}x")
    out = run.export_dir / "layer_profile.json"
    write_json(out, record)
    console.print(f"written: {out}")
    return 0


USAGE = """Where int8 time goes: a run's OpenVINO fp32 and int8 files timed layer by layer at batch 1.

    python scripts/profile_int8.py <run dir> [--threads 1] [--repeats 50] [--top 8]

Prints, for each file, the time per operation type and precision (which kernels really ran
int8), the share of time in each precision, and the slowest layers of the int8 file; writes
``<run dir>/export/layer_profile.json``. The run must have been exported with ``export=openvino``
or ``export=all`` (``python scripts/export.py run=<run dir> formats=[openvino_fp32,openvino_int8]``).
Layer times are OpenVINO's own counters; their sum is a little under the end-to-end latency
(the inference call's overhead is in no layer).
"""
