"""Aggregate a sweep: every job's results.json -> mean ± std over seeds, accuracy-vs-cost Pareto
front, tables and a plot, and the best model under a deployment budget.

A run directory's ``results.json`` (written by :mod:`medlite.pipeline`, or by :mod:`medlite.cli`
for a multirun job that failed before training) is the only input, so a sweep can be
aggregated long after it ran, on another machine, or merged with other sweeps (pass their
common parent). ``scripts/aggregate.py`` is the command line.

Which metrics there are comes from the runs' task records (``medlite.tasks.task_record``): a
column ``test_<metric>`` per metric of the sweep's task(s), the Pareto fronts and the selection
on the task's primary metric (the first of its headline). A sweep holds one task kind. Runs that
measured robustness (``eval.robustness=true``) add two more test metrics of the primary one:
``corrupted_<metric>`` (mean over every corruption x severity) and ``relative_<metric>`` (that
over clean). Any metric, ECE or corrupted AUC included, can be the fronts' axis instead.

Latency (``latency_ms``: tables, fronts, budgets, the plot) is the *deployed* one by default: for
a run that was exported with parity checks, the batch-1 latency of its fastest runtime that passed
them (``efficiency.deployed_latency_ms``, on ``efficiency.deployed_runtime``); for a run that was
not, its eager PyTorch profile. ``collect(..., latency="eager")`` ranks on eager PyTorch for all.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import operator
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medlite.errors import ConfigError
from medlite.results import headline_metrics, metric_title, primary_metric

log = logging.getLogger(__name__)

#: cost columns (from the run's efficiency profile; latency at batch 1 on CPU)
COSTS = ("params", "macs", "size_mb", "latency_ms", "throughput_ips")
#: which batch-1 latency ``latency_ms`` is (:func:`collect`), and how tables and plots say so
LATENCIES = {
    "deployed": "deployed latency (fastest exported runtime that passed parity; eager where a run "
    "was not exported)",
    "eager": "eager PyTorch latency",
}
#: the runtime of an eager latency (``latency_runtime``)
EAGER_RUNTIME = "pytorch"
#: what a latency was chosen from, next to ``latency_ms`` in the tables: the runtime it ran on
#: (text), the eager profile and the deployed latency (None for a run that was not exported)
LATENCY_DETAIL = ("latency_runtime", "eager_latency_ms", "deployed_latency_ms")
_AXIS_LABELS = {"deployed": "deployed", "eager": "eager PyTorch"}
#: one group = one configuration trained with several seeds
GROUP_KEYS = ("paradigm", "model", "compress", "data", "size")

_PARADIGM_ORDER = {"cnn": 0, "transformer": 1, "linear": 2}
#: metrics where lower is better (a task record states the direction of its monitored one only)
LOWER_IS_BETTER = frozenset({"ece", "mce", "brier", "nll", "hd95"})
#: robustness metrics of a test metric ``m``: their names and how tables title them
ROBUSTNESS_METRICS = {"corrupted": "corrupted {}", "relative": "relative {}"}
#: a compression stage's test ECE after its own temperature scaling
STAGE_ECE_SCALED = "ece_scaled"


@dataclass(frozen=True)
class SweepMetrics:
    """The test metrics of a sweep, from its runs' task records: every metric name in table
    order (the union over the runs, e.g. binary and multi-class datasets together), their
    titles, the headline compact tables show, and the primary metric fronts and selection rank
    on (the first of the headline) with its direction."""

    kind: str
    names: tuple[str, ...]
    titles: dict[str, str]
    headline: tuple[str, ...]
    primary: str
    mode: str  # "max" or "min": which way the primary metric improves

    @staticmethod
    def column(metric: str) -> str:
        """The summary/aggregate column of a test metric (``test_<metric>``)."""
        return f"test_{metric}"

    @property
    def primary_column(self) -> str:
        return self.column(self.primary)

    @property
    def higher_is_better(self) -> bool:
        return self.mode != "min"

    def title(self, metric: str) -> str:
        return self.titles.get(metric, metric)

    def higher_is_better_for(self, metric: str) -> bool:
        """Which way ``metric`` improves: the task's stated mode for the primary metric, lower
        for errors and distances (:data:`LOWER_IS_BETTER`), higher otherwise."""
        if metric == self.primary:
            return self.higher_is_better
        return metric not in LOWER_IS_BETTER

    def axis(self, metric: str | None = None) -> SweepMetrics:
        """These metrics with ``metric`` as the one fronts and plots score on (default: the
        primary); ConfigError naming the choices for a metric the sweep doesn't have."""
        if metric is None or metric == self.primary:
            return self
        name = metric.removeprefix("test_")
        if name not in self.names:
            raise ConfigError(
                f"no test metric {metric!r} in these runs; a Pareto axis is one of "
                f"{', '.join(self.names)}"
            )
        mode = "max" if self.higher_is_better_for(name) else "min"
        return replace(self, primary=name, mode=mode)

    def record_fields(self) -> tuple[str, ...]:
        """Columns of aggregate.csv (one row per job)."""
        return record_fields(self.names)

    def summary_fields(self) -> tuple[str, ...]:
        """Columns of summary.csv (one row per group)."""
        return summary_fields(self.names)


