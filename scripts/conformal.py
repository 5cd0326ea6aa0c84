"""Calibrate conformal prediction sets for an existing run (one trained before runs recorded
them): APS on its validation split, coverage and set size on its test split, written into its
results.json so ``predict.py coverage=0.95`` works. Usage: python scripts/conformal.py run=<dir>"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import MISSING
from rich.console import Console

from medlite.compress.evaluate import split_logits
from medlite.deploy.commands import run_command
from medlite.deploy.run_dir import TrainedRun
from medlite.results import write_json
from medlite.tasks import conformal


@dataclass
class ConformalCommand:
    """python scripts/conformal.py run=<run dir> [method=auto|aps|raps|lac] [data_dir=...]"""

    run: str = MISSING
    #: auto (lac for two classes, aps otherwise), aps, raps (APS with a penalty on large sets)
    #: or lac (score 1 - p(class))
    method: str = "auto"
    #: folder of the MedMNIST file (default: where the run found it, else MEDLITE_DATA_DIR)
    data_dir: str | None = None
    show_traceback: bool = False


def conformal_main(args: ConformalCommand, console: Console) -> int:
    """Calibrate on the run's PyTorch model (the run's temperature applied) and record it."""
    run = TrainedRun.load(args.run)
    conformal.check_task(run.task.type)
    if args.method != "auto":
        conformal.check_method(args.method)
    dm = run.datamodule(args.data_dir)
    outputs = split_logits(run.torch_model(), dm)
    record = conformal.calibrate_logits(outputs, run.task.type, run.results, method=args.method)
    run.results[conformal.KEY] = record
    write_json(run.path / "results.json", run.results)
    console.print(conformal.summary_line(record), highlight=False)
    console.print(f"recorded in {run.path / 'results.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(conformal_main, ConformalCommand, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
