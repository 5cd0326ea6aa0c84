"""Aggregate a sweep: every job's results.json -> mean ± std over seeds, accuracy-vs-cost Pareto
front, tables and a plot, and the best model under a deployment budget.

A run directory's ``results.json`` (written by :mod:`medlite.pipeline`, or by :mod:`medlite.cli`
for a multirun job that failed before training) is the only input, so a sweep can be
aggregated long after it ran, on another machine, or merged with other sweeps (pass their
common parent). ``scripts/aggregate.py`` is the command line.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlite.errors import ConfigError

log = logging.getLogger(__name__)

#: test metrics carried per job and averaged per group (absent ones stay empty)
METRICS = ("auc", "acc", "sensitivity", "specificity", "f1")
#: cost columns (from the run's efficiency profile; latency at batch 1 on CPU)
COSTS = ("params", "macs", "size_mb", "latency_ms", "throughput_ips")
#: one group = one configuration trained with several seeds
GROUP_KEYS = ("paradigm", "model", "compress", "data", "size")

RECORD_FIELDS = (
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
    *(f"test_{m}" for m in METRICS),
    *COSTS,
    "wall_time_s",
    "run_dir",
)
SUMMARY_FIELDS = (
    *GROUP_KEYS,
    "n",
    "n_failed",
    "seeds",
    *(k for m in METRICS for k in (f"test_{m}", f"test_{m}_std")),
    *COSTS,
    "latency_ms_std",
    "pareto_latency",
    "pareto_params",
)

_PARADIGM_ORDER = {"cnn": 0, "transformer": 1, "linear": 2}


# --------------------------------------------------------------------------- collect


def _num(value: Any) -> float | int | None:
    """A finite number or None (results.json stores undefined metrics as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _record(file: Path, root: Path, res: dict) -> dict:
    """One flat row per job; the cost of the final (possibly compressed) model where profiled."""
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
        "data": data.get("flag"),
        "size": data.get("size"),
        "seed": res.get("seed"),
        "status": res.get("status"),
        "error": res.get("error"),
    }
    rec.update({f"test_{m}": _num(test.get(m)) for m in METRICS})
    rec.update({k: _num(eff.get(k)) for k in COSTS})
    if rec["params"] is None:  # a failed run may have counted parameters before training
        rec["params"] = _num(model.get("params"))
    rec["wall_time_s"] = _num(res.get("wall_time_s"))
    rec["run_dir"] = str(run_dir)  # where it is now, not where it was recorded
    return rec


def collect(sweep_dir: str | Path) -> list[dict]:
    """One record per ``results.json`` below ``sweep_dir`` (a sweep, a run, or a parent of
    several). Unreadable files are logged and skipped so one crashed job never hides the rest."""
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
        records.append(_record(file, root, res))
    if not records:
        raise ConfigError(
            f"no readable results.json under {root}: pass a sweep directory "
            "(outputs/<task>/multiruns/<time>), a run directory, or a folder that holds them"
        )
    return records


# --------------------------------------------------------------------------- summarise


def _mean_std(values: Iterable[Any]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1); std is None for fewer than two values."""
    vals = [float(v) for v in values if _num(v) is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _group_key(rec: dict) -> tuple:
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


def summarise(records: Sequence[dict]) -> list[dict]:
    """Per configuration: n successful seeds, failed jobs, mean ± std of test metrics, mean
    cost, and membership of the AUC-vs-latency and AUC-vs-params Pareto fronts (per dataset)."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(_group_key(rec), []).append(rec)
    rows = []
    for key, recs in groups.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        seeds = [r.get("seed") for r in ok]
        dupes = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        if dupes:
            log.warning("%s: seed(s) %s recorded more than once (several sweeps?)", key, dupes)
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        row.update(n=len(ok), n_failed=len(recs) - len(ok), seeds=sorted(seeds, key=_seed_key))
        for m in METRICS:
            row[f"test_{m}"], row[f"test_{m}_std"] = _mean_std(r.get(f"test_{m}") for r in ok)
        for c in COSTS:
            mean, std = _mean_std(r.get(c) for r in ok)
            row[c] = round(mean) if mean is not None and c in ("params", "macs") else mean
            if c == "latency_ms":
                row["latency_ms_std"] = std
        rows.append(row)
    rows.sort(key=_sort_key)
    for cost, flag in (("latency_ms", "pareto_latency"), ("params", "pareto_params")):
        for row in rows:
            row[flag] = False
        for data in {r["data"] for r in rows}:
            subset = [r for r in rows if r["data"] == data]
            for i in pareto_front(subset, "test_auc", cost):
                subset[i][flag] = True
    return rows