def record_fields(metric_names: Sequence[str]) -> tuple[str, ...]:
    """Columns of aggregate.csv for a sweep with these test metrics."""
    return (
        "job",
        "paradigm",
        "model",
        "arch",
        "compress",
        "data",
        "size",
        "seed",
        "status",
        "error",
        *(SweepMetrics.column(m) for m in metric_names),
        *(k for c in COSTS for k in ((c, *LATENCY_DETAIL) if c == "latency_ms" else (c,))),
        "wall_time_s",
        "run_dir",
    )


def summary_fields(metric_names: Sequence[str]) -> tuple[str, ...]:
    """Columns of summary.csv for a sweep with these test metrics (mean and std of each)."""
    columns = [SweepMetrics.column(m) for m in metric_names]
    return (
        *GROUP_KEYS,
        "n",
        "n_failed",
        "seeds",
        *(k for col in columns for k in (col, f"{col}_std")),
        *(
            k
            for c in COSTS
            for k in ((c, f"{c}_std", *LATENCY_DETAIL) if c == "latency_ms" else (c,))
        ),
        "pareto_latency",
        "pareto_params",
    )


def sweep_metrics(rows: Iterable[dict]) -> SweepMetrics:
    """The metrics of the runs behind ``rows`` (job records or summary rows, which carry their
    task record under ``task``). Rows without one (a job that failed before its task was known)
    don't count; with none at all, the task :func:`medlite.tasks.task_record` assumes for a
    results.json that records nothing. ConfigError for several task kinds."""
    from medlite.tasks import task_record

    rows = list(rows)
    records = [r["task"] for r in rows if isinstance(r.get("task"), dict)] or [task_record({})]
    kinds = sorted({str(r.get("kind")) for r in records})
    if len(kinds) > 1:
        raise ConfigError(
            f"these runs hold {len(kinds)} kinds of task ({', '.join(kinds)}); their metrics "
            "don't compare: aggregate one kind at a time"
        )
    names = tuple(dict.fromkeys(m for r in records for m in r.get("metrics") or ()))
    titles = {m: metric_title(r, m) for r in reversed(records) for m in r.get("metrics") or ()}
    first = records[0]
    primary, mode = primary_metric(first)
    robust = {  # measured by some run: robustness of the primary metric as two more metrics
        f"{kind}_{primary}": fmt.format(titles.get(primary, primary))
        for kind, fmt in ROBUSTNESS_METRICS.items()
        if any(r.get(SweepMetrics.column(f"{kind}_{primary}")) is not None for r in rows)
    }
    names, titles = (*names, *robust), {**titles, **robust}
    return SweepMetrics(
        kind=kinds[0],
        names=names or (primary,),
        titles=titles,
        headline=tuple(headline_metrics(first)),
        primary=primary,
        mode=mode,
    )


# --------------------------------------------------------------------------- collect


