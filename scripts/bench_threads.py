"""Thread settings on a shared machine: eager PyTorch and ONNX Runtime, idle and beside a busy
process, at 1 thread and at the machine's thread count with each OpenMP wait policy.

Each cell runs in a fresh Python process (OpenMP reads ``OMP_WAIT_POLICY`` when torch is
imported) and measures, with LiteCNN on 28-px input: the median batch-1 eager latency, training
steps per second (batch 64, forward + backward + SGD), and ONNX Runtime batch-1 latency with
its worker threads spinning (its default) and not. ``threads=auto`` is medlite's default for
training (:mod:`medlite.threads`): the child takes as many threads as cores are free when it starts. The competing load is ``--load`` processes
each spinning one core, started before and stopped after the cell, so every cell sees the same
contention. Cells run in turns, ``--rounds`` times, and the table gives each cell's median over
rounds; ratios are against ``1 thread`` in the same condition.

    python scripts/bench_threads.py                  # idle and with 1 busy process
    python scripts/bench_threads.py --load 1 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

CHILD = r"""
import json, os, statistics, sys, time
threads, ort_path = int(sys.argv[1]), sys.argv[2]
import torch
if threads == 0:  # medlite's threads=auto: the cores other processes leave free
    from medlite.threads import idle_threads
    threads = idle_threads(os.cpu_count()) or os.cpu_count()
torch.set_num_threads(threads)
from medlite.models.factory import create_model

def median_ms(fn, n, warm=5):
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)

model = create_model("litecnn", num_classes=2, in_chans=1, img_size=28)
x1, xb, yb = torch.randn(1, 1, 28, 28), torch.randn(64, 1, 28, 28), torch.randint(0, 2, (64,))
model.eval()
with torch.inference_mode():
    eager = median_ms(lambda: model(x1), 200)
model.train()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
def step():
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(xb), yb).backward(); opt.step()
steps = 1e3 / median_ms(step, 15, warm=3)
import numpy as np, onnxruntime as ort
res = {"eager_ms": eager, "train_steps_s": steps}
a = np.random.randn(1, 1, 28, 28).astype(np.float32)
for spin in ("1", "0"):
    o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", spin)
    s = ort.InferenceSession(ort_path, o, providers=["CPUExecutionProvider"])
    res["ort_spin_ms" if spin == "1" else "ort_nospin_ms"] = median_ms(lambda: s.run(None, {"image": a}), 300)
res["threads"] = threads
print(json.dumps(res))
"""

CELLS = {  # name: (threads, extra environment)
    "1 thread": (1, {}),
    "{n} threads, OpenMP default": (None, {}),
    "{n} threads, OMP_WAIT_POLICY=PASSIVE": (None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "medlite threads=auto (free cores)": (0, {}),
}
SPIN = "import time\nwhile True:\n    pass\n"


def _export_onnx(folder: Path) -> Path:
    import torch

    from medlite.deploy.onnx import export_onnx
    from medlite.models.factory import create_model

    path = folder / "litecnn.onnx"
    model = create_model("litecnn", num_classes=2, in_chans=1, img_size=28).eval()
    export_onnx(model, torch.randn(2, 1, 28, 28), path)
    return path


def _cell(threads: int, env: dict, onnx: Path) -> dict:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    child_env |= env
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(onnx)],
        env=child_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", nargs="+", type=int, default=[0, 1], help="busy processes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", default="outputs/bench_threads.json")
    args = p.parse_args()
    console = Console(width=170)
    n = args.threads
    cells = {name.format(n=n): (n if t is None else t, env) for name, (t, env) in CELLS.items()}
    results: dict[int, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx = _export_onnx(Path(tmp))
        for load in args.load:
            results[load] = {name: [] for name in cells}
            for r in range(args.rounds):
                busy = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(load)]
                try:
                    for name, (threads, env) in cells.items():
                        console.print(f"load {load}, round {r + 1}: {name}", style="dim")
                        results[load][name].append(_cell(threads, env, onnx))
                finally:
                    for proc in busy:
                        proc.kill()
                        proc.wait()
    keys = ("eager_ms", "train_steps_s", "ort_spin_ms", "ort_nospin_ms", "threads")
    summary = {
        load: {
            name: {k: statistics.median(c[k] for c in runs) for k in keys}
            for name, runs in cells_.items()
        }
        for load, cells_ in results.items()
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "summary": summary}, indent=1))
    table = Table(
        title=f"LiteCNN 28 px on {os.cpu_count()} logical CPUs: median of {args.rounds} rounds"
    )
    cols = ("busy processes", "setting", "threads", "eager bs1 ms", "train steps/s")
    for col in (*cols, "ORT ms (spin)", "ORT ms (no spin)"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for load, cells_ in summary.items():
        base = cells_["1 thread"]
        for name, v in cells_.items():
            table.add_row(
                str(load),
                name,
                f"{v['threads']:g}",
                f"{v['eager_ms']:.2f} ({base['eager_ms'] / v['eager_ms']:.2f}x)",
                f"{v['train_steps_s']:.1f} ({v['train_steps_s'] / base['train_steps_s']:.2f}x)",
                f"{v['ort_spin_ms']:.3f}",
                f"{v['ort_nospin_ms']:.3f}",
            )
    table.caption = "(ratios: speed against 1 thread under the same load; > 1 is faster)"
    console.print(table)


if __name__ == "__main__":
    main()
