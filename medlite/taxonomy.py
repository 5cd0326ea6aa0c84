"""``python -m medlite.taxonomy``: the taxonomy tables of every model config.

For each ``conf/model/*.yaml``: paradigm, parameters, MACs and CPU latency (batch 1) at the
input size its size policy gives for 28 px and 224 px data (classification models), at 64 and
256 px (segmentation networks), or at 28³ and 64³ (volume models), each kind a table of its own. Numbers come from
:func:`medlite.efficiency.profile_model`, the same function that fills ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from rich.table import Table

import medlite
from medlite.build import build_model, model_dims
from medlite.console import make_console
from medlite.efficiency import profile_model

CONF_DIR = medlite.CONF_DIR
ORDER = {"cnn": 0, "transformer": 1, "linear": 2}


def model_configs(names: list[str] | None = None) -> list:
    wanted = names or sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfgs = [compose(config_name="train", overrides=[f"model={n}"]).model for n in wanted]
    return sorted(cfgs, key=lambda c: (ORDER.get(c.paradigm, 9), c.name))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", help="comma-separated config names (default: all)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 224], help="data sizes (px)")
    parser.add_argument(
        "--seg-sizes", type=int, nargs="+", default=[64, 256], help="segmentation sizes (px)"
    )
    parser.add_argument(
        "--volume-sizes", type=int, nargs="+", default=[28, 64], help="volume sides (voxels)"
    )
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    rows = []
    for cfg in model_configs(args.models.split(",") if args.models else None):
        task = cfg.get("task") or "classification"
        dims = model_dims(cfg)
        if dims == 3:
            task = "volume classification"
        sizes = {"segmentation": args.seg_sizes, "volume classification": args.volume_sizes}.get(
            task, args.sizes
        )
        row = {"name": cfg.name, "arch": cfg.arch, "paradigm": cfg.paradigm, "task": task}
        for size in sizes:
            side = cfg.input_size or size
            torch.manual_seed(0)
            model = build_model(cfg, args.num_classes, args.in_chans, side)
            prof = profile_model(
                model,
                (args.in_chans,) + (side,) * dims,
                repeats=args.repeats,
                warmup=3,
                throughput_batch=8,
                threads=args.threads,
            )
            row.update(
                {
                    "params": prof.params,
                    f"input@{size}": side,
                    f"macs_m@{size}": prof.macs / 1e6,
                    f"latency_ms@{size}": prof.latency_ms,
                }
            )
        rows.append(row)

    console = make_console()
    threads = args.threads or torch.get_num_threads()
    kinds = (
        ("classification", args.sizes),
        ("segmentation", args.seg_sizes),
        ("volume classification", args.volume_sizes),
    )
    for task, sizes in kinds:
        chosen = [r for r in rows if r["task"] == task]
        if chosen:
            console.print(
                _table(chosen, sizes, f"medlite {task} models (CPU, batch 1, {threads} threads)")
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _table(rows: list[dict], sizes: list[int], title: str) -> Table:
    table = Table(title=title)
    for col in ["model", "paradigm", "arch", "params (M)"]:
        table.add_column(col)
    for size in sizes:
        table.add_column(f"input @{size}", justify="right")
        table.add_column(f"MMACs @{size}", justify="right")
        table.add_column(f"ms @{size}", justify="right")
    for r in rows:
        cells = [r["name"], r["paradigm"], r["arch"], f"{r['params'] / 1e6:.3f}"]
        for size in sizes:
            cells += [
                str(r[f"input@{size}"]),
                f"{r[f'macs_m@{size}']:.1f}",
                f"{r[f'latency_ms@{size}']:.2f}",
            ]
        table.add_row(*cells)
    return table


if __name__ == "__main__":
    main()