def _num(value: Any) -> float | int | None:
    """A finite number or None (results.json stores undefined metrics as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def check_latency(latency: str) -> str:
    """``latency`` if it is one of :data:`LATENCIES`, else ConfigError naming them."""
    if latency not in LATENCIES:
        raise ConfigError(
            f"latency must be one of {', '.join(LATENCIES)} (deployed: the fastest exported "
            f"runtime that passed parity, eager where a run was not exported), got {latency!r}"
        )
    return latency


def latency_mode(rows: Iterable[dict]) -> str:
    """Which latency ``rows`` (records or summary rows) carry as ``latency_ms``: as
    :func:`collect` chose it (``latency_mode``), deployed for rows that don't say. ConfigError
    for rows collected with different ones."""
    modes = {r["latency_mode"] for r in rows if r.get("latency_mode") in LATENCIES}
    if len(modes) > 1:
        raise ConfigError(
            f"these rows mix latencies ({', '.join(sorted(modes))}); collect them with one"
        )
    return modes.pop() if modes else "deployed"


def latency_note(rows: Iterable[dict]) -> str:
    """How tables explain the latency of ``rows``, e.g. ``eager PyTorch latency``."""
    return LATENCIES[latency_mode(rows)]


def _latency_columns(eff: dict, latency: str) -> dict[str, Any]:
    """``latency_ms`` (the deployed latency for ``latency="deployed"`` and a run export
    measured one, else the eager profile), the runtime it ran on, and both latencies."""
    eager, deployed = _num(eff.get("latency_ms")), _num(eff.get("deployed_latency_ms"))
    row = {"eager_latency_ms": eager, "deployed_latency_ms": deployed, "latency_mode": latency}
    if latency == "deployed" and deployed is not None:
        runtime = eff.get("deployed_runtime")
        row.update(latency_ms=deployed, latency_runtime=str(runtime) if runtime else "unknown")
    else:
        row.update(latency_ms=eager, latency_runtime=EAGER_RUNTIME if eager is not None else None)
    return row


def _record(file: Path, root: Path, res: dict, latency: str = "deployed") -> dict:
    """One flat row per job: ``test_<metric>`` for each metric of its task, the cost of the final
    (possibly compressed) model where profiled, with ``latency_ms`` the ``latency`` of
    :func:`collect` (:func:`_latency_columns`), and the task record itself under ``task`` (not a
    CSV column). A job that failed before its task was known has no task and no metrics."""
    from medlite.tasks import task_record

    model, data = _dict(res.get("model")), _dict(res.get("data"))
    test, eff = _dict(res.get("test")), _dict(res.get("efficiency"))
    run_dir = file.parent
    try:
        job = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    except ValueError:
        job = run_dir.name
    rec: dict[str, Any] = {
        "job": job,
        "paradigm": model.get("paradigm"),
        "model": model.get("name"),
        "arch": model.get("arch"),
        "compress": _dict(res.get("compress")).get("name"),
        "data": data.get("name") or data.get("flag"),
        "size": data.get("size"),
        "seed": res.get("seed"),
        "status": res.get("status"),
        "error": res.get("error"),
    }
    task = task_record(res) if res.get("task") or data.get("task") else None
    if task is not None:
        rec["task"] = task
        rec.update({SweepMetrics.column(m): _num(test.get(m)) for m in task.get("metrics") or ()})
        rec.update(_robustness_columns(res.get("robustness")))  # eval.robustness=true
    rec.update({k: _num(eff.get(k)) for k in COSTS})
    rec.update(_latency_columns(eff, latency))
    stages = _dict(res.get("compression")).get("stages")
    if task is not None and isinstance(stages, list):  # not a CSV column, like task
        rec["stages"] = [_stage_record(s, task) for s in stages if isinstance(s, dict)]
    if rec["params"] is None:  # a failed run may have counted parameters before training
        rec["params"] = _num(model.get("params"))
    rec["wall_time_s"] = _num(res.get("wall_time_s"))
    rec["run_dir"] = str(run_dir)  # where it is now, not where it was recorded
    return rec


def _robustness_columns(robustness: Any) -> dict[str, float | None]:
    """``test_corrupted_<m>`` and ``test_relative_<m>`` of a robustness summary (a run's or a
    compression stage's results.json ``robustness``), for each metric it holds."""
    out: dict[str, float | None] = {}
    for metric, summary in _dict(robustness).items():
        if isinstance(summary, dict) and "mean_corrupted" in summary:
            out[SweepMetrics.column(f"corrupted_{metric}")] = _num(summary["mean_corrupted"])
            out[SweepMetrics.column(f"relative_{metric}")] = _num(summary.get("relative"))
    return out


def _stage_record(stage: dict, task: dict) -> dict:
    """One compression stage of a run, in the run-level column names (``test_<metric>``), plus
    the ECE after the stage's own temperature scaling (``test_ece_scaled``)."""
    test, eff = _dict(stage.get("test")), _dict(stage.get("efficiency"))
    row: dict[str, Any] = {"stage": stage.get("stage")}
    row.update({SweepMetrics.column(m): _num(test.get(m)) for m in task.get("metrics") or ()})
    scaled = _dict(_dict(stage.get("calibrated")).get("test")).get("ece")
    row[SweepMetrics.column(STAGE_ECE_SCALED)] = _num(scaled)
    row.update(_robustness_columns(stage.get("robustness")))
    row.update({k: _num(eff.get(k)) for k in COSTS})
    return row


def collect(sweep_dir: str | Path, latency: str = "deployed") -> list[dict]:
    """One record per ``results.json`` below ``sweep_dir`` (a sweep, a run, or a parent of
    several). Unreadable files are logged and skipped so one crashed job never hides the rest.

    ``latency``: which batch-1 latency is ``latency_ms`` (what tables show, fronts and budgets
    use): ``deployed``, the fastest exported runtime that passed its parity checks where the run
    was exported, its eager PyTorch profile where not; ``eager``, the eager profile always. Each
    record also has both (``eager_latency_ms``, ``deployed_latency_ms``: None where not exported)
    and ``latency_runtime``, the runtime ``latency_ms`` ran on (``pytorch`` for eager).
    Compression stages keep their own measured latency."""
    check_latency(latency)
    root = Path(sweep_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory; pass a sweep directory")
    records = []
    for file in sorted(root.rglob("results.json")):
        try:
            res = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("skipping %s: unreadable (%s)", file, err)
            continue
        if not isinstance(res, dict) or "status" not in res:
            log.warning("skipping %s: not a medlite results.json (no status)", file)
            continue
        records.append(_record(file, root, res, latency))
    if not records:
        raise ConfigError(
            f"no readable results.json under {root}: pass a sweep directory "
            "(outputs/<task>/multiruns/<time>), a run directory, or a folder that holds them"
        )
    return records


# --------------------------------------------------------------------------- summarise


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1); std is None for fewer than two values."""
    vals = [float(v) for v in values if _num(v) is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def group_key(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in GROUP_KEYS)


def _sort_key(row: dict) -> tuple:
    """Paradigm (cnn, transformer, linear, others), then compress (``none`` first), model, data."""
    paradigm, compress = row.get("paradigm") or "", row.get("compress") or ""
    return (
        _PARADIGM_ORDER.get(paradigm, len(_PARADIGM_ORDER)),
        paradigm,
        compress != "none",
        compress,
        str(row.get("model") or ""),
        str(row.get("data") or ""),
        row.get("size") if isinstance(row.get("size"), int) else -1,
    )


def _seed_key(seed: Any) -> tuple:
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def summarise(
    records: Sequence[dict], metrics: SweepMetrics | None = None, axis: str | None = None
) -> list[dict]:
    """Per configuration: n successful seeds, failed jobs, mean ± std of test metrics, mean
    cost, and membership of the Pareto fronts of the primary metric (or of ``axis``, e.g.
    ``ece``) against latency (``latency_ms``, as :func:`collect` chose it) and against params
    (per dataset). ``latency_runtime``: the runtime(s) of the seeds' latencies, distinct ones
    joined with ``/``. ``metrics``: default, from the records' task records."""
    metrics = metrics or sweep_metrics(records)
    scoring = metrics.axis(axis)
    latency = latency_mode(records)
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(group_key(rec), []).append(rec)
    rows = []
    for key, recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        seeds = [r.get("seed") for r in ok]
        dupes = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        if dupes:
            log.warning("%s: seed(s) %s recorded more than once (several sweeps?)", key, dupes)
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        row.update(n=len(ok), n_failed=len(recs) - len(ok), seeds=sorted(seeds, key=_seed_key))
        task = next((r["task"] for r in [*ok, *recs] if r.get("task")), None)
        if task is not None:
            row["task"] = task
        for m in metrics.names:
            col = metrics.column(m)
            row[col], row[f"{col}_std"] = mean_std(r.get(col) for r in ok)
        for c in COSTS:
            mean, std = mean_std(r.get(c) for r in ok)
            row[c] = round(mean) if mean is not None and c in ("params", "macs") else mean
            if c == "latency_ms":
                row["latency_ms_std"] = std
        for c in ("eager_latency_ms", "deployed_latency_ms"):
            row[c] = mean_std(r.get(c) for r in ok)[0]
        runtimes = sorted({str(r["latency_runtime"]) for r in ok if r.get("latency_runtime")})
        row["latency_runtime"] = "/".join(runtimes) or None
        row["latency_mode"] = latency
        rows.append(row)
    rows.sort(key=_sort_key)
    for cost, flag in (("latency_ms", "pareto_latency"), ("params", "pareto_params")):
        for row in rows:
            row[flag] = False
        for data in {r["data"] for r in rows}:
            subset = [r for r in rows if r["data"] == data]
            front = pareto_front(subset, scoring.primary_column, cost, scoring.higher_is_better)
            for i in front:
                subset[i][flag] = True
    return rows


def pareto_front(
    points: Sequence[dict], score_key: str, cost_key: str, higher_is_better: bool = True
) -> list[int]:
    """Indices of the points no other point beats (at least as good on ``score_key``, <= on
    ``cost_key``, strictly better on one), ordered by cost then index so they draw as a
    staircase. Identical points are all kept; points missing either value are left out."""
    sign = 1.0 if higher_is_better else -1.0
    valid = [
        (i, sign * float(p[score_key]), float(p[cost_key]))
        for i, p in enumerate(points)
        if _num(p.get(score_key)) is not None and _num(p.get(cost_key)) is not None
    ]
    front = [
        (cost, i)
        for i, gain, cost in valid
        if not any(
            g >= gain and c <= cost and (g > gain or c < cost) for j, g, c in valid if j != i
        )
    ]
    return [i for _, i in sorted(front)]


def stage_metrics(metrics: SweepMetrics) -> list[tuple[str, str]]:
    """(metric, title) of the stages table: the headline metrics, then trust (raw and scaled
    ECE, the primary metric under corruptions) where the task has it."""
    shown = [(m, metrics.title(m)) for m in metrics.headline]
    if "ece" in metrics.names:
        shown += [("ece", metrics.title("ece")), (STAGE_ECE_SCALED, "ECE after T")]
    title = metrics.title(metrics.primary)
    shown += [(f"{k}_{metrics.primary}", f.format(title)) for k, f in ROBUSTNESS_METRICS.items()]
    return shown


def summarise_stages(records: Sequence[dict], metrics: SweepMetrics | None = None) -> list[dict]:
    """Per configuration and compression stage (in recipe order): n runs and mean ± std of the
    stage's test metrics, trust and cost over seeds: what compression does to accuracy,
    calibration and robustness step by step. Empty for a sweep without compression."""
    metrics = metrics or sweep_metrics(records)
    columns = [SweepMetrics.column(m) for m, _ in stage_metrics(metrics)]
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for rec in records:
        if rec.get("status") != "ok" or not rec.get("stages"):
            continue
        per_stage = groups.setdefault(group_key(rec), {})
        for stage in rec["stages"]:
            per_stage.setdefault(str(stage["stage"]), []).append(stage)
    rows = []
    for key, per_stage in groups.items():
        for name, stages in per_stage.items():
            row: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
            row.update(stage=name, n=len(stages))
            for col in [*columns, *COSTS]:
                row[col], row[f"{col}_std"] = mean_std(s.get(col) for s in stages)
            rows.append(row)
    rows.sort(key=_sort_key)  # as the summary; stable, so each recipe's stages keep their order
    return rows


def shown_stage_metrics(rows: Sequence[dict], metrics: SweepMetrics) -> list[tuple[str, str]]:
    """:func:`stage_metrics` that some stage row has a value of (no empty robustness columns
    for a sweep that did not measure it)."""
    col = SweepMetrics.column
    return [
        (m, t) for m, t in stage_metrics(metrics) if any(r.get(col(m)) is not None for r in rows)
    ]


def _stages_markdown(rows: Sequence[dict], metrics: SweepMetrics) -> str:
    shown = shown_stage_metrics(rows, metrics)
    out = [
        "# Compression stages",
        "",
        "Each stage of each recipe, test split: mean ± sample std over seeds (n runs). ECE after "
        "T: with the stage's own temperature, fitted on val. Corrupted: mean over every "
        "corruption x severity (runs with eval.robustness=true). Latency: batch 1, CPU, as each "
        "stage measured it.",
    ]
    header = ["stage", "n", *(t for _, t in shown), "params", "size (MB)", "latency (ms)"]
    for key in dict.fromkeys(group_key(r) for r in rows):
        group = [r for r in rows if group_key(r) == key]
        first = group[0]
        title = f"{first['model']} + {first['compress']} on {first['data']} ({first['size']} px)"
        out += ["", f"## {title}", "", "| " + " | ".join(header) + " |"]
        out.append("|" + "---|" * len(header))
        for r in group:
            col = SweepMetrics.column
            cells = [
                r["stage"],
                r["n"],
                *(format_pm(r.get(col(m)), r.get(f"{col(m)}_std")) for m, _ in shown),
                format_count(r.get("params")),
                format_float(r.get("size_mb")),
                format_pm(r.get("latency_ms"), r.get("latency_ms_std"), 2),
            ]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- select

_ALIASES = {
    "latency": "latency_ms",
    "throughput": "throughput_ips",
    "dataset": "data",
    "runtime": "latency_runtime",
}
_TEXT_KEYS = ("paradigm", "model", "compress", "data", "latency_runtime")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*([^\s<>=!]\S*)\s*$")
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class Constraint:
    """One budget condition on a summary column, e.g. ``latency_ms<=5``."""

    key: str
    op: str
    value: float | str
    raw: str = ""  # the value as written (1e6, 500k), for messages

    def holds(self, row: dict) -> bool:
        actual = row.get(self.key)
        if actual is None:
            return False
        if isinstance(self.value, str):
            return _OPS[self.op](str(actual), self.value)
        return _OPS[self.op](float(actual), self.value)

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.raw or self.value}"


