"""The test split under every corruption x severity: metrics, summary and the report files.

The corruptions act on the stored uint8 test images; the run's own preprocessing and model (or
its ONNX file) then score them exactly as the clean test split is scored, through the one plain
evaluation loop (:func:`medlite.compress.evaluate.predict_scores`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader

from medlite.atomic import atomic_path, write_text
from medlite.compress.evaluate import predict_scores
from medlite.data.datamodule import ArrayDataset, MaskDataset
from medlite.data.transforms import Preprocess
from medlite.errors import ConfigError
from medlite.results import write_json
from medlite.robustness.corruptions import CORRUPTIONS, PARAMETERS, SEVERITIES, corrupt_all
from medlite.tasks import Task

log = logging.getLogger(__name__)

#: where the report goes inside a run directory
ROBUSTNESS_DIR = "robustness"
CLEAN = "clean"


@dataclass
class RobustnessSettings:
    """What to corrupt and how much (the keys are also `scripts/robustness.py` arguments)."""

    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES))
    seed: int = 0
    #: score only the first N test images (null: all)
    limit: int | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if unknown or not self.corruptions:
            raise ConfigError(
                f"corruptions must be a non-empty subset of {list(CORRUPTIONS)}, got "
                f"{self.corruptions}"
            )
        bad = [s for s in self.severities if s not in SEVERITIES]
        if bad or not self.severities:
            raise ConfigError(f"severities must be a non-empty subset of {list(SEVERITIES)}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError("limit must be at least 2 test images (or null for all)")


def metric_names(task: Task) -> list[str]:
    """The monitored metric (ranking; Dice for segmentation) first, then accuracy if the task
    has it (IoU for segmentation)."""
    if task.kind == "segmentation":
        return list(task.headline)
    names = [task.monitor_metric]
    names += [m for m in task.metric_names if m.startswith("acc") and m not in names][:1]
    return names


def supported(task: Task, spatial_dims: int) -> bool:
    """2D classification and 2D segmentation (the corruptions act on 2D images)."""
    return task.kind in ("classification", "segmentation") and spatial_dims == 2


def check_task(task: Task, spatial_dims: int) -> None:
    if not supported(task, spatial_dims):
        raise ConfigError(
            "robustness under corruptions is measured for 2D classification and segmentation "
            "runs only"
        )


def _score(model, images, labels, preprocess: Preprocess, task: Task, batch: int) -> dict:
    """Metrics of ``model`` on corrupted images; a segmentation mask is never corrupted (the
    truth does not change with the scanner)."""
    data_class = MaskDataset if task.kind == "segmentation" else ArrayDataset
    loader = DataLoader(data_class(images, labels, preprocess), batch_size=batch)
    y, s = predict_scores(model, loader, task)
    scores = task.metrics(y, s)
    return {m: float(scores[m]) for m in metric_names(task)}


def evaluate_robustness(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    preprocess: Preprocess,
    task: Task,
    settings: RobustnessSettings | None = None,
    console: Console | None = None,
) -> dict:
    """Clean and corrupted metrics of ``model`` on uint8 ``images``; the robustness record."""
    settings = settings or RobustnessSettings()
    if settings.limit:
        images, labels = images[: settings.limit], labels[: settings.limit]
    images, labels = np.asarray(images), np.asarray(labels)
    bs = settings.batch_size
    rows = [
        {"corruption": CLEAN, "severity": 0, **_score(model, images, labels, preprocess, task, bs)}
    ]
    with Progress(transient=True, console=console) as progress:
        bar = progress.add_task("corruptions", total=len(settings.corruptions))
        for name in settings.corruptions:
            progress.update(bar, description=f"corruption {name}")
            for sev in settings.severities:
                bad = corrupt_all(images, name, int(sev), settings.seed)
                scores = _score(model, bad, labels, preprocess, task, bs)
                rows.append({"corruption": name, "severity": int(sev), **scores})
            progress.advance(bar)
    return {
        "task": task.record(),
        "metrics": metric_names(task),
        "n_test_images": len(images),
        "seed": settings.seed,
        "severities": [int(s) for s in settings.severities],
        "parameters": {c: list(PARAMETERS[c]) for c in settings.corruptions},
        "rows": rows,
        "summary": summarise(rows, metric_names(task)),
    }


def summarise(rows: list[dict], metrics: list[str]) -> dict:
    """Clean value, mean over every corruption x severity, and relative robustness (their
    ratio: 1 = unaffected) of each metric."""
    clean = next(r for r in rows if r["corruption"] == CLEAN)
    out: dict = {}
    for m in metrics:
        values = [r[m] for r in rows if r["corruption"] != CLEAN and r[m] == r[m]]
        mean = float(np.mean(values)) if values else float("nan")
        out[m] = {
            CLEAN: clean[m],
            "mean_corrupted": mean,
            "relative": mean / clean[m] if clean[m] else float("nan"),
        }
    return out


# ---------------------------------------------------------------------- report files
def markdown_table(record: dict) -> str:
    """One row per corruption, one column per severity, cells 'metric / acc', and the summary."""
    task, metrics = record["task"], record["metrics"]
    titles = [task.get("titles", {}).get(m, m) for m in metrics]
    sevs = record["severities"]
    lines = [
        f"# Robustness under corruptions ({_about(record)}, {record['n_test_images']} test images)",
        "",
        f"Cells: {' / '.join(titles)}. Severity parameters: see medlite/robustness/corruptions.py.",
        "",
        "| corruption | " + " | ".join(f"severity {s}" for s in sevs) + " | mean |",
        "|---|" + "---:|" * (len(sevs) + 1),
    ]
    rows = record["rows"]

    def cell(r: dict) -> str:
        return " / ".join(f"{r[m]:.4f}" for m in metrics)

    clean = rows[0]
    lines.append("| clean | " + "- | " * len(sevs) + f"{cell(clean)} |")
    for name in record["parameters"]:
        own = {r["severity"]: r for r in rows if r["corruption"] == name}
        means = " / ".join(f"{np.mean([own[s][m] for s in sevs]):.4f}" for m in metrics)
        lines.append(f"| {name} | " + " | ".join(cell(own[s]) for s in sevs) + f" | {means} |")
    lines += [
        "",
        "| metric | clean | mean corrupted | relative robustness |",
        "|---|---:|---:|---:|",
    ]
    for m, t in zip(metrics, titles, strict=True):
        s = record["summary"][m]
        lines.append(f"| {t} | {s[CLEAN]:.4f} | {s['mean_corrupted']:.4f} | {s['relative']:.3f} |")
    return "\n".join(lines) + "\n"


def _about(record: dict) -> str:
    """``pytorch``, or ``stage kd, pytorch`` for a compression stage's report."""
    runtime = record.get("runtime", "pytorch")
    return f"stage {record['stage']}, {runtime}" if record.get("stage") else runtime


