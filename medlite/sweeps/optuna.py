"""Hyperparameter search with Optuna, as a Hydra sweeper: ``python train.py -m sweep=optuna_kd``.

Why our own sweeper and not ``hydra-optuna-sweeper``: its last release (1.3.0) pins
``optuna<3``, which does not install next to SQLAlchemy 2 and current Python packages. This
one talks to the current Optuna API directly and is small enough to read in one sitting.

How it runs: Optuna proposes each trial's values, Hydra's launcher (basic, joblib or SLURM) runs
them as ordinary jobs, each in its own run directory with its own ``results.json`` and W&B run,
and the objectives are read back from each job's ``results.json`` (so several objectives, e.g.
the task's validation metric and MACs, are as easy as one). The default objective is
``optimized/value``, maximised: the value of the metric each run reports as optimised
(``optimized_metric``; null means its task's monitored metric, validation AUC for
classification). A trial whose job fails, or whose objective is
missing or not finite (a NaN loss), is told to Optuna as FAILED and the study goes on. The study
lives in ``<sweep dir>/optuna.db`` (SQLite): running the same command with the same
``hydra.sweep.dir`` continues it up to ``n_trials``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from medlite.errors import ConfigError
from medlite.results import lookup, read_json

log = logging.getLogger(__name__)

# Hydra instantiates this sweeper (conf/hydra/sweeper/medlite_optuna.yaml) under the name
# hydra_plugins.medlite.OptunaSweeper: medlite/sweeps/hydra_plugins/medlite.py, installed as part
# of Hydra's plugin namespace package, where Hydra's plugin scan finds it.

# hydra.sweeper.sampler -> optuna.samplers class
SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "qmc": "QMCSampler",
    "nsga2": "NSGAIISampler",
}


#: what each run reports as optimised (pipeline: ``results["optimized"]``), and its direction
OPTIMIZED_VALUE = "optimized/value"
OPTIMIZED_MODE = "optimized/mode"
_DIRECTIONS = {"max": "maximize", "min": "minimize"}


@dataclass
class Objective:
    """One number to optimise, read from a job's results.json (``optimized/value``,
    ``val/<metric>``, ``efficiency/macs``, ...)."""

    metric: str
    direction: str = "maximize"

    def read(self, results: dict) -> float | None:
        try:
            value = float(lookup(results, self.metric))
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def conflict(self, results: dict) -> str | None:
        """Why this objective can't take the run's value, or None. ``optimized/value`` comes
        with the direction the run's task gives it (``optimized/mode``); a study's directions are
        fixed when it is created, so a run whose metric goes the other way fails its trial."""
        if self.metric != OPTIMIZED_VALUE:
            return None
        mode = lookup(results, OPTIMIZED_MODE)
        wanted = _DIRECTIONS.get(str(mode))
        if wanted is None or wanted == self.direction:
            return None
        metric = lookup(results, "optimized/metric")
        return (
            f"the study {self.direction}s {OPTIMIZED_VALUE} but this run's optimized metric "
            f"({metric}) is better when {'lower' if mode == 'min' else 'higher'} (mode {mode}); "
            f"set hydra.sweeper.objectives=[{{metric: {OPTIMIZED_VALUE}, direction: {wanted}}}]"
        )


def parse_objectives(objectives: Any) -> list[Objective]:
    """``null`` -> maximise ``optimized/value`` (each run's ``optimized_metric``, the task's
    monitored metric by default); else a list of ``{metric, direction}``."""
    if not objectives:
        return [Objective(OPTIMIZED_VALUE, "maximize")]
    parsed = []
    for item in objectives:
        item = dict(item)
        direction = str(item.get("direction", "maximize"))
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"objective {item}: direction must be maximize or minimize")
        if "metric" not in item or "/" not in str(item["metric"]):
            raise ConfigError(
                f"objective {item}: give metric as a path in results.json, e.g. "
                f"{OPTIMIZED_VALUE}, val/<metric> or efficiency/latency_ms"
            )
        parsed.append(Objective(str(item["metric"]), direction))
    return parsed


# ------------------------------------------------------------------------------ search space


def distribution(override: Override):
    """A Hydra sweep override -> an Optuna distribution.

    ``choice(a, b)`` -> categorical; ``range(lo, hi, step)`` -> integer (or float) steps from
    ``lo`` up to the last value below ``hi``, as Python's range; ``interval(lo, hi)`` -> uniform
    float (Hydra's intervals are floats: use range for integers); ``tag(log, interval(lo, hi))``
    -> log-uniform.
    """
    import optuna.distributions as od

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        choices = list(override.sweep_iterator(transformer=lambda x: x))
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise ConfigError(f"{key}: choice() values must be numbers, strings or null")
        return od.CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        values = list(override.sweep_iterator(transformer=lambda x: x))
        if not values:
            raise ConfigError(f"{key}: range({start}, {stop}, {step}) is empty")
        if all(isinstance(v, int) for v in (start, stop, step)):
            return od.IntDistribution(int(values[0]), int(values[-1]), step=int(step))
        return od.FloatDistribution(float(values[0]), float(values[-1]), step=float(step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        lo, hi = value.start, value.end
        if lo is None or hi is None or lo >= hi:
            raise ConfigError(f"{key}: interval needs low < high, got ({lo}, {hi})")
        if log_scale and lo <= 0:
            raise ConfigError(f"{key}: a log interval must start above 0, got {lo}")
        return od.FloatDistribution(float(lo), float(hi), log=log_scale)
    raise ConfigError(
        f"{key}={override.get_value_element_as_str()}: use choice(...), range(...), "
        "interval(...) or tag(log, interval(...)) in an Optuna search"
    )


def split_search_space(
    params: dict[str, str], arguments: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """(the searched keys -> distributions, the fixed overrides every trial gets). The search
    space is the config's ``params`` plus any sweep given on the command line (``optim.lr=
    interval(1e-4,1e-2)``); a plain ``key=value`` on the command line is fixed for all trials
    and wins over ``params``."""
    parser = OverridesParser.create()
    space: dict[str, Any] = {}
    fixed: list[str] = []
    config_overrides = parser.parse_overrides([f"{k}={v}" for k, v in (params or {}).items()])
    cli_overrides = parser.parse_overrides(list(arguments))
    cli_keys = {o.get_key_element() for o in cli_overrides}
    for override in config_overrides:
        key = override.get_key_element()
        if key in cli_keys:
            continue
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed.append(override.input_line)
    for override in cli_overrides:
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        else:
            fixed.append(override.input_line)
    if not space:
        raise ConfigError(
            "the Optuna search has nothing to search: give hydra.sweeper.params (see "
            "conf/sweep/optuna_kd.yaml) or a sweep override such as 'optim.lr=interval(1e-4,1e-2)'"
        )
    return space, fixed


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# ----------------------------------------------------------------------------------- sweeper


def _make_sampler(name: str, seed: int | None):
    import optuna

    if name not in SAMPLERS:
        raise ConfigError(f"hydra.sweeper.sampler={name}: choose one of {', '.join(SAMPLERS)}")
    return getattr(optuna.samplers, SAMPLERS[name])(seed=seed)


class OptunaSweeper(Sweeper):
    """Hydra sweeper: ask Optuna for ``n_jobs`` trials at a time, launch them as jobs, tell
    Optuna each job's objective(s) or its failure; write the study's results in the sweep dir."""

    def __init__(
        self,
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: str = "tpe",
        seed: int | None = 0,
        objectives: Any = None,
        study_name: str | None = None,
        storage: str | None = None,
        params: Any = None,
    ) -> None:
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ConfigError("hydra.sweeper.n_trials and n_jobs must be at least 1")
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.sampler_name = str(sampler)
        self.seed = seed
        self.objectives_cfg = objectives
        self.study_name = study_name
        self.storage = storage
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list:
        import optuna

        assert self.config is not None and self.launcher is not None
        objectives = parse_objectives(self.objectives_cfg)
        space, fixed = split_search_space(
            {str(k): str(v) for k, v in self.params.items()}, arguments
        )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=self.study_name or sweep_dir.name,
            storage=storage,
            directions=[o.direction for o in objectives],
            load_if_exists=True,
        )
        self._fail_interrupted(study)
        # a continued study must not replay the proposals of its first session
        earlier = len(study.trials)
        study.sampler = _make_sampler(
            self.sampler_name, None if self.seed is None else int(self.seed) + earlier
        )
        log.info(
            "Optuna: %d trial(s), %d at a time, %s sampler, %s; searching %s",
            self.n_trials,
            self.n_jobs,
            self.sampler_name,
            ", ".join(_describe(o, self.config) for o in objectives),
            ", ".join(space),
        )
        returns: list = []
        while (done := len(study.trials)) < self.n_trials:
            batch = min(self.n_jobs, self.n_trials - done)
            trials = [study.ask(space) for _ in range(batch)]
            overrides = [
                [*fixed, *(f"{k}={_override_value(v)}" for k, v in t.params.items())]
                for t in trials
            ]
            launch = []
            for trial, trial_overrides in zip(trials, overrides, strict=True):
                try:  # a proposal that does not compose (e.g. an unknown model) fails alone
                    self.validate_batch_is_legal([trial_overrides])
                except Exception as err:  # noqa: BLE001 - Hydra's composition errors vary
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    trial.set_user_attr("error", f"config does not compose: {first}")
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("trial %d failed: %s", trial.number, trial.user_attrs["error"])
                    continue
                launch.append((trial, trial_overrides))
            if not launch:
                continue
            jobs = self.launcher.launch([o for _, o in launch], initial_job_idx=launch[0][0].number)
            for (trial, _), job in zip(launch, jobs, strict=True):
                self._tell(study, trial, job, objectives)
            returns.append(jobs)
        print_study_report(write_study_report(study, objectives, sweep_dir), sweep_dir)
        return returns

    @staticmethod
    def _fail_interrupted(study) -> None:
        """Trials left RUNNING by a killed study can never finish: mark them failed."""
        import optuna

        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)

    @staticmethod
    def _tell(study, trial, job, objectives: list[Objective]) -> None:
        import optuna
        from hydra.core.utils import JobStatus

        output_dir = _job_output_dir(job)
        trial.set_user_attr("job_dir", str(output_dir) if output_dir else None)
        results = _read_results(output_dir)
        values = [o.read(results) for o in objectives] if results else [None] * len(objectives)
        failed = job.status != JobStatus.COMPLETED or results.get("status") not in (None, "ok")
        conflicts = [c for o in objectives if (c := o.conflict(results))]
        if not failed and conflicts:
            trial.set_user_attr("error", conflicts[0])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.error("trial %d failed: %s", trial.number, conflicts[0])
            return
        if failed or any(v is None for v in values):
            error = results.get("error") or (
                repr(job._return_value) if job.status != JobStatus.COMPLETED else None
            )
            missing = [o.metric for o, v in zip(objectives, values, strict=True) if v is None]
            reason = (error or f"no finite {', '.join(missing)} in results.json").splitlines()
            trial.set_user_attr("error", reason[0] if reason else "failed")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, trial.user_attrs["error"])
            return
        study.tell(trial, values if len(values) > 1 else values[0])


def _describe(objective: Objective, config: DictConfig) -> str:
    text = f"{objective.direction} {objective.metric}"
    if objective.metric == OPTIMIZED_VALUE:
        text += f" ({config.get('optimized_metric') or 'the task monitored metric of each run'})"
    return text


def _job_output_dir(job) -> Path | None:
    try:
        return Path(job.hydra_cfg.hydra.runtime.output_dir)
    except Exception:  # noqa: BLE001 - a job that failed before Hydra set it up
        return None


def _read_results(output_dir: Path | None) -> dict:
    if output_dir is None or not (output_dir / "results.json").is_file():
        return {}
    try:
        return read_json(output_dir / "results.json")
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------ report


def write_study_report(study, objectives: list[Objective], out_dir: Path) -> dict:
    """``optuna_trials.csv`` (every trial), ``optuna_best.json`` (the best trial, or the Pareto
    front for several objectives) and ``optuna_history.png``; returns the best-trial summary."""
    import optuna

    State = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    with open(out_dir / "optuna_trials.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["trial", "state", *[o.metric for o in objectives], *keys, "job_dir", "error"]
        )
        for t in trials:
            values = t.values if t.values is not None else [None] * len(objectives)
            writer.writerow(
                [
                    t.number,
                    t.state.name,
                    *values,
                    *[t.params.get(k) for k in keys],
                    t.user_attrs.get("job_dir"),
                    t.user_attrs.get("error"),
                ]
            )
    complete = [t for t in trials if t.state == State.COMPLETE]
    best = [] if not complete else study.best_trials
    summary = {
        "study": study.study_name,
        "objectives": [{"metric": o.metric, "direction": o.direction} for o in objectives],
        "n_trials": len(trials),
        "n_complete": len(complete),
        "n_failed": sum(t.state == State.FAIL for t in trials),
        "best": [
            {
                "trial": t.number,
                "values": dict(zip([o.metric for o in objectives], t.values, strict=True)),
                "params": t.params,
                "job_dir": t.user_attrs.get("job_dir"),
                "overrides": [f"{k}={_override_value(v)}" for k, v in t.params.items()],
            }
            for t in best
        ],
    }
    (out_dir / "optuna_best.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot_history(trials, objectives, best, out_dir / "optuna_history.png")
    return summary


def print_study_report(summary: dict, sweep_dir: Path) -> None:
    """The best trial (or the Pareto front) with the overrides that reproduce it."""
    from rich.table import Table

    from medlite.console import make_console

    console = make_console()
    console.print(
        f"Optuna study {summary['study']}: [bold]{summary['n_complete']}[/bold] trial(s) "
        f"complete, [bold red]{summary['n_failed']}[/bold red] failed"
    )
    if not summary["best"]:
        console.print(f"no trial completed; the errors are in {sweep_dir / 'optuna_trials.csv'}")
        return
    metrics = [o["metric"] for o in summary["objectives"]]
    title = "best trial" if len(metrics) == 1 else "Pareto front"
    table = Table(title=title)
    table.add_column("trial", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    table.add_column("overrides", overflow="fold")
    for b in summary["best"]:
        table.add_row(
            str(b["trial"]),
            *(f"{b['values'][m]:.4g}" for m in metrics),
            " ".join(b["overrides"]),
        )
    console.print(table)
    console.print(
        f"all trials: {sweep_dir / 'optuna_trials.csv'}, {sweep_dir / 'optuna_history.png'}"
    )


def _plot_history(trials, objectives: list[Objective], best, path: Path) -> None:
    """One objective: value per trial with the running best, failed trials marked at the
    bottom. Two or more: the first two objectives against each other, the front highlighted."""
    import optuna
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    State = optuna.trial.TrialState
    done = [t for t in trials if t.state == State.COMPLETE]
    failed = [t for t in trials if t.state == State.FAIL]
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    if len(objectives) == 1:
        o = objectives[0]
        xs = [t.number for t in done]
        ys = [t.values[0] for t in done]
        ax.plot(xs, ys, "o", color="tab:blue", label="trial")
        running = list(accumulate(ys, max if o.direction == "maximize" else min))
        if xs:
            ax.step(xs, running, where="post", color="tab:orange", label="best so far")
        if failed:
            floor = min(ys) if ys else 0.0
            ax.plot(
                [t.number for t in failed],
                [floor] * len(failed),
                "x",
                color="tab:red",
                label=f"failed ({len(failed)})",
            )
        ax.set_xlabel("trial")
        ax.set_ylabel(o.metric)
    else:
        a, b = objectives[0], objectives[1]
        front = {t.number for t in best}
        ax.plot(
            [t.values[1] for t in done],
            [t.values[0] for t in done],
            "o",
            color="tab:blue",
            alpha=0.6,
            label="trial",
        )
        ax.plot(
            [t.values[1] for t in best],
            [t.values[0] for t in best],
            "o",
            color="tab:orange",
            label=f"Pareto front ({len(front)})",
        )
        ax.set_xlabel(f"{b.metric} ({b.direction})")
        ax.set_ylabel(f"{a.metric} ({a.direction})")
    ax.set_title(f"Optuna: {len(done)} complete, {len(failed)} failed")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