def _aliases(metrics: SweepMetrics | None) -> dict[str, str]:
    """Short names: each metric by its own name (``<metric>`` for ``test_<metric>``), latency..."""
    names = metrics.names if metrics else ()
    return {**{m: SweepMetrics.column(m) for m in names}, **_ALIASES}


def _numeric_keys(metrics: SweepMetrics | None) -> tuple[str, ...]:
    fields = summary_fields(metrics.names if metrics else ())
    return tuple(
        k for k in fields if k not in _TEXT_KEYS and k not in ("seeds",) and "pareto" not in k
    )


def valid_keys(metrics: SweepMetrics | None = None) -> list[str]:
    """The columns a constraint may name (aliases included): costs, text columns and, given the
    sweep's ``metrics``, its test metrics (by name or as ``test_<metric>``)."""
    return sorted({*_numeric_keys(metrics), *_TEXT_KEYS, *_aliases(metrics)})


def parse_constraint(text: str, metrics: SweepMetrics | None = None) -> Constraint:
    """``key op value`` with op in <=, <, >=, >, ==, != ; numbers may end in k, M or G. Metric
    keys are those of ``metrics`` (none without it)."""
    match = _CONSTRAINT.match(text)
    if not match:
        example = f" or '{metrics.primary}>=0.85'" if metrics else ""
        raise ConfigError(
            f"malformed constraint {text!r}: expected <key><op><value> such as 'latency_ms<=5', "
            f"'params<1e6'{example} (op: {', '.join(_OPS)}); keys: "
            f"{', '.join(valid_keys(metrics))}"
        )
    key, op, raw = match.groups()
    key = _aliases(metrics).get(key, key)
    if key in _TEXT_KEYS:
        if op not in ("==", "!="):
            raise ConfigError(f"constraint {text!r}: {key} is text; use == or !=")
        return Constraint(key, op, raw, raw)
    if key not in _numeric_keys(metrics):
        raise ConfigError(
            f"unknown key {match.group(1)!r} in constraint {text!r}; valid keys: "
            f"{', '.join(valid_keys(metrics))}"
        )
    scale = _SUFFIX.get(raw[-1].lower(), 1.0) if raw[-1].isalpha() else 1.0
    try:
        value = float(raw[:-1] if scale != 1.0 else raw) * scale
    except ValueError:
        raise ConfigError(f"constraint {text!r}: {raw!r} is not a number") from None
    if math.isnan(value):
        raise ConfigError(f"constraint {text!r}: {raw!r} is not a number")
    return Constraint(key, op, value, raw)


