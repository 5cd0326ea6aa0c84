"""Deployment benchmark: the default model of each paradigm, at each input size, on every runtime.

For each model and size it trains on real MedMNIST data (28-px images, upsampled to the model's
input size beyond 28 as in MedMNIST v2's "(224)" rows; or reuses the run with --reuse), exports
every format whose runtime is installed (ONNX Runtime and OpenVINO, fp32 and int8) with the
test-split parity checks, then runs the deployment benchmark: eager PyTorch and every runtime,
batch-1 latency timed in turns in one process at each thread count, with each row's share of
this machine's peak (MACs per second against a large matrix product timed in the same process).

    MEDLITE_DATA_DIR=../shared/data python scripts/bench_deploy.py
    python scripts/bench_deploy.py --models litecnn --sizes 28 224 --epochs 5 --threads 1

Everything goes to outputs/bench_deploy/<data>/<size>/<model>/ (a normal run directory with
export/ and model_card.md), plus outputs/bench_deploy/summary.json. The table: per model, size
and thread count, each runtime's median latency (ms); "int8 gain" is the best fp32 runtime's
latency over the best int8 runtime's among those that passed parity; sizes are the files.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medlite.deploy import runtimes
from medlite.deploy.benchmark import BenchmarkSettings, benchmark_run
from medlite.deploy.export import ExportError, ExportSettings, export_run
from medlite.pipeline import run_with_overrides
from medlite.results import metric_title, primary_metric, write_json
from medlite.tasks import task_record

#: one default model per paradigm
MODELS = ["litecnn", "mobilevit", "vim"]


def _best(rows: dict[str, dict], formats: dict, precision: str) -> tuple[str, dict] | None:
    """The fastest row of ``precision`` whose format passed its parity checks."""
    cands = [
        (f, r)
        for f, r in rows.items()
        if f in runtimes.FORMATS
        and runtimes.FORMATS[f].precision == precision
        and ((formats.get(f) or {}).get("parity") or {}).get("ok")
    ]
    return min(cands, key=lambda fr: fr[1]["latency_ms"]) if cands else None


def _train_and_export(model: str, size: int, args) -> tuple[Path, dict, dict]:
    out = Path(args.out) / args.data / str(size) / model
    overrides = [
        f"data={args.data}",
        f"model={model}",
        f"data.epochs={args.epochs}",
        f"seed={args.seed}",
        "callbacks=none",
        "logger=csv",
    ]
    overrides.append(f"model.input_size={size}")
    res = run_with_overrides(out, overrides, args.reuse)
    export_file = out / "export" / "export.json"
    if args.reuse and not args.reexport and export_file.is_file():
        exp = json.loads(export_file.read_text())
    else:
        try:
            exp = export_run(out, ExportSettings(formats=["all"]))
        except ExportError as err:  # a failed check is a result here: the row says which
            logging.warning("%s", err)
            exp = json.loads(export_file.read_text())
    return out, res, exp


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--sizes", nargs="+", type=int, default=[28, 64, 224])
    p.add_argument("--data", default="breastmnist")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench_deploy")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs and exports")
    p.add_argument(
        "--reexport", action="store_true", help="with --reuse: export the reused runs again"
    )
    p.add_argument(
        "--table-only",
        action="store_true",
        help="only print the table (and write summary.md) from an earlier summary.json",
    )
    p.add_argument(
        "--no-bench",
        action="store_true",
        help="train and export only (time later, on a quiet machine)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=200)
    if args.table_only:
        summary = json.loads((Path(args.out) / "summary.json").read_text())["runs"]
        _report(summary, args, console)
        return
    summary = []
    for size in args.sizes:
        for model in args.models:
            try:
                out, res, exp = _train_and_export(model, size, args)
            except Exception as err:  # noqa: BLE001 - one model that can't run at a size
                console.print(f"[red]{model} at {size} px: {type(err).__name__}: {err}[/red]")
                continue
            if args.no_bench:
                continue
            bench = benchmark_run(
                out, BenchmarkSettings(threads=args.threads, repeats=args.repeats, warmup=10)
            )
            record = task_record(res)
            metric, _ = primary_metric(record)
            summary.append(
                {
                    "model": model,
                    "size": size,
                    "paradigm": res["model"]["paradigm"],
                    "params": res["model"]["params"],
                    "metric": metric,
                    "title": metric_title(record, metric),
                    "test": {"pytorch": exp["reference"]["test"][metric]}
                    | {f: e["test"][metric] for f, e in exp["formats"].items() if "test" in e},
                    "formats": exp["formats"],
                    "rows": bench["rows"],
                    "machine": bench["machine"],
                }
            )
            write_json(Path(args.out) / "summary.json", {"runs": _merged(args, summary)})
    if summary:
        _report(_merged(args, summary), args, console)


def _merged(args, summary: list[dict]) -> list[dict]:
    """This invocation's entries over those of an earlier summary.json in the same folder: a
    rerun of some models or sizes replaces their rows and keeps the others (nothing lost)."""
    path = Path(args.out) / "summary.json"
    previous = json.loads(path.read_text())["runs"] if path.is_file() else []
    new = {(s["model"], s["size"]): s for s in summary}
    kept = [new.pop((s["model"], s["size"]), s) for s in previous]
    return kept + list(new.values())


def _refresh(entry: dict, args) -> dict:
    """The run's export record as it is now: the benchmark exports missing formats itself."""
    path = (
        Path(args.out) / args.data / str(entry["size"]) / entry["model"] / "export" / "export.json"
    )
    if not path.is_file():
        return entry
    exp = json.loads(path.read_text())
    metric = entry["metric"]
    tests = {f: e["test"][metric] for f, e in exp["formats"].items() if "test" in e}
    return entry | {
        "formats": exp["formats"],
        "test": {"pytorch": entry["test"]["pytorch"], **tests},
    }