def pareto_front(points: Sequence[dict], maximize_key: str, minimize_key: str) -> list[int]:
    """Indices of the points no other point beats (>= on ``maximize_key`` and <= on
    ``minimize_key``, strictly better on one), ordered by cost then index so they draw as a
    staircase. Identical points are all kept; points missing either value are left out."""
    valid = [
        (i, float(p[maximize_key]), float(p[minimize_key]))
        for i, p in enumerate(points)
        if _num(p.get(maximize_key)) is not None and _num(p.get(minimize_key)) is not None
    ]
    front = [
        (cost, i)
        for i, gain, cost in valid
        if not any(
            g >= gain and c <= cost and (g > gain or c < cost) for j, g, c in valid if j != i
        )
    ]
    return [i for _, i in sorted(front)]


# --------------------------------------------------------------------------- select

_ALIASES = {
    **{m: f"test_{m}" for m in METRICS},
    "sens": "test_sensitivity",
    "spec": "test_specificity",
    "latency": "latency_ms",
    "throughput": "throughput_ips",
    "dataset": "data",
}
_TEXT_KEYS = ("paradigm", "model", "compress", "data")
_NUMERIC_KEYS = tuple(
    k for k in SUMMARY_FIELDS if k not in _TEXT_KEYS and k not in ("seeds",) and "pareto" not in k
)
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


def valid_keys() -> list[str]:
    """The columns a constraint may name (aliases included)."""
    return sorted({*_NUMERIC_KEYS, *_TEXT_KEYS, *_ALIASES})


def parse_constraint(text: str) -> Constraint:
    """``key op value`` with op in <=, <, >=, >, ==, != ; numbers may end in k, M or G."""
    match = _CONSTRAINT.match(text)
    if not match:
        raise ConfigError(
            f"malformed constraint {text!r}: expected <key><op><value> such as 'latency_ms<=5', "
            f"'params<1e6' or 'auc>=0.85' (op: {', '.join(_OPS)}); keys: {', '.join(valid_keys())}"
        )
    key, op, raw = match.groups()
    key = _ALIASES.get(key, key)
    if key in _TEXT_KEYS:
        if op not in ("==", "!="):
            raise ConfigError(f"constraint {text!r}: {key} is text; use == or !=")
        return Constraint(key, op, raw, raw)
    if key not in _NUMERIC_KEYS:
        raise ConfigError(
            f"unknown key {match.group(1)!r} in constraint {text!r}; valid keys: "
            f"{', '.join(valid_keys())}"
        )
    scale = _SUFFIX.get(raw[-1].lower(), 1.0) if raw[-1].isalpha() else 1.0
    try:
        value = float(raw[:-1] if scale != 1.0 else raw) * scale
    except ValueError:
        raise ConfigError(f"constraint {text!r}: {raw!r} is not a number") from None
    if math.isnan(value):
        raise ConfigError(f"constraint {text!r}: {raw!r} is not a number")
    return Constraint(key, op, value, raw)


def _rank(row: dict) -> tuple:
    """Best first: highest mean test AUC; ties go to the faster, then smaller, model."""
    inf = math.inf
    return (
        -row["test_auc"],
        row["latency_ms"] if row.get("latency_ms") is not None else inf,
        row["params"] if row.get("params") is not None else inf,
        _sort_key(row),
    )


