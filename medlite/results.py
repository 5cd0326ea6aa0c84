"""results.json: the one record of a run that tables, W&B summaries and plots read from."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medlite import atomic
from medlite.console import make_console

log = logging.getLogger(__name__)

_PACKAGES = (
    "medlite",
    "torch",
    "torchvision",
    "pytorch-lightning",
    "timm",
    "monai",
    "torchmetrics",
    "hydra-core",
    "medmnist",
    "wandb",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "openvino",  # optional runtimes: None where not installed
    "nncf",
    "executorch",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    """HEAD of the repository medlite runs from, with ``+dirty`` for uncommitted changes; None outside git."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null means "undefined" (e.g. a metric of one class only)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write atomically (:mod:`medlite.atomic`) so a crash or a full disk never leaves half a
    results file, with the umask's permissions like every other output."""
    return atomic.write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON object file as a dict; ``{}`` when it is missing, unreadable or not an object
    (a record another run may have left half-written or never written)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(results: dict, path: str):
    """A value of results.json by its slash path (``val/auc``, ``optimized/value``,
    ``efficiency/macs``); None if absent."""
    value = results
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def print_summary(results: dict, console: Console | None = None) -> None:
    """The closing table of a run: test (and best validation) metrics, size, and where it all went."""
    console = console or make_console()
    data = results.get("data", {})
    name = data.get("name") or data.get("flag")
    title = f"{results.get('model', {}).get('name')} on {name} ({data.get('size')} px)"
    if data.get("synthetic"):
        title += " [SYNTHETIC data]"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("test", justify="right")
    table.add_column("val (best ckpt)", justify="right")
    test, val = results.get("test") or {}, results.get("val") or {}
    for key in test or val:
        fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"  # noqa: E731
        table.add_row(key, fmt(test.get(key)), fmt(val.get(key)))
    console.print(table)
    if results.get("test_original_size"):
        from medlite.tasks import task_record

        record = task_record(results)
        shown = " | ".join(
            f"{metric_title(record, k)} {v:.4f}"
            if v is not None
            else f"{metric_title(record, k)} -"
            for k, v in results["test_original_size"].items()
        )
        console.print(f"test at the images' original sizes: {shown}")
    if results.get("calibration"):  # classification: temperature scaling, before -> after
        from medlite.tasks.calibration import summary_line

        console.print(summary_line(results["calibration"]))
    if results.get("pixel_calibration"):  # segmentation: per-pixel probabilities
        from medlite.tasks.calibration import pixel_summary_line

        console.print(pixel_summary_line(results["pixel_calibration"]))
    if results.get("compression", {}).get("stages"):
        console.print(compression_table(results))
    eff = results.get("efficiency")
    if eff:
        console.print(
            f"MACs {eff['macs'] / 1e6:.1f} M | {eff['size_mb']:.2f} MB | CPU latency (batch 1, {eff['threads']} threads) "
            f"{eff['latency_ms']:.2f} ms | throughput {eff['throughput_ips']:.0f} img/s (batch {eff['throughput_batch']})"
            + "".join(f" | {op}: {impl}" for op, impl in (eff.get("implementations") or {}).items())
        )
    params = results.get("model", {}).get("params")
    console.print(
        f"params {params:,} | wall time {results.get('wall_time_s', 0):.1f} s | status {results.get('status')}"
        if params is not None
        else f"status {results.get('status')}"
    )
    console.print(f"run directory: [bold]{results.get('run_dir')}[/bold]")


# ------------------------------------------------------------------ the task record, read back
# Readers of runs never name a metric: they take the names, titles and order from the ``task``
# block of results.json (``medlite.tasks.task_record`` rebuilds it for older files).


def monitored_metric(record: dict) -> str:
    """The name of the task's monitored metric (``val/<name>`` in the record)."""
    return str(record.get("monitor") or "").rsplit("/", 1)[-1]


def headline_metrics(record: dict) -> list[str]:
    """The metrics compact tables show, primary first (the task's ``headline``)."""
    names = list(record.get("headline") or record.get("metrics") or [])
    return names or [monitored_metric(record)]


