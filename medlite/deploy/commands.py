"""The deployment commands: ``scripts/export.py``, ``scripts/benchmark.py`` and ``predict.py``.

They take ``key=value`` arguments like ``train.py`` (``run=<run dir>``), checked against a
dataclass so a typo or a wrong type is one clear message, and they print medlite's errors
without a traceback (``show_traceback=true`` shows it).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from medlite.deploy.benchmark import BenchmarkSettings
from medlite.deploy.export import ExportSettings
from medlite.deploy.runtimes import LABELS
from medlite.errors import ConfigError, MedliteError


@dataclass
class ExportCommand(ExportSettings):
    """python scripts/export.py run=<run dir> [formats=all] ..."""

    run: str = MISSING
    #: where the MedMNIST file is (default: where the run found it, else MEDLITE_DATA_DIR)
    data_dir: str | None = None
    show_traceback: bool = False


@dataclass
class BenchmarkCommand(BenchmarkSettings):
    """python scripts/benchmark.py run=<run dir> [threads=[1,2]] [repeats=50] ..."""

    run: str = MISSING
    data_dir: str | None = None
    show_traceback: bool = False


@dataclass
class PredictCommand:
    """python predict.py run=<run dir> input=<image file or folder> [runtime=auto] [out=preds.csv]
    [coverage=0.95]"""

    run: str = MISSING
    #: a PNG/JPEG/BMP/TIFF, DICOM or 2D NIfTI file, or a folder of them (searched recursively)
    input: str = MISSING
    #: auto (the fastest runtime that passed its checks, as measured here), pytorch, or an
    #: exported format: onnx_fp32, onnx_int8, openvino_fp32, openvino_int8, executorch_fp32,
    #: executorch_int8
    runtime: str = "auto"
    #: also write the predictions to this CSV file (segmentation: always written, by default
    #: to <run>/predictions/predictions.csv; masks and overlays go in the CSV's folder)
    out: str | None = None
    #: files with more pixels (height x width, from the header) are refused, each as an error
    #: row, before decoding; null: no bound (8192 x 8192 by default)
    max_pixels: int | None = 8192 * 8192
    #: also give each file's conformal prediction set at this coverage (e.g. 0.95), from the
    #: run's calibration on its validation split
    coverage: float | None = None
    show_traceback: bool = False


#: where a segmentation run's predictions go when no ``out=`` is given (inside the run folder)
PREDICTIONS_DIR, PREDICTIONS_CSV = "predictions", "predictions.csv"

HELP = {
    "run": "run directory written by train.py (holds results.json)",
    "input": "image file (PNG/JPEG/BMP/TIFF, DICOM, 2D NIfTI) or a folder of them",
    "runtime": "auto | pytorch | an exported format (onnx_fp32, onnx_int8, openvino_fp32, "
    "openvino_int8, executorch_fp32, executorch_int8); auto: the fastest that passed its parity "
    "checks, as the newest benchmark or export measured it",
    "out": "also write the predictions to this CSV file (segmentation: always written, default "
    "<run>/predictions/predictions.csv; masks, overlays and NIfTI masks go next to it)",
    "max_pixels": "refuse files with more pixels than this (height x width, read from the "
    "header before decoding; null: no bound)",
    "coverage": "also give each file's conformal prediction set, the classes that hold the true "
    "one with this probability (e.g. 0.95; calibrated on the run's validation split)",
    "method": "conformal method: aps (adaptive prediction sets), raps (APS with a penalty on "
    "large sets) or lac (score 1 - p(class): smaller sets for weak binary models)",
    "data_dir": "folder of the MedMNIST file (default: where the run found it, or MEDLITE_DATA_DIR)",
    "show_traceback": "print the full traceback of medlite's errors",
    "formats": "all (every format whose runtime is installed) or a subset of [onnx_fp32,"
    "onnx_int8,openvino_fp32,openvino_int8,executorch_fp32,executorch_int8,torch_export]",
    "fp32_tolerance": "max |logit diff| of fp32 formats, relative to max(1, largest |logit|)",
    "int8_max_drop": "largest drop of the task's monitored metric (test split) allowed for "
    "int8 (0.01 = one point of a 0-1 metric)",
    "calibration_batches": "training batches (no augmentation) that calibrate int8",
    "per_channel": "per-channel int8 weight scales",
    "opset": "ONNX opset (default: the exporter's)",
    "runtimes": "all (every installed runtime) or runtimes [pytorch,onnxruntime,openvino,"
    "executorch] and/or formats (onnx_int8, ...); eager PyTorch is always measured",
    "precisions": "subset of [fp32,int8]: which precisions of the named runtimes",
    "threads": "CPU thread counts to measure at",
    "repeats": "timed batch-1 passes (median and p90 reported)",
    "warmup": "untimed passes first",
    "throughput_batch": "batch size of the throughput measurement",
}


def _usage(schema: type) -> str:
    lines = [(schema.__doc__ or "").strip(), "", "arguments (key=value):"]
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        shown = "required" if default == MISSING else f"default {default}"
        lines.append(f"  {f.name:<20} {HELP.get(f.name, '')} ({shown})")
    return "\n".join(lines)


def _as_list(arg: str) -> str:
    """``runtimes=all`` means ``runtimes=[all]``: one value where a list is expected."""
    key, value = arg.split("=", 1)
    return arg if value.strip().startswith("[") else f"{key}=[{value}]"


def parse_args(schema: type, argv: Sequence[str]):
    """``key=value`` strings -> an instance of ``schema`` (a dataclass); ConfigError on mistakes."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(
            f"arguments are key=value pairs; got {' '.join(bad)!r}\n\n{_usage(schema)}"
        )
    lists = {f.name for f in dataclasses.fields(schema) if str(f.type).startswith("list")}
    argv = [_as_list(a) if a.split("=", 1)[0] in lists else a for a in argv]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(list(argv)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(
                f"missing argument(s): {', '.join(f'{k}=...' for k in missing)}\n\n{_usage(schema)}"
            )
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        raise ConfigError(f"bad argument: {msg}\n\n{_usage(schema)}") from None


def run_command(main: Callable[[object, Console], int], schema: type, argv: Sequence[str]) -> int:
    """Parse, run, and turn medlite's errors into one message and exit code 1."""
    from medlite.console import make_console, print_error, quiet_third_party

    if any(a in ("-h", "--help", "help") for a in argv):
        print(_usage(schema))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()
    console = make_console()  # piped or captured: paths whole, tables at full width
    args = None
    try:
        args = parse_args(schema, argv)
        return main(args, console)
    except MedliteError as err:
        if args is not None and getattr(args, "show_traceback", False):
            raise
        print_error(err)
        return 1


def _settings(args, base: type) -> object:
    keys = {f.name for f in dataclasses.fields(base)}
    return base(**{k: v for k, v in dataclasses.asdict(args).items() if k in keys})


def export_main(args: ExportCommand, console: Console) -> int:
    from medlite.deploy.export import export_run

    record = export_run(args.run, _settings(args, ExportSettings), data_dir=args.data_dir)
    console.print(export_table(record))
    console.print(f"files, export.json and model_card.md: [bold]{record['run_dir']}[/bold]")
    return 0


def export_table(record: dict) -> Table:
    """export.json as a table: the task's headline test metrics through each runtime, parity."""
    from medlite.results import headline_metrics, metric_title

    task = record["task"]
    metrics = headline_metrics(task)
    table = Table(
        title=f"export of {record['model']['name']} ({record['n_test_images']} test images)"
    )
    columns = (
        "format",
        "file",
        "MB",
        *(f"test {metric_title(task, m)}" for m in metrics),
        "max |diff|",
        "agree",
        "check",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("format", "file") else "right")

    def num(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    ref = record["reference"]["test"]
    table.add_row("PyTorch", "-", "-", *(num(ref.get(m)) for m in metrics), "-", "-", "-")
    for fmt, e in record["formats"].items():
        p = e["parity"]
        table.add_row(
            fmt,
            e["path"].rsplit("/", 1)[-1],
            f"{e['size_mb']:.2f}",
            *(num(e["test"].get(m)) for m in metrics),
            f"{p['max_abs_diff']:.2g}",
            f"{p['label_agreement']:.3f}",
            "pass" if p["ok"] else "FAIL",
        )
    return table


def benchmark_main(args: BenchmarkCommand, console: Console) -> int:
    from medlite.deploy.benchmark import benchmark_run, benchmark_table

    record = benchmark_run(
        args.run, _settings(args, BenchmarkSettings), data_dir=args.data_dir, console=console
    )
    console.print(benchmark_table(record))
    console.print(f"benchmark.json, benchmark.png and model card updated in {args.run}")
    return 0


def predict_main(args: PredictCommand, console: Console) -> int:
    from medlite.deploy.predict import Predictor, write_csv

    predictor = Predictor(
        args.run, runtime=args.runtime, max_pixels=args.max_pixels, coverage=args.coverage
    )
    label = LABELS.get(predictor.runtime, predictor.runtime)
    console.print(f"runtime: {label} ({predictor.runtime_reason})", highlight=False)
    if predictor.task.kind == "segmentation":
        return _segment_main(predictor, args, console)
    rows = predictor.predict(args.input)
    labels = predictor.task.labels
    shown = labels if len(labels) <= 4 else None
    table = Table(title=f"{predictor.run.name} via {predictor.runtime} (local, nothing uploaded)")
    table.add_column("file")
    table.add_column("predicted")
    for lab in shown or ("top probabilities",):
        table.add_column(f"p({lab})" if shown else lab, justify="right")
    sets = predictor.coverage is not None
    if sets:
        table.add_column(f"set ({predictor.coverage:g} coverage)")
    for r in rows:
        name = str(r.path)
        if not r.ok:
            blank = (len(shown) if shown else 1) + sets
            table.add_row(name, "[red]error[/red]", *([""] * blank))
            continue
        if shown:
            probs = [f"{r.probabilities[lab]:.4f}" for lab in shown]
        else:
            top = sorted(r.probabilities.items(), key=lambda kv: -kv[1])[:3]
            probs = [", ".join(f"{k}: {v:.3f}" for k, v in top)]
        chosen = ["|".join(r.set or [])] if sets else []
        table.add_row(name, "; ".join(r.predicted) or "(none)", *probs, *chosen)
    console.print(table)
    failed = [r for r in rows if not r.ok]
    for r in failed:
        console.print(f"[red]{r.path}[/red]: {r.error}", highlight=False)
    if args.out:
        console.print(f"predictions written to {write_csv(rows, labels, args.out, sets=sets)}")
    console.print(f"{len(rows) - len(failed)} of {len(rows)} file(s) predicted")
    return 1 if failed else 0


def _segment_main(predictor, args: PredictCommand, console: Console) -> int:
    """Segmentation: masks, overlays (and NIfTI masks) next to the CSV, a table of class areas."""
    from pathlib import Path

    from medlite.deploy.predict import write_segmentation_csv

    csv_path = (
        Path(args.out).expanduser()
        if args.out
        else predictor.run.path / PREDICTIONS_DIR / PREDICTIONS_CSV
    )
    rows = predictor.predict(args.input, out_dir=csv_path.parent)
    task = predictor.task
    foreground = list(task.labels[1:])
    shown = foreground if len(foreground) <= 4 else foreground[:4]
    table = Table(title=f"{predictor.run.name} via {predictor.runtime} (local, nothing uploaded)")
    table.add_column("file")
    table.add_column("classes found")
    for lab in shown:
        table.add_column(f"area {lab}", justify="right")
    table.add_column("mask")
    for r in rows:
        if not r.fractions:
            table.add_row(str(r.path), "[red]error[/red]", *([""] * len(shown)), "")
            continue
        table.add_row(
            str(r.path),
            "; ".join(r.predicted) or "(none)",
            *(f"{100 * r.fractions[lab]:.1f}%" for lab in shown),
            Path(r.files.get("mask", "")).name,
        )
    console.print(table)
    failed = [r for r in rows if not r.ok]
    for r in failed:
        console.print(f"[red]{r.path}[/red]: {r.error}", highlight=False)
    written = write_segmentation_csv(rows, task, csv_path)
    console.print(f"masks, overlays and {written.name} written to {written.parent}")
    console.print(f"{len(rows) - len(failed)} of {len(rows)} file(s) predicted")
    return 1 if failed else 0


def main_export(argv: Sequence[str] | None = None) -> int:
    return run_command(export_main, ExportCommand, sys.argv[1:] if argv is None else argv)


def main_benchmark(argv: Sequence[str] | None = None) -> int:
    return run_command(benchmark_main, BenchmarkCommand, sys.argv[1:] if argv is None else argv)


def main_predict(argv: Sequence[str] | None = None) -> int:
    return run_command(predict_main, PredictCommand, sys.argv[1:] if argv is None else argv)
