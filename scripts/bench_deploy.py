"""Deployment benchmark: one model per paradigm, trained, exported and measured on this machine.

For each model it trains on real MedMNIST data (or reuses the run with --reuse), exports ONNX
fp32 + int8 with the test-split parity checks, then runs the deployment benchmark (PyTorch eager,
ONNX Runtime fp32, ONNX Runtime int8 at each thread count, in one process). The table gives the
ratio of eager latency to ORT int8 latency at the same thread count, measured in the same run.

    MEDLITE_DATA_DIR=../shared/data python scripts/bench_deploy.py
    python scripts/bench_deploy.py --models litecnn mobilevit vim --data breastmnist --epochs 30

Everything goes to outputs/bench_deploy/<data>/<model>/ (a normal run directory with export/
and model_card.md), plus outputs/bench_deploy/summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medlite.deploy.benchmark import BenchmarkSettings, benchmark_run
from medlite.deploy.export import ExportSettings, export_run
from medlite.pipeline import run_with_overrides
from medlite.results import metric_title, primary_metric, write_json
from medlite.tasks import task_record


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["litecnn", "mobilevit", "efficientvit", "vim"])
    p.add_argument("--data", default="breastmnist")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench_deploy")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs and exports")
    p.add_argument(
        "--no-bench",
        action="store_true",
        help="train and export only (time later, on a quiet machine)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=160)
    summary = []
    for model in args.models:
        out = Path(args.out) / args.data / model
        overrides = [
            f"data={args.data}",
            f"model={model}",
            f"data.epochs={args.epochs}",
            f"seed={args.seed}",
            "callbacks=none",
            "logger=csv",
        ]
        res = run_with_overrides(out, overrides, args.reuse)
        export_file = out / "export" / "export.json"
        if args.reuse and export_file.is_file():
            exp = json.loads(export_file.read_text())
        else:
            exp = export_run(out, ExportSettings(formats=["onnx_fp32", "onnx_int8"]))
        if args.no_bench:
            continue
        bench = benchmark_run(
            out, BenchmarkSettings(threads=args.threads, repeats=args.repeats, warmup=20)
        )
        record = task_record(res)
        metric, _ = primary_metric(record)
        summary.append(
            {
                "model": model,
                "paradigm": res["model"]["paradigm"],
                "params": res["model"]["params"],
                "metric": metric,
                "title": metric_title(record, metric),
                "test_eager": exp["reference"]["test"][metric],
                "test_int8": exp["formats"]["onnx_int8"]["test"][metric],
                "formats": exp["formats"],
                "rows": bench["rows"],
                "machine": bench["machine"],
            }
        )
    if not summary:
        return
    write_json(Path(args.out) / "summary.json", {"runs": summary})

    table = Table(
        title=f"deployment on {summary[0]['machine']['cpu']} ({args.data}, 28 px, batch 1)"
    )
    title = ", ".join(dict.fromkeys(s["title"] for s in summary))
    for col in (
        "model",
        "paradigm",
        f"{title} eager",
        f"{title} int8",
        "threads",
        "eager ms",
        "ORT fp32 ms",
        "ORT int8 ms",
        "eager/int8",
        "MB fp32 -> int8",
        "int8 proc MB",
    ):
        table.add_column(col, justify="left" if col in ("model", "paradigm") else "right")
    for s in summary:
        for t in args.threads:
            rows = {r["runtime"]: r for r in s["rows"] if r["threads"] == t}
            mem = rows["onnx_int8"].get("process_memory") or {}
            table.add_row(
                s["model"],
                s["paradigm"],
                f"{s['test_eager']:.3f}",
                f"{s['test_int8']:.3f}",
                str(t),
                f"{rows['pytorch']['latency_ms']:.2f}",
                f"{rows['onnx_fp32']['latency_ms']:.2f}",
                f"{rows['onnx_int8']['latency_ms']:.2f}",
                f"{rows['onnx_int8']['speedup_vs_pytorch']:.2f}x",
                f"{s['formats']['onnx_fp32']['size_mb']:.2f} -> {s['formats']['onnx_int8']['size_mb']:.2f}",
                "-" if not mem else f"{mem['peak_batch1_mb']:.0f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
