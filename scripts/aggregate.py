"""Aggregate a sweep: mean ± std over seeds, accuracy-vs-cost Pareto plot, and the best model
under a deployment budget.

    python scripts/aggregate.py outputs/train/multiruns/<time> [--out DIR]
        [--select "latency_ms<=5" "size_mb<=2" "ece<=0.05"] [--pareto-on ece]
        [--latency {deployed,eager}]

Writes aggregate.csv (one row per job), summary.csv, summary.md and pareto.png to --out
(default <sweep dir>/aggregate). Latency is the deployed one by default: the fastest exported
runtime that passed its parity checks, eager PyTorch where a run was not exported;
--latency eager ranks on eager PyTorch for every run. Exit code 1 with one message for
medlite's errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medlite.console import make_console
from medlite.errors import MedliteError
from medlite.sweeps import aggregate as agg


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Aggregate the results.json of a sweep (or any folder of runs).",
        epilog='example: --select "latency_ms<=5" "size_mb<=2" "<metric>>=0.85"  (keys: '
        + ", ".join(agg.valid_keys())
        + ", and each test metric of the sweep's task by name, or as test_<metric>)",
    )
    parser.add_argument("sweep_dir", type=Path, help="sweep directory, run directory, or a parent")
    parser.add_argument("--out", type=Path, help="output folder (default: <sweep_dir>/aggregate)")
    parser.add_argument(
        "--select",
        nargs="+",
        metavar="CONSTRAINT",
        help="budget such as latency_ms<=5 size_mb<=2 params<1e6, or on a test metric of the "
        "sweep's task by its name (<metric>>=0.85); prints the best group",
    )
    parser.add_argument(
        "--pareto-on",
        metavar="METRIC",
        help="test metric the Pareto fronts and plot score on (default: the task's primary "
        "metric); e.g. ece (lower is better), or corrupted_<primary> for runs with "
        "eval.robustness=true",
    )
    parser.add_argument(
        "--latency",
        choices=tuple(agg.LATENCIES),
        default="deployed",
        help="which batch-1 CPU latency the tables show and the Pareto fronts, the plot and "
        "--select latency_ms budgets use: deployed (default), the fastest runtime of an "
        "exported run that passed its parity checks (eager PyTorch for a run that was not "
        "exported); eager, the eager PyTorch profile of every run. The 'runtime' column says "
        "which runtime each latency ran on",
    )
    parser.add_argument("--show-traceback", action="store_true", help="full traceback on errors")
    return parser.parse_args(argv)


def shown_metrics(metrics: agg.SweepMetrics, axis: agg.SweepMetrics) -> list[str]:
    """The task's headline metrics, the Pareto axis and the corrupted primary metric (where
    measured)."""
    extra = [axis.primary, f"corrupted_{metrics.primary}"]
    return list(dict.fromkeys([*metrics.headline, *(m for m in extra if m in metrics.names)]))


def summary_table(
    summary: Sequence[dict], metrics: agg.SweepMetrics, axis: agg.SweepMetrics | None = None
) -> Table:
    """One row per group: the task's headline test metrics (and the Pareto axis, corrupted
    primary metric), cost and Pareto membership."""
    shown = shown_metrics(metrics, axis or metrics)
    table = Table(
        title="sweep summary (test metrics: mean ± std over seeds)",
        caption=f"latency: batch 1, CPU, {agg.latency_note(summary)}",
    )
    for col in (
        "paradigm",
        "model",
        "compress",
        "data/size",
        "n",
        "failed",
        *(f"test {metrics.title(m)}" for m in shown),
        "params",
        "MACs",
        "size (MB)",
        "latency (ms)",
        "runtime",
        "Pareto",
    ):
        text = col in ("paradigm", "model", "compress", "data/size", "runtime")
        # names are never squeezed to an ellipsis
        key = {"data/size": "data", "runtime": "latency_runtime"}.get(col, col)
        width = (
            min(24, max((len(str(r.get(key))) for r in summary), default=4) + 3) if text else None
        )
        table.add_column(
            col, justify="left" if text else "right", no_wrap=not text, min_width=width
        )
    for r in summary:
        table.add_row(
            str(r["paradigm"]),
            str(r["model"]),
            str(r["compress"]),
            f"{r['data']}/{r['size']}",
            str(r["n"]),
            str(r["n_failed"]) if r["n_failed"] else "",
            *(agg.format_pm(*agg.metric_cells(r, m)) for m in shown),
            agg.format_count(r["params"]),
            agg.format_count(r["macs"]),
            agg.format_float(r["size_mb"]),
            agg.format_float(r["latency_ms"]),
            str(r.get("latency_runtime") or "–"),
            agg.pareto_label(r),
        )
    return table


def stages_tables(rows: Sequence[dict], metrics: agg.SweepMetrics) -> list[Table]:
    """Per compression recipe, its stages: accuracy, trust and cost, mean ± std over seeds."""
    shown = agg.shown_stage_metrics(rows, metrics)
    tables = []
    for key in dict.fromkeys(agg.group_key(r) for r in rows):
        group = [r for r in rows if agg.group_key(r) == key]
        first = group[0]
        table = Table(
            title=f"{first['model']} + {first['compress']} on {first['data']}/{first['size']}: "
            "compression stages (test, mean ± std over seeds)"
        )
        for col in ("stage", "n", *(f"{t}" for _, t in shown), "size (MB)", "latency (ms)"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for r in group:
            table.add_row(
                str(r["stage"]),
                str(r["n"]),
                *(agg.format_pm(*agg.metric_cells(r, m)) for m, _ in shown),
                agg.format_float(r.get("size_mb")),
                agg.format_pm(r.get("latency_ms"), r.get("latency_ms_std"), 2),
            )
        tables.append(table)
    return tables


def print_jobs(console: Console, records: Sequence[dict]) -> None:
    failed = [r for r in records if r.get("status") != "ok"]
    console.print(
        f"{len(records)} job(s): [bold]{len(records) - len(failed)}[/bold] succeeded, "
        f"[bold{' red' if failed else ''}]{len(failed)}[/] failed"
    )
    for r in failed:
        err = agg.first_line(r.get("error")) or f"status {r.get('status')}"
        console.print(f"  failed: {escape(r['job'])}: {escape(err)}", highlight=False)


def _group_name(row: dict) -> str:
    return f"{row['model']}/{row['compress']} ({row['paradigm']}, {row['data']} {row['size']} px)"


def print_selection(
    console: Console,
    summary: Sequence[dict],
    constraints: Sequence[str],
    choice: dict | None,
    metrics: agg.SweepMetrics,
) -> None:
    parsed = [agg.parse_constraint(c, metrics) for c in constraints]
    budget = " and ".join(str(c) for c in parsed)
    primary = metrics.title(metrics.primary)
    if choice is None:
        console.print(f"[bold red]no model meets the budget[/bold red] {escape(budget)}")
        scored = agg.scored(summary, metrics)
        for c in parsed:
            meets = [r for r in scored if c.holds(r)]
            line = f"  {c}: {len(meets)} of {len(scored)} group(s)"
            values = [r[c.key] for r in scored if r.get(c.key) is not None]
            if values and c.op in ("<", "<=", ">", ">="):
                best = min(values) if c.op in ("<", "<=") else max(values)
                line += f" (best available: {best:.4g})"
            console.print(escape(line), highlight=False)
        return
    best, candidates = choice["best"], choice["candidates"]
    console.print(
        f"[bold green]selected[/bold green] for {escape(budget)}: [bold]{escape(_group_name(best))}[/bold]"
    )
    console.print(
        f"  test {primary} {agg.format_pm(*agg.metric_cells(best, metrics.primary))} over {best['n']} "
        f"seed(s); latency {agg.format_float(best['latency_ms'])} ms "
        f"({best.get('latency_runtime') or '–'}), "
        f"{agg.format_float(best['size_mb'])} MB, {agg.format_count(best['params'])} params",
        highlight=False,
    )
    for c in parsed:
        console.print(
            escape(
                f"  {c}: {c.key} = {best[c.key]:.4g}" if not isinstance(c.value, str) else f"  {c}"
            ),
            highlight=False,
        )
    best_of = "highest" if metrics.higher_is_better else "lowest"
    why = (
        f"  why: {best_of} mean test {primary} of the {len(candidates)} group(s) meeting every "
        "constraint"
    )
    if len(candidates) > 1:
        nxt = candidates[1]
        runner_up = agg.format_pm(nxt[metrics.primary_column], None)
        why += f"; runner-up {nxt['model']}/{nxt['compress']} at {runner_up}"
    console.print(escape(why), highlight=False)


def run(args: argparse.Namespace, console: Console) -> int:
    records = agg.collect(args.sweep_dir, args.latency)
    metrics = agg.sweep_metrics(records)  # from the runs' task records
    if args.select:  # a bad constraint fails before any file is written
        for c in args.select:
            agg.parse_constraint(c, metrics)
    axis = metrics.axis(args.pareto_on)  # so does an unknown axis
    summary = agg.summarise(records, metrics, args.pareto_on)
    out = args.out or args.sweep_dir / "aggregate"
    print_jobs(console, records)
    console.print(summary_table(summary, metrics, axis))
    for table in stages_tables(agg.summarise_stages(records, metrics), metrics):
        console.print(table)
    paths = list(agg.write_tables(summary, out, records, metrics, args.pareto_on).values())
    datasets = sorted({r["data"] for r in summary}, key=str)
    for data in datasets:
        name = "pareto.png" if len(datasets) == 1 else f"pareto_{data}.png"
        png = agg.plot_pareto([r for r in summary if r["data"] == data], out / name, axis)
        if png is not None:
            paths.append(png)
    console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False)
    if args.select:
        choice = agg.select(summary, args.select, metrics)
        print_selection(console, summary, args.select, choice, metrics)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console = make_console()  # piped or captured: full-width tables, not 80 columns
    try:
        return run(args, console)
    except MedliteError as err:
        if args.show_traceback:
            raise
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]medlite: {type(err).__name__}[/bold red]: {escape(str(err))}\n"
            "[dim](add --show-traceback for the full traceback)[/dim]",
            highlight=False,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