def _report(summary: list[dict], args, console: Console) -> None:
    summary = [_refresh(s, args) for s in summary]
    write_json(Path(args.out) / "summary.json", {"runs": summary})
    table = summary_table(summary, args.data)
    console.print(table)
    lines = [
        "| " + " | ".join(c.header for c in table.columns) + " |",
        "|" + "---|" * len(table.columns),
    ]
    cells = [c._cells for c in table.columns]
    lines += ["| " + " | ".join(row) + " |" for row in zip(*cells, strict=True)]
    (Path(args.out) / "summary.md").write_text("\n".join(lines) + "\n")


def summary_table(summary: list[dict], data: str) -> Table:
    shown = [f for f in runtimes.DEPLOYABLE if any(f in s["formats"] for s in summary)]
    title = ", ".join(dict.fromkeys(s["title"] for s in summary))
    table = Table(title=f"deployment on {summary[0]['machine']['cpu']} ({data}, batch 1)")
    cols = ["model", "px", "thr", "eager ms", *(f"{runtimes.LABELS[f]} ms" for f in shown)]
    cols += ["int8 gain", "% peak (best)", "fp32 -> int8 MB", f"{title} eager -> int8"]
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for s in summary:
        for t in sorted({r["threads"] for r in s["rows"]}):
            rows = {r["format"]: r for r in s["rows"] if r["threads"] == t}

            def ms(f: str, rows=rows, s=s) -> str:
                if f not in rows:
                    return "-"
                if f == "pytorch":  # the reference the others are checked against
                    return f"{rows[f]['latency_ms']:.2f}"
                ok = ((s["formats"].get(f) or {}).get("parity") or {}).get("ok")
                note = {True: "", False: " (fails)", None: " (unchecked)"}[ok]
                return f"{rows[f]['latency_ms']:.2f}{note}"

            fp32, int8 = _best(rows, s["formats"], "fp32"), _best(rows, s["formats"], "int8")
            gain = f"{fp32[1]['latency_ms'] / int8[1]['latency_ms']:.2f}x" if fp32 and int8 else "-"
            best = min(
                (x for x in (fp32, int8) if x), key=lambda fr: fr[1]["latency_ms"], default=None
            )
            frac = best[1].get("peak_fraction") if best else None
            sizes = (
                f"{s['formats'][fp32[0]]['size_mb']:.2f} -> {s['formats'][int8[0]]['size_mb']:.2f}"
                if fp32 and int8
                else "-"
            )
            acc = (
                f"{s['test']['pytorch']:.3f} -> {s['test'][int8[0]]:.3f}"
                if int8
                else f"{s['test']['pytorch']:.3f} -> (no int8 passed)"
            )
            table.add_row(
                f"{s['model']} ({s['paradigm']})",
                str(s["size"]),
                str(t),
                ms("pytorch"),
                *(ms(f) for f in shown),
                gain,
                "-" if frac is None else f"{100 * frac:.1f} ({runtimes.LABELS[best[0]]})",
                sizes,
                acc,
            )
    return table


if __name__ == "__main__":
    main()
