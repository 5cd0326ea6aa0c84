"""``scripts/reproduce.py``: run published experiments and put our numbers beside theirs.

python scripts/reproduce.py --list
python scripts/reproduce.py medmnist_v2/breastmnist/resnet18_28        # the paper's protocol
python scripts/reproduce.py medmnist_v2/breastmnist --quick --jobs 2   # every method, short
python scripts/reproduce.py review/compression/breastmnist             # the compression claim
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from medlite.console import make_console, print_problem
from medlite.errors import ConfigError, MedliteError
from medlite.reproduce import recipes as rc
from medlite.reproduce import report
from medlite.reproduce.runner import RunRecord, budget_overrides, run_all

DEFAULT_OUT = Path("outputs") / "reproduce"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/reproduce.py",
        description="Rerun published experiments (conf/experiment/paper/) for several seeds and "
        "write reproduction.md/.csv/.png: ours (mean ± std) beside the published numbers.",
    )
    parser.add_argument(
        "targets", nargs="*", help="recipes or groups, e.g. medmnist_v2/breastmnist/resnet18_28"
    )
    parser.add_argument(
        "--list", action="store_true", help="every recipe and its published numbers"
    )
    parser.add_argument("--seeds", type=int, help="seeds per recipe (default: the paper's trials)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short budget (a few epochs; every number is labelled quick)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once (threads split between them)"
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: outputs/reproduce/<target>)"
    )
    parser.add_argument("--data-dir", help="folder of the dataset files (paths.data_dir)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the table from the runs that already finished",
    )
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="more train.py overrides for every run (the table says the protocol was changed)",
    )
    parser.add_argument("--show-traceback", action="store_true", help="full traceback on errors")
    return parser.parse_args(argv)


def list_table(recipes: Sequence[rc.Recipe]) -> Table:
    table = Table(title=f"{len(recipes)} recipes (python scripts/reproduce.py <recipe or group>)")
    for col in ("recipe", "source", "method", "published", "trials", "check"):
        table.add_column(col, overflow="fold")
    for r in recipes:
        entry = r.published()
        shown = (
            f"claim: {', '.join(report.metric_label(k) for k in r.metrics())} within "
            f"{rc.source_info(r.source).get('tolerance')} of the uncompressed model"
            if r.is_claim
            else ", ".join(
                f"{report.metric_label(k)} {v:.3f}" for k, v in rc.published_metrics(entry).items()
            )
        )
        check = str(entry.get("check", "")).split(":", 1)[0]
        table.add_row(
            r.id.removeprefix("paper/"), r.source, r.method_title(), shown, str(r.trials), check
        )
    return table


def plan_of(targets: Sequence[str], seeds: int | None) -> list[tuple[rc.Recipe, int]]:
    """(recipe, seed) pairs: each target's recipes, seeds 0..n-1 (n: --seeds or the trials)."""
    chosen = list({r.id: r for t in targets for r in rc.select(t)}.values())
    for r in chosen:
        r.published()  # a recipe without published numbers fails before any training
    return [(r, s) for r in chosen for s in range(seeds or r.trials)]


def default_out(targets: Sequence[str], quick: bool) -> Path:
    name = "+".join(t.strip("/").removeprefix("paper/").replace("/", "__") for t in targets)
    return DEFAULT_OUT / (name + ("-quick" if quick else ""))


def run(args: argparse.Namespace) -> int:
    console = make_console()
    if args.list or not args.targets:
        console.print(list_table(rc.discover()))
        if not args.list:
            console.print("name a recipe or group to run it, e.g. medmnist_v2/breastmnist --quick")
        return 0
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    plan = plan_of(args.targets, args.seeds)
    out = args.out or default_out(args.targets, args.quick)
    extra = [*([f"paths.data_dir={args.data_dir}"] if args.data_dir else []), *args.override]
    overrides = budget_overrides(args.quick, extra)
    budget = report.budget_label(args.quick, [o for o in overrides if not o.startswith("paths.")])
    console.print(f"{len(plan)} run(s) of {len({r.id for r, _ in plan})} recipe(s), {budget}; "
                  f"output: [bold]{escape(str(out))}[/bold]", highlight=False)  # fmt: skip
    done = [0]

    def progress(record: RunRecord) -> None:
        done[0] += 1
        what = (
            f"[{done[0]}/{len(plan)}] {record.recipe.id.removeprefix('paper/')} seed {record.seed}"
        )
        if record.ok:
            test, task = record.results.get("test") or {}, record.results.get("task")
            shown = " ".join(
                f"{report.metric_label(k, task)} {test[k]:.3f}"
                for k in record.recipe.metrics()
                if k in test
            )
            how = "reused" if record.reused else f"{record.results.get('wall_time_s', 0):.0f} s"
            console.print(f"{escape(what)}: ok, {shown} ({how})", highlight=False)
        else:
            console.print(
                f"{escape(what)}: [red]failed[/red]: {escape(str(record.error))}", highlight=False
            )

    records = run_all(
        plan, out, overrides, jobs=args.jobs, on_done=progress, train=not args.report_only
    )
    if args.report_only and len(records) < len(plan):
        console.print(f"{len(plan) - len(records)} run(s) not finished yet: not in the table")
    rows = report.summarise(records)
    title = ", ".join(args.targets)
    paths = report.write(rows, out, title, budget)
    console.print(
        escape(report.markdown(rows, title, budget).split("\n## Sources")[0]), highlight=False
    )
    console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False)
    failed = sum(r["n_failed"] for r in rows)
    return 1 if failed and not any(r["n"] for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except MedliteError as err:
        if args.show_traceback:
            raise
        print_problem(type(err).__name__, str(err), "(add --show-traceback for the full traceback)")
        return 1
