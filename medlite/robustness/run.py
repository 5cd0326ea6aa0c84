"""``scripts/robustness.py run=<run dir>`` and the ``eval.robustness`` hook of training.

The model is scored on the runtime it is deployed with: PyTorch (default), or the run's fp32 /
int8 ONNX file through ONNX Runtime, so an int8 model's robustness is its own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from omegaconf import MISSING
from rich.console import Console
from rich.table import Table
from torch import nn

from medlite.deploy.export import FILE_NAMES
from medlite.deploy.onnx import OrtModel
from medlite.deploy.run_dir import TrainedRun
from medlite.errors import ConfigError
from medlite.robustness.corruptions import CORRUPTIONS
from medlite.robustness.evaluate import (
    CLEAN,
    RobustnessSettings,
    check_task,
    evaluate_robustness,
    supported,
    write_report,
)

log = logging.getLogger(__name__)

RUNTIMES = ("pytorch", "onnx", "int8")
#: predict.py's and benchmark's names for the same runtimes
ALIASES = {"onnx_fp32": "onnx", "onnx_int8": "int8"}


@dataclass
class RobustnessCommand(RobustnessSettings):
    """python scripts/robustness.py run=<run dir> [runtime=pytorch|onnx|int8] [severities=[1,5]]"""

    run: str = MISSING
    runtime: str = "pytorch"
    data_dir: str | None = None
    show_traceback: bool = False


def runtime_model(run: TrainedRun, runtime: str) -> nn.Module:
    """The run's model on ``runtime``; a missing file names the command that makes it."""
    runtime = ALIASES.get(runtime, runtime)
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "pytorch":
        return run.torch_model()
    if runtime == "onnx":
        path = run.export_dir / FILE_NAMES["onnx_fp32"]
    else:
        path = run.int8_onnx or run.export_dir / FILE_NAMES["onnx_int8"]
    if not path.is_file():
        raise ConfigError(
            f"run {run.path} has no {path.name}; make it with "
            f"`python scripts/export.py run={run.path}` first"
        )
    return OrtModel(path)


def robustness_run(
    run: TrainedRun | str | Path,
    settings: RobustnessSettings | None = None,
    *,
    runtime: str = "pytorch",
    data_dir: str | None = None,
    console: Console | None = None,
) -> dict:
    """Score a finished run's test split under the corruptions; writes ``<run>/robustness/``."""
    run = run if isinstance(run, TrainedRun) else TrainedRun.load(run)
    check_task(run.task, run.spatial_dims)
    settings = settings or RobustnessSettings()
    runtime = ALIASES.get(runtime, runtime)
    model = runtime_model(run, runtime)
    test = run.datamodule(data_dir).source.load()["test"]
    record = evaluate_robustness(
        model, test.images, test.labels, run.preprocess, run.task, settings, console
    )
    record = {"model": run.name, "runtime": runtime, **record}
    record["report"] = str(write_report(record, run.path))
    return record


def runtime_of(model: nn.Module) -> str:
    """The runtime a model object stands for: an ONNX Runtime session (fp32 or int8) or PyTorch."""
    if isinstance(model, OrtModel):
        return "int8" if "int8" in model.path.name else "onnx"
    return "pytorch"


def measure(model: nn.Module, dm, cfg) -> dict | None:
    """The robustness record of ``model`` on the datamodule's test split, with the settings of
    training's hook; None for tasks it is not measured for (volumes)."""
    if not supported(dm.task, dm.spatial_dims):
        return None
    settings = RobustnessSettings(batch_size=int(cfg.data.get("eval_batch_size") or 256))
    test = dm.source.load()["test"]
    record = evaluate_robustness(
        _OnDevice(model), test.images, test.labels, dm.preprocess, dm.task, settings
    )
    return {"model": cfg.model.name, "runtime": runtime_of(model), **record}


def results_entry(record: dict, report: Path, output_dir: Path) -> dict:
    """What results.json keeps of a record: runtime, size, the report (relative: the run can
    move) and the clean / mean corrupted / relative value of each metric."""
    return {
        "runtime": record["runtime"],
        "n_test_images": record["n_test_images"],
        "report": str(report.relative_to(output_dir)),
        **record["summary"],
    }