def heat_map(record: dict, path: Path) -> Path:
    """The primary metric per corruption x severity as a heat map (PNG); clean value on top."""
    from matplotlib.figure import Figure

    metric = record["metrics"][0]
    title = record["task"].get("titles", {}).get(metric, metric)
    names, sevs = list(record["parameters"]), record["severities"]
    value = {(r["corruption"], r["severity"]): r[metric] for r in record["rows"]}
    grid = np.array([[value[(n, s)] for s in sevs] for n in names])
    fig = Figure(figsize=(1.2 + 0.9 * len(sevs), 0.8 + 0.45 * len(names)), dpi=120)
    ax = fig.subplots()
    im = ax.imshow(
        grid,
        cmap="viridis",
        aspect="auto",
        vmin=np.nanmin(grid),
        vmax=max(np.nanmax(grid), record["summary"][metric][CLEAN]),
    )
    for i in range(len(names)):
        for j in range(len(sevs)):
            light = im.norm(grid[i, j]) > 0.6  # viridis turns yellow: dark text there
            ax.text(
                j,
                i,
                f"{grid[i, j]:.3f}",
                ha="center",
                va="center",
                fontsize=7,
                color="k" if light else "w",
            )
    ax.set_xticks(range(len(sevs)), [str(s) for s in sevs])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity")
    clean = record["summary"][metric][CLEAN]
    stage = f"stage {record['stage']}: " if record.get("stage") else ""
    ax.set_title(f"{stage}test {title} under corruptions (clean {clean:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def report_stem(runtime: str) -> str:
    """``robustness`` for PyTorch, ``robustness_<runtime>`` otherwise: runtimes sit side by side."""
    return "robustness" if runtime == "pytorch" else f"robustness_{runtime}"


def write_report(record: dict, run_dir: str | Path, stem: str | None = None) -> Path:
    """``<stem>.json``, ``.md`` and ``.png`` in ``<run_dir>/robustness`` (stem: by runtime unless
    given); the JSON's path."""
    out = Path(run_dir) / ROBUSTNESS_DIR
    stem = stem or report_stem(record.get("runtime", "pytorch"))
    write_text(out / f"{stem}.md", markdown_table(record))
    heat_map(record, out / f"{stem}.png")
    return write_json(out / f"{stem}.json", record)