def _rank(row: dict, metrics: SweepMetrics) -> tuple:
    """Best first: best mean of the primary test metric; ties go to the faster, then smaller,
    model."""
    inf = math.inf
    score = row[metrics.primary_column]
    return (
        -score if metrics.higher_is_better else score,
        row["latency_ms"] if row.get("latency_ms") is not None else inf,
        row["params"] if row.get("params") is not None else inf,
        _sort_key(row),
    )


def scored(summary: Sequence[dict], metrics: SweepMetrics) -> list[dict]:
    """The groups with a successful run and a value of the primary metric."""
    return [r for r in summary if r.get("n") and r.get(metrics.primary_column) is not None]


def select(
    summary: Sequence[dict], constraints: Sequence[str], metrics: SweepMetrics | None = None
) -> dict | None:
    """The group with the best mean primary test metric among those meeting every constraint:
    ``{"best": row, "candidates": rows meeting all (best first), "constraints": [...]}``,
    or None when nothing fits. Groups without a successful run never qualify."""
    metrics = metrics or sweep_metrics(summary)
    parsed = [parse_constraint(c, metrics) for c in constraints]
    candidates = sorted(
        (r for r in scored(summary, metrics) if all(c.holds(r) for c in parsed)),
        key=lambda r: _rank(r, metrics),
    )
    if not candidates:
        return None
    datasets = {(r["data"], r["size"]) for r in candidates}
    if len(datasets) > 1:
        log.warning(
            "candidates come from %d datasets/sizes %s: their %s values are not comparable; "
            "add a constraint such as data==%s",
            len(datasets),
            sorted(datasets, key=str),
            metrics.title(metrics.primary),
            candidates[0]["data"],
        )
    return {
        "best": candidates[0],
        "candidates": candidates,
        "constraints": [str(c) for c in parsed],
    }