def select(summary: Sequence[dict], constraints: Sequence[str]) -> dict | None:
    """The group with the highest mean test AUC among those meeting every constraint:
    ``{"best": row, "candidates": rows meeting all (best first), "constraints": [...]}``,
    or None when nothing fits. Groups without a successful run never qualify."""
    parsed = [parse_constraint(c) for c in constraints]
    scored = [r for r in summary if r.get("n") and r.get("test_auc") is not None]
    candidates = sorted((r for r in scored if all(c.holds(r) for c in parsed)), key=_rank)
    if not candidates:
        return None
    datasets = {(r["data"], r["size"]) for r in candidates}
    if len(datasets) > 1:
        log.warning(
            "candidates come from %d datasets/sizes %s: AUCs are not comparable across them; "
            "add a constraint such as data==%s",
            len(datasets),
            sorted(datasets, key=str),
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


def _markdown(summary: Sequence[dict], records: Sequence[dict]) -> str:
    n_ok = sum(r.get("status") == "ok" for r in records)
    out = [
        "# Sweep summary",
        "",
        f"{len(records)} job(s): {n_ok} succeeded, {len(records) - n_ok} failed. Test metrics: "
        "mean ± sample std over seeds (n = successful seeds). Cost: the final model's profile "
        "(latency at batch 1 on CPU, as measured on the machine that ran each job). "
        "Pareto: on the test-AUC-vs-latency / -vs-params front of its dataset.",
    ]
    header = (
        "| model | compress | data | size | n | failed | test AUC | test ACC | sensitivity "
        "| specificity | params | MACs | size (MB) | latency (ms) | Pareto |"
    )
    for paradigm in dict.fromkeys(r["paradigm"] for r in summary):
        out += ["", f"## {paradigm or 'unknown paradigm'}", "", header, "|" + "---|" * 15]
        for r in (r for r in summary if r["paradigm"] == paradigm):
            cells = [
                r["model"],
                r["compress"],
                r["data"],
                r["size"],
                r["n"],
                r["n_failed"],
                *(format_pm(r[f"test_{m}"], r[f"test_{m}_std"]) for m in METRICS[:4]),
                format_count(r["params"]),
                format_count(r["macs"]),
                format_float(r["size_mb"]),
                format_float(r["latency_ms"]),
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


def write_tables(summary: Sequence[dict], out_dir: str | Path, records: Sequence[dict]) -> dict:
    """``aggregate.csv`` (one row per job), ``summary.csv`` and ``summary.md`` in ``out_dir``;
    returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "aggregate.csv": _write_csv(out / "aggregate.csv", records, RECORD_FIELDS),
        "summary.csv": _write_csv(out / "summary.csv", summary, SUMMARY_FIELDS),
    }
    md = out / "summary.md"
    md.write_text(_markdown(summary, records))
    paths["summary.md"] = md
    return paths


# --------------------------------------------------------------------------- plot

_STYLE = {
    "cnn": ("o", "tab:blue"),
    "transformer": ("^", "tab:orange"),
    "linear": ("s", "tab:green"),
}


def plot_pareto(summary: Sequence[dict], out_png: str | Path) -> Path | None:
    """Test AUC vs batch-1 latency (log when it spans over 20x) and vs params (log): one
    marker/colour per paradigm, std over seeds as error bars, each dataset's front as a
    staircase with its points circled. None if nothing to draw."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    rows = [r for r in summary if r.get("n") and r.get("test_auc") is not None]
    if not rows:
        log.warning("no successful run with a test AUC: no Pareto plot")
        return None
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (("latency_ms", "CPU latency, batch 1 (ms)", False), ("params", "parameters", True))
    datasets = sorted({(r["data"], r["size"]) for r in rows}, key=str)
    for ax, (cost, xlabel, log_x) in zip(axes, panels, strict=True):
        drawn = set()
        for r in rows:
            if r.get(cost) is None:
                continue
            marker, colour = _STYLE.get(r["paradigm"], ("D", "tab:gray"))
            ax.errorbar(
                r[cost],
                r["test_auc"],
                yerr=r["test_auc_std"] or 0.0,
                fmt=marker,
                color=colour,
                markersize=7,
                capsize=3,
                label=None if r["paradigm"] in drawn else r["paradigm"],
            )
            drawn.add(r["paradigm"])
            ax.annotate(
                f"{r['model']}/{r['compress']}",
                (r[cost], r["test_auc"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
            )
        labelled = False
        for data in sorted({r["data"] for r in rows}, key=str):
            subset = [r for r in rows if r["data"] == data]
            front = [subset[i] for i in pareto_front(subset, "test_auc", cost)]
            if not front:
                continue
            xs, ys = [r[cost] for r in front], [r["test_auc"] for r in front]
            x_end = max(r[cost] for r in subset if r.get(cost) is not None)
            ax.step(  # the best AUC reachable at each cost, up to the costliest model
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
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.margins(x=0.12, y=0.08)  # room for the labels
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    names = ", ".join(f"{d} {s} px" for d, s in datasets)
    fig.suptitle(f"Accuracy vs cost: {names}")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
