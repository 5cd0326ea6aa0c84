"""End-of-sweep summary: how many jobs succeeded, which failed and why.

A Hydra callback (registered in ``conf/hydra/default.yaml``): after a multirun it reads each
job's ``results.json`` (failed jobs leave one too, see ``medlite.cli``), prints a short report,
writes ``sweep_summary.json`` in the sweep directory, and ends the command with exit status 1
when a job (or an Optuna trial) failed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from medlite.console import make_console
from medlite.results import primary_metric, write_json

log = logging.getLogger(__name__)


def summarise_sweep(sweep_dir: str | Path) -> dict:
    """Status of every job directory under ``sweep_dir`` (one level: Hydra's job subdirs), with
    each job's primary test metric (the first of its task's headline: ``metric`` and ``test``)."""
    from medlite.tasks import task_record

    sweep_dir = Path(sweep_dir)
    jobs = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        file = job / "results.json"
        if not file.is_file():
            if (job / ".hydra").is_dir():  # a job Hydra started that recorded nothing
                jobs.append({"job": job.name, "status": "missing", "error": "no results.json"})
            continue
        try:
            res = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            jobs.append({"job": job.name, "status": "unreadable", "error": str(err)})
            continue
        error = (res.get("error") or "").strip().splitlines()
        metric, _ = primary_metric(task_record(res))
        jobs.append(
            {
                "job": job.name,
                "status": res.get("status"),
                "error": error[0] if error else None,
                "metric": metric,
                "test": (res.get("test") or {}).get(metric),
                "wall_time_s": res.get("wall_time_s"),
            }
        )
    ok = [j for j in jobs if j["status"] == "ok"]
    return {
        "sweep_dir": str(sweep_dir),
        "n_jobs": len(jobs),
        "n_ok": len(ok),
        "n_failed": len(jobs) - len(ok),
        "jobs": jobs,
    }


def print_sweep_summary(summary: dict, console: Console | None = None) -> None:
    console = console or make_console()
    console.print(
        f"sweep finished: [bold]{summary['n_ok']}[/bold] of {summary['n_jobs']} job(s) succeeded, "
        f"[bold red]{summary['n_failed']}[/bold red] failed ({summary['sweep_dir']})"
    )
    failed = [j for j in summary["jobs"] if j["status"] != "ok"]
    if failed:
        table = Table(title="failed jobs")
        table.add_column("job")
        table.add_column("status")
        table.add_column("error (first line)", overflow="fold")
        for j in failed:
            table.add_row(j["job"], str(j["status"]), j["error"] or "")
        console.print(table)
    console.print(f"aggregate: python scripts/aggregate.py {summary['sweep_dir']}")


def _failed_trials(sweep_dir: Path) -> int:
    """Failed trials of an Optuna search (``optuna_best.json``), those whose config did not
    compose included: they never got a job folder."""
    try:
        return int(json.loads((sweep_dir / "optuna_best.json").read_text()).get("n_failed") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


class SweepSummary(Callback):
    """Hydra callback: the summary at the end of every multirun; then exit status 1 when a
    job failed, so schedulers, CI and wrappers see it (the other jobs ran, the summary is
    written: a failing job still never stops a sweep)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        summary = None
        try:
            summary = summarise_sweep(sweep_dir)
            write_json(sweep_dir / "sweep_summary.json", summary)
            print_sweep_summary(summary)
        except Exception as err:  # noqa: BLE001 - a summary must never turn a sweep into a failure
            log.warning("could not summarise the sweep in %s: %s", sweep_dir, err)
        if summary is not None and (summary["n_failed"] or _failed_trials(sweep_dir)):
            # SystemExit, as Hydra turns a callback's exception into a warning. End callbacks
            # run in reverse order: any listed after this one have run already.
            raise SystemExit(1)
