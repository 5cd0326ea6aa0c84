"""Segmentation benchmark: medlite's segmentation networks on Kvasir-SEG next to published numbers.

For every model: train on the official split at 256 px (validation carved from the 880 training
images), test on the authors' 120 held-out images, then quantise the best checkpoint to int8
(``compress=ptq`` from that checkpoint: no retraining) and measure it the same way. Params, MACs
and batch-1 CPU latency (eager PyTorch and ONNX Runtime int8) come from each run's efficiency
profile, measured in the run's process with a fixed thread count.

    python scripts/bench_seg.py --data-root ../shared/data/seg/kvasir_seg --epochs 60
    python scripts/bench_seg.py --data-root <Kvasir-SEG> --models egeunet unet --epochs 2 --size 64

Published numbers (Jha et al., "NanoNet", CBMS 2021; Kvasir-SEG, the same 880/120 split, 256 x
256) are printed beside ours. Everything goes to outputs/bench_seg/ (each run folder and
summary.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

#: published on Kvasir-SEG, official split, 256 x 256 (Jha et al., CBMS 2021): name -> numbers
PUBLISHED = [
    {"model": "NanoNet-A", "params": 235_000, "dice": 0.8227, "iou": 0.7282},
    {"model": "NanoNet-C", "params": 36_500, "dice": 0.7494, "iou": None},
    {"model": "ResUNet++", "params": 4_100_000, "dice": 0.7310, "iou": None},
]
#: the issue's goals: a small model (<= 250 K params) at Dice >= 0.82; the best at >= 0.85
SMALL_PARAMS, SMALL_DICE, BEST_DICE = 250_000, 0.82, 0.85
DEFAULT_MODELS = ["egeunet", "ultralight_vmunet", "unet_mobilenetv3", "unext", "unet"]


def _run(out: Path, overrides: list[str], reuse: bool) -> dict:
    from medlite.pipeline import run_with_overrides

    start = time.time()
    res = run_with_overrides(out, overrides, reuse)
    res.setdefault("bench_wall_s", round(time.time() - start, 1))
    return res


def bench_model(args, model: str, console: Console) -> dict:
    common = [
        "data=kvasir_seg",
        f"data.root={args.data_root}",
        f"data.size={args.size}",
        f"model={model}",
        f"seed={args.seed}",
        "callbacks=none",
        f"profile.threads={args.threads}",
        *([f"trainer.max_epochs={args.epochs}"] if args.epochs else []),
        *args.override,
    ]
    base = _run(args.out / model / "base", common, args.reuse)
    row = {
        "model": model,
        "paradigm": base["model"]["paradigm"],
        "params": base["model"]["params"],
        "macs": base["efficiency"]["macs"],
        "epochs": base["config"]["trainer"]["max_epochs"],
        "wall_s": base["wall_time_s"],
        **{f"test_{k}": base["test"].get(k) for k in ("dice", "iou", "hd95")},
        "latency_ms": base["efficiency"]["latency_ms"],
    }
    if not args.no_int8:
        int8 = _run(
            args.out / model / "ptq",
            [
                *common,
                "compress=ptq",
                f"compress.base_ckpt={Path(base['run_dir'], base['best_checkpoint'])}",
            ],
            args.reuse,
        )
        final = int8["compression"]["stages"][-1]
        row.update(
            int8_dice=final["test"].get("dice"),
            int8_latency_ms=final["efficiency"]["latency_ms"],
            int8_size_mb=final["efficiency"]["size_mb"],
        )
    console.print(
        f"{model}: Dice {row['test_dice']:.4f}"
        + (f", int8 {row['int8_dice']:.4f}" if row.get("int8_dice") is not None else "")
        + f", {row['params']:,} params, {row['wall_s']:.0f} s"
    )
    return row


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], threads: int) -> Table:
    t = Table(title=f"Kvasir-SEG test split (120 images), CPU batch 1, {threads} thread(s)")
    for col in (
        "model",
        "paradigm",
        "params",
        "MACs (G)",
        "Dice",
        "IoU",
        "HD95 (px)",
        "int8 Dice",
        "latency ms (eager / int8)",
        "epochs",
        "train time",
    ):
        t.add_column(col, justify="left" if col in ("model", "paradigm") else "right")
    for r in rows:
        t.add_row(
            r["model"],
            r["paradigm"],
            f"{r['params']:,}",
            _fmt(r["macs"] / 1e9, ".2f"),
            _fmt(r["test_dice"], ".4f"),
            _fmt(r["test_iou"], ".4f"),
            _fmt(r["test_hd95"], ".1f"),
            _fmt(r.get("int8_dice"), ".4f"),
            f"{_fmt(r['latency_ms'], '.1f')} / {_fmt(r.get('int8_latency_ms'), '.1f')}",
            str(r["epochs"]),
            f"{r['wall_s'] / 60:.0f} min",
        )
    for p in PUBLISHED:
        t.add_row(
            f"{p['model']} (published)",
            "cnn",
            f"{p['params']:,}",
            "-",
            _fmt(p["dice"], ".4f"),
            _fmt(p["iou"], ".4f"),
            "-",
            "-",
            "-",
            "-",
            "-",
        )
    return t


def goals(rows: list[dict]) -> list[str]:
    """The issue's two goals, met or not, with what was reached."""
    lines = []
    small = [r for r in rows if r["params"] <= SMALL_PARAMS and r["test_dice"] is not None]
    best_small = max(small, key=lambda r: r["test_dice"], default=None)
    if best_small is None:
        lines.append(
            f"goal 1 (<= {SMALL_PARAMS:,} params, Dice >= {SMALL_DICE}): no small model run"
        )
    else:
        met = best_small["test_dice"] >= SMALL_DICE
        lines.append(
            f"goal 1 (<= {SMALL_PARAMS:,} params, Dice >= {SMALL_DICE}): "
            f"{'met' if met else 'missed'} - best small model {best_small['model']} "
            f"({best_small['params']:,} params) Dice {best_small['test_dice']:.4f}"
        )
    scored = [r for r in rows if r["test_dice"] is not None]
    best = max(scored, key=lambda r: r["test_dice"], default=None)
    if best is not None:
        met = best["test_dice"] >= BEST_DICE
        lines.append(
            f"goal 2 (best Dice >= {BEST_DICE}): {'met' if met else 'missed'} - "
            f"{best['model']} Dice {best['test_dice']:.4f}"
        )
    for r in rows:
        if r.get("int8_dice") is not None and r["test_dice"] is not None:
            drop = r["test_dice"] - r["int8_dice"]
            lines.append(
                f"int8 {r['model']}: Dice drop {drop:+.4f} ({'within' if drop <= 0.01 else 'over'} 1 point)"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", required=True, help="folder with images/ and masks/")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--epochs", type=int, default=None, help="default: data.epochs")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for training and timing"
    )
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 (ptq) runs")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_seg"))
    parser.add_argument("override", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from medlite.console import quiet_third_party

    quiet_third_party()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

    console = Console()
    rows = [bench_model(args, m, console) for m in args.models]
    console.print(table(rows, args.threads))
    for line in goals(rows):
        console.print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(
        json.dumps({"rows": rows, "published": PUBLISHED, "goals": goals(rows)}, indent=2)
    )
    console.print(f"written: {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