def robustness_after_training(model: nn.Module, dm, output_dir: Path, cfg) -> dict | None:
    """``eval.robustness=true``: the final model's report, and its summary for results.json."""
    record = measure(model, dm, cfg)
    if record is None:
        return None
    report = write_report(record, output_dir)
    log.info(
        "robustness under corruptions (%s): %s", record["runtime"], summary_line(record, dm.task)
    )
    return results_entry(record, report, output_dir)


def stage_stem(stage: str) -> str:
    """Where a compression stage's report goes inside ``robustness/`` (``ptq/onnx_fp32`` ->
    ``stages/ptq_onnx_fp32``)."""
    return "stages/" + stage.replace("/", "_")


def robustness_of_stage(model: nn.Module, dm, output_dir: Path, cfg, stage: str) -> dict | None:
    """One compression stage under the corruptions: ``robustness/stages/<stage>.*`` and the
    summary for its row of results.json ``compression.stages``."""
    record = measure(model, dm, cfg)
    if record is None:
        return None
    record["stage"] = stage
    report = write_report(record, output_dir, stem=stage_stem(stage))
    log.info("stage %s under corruptions: %s", stage, summary_line(record, dm.task))
    return results_entry(record, report, output_dir)


def summary_line(record: dict, task) -> str:
    """``AUC 0.897 clean -> 0.755 corrupted (0.84 relative); ...`` for the log."""
    return "; ".join(
        f"{task.title(m)} {s[CLEAN]:.3f} clean -> {s['mean_corrupted']:.3f} corrupted "
        f"({s['relative']:.2f} relative)"
        for m, s in record["summary"].items()
    )


class _OnDevice(nn.Module):
    """Feeds CPU batches to a model trained on a GPU (the loop's tensors stay on the CPU)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)  # the loop restores this mode afterwards: keep the model's

    def forward(self, x):
        param = next(self.model.parameters(), None)
        return self.model(x if param is None else x.to(param.device)).cpu()


def summary_table(record: dict) -> Table:
    """Clean vs mean corrupted value and their ratio, per metric."""
    titles = record["task"].get("titles", {})
    table = Table(
        title=f"robustness of {record['model']} via {record['runtime']} "
        f"({record['n_test_images']} test images)"
    )
    for col in ("metric", "clean", "mean corrupted", "relative"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for m, s in record["summary"].items():
        table.add_row(
            titles.get(m, m),
            f"{s[CLEAN]:.4f}",
            f"{s['mean_corrupted']:.4f}",
            f"{s['relative']:.3f}",
        )
    return table


def robustness_main(args: RobustnessCommand, console: Console) -> int:
    keys = RobustnessSettings.__dataclass_fields__
    settings = RobustnessSettings(**{k: v for k, v in asdict(args).items() if k in keys})
    record = robustness_run(
        args.run, settings, runtime=args.runtime, data_dir=args.data_dir, console=console
    )
    console.print(summary_table(record))
    report = Path(record["report"])
    console.print(f"{report.stem}.json, .md and .png: [bold]{report.parent}[/bold]")
    return 0


HELP = {
    "run": "run directory written by train.py (holds results.json)",
    "runtime": "pytorch | onnx | int8 (the run's export/model.onnx, its int8 file)",
    "corruptions": f"subset of {list(CORRUPTIONS)}",
    "severities": "subset of [1,2,3,4,5]",
    "seed": "seed of the random corruptions (noise)",
    "limit": "score only the first N test images (null: all)",
    "batch_size": "images per forward pass",
    "data_dir": "folder of the MedMNIST file (default: where the run found it, or MEDLITE_DATA_DIR)",
    "show_traceback": "print the full traceback of medlite's errors",
}


def usage() -> str:
    lines = [(RobustnessCommand.__doc__ or "").strip(), "", "arguments (key=value):"]
    for f in fields(RobustnessCommand):
        default = f.default_factory() if f.default_factory is not MISSING_FIELD else f.default
        shown = "required" if default == MISSING else f"default {default}"
        lines.append(f"  {f.name:<16} {HELP.get(f.name, '')} ({shown})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from medlite.deploy.commands import run_command

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    return run_command(robustness_main, RobustnessCommand, argv)