# --------------------------------------------------------------------------- tables


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return value


def _write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in fields})
    return path


def format_pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``0.871 ± 0.012``; the bare mean for one seed; ``–`` when undefined."""
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_count(value: float | None) -> str:
    """Parameters and MACs in k / M / G."""
    if value is None:
        return "–"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g} {unit}"
    return f"{value:.0f}"


def format_float(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def pareto_label(row: dict) -> str:
    """Which fronts a group is on: ``latency``, ``params``, both, or empty."""
    return ", ".join(
        name
        for name, flag in (("latency", "pareto_latency"), ("params", "pareto_params"))
        if row.get(flag)
    )


def first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def _markdown(
    summary: Sequence[dict], records: Sequence[dict], metrics: SweepMetrics, axis: str | None = None
) -> str:
    n_ok = sum(r.get("status") == "ok" for r in records)
    primary = metrics.title(metrics.axis(axis).primary)
    out = [
        "# Sweep summary",
        "",
        f"{len(records)} job(s): {n_ok} succeeded, {len(records) - n_ok} failed. Test metrics: "
        "mean ± sample std over seeds (n = successful seeds). Cost: the final model's profile. "
        f"Latency: batch 1 on CPU, {latency_note(summary)}, as measured on the machine that ran "
        "each job; runtime: what it ran on. "
        f"Pareto: on the test-{primary}-vs-latency / -vs-params front of its dataset.",
    ]
    columns = [
        "model",
        "compress",
        "data",
        "size",
        "n",
        "failed",
        *(f"test {metrics.title(m)}" for m in metrics.names),
        "params",
        "MACs",
        "size (MB)",
        "latency (ms)",
        "runtime",
        "Pareto",
    ]
    header = "| " + " | ".join(columns) + " |"
    for paradigm in dict.fromkeys(r["paradigm"] for r in summary):
        out += ["", f"## {paradigm or 'unknown paradigm'}", "", header, "|" + "---|" * len(columns)]
        for r in (r for r in summary if r["paradigm"] == paradigm):
            cells = [
                r["model"],
                r["compress"],
                r["data"],
                r["size"],
                r["n"],
                r["n_failed"],
                *(format_pm(*metric_cells(r, m)) for m in metrics.names),
                format_count(r["params"]),
                format_count(r["macs"]),
                format_float(r["size_mb"]),
                format_float(r["latency_ms"]),
                r.get("latency_runtime"),
                pareto_label(r),
            ]
            out.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        out += ["", "## Failed jobs", "", "| job | error |", "|---|---|"]
        for r in failed:
            err = first_line(r.get("error")) or f"status {r.get('status')}"
            out.append(f"| {r['job']} | {err.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def metric_cells(row: dict, metric: str) -> tuple[float | None, float | None]:
    """(mean, std) of a test metric in a summary row."""
    col = SweepMetrics.column(metric)
    return row.get(col), row.get(f"{col}_std")


def write_tables(
    summary: Sequence[dict],
    out_dir: str | Path,
    records: Sequence[dict],
    metrics: SweepMetrics | None = None,
    axis: str | None = None,
) -> dict:
    """``aggregate.csv`` (one row per job), ``summary.csv`` and ``summary.md`` in ``out_dir``
    (``axis``: the metric the summary's Pareto fronts were scored on), and for compression
    recipes ``stages.csv`` / ``stages.md`` (every stage over seeds); their paths by name."""
    metrics = metrics or sweep_metrics(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "aggregate.csv": _write_csv(out / "aggregate.csv", records, metrics.record_fields()),
        "summary.csv": _write_csv(out / "summary.csv", summary, metrics.summary_fields()),
    }
    md = out / "summary.md"
    md.write_text(_markdown(summary, records, metrics, axis))
    paths["summary.md"] = md
    stages = summarise_stages(records, metrics)
    if stages:  # compression recipes: every stage, not just the final model
        cols = [SweepMetrics.column(m) for m, _ in stage_metrics(metrics)]
        fields = [*GROUP_KEYS, "stage", "n", *(k for c in [*cols, *COSTS] for k in (c, f"{c}_std"))]
        paths["stages.csv"] = _write_csv(out / "stages.csv", stages, fields)
        paths["stages.md"] = out / "stages.md"
        paths["stages.md"].write_text(_stages_markdown(stages, metrics))
    return paths


# --------------------------------------------------------------------------- plot

_STYLE = {
    "cnn": ("o", "tab:blue"),
    "transformer": ("^", "tab:orange"),
    "linear": ("s", "tab:green"),
}


def plot_pareto(
    summary: Sequence[dict], out_png: str | Path, metrics: SweepMetrics | None = None
) -> Path | None:
    """The primary test metric (``metrics.axis(name)`` for another) vs batch-1 latency
    (``latency_ms``, deployed or eager as collected and labelled so; log when it spans over 20x)
    and vs params (log): one marker/colour per paradigm, std over seeds as error bars, each
    dataset's front as a staircase with its points circled. None if nothing to draw."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    metrics = metrics or sweep_metrics(summary)
    y, y_std = metrics.primary_column, f"{metrics.primary_column}_std"
    title = metrics.title(metrics.primary)
    rows = scored(summary, metrics)
    if not rows:
        log.warning("no successful run with a test %s: no Pareto plot", title)
        return None
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    axes = fig.subplots(1, 2)
    latency = f"{_AXIS_LABELS[latency_mode(rows)]} CPU latency, batch 1 (ms)"
    panels = (("latency_ms", latency, False), ("params", "parameters", True))
    datasets = sorted({(r["data"], r["size"]) for r in rows}, key=str)
    for ax, (cost, xlabel, log_x) in zip(axes, panels, strict=True):
        drawn = set()
        for r in rows:
            if r.get(cost) is None:
                continue
            marker, colour = _STYLE.get(r["paradigm"], ("D", "tab:gray"))
            ax.errorbar(
                r[cost],
                r[y],
                yerr=r.get(y_std) or 0.0,
                fmt=marker,
                color=colour,
                markersize=7,
                capsize=3,
                label=None if r["paradigm"] in drawn else r["paradigm"],
            )
            drawn.add(r["paradigm"])
            ax.annotate(
                f"{r['model']}/{r['compress']}",
                (r[cost], r[y]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
            )
        labelled = False
        for data in sorted({r["data"] for r in rows}, key=str):
            subset = [r for r in rows if r["data"] == data]
            front = pareto_front(subset, y, cost, metrics.higher_is_better)
            front = [subset[i] for i in front]
            if not front:
                continue
            xs, ys = [r[cost] for r in front], [r[y] for r in front]
            x_end = max(r[cost] for r in subset if r.get(cost) is not None)
            ax.step(  # the best score reachable at each cost, up to the costliest model
                [*xs, x_end], [*ys, ys[-1]], where="post", color="black", lw=1, alpha=0.7, zorder=1
            )
            ax.scatter(
                xs,
                ys,
                s=180,
                facecolors="none",
                edgecolors="black",
                linewidths=1.5,
                zorder=3,
                label=None if labelled else "Pareto front",
            )
            labelled = True
        xs_all = [r[cost] for r in rows if r.get(cost) is not None and r[cost] > 0]
        if log_x or (xs_all and max(xs_all) > 20 * min(xs_all)):  # one slow outlier hides the rest
            log_x = True
            ax.set_xscale("log")
        ax.set_xlabel(xlabel + (" (log)" if log_x else ""))
        ax.set_ylabel(f"test {title} (mean ± std over seeds)")
        ax.margins(x=0.12, y=0.08)  # room for the labels
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    names = ", ".join(f"{d} {s} px" for d, s in datasets)
    fig.suptitle(f"Accuracy vs cost: {names}")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