def primary_metric(record: dict) -> tuple[str, str]:
    """``(name, "max" | "min")``: the metric one-number summaries rank on (the first of the
    headline) and which way is better. The record gives the direction of the monitored metric
    only; another primary metric is taken as higher-is-better."""
    name = headline_metrics(record)[0]
    mode = str(record.get("mode") or "max") if name == monitored_metric(record) else "max"
    return name, mode


def metric_title(record: dict, metric: str) -> str:
    """How tables title ``metric`` (the record's ``titles``; the name itself if untitled)."""
    return (record.get("titles") or {}).get(metric, metric)


def trust_cells(row: dict, primary: str) -> dict[str, float | None]:
    """A compression stage's trust numbers: test ECE before and after its temperature scaling,
    and the mean and relative value of the primary metric under corruptions (None where not
    measured)."""
    robust = (row.get("robustness") or {}).get(primary) or {}
    return {
        "ece": (row.get("test") or {}).get("ece"),
        "ece_scaled": ((row.get("calibrated") or {}).get("test") or {}).get("ece"),
        "corrupted": robust.get("mean_corrupted"),
        "relative": robust.get("relative"),
    }


def compression_table(results: dict) -> Table:
    """Before/after: accuracy (the task's headline metrics), trust (ECE before/after temperature
    scaling, mean primary metric under corruptions: where measured) and cost of every stage of a
    compression recipe, side by side."""
    from medlite.tasks import task_record

    record = task_record(results)
    metrics = headline_metrics(record)
    primary = primary_metric(record)[0]
    comp = results["compression"]
    trust = [trust_cells(row, primary) for row in comp["stages"]]
    has = {k: any(t[k] is not None for t in trust) for k in ("ece", "ece_scaled", "corrupted")}
    table = Table(title=f"compress={results.get('compress', {}).get('name')}: before / after")
    table.add_column("stage", justify="left")
    for m in metrics:
        table.add_column(f"test {metric_title(record, m)}", justify="right")
    if has["ece"]:
        table.add_column("ECE", justify="right")
    if has["ece_scaled"]:
        table.add_column("ECE after T", justify="right")
    if has["corrupted"]:
        table.add_column(f"corrupted {metric_title(record, primary)} (rel.)", justify="right")
    deployed = any((r.get("efficiency") or {}).get("deployed_latency_ms") for r in comp["stages"])
    for col in (
        "params",
        "MACs (M)",
        "size (MB)",
        *(["deployed bs1 (ms)"] if deployed else []),
        "eager bs1 (ms)" if deployed else "latency bs1 (ms)",
        "throughput (img/s)",
    ):
        table.add_column(col, justify="right")
    first = comp["stages"][0].get("efficiency")
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731

    def against_first(eff: dict, key: str) -> str:
        """The stage's latency and its speed-up over the first stage's, e.g. ``0.41 (2.3x)``."""
        value = eff.get(key)
        text = num(value, ".3f")
        if first and value and first.get(key) and eff is not first:
            text += f" ({first[key] / value:.1f}x)"
        return text

    for row, tr in zip(comp["stages"], trust, strict=True):
        eff, test = row.get("efficiency") or {}, row.get("test") or {}
        where = {"pytorch": "eager", "onnxruntime": "ORT"}.get(eff.get("deployed_runtime"), "")
        deployed_cell = [f"{against_first(eff, 'deployed_latency_ms')} {where}".strip()]
        trust_row = [num(tr[k], ".4f") for k in ("ece", "ece_scaled") if has[k]]
        if has["corrupted"]:
            rel = f" ({tr['relative']:.2f})" if tr["relative"] is not None else ""
            trust_row.append(num(tr["corrupted"], ".4f") + rel)
        table.add_row(
            row["stage"],
            *(num(test.get(m), ".4f") for m in metrics),
            *trust_row,
            num(eff.get("params"), ","),
            num(eff["macs"] / 1e6 if eff.get("macs") is not None else None, ".2f"),
            num(eff.get("size_mb"), ".3f"),
            *(deployed_cell if deployed else []),
            against_first(eff, "latency_ms"),
            num(eff.get("throughput_ips"), ".0f"),
        )
    return table
