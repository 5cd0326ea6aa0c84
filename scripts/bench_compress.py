"""Compression benchmark: accuracy and cost before/after each recipe, on real MedMNIST data.

For every dataset x model it trains the base model once, then runs each recipe from that same
checkpoint (``compress.base_ckpt``), so "before" is one model measured in the same process as
"after". Distillation is measured over seeds: student alone, teacher, student distilled from
that teacher, and the fraction of the student-teacher gap that KD recovers, on the task's primary
metric (the first of its headline; AUC for MedMNIST classification).

    MEDLITE_DATA_DIR=../shared/data python scripts/bench_compress.py
    python scripts/bench_compress.py --datasets breastmnist --models litecnn --recipes ptq
    python scripts/bench_compress.py --kd-seeds 0 1 2 --kd-datasets breastmnist

Everything goes to outputs/bench_compress/ (each run's results.json, and summary.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medlite.console import quiet_third_party
from medlite.pipeline import run_with_overrides
from medlite.results import metric_title, primary_metric
from medlite.tasks import task_record


def _primary(results: dict) -> tuple[str, str]:
    """(name, title) of a run's primary test metric, from its task record."""
    record = task_record(results)
    name, _ = primary_metric(record)
    return name, metric_title(record, name)


def _common(args, data: str) -> list[str]:
    extra = [f"data.epochs={args.epochs}"] if args.epochs else []
    return [
        f"data={data}",
        "callbacks=none",
        "logger=csv",
        f"profile.threads={args.threads}",
        *extra,
    ]


def compression_rows(args, console: Console) -> list[dict]:
    rows = []
    for data in args.datasets:
        for model in args.models:
            base_dir = args.out / data / model / "base"
            base = run_with_overrides(
                base_dir, [*_common(args, data), f"model={model}", "seed=0"], args.reuse
            )
            for recipe in args.recipes:
                res = run_with_overrides(
                    args.out / data / model / recipe,
                    [
                        *_common(args, data),
                        f"model={model}",
                        "seed=0",
                        f"compress={recipe}",
                        f"compress.base_ckpt={Path(base['run_dir'], base['best_checkpoint'])}",
                    ],
                    args.reuse,
                )
                before, after = res["compression"]["stages"][0], res["compression"]["stages"][-1]
                b, a = before["efficiency"], after["efficiency"]
                metric, title = _primary(res)
                row = {
                    "data": data,
                    "model": model,
                    "recipe": recipe,
                    "metric": metric,
                    "title": title,
                    "test_before": before["test"][metric],
                    "test_after": after["test"][metric],
                    "size_ratio": b["size_mb"] / a["size_mb"],
                    "macs_ratio": b["macs"] / a["macs"] if a["macs"] else float("nan"),
                    "latency_ms_before": b["latency_ms"],
                    "latency_ms_after": a["latency_ms"],
                    "speedup_bs1": b["latency_ms"] / a["latency_ms"],
                    "throughput_ratio": a["throughput_ips"] / b["throughput_ips"],
                }
                rows.append(row)
                console.print(
                    f"{data} {model} {recipe}: {title} "
                    f"{row['test_before']:.4f} -> {row['test_after']:.4f}"
                )
    return rows


def kd_rows(args) -> list[dict]:
    rows = []
    for data in args.kd_datasets:
        per_seed = []
        for seed in args.kd_seeds:
            common = [*_common(args, data), f"seed={seed}"]
            root = args.out / data / "kd" / f"seed{seed}"
            teacher = run_with_overrides(
                root / "teacher", [*common, f"model={args.teacher}"], args.reuse
            )
            alone = run_with_overrides(
                root / args.student, [*common, f"model={args.student}"], args.reuse
            )
            kd = run_with_overrides(
                root / f"{args.student}_kd",
                [
                    *common,
                    f"model={args.student}",
                    "compress=kd",
                    f"teacher={args.teacher}",
                    f"teacher.ckpt_path={Path(teacher['run_dir'], teacher['best_checkpoint'])}",
                ],
                args.reuse,
            )
            metric, title = _primary(alone)
            per_seed.append((alone["test"][metric], teacher["test"][metric], kd["test"][metric]))
        s, t, k = (statistics.mean(v[i] for v in per_seed) for i in range(3))
        rows.append(
            {
                "data": data,
                "student": args.student,
                "teacher": args.teacher,
                "seeds": list(args.kd_seeds),
                "metric": metric,
                "title": title,
                "per_seed": per_seed,
                "test_student": s,
                "test_teacher": t,
                "test_kd": k,
                "gap_recovered": (k - s) / (t - s) if t != s else float("nan"),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="*", default=["breastmnist", "pneumoniamnist"])
    p.add_argument("--models", nargs="+", default=["litecnn", "resnet18"])
    p.add_argument("--recipes", nargs="*", default=["ptq", "prune"])
    p.add_argument("--kd-datasets", nargs="*", default=["breastmnist"])
    p.add_argument("--kd-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--student", default="litecnn")
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--epochs", type=int, default=None, help="override data.epochs everywhere")
    p.add_argument("--threads", type=int, default=2, help="CPU threads while timing")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_compress"))
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --out")
    args = p.parse_args()
    quiet_third_party()
    warnings.filterwarnings("ignore")
    logging.getLogger("medlite").setLevel(logging.WARNING)
    console = Console()

    rows = compression_rows(args, console)
    kd = kd_rows(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"compression": rows, "kd": kd}, indent=2))

    table = Table(title="compression on MedMNIST (28 px), before -> after, same process")
    titles = ", ".join(dict.fromkeys(r["title"] for r in rows)) or "metric"
    for col in (
        "data",
        "model",
        "recipe",
        f"test {titles}",
        "size",
        "MACs",
        "latency bs1",
        "thr. bs64",
    ):
        table.add_column(col, justify="left" if col in ("data", "model", "recipe") else "right")
    for r in rows:
        table.add_row(
            r["data"],
            r["model"],
            r["recipe"],
            f"{r['test_before']:.3f} -> {r['test_after']:.3f}",
            f"{r['size_ratio']:.2f}x smaller",
            f"{r['macs_ratio']:.2f}x fewer",
            f"{r['latency_ms_before']:.2f} -> {r['latency_ms_after']:.2f} ms ({r['speedup_bs1']:.2f}x)",
            f"{r['throughput_ratio']:.2f}x",
        )
    console.print(table)
    if kd:
        titles = ", ".join(dict.fromkeys(r["title"] for r in kd))
        kt = Table(title=f"knowledge distillation, test {titles} (mean over seeds)")
        for col in ("data", "student alone", "teacher", "student + KD", "gap recovered"):
            kt.add_column(col, justify="right")
        for r in kd:
            kt.add_row(
                r["data"],
                f"{r['test_student']:.3f}",
                f"{r['test_teacher']:.3f}",
                f"{r['test_kd']:.3f}",
                f"{100 * r['gap_recovered']:.0f} %",
            )
        console.print(kt)
    console.print(f"runs and summary.json in {args.out}")


if __name__ == "__main__":
    main()
